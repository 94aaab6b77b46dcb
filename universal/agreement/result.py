"""The agreement tables with their bootstrap intervals, and their files.

    agreement.csv           one row per (step, pair): the means and intervals of each metric
    agreement_by_step.csv   one row per step: the means over pairs, with intervals
    agreement_rows.npz      the per-row sums behind both (`n [row]`, `<metric> [entry, row]`)
    agreement.json          provenance: models per step, token set, mask policy, config, definitions
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from universal_neurons.ablation import interval, row_indices
from universal_neurons.artifacts import atomic_path, read_json, refuse_existing_results, write_json
from universal_neurons.errors import InputError, InputNotFoundError

from .config import METRICS, AgreementConfig

__all__ = ["AgreementResult", "FILES", "check_output", "summarise", "entry_columns", "metric_columns"]

FILES = {"table": "agreement.csv", "by_step": "agreement_by_step.csv", "rows": "agreement_rows.npz",
         "provenance": "agreement.json"}


def metric_columns() -> list[str]:
    """`kl_am, kl_am_lo, kl_am_hi, kl_ma, ..., top1_hi`: each metric's mean and interval."""
    return [c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi")]


def entry_columns() -> list[str]:
    """The columns of `AgreementResult.table`, in order."""
    return ["step", "at_init", "a", "m", "n_rows", "n_predictions", *metric_columns()]


def check_output(out_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse, before any work, a folder that already holds an agreement result.

    Raises:
        OutputExistsError: one of the result's files exists and `overwrite` is False.
    """
    refuse_existing_results(out_dir, FILES.values(), what="agreement", overwrite=overwrite)


def _replicates(n: np.ndarray, values: dict[str, np.ndarray], config: AgreementConfig) -> dict[str, np.ndarray]:
    """`{metric: Float[ndarray, "replicate entry"]}`: ratio-of-sums means over resampled rows.

    Replicate `b` draws the rows `row_indices(n_rows, config.seed, b)` (the ablation's scheme), the
    same rows for every entry, so entries (pairs, checkpoints) are compared on paired resamples.
    """
    R, B = len(n), config.n_bootstrap
    out = {m: np.empty((B, values[m].shape[0])) for m in METRICS}
    step = max(1, min(B, 2_000_000 // max(R, 1)))  # replicates per chunk: ~16 MB of row weights
    for b0 in range(0, B, step):
        b = min(step, B - b0)
        idx = np.stack([row_indices(R, config.seed, k) for k in range(b0, b0 + b)])  # [replicate, row]
        w = np.bincount((idx + np.arange(b)[:, None] * R).ravel(), minlength=b * R).reshape(b, R).astype(np.float64)
        den = w @ n
        den[den == 0] = np.nan  # rows without a counted prediction say nothing
        for m in METRICS:
            out[m][b0:b0 + b] = (w @ values[m].T) / den[:, None]
    return out


def summarise(entries: Sequence[dict[str, Any]], n: np.ndarray, values: dict[str, np.ndarray],
              config: AgreementConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-pair table and the per-step means over pairs, each metric with its interval.

    Args:
        entries: one dict per entry `{step, at_init, a, m}` (a pair at a checkpoint).
        n: `Float[ndarray, "row"]` counted predictions per row.
        values: `{metric: Float[ndarray, "entry row"]}` per-row sums.
        config: the bootstrap's settings.

    Returns:
        `(table, by_step)`: `table` has `entry_columns()`; `by_step` one row per step with
        `step, at_init, n_pairs, n_rows, n_predictions` and the metrics' means over the step's
        pairs, whose intervals come from the same replicates (mean over pairs per replicate).
    """
    total = float(n.sum())
    boot = _replicates(n, values, config)
    rows = []
    for k, entry in enumerate(entries):
        row = {**entry, "n_rows": int(len(n)), "n_predictions": int(total)}
        for m in METRICS:
            row[m] = float(values[m][k].sum() / total)
            row[f"{m}_lo"], row[f"{m}_hi"] = interval(boot[m][:, k], config.ci)
        rows.append(row)
    table = pd.DataFrame(rows, columns=entry_columns())
    table["step"] = table["step"].astype("Int64")
    per_step = []
    for step, group in table.groupby("step", sort=True, dropna=False):
        ix = group.index.to_numpy()
        row = {"step": step, "at_init": bool(group["at_init"].iloc[0]), "n_pairs": len(ix), "n_rows": int(len(n)),
               "n_predictions": int(total)}
        for m in METRICS:
            row[m] = float(group[m].mean())
            row[f"{m}_lo"], row[f"{m}_hi"] = interval(boot[m][:, ix].mean(1), config.ci)
        per_step.append(row)
    by_step = pd.DataFrame(per_step, columns=["step", "at_init", "n_pairs", "n_rows", "n_predictions",
                                              *metric_columns()])
    by_step["step"] = by_step["step"].astype("Int64")
    return table, by_step


@dataclass
class AgreementResult:
    """Functional agreement of a seed family (docs/agreement.md).

    Attributes:
        table: one row per (checkpoint step, pair (a, m)): `step` (None when unknown), `at_init`
            (step 0), labels `a` and `m`, `n_rows`, `n_predictions`, and per metric its mean over
            the counted predictions with a bootstrap interval over token rows: `kl_am` =
            KL(P_a || P_m), `kl_ma` = KL(P_m || P_a), `js` (Jensen-Shannon, natural log, in
            [0, ln 2]), all in nats, and `top1` (fraction of predictions whose argmax agrees).
        by_step: one row per step, the means over its pairs (`n_pairs`) with intervals.
        rows: `n` (`[row]` counted predictions) and per metric `[entry, row]` sums, entry =
            row of `table`: what the intervals were computed from.
        provenance: models per step, token set, mask policy, config, definitions.
    """

    table: pd.DataFrame
    by_step: pd.DataFrame
    rows: dict[str, np.ndarray]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> list[int | None]:
        """The checkpoint steps of the result, ascending (None for an unknown step)."""
        return [None if pd.isna(s) else int(s) for s in self.by_step["step"]]

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the two tables, the per-row sums and the provenance into `out_dir`, each atomically.

        Args:
            out_dir: the folder (created when absent).
            overwrite: replace the files of an earlier result.

        Returns:
            `out_dir` as a `Path`.

        Raises:
            OutputExistsError: `out_dir` holds one of the files and `overwrite` is False
                (checked before anything is written).
        """
        out = Path(out_dir)
        check_output(out, overwrite=overwrite)
        for name in ("table", "by_step"):
            with atomic_path(out / FILES[name], overwrite=overwrite) as tmp:
                getattr(self, name).to_csv(tmp, index=False)
        with atomic_path(out / FILES["rows"], overwrite=overwrite) as tmp, open(tmp, "wb") as f:
            arrays: dict[str, Any] = dict(self.rows)  # numpy's stub reads **kwargs as its bool option
            np.savez(f, **arrays)
        write_json(out / FILES["provenance"], {**self.provenance, "files": FILES}, overwrite=overwrite)
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> AgreementResult:
        """Read what `save` wrote.

        Raises:
            InputNotFoundError: a file of the result is missing.
            InputError: a table lacks its columns.
        """
        out = Path(out_dir)
        missing = [f for f in FILES.values() if not (out / f).is_file()]
        if missing:
            raise InputNotFoundError(f"{out} has no {missing[0]}; compute agreement with functional_agreement "
                                     "(`universal-neurons agreement`)")
        prov = read_json(out / FILES["provenance"], what="agreement provenance")
        frames = {}
        for name in ("table", "by_step"):
            df = pd.read_csv(out / FILES[name], dtype={"a": str, "m": str})
            if not set(metric_columns()) <= set(df.columns):
                raise InputError(f"{out / FILES[name]} lacks the agreement columns; recompute it with "
                                 "`universal-neurons agreement --overwrite`")
            df["step"] = df["step"].astype("Int64")
            frames[name] = df
        with np.load(out / FILES["rows"]) as z:
            rows = {k: z[k] for k in z.files}
        return cls(table=frames["table"], by_step=frames["by_step"], rows=rows, provenance=prov)
