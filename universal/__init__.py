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
