"""Stage: functional agreement across seeds (docs/agreement.md, docs/method.md).

Same architecture and data, different seeds: do the models compute the same function? For each
pair of models `(a, m)` on a token set (held-out tokens), at each checkpoint, over the counted
predictions (the logits at `pos` predict token `pos + 1`; counted iff `mask[pos]` and
`mask[pos + 1]`, the ablation's rule):

    kl_am   mean KL(P_a || P_m) of the next-token distributions, nats
    kl_ma   mean KL(P_m || P_a), nats
    js      mean Jensen-Shannon divergence, natural log, so in [0, ln 2 = 0.693] nats; symmetric
    top1    fraction of predictions whose argmax agrees

each with a percentile bootstrap interval over token rows. The same pairs at step 0
(initialisation) are the baseline: two untrained models both predict near-uniform
distributions, so their KL is small; top-1 agreement is the fair comparison with training.

Exact and streaming: one batch of rows at a time, each model run once per batch, the
log-softmax and divergences in float64 by default (`AgreementConfig.dtype`), never all logits.

The parts:

    config.py   AgreementConfig
    kernel.py   the batched forward passes, reduced to per-row sums per pair (PairRowSums)
    result.py   AgreementResult: bootstrap summary, the per-pair and per-step tables, files
    run.py      functional_agreement, agreement_over_checkpoints
    stage.py    agreement_stage for run_pipeline
    cluster.py  agreement_row_sums_distributed: the per-row sums over row shards on a Dask cluster
    figure.py   fig_agreement
"""

from .cluster import agreement_row_sums_distributed
from .config import DTYPES, METRICS, PAIR_MODES, AgreementConfig
from .figure import fig_agreement
from .kernel import PairRowSums, agreement_row_sums, pair_divergences
from .result import FILES, AgreementResult
from .run import DEFINITIONS, agreement_over_checkpoints, functional_agreement, model_spec, pair_indices
from .stage import agreement_stage

__all__ = [
    "AgreementConfig",
    "AgreementResult",
    "DEFINITIONS",
    "DTYPES",
    "FILES",
    "METRICS",
    "PAIR_MODES",
    "PairRowSums",
    "agreement_over_checkpoints",
    "agreement_row_sums",
    "agreement_row_sums_distributed",
    "agreement_stage",
    "fig_agreement",
    "functional_agreement",
    "model_spec",
    "pair_divergences",
    "pair_indices",
]
