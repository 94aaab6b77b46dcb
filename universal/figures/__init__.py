"""Stage: results on disk -> plotly figures. One public function per figure, each taking the
tables a pipeline run leaves (universality table, properties, ablation, persistence, agreement) as pandas
DataFrames and returning a `plotly.graph_objects.Figure`; the report (`universal_neurons.report`)
lays them out, and notebooks call them directly.

Scatter plots of many points are WebGL traces (`go.Scattergl`); box plots of large groups are
drawn from precomputed quantiles, so a figure's size does not grow with the number of neurons.
"""

from __future__ import annotations

from .ablation import fig_ablation
from .agreement import fig_alike_over_training, universal_by_step
from .common import live_neurons, other_labels, wilson_interval
from .persistence import fig_emergence, fig_partner_consistency, fig_persistence, fig_persistence_by_layer
from .properties import PROPERTY_COLUMNS, fig_property_comparison, fig_property_effects
from .universality import (
                           fig_corr_distributions,
                           fig_excess_distribution,
                           fig_max_corr_vs_baseline,
                           fig_pair_correlations,
                           fig_universal_fraction,
)

__all__ = [
    "PROPERTY_COLUMNS",
    "other_labels",
    "live_neurons",
    "wilson_interval",
    "universal_by_step",
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
    "fig_alike_over_training",
]
