"""The output side of a neuron: the vocabulary tokens its output weight promotes and suppresses,
by cos(w_out_i, W_U[:, v]), the composition the properties' vocabulary statistics use
(docs/method.md §7), with ties broken by token id."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from universal_neurons.activations import LoadedModel, mlp_weights
from universal_neurons.errors import InputError

from .source import Unit

__all__ = ["vocab_cosines", "top_tokens", "output_tokens"]


def vocab_cosines(w_out: torch.Tensor, W_U: torch.Tensor) -> np.ndarray:
    """`Float[ndarray, "neuron vocab"]` float64: cos(w_out_i, W_U[:, v]); NaN for an all-zero
    unembedding column or output weight.

    Args:
        w_out: `[neuron, d_model]` output weights.
        W_U: `[d_model, d_vocab]` unembedding.
    """
    w, u = w_out.double(), W_U.double()
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = (w @ u) / (w.norm(dim=1, keepdim=True) * u.norm(dim=0, keepdim=True))
    return cos.numpy()


def top_tokens(cos: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """The `n` most promoted (largest cos) and suppressed (smallest) ids per neuron.

    Returns:
        `{promoted_ids, promoted_cos, suppressed_ids, suppressed_cos}`, each `[neuron, n]`
        (ids -1 / cos NaN past the finite entries), ties by lower id.
    """
    rows, vocab = cos.shape
    n = min(n, vocab)
    out = {k: np.full((rows, n), -1 if k.endswith("ids") else np.nan,
                      np.int64 if k.endswith("ids") else np.float64)
           for k in ("promoted_ids", "promoted_cos", "suppressed_ids", "suppressed_cos")}
    ids = np.arange(vocab)
    for i in range(rows):
        ok = np.isfinite(cos[i])
        for name, sign in (("promoted", -1.0), ("suppressed", 1.0)):
            order = ids[ok][np.lexsort((ids[ok], sign * cos[i, ok]))][:n]
            out[f"{name}_ids"][i, :len(order)] = order
            out[f"{name}_cos"][i, :len(order)] = cos[i, order]
    return out


def output_tokens(units: Sequence[Unit], models: Mapping[str, LoadedModel], n: int) -> dict[str, np.ndarray]:
    """`top_tokens` of every unit, read from its model's weights (in their loaded processing).

    Args:
        units: the neurons.
        models: label -> `LoadedModel` for every label of `units`.
        n: tokens per direction.

    Returns:
        `top_tokens`' arrays, `[unit, n]` each.

    Raises:
        InputError: a unit's model is not given.
    """
    missing = sorted({u.label for u in units} - set(models))
    if missing:
        raise InputError(f"no model for label(s) {missing}; pass every model of the family")
    parts: dict[str, list[np.ndarray]] = {}
    order: list[int] = []
    for lab, lm in models.items():
        mine = [i for i, u in enumerate(units) if u.label == lab]
        if not mine:
            continue
        w = mlp_weights(lm)
        w_out = torch.stack([w["W_out"][units[i].layer, units[i].neuron] for i in mine])
        for k, v in top_tokens(vocab_cosines(w_out, w["W_U"]), n).items():
            parts.setdefault(k, []).append(v)
        order.extend(mine)
    back = np.argsort(np.asarray(order, np.int64))
    return {k: np.concatenate(v)[back] for k, v in parts.items()}
