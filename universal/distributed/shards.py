"""How work is split: token shards of a source any worker can open on its own (stores on a
shared filesystem, models it loads itself, or small in-memory batches), and row shards of a
token set on whole forward batches."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from universal_neurons.activations import ActivationStore, AlignedSource, LiveSource, TokenSet, load_model
from universal_neurons.errors import ConfigError, IncompatibleInputsError, InputError

__all__ = ["ModelSpec", "ShardedSource", "as_sharded", "batch_shards", "live_shards", "reordered", "row_shards",
           "shard_ranges", "store_shards", "task_source", "worker_model"]


class ShardedSource:
    """A correlation source that any worker can open on a range of its batches.

    `n_batches` batches in order; `batches(b0, b1)` yields batches b0..b1-1 as `(mask, acts)`
    exactly as the whole source would (the same tokens in the same batches), so global batch
    indices, and the baselines' per-batch random streams, match a single-process run. Must be
    picklable: it travels to the workers (paths and settings, not data).

    Attributes:
        n_batches: batches of the whole source.
    """

    n_batches: int

    def batches(self, b0: int, b1: int) -> Iterable:
        """Batches `b0..b1-1`: `(mask: Bool[Tensor, "token"], acts: list[Float[Tensor, "token neuron"]])`."""
        raise NotImplementedError

    def __iter__(self):  # the whole source, in process
        return iter(self.batches(0, self.n_batches))

    def __len__(self) -> int:
        return self.n_batches


def shard_ranges(n: int, n_shards: int) -> list[tuple[int, int]]:
    """`n` items in `n_shards` contiguous, near-equal ranges `[(start, stop), ...]` (no empty ones)."""
    n_shards = max(1, min(int(n_shards), int(n)))
    edges = np.linspace(0, n, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def row_shards(token_set: TokenSet, batch_rows: int, n_shards: int) -> list[tuple[int, int]]:
    """Row ranges `[(r0, r1), ...]` on whole forward batches, so every shard runs the batches one process would."""
    n_batches = -(-token_set.n_rows // batch_rows)
    return [(b0 * batch_rows, min(b1 * batch_rows, token_set.n_rows)) for b0, b1 in shard_ranges(n_batches, n_shards)]


# ----------------------------------------------------------------------------- stores


class _StoreWindow(AlignedSource):
    """`AlignedSource` restricted to batches [b0, b1): reads only that token window."""

    def __init__(self, paths, batch_tokens, kind, dtype, b0, b1, device=None):
        super().__init__(paths, batch_tokens, kind=kind, dtype=dtype, device=device)
        if self.batch_tokens != batch_tokens:
            raise IncompatibleInputsError(f"the stores' chunks changed: batches are now {self.batch_tokens} tokens, "
                                          f"not {batch_tokens}; re-plan the shards")
        self.t0, self.t1 = b0 * batch_tokens, min(b1 * batch_tokens, self.n_tokens)


@dataclass(frozen=True)
class _StoreShards(ShardedSource):
    paths: tuple[str, ...]
    batch_tokens: int   # already aligned to the stores' chunks (what iter_aligned chose)
    n_batches: int
    kind: str = "post"
    dtype: torch.dtype = torch.float32

    def batches(self, b0, b1):
        return _StoreWindow(list(self.paths), self.batch_tokens, self.kind, self.dtype, b0, b1)


def store_shards(stores: Sequence, batch_tokens: int, *, kind: str = "post",
                 dtype: torch.dtype = torch.float32) -> ShardedSource:
    """The stores of one token set as a sharded source with the batches
    `iter_aligned(stores, batch_tokens, kind)` would give.

    An `AlignedSource` passed to `correlate_distributed` is converted with this.

    Args:
        stores: `ActivationStore`s or paths every worker can read (a shared filesystem).
        batch_tokens: tokens per batch (aligned to the stores' chunks, as `iter_aligned` does).
        kind: 'post' or 'pre' activations.
        dtype: what the batches are read as.

    Returns:
        The `ShardedSource`; checked on the driver now (token sets, hooks).
    """
    src = AlignedSource([s.path if isinstance(s, ActivationStore) else s for s in stores], batch_tokens,
                        kind=kind, dtype=dtype)
    paths = tuple(str(Path(s.path).resolve()) for s in src.stores)
    return _StoreShards(paths, src.batch_tokens, len(src), kind, dtype)


# ----------------------------------------------------------------------------- live models


@dataclass(frozen=True)
class ModelSpec:
    """A model as a worker loads it (picklable: a name or a path, not the weights)."""

    spec: str
    checkpoint: int | None
    process_weights: bool
    dtype: str

    @classmethod
    def from_provenance(cls, provenance: dict[str, Any]) -> ModelSpec:
        """The model a `LoadedModel.provenance` names, as `load_from_provenance` reloads it: a local
        model from its (checkpoint) directory, a hub model from its repository at its checkpoint,
        with the recorded weight processing and dtype."""
        local = provenance.get("source") == "local"
        return cls(str(provenance["resolved"]), None if local else provenance.get("checkpoint"),
                   bool((provenance.get("weight_processing") or {}).get("fold_ln", True)),
                   str(provenance.get("dtype") or "float32"))


_WORKER_MODELS: dict[tuple, Any] = {}  # per worker process: models stay loaded between tasks


def worker_model(m: ModelSpec, device: str | None = None):
    """The `LoadedModel` of `m` on `device`, loaded once per process and kept for later tasks."""
    key = (m, device)
    if key not in _WORKER_MODELS:
        if len(_WORKER_MODELS) > 8:  # another family: let the old one go
            _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = load_model(m.spec, checkpoint=m.checkpoint, device=device, dtype=m.dtype,
                                         process_weights=m.process_weights)
    return _WORKER_MODELS[key]


@dataclass(frozen=True)
class _LiveShards(ShardedSource):
    models: tuple[ModelSpec, ...]
    token_set: TokenSet   # rows of batches [offset, n_batches)
    batch_rows: int
    n_batches: int
    kind: str = "post"
    device: str | None = None
    offset: int = 0

    def _rows(self, b0, b1):
        n = self.token_set.n_rows
        return min((b0 - self.offset) * self.batch_rows, n), min((b1 - self.offset) * self.batch_rows, n)

    def batches(self, b0, b1):
        lms = [worker_model(m, self.device) for m in self.models]
        return LiveSource(lms, self.token_set.select_rows(*self._rows(b0, b1)), self.batch_rows, kind=self.kind)

    def shard(self, b0, b1) -> _LiveShards:
        """Only the rows of batches [b0, b1): what one task needs to carry."""
        return dataclasses.replace(self, token_set=self.token_set.select_rows(*self._rows(b0, b1)),
                                   n_batches=b1, offset=b0)


def live_shards(models: Sequence[str | os.PathLike], token_set: TokenSet, batch_rows: int, *, kind: str = "post",
                checkpoint: int | None = None, process_weights: bool = True, dtype: str = "float32",
                device: str | None = None) -> ShardedSource:
    """Correlate from live models run on the workers.

    Each worker loads `models` once, on its own device, and runs only its shard's rows.
    Batches are those of `LiveSource(models, token_set, batch_rows)`.

    Args:
        models: hub names, or directories every worker can read.
        token_set: the tokens.
        batch_rows: rows per forward pass (one batch).
        kind: 'post' or 'pre' activations.
        checkpoint, process_weights, dtype: as for `load_model`.
        device: the workers' device (None: their GPU when they have one).

    Returns:
        The `ShardedSource`.

    Raises:
        ConfigError: `batch_rows` is not a positive integer.
    """
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise ConfigError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    specs = tuple(ModelSpec(os.fspath(m), checkpoint, process_weights, dtype) for m in models)
    return _LiveShards(specs, token_set, batch_rows, -(-token_set.n_rows // batch_rows), kind, device)


# ----------------------------------------------------------------------------- in memory


@dataclass(frozen=True)
class _ListShards(ShardedSource):
    items: tuple
    offset: int = 0

    @property
    def n_batches(self) -> int:  # type: ignore[override]
        return self.offset + len(self.items)

    def batches(self, b0, b1):
        return list(self.items[b0 - self.offset:b1 - self.offset])

    def shard(self, b0, b1) -> _ListShards:
        return _ListShards(tuple(self.items[b0 - self.offset:b1 - self.offset]), b0)


def batch_shards(batches: Sequence) -> ShardedSource:
    """In-memory `(mask, acts)` batches as a sharded source: each task is sent only its own
    batches (tests and small data; real runs read stores or run models on the workers)."""
    return _ListShards(tuple(batches))


# ----------------------------------------------------------------------------- another reference


@dataclass(frozen=True)
class _ReorderedShards(ShardedSource):
    source: ShardedSource
    order: tuple[int, ...]

    @property
    def n_batches(self) -> int:  # type: ignore[override]
        return self.source.n_batches

    def batches(self, b0, b1):
        for mask, acts in self.source.batches(b0, b1):
            yield mask, [acts[i] for i in self.order]

    def shard(self, b0, b1) -> _ReorderedShards:
        return _ReorderedShards(task_source(self.source, b0, b1), self.order)


def reordered(source: ShardedSource, order: Sequence[int]) -> ShardedSource:
    """`source` with its models in another order, e.g. another model first as the reference.

    Args:
        source: a `ShardedSource`.
        order: model indices, the new reference first.

    Returns:
        The `ShardedSource` whose batches hold `[acts[i] for i in order]`.
    """
    if isinstance(source, _StoreShards):  # stores: only the paths change places
        return dataclasses.replace(source, paths=tuple(source.paths[i] for i in order))
    return _ReorderedShards(source, tuple(order))


def as_sharded(source) -> ShardedSource:
    """Any source `correlate_distributed` accepts, as a `ShardedSource`.

    Raises:
        InputError: a `LiveSource` (its models cannot travel) or a source of an unknown kind.
    """
    if isinstance(source, ShardedSource):
        return source
    if isinstance(source, AlignedSource):
        return store_shards([s.path for s in source.stores], source.batch_tokens, kind=source.kind,
                            dtype=source.dtype)
    if isinstance(source, LiveSource):
        raise InputError("a LiveSource holds models loaded in this process, which cannot travel to the "
                         "workers; describe them with live_shards(model names, token_set, batch_rows)")
    if isinstance(source, (list, tuple)):
        return batch_shards(source)
    raise InputError(f"cannot shard a {type(source).__name__}; pass store_shards(...), live_shards(...), "
                     "batch_shards(list), an AlignedSource from iter_aligned, or a ShardedSource subclass")


def task_source(src: ShardedSource, b0: int, b1: int) -> ShardedSource:
    """What one task carries: only its rows/batches when the source holds data."""
    shard = getattr(src, "shard", None)
    return shard(b0, b1) if shard is not None else src
