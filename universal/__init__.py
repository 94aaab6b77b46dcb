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
