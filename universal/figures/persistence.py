"""Figures of the persistence stage: persistence matrices (overall and per layer), partner
consistency and the emergence of universal neurons during training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from universal_neurons.errors import InputError

from .common import finish, need_columns, step_axis, step_number

__all__ = ["fig_persistence", "fig_persistence_by_layer", "fig_partner_consistency", "fig_emergence"]


def _step_matrix(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """A steps x steps matrix from a long (t, t2, value) table, or a wide one with a step index."""
    if {"t", "t2", value} <= set(df.columns):
        # dropna=False keeps the NaN rows of steps whose universal set is empty
        matrix = df.pivot_table(index="t", columns="t2", values=value, aggfunc="mean", dropna=False)
    else:  # a matrix: rows "from" step t, columns "to" step t' (as read from CSV: steps in the first column)
        matrix = df.set_index(df.columns[0]) if str(df.columns[0]) in ("t", "step", "from", "Unnamed: 0") else df.copy()
        matrix.columns = [step_number(c) for c in matrix.columns]
        matrix.index = [step_number(i) for i in matrix.index]
    return matrix.sort_index().sort_index(axis=1)


def _heatmap(matrix: pd.DataFrame, *, showscale: bool = True, zmax: float = 1.0) -> go.Heatmap:
    z = matrix.to_numpy(dtype=float)
    return go.Heatmap(z=z, x=[str(c) for c in matrix.columns], y=[str(i) for i in matrix.index], zmin=0, zmax=zmax,
                      colorscale="Viridis", showscale=showscale, colorbar=dict(title="", len=0.8),
                      text=np.where(np.isfinite(z), np.round(z, 2).astype(str), ""), texttemplate="%{text}",
                      hovertemplate="from step %{y} to %{x}: %{z:.3f}<extra></extra>")


def fig_persistence(overall: pd.DataFrame, *,
                    title: str = "Persistence of the universal set across checkpoints") -> go.Figure:
    """Heatmap of `|U_t ∩ U_t'| / |U_t|`: row t (from), column t' (to). A bright band right of
    the diagonal means neurons that become universal stay universal.

    Args:
        overall: `PersistenceResult.overall` (`[step t, step t′]`: index t, columns t′), the
            same read from `persistence_overall.csv` (first column `t`), or a long table
            `t, t2, persistence`.
        title: the figure's title.

    Returns:
        The figure.
    """
    fig = go.Figure(_heatmap(_step_matrix(overall, "persistence")))
    finish(fig, title, 460, legend=False, xaxis_title="to checkpoint t′ (step)", yaxis_title="from checkpoint t (step)")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def fig_persistence_by_layer(per_layer: pd.DataFrame, *, value: str = "persistence", cols: int = 4) -> go.Figure:
    """One persistence heatmap per layer.

    Args:
        per_layer: long table `layer, t, t2, <value>` (`PersistenceResult.per_layer`).
        value: the column to draw.
        cols: panels per row.

    Returns:
        The figure.

    Raises:
        InputError: a column is missing.
    """
    need_columns(per_layer, ["layer", "t", "t2", value], "the per-layer persistence table")
    layers = sorted(per_layer["layer"].unique())
    cols = min(cols, len(layers))
    rows = -(-len(layers) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {layer}" for layer in layers],
                        horizontal_spacing=0.04, vertical_spacing=0.12 / max(rows - 1, 1) if rows > 1 else 0.1)
    for k, layer in enumerate(layers):
        matrix = _step_matrix(per_layer[per_layer["layer"] == layer], value)
        fig.add_trace(_heatmap(matrix, showscale=k == 0), row=k // cols + 1, col=k % cols + 1)
    finish(fig, f"{value.replace('_', ' ').capitalize()} per layer (row: from step, column: to step)", 300 * rows + 80,
            legend=False)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def fig_partner_consistency(consistency: pd.DataFrame) -> go.Figure:
    """Fraction of universal neurons whose matched partner in each seed m is the same neuron at t
    and t′: a line per seed against t′ for the first t (long table `model, t, t2, consistency`),
    or a heatmap when the table has no model column. `model = 'mean'` (the mean over seeds) is
    drawn dashed and black.

    Args:
        consistency: `PersistenceResult.partner_consistency` (`model, t, t2, consistency`).

    Returns:
        The figure.

    Raises:
        InputError: the table has no value column.
    """
    val = next((c for c in ("consistency", "partner_consistency", "fraction", "value") if c in consistency.columns),
               None)
    if val is None:
        raise InputError(f"the partner-consistency table has no value column; it has {list(consistency.columns)}")
    mcol = next((c for c in ("model", "seed", "other") if c in consistency.columns), None)
    if mcol is None:
        return fig_persistence(consistency.rename(columns={val: "persistence"}),
                               title="Partner consistency across checkpoints")
    fig = go.Figure()
    for model, rows in consistency.groupby(mcol):
        by_step = rows.groupby("t2")[val].mean().reset_index()
        mean = str(model) == "mean"
        fig.add_trace(go.Scatter(x=by_step["t2"], y=by_step[val], mode="lines+markers",
                                 name="mean over seeds" if mean else f"seed {model}",
                                 line=dict(color="black", dash="dash") if mean else None))
    finish(fig, "Partner consistency (same partner neuron at t and t′), mean over t", 380,
           xaxis_title="checkpoint t′ (step)", yaxis_title="fraction of universal neurons")
    fig.update_yaxes(range=[0, 1.05])
    step_axis(fig, consistency["t2"])
    return fig


def fig_emergence(emergence: pd.DataFrame) -> go.Figure:
    """Universal fraction per layer against the training step (long table `step, layer,
    fraction` and optionally `mean_excess`), steps placed evenly when they span decades.

    Args:
        emergence: `PersistenceResult.emergence` (`step, layer, fraction`, optionally `mean_excess`).

    Returns:
        The figure.

    Raises:
        InputError: a column is missing.
    """
    need_columns(emergence, ["step", "layer", "fraction"], "the emergence table")
    has_excess = "mean_excess" in emergence.columns
    fig = make_subplots(rows=1, cols=2 if has_excess else 1, horizontal_spacing=0.1,
                        subplot_titles=("universal fraction", "mean excess correlation") if has_excess else None)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
              "#17becf"]  # plotly's default cycle, fixed so both panels give a layer the same colour
    for k, (layer, rows) in enumerate(emergence.sort_values("step").groupby("layer")):
        color = colors[k % len(colors)]
        fig.add_trace(go.Scatter(x=rows["step"], y=100 * rows["fraction"], mode="lines+markers", name=f"layer {layer}",
                                 line_color=color, legendgroup=str(layer),
                                 hovertemplate="step %{x}: %{y:.2f}%<extra>layer " + str(layer) + "</extra>"),
                      row=1, col=1)
        if has_excess:
            fig.add_trace(go.Scatter(x=rows["step"], y=rows["mean_excess"], mode="lines+markers", name=f"layer {layer}",
                                     line_color=color, legendgroup=str(layer), showlegend=False), row=1, col=2)
    steps = emergence["step"].to_numpy(dtype=float)
    fig.update_xaxes(title_text="training step")
    step_axis(fig, steps)
    fig.update_yaxes(title_text="universal (% of layer)", row=1, col=1)
    finish(fig, "Emergence of universal neurons during training", 400)
    return fig
