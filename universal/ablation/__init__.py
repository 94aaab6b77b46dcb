"""Stage: universality table -> functional impact (docs/method.md §8).

Ablate a *set* of MLP neurons at `blocks.{layer}.mlp.hook_post` (zero, mean, or a fixed value)
and measure, on a held-out token set, how much the model's next-token predictions change:

    ce        mean next-token cross-entropy, clean and ablated; delta_ce = ablated - clean
    kl        mean KL(clean || ablated) of the next-token distributions
    entropy   mean prediction entropy; delta_entropy = ablated - clean

Counted predictions. The logits at position p predict token p+1. That prediction is counted
iff `mask[p]` and `mask[p+1]` are both True: the input token is one every other statistic
counts, and so is the target (no scoring of predicted EOS, newlines or BOS). It is the rule of
TransformerLens' `lm_cross_entropy_loss(..., attention_mask=mask)`, and with an all-True mask
the clean loss equals `model(tokens, return_type="loss")`. The last position predicts nothing.

Where the ablated value is written (`AblationConfig.positions`). 'counted' (default): only at
positions whose mask is True, the positions the means were taken over; BOS, EOS and newline
positions keep their own activations (the BOS residual is what later positions attend to).
'all': every position, which equals zeroing the neurons' `W_out` rows for kind='zero'.

Held-out tokens. ΔCE is meant to be measured on tokens that did not choose the neurons; each
result records the study token set's hash and whether its own tokens are held out from it
(`heldout.py`), with a loud warning when they are the same.

Controls. Each ablated set is compared with `n_controls` (default 99) seeded random sets with
the same number of neurons in every layer, drawn from the neurons that are neither in the set
nor universal (nor dead, by default). Per-layer groups ablate the universal neurons of one
layer at a time, against controls from that layer (the all-layers controls restricted to it).

Statistics (`bootstrap.py`, exact scheme there): per group, the paired difference ΔCE(universal)
- mean ΔCE(controls) on the same rows, with a bootstrap interval resampling token *rows* and
control draws jointly; the one-sided p-value (1 + #{controls with ΔCE >= universal}) / (1 +
n_controls); ΔCE per ablated neuron. Memory: per-row sums per set (`rows x sets x 3` float64),
never per-token values unless asked for; the clean forward pass of each batch is shared by all
sets, and a set that occurs twice is run once.

The parts, in the order a study runs them:

    config.py     AblationConfig
    neurons.py    neuron sets, the control pool, seeded control draws
    means.py      mean activations for kind='mean'
    plan.py       AblationPlan: build once -> evaluate on rows -> result; ablation_study, ablate
    evaluate.py   the forward passes with hooks, reduced to per-row sums (RowSums)
    heldout.py    the study token set of a table, and how the evaluated tokens relate to it
    bootstrap.py  replicates over rows, intervals, the paired summary against controls
    output.py     AblationResult / AblationMetrics, their files, the per-token sinks
    stage.py      ablation_stage for run_pipeline
"""

from .bootstrap import bootstrap_replicates, control_picks, interval, row_indices
from .config import ABLATION_KINDS, ABLATION_POSITIONS, AblationConfig
from .evaluate import RowSums, counted_predictions
from .heldout import study_hash, token_relation
from .means import neuron_means
from .neurons import Neurons, control_sets, neuron_set
from .output import RUN_COLUMNS, SUMMARY_COLUMNS, AblationMetrics, AblationResult
from .plan import AblationPlan, SetInfo, ablate, ablation_study
from .stage import ablation_stage

__all__ = [
    "ABLATION_KINDS",
    "ABLATION_POSITIONS",
    "AblationConfig",
    "AblationMetrics",
    "AblationPlan",
    "AblationResult",
    "Neurons",
    "RUN_COLUMNS",
    "RowSums",
    "SUMMARY_COLUMNS",
    "SetInfo",
    "ablate",
    "ablation_stage",
    "ablation_study",
    "bootstrap_replicates",
    "control_picks",
    "control_sets",
    "counted_predictions",
    "interval",
    "neuron_means",
    "neuron_set",
    "row_indices",
    "study_hash",
    "token_relation",
]
