"""Stage: correlations -> universality table.

    excess_corr[i] = mean_{m}( max_corr^{a,m}[i] - baseline^{a,m}[i] )
    is_universal[i] = excess_corr[i] > threshold      (strict; paper: 0.5)

One row per neuron of the reference model, with the paper's columns
`layer, neuron, max_corr, mean_corr, min_corr, max_baseline, mean_baseline,
min_baseline, excess_corr, is_universal` (max/mean/min over the other models of
max_corr and of baseline), a `dead` column, and per model m the columns
`max_corr_<m>`, `baseline_<m>`, `partner_layer_<m>`, `partner_neuron_<m>`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import numpy as np
import pandas as pd

from universal_neurons.artifacts import atomic_path, hdf5_file, read_json, reading, refuse_existing, write_json
from universal_neurons.errors import ConfigError, InputError, InputNotFoundError
from universal_neurons.runtime import from_json, provenance_base, to_json

from .correlation import CorrelationResult

__all__ = [
    "UNIVERSAL_THRESHOLD",
    "PAPER_COLUMNS",
    "check_threshold",
    "flag_universal",
    "universality_table",
    "save_universality_table",
    "load_universality_table",
]

UNIVERSAL_THRESHOLD = 0.5  # the paper's cut on excess correlation

PAPER_COLUMNS = ["layer", "neuron", "max_corr", "mean_corr", "min_corr", "max_baseline",
                 "mean_baseline", "min_baseline", "excess_corr", "is_universal"]

_TABLE_FORMATS = {".csv": "csv", ".h5": "hdf5", ".hdf5": "hdf5"}


def check_threshold(threshold: float) -> None:
    """Refuse a universality threshold outside (0, 1): at 0 or below, a neuron no better
    correlated than chance counts as universal; at 1 or above, none can.

    Raises:
        ConfigError: the threshold is not a number in (0, 1).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
            or not 0.0 < float(threshold) < 1.0:
        raise ConfigError(f"threshold={threshold!r} must lie in (0, 1) (the paper: 0.5); excess correlation "
                          "<= 0 is no better than chance and >= 1 is never reached. Fix --threshold")


def flag_universal(excess_corr: np.ndarray, threshold: float = UNIVERSAL_THRESHOLD) -> np.ndarray:
    """`excess_corr > threshold`, strict; NaN (dead neurons) is never universal.

    Args:
        excess_corr: `[neuron]` excess correlation over the baseline.
        threshold: the cut (the paper's 0.5 by default).

    Returns:
        bool `[neuron]`.

    Raises:
        ConfigError: `threshold` is not in (0, 1).
    """
    check_threshold(threshold)
    excess = np.asarray(excess_corr, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(excess), False, excess > threshold)


def _one_table(result: CorrelationResult, threshold: float) -> pd.DataFrame:
    if result.baseline is None:
        raise InputError(
            "this correlation result has no baseline (baseline='none'); excess_corr needs one: "
            "rerun correlate with CorrelationConfig(baseline='rotation')")
    ref = result.reference
    max_corr = np.asarray(result.max_corr, float)  # [model, neuron]
    baseline = np.asarray(result.baseline, float)  # [model, neuron]
    flat = np.arange(ref.n_neurons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns of dead neurons
        excess = np.mean(max_corr - baseline, axis=0)
        cols = {
            "layer": flat // ref.d_mlp, "neuron": flat % ref.d_mlp,
            "max_corr": np.max(max_corr, axis=0), "mean_corr": np.mean(max_corr, axis=0),
            "min_corr": np.min(max_corr, axis=0),
            "max_baseline": np.max(baseline, axis=0), "mean_baseline": np.mean(baseline, axis=0),
            "min_baseline": np.min(baseline, axis=0),
            "excess_corr": excess, "is_universal": flag_universal(excess, threshold),
        }
    dead = result.dead.get(ref.label)
    cols["dead"] = np.asarray(dead, bool) if dead is not None else np.isnan(cols["max_corr"])
    for k, other in enumerate(result.others):
        layer, neuron = result.partner_of(other.label)
        cols[f"max_corr_{other.label}"] = max_corr[k]
        cols[f"baseline_{other.label}"] = baseline[k]
        cols[f"partner_layer_{other.label}"] = layer
        cols[f"partner_neuron_{other.label}"] = neuron
    return pd.DataFrame(cols)


def universality_table(result: CorrelationResult | Mapping[str, CorrelationResult], *,
                       threshold: float = UNIVERSAL_THRESHOLD) -> pd.DataFrame:
    """The universality table of one reference model (or of all, in all-pairs mode).

    Args:
        result: a `CorrelationResult`, or the label -> result dict of `correlate_all_pairs`
            (rows of all references stacked, with a leading `reference` column).
        threshold: `is_universal = excess_corr > threshold`.

    Returns:
        DataFrame, one row per reference neuron (`[layer * d_mlp]` rows, `layer`, `neuron`
        first, then the paper's columns, `dead` and the per-model columns); `df.attrs` holds
        the threshold and the correlation provenance.

    Raises:
        InputError: a result has no baseline, or the dict is empty.
        ConfigError: `threshold` is not finite.
    """
    if isinstance(result, CorrelationResult):
        table = _one_table(result, threshold)
        table.attrs.update(threshold=threshold, reference=result.reference.label,
                           correlation_provenance=result.provenance)
        return table
    parts = []
    for label, one in result.items():
        part = _one_table(one, threshold)
        part.insert(0, "reference", label)
        parts.append(part)
    if not parts:
        raise InputError("no correlation results given; pass the dict returned by correlate_all_pairs")
    table = pd.concat(parts, ignore_index=True)  # per-model columns differ per reference: NaN where absent
    table.attrs.update(threshold=threshold)
    return table


def _table_format(path: str | os.PathLike) -> str:
    fmt = _TABLE_FORMATS.get(os.path.splitext(os.fspath(path))[1].lower())
    if fmt is None:
        raise ConfigError(f"cannot tell the format of {os.fspath(path)!r}; end the name in .csv, .h5 or .hdf5")
    return fmt


def _sidecar(path: str | os.PathLike) -> str:
    return os.fspath(path) + ".json"


def save_universality_table(table: pd.DataFrame, path: str | os.PathLike, *,
                            provenance: dict[str, Any] | None = None, overwrite: bool = False) -> None:
    """Write the table as CSV (`.csv`) or HDF5 (`.h5`/`.hdf5`, one dataset per column).

    HDF5 is written with h5py (no pytables needed); provenance goes to the file
    attributes, for CSV to a `<path>.json` sidecar. Both files are written atomically.

    Args:
        table: a universality table (`universality_table`).
        path: the output file; its suffix picks the format.
        provenance: extra fields recorded with the table (e.g. the correlation provenance).
        overwrite: replace an existing file.

    Raises:
        ConfigError: the suffix is not `.csv`, `.h5` or `.hdf5`.
        OutputExistsError: `path` exists and `overwrite` is False.
    """
    fmt = _table_format(path)
    refuse_existing(path, overwrite=overwrite)
    prov = {**provenance_base("universality_table"), **(provenance or {}),
            "threshold": table.attrs.get("threshold"), "correlation": table.attrs.get("correlation_provenance")}
    if fmt == "csv":
        with atomic_path(path, overwrite=overwrite) as tmp:
            table.to_csv(tmp, index=False)
        write_json(_sidecar(path), prov, overwrite=True)  # belongs to the table just written
        return

    with hdf5_file(path, overwrite=overwrite) as f:
        f.attrs["provenance"] = to_json(prov)
        f.attrs["columns"] = to_json(list(table.columns))
        for column in table.columns:
            values = table[column].to_numpy()
            f.create_dataset(f"columns/{column}", data=values.astype("S") if values.dtype == object else values)


def load_universality_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by `save_universality_table`.

    Args:
        path: a `.csv` (with its optional `<path>.json` provenance sidecar) or `.h5`/`.hdf5` file.

    Returns:
        The table; its provenance in `df.attrs['provenance']` (absent for a CSV without sidecar).

    Raises:
        InputNotFoundError: `path` does not exist.
        ConfigError: the suffix names no known format.
    """
    if not os.path.exists(path):
        raise InputNotFoundError(f"no universality table at {os.fspath(path)!r}; run the pipeline "
                                 "(`universal-neurons run`) or save one with save_universality_table")
    fix = "make one with `universal-neurons flag` (or pass a CSV with columns layer,neuron)"
    if _table_format(path) == "csv":
        with reading(path, "universality table", fix):
            table = pd.read_csv(path)
        if not {"layer", "neuron"} <= set(table.columns):
            raise InputError(f"{os.fspath(path)} is not a universality table: it has no 'layer' and 'neuron' columns "
                             f"(it has {list(table.columns)[:8]}); {fix}")
        if os.path.exists(_sidecar(path)):
            table.attrs["provenance"] = read_json(_sidecar(path), what="universality table provenance")
        return table
    import h5py

    with reading(path, "universality table", fix), h5py.File(path, "r") as f:
        columns = from_json(f.attrs["columns"])
        data = {}
        for column in columns:
            values = f[f"columns/{column}"][()]
            data[column] = values.astype(str) if values.dtype.kind == "S" else values
        table = pd.DataFrame(data, columns=columns)
        table.attrs["provenance"] = from_json(f.attrs["provenance"])
    return table
