"""The caching layer: models in, tokens in, HDF5 activations out."""

from ._errors import UniversalNeuronsError
from ._runtime import pick_device, set_progress
from .models import (
    GPT2Config,
    LoadedModel,
    hook_name,
    init_gpt2,
    list_checkpoints,
    load_model,
    mlp_activations,
    mlp_weights,
    parse_hook_name,
    run_with_post_hooks,
    save_model_dir,
)

__all__ = [
    "UniversalNeuronsError",
    "pick_device",
    "set_progress",
    "GPT2Config",
    "LoadedModel",
    "hook_name",
    "init_gpt2",
    "list_checkpoints",
    "load_model",
    "mlp_activations",
    "mlp_weights",
    "parse_hook_name",
    "run_with_post_hooks",
    "save_model_dir",
]
