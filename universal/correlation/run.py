"""`correlate`: the whole single-reference run, `finalize` over one `accumulate` per block."""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

from universal_neurons.runtime import pick_device

from .config import CorrelationConfig, ModelLayout, check_layouts, check_precision, reference_blocks
from .finalize import finalize
from .partial import accumulate
from .result import CorrelationResult

__all__ = ["correlate"]


def correlate(source: Iterable, layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None, *,
              provenance: dict[str, Any] | None = None, full_matrix_path: str | os.PathLike | None = None,
              overwrite: bool = False) -> CorrelationResult:
    """Correlate every neuron of the reference model with every neuron of each other model.

    Args:
        source: re-iterable; each pass yields `(mask, acts)` with `mask` bool `[token]`
            (True = counts) and `acts` a list of float tensors `[token, n_layers*d_mlp]`, one
            per model in the order of `layouts` (reference first). A list works.
        layouts: `ModelLayout` per model, the reference `a` first.
        config: `CorrelationConfig` (baseline, precision, memory budget, ...).
        provenance: models, checkpoints, token-set hash, mask policy; stored with the result.
        full_matrix_path: if given, also write rho `[neuron_a, neuron_m]` per model to this
            HDF5 file (datasets `corr/<label>`, NaN for dead).
        overwrite: allow replacing an existing `full_matrix_path` (checked before any work).

    Returns:
        `CorrelationResult` with `[model, neuron]` arrays for every other model.

    Raises:
        ConfigError: bad layouts, or TF32 asked for off CUDA.
        InputError: a batch that does not match the layouts, or fewer than 2 masked-in tokens.
        OutputExistsError: `full_matrix_path` exists and `overwrite` is False.
    """
    config = config or CorrelationConfig()
    layouts = check_layouts(layouts)
    device = pick_device(config.device)
    check_precision(config, device)
    passes = (accumulate(source, layouts, config, block_index=p, device=device)
              for p in range(len(reference_blocks(layouts, config))))
    return finalize(passes, layouts, config, provenance=provenance, full_matrix_path=full_matrix_path,
                    overwrite=overwrite)
