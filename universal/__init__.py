"""Universal neurons: correlations across seeds, chance baselines, universality table."""

from .baselines import haar_orthogonal, rotation_matrices
from .correlation import (
    CorrelationConfig,
    CorrelationResult,
    ModelLayout,
    correlate,
    correlate_all_pairs,
    preflight,
)
from .universality import (
    flag_universal,
    load_universality_table,
    save_universality_table,
    universality_table,
)

__all__ = [
    "ModelLayout",
    "CorrelationConfig",
    "CorrelationResult",
    "correlate",
    "correlate_all_pairs",
    "preflight",
    "haar_orthogonal",
    "rotation_matrices",
    "universality_table",
    "flag_universal",
    "save_universality_table",
    "load_universality_table",
]
from .ablation import (
    AblationConfig,
    AblationMetrics,
    AblationResult,
    ablate,
    ablation_stage,
    ablation_study,
    control_sets,
    neuron_means,
    neuron_set,
)

__all__ += [
    "AblationConfig",
    "AblationMetrics",
    "AblationResult",
    "ablate",
    "ablation_study",
    "ablation_stage",
    "control_sets",
    "neuron_means",
    "neuron_set",
]

from .persistence import PersistenceResult, persistence_from_tables, persistence_stage, resolve_steps, run_persistence
from .properties import (
    PropertiesConfig,
    StreamingMoments,
    activation_moments,
    classify_families,
    compare_universal,
    join_universality,
    load_properties,
    neuron_properties,
    properties_stage,
    save_properties,
    weight_properties,
)

__all__ += [
    "PropertiesConfig",
    "StreamingMoments",
    "weight_properties",
    "activation_moments",
    "classify_families",
    "neuron_properties",
    "join_universality",
    "compare_universal",
    "save_properties",
    "load_properties",
    "properties_stage",
    "PersistenceResult",
    "persistence_from_tables",
    "run_persistence",
    "persistence_stage",
    "resolve_steps",
]

from .figures import (
    fig_ablation,
    fig_corr_distributions,
    fig_emergence,
    fig_excess_distribution,
    fig_max_corr_vs_baseline,
    fig_pair_correlations,
    fig_partner_consistency,
    fig_persistence,
    fig_persistence_by_layer,
    fig_property_comparison,
    fig_property_effects,
    fig_universal_fraction,
)
from .report import Report, ReportSection, load_run, report_stage

__all__ += [
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
    "Report",
    "ReportSection",
    "load_run",
    "report_stage",
]
