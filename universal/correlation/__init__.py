"""Stage: activations -> correlations (docs/method.md §4-5).

Exact streaming Pearson correlation between every neuron of a reference model `a` and every
neuron of each other model `m` (all layers), with a chance baseline computed in the same pass.

Engine, per token batch (masked-in tokens only):
  1. each model's activations are centred by their batch mean (x once for all m);
  2. one GEMM  x_c[:, block]^T @ [y_c(b) | y_c(c) | ...]  gives every batch co-moment;
  3. the batch co-moments are merged into float64 running co-moments with Chan et al.'s
     pairwise update  C += C_b + n_a n_b / n * dmean_x dmean_y^T,  and each neuron's mean and
     M2 by the same update (`universal_neurons.moments`), so a neuron whose mean is 10^4
     times its spread loses nothing.
When the accumulators of all pairs exceed `memory_budget`, the reference neurons are split
into blocks, one pass over the source per block.

The parts, in the order a run goes through them:

    config.py     ModelLayout, CorrelationConfig, the memory plan: preflight, reference_blocks
    kernels.py    batch preamble, tiled centring into the GEMM dtype, co-moment merges, workspace
    partial.py    CorrelationPartial (one pass's state), accumulate, merge_partials
    finalize.py   co-moments -> correlations, partners, baselines, summaries: finalize
    result.py     CorrelationResult and its HDF5 file
    run.py        correlate = finalize over one accumulate per block
    all_pairs.py  every model the reference in turn, in one pass when it can

The steps are public for distributed runs (`universal_neurons.distributed`): one `accumulate`
per (token shard, reference block) gives a picklable `CorrelationPartial`; `merge_partials`
joins two of them with the very Chan merges that `CorrelationPartial.update` applies to each
batch; `finalize` turns one merged partial per block into the `CorrelationResult`.
"""

from .all_pairs import correlate_all_pairs, preflight_all_pairs
from .config import CorrelationConfig, ModelLayout, preflight, reference_blocks
from .finalize import finalize
from .partial import CorrelationPartial, accumulate, merge_partials
from .result import CorrelationResult
from .run import correlate

__all__ = [
    "ModelLayout",
    "CorrelationConfig",
    "CorrelationResult",
    "correlate",
    "correlate_all_pairs",
    "preflight",
    "preflight_all_pairs",
    "CorrelationPartial",
    "reference_blocks",
    "accumulate",
    "merge_partials",
    "finalize",
]
