"""The caching stage on a cluster: one task per row shard writes its own activation store; the
driver stitches them into one store of HDF5 virtual datasets."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from universal_neurons.activations import ActivationStore, StoreConfig, TokenSet, cache_activations
from universal_neurons.activations.store import STORE_KIND
from universal_neurons.artifacts import atomic_path, refuse_existing
from universal_neurons.errors import IncompatibleInputsError
from universal_neurons.runtime import SCHEMA_VERSION, provenance_base, to_json

from .cluster import new_run, submit, using_cluster, worker_count
from .shards import ModelSpec, row_shards, worker_model

__all__ = ["cache_distributed", "stitch_stores"]

log = logging.getLogger(__name__)

_DEFAULT_BATCH_ROWS = 32  # shard edges fall on whole forward batches of this many rows


def _cache_task(m: ModelSpec, ts: TokenSet, path: str, config: StoreConfig, batch_rows, device,
                overwrite: bool) -> str:
    p = Path(path)
    lm = worker_model(m, device)
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
                      batch_rows: int | None = None, n_shards: int | None = None, overwrite: bool = False) -> Path:
    """`cache_activations` split over token-row shards.

    Each worker loads `model` once and writes its own store `<path>.shards/shard-SSSS-of-NNNN.h5`;
    the driver stitches them into `path`, a store of HDF5 virtual datasets that every reader
    opens as one (the shard files must stay).

    Args:
        model: hub name or model directory every worker can read.
        token_set, config, batch_rows, overwrite: as for `cache_activations`. A killed shard resumes
            from its last batch; finished shards are reused.
        cluster: see `connect`; None caches in process (`cache_activations`, no shards).
        checkpoint, process_weights, dtype: as for `load_model`.
        device: the workers' device (None: their GPU when they have one).
        n_shards: default 2 per worker.

    Returns:
        The path of the (stitched) store.

    Raises:
        OutputExistsError: `path` exists and not `overwrite` (before any work).
    """
    path = Path(path)
    m = ModelSpec(os.fspath(model), checkpoint, process_weights, dtype)
    if cluster is None:
        return cache_activations(worker_model(m, device), token_set, path, config=config, batch_rows=batch_rows,
                                 overwrite=overwrite)
    refuse_existing(path, overwrite=overwrite)
    shard_dir = path.with_name(path.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    with using_cluster(cluster) as client:
        n_workers = worker_count(client)
        batch_rows = batch_rows or _DEFAULT_BATCH_ROWS
        shards = row_shards(token_set, batch_rows, n_shards or 2 * n_workers)
        names = [str(shard_dir / f"shard-{s:04d}-of-{len(shards):04d}.h5") for s in range(len(shards))]
        run = new_run()
        futures = [submit(client, "cache", run, s, _cache_task, m, token_set.select_rows(r0, r1), name, config,
                          batch_rows, device, overwrite)
                   for s, ((r0, r1), name) in enumerate(zip(shards, names))]
        log.info("cache %s on %d worker(s): %d shard(s) of ~%d rows", m.spec, n_workers, len(shards),
                 shards[0][1] - shards[0][0])
        try:
            written = client.gather(futures)
        finally:
            client.cancel(futures)
    return stitch_stores(written, token_set, path, overwrite=overwrite)


def _identity(store: ActivationStore) -> tuple:
    """What every shard of one cache run shares: model, weights, dtype, StoreConfig, hooks, row length."""
    m = store.model
    return (m.get("resolved"), m.get("checkpoint"), to_json(m.get("weight_processing")), m.get("dtype"),
            store.config, tuple(store.hooks), store.ctx_len)


def _shard_rows(shards: Sequence[str | os.PathLike], token_set: TokenSet) -> list[tuple[int, int]]:
    """The row range `(r0, r1)` of every shard in `token_set`, after checking that the shards are
    its rows, in order, all of one model and StoreConfig."""
    opened = [ActivationStore.open(p) for p in shards]
    try:
        first = opened[0]
        rows, r = [], 0
        for s in opened:
            if _identity(s) != _identity(first):
                raise IncompatibleInputsError(f"{s.path} holds another model or StoreConfig than {first.path}; "
                                              "stitch only the shards of one cache run")
            n_rows = s.n_tokens // s.ctx_len
            rows.append((r, r + n_rows))
            r += n_rows
        if r != token_set.n_rows or first.ctx_len != token_set.ctx_len:
            raise IncompatibleInputsError(f"the shards hold {r} rows of {first.ctx_len} but the token set has "
                                          f"{token_set.n_rows} of {token_set.ctx_len}; pass every shard, in order")
        for s, (r0, r1) in zip(opened, rows):
            if not (np.array_equal(s.token_ids, token_set.ids[r0:r1].reshape(-1))
                    and np.array_equal(s.mask, token_set.mask[r0:r1].reshape(-1))):
                raise IncompatibleInputsError(f"{s.path} does not hold rows {r0}..{r1 - 1} of this token set; pass "
                                              "the shards in row order")
        return rows
    finally:
        for s in opened:
            s.close()


def stitch_stores(shards: Sequence[str | os.PathLike], token_set: TokenSet, path: str | os.PathLike, *,
                  overwrite: bool = False) -> Path:
    """One activation store at `path` made of HDF5 virtual datasets over `shards`.

    Every dataset (`blocks.*`, `token_ids`, `mask`, `doc_index`) and attribute is that of a store
    written by `cache_activations` for the whole token set (`complete_rows == n_rows`, the full
    set's hash), so `ActivationStore.open` and `iter_aligned` read it unchanged. Shard paths are
    stored relative to `path`: move the directory as a whole.

    Args:
        shards: finished stores of consecutive row ranges of `token_set`, in order, all of one
            model and StoreConfig.
        token_set: the whole token set.
        path: the stitched store.
        overwrite: replace an existing `path`.

    Returns:
        `path`.

    Raises:
        OutputExistsError: `path` exists and not `overwrite` (before any work).
        IncompatibleInputsError: shards of other runs, other rows, or not every row.
    """
    import h5py

    path = Path(path)
    refuse_existing(path, overwrite=overwrite)
    rows = _shard_rows(shards, token_set)
    ctx, n = token_set.ctx_len, token_set.n_tokens
    rel = [os.path.relpath(Path(p).resolve(), path.resolve().parent) for p in shards]
    with atomic_path(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f, h5py.File(shards[0], "r") as f0:
        hooks = [k for k in f0 if k.startswith("blocks.")]
        for name in hooks + ["token_ids", "mask", "doc_index"]:
            src0 = f0[name]
            shape = (n,) + src0.shape[1:]
            layout = h5py.VirtualLayout(shape=shape, dtype=src0.dtype)
            for rel_path, (r0, r1) in zip(rel, rows):
                layout[r0 * ctx:r1 * ctx] = h5py.VirtualSource(rel_path, name, shape=((r1 - r0) * ctx,) + shape[1:])
            ds = f.create_virtual_dataset(name, layout)
            ds.attrs.update(dict(src0.attrs.items()) if name.startswith("blocks.") else {})
            for i, lab in enumerate(["token", "neuron"][:len(shape)]):
                ds.dims[i].label = lab
            if src0.chunks is not None:  # a virtual dataset has no chunks; readers align to its shards'
                ds.attrs["chunk_tokens"] = int(src0.chunks[0])
        f.attrs.update({k: f0.attrs[k] for k in f0.attrs.keys()})
        f.attrs.update(token_set.attrs())
        prov = {**provenance_base(STORE_KIND), "stitched_from": rel, "shard_rows": rows}
        f.attrs.update({"kind": STORE_KIND, "schema_version": SCHEMA_VERSION, "provenance": to_json(prov),
                        "n_rows": token_set.n_rows, "n_tokens": n, "ctx_len": ctx, "complete_rows": token_set.n_rows})
    return path
