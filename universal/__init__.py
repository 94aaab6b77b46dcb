"""universal-neurons: find, test and explain universal neurons.

The pipeline, stage by stage (each stage one module of this package)::

    activations   tokens -> HDF5 activation stores          (universal_neurons.activations)
    correlation   every neuron of a against every neuron of the others, vs a chance baseline
    universality  excess correlation over the baseline -> the universality table
    properties    weight, activation-moment and vocabulary statistics per neuron
    ablation      universal sets vs matched random controls, ΔCE with intervals
    persistence   universal sets across training checkpoints
    report        one self-contained HTML file

`pipeline.run_pipeline` runs the first three; `demo.run_demo` every stage on the built-in
seed family. Names listed in `__all__` are importable from the package itself; they are
loaded on first use, so `import universal_neurons` (and the CLI's `--help`) does not
import torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    CorruptFileError,
    DiskSpaceError,
    IncompatibleInputsError,
    InputError,
    InputNotFoundError,
    ModelUnavailableError,
    OutputExistsError,
    UniversalNeuronsError,
)

try:
    __version__ = _dist_version("universal-neurons")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

# public name -> module that defines it (loaded lazily by __getattr__)
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["haar_orthogonal", "rotation_matrices"], "baselines"),
    **dict.fromkeys(["ModelLayout", "CorrelationConfig", "CorrelationResult", "correlate", "correlate_all_pairs",
                     "preflight"], "correlation"),
    **dict.fromkeys(["universality_table", "flag_universal", "save_universality_table",
                     "load_universality_table"], "universality"),
    **dict.fromkeys(["AblationConfig", "AblationPlan", "AblationMetrics", "AblationResult", "ablate", "ablation_study",
                     "ablation_stage", "control_sets", "neuron_means", "neuron_set"], "ablation"),
    **dict.fromkeys(["PersistenceResult", "persistence_from_tables", "run_persistence", "persistence_stage",
                     "resolve_steps"], "persistence"),
    **dict.fromkeys(["PropertiesConfig", "StreamingMoments", "weight_properties", "activation_moments",
                     "classify_families", "neuron_properties", "join_universality", "compare_universal",
                     "save_properties", "load_properties", "properties_stage", "family_cuts"], "properties"),
    **dict.fromkeys(["fig_alike_over_training", "fig_max_corr_vs_baseline", "fig_corr_distributions",
                     "fig_universal_fraction",
                     "fig_excess_distribution", "fig_pair_correlations", "fig_property_comparison",
                     "fig_property_effects", "fig_ablation", "fig_persistence", "fig_persistence_by_layer",
                     "fig_partner_consistency", "fig_emergence"], "figures"),
    **dict.fromkeys(["Report", "ReportSection", "load_run", "report_stage"], "report"),
    **dict.fromkeys(["PipelineConfig", "PipelineResult", "run_pipeline"], "pipeline"),
    **dict.fromkeys(["AgreementConfig", "AgreementResult", "functional_agreement", "agreement_over_checkpoints",
                     "agreement_stage", "fig_agreement"], "agreement"),
}

__all__ = [
    "__version__",
    "UniversalNeuronsError",
    "ConfigError",
    "InputError",
    "InputNotFoundError",
    "OutputExistsError",
    "IncompatibleInputsError",
    "ModelUnavailableError",
    "CorruptFileError",
    "DiskSpaceError",
    *_EXPORTS,
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'universal_neurons' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static checkers and IDEs see the eager imports
    from .ablation import (  # noqa: F401
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
    from .baselines import haar_orthogonal, rotation_matrices  # noqa: F401
    from .correlation import (  # noqa: F401
        CorrelationConfig,
        CorrelationResult,
        ModelLayout,
        correlate,
        correlate_all_pairs,
        preflight,
    )
    from .pipeline import PipelineConfig, PipelineResult, run_pipeline  # noqa: F401
    from .report import Report, ReportSection, load_run, report_stage  # noqa: F401
