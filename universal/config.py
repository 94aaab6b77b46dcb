"""The one base of every configuration class: frozen dataclasses that validate on creation,
serialise to JSON-ready dicts and read back strictly.

    @dataclass(frozen=True)
    class TokenSetConfig(Config):
        ctx_len: int = 512  # the paper's context length, BOS included

        def __post_init__(self) -> None:
            if self.ctx_len < 2:
                self.fail(f"ctx_len must be >= 2, got {self.ctx_len}")

`from_dict` refuses keys the class does not have (a typo or a file from another version
must not be dropped silently), turns JSON lists back into tuples where a field is a tuple,
rebuilds nested configurations, and turns a wrong argument into a `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

__all__ = ["Config"]

C = TypeVar("C", bound="Config")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:  # resolving string annotations is slow; a class's hints never change
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _options(hint: Any) -> tuple[Any, ...]:
    """The alternatives of `X | None` / `Optional[X]`, or `(hint,)`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _decode(hint: Any, value: Any) -> Any:
    """A JSON value back in the field's Python form: lists to tuples, dicts to nested configs."""
    if value is None:
        return None
    for option in _options(hint):
        if isinstance(option, type) and issubclass(option, Config) and isinstance(value, Mapping):
            return option.from_dict(value)
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    return value


class Config:
    """Mixin for `@dataclass(frozen=True)` configuration classes (see the module docstring)."""

    @classmethod
    def fail(cls, message: str) -> typing.NoReturn:
        """Raise the `ConfigError` of a bad value, prefixed with the class name."""
        raise ConfigError(f"{cls.__name__}: {message}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested configurations as dicts (JSON-ready up to tuples)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """The configuration `to_dict` (or its JSON) describes; unknown keys are an error."""
        if not isinstance(d, Mapping):
            cls.fail(f"expected a mapping of settings, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = sorted(set(d) - fields)
        if unknown:
            cls.fail(f"unknown setting(s) {unknown}; known: {sorted(fields)}")
        hints = _hints(cls)
        kwargs = {k: _decode(hints.get(k), v) for k, v in d.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:  # a value of the wrong type deep inside a check
            cls.fail(str(e))

    def replace(self: C, **changes: Any) -> C:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
