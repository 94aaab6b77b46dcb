"""Confidence intervals, the paired difference against controls, and the p-value.

Intervals bootstrap over token *rows*, not tokens: tokens of a row share their context and are
dependent, rows are (nearly) independent. The resampling scheme, exactly (so that it can be
re-done by hand; `tests/test_ablation.py` does):

    replicate b (0 <= b < n_bootstrap), R rows, K controls in a group, seed = config.seed:
      rows:     idx_b = default_rng(SeedSequence([seed, 2**31 - 1, 0, b])).integers(0, R, size=R)
                the same rows for every set (paired): ΔCE_s(b) = Σ_{i in idx_b} (ce_ablated[s, i] - ce_clean[i])
                                                                   / Σ_{i in idx_b} n[i]
      controls: pick_b = default_rng(SeedSequence([seed, 2**31 - 1, layer + 2, b])).integers(0, K, size=K)
                (layer = the group's layer, -1 for all layers): the control draws, resampled
                control_mean(b) = mean_j ΔCE_{control pick_b[j]}(b)
      paired:   Δ(b) = ΔCE_universal(b) - control_mean(b)

so the paired interval carries both sources of error at once: which tokens were measured, and
which random sets stood in for "random neurons". Intervals are the central `ci` percentiles
(`np.quantile`, linear) of the replicates; a replicate without a counted prediction is dropped.

The p-value is one-sided, permutation-style: (1 + #{controls with ΔCE >= the universal set's})
/ (1 + K), on all rows; it is never below 1/(1 + K) (0.01 with the default 99 controls).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import AblationConfig
from .evaluate import RowSums
from .output import SUMMARY_COLUMNS

__all__ = ["BOOTSTRAP_KEY", "bootstrap_replicates", "control_picks", "interval", "row_indices", "summarise"]

BOOTSTRAP_KEY = 2**31 - 1  # second word of every bootstrap seed: apart from the control draws' [seed, layer+1, k]


def row_indices(n_rows: int, seed: int, b: int) -> np.ndarray:
    """`Int[ndarray, "row"]`: the rows replicate `b` resamples (with replacement)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), BOOTSTRAP_KEY, 0, int(b)])).integers(
        0, n_rows, size=n_rows)


def control_picks(n_controls: int, layer: int, seed: int, n_bootstrap: int) -> np.ndarray:
    """`Int[ndarray, "replicate draw"]`: the control draws each replicate resamples, for the group of `layer`."""
    return np.stack([np.random.default_rng(np.random.SeedSequence([int(seed), BOOTSTRAP_KEY, int(layer) + 2, b]))
                     .integers(0, n_controls, size=n_controls) for b in range(n_bootstrap)])


def bootstrap_replicates(sums: RowSums, config: AblationConfig) -> dict[str, np.ndarray]:
    """Per-set bootstrap replicates of the mean delta_ce and KL, resampling rows (paired across sets).

    Args:
        sums: per-row sums of every set.
        config: `n_bootstrap` replicates, seeded by `seed` (see the module docstring).

    Returns:
        `{"delta_ce": [replicate, set], "kl": [replicate, set]}`; NaN for a replicate without a
        counted prediction.
    """
    R, B = len(sums.n), config.n_bootstrap
    dce = (sums.ce_ablated - sums.ce_clean).T  # [row, set]
    kl = sums.kl.T
    out = {"delta_ce": np.empty((B, dce.shape[1])), "kl": np.empty((B, dce.shape[1]))}
    step = max(1, min(B, 2_000_000 // max(R, 1)))  # replicates per step: ~16 MB of row weights
    for b0 in range(0, B, step):
        b = min(step, B - b0)
        idx = np.stack([row_indices(R, config.seed, k) for k in range(b0, b0 + b)])  # [replicate, row]
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


def _per_neuron(x: float, n: int) -> float:
    return float(x) / n if n else float("nan")


def summarise(runs: pd.DataFrame, sums: RowSums, config: AblationConfig) -> pd.DataFrame:
    """One row per group: the universal set, its controls, the paired difference and the p-value.

    Args:
        runs: one row per set (`RUN_COLUMNS`), in the order of `sums`' sets.
        sums: per-row sums of every set.
        config: bootstrap settings.

    Returns:
        The summary table (`SUMMARY_COLUMNS`).
    """
    boot = bootstrap_replicates(sums, config)
    rows = []
    for (group, layer), g in runs.groupby(["group", "layer"], sort=False):
        u = int(g.index[g["set"] == "universal"][0])
        ctrl = g.index[g["set"] == "control"].to_numpy()
        ur = runs.loc[u]
        n = int(ur.n_neurons)
        row = {"group": group, "layer": int(layer), "n_neurons": n, "delta_ce": ur.delta_ce,
               "kl": ur.kl, "delta_entropy": ur.delta_entropy, "n_controls": len(ctrl), "n_tokens": int(ur.n_tokens),
               "delta_ce_per_neuron": _per_neuron(ur.delta_ce, n), "p_value_min": 1.0 / (1 + len(ctrl))}
        row["delta_ce_lo"], row["delta_ce_hi"] = interval(boot["delta_ce"][:, u], config.ci)
        row["kl_lo"], row["kl_hi"] = interval(boot["kl"][:, u], config.ci)
        if len(ctrl):
            c_dce = runs.loc[ctrl, "delta_ce"].to_numpy()
            pick = ctrl[control_picks(len(ctrl), int(layer), config.seed, config.n_bootstrap)]  # [replicate, draw]
            c_boot = np.take_along_axis(boot["delta_ce"], pick, axis=1).mean(1)
            row["control_delta_ce_mean"] = float(c_dce.mean())
            row["control_delta_ce_lo"], row["control_delta_ce_hi"] = interval(c_boot, config.ci)
            row["control_kl_mean"] = float(runs.loc[ctrl, "kl"].mean())
            # a ratio means "times as harmful as random" only when random ablation does harm
            row["ratio_delta_ce"] = (ur.delta_ce / row["control_delta_ce_mean"] if row["control_delta_ce_mean"] > 0
                                     else np.nan)
            row["p_value"] = (1 + int((c_dce >= ur.delta_ce).sum())) / (1 + len(ctrl))
            row["paired_delta_ce"] = float(ur.delta_ce - c_dce.mean())
            row["paired_delta_ce_lo"], row["paired_delta_ce_hi"] = interval(boot["delta_ce"][:, u] - c_boot, config.ci)
            row["control_delta_ce_per_neuron"] = _per_neuron(row["control_delta_ce_mean"], n)
            row["paired_delta_ce_per_neuron"] = _per_neuron(row["paired_delta_ce"], n)
        else:
            row.update({k: np.nan for k in ("control_delta_ce_mean", "control_delta_ce_lo", "control_delta_ce_hi",
                                             "control_kl_mean", "ratio_delta_ce", "p_value", "paired_delta_ce",
                                             "paired_delta_ce_lo", "paired_delta_ce_hi",
                                             "control_delta_ce_per_neuron", "paired_delta_ce_per_neuron")})
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
