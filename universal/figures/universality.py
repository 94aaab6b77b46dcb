"""Figures of the universality table: max-correlation against the chance baseline, excess
correlation, the universal fraction per layer and the per-seed comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from universal_neurons.errors import InputError

from .common import (
    BASELINE_COLOR,
    OTHER_COLOR,
    UNIVERSAL_COLOR,
    finish,
    live_neurons,
    need_columns,
    other_labels,
    quantile_box,
    quantiles,
    threshold_of,
)

__all__ = [
    "fig_max_corr_vs_baseline",
    "fig_corr_distributions",
    "fig_universal_fraction",
    "fig_excess_distribution",
    "fig_pair_correlations",
]


def fig_max_corr_vs_baseline(table: pd.DataFrame, *, threshold: float | None = None) -> go.Figure:
    """Scatter, one point per reference neuron: mean baseline (x) vs mean max-correlation (y)
    over the other seeds, coloured by layer, universal neurons ringed. Since
    `excess_corr = mean_corr - mean_baseline`, the universal neurons are those above the
    dashed line `y = x + threshold`.

    Args:
        table: the universality table (`layer, neuron, mean_corr, mean_baseline, excess_corr,
            is_universal`), one row per neuron `[layer * d_mlp]`.
        threshold: the cut (default: the table's).

    Returns:
        The figure.

    Raises:
        InputError: a column is missing.
    """
    need_columns(table, ["layer", "neuron", "mean_corr", "mean_baseline", "excess_corr", "is_universal"],
                 "the universality table")
    live = live_neurons(table)
    thr = threshold_of(table, threshold)
    fig = go.Figure()
    for layer, in_layer in live.groupby("layer"):
        fig.add_trace(go.Scattergl(
            x=in_layer["mean_baseline"], y=in_layer["mean_corr"], mode="markers", name=f"layer {layer}",
            marker=dict(size=4, opacity=0.6),
            customdata=np.c_[in_layer["layer"], in_layer["neuron"], in_layer["excess_corr"]],
            hovertemplate="L%{customdata[0]}.N%{customdata[1]}<br>max-corr %{y:.3f}<br>baseline %{x:.3f}"
                          "<br>excess %{customdata[2]:.3f}<extra></extra>"))
    universal = live[live["is_universal"].astype(bool)]
    if len(universal):
        fig.add_trace(go.Scattergl(x=universal["mean_baseline"], y=universal["mean_corr"], mode="markers",
                                   name="universal",
                                   marker=dict(size=8, color="rgba(0,0,0,0)",
                                               line=dict(color=UNIVERSAL_COLOR, width=1.5)),
                                   hoverinfo="skip"))
    lo = float(min(live["mean_baseline"].min(), live["mean_corr"].min(), 0)) if len(live) else 0.0
    fig.add_trace(go.Scatter(x=[lo, 1], y=[lo + thr, 1 + thr], mode="lines", name=f"excess = {thr:g}",
                             line=dict(color="black", dash="dash", width=1), hoverinfo="skip"))
    finish(fig, "Max-correlation vs chance baseline, per neuron", 480, xaxis_title="baseline (mean over seeds)",
           yaxis_title="max-correlation (mean over seeds)")
    fig.update_yaxes(range=[lo - 0.02, 1.02])
    fig.update_xaxes(range=[lo - 0.02, 1.02])
    return fig


def fig_corr_distributions(table: pd.DataFrame) -> go.Figure:
    """Split violins per layer: the distribution of mean max-correlation (right half) against
    the distribution of the chance baseline (left half). Universality lives in the gap.

    Args:
        table: the universality table (`layer, mean_corr, mean_baseline, excess_corr`).

    Returns:
        The figure.
    """
    need_columns(table, ["layer", "mean_corr", "mean_baseline", "excess_corr"], "the universality table")
    live = live_neurons(table)
    fig = go.Figure()
    for col, name, side, color in (("mean_baseline", "baseline", "negative", BASELINE_COLOR),
                                   ("mean_corr", "max-correlation", "positive", UNIVERSAL_COLOR)):
        fig.add_trace(go.Violin(x=live["layer"].astype(str), y=live[col], name=name, side=side, line_color=color,
                                legendgroup=name, scalegroup=name, points=False, meanline_visible=True,
                                spanmode="hard", width=0.9))
    finish(fig, "Max-correlation and baseline distributions per layer", 420, violingap=0,
                      violinmode="overlay", xaxis_title="layer", yaxis_title="correlation (mean over seeds)")
    return fig


def fig_universal_fraction(table: pd.DataFrame) -> go.Figure:
    """Bars: the percentage of universal neurons in each layer, with counts on the bars.

    Args:
        table: the universality table (`layer, is_universal`).

    Returns:
        The figure; its bar heights are `100 * mean(is_universal)` per layer.
    """
    need_columns(table, ["layer", "is_universal"], "the universality table")
    per_layer = table.groupby("layer")["is_universal"].agg(["sum", "count"]).reset_index()
    pct = 100 * per_layer["sum"] / per_layer["count"]
    fig = go.Figure(go.Bar(x=per_layer["layer"].astype(str), y=pct, marker_color=UNIVERSAL_COLOR,
                           text=[f"{int(n_universal)}/{int(n)}"
                                 for n_universal, n in zip(per_layer["sum"], per_layer["count"])],
                           textposition="outside",
                           hovertemplate="layer %{x}: %{y:.2f}%<extra></extra>", name="universal"))
    overall = 100 * table["is_universal"].mean()
    fig.add_hline(y=overall, line_dash="dot", line_color="black", annotation_text=f"all layers {overall:.2f}%",
                  annotation_position="top left")
    finish(fig, "Universal neurons per layer", 380, legend=False, xaxis_title="layer",
                      yaxis_title="universal (% of layer)", showlegend=False)
    fig.update_yaxes(range=[0, max(float(pct.max()) if len(pct) else 0, overall) * 1.25 + 0.5])
    return fig


def fig_excess_distribution(table: pd.DataFrame, *, threshold: float | None = None, bins: int = 80) -> go.Figure:
    """Histogram of excess correlation (max-correlation minus baseline, averaged over seeds),
    universal neurons stacked in red, the threshold as a dashed line; log count axis so the
    thin universal tail shows next to the bulk.

    Args:
        table: the universality table (`excess_corr, is_universal`).
        threshold: the cut drawn (default: the table's).
        bins: number of histogram bins.

    Returns:
        The figure; its bars count every live neuron once.
    """
    need_columns(table, ["excess_corr", "is_universal"], "the universality table")
    live = live_neurons(table)
    thr = threshold_of(table, threshold)
    excess = live["excess_corr"].to_numpy(dtype=float)
    edges = (np.linspace(min(excess.min(), thr) - 1e-9, max(excess.max(), thr) + 1e-9, bins + 1) if len(excess)
             else np.linspace(0, 1, bins + 1))
    mid = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for mask, name, color in ((~live["is_universal"].astype(bool), "other", OTHER_COLOR),
                              (live["is_universal"].astype(bool), "universal", UNIVERSAL_COLOR)):
        counts, _ = np.histogram(excess[mask.to_numpy()], bins=edges)
        fig.add_trace(go.Bar(x=mid, y=counts, width=np.diff(edges), name=name, marker_color=color,
                             hovertemplate="excess %{x:.3f}: %{y} neurons<extra>" + name + "</extra>"))
    fig.add_vline(x=thr, line_dash="dash", line_color="black", annotation_text=f"threshold {thr:g}")
    finish(fig, "Excess correlation over the baseline", 380, barmode="stack", bargap=0,
                      xaxis_title="excess correlation", yaxis_title="neurons", yaxis_type="log")
    return fig


def fig_pair_correlations(table: pd.DataFrame) -> go.Figure:
    """Box per other seed m: max-correlation with m vs the baseline for m. Shows whether one
    seed drives the average (all seeds should look alike).

    Args:
        table: the universality table (`max_corr_<m>`, `baseline_<m>` per other model m).

    Returns:
        The figure.
    """
    others = other_labels(table)
    if not others:
        raise InputError("the universality table has no max_corr_<m> columns")
    fig = go.Figure()
    for prefix, name, color in (("max_corr_", "max-correlation", UNIVERSAL_COLOR),
                                ("baseline_", "baseline", BASELINE_COLOR)):
        stats = [quantiles(table[f"{prefix}{label}"]) for label in others]
        fig.add_trace(quantile_box(others, stats, name, color))
    finish(fig, "Per seed: max-correlation with the reference vs baseline", 380, boxmode="group",
                      xaxis_title="seed (vs reference)", yaxis_title="correlation")
    return fig
