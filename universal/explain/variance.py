"""Activation-based explanations: the variance reduction of every feature for every neuron,
the neuron's best features, and its family (docs/explanations.md).

For a binary feature f holding n_f of the N counted tokens, the paper's variance reduction

    VR = (Var(a) - [p Var(a|f) + (1-p) Var(a|not f)]) / Var(a),      p = n_f / N

is the between-group share of the total sum of squares (the law of total variance), so

    VR = n_f N / (N - n_f) * (mean(a|f) - mean(a))^2 / M2,          M2 = sum (a - mean)^2

needs only each feature's count and activation sum beside the total moments; no sum of squares
per feature, and no difference of large numbers. The same identity gives eta^2 (the share of
variance explained by a many-valued grouping: the current token's id, the previous token's id,
the position).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .accumulate import MainPartial
from .config import FAMILIES, ExplainConfig
from .features import FeatureSet

__all__ = ["variance_reduction", "eta_squared", "family_scores", "assign_families", "best_features"]


def _between(counts: torch.Tensor, sums: torch.Tensor, n: int, total: torch.Tensor) -> torch.Tensor:
    """Between-group sum of squares of each group against the rest, `[group, unit]`
    (NaN where a group is empty or holds every token)."""
    c = counts.unsqueeze(1)
    diff = sums / c - (total / n).unsqueeze(0)
    out = c * n / (n - c) * diff * diff
    bad = (counts <= 0) | (counts >= n)
    return torch.where(bad.unsqueeze(1), torch.full_like(out, float("nan")), out)


def variance_reduction(main: MainPartial, features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """The variance reduction of every feature for every unit of a pass.

    Args:
        main: pass 1 over the units (`MainPartial`).
        features: the run's features.

    Returns:
        `(vr: Float[ndarray, "unit feature"] float64 in [0, 1], NaN where undefined (a feature
        on no or on every token, a constant neuron), count: Int[ndarray, "feature"])`.
    """
    counts, sums = features.stats(main.count_cur, main.sum_cur, main.count_prev, main.sum_prev, main.count_pos,
                                  main.sum_pos)
    total = main.sum_cur.sum(0)  # every counted token has a current id: the shifted sum of all tokens
    m2 = main.moments.m2 if main.n else torch.zeros_like(total)
    with torch.no_grad():
        vr = _between(counts, sums, main.n, total) / m2.unsqueeze(0)
        vr = torch.where((m2 > 0).unsqueeze(0), vr, torch.full_like(vr, float("nan")))
    out = vr.T.cpu().numpy()
    return np.clip(out, 0.0, 1.0), counts.cpu().numpy().round().astype(np.int64)


def eta_squared(main: MainPartial) -> dict[str, np.ndarray]:
    """Share of each unit's variance explained by the current token's id, the previous token's
    id and the position (many-valued groupings; `[unit]` each, NaN for a constant neuron).

    These are biased upwards by about (groups - 1) / (N - 1) (a grouping into as many groups as
    tokens explains everything); the position's bias is small when N >> ctx_len.
    """
    total, n = main.sum_cur.sum(0), main.n
    m2 = main.moments.m2 if n else torch.zeros_like(total)
    out = {}
    for name, cnt, sm in (("current_token", main.count_cur, main.sum_cur),
                          ("previous_token", main.count_prev, main.sum_prev),
                          ("position", main.count_pos, main.sum_pos)):
        keep = cnt > 0
        c = cnt[keep].double().unsqueeze(1)
        diff = sm[keep] / c - (total / max(n, 1)).unsqueeze(0)
        between = (c * diff * diff).sum(0)
        eta = torch.where(m2 > 0, between / m2, torch.full_like(m2, float("nan")))
        out[name] = np.clip(eta.cpu().numpy(), 0.0, 1.0)
    return out


def _nanmax(x: np.ndarray) -> np.ndarray:
    """Row-wise max ignoring NaN; NaN for an all-NaN (or empty) row."""
    if x.shape[1] == 0:
        return np.full(x.shape[0], np.nan)
    filled = np.where(np.isnan(x), -np.inf, x)
    m = filled.max(axis=1)
    return np.where(np.isinf(m), np.nan, m)


def family_scores(vr: np.ndarray, table: pd.DataFrame, eta_position: np.ndarray) -> dict[str, np.ndarray]:
    """Each unit's score for each family (`[unit]` each).

    unigram: the best current-token unigram VR; alphabet: the best current-token first-letter VR;
    previous_token: the best VR of a previous-token unigram, class or first letter; position:
    the larger of the best position-bucket VR and the position's eta^2.
    """
    kind, side = table["kind"].to_numpy(), table["side"].to_numpy()
    pick = {
        "unigram": (kind == "unigram") & (side == "current"),
        "alphabet": (kind == "alphabet") & (side == "current"),
        "previous_token": (side == "previous") & np.isin(kind, ("unigram", "class", "alphabet")),
        "position": kind == "position",
    }
    scores = {name: _nanmax(vr[:, cols]) for name, cols in pick.items()}
    scores["position"] = np.fmax(scores["position"], eta_position)
    return scores


def assign_families(scores: dict[str, np.ndarray], var: np.ndarray, config: ExplainConfig
                    ) -> tuple[list[str], np.ndarray]:
    """The family of each unit by the configured cuts (`config.family_cuts`).

    Returns:
        `(family per unit, its score)`: the family whose score is highest among those reaching
        their cut (ties: `FAMILIES` order); 'other' (score: the best of all) when none does;
        'dead' (NaN) for a constant neuron.
    """
    cuts = {"unigram": config.unigram_vr, "alphabet": config.alphabet_vr, "previous_token": config.previous_vr,
            "position": config.position_vr}
    names = list(cuts)
    s = np.stack([scores[k] for k in names], axis=1)  # [unit, family]
    reach = np.where(np.isnan(s), False, s >= np.array([cuts[k] for k in names]))
    fam, score = [], np.full(len(var), np.nan)
    for i in range(len(var)):
        if not var[i] > 0:
            fam.append("dead")
            continue
        if reach[i].any():
            j = int(np.argmax(np.where(reach[i], s[i], -np.inf)))  # first maximum: FAMILIES order
            fam.append(names[j])
            score[i] = s[i, j]
        else:
            fam.append("other")
            score[i] = np.nanmax(s[i]) if np.isfinite(s[i]).any() else np.nan
    assert set(fam) <= set(FAMILIES)
    return fam, score


def best_features(vr: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` features of highest VR per unit (ties: lower feature index; NaN never chosen).

    Returns:
        `(feature index [unit, n] (-1 where fewer exist), vr [unit, n])`.
    """
    n_units, n_feat = vr.shape
    idx = np.full((n_units, n), -1, np.int64)
    val = np.full((n_units, n), np.nan)
    for i in range(n_units):
        ok = np.flatnonzero(~np.isnan(vr[i]))
        order = ok[np.lexsort((ok, -vr[i, ok]))][:n]
        idx[i, :len(order)], val[i, :len(order)] = order, vr[i, order]
    return idx, val
