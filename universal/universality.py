"""Stage: correlations -> universality table (METHOD.md §6).

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

from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import from_json, provenance_base, to_json

from .correlation import CorrelationResult

__all__ = [
    "UNIVERSAL_THRESHOLD",
    "flag_universal",
    "universality_table",
    "save_universality_table",
    "load_universality_table",
]

UNIVERSAL_THRESHOLD = 0.5  # the paper's cut on excess correlation

PAPER_COLUMNS = ["layer", "neuron", "max_corr", "mean_corr", "min_corr", "max_baseline",
                 "mean_baseline", "min_baseline", "excess_corr", "is_universal"]


def flag_universal(excess_corr: np.ndarray, threshold: float = UNIVERSAL_THRESHOLD) -> np.ndarray:
    """`excess_corr > threshold`, strict; NaN (dead neurons) is never universal.

    **Arguments:** `excess_corr`: `[neuron]`; `threshold`: the cut.

    **Returns:** bool `[neuron]`.
    """
    if not np.isfinite(threshold):
        raise UniversalNeuronsError(f"threshold={threshold!r} must be a finite number, e.g. 0.5")
    e = np.asarray(excess_corr, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(e), False, e > threshold)


def _one_table(result: CorrelationResult, threshold: float) -> pd.DataFrame:
    if result.baseline is None:
        raise UniversalNeuronsError(
            "this correlation result has no baseline (baseline='none'); excess_corr needs one: "
            "rerun correlate with CorrelationConfig(baseline='rotation')")
    ref = result.reference
    mc, bl = np.asarray(result.max_corr, float), np.asarray(result.baseline, float)  # [model, neuron]
    flat = np.arange(ref.n_neurons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns of dead neurons
        excess = np.mean(mc - bl, axis=0)
        cols = {
            "layer": flat // ref.d_mlp, "neuron": flat % ref.d_mlp,
            "max_corr": np.max(mc, axis=0), "mean_corr": np.mean(mc, axis=0), "min_corr": np.min(mc, axis=0),
            "max_baseline": np.max(bl, axis=0), "mean_baseline": np.mean(bl, axis=0),
            "min_baseline": np.min(bl, axis=0),
            "excess_corr": excess, "is_universal": flag_universal(excess, threshold),
        }
    dead = result.dead.get(ref.label)
    cols["dead"] = np.asarray(dead, bool) if dead is not None else np.isnan(cols["max_corr"])
    for k, m in enumerate(result.others):
        layer, neuron = result.partner_of(m.label)
        cols[f"max_corr_{m.label}"] = mc[k]
        cols[f"baseline_{m.label}"] = bl[k]
        cols[f"partner_layer_{m.label}"] = layer
        cols[f"partner_neuron_{m.label}"] = neuron
    return pd.DataFrame(cols)


def universality_table(result: CorrelationResult | Mapping[str, CorrelationResult], *,
                       threshold: float = UNIVERSAL_THRESHOLD) -> pd.DataFrame:
    """The universality table of one reference model (or of all, in all-pairs mode).

    **Arguments:**
    - `result`: a `CorrelationResult`, or the label -> result dict of `correlate_all_pairs`
      (rows of all references stacked, with a leading `reference` column).
    - `threshold`: `is_universal = excess_corr > threshold`.

    **Returns:** DataFrame, one row per reference neuron (`layer`, `neuron` first);
    `df.attrs` holds the threshold and the correlation provenance.
    """
    if isinstance(result, CorrelationResult):
        df = _one_table(result, threshold)
        df.attrs.update(threshold=threshold, reference=result.reference.label,
                        correlation_provenance=result.provenance)
        return df
    parts = []
    for label, r in result.items():
        t = _one_table(r, threshold)
        t.insert(0, "reference", label)
        parts.append(t)
    if not parts:
        raise UniversalNeuronsError("no correlation results given; pass the dict returned by correlate_all_pairs")
    df = pd.concat(parts, ignore_index=True)  # per-model columns differ per reference: NaN where absent
    df.attrs.update(threshold=threshold)
    return df


def save_universality_table(table: pd.DataFrame, path: str | os.PathLike, *,
                            provenance: dict[str, Any] | None = None, overwrite: bool = False) -> None:
    """Write the table as CSV (`.csv`) or HDF5 (`.h5`/`.hdf5`, one dataset per column).

    HDF5 is written with h5py (no pytables needed); provenance goes to the file
    attributes, for CSV to a `<path>.json` sidecar.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise UniversalNeuronsError(f"{path!r} already exists; pass overwrite=True to replace it or choose another path")
    prov = {**provenance_base("universality_table"), **(provenance or {}),
            "threshold": table.attrs.get("threshold"), "correlation": table.attrs.get("correlation_provenance")}
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        table.to_csv(path, index=False)
        with open(path + ".json", "w") as f:
            f.write(to_json(prov))
    elif ext in (".h5", ".hdf5"):
        import h5py
        with h5py.File(path, "w") as f:
            f.attrs["provenance"] = to_json(prov)
            f.attrs["columns"] = to_json(list(table.columns))
            for c in table.columns:
                v = table[c].to_numpy()
                f.create_dataset(f"columns/{c}", data=v.astype("S") if v.dtype == object else v)
    else:
        raise UniversalNeuronsError(f"cannot tell the format of {path!r}; end the name in .csv, .h5 or .hdf5")


def load_universality_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by `save_universality_table`; provenance in `df.attrs['provenance']`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UniversalNeuronsError(f"no universality table at {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        df = pd.read_csv(path)
        side = path + ".json"
        if os.path.exists(side):
            with open(side) as f:
                df.attrs["provenance"] = from_json(f.read())
        return df
    import h5py
    with h5py.File(path, "r") as f:
        cols = from_json(f.attrs["columns"])
        data = {}
        for c in cols:
            v = f[f"columns/{c}"][()]
            data[c] = v.astype(str) if v.dtype.kind == "S" else v
        df = pd.DataFrame(data, columns=cols)
        df.attrs["provenance"] = from_json(f.attrs["provenance"])
    return df
