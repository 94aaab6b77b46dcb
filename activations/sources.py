"""The correlation engine's batch sources: token-aligned activations of a seed family, from
stores on disk (`iter_aligned`) or from live models (`LiveSource`), as one
`(mask, acts)` stream."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import pick_device, progress

from .hooks import hook_name, mlp_activations
from .models import LoadedModel
from .reader import ActivationStore
from .store import check_compatible
from .tokens import TokenSet

__all__ = ["AlignedSource", "iter_aligned", "LiveSource"]


def _open_all(stores) -> tuple[list[ActivationStore], list[bool]]:
    out, owned = [], []
    for s in stores:
        if isinstance(s, ActivationStore):
            out.append(s)
            owned.append(False)
        else:
            out.append(ActivationStore.open(s))
            owned.append(True)
    return out, owned


class AlignedSource:
    """Token-aligned batches from several stores of one token set; re-iterable (each `iter()`
    is a new pass reading every chunk once, in file order).

    Yields `(mask: Bool[Tensor, "token"], acts: list[Float[Tensor, "token n_layers*d_mlp"]])`, one
    tensor per store in store order, neuron index = layer * d_mlp + neuron. Stores given as paths
    are opened only during a pass; open `ActivationStore`s given by the caller stay the caller's.
    """

    def __init__(self, stores, batch_tokens: int, kind: str = "post", device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        if kind not in ("post", "pre"):
            raise UniversalNeuronsError(f"unknown hook kind {kind!r}; use 'post' or 'pre'")
        if not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise UniversalNeuronsError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
        stores = list(stores)
        if not stores:
            raise UniversalNeuronsError("iter_aligned needs at least one store")
        self.stores, self._owned = _open_all(stores)
        try:
            self._check(kind)
        except BaseException:
            self.close()
            raise
        self.kind, self.dtype = kind, dtype
        self.device = pick_device(device) if device is not None else torch.device("cpu")
        align = max(s.chunk_tokens for s in self.stores)  # powers of two: one multiple aligns all
        self.batch_tokens = max(align, (batch_tokens // align) * align)
        self.n_tokens = self.stores[0].n_tokens
        self.t0, self.t1 = 0, self.n_tokens  # the token window a pass reads (a shard narrows it)
        self.token_set_hash = self.stores[0].token_set_hash
        self.hooks = [[hook_name(layer, kind) for layer in s.layers] for s in self.stores]
        self._mask = torch.from_numpy(self.stores[0].mask)
        self.close()  # the checked facts are kept; each pass reopens the files it was given as paths

    def _check(self, kind: str) -> None:
        hashes = {str(s.path): s.token_set_hash for s in self.stores}
        if len(set(hashes.values())) > 1:
            listing = "; ".join(f"{p}: {h}" for p, h in hashes.items())
            raise UniversalNeuronsError(f"these stores hold activations of different token sets ({listing}); cache "
                                        "every model on the same token set before correlating them")
        for s in self.stores:
            missing = [hook_name(layer, kind) for layer in s.layers if hook_name(layer, kind) not in s]
            if missing:
                raise UniversalNeuronsError(f"{s.path} has no {missing[0]} (it holds {s.hooks}); cache it with "
                                            f"StoreConfig(kinds=('{kind}',...))")
        layouts = {str(s.path): (tuple(s.layers), s.d_mlp) for s in self.stores}
        if len(set(layouts.values())) > 1:
            raise UniversalNeuronsError(f"the stores hold different hooks (layers, d_mlp): {layouts}")

    @property
    def n_neurons(self) -> list[int]:
        return [len(s.layers) * s.d_mlp for s in self.stores]

    def __len__(self) -> int:
        return -(-(self.t1 - self.t0) // self.batch_tokens)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        # stores given as paths are opened for the pass and closed after it (no lingering handles)
        stores = [ActivationStore.open(s.path) if own else s for s, own in zip(self.stores, self._owned)]
        try:
            yield from self._batches(stores)
        finally:
            for s, own in zip(stores, self._owned):
                if own:
                    s.close()

    def _batches(self, stores: list[ActivationStore]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        for a in range(self.t0, self.t1, self.batch_tokens):
            b = min(a + self.batch_tokens, self.t1)
            acts = []
            for s, hooks in zip(stores, self.hooks):
                d = s.d_mlp
                buf = np.empty((b - a, len(hooks) * d), dtype=s[hooks[0]].dtype)
                for j, h in enumerate(hooks):
                    s[h].read_direct(buf, np.s_[a:b], np.s_[:, j * d:(j + 1) * d])
                acts.append(torch.from_numpy(buf).to(self.device, self.dtype))
            yield self._mask[a:b].to(self.device), acts

    def close(self) -> None:
        """Close the stores this source opened itself (a later pass reopens them)."""
        for s, own in zip(self.stores, self._owned):
            if own:
                s.close()


def iter_aligned(stores: Sequence, batch_tokens: int, kind: str = "post", device=None,
                 dtype: torch.dtype = torch.float32) -> AlignedSource:
    """The correlation engine's source over stores on disk.

    First checks that every store holds the same token set (hash) and the same hooks.

    Args:
        stores: paths or open `ActivationStore`s, reference model first.
        batch_tokens: tokens per batch, rounded down to whole chunks (at least one chunk).
        kind: `'post'` or `'pre'`; `device`: where the tensors go (default CPU); `dtype` of them.

    Returns:
        a re-iterable `AlignedSource` yielding `(mask: Bool[Tensor, "token"],
        acts: list[Float[Tensor, "token n_layers*d_mlp"]])`.
    """
    return AlignedSource(stores, batch_tokens, kind=kind, device=device, dtype=dtype)


class LiveSource:
    """The same `(mask, acts)` contract as `iter_aligned`, computed by running every model on the
    same rows, with nothing cached on disk (values equal a float32 store). Re-iterable.

    Args:
        models: `LoadedModel`s of one family, reference first.
        token_set: the rows; `batch_rows`: rows per forward pass.
        kind: `'post'` or `'pre'`; `device`: where yielded tensors go (default: the first model's).
    """

    def __init__(self, models: Sequence[LoadedModel], token_set: TokenSet, batch_rows: int, kind: str = "post",
                 device=None, progress_bar: bool | None = False) -> None:
        if kind not in ("post", "pre"):
            raise UniversalNeuronsError(f"unknown hook kind {kind!r}; use 'post' or 'pre'")
        if not isinstance(batch_rows, int) or batch_rows < 1:
            raise UniversalNeuronsError(f"batch_rows must be a positive integer, got {batch_rows!r}")
        self.models = list(models)
        if not self.models:
            raise UniversalNeuronsError("LiveSource needs at least one model")
        for lm in self.models:
            check_compatible(lm.provenance, token_set, lm.tokenizer)
        self.token_set, self.batch_rows, self.kind = token_set, batch_rows, kind
        self.device = pick_device(device) if device is not None else self.models[0].device
        self.n_tokens, self.token_set_hash = token_set.n_tokens, token_set.hash
        self.batch_tokens = batch_rows * token_set.ctx_len
        self.progress_bar = progress_bar

    @property
    def n_neurons(self) -> list[int]:
        return [lm.n_layers * lm.d_mlp for lm in self.models]

    def __len__(self) -> int:
        return -(-self.token_set.n_rows // self.batch_rows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        bar = progress(total=self.n_tokens, desc="live activations", unit="tok", unit_scale=True,
                       enabled=self.progress_bar)
        try:
            for ids, mask in self.token_set.batches(self.batch_rows):
                toks = torch.from_numpy(ids).long()
                acts = []
                for lm in self.models:
                    out = mlp_activations(lm, toks, kinds=(self.kind,))
                    acts.append(torch.cat([out[hook_name(layer, self.kind)].reshape(-1, lm.d_mlp)
                                           for layer in range(lm.n_layers)], dim=1).to(self.device, torch.float32))
                bar.update(ids.size)
                yield torch.from_numpy(mask.reshape(-1)).to(self.device), acts
        finally:
            bar.close()
