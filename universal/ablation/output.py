"""What an ablation produces: the result classes, their files, and the sinks per-token values
stream into.

Files of `AblationResult.save(dir)`: `ablation_runs.csv` (one row per ablated set),
`ablation_summary.csv` (one row per group), `ablation.json` (provenance, config, the exact
neurons of every set) and `ablation_rows.h5` (per-row sums, for other statistics later).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from universal_neurons.activations import TokenSet
from universal_neurons.artifacts import atomic_path, check_writable, read_json, refuse_existing_results, write_json
from universal_neurons.errors import ConfigError, InputNotFoundError, OutputExistsError
from universal_neurons.runtime import to_json

from .evaluate import counted_predictions

__all__ = ["RUN_COLUMNS", "SUMMARY_COLUMNS", "FILES", "AblationMetrics", "AblationResult", "MemorySink", "FileSink"]

RUN_COLUMNS = ["group", "layer", "set", "draw", "n_neurons", "ce_clean", "ce_ablated", "delta_ce", "kl",
               "delta_entropy", "n_tokens", "delta_ce_per_neuron"]
SUMMARY_COLUMNS = ["group", "layer", "n_neurons", "delta_ce", "delta_ce_lo", "delta_ce_hi", "kl", "kl_lo", "kl_hi",
                   "delta_entropy", "control_delta_ce_mean", "control_delta_ce_lo", "control_delta_ce_hi",
                   "control_kl_mean", "ratio_delta_ce", "p_value", "n_controls", "n_tokens",
                   # added with the paired statistics; earlier columns keep their names and meaning
                   "paired_delta_ce", "paired_delta_ce_lo", "paired_delta_ce_hi", "delta_ce_per_neuron",
                   "control_delta_ce_per_neuron", "paired_delta_ce_per_neuron", "p_value_min"]
FILES = ("ablation_runs.csv", "ablation_summary.csv", "ablation.json", "ablation_rows.h5")
_PER_TOKEN_IN_MEMORY = 20_000_000  # per-token values returned in memory up to this many; beyond: a file


@dataclass
class AblationMetrics:
    """The effect of ablating one set of neurons.

    Attributes:
        n_neurons: size of the set.
        ce_clean, ce_ablated, delta_ce, kl, delta_entropy: means over `n_tokens` counted
            predictions, nats.
        n_tokens: counted predictions.
        delta_ce_lo, delta_ce_hi, kl_lo, kl_hi: bootstrap intervals over rows.
        delta_ce_per_neuron: `delta_ce / n_neurons` (NaN for an empty set).
        row_sums: `{name: Float[ndarray, "row"]}` sums per row, with the count `n`.
        per_token: `{name: Float[ndarray, "row pos"]}`, NaN where not counted, when asked for.
        provenance: model, token set (and whether it is held out), positions, config.
    """

    n_neurons: int
    ce_clean: float
    ce_ablated: float
    delta_ce: float
    kl: float
    delta_entropy: float
    n_tokens: int
    delta_ce_lo: float
    delta_ce_hi: float
    kl_lo: float
    kl_hi: float
    delta_ce_per_neuron: float
    row_sums: dict[str, np.ndarray] = field(repr=False)
    per_token: dict[str, np.ndarray] | None = field(default=None, repr=False)
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class AblationResult:
    """Universal set(s) against controls.

    Attributes:
        runs: one row per ablated set (`RUN_COLUMNS`): `group` ("all layers" / "layer l"), `layer`
            (-1 = all), `set` ("universal" / "control"), `draw` (control index, -1 for the universal set), ...
        summary: one row per group (`SUMMARY_COLUMNS`): the universal set with bootstrap intervals,
            the control mean with intervals over rows and draws, `ratio_delta_ce` (universal / control
            mean; NaN unless the control mean is > 0), `p_value` = (1 + #controls with delta_ce >= universal)
            / (1 + n_controls) (one-sided; never below `p_value_min` = 1 / (1 + n_controls)),
            `paired_delta_ce` = delta_ce - control_delta_ce_mean on the same rows with its bootstrap
            interval (rows and control draws resampled jointly, `bootstrap.py`), and ΔCE per ablated
            neuron (`*_per_neuron`: the universal set, the control mean, the paired difference).
        sets: the neurons of every run, `[{layer: [neurons]}]` in `runs` order.
        row_sums: per-row sums (`n, ce_clean, entropy_clean [row]`; `ce_ablated, kl, entropy_ablated
            [set, row]`).
        provenance: model, checkpoint, token set (`token_set.relation_to_study`: held-out, same,
            different or unknown), `positions`, config, seeds, means source, `warnings`.
    """

    runs: pd.DataFrame
    summary: pd.DataFrame
    sets: list[dict[int, list[int]]]
    row_sums: dict[str, np.ndarray]
    provenance: dict[str, Any]

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write `ablation_runs.csv`, `ablation_summary.csv`, `ablation.json`, `ablation_rows.h5` into `out_dir`.

        Returns:
            `out_dir` as a `Path`.

        Raises:
            OutputExistsError: `out_dir` already holds ablation results and not `overwrite`.
        """
        import h5py

        out = self.check_out_dir(out_dir, overwrite=overwrite)
        for name, table in (("ablation_runs.csv", self.runs), ("ablation_summary.csv", self.summary)):
            with atomic_path(out / name, overwrite=overwrite) as tmp:
                table.to_csv(tmp, index=False)
        write_json(out / "ablation.json", {"provenance": self.provenance, "sets": self.sets}, overwrite=overwrite,
                   indent=1)
        with atomic_path(out / "ablation_rows.h5", overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
            for k, v in self.row_sums.items():
                f.create_dataset(k, data=v)
            f.attrs["provenance"] = to_json(self.provenance)
            f.attrs["note"] = "sums over counted predictions per token row; [set, row] in ablation_runs.csv order"
        return out

    @staticmethod
    def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Refuse (before any work) a directory that already holds ablation results, unless `overwrite`.

        Returns:
            `out_dir` as a `Path`.

        Raises:
            OutputExistsError: one of the result's files exists and not `overwrite`.
        """
        return refuse_existing_results(out_dir, FILES, what="ablation", overwrite=overwrite)

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> AblationResult:
        """Read what `save` wrote.

        Raises:
            InputNotFoundError: a file of the result is missing.
        """
        import h5py

        out = Path(out_dir)
        missing = [f for f in FILES if not (out / f).exists()]
        if missing:
            raise InputNotFoundError(f"{out} holds no complete ablation result (missing {', '.join(missing)}); "
                                     "run ablation_study(...).save(dir) or `universal-neurons ablate`")
        meta = read_json(out / "ablation.json", what="ablation result")
        with h5py.File(out / "ablation_rows.h5", "r") as f:
            rows = {k: f[k][()] for k in f}
        sets = [{int(layer): list(v) for layer, v in s.items()} for s in meta["sets"]]
        return cls(runs=pd.read_csv(out / "ablation_runs.csv"), summary=pd.read_csv(out / "ablation_summary.csv"),
                   sets=sets, row_sums=rows, provenance=meta["provenance"])


class MemorySink:
    """Per-token values kept in memory (small token sets): `[set, row, pos]` float32, NaN where not counted.

    Raises:
        ConfigError: on creation, when the values would not fit the in-memory limit.
    """

    def __init__(self, n_sets: int, ts: TokenSet) -> None:
        if n_sets * ts.n_tokens * 3 > _PER_TOKEN_IN_MEMORY:
            raise ConfigError(f"{n_sets} sets x {ts.n_tokens:,} tokens of per-token values is too much to "
                              "return in memory; pass per_token_path= to write them to an HDF5 file")
        shape = (n_sets, ts.n_rows, ts.ctx_len)
        self.arrays = {"ce_clean": np.full(shape[1:], np.nan, np.float32),
                       "entropy_clean": np.full(shape[1:], np.nan, np.float32),
                       **{k: np.full(shape, np.nan, np.float32) for k in ("ce_ablated", "kl", "entropy_ablated")}}

    def write(self, r0: int, values: dict[str, np.ndarray]) -> None:
        """Store the values of the rows from `r0` on."""
        for k, v in values.items():
            a = self.arrays[k]
            if a.ndim == 3:
                a[:, r0:r0 + v.shape[1]] = v
            else:
                a[r0:r0 + v.shape[0]] = v


class FileSink:
    """Per-token values streamed into HDF5: `/ce_clean, /entropy_clean [row, pos]`,
    `/ce_ablated, /kl, /entropy_ablated [set, row, pos]`, float32, NaN where not counted.

    A context manager: the file is written as `<path>.partial` and renamed into place when the
    block ends without an error, deleted when it raises.

    Raises:
        OutputExistsError: on creation, when `path` exists and not `overwrite`.
    """

    def __init__(self, path: str | os.PathLike, n_sets: int, ts: TokenSet, labels: list[str], attrs: dict[str, str],
                 overwrite: bool, batch_rows: int) -> None:
        import h5py

        self.path = check_writable(path, overwrite=overwrite)
        self.overwrite = overwrite
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.f = h5py.File(self.tmp, "w")
        rows = min(batch_rows, ts.n_rows)
        for k in ("ce_clean", "entropy_clean"):
            d = self.f.create_dataset(k, shape=(ts.n_rows, ts.ctx_len), dtype="f4", chunks=(rows, ts.ctx_len))
            d.dims[0].label, d.dims[1].label = "row", "pos"
        for k in ("ce_ablated", "kl", "entropy_ablated"):
            d = self.f.create_dataset(k, shape=(n_sets, ts.n_rows, ts.ctx_len), dtype="f4",
                                      chunks=(1, rows, ts.ctx_len))
            d.dims[0].label, d.dims[1].label, d.dims[2].label = "set", "row", "pos"
        self.f.create_dataset("counted", data=counted_predictions(ts.mask))
        self.f.attrs.update({**attrs, "sets": to_json(labels),
                             "position_rule": "value at pos is the prediction of token pos+1; NaN = not counted"})

    def write(self, r0: int, values: dict[str, np.ndarray]) -> None:
        """Write the values of the rows from `r0` on."""
        for k, v in values.items():
            if v.ndim == 3:
                self.f[k][:, r0:r0 + v.shape[1]] = v
            else:
                self.f[k][r0:r0 + v.shape[0]] = v

    def close(self, ok: bool = True) -> None:
        """Finish the file: renamed into place when `ok`, else deleted."""
        self.f.close()
        if not ok:
            self.tmp.unlink(missing_ok=True)
            return
        try:
            check_writable(self.path, overwrite=self.overwrite)  # nothing appeared there meanwhile
        except OutputExistsError:
            self.tmp.unlink(missing_ok=True)
            raise
        os.replace(self.tmp, self.path)

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)
