"""Confidence intervals and the comparison with controls.

Intervals bootstrap over token *rows*, not tokens: tokens of a row share their context and are
dependent, rows are (nearly) independent. Every replicate resamples rows with replacement, the
same rows for all sets (paired), and for the control mean also resamples the control draws.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import AblationConfig
from .evaluate import RowSums
from .output import SUMMARY_COLUMNS

__all__ = ["bootstrap_replicates", "interval", "summarise"]


def bootstrap_replicates(sums: RowSums, config: AblationConfig) -> dict[str, np.ndarray]:
    """Per-set bootstrap replicates of the mean delta_ce and KL, resampling rows (paired across sets).

    Args:
        sums: per-row sums of every set.
        config: `n_bootstrap` replicates, seeded by `seed`.

    Returns:
        `{"delta_ce": [replicate, set], "kl": [replicate, set]}`; NaN for a replicate without a
        counted prediction.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 0, 2**31 - 1]))
    R, B = len(sums.n), config.n_bootstrap
    dce = (sums.ce_ablated - sums.ce_clean).T  # [row, set]
    kl = sums.kl.T
    out = {"delta_ce": np.empty((B, dce.shape[1])), "kl": np.empty((B, dce.shape[1]))}
    step = max(1, min(B, 2_000_000 // max(R, 1)))  # replicates per step: ~16 MB of row weights
    for b0 in range(0, B, step):
        b = min(step, B - b0)
        idx = rng.integers(0, R, size=(b, R))
        w = np.bincount((idx + np.arange(b)[:, None] * R).ravel(), minlength=b * R).reshape(b, R).astype(np.float64)
        den = w @ sums.n
        den[den == 0] = np.nan  # a replicate of rows without counted predictions says nothing
        out["delta_ce"][b0:b0 + b] = (w @ dce) / den[:, None]
        out["kl"][b0:b0 + b] = (w @ kl) / den[:, None]
    return out


def interval(x: np.ndarray, ci: float) -> tuple[float, float]:
    """The central `ci` percentile interval of the finite replicates `x` (`[replicate]`); NaNs if none."""
    x = x[np.isfinite(x)]
    if not len(x):
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(x, [a, 1.0 - a])
    return float(lo), float(hi)


def summarise(runs: pd.DataFrame, sums: RowSums, config: AblationConfig) -> pd.DataFrame:
    """One row per group: the universal set with intervals against its controls.

    Args:
        runs: one row per set (`RUN_COLUMNS`), in the order of `sums`' sets.
        sums: per-row sums of every set.
        config: bootstrap settings.

    Returns:
        The summary table (`SUMMARY_COLUMNS`).
    """
    boot = bootstrap_replicates(sums, config)
    rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 0, 2**31 - 2]))
    rows = []
    for (group, layer), g in runs.groupby(["group", "layer"], sort=False):
        u = int(g.index[g["set"] == "universal"][0])
        ctrl = g.index[g["set"] == "control"].to_numpy()
        ur = runs.loc[u]
        row = {"group": group, "layer": int(layer), "n_neurons": int(ur.n_neurons), "delta_ce": ur.delta_ce,
               "kl": ur.kl, "delta_entropy": ur.delta_entropy, "n_controls": len(ctrl), "n_tokens": int(ur.n_tokens)}
        row["delta_ce_lo"], row["delta_ce_hi"] = interval(boot["delta_ce"][:, u], config.ci)
        row["kl_lo"], row["kl_hi"] = interval(boot["kl"][:, u], config.ci)
        if len(ctrl):
            c_dce = runs.loc[ctrl, "delta_ce"].to_numpy()
            pick = ctrl[rng.integers(0, len(ctrl), size=(config.n_bootstrap, len(ctrl)))]  # [replicate, draw]
            c_boot = np.take_along_axis(boot["delta_ce"], pick, axis=1).mean(1)
            row["control_delta_ce_mean"] = float(c_dce.mean())
            row["control_delta_ce_lo"], row["control_delta_ce_hi"] = interval(c_boot, config.ci)
            row["control_kl_mean"] = float(runs.loc[ctrl, "kl"].mean())
            # a ratio means "times as harmful as random" only when random ablation does harm
            row["ratio_delta_ce"] = (ur.delta_ce / row["control_delta_ce_mean"] if row["control_delta_ce_mean"] > 0
                                     else np.nan)
            row["p_value"] = (1 + int((c_dce >= ur.delta_ce).sum())) / (1 + len(ctrl))
        else:
            row.update({k: np.nan for k in ("control_delta_ce_mean", "control_delta_ce_lo", "control_delta_ce_hi",
                                             "control_kl_mean", "ratio_delta_ce", "p_value")})
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
