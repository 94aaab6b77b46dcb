"""Scale-out: the correlation and caching stages on a Dask cluster (docs/distributed.md).

Work is split by *token shards*: contiguous runs of whole batches (or rows), each a task.

    correlate_distributed   task (shard s, reference block p) -> CorrelationPartial on the worker's device;
                            the driver merges shard partials of block p in shard order (the same Chan merge
                            as one process, `merge_partials`) and `finalize`s each block
    cache_distributed       task (shard s) -> its own activation store of rows [r0, r1);
                            the driver stitches them into one store of HDF5 virtual datasets
    moments_distributed     task (shard s) -> a StreamingMoments per (layer, kind) of rows [r0, r1);
                            the driver merges them in shard order (`StreamingMoments.merge`)
    ablation_distributed    task (shard s) -> per-row sums of every ablated set on rows [r0, r1); the
                            driver draws the sets and means once, concatenates rows in shard order and
                            builds the study's runs, summary and bootstrap as one process does

Every task is keyed by its shard (and block), so a worker killed mid-task is simply re-run by
the scheduler (`distributed.scheduler.allowed-failures`, default 3) and every partial is merged
exactly once, in a fixed order: the result does not depend on which worker ran what.

    with using_cluster("local:2") as client:                     # or "tcp://host:8786", or None
        res = correlate_distributed(store_shards(paths, batch_tokens=8192), layouts, cfg, cluster=client)

`cluster` is `"local:N"` (a LocalCluster of N single-threaded processes), a scheduler address
(`"tcp://host:port"`), `"scheduler-file:<path>"` (dask-jobqueue, dask-mpi, dask-cuda), a
`distributed.Client`, or None: in-process, exactly as `correlate` / `cache_activations`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from universal_neurons.activations import ActivationStore, AlignedSource, LiveSource, StoreConfig, TokenSet, cache_activations, load_model
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import SCHEMA_VERSION, provenance_base, set_progress, to_json

from .correlation import (
    CorrelationConfig,
    CorrelationPartial,
    CorrelationResult,
    ModelLayout,
    accumulate,
    correlate,
    finalize,
    merge_partials,
    reference_blocks,
)

__all__ = [
    "connect",
    "using_cluster",
    "ShardedSource",
    "store_shards",
    "live_shards",
    "batch_shards",
    "shard_ranges",
    "correlate_distributed",
    "cache_distributed",
    "stitch_stores",
    "moments_distributed",
    "ablation_distributed",
]

log = logging.getLogger("universal_neurons")

_STORE_KIND = "activation_store"  # what activations/store.py writes in attrs["kind"]


# ----------------------------------------------------------------------------- the cluster


def _dask():
    try:
        import distributed
    except ImportError:
        raise UniversalNeuronsError("running on a cluster needs Dask: pip install 'universal-neurons[cluster]' "
                                    "(dask[distributed]; add dask-jobqueue for SLURM/PBS, dask-cuda for GPUs)") from None
    return distributed


def connect(spec):
    """A `distributed.Client` for `spec`, or None for in-process runs.

    **Arguments:** `spec`: None / `""` (in-process); `"local:N"`: a LocalCluster of N worker
    processes with one thread each on this machine (closed with the client); `"tcp://host:port"`
    (or `tls://`, `ucx://`): an existing scheduler; `"scheduler-file:<path>"`: the scheduler that
    wrote `<path>` (dask-jobqueue, dask-mpi); a `Client`: returned as is.

    **Returns:** a `Client` the caller closes, or None.
    """
    if spec is None or spec == "" or spec == "none":
        return None
    distributed = _dask()
    if isinstance(spec, distributed.Client):
        return spec
    if not isinstance(spec, str):
        raise UniversalNeuronsError(f"cluster={spec!r} is not understood; use 'local:N', 'tcp://host:port', "
                                    "'scheduler-file:<path>', a distributed.Client, or None")
    if spec.startswith("local:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UniversalNeuronsError(f"cluster={spec!r}: N in 'local:N' must be a positive number of worker processes")
        # one thread per worker: torch in each process then uses one core (the nanny sets OMP_NUM_THREADS=1)
        return distributed.Client(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    if spec.startswith("scheduler-file:"):
        path = spec.split(":", 1)[1]
        if not os.path.exists(path):
            raise UniversalNeuronsError(f"no scheduler file at {path}; start the scheduler first (dask-scheduler "
                                        "--scheduler-file PATH, or a dask-jobqueue cluster)")
        return distributed.Client(scheduler_file=path)
    if "://" in spec:
        try:
            return distributed.Client(spec, timeout="30s")
        except OSError as e:
            raise UniversalNeuronsError(f"no Dask scheduler answers at {spec} ({e}); start one (`dask scheduler`) "
                                        "and its workers, or use 'local:N'") from e
    raise UniversalNeuronsError(f"cluster={spec!r} is not understood; use 'local:N', 'tcp://host:port' or "
                                "'scheduler-file:<path>'")


@contextlib.contextmanager
def using_cluster(spec) -> Iterator[Any]:
    """`connect(spec)` as a context manager: yields the Client (or None) and closes what it opened."""
    client = connect(spec)
    owned = client is not None and client is not spec
    try:
        yield client
    finally:
        if owned:
            client.close()


# ----------------------------------------------------------------------------- sharded sources


class ShardedSource:
    """A correlation source that any worker can open on a range of its batches.

    `n_batches` batches in order; `batches(b0, b1)` yields batches b0..b1-1 as `(mask, acts)`
    exactly as the whole source would (the same tokens in the same batches), so global batch
    indices, and the baselines' per-batch random streams, match a single-process run. Must be
    picklable: it travels to the workers (paths and settings, not data).
    """

    n_batches: int

    def batches(self, b0: int, b1: int) -> Iterable:
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


class _StoreWindow(AlignedSource):
    """`AlignedSource` restricted to batches [b0, b1): reads only that token window."""

    def __init__(self, paths, batch_tokens, kind, dtype, b0, b1, device=None):
        super().__init__(paths, batch_tokens, kind=kind, dtype=dtype, device=device)
        if self.batch_tokens != batch_tokens:
            raise UniversalNeuronsError(f"the stores' chunks changed: batches are now {self.batch_tokens} tokens, "
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
    """The stores of one token set (paths every worker can read: a shared filesystem), as a
    sharded source with the batches `iter_aligned(stores, batch_tokens, kind)` would give.

    An `AlignedSource` passed to `correlate_distributed` is converted with this.
    """
    src = AlignedSource([s.path if isinstance(s, ActivationStore) else s for s in stores], batch_tokens,
                        kind=kind, dtype=dtype)  # checks token sets and hooks now, on the driver
    paths = tuple(str(Path(s.path).resolve()) for s in src.stores)
    return _StoreShards(paths, src.batch_tokens, len(src), kind, dtype)


@dataclass(frozen=True)
class _ModelSpec:
    spec: str
    checkpoint: int | None
    process_weights: bool
    dtype: str


_WORKER_MODELS: dict[tuple, Any] = {}  # per worker process: models stay loaded between tasks


def _worker_model(m: _ModelSpec, device=None):
    key = (m, device)
    if key not in _WORKER_MODELS:
        if len(_WORKER_MODELS) > 8:  # another family: let the old one go
            _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = load_model(m.spec, checkpoint=m.checkpoint, device=device, dtype=m.dtype,
                                         process_weights=m.process_weights)
    return _WORKER_MODELS[key]


@dataclass(frozen=True)
class _LiveShards(ShardedSource):
    models: tuple[_ModelSpec, ...]
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
        lms = [_worker_model(m, self.device) for m in self.models]
        return LiveSource(lms, self.token_set.select_rows(*self._rows(b0, b1)), self.batch_rows, kind=self.kind)

    def shard(self, b0, b1) -> "_LiveShards":
        """Only the rows of batches [b0, b1): what one task needs to carry."""
        return dataclasses.replace(self, token_set=self.token_set.select_rows(*self._rows(b0, b1)),
                                   n_batches=b1, offset=b0)


def live_shards(models: Sequence[str | os.PathLike], token_set: TokenSet, batch_rows: int, *, kind: str = "post",
                checkpoint: int | None = None, process_weights: bool = True, dtype: str = "float32",
                device: str | None = None) -> ShardedSource:
    """Correlate from live models: each worker loads `models` (hub names, or directories every
    worker can read) once, on its own device (`device=None`: its GPU when it has one), and runs
    only its shard's rows. Batches are those of `LiveSource(models, token_set, batch_rows)`.
    """
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise UniversalNeuronsError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    specs = tuple(_ModelSpec(os.fspath(m), checkpoint, process_weights, dtype) for m in models)
    return _LiveShards(specs, token_set, batch_rows, -(-token_set.n_rows // batch_rows), kind, device)


@dataclass(frozen=True)
class _ListShards(ShardedSource):
    items: tuple
    offset: int = 0

    @property
    def n_batches(self) -> int:
        return self.offset + len(self.items)

    def batches(self, b0, b1):
        return list(self.items[b0 - self.offset:b1 - self.offset])

    def shard(self, b0, b1) -> "_ListShards":
        return _ListShards(tuple(self.items[b0 - self.offset:b1 - self.offset]), b0)


def batch_shards(batches: Sequence) -> ShardedSource:
    """In-memory `(mask, acts)` batches as a sharded source: each task is sent only its own
    batches (tests and small data; real runs read stores or run models on the workers)."""
    return _ListShards(tuple(batches))


def _as_sharded(source) -> ShardedSource:
    if isinstance(source, ShardedSource):
        return source
    if isinstance(source, AlignedSource):
        return store_shards([s.path for s in source.stores], source.batch_tokens, kind=source.kind,
                            dtype=source.dtype)
    if isinstance(source, LiveSource):
        raise UniversalNeuronsError("a LiveSource holds models loaded in this process, which cannot travel to the "
                                    "workers; describe them with live_shards(model names, token_set, batch_rows)")
    if isinstance(source, (list, tuple)):
        return batch_shards(source)
    raise UniversalNeuronsError(f"cannot shard a {type(source).__name__}; pass store_shards(...), live_shards(...), "
                                "batch_shards(list), an AlignedSource from iter_aligned, or a ShardedSource subclass")


def _task_source(src: ShardedSource, b0: int, b1: int) -> ShardedSource:
    """What one task carries: only its rows/batches when the source holds data."""
    return src.shard(b0, b1) if hasattr(src, "shard") else src


# ----------------------------------------------------------------------------- correlation


def _correlate_task(src: ShardedSource, b0: int, b1: int, layouts, config, block_index: int, shard: int,
                    hook: Callable | None) -> CorrelationPartial:
    set_progress(False)  # worker logs are no place for progress bars
    if hook is not None:
        hook(shard, block_index)
    acc = accumulate(src.batches(b0, b1), layouts, config, block_index=block_index, first_batch=b0)
    return acc.to("cpu")


def correlate_distributed(source, layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None, *,
                          cluster=None, n_shards: int | None = None, provenance: dict[str, Any] | None = None,
                          full_matrix_path: str | os.PathLike | None = None, overwrite: bool = False,
                          driver_device: str = "cpu", _task_hook: Callable | None = None) -> CorrelationResult:
    """`correlate` split over token shards (and reference blocks) on a Dask cluster.

    **Arguments:**
    - `source`: `store_shards(...)`, `live_shards(...)`, `batch_shards(list)`, an `AlignedSource`
      from `iter_aligned`, or any `ShardedSource`.
    - `layouts`, `config`, `provenance`, `full_matrix_path`, `overwrite`: as for `correlate`.
      `config.memory_budget` is per task (one shard's accumulators); above it the reference
      neurons are split into blocks and every (shard, block) is a task.
    - `cluster`: see `connect`; None runs `correlate` in process over the whole source.
    - `n_shards`: token shards (default 2 per worker; more balances load and shortens retries,
      but every shard returns one block of float64 co-moments to merge).
    - `driver_device`: where the driver merges and finalises (default CPU).

    **Returns:** `CorrelationResult`, equal to the single-process result up to floating-point
    merge order (partners and the universality table identical but for exact ties).
    """
    config = config or CorrelationConfig()
    src = _as_sharded(source)
    if cluster is None:
        return correlate(src, layouts, config, provenance=provenance, full_matrix_path=full_matrix_path,
                         overwrite=overwrite)
    blocks = reference_blocks(layouts, config)  # also checks the layouts, before any task starts
    with using_cluster(cluster) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        shards = shard_ranges(src.n_batches, n_shards or 2 * n_workers)
        run = uuid.uuid4().hex[:8]
        futures: dict[tuple[int, int], Any] = {}
        for p in range(len(blocks)):  # block-major: block 0's shards are scheduled first
            for s, (b0, b1) in enumerate(shards):
                futures[p, s] = client.submit(_correlate_task, _task_source(src, b0, b1), b0, b1, tuple(layouts),
                                              config, p, s, _task_hook, key=f"correlate-{run}-block{p}-shard{s}",
                                              pure=False)
        log.info("correlate on %d worker(s): %d token shard(s) x %d reference block(s) = %d tasks",
                 n_workers, len(shards), len(blocks), len(futures))
        merged_keys: set[str] = set()

        def merged_blocks():
            for p in range(len(blocks)):
                acc = None
                for s in range(len(shards)):  # fixed order: deterministic whatever finishes first
                    fut = futures.pop((p, s))
                    if fut.key in merged_keys:  # cannot happen: each key is popped once
                        raise UniversalNeuronsError(f"shard partial {fut.key} was about to be merged twice")
                    part = fut.result()
                    merged_keys.add(fut.key)
                    fut.release()
                    acc = part if acc is None else merge_partials(acc, part)
                yield acc

        try:
            return finalize(merged_blocks(), layouts, config, provenance=provenance,
                            full_matrix_path=full_matrix_path, overwrite=overwrite, device=driver_device,
                            extra_provenance={"distributed": {"workers": n_workers, "shards": shards,
                                                              "tasks": len(shards) * len(blocks)}})
        finally:
            if futures:
                client.cancel(list(futures.values()))


# ----------------------------------------------------------------------------- caching


def _cache_task(m: _ModelSpec, ts: TokenSet, path: str, config: StoreConfig, batch_rows, device, overwrite: bool,
                shard: int, hook: Callable | None) -> str:
    set_progress(False)
    if hook is not None:
        hook(shard, 0)
    p = Path(path)
    lm = _worker_model(m, device)
    if p.exists() and not overwrite:  # finished by an earlier attempt or run: keep it if it is this shard
        with ActivationStore.open(p) as s:
            if (s.token_set_hash == ts.hash and s.config == config
                    and [s.model.get(k) for k in ("resolved", "checkpoint")]
                    == [lm.provenance.get(k) for k in ("resolved", "checkpoint")]):
                return path
    cache_activations(lm, ts, p, config=config, batch_rows=batch_rows, overwrite=overwrite)
    return path


def cache_distributed(model: str | os.PathLike, token_set: TokenSet, path: str | os.PathLike, *, cluster=None,
                      config: StoreConfig = StoreConfig(), checkpoint: int | None = None,
                      process_weights: bool = True, dtype: str = "float32", device: str | None = None,
                      batch_rows: int | None = None, n_shards: int | None = None, overwrite: bool = False,
                      _task_hook: Callable | None = None) -> Path:
    """`cache_activations` split over token-row shards: each worker loads `model` once and writes
    its own store `<path>.shards/shard-SSSS-of-NNNN.h5`; the driver stitches them into `path`, a
    store of HDF5 virtual datasets that every reader opens as one (the shard files must stay).

    **Arguments:**
    - `model`: hub name or model directory every worker can read; `checkpoint`,
      `process_weights`, `dtype` as for `load_model`; `device`: the workers' (None: their GPU).
    - `token_set`, `config`, `batch_rows`, `overwrite`: as for `cache_activations`. A killed
      shard resumes from its last batch; finished shards are reused.
    - `cluster`: see `connect`; None caches in process (`cache_activations`, no shards).
    - `n_shards`: default 2 per worker.

    **Returns:** the path of the (stitched) store.
    """
    path = Path(path)
    m = _ModelSpec(os.fspath(model), checkpoint, process_weights, dtype)
    if cluster is None:
        return cache_activations(_worker_model(m, device), token_set, path, config=config, batch_rows=batch_rows,
                                 overwrite=overwrite)
    if path.exists() and not overwrite:
        raise UniversalNeuronsError(f"{path} already exists; open it with ActivationStore.open, or pass "
                                    "overwrite=True to replace it")
    shard_dir = path.with_name(path.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    with using_cluster(cluster) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        if batch_rows is None:  # shard edges on whole forward batches, so every shard runs full batches
            batch_rows = 32
        n_batches = -(-token_set.n_rows // batch_rows)
        shards = [(b0 * batch_rows, min(b1 * batch_rows, token_set.n_rows))
                  for b0, b1 in shard_ranges(n_batches, n_shards or 2 * n_workers)]
        names = [str(shard_dir / f"shard-{s:04d}-of-{len(shards):04d}.h5") for s in range(len(shards))]
        run = uuid.uuid4().hex[:8]
        futures = [client.submit(_cache_task, m, token_set.select_rows(r0, r1), name, config, batch_rows, device,
                                 overwrite, s, _task_hook, key=f"cache-{run}-shard{s}", pure=False)
                   for s, ((r0, r1), name) in enumerate(zip(shards, names))]
        log.info("cache %s on %d worker(s): %d shard(s) of ~%d rows", m.spec, n_workers, len(shards),
                 shards[0][1] - shards[0][0])
        try:
            written = client.gather(futures)
        finally:
            client.cancel(futures)
    return stitch_stores(written, token_set, path, overwrite=overwrite)


def stitch_stores(shards: Sequence[str | os.PathLike], token_set: TokenSet, path: str | os.PathLike, *,
                  overwrite: bool = False) -> Path:
    """One activation store at `path` made of HDF5 virtual datasets over `shards`, finished
    stores of consecutive row ranges of `token_set` (in order), all of one model and StoreConfig.

    Every dataset (`blocks.*`, `token_ids`, `mask`, `doc_index`) and attribute is that of a store
    written by `cache_activations` for the whole token set (`complete_rows == n_rows`, the full
    set's hash), so `ActivationStore.open` and `iter_aligned` read it unchanged. Shard paths are
    stored relative to `path`: move the directory as a whole.

    **Returns:** `path`.
    """
    import h5py

    path = Path(path)
    if path.exists() and not overwrite:
        raise UniversalNeuronsError(f"{path} already exists; pass overwrite=True to replace it")
    opened = [ActivationStore.open(p) for p in shards]
    try:
        first = opened[0]
        rows, r = [], 0
        for s in opened:
            n_rows = s.n_tokens // s.ctx_len
            ident = lambda st: (st.model.get("resolved"), st.model.get("checkpoint"),  # noqa: E731
                                to_json(st.model.get("weight_processing")), st.model.get("dtype"))
            if s.config != first.config or ident(s) != ident(first) or s.hooks != first.hooks or s.ctx_len != first.ctx_len:
                raise UniversalNeuronsError(f"{s.path} holds another model or StoreConfig than {first.path}; "
                                            "stitch only the shards of one cache run")
            rows.append((r, r + n_rows))
            r += n_rows
        if r != token_set.n_rows or first.ctx_len != token_set.ctx_len:
            raise UniversalNeuronsError(f"the shards hold {r} rows of {first.ctx_len} but the token set has "
                                        f"{token_set.n_rows} of {token_set.ctx_len}; pass every shard, in order")
        for s, (r0, r1) in zip(opened, rows):
            if not (np.array_equal(s.token_ids, token_set.ids[r0:r1].reshape(-1))
                    and np.array_equal(s.mask, token_set.mask[r0:r1].reshape(-1))):
                raise UniversalNeuronsError(f"{s.path} does not hold rows {r0}..{r1 - 1} of this token set; pass "
                                            "the shards in row order")
        ctx, n = token_set.ctx_len, token_set.n_tokens
        tmp = path.with_name(path.name + ".partial")
        with h5py.File(tmp, "w") as f:
            for name in first.hooks + ["token_ids", "mask", "doc_index"]:
                src0 = first._f[name]
                shape = (n,) + src0.shape[1:]
                layout = h5py.VirtualLayout(shape=shape, dtype=src0.dtype)
                for s, (r0, r1) in zip(opened, rows):
                    rel = os.path.relpath(Path(s.path).resolve(), path.resolve().parent)
                    layout[r0 * ctx:r1 * ctx] = h5py.VirtualSource(rel, name, shape=s._f[name].shape)
                ds = f.create_virtual_dataset(name, layout)
                ds.attrs.update(dict(src0.attrs.items()) if name.startswith("blocks.") else {})
                labels = ["token", "neuron"][:len(shape)]
                for i, lab in enumerate(labels):
                    ds.dims[i].label = lab
                if src0.chunks is not None:  # a virtual dataset has no chunks; readers align to its shards'
                    ds.attrs["chunk_tokens"] = int(src0.chunks[0])
            a = first._f.attrs
            f.attrs.update({k: a[k] for k in a.keys()})
            f.attrs.update(token_set.attrs())
            prov = {**provenance_base(_STORE_KIND), "stitched_from": [os.path.relpath(Path(s.path).resolve(),
                                                                                   path.resolve().parent)
                                                                   for s in opened],
                    "shard_rows": rows}
            f.attrs.update({"kind": _STORE_KIND, "schema_version": SCHEMA_VERSION, "provenance": to_json(prov),
                            "n_rows": token_set.n_rows, "n_tokens": n, "ctx_len": ctx,
                            "complete_rows": token_set.n_rows})
        os.replace(tmp, path)
    finally:
        for s in opened:
            s.close()
    return path


# ----------------------------------------------------------------------------- properties and ablation


def _row_shards(token_set: TokenSet, batch_rows: int, n_shards: int) -> list[tuple[int, int]]:
    """Row ranges on whole forward batches, so every shard runs the batches one process would."""
    n_batches = -(-token_set.n_rows // batch_rows)
    return [(b0 * batch_rows, min(b1 * batch_rows, token_set.n_rows)) for b0, b1 in shard_ranges(n_batches, n_shards)]


def _gather_in_order(client, futures: list) -> Iterator[Any]:
    """Each shard's result once, in shard order (deterministic whatever finishes first); releases as it goes."""
    try:
        for fut in futures:
            part = fut.result()
            fut.release()
            yield part
    finally:
        client.cancel(futures)


def _moments_task(m: _ModelSpec, ts: TokenSet, kinds: tuple[str, ...], batch_rows: int, device, shard: int,
                  hook: Callable | None):
    from .properties import _moments_live

    set_progress(False)
    if hook is not None:
        hook(shard, 0)
    accs, _, _, _ = _moments_live(_worker_model(m, device), ts, kinds, batch_rows, False)
    return accs


def moments_distributed(model: str | os.PathLike, token_set: TokenSet, *, cluster=None, checkpoint: int | None = None,
                        process_weights: bool = True, kinds: Sequence[str] = ("pre", "post"),
                        n_shards: int | None = None, batch_rows: int = 32, dtype: str = "float32",
                        device: str | None = None, _task_hook: Callable | None = None):
    """`activation_moments` of a live model split over token-row shards.

    Each task runs `model` (loaded once per worker, on its own device) over its rows and returns a
    `StreamingMoments` per `(layer, kind)`; the driver merges them in shard order with the exact
    pairwise formulas, so the moments equal one pass over all rows up to float64 merge order.

    **Arguments:**
    - `model`, `checkpoint`, `process_weights`, `dtype`, `device`: as for `cache_distributed`.
    - `token_set`, `kinds`, `batch_rows`: as for `activation_moments`; shards are whole batches.
    - `cluster`: see `connect`; None runs `activation_moments` in process.
    - `n_shards`: default 2 per worker.

    **Returns** the DataFrame `activation_moments` returns (`[layer*d_mlp rows]`), with
    `df.attrs['moments']['distributed']` = `{workers, shards}` (row ranges).
    """
    from .properties import _check_live, _moments_frame, activation_moments

    kinds = tuple(kinds)
    if not kinds or set(kinds) - {"pre", "post"}:
        raise UniversalNeuronsError(f"kinds must name 'pre' and/or 'post', got {kinds!r}")
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise UniversalNeuronsError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    m = _ModelSpec(os.fspath(model), checkpoint, process_weights, dtype)
    if cluster is None:
        return activation_moments(_worker_model(m, device), token_set=token_set, kinds=kinds, batch_rows=batch_rows)
    lm = _worker_model(m, "cpu")  # on the driver: checks the token set fits, and names the model in the result
    _check_live(lm, token_set)
    with using_cluster(cluster) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        shards = _row_shards(token_set, batch_rows, n_shards or 2 * n_workers)
        run = uuid.uuid4().hex[:8]
        futures = [client.submit(_moments_task, m, token_set.select_rows(r0, r1), kinds, batch_rows, device, s,
                                 _task_hook, key=f"moments-{run}-shard{s}", pure=False)
                   for s, (r0, r1) in enumerate(shards)]
        log.info("moments of %s on %d worker(s): %d shard(s)", m.spec, n_workers, len(shards))
        accs = None
        for part in _gather_in_order(client, futures):
            accs = part if accs is None else {k: accs[k].merge(v) for k, v in part.items()}
    info = {"source": "live", "model": lm.provenance, "token_set_hash": token_set.hash,
            "distributed": {"workers": n_workers, "shards": shards}}
    return _moments_frame(accs, list(range(lm.n_layers)), lm.d_mlp, kinds, info)


def _ablation_task(m: _ModelSpec, ts: TokenSet, sets, config, means, batch_rows: int, device, shard: int,
                   hook: Callable | None):
    from .ablation import _evaluate_sets

    set_progress(False)
    if hook is not None:
        hook(shard, 0)
    return _evaluate_sets(_worker_model(m, device), ts, sets, config, means, batch_rows=batch_rows,
                          progress_bar=False, require_counted=False)


def ablation_distributed(model: str | os.PathLike, table_or_neurons, token_set: TokenSet, config=None, *,
                         cluster=None, checkpoint: int | None = None, process_weights: bool = True,
                         n_shards: int | None = None, means: np.ndarray | None = None, dtype: str = "float32",
                         device: str | None = None, _task_hook: Callable | None = None):
    """`ablation_study` split over token-row shards.

    The driver loads `model` once (CPU) to draw the universal and control sets (the config's
    seed) and, for kind='mean', to stream the means over `token_set` unless `means` is given; every
    task then ablates those same sets with those same means on its rows and returns per-row sums.
    Rows are concatenated in shard order and the runs, summary and row bootstrap are those of one
    process, so the result equals `ablation_study` up to forward-pass rounding.

    **Arguments:**
    - `model`, `checkpoint`, `process_weights`, `dtype`, `device`: as for `cache_distributed`.
    - `table_or_neurons`, `token_set`, `config`, `means`: as for `ablation_study`.
    - `cluster`: see `connect`; None runs `ablation_study` in process.
    - `n_shards`: default 2 per worker; shards are whole forward batches.

    **Returns** `AblationResult`; `provenance['distributed']` = `{workers, shards}` (row ranges).
    """
    from .ablation import (AblationConfig, _RowSums, _auto_batch_rows, _check_counted, _check_means, _check_tokens,
                           _provenance, _study_means, _study_result, _study_sets, ablation_study, counted_predictions)

    config = config or AblationConfig()
    m = _ModelSpec(os.fspath(model), checkpoint, process_weights, dtype)
    if cluster is None:
        return ablation_study(_worker_model(m, device), table_or_neurons, token_set, config, means=means)
    lm = _worker_model(m, "cpu")
    _check_tokens(lm, token_set)
    _check_counted(counted_predictions(token_set.mask))
    _, sets, meta = _study_sets(lm, table_or_neurons, config)
    batch_rows = _auto_batch_rows(lm, token_set, config.batch_rows)
    mv, means_source = _study_means(lm, token_set, config, means, batch_rows)
    for s in sets:
        _check_means(mv, s)
    with using_cluster(cluster) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        shards = _row_shards(token_set, batch_rows, n_shards or 2 * n_workers)
        run = uuid.uuid4().hex[:8]
        futures = [client.submit(_ablation_task, m, token_set.select_rows(r0, r1), sets, config, mv,
                                 batch_rows, device, s, _task_hook, key=f"ablation-{run}-shard{s}", pure=False)
                   for s, (r0, r1) in enumerate(shards)]
        log.info("ablating %d sets of %s on %d worker(s): %d shard(s)", len(sets), m.spec, n_workers, len(shards))
        sums = _RowSums.concat(list(_gather_in_order(client, futures)))
    prov = _provenance(lm, token_set, config, means_source)
    prov["distributed"] = {"workers": n_workers, "shards": shards}
    return _study_result(sums, sets, meta, config, prov)
