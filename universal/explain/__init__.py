"""Stage: explanations (docs/explanations.md), what each neuron responds to and what it does,
side by side across the seeds of a family.

For every neuron of a chosen set (by default each universal neuron of the reference with its
partner in every other seed, and a seeded sample of other neurons for contrast):

- its k top-activating tokens and a few tokens at exact activation quantiles, each with its
  context window and every seed's activation on it, from one streamed pass (exact: equal to a
  full sort, ties to the lower token index; shards merge exactly);
- the variance reduction of every binary feature of the current and the previous token
  (unigrams, token classes, first letters) and of the position, its best features and a family
  (unigram, alphabet, previous_token, position, other);
- the vocabulary its output weight promotes and suppresses.

    ex = explain_run("runs/demo")                 # writes runs/demo/explanations/
    print(explain("runs/demo", 1, 123))           # one neuron beside its partners (HTML in notebooks)

The parts:

    config.py      ExplainConfig, the families and their cuts
    selection.py   which neurons: groups of a reference neuron and its partners
    source.py      batches of rows from stores or live models
    keys.py        exact order statistics on packed integer keys
    accumulate.py  the streaming state of each pass, mergeable by shard
    features.py    the binary features, from the decoded vocabulary
    variance.py    variance reductions, eta^2, best features, families
    vocabulary.py  the output side: promoted and suppressed tokens
    engine.py      passes over blocks of neurons under a memory budget, contexts
    result.py      the in-memory result and its tables
    storage.py     the files under <run>/explanations/
    view.py        one group as text and HTML
    stage.py       explain_run, explain_stage, explain
"""

from .accumulate import ExamplesPartial, MainPartial, RefinePartial, quantile_ranks
from .config import FAMILIES, ExplainConfig, family_cuts
from .engine import explain_neurons, plan_blocks, unit_bytes
from .features import CLASS_DEFINITIONS, FeatureSet, build_features, token_classes, vocab_texts
from .result import Explanations
from .selection import NeuronGroup, default_groups, group_of, table_labels, units_of
from .source import Batch, LiveModelSource, StoreSource, Unit
from .stage import explain, explain_run, explain_stage, load_models, summarise
from .storage import EXPLANATIONS_DIR, FILES, ExplanationData, explanation_data, load_explanations, save_explanations
from .variance import assign_families, best_features, eta_squared, family_scores, variance_reduction
from .view import NeuronExplanation
from .vocabulary import output_tokens, top_tokens, vocab_cosines

__all__ = [
    "ExplainConfig", "FAMILIES", "family_cuts",
    "NeuronGroup", "default_groups", "group_of", "table_labels", "units_of",
    "Unit", "Batch", "StoreSource", "LiveModelSource",
    "MainPartial", "RefinePartial", "ExamplesPartial", "quantile_ranks",
    "CLASS_DEFINITIONS", "FeatureSet", "build_features", "token_classes", "vocab_texts",
    "variance_reduction", "eta_squared", "family_scores", "assign_families", "best_features",
    "vocab_cosines", "top_tokens", "output_tokens",
    "explain_neurons", "plan_blocks", "unit_bytes",
    "Explanations", "ExplanationData", "explanation_data", "save_explanations", "load_explanations",
    "EXPLANATIONS_DIR", "FILES",
    "NeuronExplanation",
    "explain_run", "explain_stage", "explain", "load_models", "summarise",
]
