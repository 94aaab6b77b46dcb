"""Stage: results on disk -> plotly figures. One public function per figure, each taking the
tables a pipeline run leaves (universality table, properties, ablation, persistence) as pandas
DataFrames and returning a `plotly.graph_objects.Figure`; the report (`universal_neurons.report`)
lays them out, and notebooks call them directly.

Scatter plots of many points are WebGL traces (`go.Scattergl`); box plots of large groups are
drawn from precomputed quantiles, so a figure's size does not grow with the number of neurons.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from universal_neurons.errors import UniversalNeuronsError

__all__ = [
    "PROPERTY_COLUMNS",
    "fig_max_corr_vs_baseline",
    "fig_corr_distributions",
    "fig_universal_fraction",
    "fig_excess_distribution",
    "fig_pair_correlations",
    "fig_property_comparison",
    "fig_property_effects",
    "fig_ablation",
    "fig_persistence",
    "fig_persistence_by_layer",
    "fig_partner_consistency",
    "fig_emergence",
]

# The neuron table's property columns (METHOD.md §7), in the order the paper shows them.
PROPERTY_COLUMNS = (
    "w_in_norm", "input_bias", "w_out_norm", "in_out_sim", "l2_penalty",
    "pre_mean", "pre_var", "pre_skew", "pre_kurt", "activation_frequency",
    "post_mean", "post_var", "post_skew", "post_kurt",
    "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt",
)

UNIVERSAL_COLOR = "#d62728"
OTHER_COLOR = "#7f7f7f"
BASELINE_COLOR = "#1f77b4"
_LAYOUT = dict(template="plotly_white", font=dict(family="system-ui, -apple-system, Segoe UI, sans-serif", size=13),
               margin=dict(l=60, r=20, t=95, b=50))


def _finish(fig: go.Figure, title: str, height: int, *, legend: bool = True, **layout) -> go.Figure:
    """Common look: title on the first line of the top margin, legend on the second (both in
    container coordinates, so neither collides with subplot titles), then the plot."""
    if not legend:  # no legend line: the plot moves up
        layout.setdefault("margin", dict(l=60, r=20, t=60, b=50))
    fig.update_layout(**{**_LAYOUT, **layout}, height=height,
                      title=dict(text=title, x=0.01, xanchor="left", yref="container", y=1, yanchor="top",
                                 pad=dict(t=10), font=dict(size=16)),
                      legend=dict(orientation="h", yref="container", y=1 - 42 / height, yanchor="top",
                                  x=0.01, xanchor="left"))
    return fig


def _step_axis(fig: go.Figure, steps) -> None:
    """Checkpoints are log-spaced and start at 0: when they span decades, place them evenly
    (category axis, exact steps as labels) rather than crowding the early ones."""
    s = np.unique(np.asarray(steps, dtype=float))
    pos = s[s > 0]
    if len(pos) > 1 and pos.max() / pos.min() > 50:
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=[_num(v) for v in s])


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UniversalNeuronsError(f"{what} lacks the columns {missing}; it has {list(df.columns)}")


def _others(table: pd.DataFrame) -> list[str]:
    """Labels m of the other models, read off the `max_corr_<m>` columns."""
    return [c[len("max_corr_"):] for c in table.columns if c.startswith("max_corr_")]


def _threshold(table: pd.DataFrame, threshold: float | None) -> float:
    if threshold is not None:
        return float(threshold)
    t = table.attrs.get("threshold") or (table.attrs.get("provenance") or {}).get("threshold")
    return float(t) if t is not None else 0.5


def _live(table: pd.DataFrame) -> pd.DataFrame:
    """Rows with an excess correlation (dead neurons have none)."""
    return table[np.isfinite(table["excess_corr"].to_numpy(dtype=float))]


def fig_max_corr_vs_baseline(table: pd.DataFrame, *, threshold: float | None = None) -> go.Figure:
    """Scatter, one point per reference neuron: mean baseline (x) vs mean max-correlation (y)
    over the other seeds, coloured by layer, universal neurons ringed. Since
    `excess_corr = mean_corr - mean_baseline`, the universal neurons are those above the
    dashed line `y = x + threshold`.

    **Arguments:** `table`: the universality table (`layer, neuron, mean_corr, mean_baseline,
    excess_corr, is_universal`); `threshold`: the cut (default: the table's).
    """
    _need(table, ["layer", "neuron", "mean_corr", "mean_baseline", "excess_corr", "is_universal"], "the universality table")
    t = _live(table)
    thr = _threshold(table, threshold)
    fig = go.Figure()
    for layer, g in t.groupby("layer"):
        fig.add_trace(go.Scattergl(
            x=g["mean_baseline"], y=g["mean_corr"], mode="markers", name=f"layer {layer}",
            marker=dict(size=4, opacity=0.6), customdata=np.c_[g["layer"], g["neuron"], g["excess_corr"]],
            hovertemplate="L%{customdata[0]}.N%{customdata[1]}<br>max-corr %{y:.3f}<br>baseline %{x:.3f}"
                          "<br>excess %{customdata[2]:.3f}<extra></extra>"))
    u = t[t["is_universal"].astype(bool)]
    if len(u):
        fig.add_trace(go.Scattergl(x=u["mean_baseline"], y=u["mean_corr"], mode="markers", name="universal",
                                   marker=dict(size=8, color="rgba(0,0,0,0)", line=dict(color=UNIVERSAL_COLOR, width=1.5)),
                                   hoverinfo="skip"))
    lo = float(min(t["mean_baseline"].min(), t["mean_corr"].min(), 0)) if len(t) else 0.0
    fig.add_trace(go.Scatter(x=[lo, 1], y=[lo + thr, 1 + thr], mode="lines", name=f"excess = {thr:g}",
                             line=dict(color="black", dash="dash", width=1), hoverinfo="skip"))
    _finish(fig, "Max-correlation vs chance baseline, per neuron", 480, xaxis_title="baseline (mean over seeds)", yaxis_title="max-correlation (mean over seeds)")
    fig.update_yaxes(range=[lo - 0.02, 1.02])
    fig.update_xaxes(range=[lo - 0.02, 1.02])
    return fig


def fig_corr_distributions(table: pd.DataFrame) -> go.Figure:
    """Split violins per layer: the distribution of mean max-correlation (right half) against
    the distribution of the chance baseline (left half). Universality lives in the gap."""
    _need(table, ["layer", "mean_corr", "mean_baseline", "excess_corr"], "the universality table")
    t = _live(table)
    fig = go.Figure()
    for col, name, side, color in (("mean_baseline", "baseline", "negative", BASELINE_COLOR),
                                   ("mean_corr", "max-correlation", "positive", UNIVERSAL_COLOR)):
        fig.add_trace(go.Violin(x=t["layer"].astype(str), y=t[col], name=name, side=side, line_color=color,
                                legendgroup=name, scalegroup=name, points=False, meanline_visible=True,
                                spanmode="hard", width=0.9))
    _finish(fig, "Max-correlation and baseline distributions per layer", 420, violingap=0,
                      violinmode="overlay", xaxis_title="layer", yaxis_title="correlation (mean over seeds)")
    return fig


def fig_universal_fraction(table: pd.DataFrame) -> go.Figure:
    """Bars: the percentage of universal neurons in each layer, with counts on the bars."""
    _need(table, ["layer", "is_universal"], "the universality table")
    g = table.groupby("layer")["is_universal"].agg(["sum", "count"]).reset_index()
    pct = 100 * g["sum"] / g["count"]
    fig = go.Figure(go.Bar(x=g["layer"].astype(str), y=pct, marker_color=UNIVERSAL_COLOR,
                           text=[f"{int(s)}/{int(c)}" for s, c in zip(g["sum"], g["count"])], textposition="outside",
                           hovertemplate="layer %{x}: %{y:.2f}%<extra></extra>", name="universal"))
    overall = 100 * table["is_universal"].mean()
    fig.add_hline(y=overall, line_dash="dot", line_color="black", annotation_text=f"all layers {overall:.2f}%",
                  annotation_position="top left")
    _finish(fig, "Universal neurons per layer", 380, legend=False, xaxis_title="layer",
                      yaxis_title="universal (% of layer)", showlegend=False)
    fig.update_yaxes(range=[0, max(float(pct.max()) if len(pct) else 0, overall) * 1.25 + 0.5])
    return fig


def fig_excess_distribution(table: pd.DataFrame, *, threshold: float | None = None, bins: int = 80) -> go.Figure:
    """Histogram of excess correlation (max-correlation minus baseline, averaged over seeds),
    universal neurons stacked in red, the threshold as a dashed line; log count axis so the
    thin universal tail shows next to the bulk."""
    _need(table, ["excess_corr", "is_universal"], "the universality table")
    t = _live(table)
    thr = _threshold(table, threshold)
    e = t["excess_corr"].to_numpy(dtype=float)
    edges = np.linspace(min(e.min(), thr) - 1e-9, max(e.max(), thr) + 1e-9, bins + 1) if len(e) else np.linspace(0, 1, bins + 1)
    mid = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for mask, name, color in ((~t["is_universal"].astype(bool), "other", OTHER_COLOR),
                              (t["is_universal"].astype(bool), "universal", UNIVERSAL_COLOR)):
        counts, _ = np.histogram(e[mask.to_numpy()], bins=edges)
        fig.add_trace(go.Bar(x=mid, y=counts, width=np.diff(edges), name=name, marker_color=color,
                             hovertemplate="excess %{x:.3f}: %{y} neurons<extra>" + name + "</extra>"))
    fig.add_vline(x=thr, line_dash="dash", line_color="black", annotation_text=f"threshold {thr:g}")
    _finish(fig, "Excess correlation over the baseline", 380, barmode="stack", bargap=0,
                      xaxis_title="excess correlation", yaxis_title="neurons", yaxis_type="log")
    return fig


def fig_pair_correlations(table: pd.DataFrame) -> go.Figure:
    """Box per other seed m: max-correlation with m vs the baseline for m. Shows whether one
    seed drives the average (all seeds should look alike)."""
    others = _others(table)
    if not others:
        raise UniversalNeuronsError("the universality table has no max_corr_<m> columns")
    fig = go.Figure()
    for prefix, name, color in (("max_corr_", "max-correlation", UNIVERSAL_COLOR), ("baseline_", "baseline", BASELINE_COLOR)):
        stats = [_quantiles(table[f"{prefix}{m}"]) for m in others]
        fig.add_trace(_box(others, stats, name, color))
    _finish(fig, "Per seed: max-correlation with the reference vs baseline", 380, boxmode="group",
                      xaxis_title="seed (vs reference)", yaxis_title="correlation")
    return fig


def _quantiles(s: pd.Series) -> dict[str, float]:
    v = s.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {k: np.nan for k in ("lo", "q1", "median", "q3", "hi", "mean")}
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return dict(lo=q[0], q1=q[1], median=q[2], q3=q[3], hi=q[4], mean=float(v.mean()))


def _box(x: Sequence, stats: Sequence[Mapping[str, float]], name: str, color: str, **kw) -> go.Box:
    """A box drawn from precomputed quantiles (whiskers at the 5th and 95th percentiles)."""
    return go.Box(x=list(x), q1=[s["q1"] for s in stats], median=[s["median"] for s in stats],
                  q3=[s["q3"] for s in stats], lowerfence=[s["lo"] for s in stats],
                  upperfence=[s["hi"] for s in stats], mean=[s["mean"] for s in stats], name=name,
                  marker_color=color, line_color=color, boxpoints=False, **kw)


def fig_property_comparison(table: pd.DataFrame, props: pd.DataFrame, *, comparison: pd.DataFrame | None = None,
                            properties: Sequence[str] | None = None, cols: int = 5) -> go.Figure:
    """Small multiples, one per neuron property: box (5th-95th percentile whiskers) of universal
    neurons vs all others. With `comparison` (the `property_comparison.csv` table), each panel's
    title carries the Mann-Whitney p-value.

    **Arguments:** `table`: the universality table (`layer, neuron, is_universal`); `props`: the
    properties table (`layer, neuron`, property columns); `properties`: which to draw (default:
    every known property present).
    """
    _need(props, ["layer", "neuron"], "the properties table")
    if "is_universal" in props.columns:
        merged = props
    else:
        _need(table, ["layer", "neuron", "is_universal"], "the universality table")
        merged = props.merge(table[["layer", "neuron", "is_universal"]], on=["layer", "neuron"], how="inner")
    names = list(properties) if properties else [p for p in PROPERTY_COLUMNS if p in merged.columns]
    names = [p for p in names if p in merged.columns and pd.api.types.is_numeric_dtype(merged[p])]
    if not names:
        raise UniversalNeuronsError(f"the properties table has none of the properties {list(PROPERTY_COLUMNS)}")
    pvals = _comparison_index(comparison)
    rows = -(-len(names) // cols)
    titles = []
    for p in names:
        pv = pvals.get(p, {}).get("p_value")
        titles.append(f"{p}<br><span style='font-size:11px'>p = {pv:.2g}</span>" if pv is not None and np.isfinite(pv) else p)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, vertical_spacing=0.5 / rows + 0.02,
                        horizontal_spacing=0.06)
    uni = merged["is_universal"].astype(bool)
    for k, p in enumerate(names):
        r, c = k // cols + 1, k % cols + 1
        for mask, name, color in ((uni, "universal", UNIVERSAL_COLOR), (~uni, "other", OTHER_COLOR)):
            if not mask.any():  # an empty group has no quartiles; a flat box at 0 would mislead
                continue
            fig.add_trace(_box([name], [_quantiles(merged.loc[mask, p])], name, color, showlegend=k == 0,
                               legendgroup=name), row=r, col=c)
    _finish(fig, "Neuron properties: universal vs other neurons (boxes: quartiles; whiskers: 5th-95th percentile)",
            230 * rows + 100, margin=dict(l=40, r=20, t=110, b=30))
    fig.update_xaxes(showticklabels=False)
    fig.update_annotations(font_size=12)
    return fig


def _comparison_index(comparison: pd.DataFrame | None) -> dict[str, dict]:
    if comparison is None or not len(comparison):
        return {}
    key = next((c for c in ("property", "name", "feature") if c in comparison.columns), comparison.columns[0])
    return {str(r[key]): r for r in comparison.to_dict("records")}


def _effect_column(comparison: pd.DataFrame) -> str:
    for c in ("effect_size", "rank_biserial", "effect", "cliffs_delta", "auc"):
        if c in comparison.columns:
            return c
    raise UniversalNeuronsError(f"the property comparison has no effect-size column; it has {list(comparison.columns)}")


def fig_property_effects(comparison: pd.DataFrame) -> go.Figure:
    """Horizontal bars: effect size of universal vs other per property (from
    `property_comparison.csv`), solid where the Mann-Whitney p-value is below 0.05."""
    key = next((c for c in ("property", "name", "feature") if c in comparison.columns), comparison.columns[0])
    eff = _effect_column(comparison)
    c = comparison.sort_values(eff)
    p = c["p_value"].to_numpy(dtype=float) if "p_value" in c.columns else np.full(len(c), np.nan)
    sig = p < 0.05
    colors = [UNIVERSAL_COLOR if v > 0 else BASELINE_COLOR for v in c[eff]]
    fig = go.Figure(go.Bar(
        y=c[key], x=c[eff], orientation="h", marker=dict(color=colors, opacity=[1.0 if s else 0.35 for s in sig]),
        customdata=np.c_[p], hovertemplate="%{y}: effect %{x:.3f}, p = %{customdata[0]:.2g}<extra></extra>"))
    fig.add_vline(x=0, line_color="black", line_width=1)
    _finish(fig, f"Effect size ({eff}), universal vs other; faint bars: p ≥ 0.05", max(300, 24 * len(c) + 120),
            xaxis_title=eff, showlegend=False)
    return fig


def fig_ablation(summary: pd.DataFrame, runs: pd.DataFrame | None = None) -> go.Figure:
    """Two panels per ablation group (x): ΔCE and KL(clean || ablated) of ablating the universal
    set (red, with its interval) next to random control sets of the same size (grey mean and
    interval; with `runs`, every control draw as a dot).

    **Arguments:** `summary`: `ablation_summary.csv` (`group, delta_ce, delta_ce_lo, delta_ce_hi,
    kl, kl_lo, kl_hi, control_delta_ce_mean, control_delta_ce_lo, control_delta_ce_hi,
    control_kl_mean`, ...); `runs`: `ablation_runs.csv` (`group, set, draw, delta_ce, kl`).
    """
    _need(summary, ["group", "delta_ce"], "the ablation summary")
    s = summary.copy()
    x = [str(g) for g in s["group"]]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("ΔCE (nats/token)", "KL(clean ‖ ablated)"),
                        horizontal_spacing=0.1)
    for col, (metric, ctrl) in enumerate((("delta_ce", "control_delta_ce"), ("kl", "control_kl")), start=1):
        if metric not in s.columns:
            continue
        y = s[metric].to_numpy(dtype=float)
        err = _interval(s, metric, y)
        fig.add_trace(go.Bar(x=x, y=y, name="universal set", marker_color=UNIVERSAL_COLOR, error_y=err,
                             offsetgroup="u", legendgroup="u", showlegend=col == 1,
                             customdata=np.c_[s["n_neurons"]] if "n_neurons" in s else None,
                             hovertemplate="%{x}: %{y:.4f}" + (" (%{customdata[0]} neurons)" if "n_neurons" in s else "")
                                           + "<extra>universal</extra>"), row=1, col=col)
        if f"{ctrl}_mean" in s.columns:
            cy = s[f"{ctrl}_mean"].to_numpy(dtype=float)
            fig.add_trace(go.Bar(x=x, y=cy, name="random control (mean)", marker_color=OTHER_COLOR,
                                 error_y=_interval(s, ctrl, cy), offsetgroup="c", legendgroup="c",
                                 showlegend=col == 1, hovertemplate="%{x}: %{y:.4f}<extra>control</extra>"),
                          row=1, col=col)
        if runs is not None and metric in runs.columns and {"group", "set"} <= set(runs.columns):
            r = runs[runs["set"] == "control"]
            if len(r):
                fig.add_trace(go.Box(x=r["group"].astype(str), y=r[metric], name="control draws", boxpoints="all",
                                     jitter=0.4, pointpos=0, fillcolor="rgba(0,0,0,0)", line_color="rgba(0,0,0,0)",
                                     marker=dict(color="black", size=4, opacity=0.6), offsetgroup="c",
                                     legendgroup="draws", showlegend=col == 1, hoveron="points"), row=1, col=col)
    _finish(fig, "Ablating universal neurons vs random neurons of the same layers", 420, barmode="group", boxmode="group")
    fig.update_xaxes(title_text="ablation group", type="category")
    return fig


def _interval(s: pd.DataFrame, name: str, y: np.ndarray) -> dict | None:
    lo, hi = f"{name}_lo", f"{name}_hi"
    if lo not in s.columns or hi not in s.columns:
        return None
    return dict(type="data", symmetric=False, array=np.maximum(s[hi].to_numpy(dtype=float) - y, 0),
                arrayminus=np.maximum(y - s[lo].to_numpy(dtype=float), 0), color="black", thickness=1.2, width=4)


def _step_matrix(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """A steps x steps matrix from a long (t, t2, value) table, or a wide one with a step index."""
    if {"t", "t2", value} <= set(df.columns):
        m = df.pivot_table(index="t", columns="t2", values=value, aggfunc="mean", dropna=False)  # keep NaN rows (empty U_t)
    else:  # a matrix: rows "from" step t, columns "to" step t' (as read from CSV: steps in the first column)
        m = df.set_index(df.columns[0]) if str(df.columns[0]) in ("t", "step", "from", "Unnamed: 0") else df.copy()
        m.columns = [_num(c) for c in m.columns]
        m.index = [_num(i) for i in m.index]
    return m.sort_index().sort_index(axis=1)


def _num(v):
    try:
        f = float(v)
        return int(f) if f.is_integer() else f
    except (TypeError, ValueError):
        return v


def _heatmap(m: pd.DataFrame, *, showscale: bool = True, zmax: float = 1.0) -> go.Heatmap:
    z = m.to_numpy(dtype=float)
    return go.Heatmap(z=z, x=[str(c) for c in m.columns], y=[str(i) for i in m.index], zmin=0, zmax=zmax,
                      colorscale="Viridis", showscale=showscale, colorbar=dict(title="", len=0.8),
                      text=np.where(np.isfinite(z), np.round(z, 2).astype(str), ""), texttemplate="%{text}",
                      hovertemplate="from step %{y} to %{x}: %{z:.3f}<extra></extra>")


def fig_persistence(overall: pd.DataFrame, *, title: str = "Persistence of the universal set across checkpoints") -> go.Figure:
    """Heatmap of `|U_t ∩ U_t'| / |U_t|`: row t (from), column t' (to). A bright band right of
    the diagonal means neurons that become universal stay universal.

    **Arguments:** `overall`: `PersistenceResult.overall` (index t, columns t′), the same read
    from `persistence_overall.csv` (first column `t`), or a long table `t, t2, persistence`."""
    m = _step_matrix(overall, "persistence")
    fig = go.Figure(_heatmap(m))
    _finish(fig, title, 460, legend=False, xaxis_title="to checkpoint t′ (step)", yaxis_title="from checkpoint t (step)")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def fig_persistence_by_layer(per_layer: pd.DataFrame, *, value: str = "persistence", cols: int = 4) -> go.Figure:
    """One persistence heatmap per layer (long table `layer, t, t2, persistence`)."""
    _need(per_layer, ["layer", "t", "t2", value], "the per-layer persistence table")
    layers = sorted(per_layer["layer"].unique())
    cols = min(cols, len(layers))
    rows = -(-len(layers) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {l}" for l in layers],
                        horizontal_spacing=0.04, vertical_spacing=0.12 / max(rows - 1, 1) if rows > 1 else 0.1)
    for k, l in enumerate(layers):
        m = _step_matrix(per_layer[per_layer["layer"] == l], value)
        fig.add_trace(_heatmap(m, showscale=k == 0), row=k // cols + 1, col=k % cols + 1)
    _finish(fig, f"{value.replace('_', ' ').capitalize()} per layer (row: from step, column: to step)", 300 * rows + 80,
            legend=False)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def fig_partner_consistency(consistency: pd.DataFrame) -> go.Figure:
    """Fraction of universal neurons whose matched partner in each seed m is the same neuron at t
    and t′: a line per seed against t′ for the first t (long table `model, t, t2, consistency`),
    or a heatmap when the table has no model column. `model = 'mean'` (the mean over seeds) is
    drawn dashed and black."""
    val = next((c for c in ("consistency", "partner_consistency", "fraction", "value") if c in consistency.columns), None)
    if val is None:
        raise UniversalNeuronsError(f"the partner-consistency table has no value column; it has {list(consistency.columns)}")
    mcol = next((c for c in ("model", "seed", "other") if c in consistency.columns), None)
    if mcol is None:
        return fig_persistence(consistency.rename(columns={val: "persistence"}),
                               title="Partner consistency across checkpoints")
    fig = go.Figure()
    for m, g in consistency.groupby(mcol):
        g = g.groupby("t2")[val].mean().reset_index()
        mean = str(m) == "mean"
        fig.add_trace(go.Scatter(x=g["t2"], y=g[val], mode="lines+markers", name="mean over seeds" if mean else f"seed {m}",
                                 line=dict(color="black", dash="dash") if mean else None))
    _finish(fig, "Partner consistency (same partner neuron at t and t′), mean over t", 380, xaxis_title="checkpoint t′ (step)", yaxis_title="fraction of universal neurons")
    fig.update_yaxes(range=[0, 1.05])
    _step_axis(fig, consistency["t2"])
    return fig


def fig_emergence(emergence: pd.DataFrame) -> go.Figure:
    """Universal fraction per layer against the training step (long table `step, layer,
    fraction` and optionally `mean_excess`), step axis logarithmic when steps span decades."""
    _need(emergence, ["step", "layer", "fraction"], "the emergence table")
    has_excess = "mean_excess" in emergence.columns
    fig = make_subplots(rows=1, cols=2 if has_excess else 1, horizontal_spacing=0.1,
                        subplot_titles=("universal fraction", "mean excess correlation") if has_excess else None)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    for k, (layer, g) in enumerate(emergence.sort_values("step").groupby("layer")):
        color = colors[k % len(colors)]
        fig.add_trace(go.Scatter(x=g["step"], y=100 * g["fraction"], mode="lines+markers", name=f"layer {layer}",
                                 line_color=color, legendgroup=str(layer),
                                 hovertemplate="step %{x}: %{y:.2f}%<extra>layer " + str(layer) + "</extra>"), row=1, col=1)
        if has_excess:
            fig.add_trace(go.Scatter(x=g["step"], y=g["mean_excess"], mode="lines+markers", name=f"layer {layer}",
                                     line_color=color, legendgroup=str(layer), showlegend=False), row=1, col=2)
    steps = emergence["step"].to_numpy(dtype=float)
    fig.update_xaxes(title_text="training step")
    _step_axis(fig, steps)
    fig.update_yaxes(title_text="universal (% of layer)", row=1, col=1)
    _finish(fig, "Emergence of universal neurons during training", 400)
    return fig
