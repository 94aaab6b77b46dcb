"""Stage: neuron properties (docs/method.md §7), one row per neuron of a model, joinable with the
universality table on `layer, neuron`.

Columns of a properties table:

    layer, neuron
    w_in_norm, input_bias, w_out_norm, in_out_sim, l2_penalty        weights
    vocab_mean, vocab_var, vocab_skew, vocab_kurt                    cos(w_out_i, W_U[:, v]) over the vocabulary
    pre_mean, pre_var, pre_skew, pre_kurt, activation_frequency      hook_pre over the masked-in tokens
    post_mean, post_var, post_skew, post_kurt                        hook_post over the same tokens
    is_prediction, is_suppression, is_partition, is_entropy, family  families from weights alone

Moment conventions, the paper's (all exact, float64): `*_var` is the population variance
(divide by n), `*_skew` = mean(z^3) = scipy.stats.skew(bias=True), and every `*_kurt`
(`vocab_kurt`, `pre_kurt`, `post_kurt`) is *raw* kurtosis, mean(z^4), so a Gaussian has 3
(scipy.stats.kurtosis(fisher=False, bias=True); subtract 3 for excess kurtosis). The tables can
so be set beside the paper's released ones; `df.attrs['provenance']['conventions']` names the
convention. A neuron whose variance is zero has NaN skew and kurt.
`activation_frequency` is the fraction of masked-in tokens with pre-activation > 0.
Activation moments are streamed over token batches with the pairwise update of Pébay (2008) /
Terriberry for the central sums M2, M3, M4 (`universal_neurons.moments`), so they are exact up
to float64 rounding and never hold all activations in memory (the paper used histograms
clipped to [-10, 15]).

Families use the paper's fixed cuts by default (raw `vocab_kurt > 10` with the sign of
`vocab_skew`; `vocab_var > 0.005`; entropy candidates in the last layer with `l2_penalty >= 1`
and `vocab_var <= 0.001`), or quantiles of the model's own neurons with
`PropertiesConfig(family_rule='quantile')`; see `classify_families`.

Weight statistics depend on the weight processing on load (fold LN, centre writing weights,
centre unembedding); it is recorded in the provenance (`df.attrs['provenance']`).

The parts:

    config.py       PropertiesConfig, the column lists, the families
    weights.py      weight and vocabulary statistics
    activations.py  activation moments, live or from a store
    families.py     families from weights; universal vs other neurons
    stage.py        the whole table, its files, the pipeline stage
"""

from universal_neurons.moments import StreamingMoments

from .activations import activation_moments, check_live, live_moments, moments_frame
from .config import (
    ACTIVATION_COLUMNS,
    CONVENTIONS,
    FAMILIES,
    FAMILY_RULES,
    VOCAB_COLUMNS,
    WEIGHT_COLUMNS,
    PropertiesConfig,
)
from .families import classify_families, compare_universal, family_cuts, join_universality
from .stage import load_properties, neuron_properties, properties_stage, save_properties
from .weights import weight_properties

__all__ = [
    "PropertiesConfig",
    "StreamingMoments",
    "WEIGHT_COLUMNS",
    "VOCAB_COLUMNS",
    "ACTIVATION_COLUMNS",
    "FAMILIES",
    "FAMILY_RULES",
    "CONVENTIONS",
    "weight_properties",
    "activation_moments",
    "check_live",
    "live_moments",
    "moments_frame",
    "classify_families",
    "family_cuts",
    "neuron_properties",
    "join_universality",
    "compare_universal",
    "save_properties",
    "load_properties",
    "properties_stage",
]
