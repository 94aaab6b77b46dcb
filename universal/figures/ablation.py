"""Figure of the ablation stage: universal sets against random control sets of the same size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import OTHER_COLOR, UNIVERSAL_COLOR, finish, need_columns

__all__ = ["fig_ablation"]


def fig_ablation(summary: pd.DataFrame, runs: pd.DataFrame | None = None) -> go.Figure:
    """Two panels per ablation group (x): ΔCE and KL(clean || ablated) of ablating the universal
    set (red, with its interval) next to random control sets of the same size (grey mean and
    interval; with `runs`, every control draw as a dot).

    Args:
        summary: `ablation_summary.csv`, one row per group (`group, delta_ce, delta_ce_lo,
            delta_ce_hi, kl, kl_lo, kl_hi, control_delta_ce_mean, control_delta_ce_lo,
            control_delta_ce_hi, control_kl_mean`, ...).
        runs: `ablation_runs.csv` (`group, set, draw, delta_ce, kl`), optional.

    Returns:
        The figure.

    Raises:
        InputError: `summary` lacks `group` or `delta_ce`.
    """
    need_columns(summary, ["group", "delta_ce"], "the ablation summary")
    table = summary.copy()
    x = [str(group) for group in table["group"]]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("ΔCE (nats/token)", "KL(clean ‖ ablated)"),
                        horizontal_spacing=0.1)
    for col, (metric, ctrl) in enumerate((("delta_ce", "control_delta_ce"), ("kl", "control_kl")), start=1):
        if metric not in table.columns:
            continue
        y = table[metric].to_numpy(dtype=float)
        err = _interval(table, metric, y)
        fig.add_trace(go.Bar(x=x, y=y, name="universal set", marker_color=UNIVERSAL_COLOR, error_y=err,
                             offsetgroup="u", legendgroup="u", showlegend=col == 1,
                             customdata=np.c_[table["n_neurons"]] if "n_neurons" in table else None,
                             hovertemplate="%{x}: %{y:.4f}"
                                           + (" (%{customdata[0]} neurons)" if "n_neurons" in table else "")
                                           + "<extra>universal</extra>"), row=1, col=col)
        if f"{ctrl}_mean" in table.columns:
            control_y = table[f"{ctrl}_mean"].to_numpy(dtype=float)
            fig.add_trace(go.Bar(x=x, y=control_y, name="random control (mean)", marker_color=OTHER_COLOR,
                                 error_y=_interval(table, ctrl, control_y), offsetgroup="c", legendgroup="c",
                                 showlegend=col == 1, hovertemplate="%{x}: %{y:.4f}<extra>control</extra>"),
                          row=1, col=col)
        if runs is not None and metric in runs.columns and {"group", "set"} <= set(runs.columns):
            draws = runs[runs["set"] == "control"]
            if len(draws):
                fig.add_trace(go.Box(x=draws["group"].astype(str), y=draws[metric], name="control draws",
                                     boxpoints="all",
                                     jitter=0.4, pointpos=0, fillcolor="rgba(0,0,0,0)", line_color="rgba(0,0,0,0)",
                                     marker=dict(color="black", size=4, opacity=0.6), offsetgroup="c",
                                     legendgroup="draws", showlegend=col == 1, hoveron="points"), row=1, col=col)
    finish(fig, "Ablating universal neurons vs random neurons of the same layers", 420, barmode="group",
           boxmode="group")
    fig.update_xaxes(title_text="ablation group", type="category")
    return fig


def _interval(table: pd.DataFrame, name: str, y: np.ndarray) -> dict | None:
    lo, hi = f"{name}_lo", f"{name}_hi"
    if lo not in table.columns or hi not in table.columns:
        return None
    return dict(type="data", symmetric=False, array=np.maximum(table[hi].to_numpy(dtype=float) - y, 0),
                arrayminus=np.maximum(y - table[lo].to_numpy(dtype=float), 0), color="black", thickness=1.2, width=4)
