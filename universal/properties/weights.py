"""Weight and vocabulary statistics of every neuron: norms, input bias, in/out similarity, and
the moments over the vocabulary of cos(w_out_i, W_U[:, v])."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from universal_neurons.activations import LoadedModel, mlp_weights
from universal_neurons.errors import InputError
from universal_neurons.moments import StreamingMoments
from universal_neurons.runtime import pick_device

from .config import VOCAB_COLUMNS, PropertiesConfig

__all__ = ["weight_properties", "vocab_moments"]

log = logging.getLogger(__name__)


def _weights_of(weights: LoadedModel | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The four weight tensors on the CPU, shapes checked against W_in's."""
    w = mlp_weights(weights) if isinstance(weights, LoadedModel) else dict(weights)
    missing = {"W_in", "b_in", "W_out", "W_U"} - set(w)
    if missing:
        raise InputError(f"weights lack {sorted(missing)}; pass a LoadedModel or the dict of mlp_weights")
    w = {k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).detach().cpu() for k, v in w.items()}
    L, dm, dmlp = w["W_in"].shape
    want = {"b_in": (L, dmlp), "W_out": (L, dmlp, dm), "W_U": (dm, w["W_U"].shape[-1])}
    for k, s in want.items():
        if tuple(w[k].shape) != s:
            raise InputError(f"{k} has shape {tuple(w[k].shape)}; with W_in [layer, d_model, d_mlp] = "
                             f"{(L, dm, dmlp)} it must be {s}")
    return w


def weight_properties(weights: LoadedModel | Mapping[str, Any], *,
                      config: PropertiesConfig = PropertiesConfig()) -> pd.DataFrame:
    """Weight and vocabulary-composition properties of every neuron.

    Args:
        weights: a `LoadedModel`, or `{W_in: [layer, d_model, d_mlp], b_in: [layer, d_mlp],
            W_out: [layer, d_mlp, d_model], W_U: [d_model, d_vocab]}` (tensors or arrays).
        config: `vocab_dtype`, `vocab_chunk`, `device` are used here.

    Returns:
        DataFrame `[layer*d_mlp rows]`: `layer, neuron`, `WEIGHT_COLUMNS`, `VOCAB_COLUMNS`.
        Vocabulary columns whose unembedding column is all zero are left out of the vocab moments.

    Raises:
        InputError: a weight tensor is missing or has the wrong shape.
    """
    w = _weights_of(weights)
    W_in, b_in, W_out, W_U = (w[k].double() for k in ("W_in", "b_in", "W_out", "W_U"))
    L, _, d = W_in.shape
    w_in = W_in.transpose(1, 2)  # [layer, d_mlp, d_model]
    in_norm, out_norm = w_in.norm(dim=-1), W_out.norm(dim=-1)  # [layer, d_mlp]
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = ((w_in * W_out).sum(-1) / (in_norm * out_norm)).numpy()
    cols: dict[str, Any] = {
        "layer": np.repeat(np.arange(L), d), "neuron": np.tile(np.arange(d), L),
        "w_in_norm": in_norm.numpy().ravel(), "input_bias": b_in.numpy().ravel(),
        "w_out_norm": out_norm.numpy().ravel(), "in_out_sim": sim.ravel(),
        "l2_penalty": (in_norm ** 2 + out_norm ** 2).numpy().ravel(),
    }
    cols.update(vocab_moments(W_out.reshape(L * d, -1), W_U, config))
    return pd.DataFrame(cols)


def vocab_moments(W_out: torch.Tensor, W_U: torch.Tensor, config: PropertiesConfig) -> dict[str, np.ndarray]:
    """Moments over the vocabulary of cos(w_out_i, W_U[:, v]), a block of neurons at a time.

    Args:
        W_out: `[neuron, d_model]` output weights.
        W_U: `[d_model, d_vocab]` unembedding.
        config: `vocab_dtype`, `vocab_chunk`, `device` are used.

    Returns:
        `VOCAB_COLUMNS` -> `[neuron]`.
    """
    dev, dt = pick_device(config.device), getattr(torch, config.vocab_dtype)
    u_norm = W_U.norm(dim=0)
    keep = u_norm > 0
    if not bool(keep.all()):
        log.warning("%d unembedding columns are all zero; left out of the vocab moments", int((~keep).sum()))
    U = (W_U[:, keep] / u_norm[keep]).to(dev, dt)  # [d_model, vocab]
    o_norm = W_out.norm(dim=1, keepdim=True)
    out_dirs = (W_out / o_norm).to(dt)  # zero rows -> NaN rows -> NaN moments
    out = {k: np.empty(W_out.shape[0]) for k in VOCAB_COLUMNS}
    for a in range(0, W_out.shape[0], config.vocab_chunk):
        b = min(a + config.vocab_chunk, W_out.shape[0])
        cos = (out_dirs[a:b].to(dev) @ U).T  # [vocab, chunk]: a whole "batch" for the moments
        acc = StreamingMoments(b - a)
        acc.update(cos)
        r = acc.result()
        for k, key in zip(VOCAB_COLUMNS, ("mean", "var", "skew", "kurt")):
            out[k][a:b] = r[key]
    return out
