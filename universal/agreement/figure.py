"""The agreement figure: how alike the seeds' next-token distributions are over training."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from universal_neurons.figures.common import OTHER_COLOR, UNIVERSAL_COLOR, finish, need_columns, step_axis

from .result import AgreementResult

__all__ = ["fig_agreement"]

_TITLES = {"top1": "top-1 agreement", "js": "Jensen-Shannon divergence (nats, ≤ ln 2)",
           "kl_am": "KL(P_a ‖ P_m) (nats)", "kl_ma": "KL(P_m ‖ P_a) (nats)"}


def _x(steps: pd.Series) -> list:
    """Steps as plotted: the number, or 'final' for an unknown step."""
    return ["final" if pd.isna(s) else int(s) for s in steps]


def fig_agreement(result: AgreementResult | pd.DataFrame, table: pd.DataFrame | None = None, *,
                  metrics: tuple[str, ...] = ("top1", "js"),
                  title: str = "How alike the seeds' predictions are over training") -> go.Figure:
    """Agreement of the seeds' next-token distributions against the training step: one panel
    per metric, the mean over pairs with its bootstrap interval, each pair as a thin line.

    Args:
        result: an `AgreementResult`, or its `by_step` table (`step`, and per metric its mean
            and `_lo`, `_hi` columns), e.g. read from `agreement_by_step.csv`.
        table: the per-pair table (`agreement.csv`) when `result` is a DataFrame; None draws
            the means only.
        metrics: which of `top1`, `js`, `kl_am`, `kl_ma`, one panel each.
        title: the figure's title.

    Returns:
        The figure.

    Raises:
        InputError: a table lacks a needed column.
    """
    by_step = result.by_step if isinstance(result, AgreementResult) else result
    pairs = result.table if isinstance(result, AgreementResult) else table
    need_columns(by_step, ["step", *[c for m in metrics for c in (m, f"{m}_lo", f"{m}_hi")]], "the agreement table")
    by_step = by_step.sort_values("step")
    ci = ((result.provenance.get("config") or {}).get("ci") if isinstance(result, AgreementResult) else None) or 0.95
    fig = make_subplots(rows=1, cols=len(metrics), horizontal_spacing=0.1,
                        subplot_titles=[_TITLES.get(m, m) for m in metrics])
    for col, metric in enumerate(metrics, start=1):
        if pairs is not None:
            for k, ((a, m), rows) in enumerate(pairs.sort_values("step").groupby(["a", "m"], sort=False)):
                fig.add_trace(go.Scatter(x=_x(rows["step"]), y=rows[metric], mode="lines", name="each pair",
                                         line=dict(color=OTHER_COLOR, width=1), opacity=0.45, legendgroup="pairs",
                                         showlegend=col == 1 and k == 0,
                                         hovertemplate=f"{a}–{m}, step %{{x}}: %{{y:.4f}}<extra></extra>"),
                              row=1, col=col)
        y = by_step[metric].to_numpy(dtype=float)
        err = dict(type="data", symmetric=False, array=by_step[f"{metric}_hi"].to_numpy(dtype=float) - y,
                   arrayminus=y - by_step[f"{metric}_lo"].to_numpy(dtype=float), color=UNIVERSAL_COLOR)
        fig.add_trace(go.Scatter(x=_x(by_step["step"]), y=y, error_y=err, mode="lines+markers",
                                 name=f"mean over pairs ({ci:.0%} interval)", legendgroup="mean",
                                 showlegend=col == 1, line=dict(color=UNIVERSAL_COLOR, width=2.5),
                                 hovertemplate="step %{x}: %{y:.4f}<extra>mean over pairs</extra>"),
                      row=1, col=col)
    fig.update_yaxes(rangemode="tozero")  # agreement and divergences start at 0
    fig.update_xaxes(title_text="training step")
    steps = [s for s in by_step["step"] if not pd.isna(s)]
    if steps:
        step_axis(fig, steps)
    finish(fig, title, 400)
    return fig
