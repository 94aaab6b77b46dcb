"""Making models: a small GPT-2 to train from a seed, and the local model directories the
toolkit saves and loads (weights, tokenizer, training record, `checkpoint-{step}/`).

A family trained here is laid out like a hub seed with checkpoints:

    <family>/seed-a/checkpoint-0/        config.json, weights, tokenizer, universal_neurons.json
    <family>/seed-a/checkpoint-2000/     ...

so that `load_model(<family>/seed-a, checkpoint=2000)` works exactly like a hub name at a
checkpoint (`universal_neurons.activations.models`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from universal_neurons.config import Config

__all__ = ["GPT2Config", "TRAINING_RECORD", "init_gpt2", "save_model_dir", "checkpoint_dir", "list_checkpoints"]

TRAINING_RECORD = "universal_neurons.json"  # written next to the weights of toolkit-trained models


@dataclass(frozen=True)
class GPT2Config(Config):
    """A GPT-2-architecture model small enough to train on a CPU."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512  # 4 x d_model, as in GPT-2
    n_ctx: int = 256
    d_vocab: int = 4096  # the demo tokenizer's vocabulary
    act_fn: str = "gelu_new"  # GPT-2's tanh-approximated GELU
    dropout: float = 0.0  # short single-epoch runs do not overfit; dropout only adds noise

    def __post_init__(self) -> None:
        for k in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "d_vocab"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                self.fail(f"{k} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            self.fail(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; pick n_heads dividing "
                      "d_model")
        if not 0.0 <= self.dropout < 1.0:
            self.fail(f"dropout must be in [0, 1), got {self.dropout}")


def init_gpt2(config: GPT2Config, *, seed: int, bos_token_id: int = 0, eos_token_id: int = 0):
    """A freshly initialised Hugging Face GPT-2, deterministic in `seed`.

    Args:
        config: the architecture.
        seed: the initialisation seed (the global torch generator is left as it was).
        bos_token_id: the tokenizer's BOS id, recorded in the model's config.
        eos_token_id: the tokenizer's EOS id.

    Returns:
        A `transformers.GPT2LMHeadModel` in training mode.
    """
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    hf_cfg = HFConfig(
        vocab_size=config.d_vocab,
        n_positions=config.n_ctx,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_mlp,
        activation_function=config.act_fn,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(hf_cfg)
    return model


def save_model_dir(model, tokenizer, path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Save a Hugging Face model with its tokenizer and a training record, loadable offline.

    Written to a temporary sibling and renamed, so a killed save never leaves a half-written
    model directory; an existing directory at `path` is replaced (a trainer re-saving a step).

    Args:
        model: a Hugging Face model (`save_pretrained`).
        tokenizer: its tokenizer, saved beside the weights (without it TransformerLens would
            load an empty one).
        path: the model directory to write.
        record: what the trainer wants kept with the weights (seed, step, name), written as
            `universal_neurons.json` and read back into the provenance by `load_model`.

    Returns:
        `path`.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def checkpoint_dir(family_dir: str | os.PathLike, step: int) -> Path:
    """Where a locally trained seed keeps checkpoint `step` (mirrors the hub's `checkpoint-{step}`)."""
    return Path(family_dir) / f"checkpoint-{int(step)}"


def list_checkpoints(model_dir: str | os.PathLike) -> list[int]:
    """Checkpoint steps saved under a local model directory, ascending (those with a config.json)."""
    steps = []
    for p in Path(model_dir).glob("checkpoint-*"):
        suffix = p.name[len("checkpoint-"):]
        if suffix.isdigit() and (p / "config.json").exists():
            steps.append(int(suffix))
    return sorted(steps)
