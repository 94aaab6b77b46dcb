"""The caching layer: models in, tokens in, HDF5 activations out.

    models.py        the one module that touches TransformerLens loading: specs checked, models loaded
    hooks.py         hook names, forward passes with scoped hooks, neuron weights
    architecture.py  making models: a small GPT-2 from a seed, local model directories and checkpoints
    tokens.py   token sets: their config, the set itself (ids, mask, content hash), load/save
    text.py     reading text: files, folders, strings, a Hugging Face dataset (UTF-8 checked)
    build.py    building token sets: tokenise, join with EOS, cut rows with BOS, sample, mask
    store.py    caching: a model and a token set in, one HDF5 activation store out (resumable)
    reader.py   reading a store lazily, every chunk checked against its checksum
    sources.py  token-aligned batches of a family for the correlation engine (stores or live models)
"""

from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import pick_device, set_progress

from .architecture import GPT2Config, checkpoint_dir, init_gpt2, list_checkpoints, save_model_dir
from .build import build_study_and_held_out, build_token_set
from .hooks import (
    HookKind,
    check_hook_names,
    hook_name,
    mlp_activations,
    mlp_weights,
    parse_hook_name,
    run_with_post_hooks,
)
from .models import LoadedModel, ModelLocation, check_available, hub_name, load_from_provenance, load_model
from .reader import ActivationStore, CheckedDataset
from .sources import AlignedSource, LiveSource, iter_aligned
from .store import StoreConfig, cache_activations, preflight_cache, store_filename
from .text import read_documents
from .tokens import TokenSet, TokenSetConfig, load_token_set

__all__ = [
    "UniversalNeuronsError",
    "pick_device",
    "set_progress",
    "GPT2Config",
    "LoadedModel",
    "ModelLocation",
    "HookKind",
    "check_available",
    "checkpoint_dir",
    "hub_name",
    "hook_name",
    "init_gpt2",
    "list_checkpoints",
    "load_from_provenance",
    "load_model",
    "mlp_activations",
    "mlp_weights",
    "parse_hook_name",
    "run_with_post_hooks",
    "save_model_dir",
    "TokenSet",
    "TokenSetConfig",
    "build_token_set",
    "build_study_and_held_out",
    "read_documents",
    "check_hook_names",
    "load_token_set",
    "StoreConfig",
    "cache_activations",
    "preflight_cache",
    "ActivationStore",
    "CheckedDataset",
    "iter_aligned",
    "AlignedSource",
    "LiveSource",
    "store_filename",
]
