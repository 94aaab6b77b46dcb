"""Activation moments of every neuron (hook_pre and hook_post over the masked-in tokens),
streamed from a live model or from an activation store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence, cast

import numpy as np
import pandas as pd
import torch

from universal_neurons.activations import ActivationStore, HookKind, LoadedModel, TokenSet, hook_name, mlp_activations
from universal_neurons.errors import ConfigError, IncompatibleInputsError, InputError
from universal_neurons.moments import StreamingMoments
from universal_neurons.runtime import progress

__all__ = ["activation_moments", "check_live", "live_moments", "store_moments", "moments_frame"]

# (layer, kind) -> the moments of that hook's neurons
Accumulators = dict[tuple[int, HookKind], StreamingMoments]


def activation_moments(
    source: LoadedModel | ActivationStore | str | os.PathLike,
    *,
    token_set: TokenSet | None = None,
    kinds: Sequence[str] = ("pre", "post"),
    batch_rows: int = 32,
    progress_bar: bool | None = None,
) -> pd.DataFrame:
    """Exact moments of neuron activations over the masked-in tokens, streamed.

    Args:
        source: an activation store (path or open `ActivationStore`) holding the hooks of
            `kinds`, or a `LoadedModel` run live over `token_set` (both kinds from one forward pass).
        token_set: the rows for a live model; for a store, optional, checked against its hash.
        kinds: `'pre'` gives `pre_mean, pre_var, pre_skew, pre_kurt, activation_frequency`;
            `'post'` gives `post_mean, post_var, post_skew, post_kurt`.
        batch_rows: rows per forward pass / store read.
        progress_bar: show a progress bar (None = the global switch).

    Returns:
        DataFrame `[layer*d_mlp rows]`: `layer, neuron` and the columns above;
        `df.attrs['moments']` holds `n_tokens`, `token_set_hash` and the source.

    Raises:
        ConfigError: `kinds` names something other than 'pre' and 'post'.
        InputError: the store lacks a hook of `kinds`.
        IncompatibleInputsError: the token set does not fit the model or the store.
    """
    if not kinds or set(kinds) - {"pre", "post"}:
        raise ConfigError(f"kinds must name 'pre' and/or 'post', got {tuple(kinds)!r}")
    kinds = cast(tuple[HookKind, ...], tuple(kinds))
    if isinstance(source, LoadedModel):
        accs, layers, d, info = live_moments(source, token_set, kinds, batch_rows, progress_bar)
    else:
        accs, layers, d, info = store_moments(source, token_set, kinds, batch_rows, progress_bar)
    return moments_frame(accs, layers, d, kinds, info)


def moments_frame(accs: Mapping[tuple[int, HookKind], StreamingMoments], layers: Sequence[int], d: int,
                  kinds: Sequence[HookKind], info: dict[str, Any]) -> pd.DataFrame:
    """The table `activation_moments` returns, from finished accumulators.

    Args:
        accs: `{(layer, kind): StreamingMoments}` over every masked-in token.
        layers: the layers, in order.
        d: d_mlp.
        kinds: 'pre' and/or 'post'.
        info: the source's description; `n_tokens` is added.

    Returns:
        DataFrame `[layer*d_mlp rows]`, `info` in `df.attrs['moments']`.
    """
    cols: dict[str, Any] = {"layer": np.repeat(layers, d), "neuron": np.tile(np.arange(d), len(layers))}
    for kind in kinds:
        res = [accs[(layer, kind)].result() for layer in layers]
        for stat in ("mean", "var", "skew", "kurt"):
            cols[f"{kind}_{stat}"] = np.concatenate([r[stat] for r in res])
        if kind == "pre":
            cols["activation_frequency"] = np.concatenate([r["frequency"] for r in res])
        info["n_tokens"] = int(res[0]["count"])
    df = pd.DataFrame(cols)
    df.attrs["moments"] = info
    return df


def check_live(lm: LoadedModel, token_set: TokenSet | None) -> None:
    """Check that `token_set` can be run through `lm`.

    Raises:
        ConfigError: no token set was given.
        IncompatibleInputsError: its rows are longer than the model's context or hold ids
            outside its vocabulary.
    """
    if token_set is None:
        raise ConfigError("activation moments of a live model need a token_set (the rows to run)")
    if token_set.ctx_len > lm.n_ctx or int(token_set.ids.max()) >= lm.d_vocab:
        raise IncompatibleInputsError(
            f"the token set (ctx_len {token_set.ctx_len}, max id {int(token_set.ids.max())}) does not fit "
            f"{lm.name} (n_ctx {lm.n_ctx}, d_vocab {lm.d_vocab}); build it with this model's tokenizer and "
            "ctx_len <= n_ctx")


def live_moments(lm: LoadedModel, token_set: TokenSet | None, kinds: Sequence[HookKind], batch_rows: int,
                 progress_bar: bool | None) -> tuple[Accumulators, list[int], int, dict[str, Any]]:
    """Stream `token_set` through `lm` and accumulate the moments of every hook of `kinds`.

    Args:
        lm: the model.
        token_set: the rows to run; its mask selects the tokens counted.
        kinds: 'pre' and/or 'post'.
        batch_rows: rows per forward pass.
        progress_bar: show a progress bar (None = the global switch).

    Returns:
        (`{(layer, kind): StreamingMoments}`, layers, d_mlp, the source's description).
    """
    check_live(lm, token_set)
    assert token_set is not None
    layers, d = list(range(lm.n_layers)), lm.d_mlp
    accs = {(layer, k): StreamingMoments(d) for layer in layers for k in kinds}
    bar = progress(total=token_set.n_tokens, desc=f"moments {lm.name}", unit="tok", unit_scale=True,
                   enabled=progress_bar)
    try:
        for ids, mask in token_set.batches(batch_rows):
            acts = mlp_activations(lm, torch.from_numpy(ids).long(), kinds=kinds)
            m = torch.from_numpy(mask.reshape(-1)).to(lm.device)
            for (layer, k), acc in accs.items():
                acc.update(acts[hook_name(layer, k)].reshape(-1, d)[m])
            bar.update(ids.size)
    finally:
        bar.close()
    return accs, layers, d, {"source": "live", "model": lm.provenance, "token_set_hash": token_set.hash}


def store_moments(source: ActivationStore | str | os.PathLike, token_set: TokenSet | None, kinds: Sequence[HookKind],
                  batch_rows: int, progress_bar: bool | None) -> tuple[Accumulators, list[int], int, dict[str, Any]]:
    """Read the hooks of `kinds` from an activation store and accumulate their moments.

    Args:
        source: the store (path or open `ActivationStore`; a path is opened and closed here).
        token_set: optional, checked against the store's token-set hash.
        kinds: 'pre' and/or 'post'.
        batch_rows: rows per read.
        progress_bar: show a progress bar (None = the global switch).

    Returns:
        (`{(layer, kind): StreamingMoments}`, layers, d_mlp, the source's description).
    """
    own = not isinstance(source, ActivationStore)
    store = source if isinstance(source, ActivationStore) else ActivationStore.open(source)
    try:
        for k in kinds:
            missing = [hook_name(layer, k) for layer in store.layers if hook_name(layer, k) not in store]
            if missing:
                raise InputError(
                    f"{store.path} has no {missing[0]} (it holds {', '.join(store.hooks[:4])}"
                    f"{', ...' if len(store.hooks) > 4 else ''}); {k}-activation moments need it: cache with "
                    f"StoreConfig(kinds=('post', 'pre')) (`universal-neurons cache --pre`) or pass the live model")
        if token_set is not None and token_set.hash != store.token_set_hash:
            raise IncompatibleInputsError(f"{store.path} holds activations of token set {store.token_set_hash[:12]}, "
                                          f"not of the given one ({token_set.hash[:12]})")
        layers, d = list(store.layers), store.d_mlp
        accs = {(layer, k): StreamingMoments(d) for layer in layers for k in kinds}
        mask = torch.from_numpy(store.mask)
        step = batch_rows * store.ctx_len
        for a in progress(range(0, store.n_tokens, step), desc=f"moments {store.path.name}", enabled=progress_bar):
            b = min(a + step, store.n_tokens)
            m = mask[a:b]
            for (layer, k), acc in accs.items():
                acc.update(torch.from_numpy(store[hook_name(layer, k)][a:b])[m])
        info = {"source": "store", "store": str(Path(store.path).resolve()), "store_dtype": store.config.dtype,
                "model": store.model, "token_set_hash": store.token_set_hash}
    finally:
        if own:
            store.close()
    return accs, layers, d, info
