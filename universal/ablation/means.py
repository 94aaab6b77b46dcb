"""The values a mean ablation writes: every neuron's mean `hook_post` activation over the
masked-in tokens, from a model (streamed) or an activation store."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from universal_neurons.activations import ActivationStore, LoadedModel, TokenSet, hook_name, mlp_activations
from universal_neurons.errors import ConfigError, IncompatibleInputsError, InputError
from universal_neurons.runtime import progress

from .config import AblationConfig
from .evaluate import check_tokens
from .neurons import Neurons

__all__ = ["neuron_means", "study_means", "check_means"]

log = logging.getLogger(__name__)


def neuron_means(source: LoadedModel | ActivationStore | str | os.PathLike, token_set: TokenSet | None = None, *,
                 batch_rows: int = 16, progress_bar: bool | None = None) -> np.ndarray:
    """Mean `hook_post` activation of every neuron over the masked-in tokens.

    Args:
        source: a `LoadedModel` (streamed over `token_set`, which is then required) or an activation
            store (object or path; its mask is used, and it must be of `token_set` when one is given).
        token_set: the tokens.
        batch_rows: rows per forward pass for a model.
        progress_bar: None follows the global switch.

    Returns:
        `Float[ndarray, "layer d_mlp"]` float64; layers a store does not hold are NaN.

    Raises:
        InputError: no token set for a model, or a mask that excludes every token.
        IncompatibleInputsError: a store cached on another token set.
    """
    if isinstance(source, LoadedModel):
        if token_set is None:
            raise InputError("neuron_means of a model needs the token set to average over")
        return _model_means(source, token_set, batch_rows, progress_bar)
    with _opened(source) as store:
        if token_set is not None and store.token_set_hash != token_set.hash:
            raise IncompatibleInputsError(
                f"the activation store {store.path} was cached on token set {store.token_set_hash[:12]}, not on this "
                f"one ({token_set.hash[:12]}); cache the model on this token set, or compute the means from that "
                "store on purpose with neuron_means(store) and pass means=")
        return _store_means(store)


def _model_means(lm: LoadedModel, token_set: TokenSet, batch_rows: int, progress_bar: bool | None) -> np.ndarray:
    check_tokens(lm, token_set)
    total = torch.zeros(lm.n_layers, lm.d_mlp, dtype=torch.float64)  # [layer, d_mlp]
    n = 0
    for ids, mask in progress(token_set.batches(batch_rows), desc="neuron means", unit="batch",
                              total=-(-token_set.n_rows // batch_rows), enabled=progress_bar):
        acts = mlp_activations(lm, torch.from_numpy(ids).long())
        m = torch.from_numpy(mask.reshape(-1)).to(lm.device)
        for layer in range(lm.n_layers):
            a = acts[hook_name(layer)].reshape(-1, lm.d_mlp)[m]  # [token, d_mlp]
            total[layer] += a.double().sum(0).cpu()
        n += int(mask.sum())
    if n == 0:
        raise InputError("the token set masks out every token; there is no mean to take. Rebuild it "
                         "with a laxer mask or on more text")
    return (total / n).numpy()


def _store_means(store: ActivationStore) -> np.ndarray:
    mask = store.mask
    if not mask.any():
        raise InputError(f"the store {store.path} masks out every token; there is no mean to take")
    out = np.full((store.n_layers, store.d_mlp), np.nan)
    step = store.chunk_tokens * max(1, 16384 // store.chunk_tokens)  # whole chunks, ~16k tokens per read
    for layer in store.layers:
        if hook_name(layer) not in store:
            continue
        ds, acc = store[hook_name(layer)], np.zeros(store.d_mlp)
        for a in range(0, store.n_tokens, step):
            m = mask[a:a + step]
            acc += ds[a:a + step][m].astype(np.float64).sum(0)
        out[layer] = acc / mask.sum()
    return out


@contextlib.contextmanager
def _opened(store: ActivationStore | str | os.PathLike) -> Iterator[ActivationStore]:
    """The caller's open store, or one opened here from a path (and closed on exit)."""
    if isinstance(store, ActivationStore):
        yield store
        return
    opened = ActivationStore.open(store)
    try:
        yield opened
    finally:
        opened.close()


def study_means(lm: LoadedModel, token_set: TokenSet, config: AblationConfig, *, means: np.ndarray | None = None,
                store: ActivationStore | str | os.PathLike | None = None,
                batch_rows: int = 16) -> tuple[np.ndarray | None, str | None]:
    """The means a study ablates with (kind='mean'; None for the other kinds) and where they came from.

    Args:
        lm: the model ablated.
        token_set: the tokens the means are streamed over when neither `means` nor `store` is given.
        config: the study's settings (only `kind` matters here).
        means: `Float[ndarray, "layer d_mlp"]` given directly.
        store: activation store of `lm` on `token_set` to read the means from.
        batch_rows: rows per forward pass when streamed (at most 64 are used).

    Returns:
        `(means, source)`: `Float[ndarray, "layer d_mlp"]` float64 or None, and a short description.

    Raises:
        ConfigError: both `means` and `store`.
        IncompatibleInputsError: means or a store of a model of another shape.
    """
    if config.kind != "mean":
        return None, None
    if means is not None and store is not None:
        raise ConfigError("pass means= or store=, not both")
    if store is not None:
        with _opened(store) as st:
            if (st.n_layers, st.d_mlp) != (lm.n_layers, lm.d_mlp):
                raise IncompatibleInputsError(
                    f"the store {st.path} holds a model with {st.n_layers} layers x {st.d_mlp} neurons, {lm.name} "
                    f"has {lm.n_layers} x {lm.d_mlp}; pass that model's store")
            if (st.model.get("resolved") != lm.provenance.get("resolved")
                    or st.model.get("checkpoint") != lm.provenance.get("checkpoint")):
                log.warning("the store %s was cached from %s (checkpoint %s), not %s (checkpoint %s)", st.path,
                            st.model.get("name"), st.model.get("checkpoint"), lm.name, lm.provenance.get("checkpoint"))
            values = neuron_means(st, token_set)
            source = f"store {Path(st.path).resolve()}"
    elif means is not None:
        values, source = means, "given"
    else:
        values = neuron_means(lm, token_set, batch_rows=max(1, min(batch_rows, 64)))
        source = f"streamed over token set {token_set.hash[:12]}"
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (lm.n_layers, lm.d_mlp):
        raise IncompatibleInputsError(f"means have shape {values.shape} but {lm.name} needs (n_layers, d_mlp) = "
                                      f"({lm.n_layers}, {lm.d_mlp}); they belong to another model")
    return values, source


def check_means(means: np.ndarray | None, s: Neurons) -> None:
    """Refuse a mean ablation of neurons without a finite mean (a layer the store did not hold).

    Raises:
        InputError: a neuron of `s` whose mean is NaN.
    """
    if means is None:
        return
    for layer, idx in s.items():
        if not np.isfinite(means[layer, idx]).all():
            raise InputError(f"no mean activation for layer {layer} (the store does not hold that layer, or "
                             "the means are NaN); cache every layer or compute means from the model")
