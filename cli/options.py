"""Command-line options generated from the configuration classes' fields.

A flag is declared once, next to the field it sets; its type and default come from the
dataclass field itself, so the CLI cannot drift from the Python API's defaults.
`tests/test_cli.py` also checks that every field is either a flag or listed in `NOT_FLAGS`
with the reason it is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["Flag", "add_flags", "config_from_args", "field_default", "NOT_FLAGS"]


@dataclass(frozen=True)
class Flag:
    """One command-line flag that sets one config field.

    Args:
        field: the dataclass field it sets.
        flag: the option string (`--ctx-len`).
        help: what it does; the default is appended.
        negate: for a bool field whose default is True: the flag sets it to False.
        to_field / from_field: unit conversion between the CLI value and the field
            (e.g. GiB on the command line, bytes in the config).
        choices: allowed values.
    """

    field: str
    flag: str
    help: str
    negate: bool = False
    to_field: Callable[[Any], Any] | None = None
    from_field: Callable[[Any], Any] | None = None
    choices: Sequence[Any] | None = None
    type: Callable[[str], Any] | None = None  # the CLI value's type when it differs from the field's


def field_default(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (from its default or default_factory)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def _scalar_type(cls: type, name: str) -> Callable[[str], Any]:
    hint = typing.get_type_hints(cls)[name]
    for option in typing.get_args(hint) or (hint,):
        if option in (int, float, str):
            return option
    return str


def _dest(cls: type, flag: Flag) -> str:
    return f"{cls.__name__}.{flag.field}"


def add_flags(parser: argparse.ArgumentParser, cls: type, flags: Sequence[Flag]) -> None:
    """Add `flags` for the fields of config class `cls` to `parser`."""
    for f in flags:
        default = field_default(cls, f.field)
        dest = _dest(cls, f)
        if isinstance(default, bool):
            if default is not f.negate:  # store_true sets True; a negating flag sets False
                raise TypeError(f"{f.flag}: {cls.__name__}.{f.field} defaults to {default}; "
                                f"{'negate' if default else 'a plain flag'} is needed")
            action = "store_false" if f.negate else "store_true"
            parser.add_argument(f.flag, dest=dest, action=action, default=default, help=f.help)
            continue
        shown = f.from_field(default) if f.from_field and default is not None else default
        parser.add_argument(f.flag, dest=dest, type=f.type or _scalar_type(cls, f.field), default=shown,
                            choices=f.choices,
                            metavar=None if f.choices else f.flag.lstrip("-").upper().replace("-", "_"),
                            help=f"{f.help} (default: {shown})")


def config_from_args(cls: type, args: argparse.Namespace, flags: Sequence[Flag], **fixed: Any) -> Any:
    """The `cls` instance the parsed `args` describe; `fixed` sets fields that no flag of
    this command sets (e.g. a device shared by several configs)."""
    kwargs = dict(fixed)
    for f in flags:
        value = getattr(args, _dest(cls, f))
        kwargs[f.field] = f.to_field(value) if f.to_field and value is not None else value
    return cls(**kwargs)


# Fields deliberately without a flag, and why (checked by tests/test_cli.py).
NOT_FLAGS: dict[str, str] = {
    "TokenSetConfig.shuffle": "row order is part of the token set's hash; the Python API sets it",
    "TokenSetConfig.exclude_bos": "the paper's mask; the Python API changes it",
    "TokenSetConfig.exclude_special": "the paper's mask; the Python API changes it",
    "TokenSetConfig.newline_ids": "set from the tokenizer; the Python API overrides it",
    "TokenSetConfig.extra_exclude_ids": "a list of ids: the Python API sets it",
    "CorrelationConfig.block_size": "chosen from --memory-gb; the Python API fixes it",
    "CorrelationConfig.device": "the command's --device",
    "CorrelationConfig.dead_var": "0 (a neuron is dead when constant); the Python API changes it",
    "CorrelationConfig.full_matrix_dtype": "float16 halves the file; the Python API changes it",
    "StoreConfig.checksum": "always on from the command line (its cost is measured in benchmarks/bench_caching.py)",
    "StoreConfig.layers": "every layer is cached; the Python API selects layers",
    "PipelineConfig.tokens": "its own flags (TokenSetConfig)",
    "PipelineConfig.store": "its own flags (StoreConfig)",
    "PipelineConfig.correlation": "its own flags (CorrelationConfig)",
    "PipelineConfig.device": "the command's --device",
    "PipelineConfig.cluster": "the command's --cluster",
    "PropertiesConfig.device": "the command's --device",
    "PropertiesConfig.prediction_kurtosis": "a family cut (docs/method.md §7); the Python API changes it",
    "PropertiesConfig.partition_var": "a family cut (docs/method.md §7); the Python API changes it",
    "PropertiesConfig.entropy_l2_penalty": "a family cut, model-dependent (docs/method.md §7); the Python API "
                                           "changes it",
    "PropertiesConfig.entropy_vocab_var": "a family cut (docs/method.md §7); the Python API changes it",
    "PropertiesConfig.partition_quantile": "a family cut (docs/method.md §7); the Python API changes it",
    "PropertiesConfig.entropy_layers": "a family cut (docs/method.md §7); the Python API changes it",
    "PropertiesConfig.entropy_l2_quantile": "a family cut (docs/method.md §7); the Python API changes it",
    "PropertiesConfig.entropy_vocab_var_quantile": "a family cut (docs/method.md §7); the Python API changes it",
    "PropertiesConfig.vocab_dtype": "float32 (1e-7 from float64); the Python API changes it",
    "PropertiesConfig.vocab_chunk": "memory of the vocabulary GEMM; the Python API changes it",
    "ExplainConfig.quantiles": "a list of quantiles; the Python API changes it",
    "ExplainConfig.position_edges": "a list of positions; the Python API changes it",
    "ExplainConfig.device": "the command's --device",
    "AblationConfig.ci": "95% intervals; the Python API changes the level",
    "AblationConfig.controls_exclude_dead": "dead neurons would make controls look harmless; the Python API changes it",
}
