"""Run-time facts shared by every stage: device choice, versions, provenance
encoding, progress bars. Imports nothing heavy (no TransformerLens)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
import logging
import os
import platform
from typing import Any, Iterable

import numpy as np

from .errors import UniversalNeuronsError

__all__ = [
    "SCHEMA_VERSION",
    "pick_device",
    "hub_reachable",
    "package_versions",
    "provenance_base",
    "to_json",
    "from_json",
    "progress",
    "set_progress",
]

SCHEMA_VERSION = 1  # bump when an on-disk layout changes incompatibly

log = logging.getLogger(__name__)

_PROGRESS_ENABLED = os.environ.get("UNIVERSAL_NEURONS_PROGRESS", "1") != "0"


def pick_device(device: str | None = None):
    """The torch device to compute on: `device` if given, else CUDA when present, else CPU."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UniversalNeuronsError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UniversalNeuronsError(
            f"device {device!r} was requested but torch sees no CUDA GPU; use device='cpu' or 'auto'"
        )
    return dev


def hub_reachable(*offline_vars: str) -> bool:
    """Whether the Hugging Face hub can be reached: no offline switch set (HF_HUB_OFFLINE or
    any of `offline_vars`) and huggingface.co answers within 3 seconds."""
    for k in ("HF_HUB_OFFLINE", *offline_vars):
        if os.environ.get(k, "0") not in ("0", "", "false", "False"):
            return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on."""
    out = {"python": platform.python_version()}
    for pkg in ("universal-neurons", "torch", "transformer-lens", "transformers",
                "tokenizers", "numpy", "scipy", "h5py", "pandas"):
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def provenance_base(kind: str) -> dict[str, Any]:
    """Fields every artefact carries: what it is, when, with which versions and schema."""
    return {
        "artefact": kind,
        "schema_version": SCHEMA_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "host": platform.node(),
    }


def _default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"cannot encode {type(o).__name__} as JSON")


def to_json(obj: Any) -> str:
    """JSON for provenance attributes: sorted keys, numpy scalars and paths allowed."""
    return json.dumps(obj, sort_keys=True, default=_default)


def from_json(s: str | bytes) -> Any:
    if isinstance(s, bytes):
        s = s.decode()
    return json.loads(s)


def set_progress(enabled: bool) -> None:
    """Switch every progress bar of the toolkit on or off (also: UNIVERSAL_NEURONS_PROGRESS=0)."""
    global _PROGRESS_ENABLED
    _PROGRESS_ENABLED = bool(enabled)


def progress(iterable: Iterable | None = None, *, enabled: bool | None = None, **kwargs):
    """A tqdm bar that respects the global switch; `enabled=False` silences just this one."""
    from tqdm.auto import tqdm

    on = _PROGRESS_ENABLED if enabled is None else (enabled and _PROGRESS_ENABLED)
    return tqdm(iterable, disable=not on, dynamic_ncols=True, **kwargs)
