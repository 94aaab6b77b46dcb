"""The caching layer: models in, tokens in, HDF5 activations out."""

from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import pick_device, set_progress

from .models import (
    GPT2Config,
    LoadedModel,
    hook_name,
    init_gpt2,
    list_checkpoints,
    load_from_provenance,
    load_model,
    mlp_activations,
    mlp_weights,
    parse_hook_name,
    run_with_post_hooks,
    save_model_dir,
)
from .store import (
    ActivationStore,
    AlignedSource,
    LiveSource,
    StoreConfig,
    cache_activations,
    iter_aligned,
    preflight_cache,
    store_filename,
)
from .tokens import TokenSet, TokenSetConfig, build_token_set, load_token_set

__all__ = [
    "UniversalNeuronsError",
    "pick_device",
    "set_progress",
    "GPT2Config",
    "LoadedModel",
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
    "load_token_set",
    "StoreConfig",
    "cache_activations",
    "preflight_cache",
    "ActivationStore",
    "iter_aligned",
    "AlignedSource",
    "LiveSource",
    "store_filename",
]
