"""Figures of the neuron properties: universal against other neurons per property, and the
effect sizes of `compare_universal`."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from universal_neurons.errors import InputError

from .common import BASELINE_COLOR, OTHER_COLOR, UNIVERSAL_COLOR, finish, need_columns, quantile_box, quantiles

__all__ = ["PROPERTY_COLUMNS", "fig_property_comparison", "fig_property_effects"]

# The neuron table's property columns, in the order the paper shows them.
PROPERTY_COLUMNS = (
    "w_in_norm", "input_bias", "w_out_norm", "in_out_sim", "l2_penalty",
    "pre_mean", "pre_var", "pre_skew", "pre_kurt", "activation_frequency",
    "post_mean", "post_var", "post_skew", "post_kurt",
    "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt",
)


def fig_property_comparison(table: pd.DataFrame, props: pd.DataFrame, *, comparison: pd.DataFrame | None = None,
                            properties: Sequence[str] | None = None, cols: int = 5) -> go.Figure:
    """Small multiples, one per neuron property: box (5th-95th percentile whiskers) of universal
    neurons vs all others. With `comparison` (the `property_comparison.csv` table), each panel's
    title carries the Mann-Whitney p-value. The `*_kurt` panels are raw kurtosis (a Gaussian has 3),
    the convention of the properties table and of the paper.

    Args:
        table: the universality table (`layer, neuron, is_universal`).
        props: the properties table (`layer, neuron`, property columns), one row per neuron.
        comparison: the `property_comparison.csv` table (`property, p_value, ...`), optional.
        properties: which to draw (default: every known property present).
        cols: panels per row.

    Returns:
        The figure.

    Raises:
        InputError: a needed column is missing, or no property column is present.
    """
    need_columns(props, ["layer", "neuron"], "the properties table")
    if "is_universal" in props.columns:
        merged = props
    else:
        need_columns(table, ["layer", "neuron", "is_universal"], "the universality table")
        merged = props.merge(table[["layer", "neuron", "is_universal"]], on=["layer", "neuron"], how="inner")
    names = list(properties) if properties else [name for name in PROPERTY_COLUMNS if name in merged.columns]
    names = [name for name in names if name in merged.columns and pd.api.types.is_numeric_dtype(merged[name])]
    if not names:
        raise InputError(f"the properties table has none of the properties {list(PROPERTY_COLUMNS)}")
    pvals = _comparison_index(comparison)
    rows = -(-len(names) // cols)
    titles = []
    for name in names:
        p_value = pvals.get(name, {}).get("p_value")
        titles.append(f"{name}<br><span style='font-size:11px'>p = {p_value:.2g}</span>"
                      if p_value is not None and np.isfinite(p_value) else name)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, vertical_spacing=0.5 / rows + 0.02,
                        horizontal_spacing=0.06)
    uni = merged["is_universal"].astype(bool)
    for k, prop in enumerate(names):
        row, col = k // cols + 1, k % cols + 1
        for mask, name, color in ((uni, "universal", UNIVERSAL_COLOR), (~uni, "other", OTHER_COLOR)):
            if not mask.any():  # an empty group has no quartiles; a flat box at 0 would mislead
                continue
            fig.add_trace(quantile_box([name], [quantiles(merged.loc[mask, prop])], name, color, showlegend=k == 0,
                               legendgroup=name), row=row, col=col)
    finish(fig, "Neuron properties: universal vs other neurons (boxes: quartiles; whiskers: 5th-95th percentile; "
                "kurtosis raw, a Gaussian has 3)",
            230 * rows + 100, margin=dict(l=40, r=20, t=110, b=30))
    fig.update_xaxes(showticklabels=False)
    fig.update_annotations(font_size=12)
    return fig


def _comparison_index(comparison: pd.DataFrame | None) -> dict[str, dict]:
    if comparison is None or not len(comparison):
        return {}
    key = _property_key(comparison)
    return {str(record[key]): record for record in comparison.to_dict("records")}


def _property_key(comparison: pd.DataFrame) -> str:
    """The column naming the property (the first column when none of the usual names)."""
    return next((c for c in ("property", "name", "feature") if c in comparison.columns), comparison.columns[0])


def _effect_column(comparison: pd.DataFrame) -> str:
    for column in ("effect_size", "rank_biserial", "effect", "cliffs_delta", "auc"):
        if column in comparison.columns:
            return column
    raise InputError(f"the property comparison has no effect-size column; it has {list(comparison.columns)}")


def fig_property_effects(comparison: pd.DataFrame) -> go.Figure:
    """Horizontal bars: effect size of universal vs other per property (from
    `property_comparison.csv`), solid where the Mann-Whitney p-value is below 0.05.

    Args:
        comparison: the property comparison (`property`, an effect-size column, `p_value`).

    Returns:
        The figure.

    Raises:
        InputError: the table has no effect-size column.
    """
    key = _property_key(comparison)
    eff = _effect_column(comparison)
    ordered = comparison.sort_values(eff)
    p_values = (ordered["p_value"].to_numpy(dtype=float) if "p_value" in ordered.columns
                else np.full(len(ordered), np.nan))
    significant = p_values < 0.05
    colors = [UNIVERSAL_COLOR if effect > 0 else BASELINE_COLOR for effect in ordered[eff]]
    fig = go.Figure(go.Bar(
        y=ordered[key], x=ordered[eff], orientation="h",
        marker=dict(color=colors, opacity=[1.0 if sig else 0.35 for sig in significant]),
        customdata=np.c_[p_values], hovertemplate="%{y}: effect %{x:.3f}, p = %{customdata[0]:.2g}<extra></extra>"))
    fig.add_vline(x=0, line_color="black", line_width=1)
    finish(fig, f"Effect size ({eff}), universal vs other; faint bars: p ≥ 0.05", max(300, 24 * len(ordered) + 120),
            xaxis_title=eff, showlegend=False)
    return fig
