"""What every figure shares: colours, the common layout, column checks and the small table
helpers (live neurons, other models' labels, box statistics, step labels)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from universal_neurons.errors import InputError

__all__ = [
    "UNIVERSAL_COLOR",
    "OTHER_COLOR",
    "BASELINE_COLOR",
    "LAYOUT",
    "finish",
    "step_axis",
    "need_columns",
    "other_labels",
    "threshold_of",
    "live_neurons",
    "quantiles",
    "quantile_box",
    "step_number",
    "wilson_interval",
]

UNIVERSAL_COLOR = "#d62728"
OTHER_COLOR = "#7f7f7f"
BASELINE_COLOR = "#1f77b4"
LAYOUT = dict(template="plotly_white", font=dict(family="system-ui, -apple-system, Segoe UI, sans-serif", size=13),
              margin=dict(l=60, r=20, t=95, b=50))


def finish(fig: go.Figure, title: str, height: int, *, legend: bool = True, **layout) -> go.Figure:
    """Give `fig` the common look: title on the first line of the top margin, legend on the
    second (both in container coordinates, so neither collides with subplot titles), then the plot.

    Args:
        fig: the figure, changed in place.
        title: its title.
        height: its height in pixels.
        legend: False when it has no legend (the plot moves up).
        **layout: further `update_layout` arguments.

    Returns:
        `fig`.
    """
    if not legend:  # no legend line: the plot moves up
        layout.setdefault("margin", dict(l=60, r=20, t=60, b=50))
    fig.update_layout(**{**LAYOUT, **layout}, height=height,
                      title=dict(text=title, x=0.01, xanchor="left", yref="container", y=1, yanchor="top",
                                 pad=dict(t=10), font=dict(size=16)),
                      legend=dict(orientation="h", yref="container", y=1 - 42 / height, yanchor="top",
                                  x=0.01, xanchor="left"))
    return fig


def step_axis(fig: go.Figure, steps) -> None:
    """Lay out a training-step x axis. Checkpoints are log-spaced and start at 0: when they
    span decades, place them evenly (category axis, exact steps as labels) rather than crowding
    the early ones.

    Args:
        fig: the figure, changed in place.
        steps: the steps plotted.
    """
    unique = np.unique(np.asarray(steps, dtype=float))
    positive = unique[unique > 0]
    if len(positive) > 1 and positive.max() / positive.min() > 50:
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=[step_number(v) for v in unique])


def need_columns(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    """Check that `df` has every column in `cols`.

    Raises:
        InputError: naming `what`, the missing columns and the ones it has.
    """
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(f"{what} lacks the columns {missing}; it has {list(df.columns)}")


def other_labels(table: pd.DataFrame) -> list[str]:
    """Labels m of the other models of a universality table, read off its `max_corr_<m>` columns.

    Args:
        table: a universality table.

    Returns:
        The labels, in column order.
    """
    return [c[len("max_corr_"):] for c in table.columns if c.startswith("max_corr_")]


def threshold_of(table: pd.DataFrame, threshold: float | None) -> float:
    """`threshold` if given, else the table's own (its attrs or provenance), else the paper's 0.5."""
    if threshold is not None:
        return float(threshold)
    recorded = table.attrs.get("threshold") or (table.attrs.get("provenance") or {}).get("threshold")
    return float(recorded) if recorded is not None else 0.5


def live_neurons(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a universality table that have an excess correlation (dead neurons have none).

    Args:
        table: a universality table (`excess_corr` column).

    Returns:
        The rows whose `excess_corr` is finite.
    """
    return table[np.isfinite(table["excess_corr"].to_numpy(dtype=float))]


def quantiles(series: pd.Series) -> dict[str, float]:
    """The box statistics of the finite values of `series`: `lo`, `q1`, `median`, `q3`, `hi`
    (5th, 25th, 50th, 75th, 95th percentiles) and `mean`; NaN everywhere when none is finite."""
    values = series.to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return {k: np.nan for k in ("lo", "q1", "median", "q3", "hi", "mean")}
    lo, q1, median, q3, hi = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return dict(lo=lo, q1=q1, median=median, q3=q3, hi=hi, mean=float(values.mean()))


def quantile_box(x: Sequence, stats: Sequence[Mapping[str, float]], name: str, color: str, **kw) -> go.Box:
    """A box drawn from precomputed `quantiles` (whiskers at the 5th and 95th percentiles), one
    box per entry of `x`; a figure's size does not grow with the number of neurons."""

    def column(key: str) -> list[float]:
        return [box[key] for box in stats]

    return go.Box(x=list(x), q1=column("q1"), median=column("median"), q3=column("q3"), lowerfence=column("lo"),
                  upperfence=column("hi"), mean=column("mean"), name=name,
                  marker_color=color, line_color=color, boxpoints=False, **kw)


def wilson_interval(k: float, n: float, *, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial fraction k / n.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or k = n,
    which is where a small universal fraction sits. It treats the n trials as independent.

    Args:
        k: successes (e.g. universal neurons).
        n: trials (e.g. neurons).
        level: the two-sided coverage.

    Returns:
        `(lo, hi)` as fractions; `(nan, nan)` when n is 0.
    """
    from scipy.stats import norm

    if n <= 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k <= 0 else float(lo)), (1.0 if k >= n else float(hi))  # exact at the ends, not 1 - 1e-16


def step_number(label):
    """A step label as a number when it is one (CSV headers are strings)."""
    try:
        number = float(label)
        return int(number) if number.is_integer() else number
    except (TypeError, ValueError):
        return label
