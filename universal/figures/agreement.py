"""Figure of the agreement stage beside universality: how alike the seeds' outputs and their
neurons become over training, on one step axis."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import BASELINE_COLOR, OTHER_COLOR, UNIVERSAL_COLOR, finish, need_columns, wilson_interval

__all__ = ["fig_alike_over_training", "universal_by_step"]


def _label(step) -> str:
    """A step on the shared category axis: the number, or 'final' for an unknown step."""
    return "final" if pd.isna(step) else str(int(step))


def universal_by_step(emergence: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """The universal fraction of all neurons per checkpoint, with its Wilson interval.

    Args:
        emergence: long table `step, layer, fraction` and, for counts and intervals,
            `n_universal, n_neurons` (`PersistenceResult.emergence`).
        level: the interval's coverage.

    Returns:
        One row per step: `step, n_universal, n_neurons, fraction, lo, hi` (counts and interval
        NaN when the table has no counts; the fraction is then the mean over layers).

    Raises:
        InputError: a column is missing.
    """
    need_columns(emergence, ["step", "layer", "fraction"], "the emergence table")
    rows = []
    counts = ({"n_universal", "n_neurons"} <= set(emergence.columns)
              and bool(np.isfinite(emergence[["n_universal", "n_neurons"]].to_numpy(dtype=float)).all()))
    for step, g in emergence.groupby("step", sort=True):
        if counts:
            k, n = float(g["n_universal"].sum()), float(g["n_neurons"].sum())
            lo, hi = wilson_interval(k, n, level=level)
            rows.append({"step": step, "n_universal": k, "n_neurons": n, "fraction": k / n if n else np.nan,
                         "lo": lo, "hi": hi})
        else:
            rows.append({"step": step, "n_universal": np.nan, "n_neurons": np.nan,
                         "fraction": float(g["fraction"].mean()), "lo": np.nan, "hi": np.nan})
    return pd.DataFrame(rows, columns=["step", "n_universal", "n_neurons", "fraction", "lo", "hi"])


def fig_alike_over_training(by_step: pd.DataFrame, emergence: pd.DataFrame | None = None, *, ci: float = 0.95,
                            title: str = "How alike the seeds become over training: outputs and neurons"
                            ) -> go.Figure:
    """The seeds' outputs and neurons against the training step: top-1 agreement and
    Jensen-Shannon divergence of their next-token distributions (mean over pairs, with its
    bootstrap interval), and, with `emergence`, the universal fraction of neurons (with its
    Wilson interval; each layer as a thin line).

    Args:
        by_step: `AgreementResult.by_step` / `agreement_by_step.csv` (`step`, `top1`, `js`, each
            with `_lo`, `_hi`).
        emergence: `PersistenceResult.emergence` (`step, layer, fraction`, ideally
            `n_universal, n_neurons`), or None for the agreement panels only.
        ci: the agreement intervals' coverage, used for the universal fraction's too.
        title: the figure's title.

    Returns:
        The figure.

    Raises:
        InputError: a table lacks a needed column.
    """
    need_columns(by_step, ["step", *[c for m in ("top1", "js") for c in (m, f"{m}_lo", f"{m}_hi")]],
                 "the agreement table")
    titles = ["outputs: top-1 agreement", "outputs: Jensen-Shannon divergence (nats)"]
    if emergence is not None:
        titles.append("neurons: universal (% of all neurons)")
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.08)
    agreement = by_step.sort_values("step", na_position="last")
    x = [_label(s) for s in agreement["step"]]
    for col, metric in enumerate(("top1", "js"), start=1):
        y = agreement[metric].to_numpy(dtype=float)
        err = dict(type="data", symmetric=False, array=agreement[f"{metric}_hi"].to_numpy(dtype=float) - y,
                   arrayminus=y - agreement[f"{metric}_lo"].to_numpy(dtype=float), color=BASELINE_COLOR)
        fig.add_trace(go.Scatter(x=x, y=y, error_y=err, mode="lines+markers", name=f"outputs, mean over pairs "
                                 f"({ci:.0%} interval)", legendgroup="agreement", showlegend=col == 1,
                                 line=dict(color=BASELINE_COLOR, width=2.5),
                                 hovertemplate="step %{x}: %{y:.4f}<extra></extra>"), row=1, col=col)
    steps = list(dict.fromkeys(x))
    if emergence is not None:
        overall = universal_by_step(emergence, level=ci)
        ex = [_label(s) for s in overall["step"]]
        for layer, rows in emergence.sort_values("step").groupby("layer"):
            fig.add_trace(go.Scatter(x=[_label(s) for s in rows["step"]], y=100 * rows["fraction"], mode="lines",
                                     name="each layer", legendgroup="layers", line=dict(color=OTHER_COLOR, width=1),
                                     opacity=0.6, showlegend=bool(layer == emergence["layer"].min()),
                                     hovertemplate=f"layer {layer}, step %{{x}}: %{{y:.2f}}%<extra></extra>"),
                          row=1, col=3)
        y = 100 * overall["fraction"].to_numpy(dtype=float)
        band = (dict(type="data", symmetric=False, array=100 * overall["hi"].to_numpy(dtype=float) - y,
                     arrayminus=y - 100 * overall["lo"].to_numpy(dtype=float), color=UNIVERSAL_COLOR)
                if overall["hi"].notna().any() else None)
        fig.add_trace(go.Scatter(x=ex, y=y, error_y=band, mode="lines+markers",
                                 name=f"neurons, all layers ({ci:.0%} Wilson interval)", legendgroup="neurons",
                                 line=dict(color=UNIVERSAL_COLOR, width=2.5),
                                 hovertemplate="step %{x}: %{y:.2f}%<extra>all layers</extra>"), row=1, col=3)
        steps = list(dict.fromkeys(ex + x))
    # one category axis for every panel: checkpoints are log-spaced, and a step missing from one
    # stage's table leaves a gap rather than shifting the others
    order = sorted(steps, key=lambda s: (s == "final", int(s) if s != "final" else 0))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=order, title_text="training step")
    fig.update_yaxes(rangemode="tozero")
    return finish(fig, title, 420)
