"""Stage 2, activations: a model and a token set in, one HDF5 activation store out.

One file per (model, checkpoint, token set). Layout:

    /blocks.{l}.mlp.hook_post   (token, neuron)  fp16 (default) or fp32, ~1 MiB chunks
    /blocks.{l}.mlp.hook_pre    (token, neuron)  only when asked for
    /token_ids, /mask, /doc_index  (token,)      copied from the token set
    attrs: kind, schema_version, provenance, model, store_config, token_set_* , complete_rows

`token` is rows * ctx_len flattened in row order. Writes stream batch by batch into
`<path>.partial`, which records `complete_rows` after each flushed batch; a killed run
restarts from there and the file is renamed to `<path>` when complete. Reading is lazy
(`universal_neurons.activations.reader.ActivationStore`), and `iter_aligned` / `LiveSource`
(`universal_neurons.activations.sources`) give the correlation engine the same
`(mask, acts)` stream from stores on disk or from live models.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from universal_neurons.artifacts import check_writable, exists_message
from universal_neurons.config import Config
from universal_neurons.errors import (
    ConfigError,
    DiskSpaceError,
    OutputExistsError,
    StoreWriteError,
    UniversalNeuronsError,
)
from universal_neurons.runtime import SCHEMA_VERSION, from_json, progress, provenance_base, to_json

from .hooks import hook_name, mlp_activations
from .models import LoadedModel
from .tokens import TokenSet

__all__ = [
    "STORE_KIND",
    "check_compatible",
    "check_space",
    "StoreConfig",
    "cache_activations",
    "preflight_cache",
    "store_filename",
    "after_batch",
]

log = logging.getLogger(__name__)

STORE_KIND = "activation_store"  # attrs["kind"] of every store file
_FP16_MAX = 65504.0
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: whole chunks per read, fits h5py's default 1 MiB chunk cache
_BATCH_BYTES = 256 << 20  # default forward batch: ~256 MiB of fp32 activations
# Model provenance fields that must match for a partial store to be resumed.
_MODEL_IDENTITY = ("name", "source", "resolved", "checkpoint", "revision", "weight_processing", "n_layers",
                   "d_model", "d_mlp", "d_vocab", "n_ctx", "act_fn", "dtype")


class _Overflow(UniversalNeuronsError):
    """Activations beyond float16's range (private: callers catch UniversalNeuronsError)."""


@dataclass(frozen=True)
class StoreConfig(Config):
    """What an activation store holds and how it is laid out on disk."""

    kinds: tuple[str, ...] = ("post",)  # 'post' = after the nonlinearity (the paper's neuron); 'pre' for moments
    dtype: str = "float16"  # halves the disk; |x| must stay <= 65504 (checked). 'float32' for exact values
    compression: str | None = None  # None (fastest reads), 'gzip' or 'lzf'
    layers: tuple[int, ...] | None = None  # None = every layer
    checksum: bool = True  # Fletcher-32 per chunk: a corrupted chunk is an error when read, not a wrong number

    def __post_init__(self) -> None:
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        for k in kinds:
            if k not in ("post", "pre"):
                self.fail(f"unknown hook kind {k!r}; use 'post' (after the nonlinearity) or 'pre'")
        if not kinds or len(set(kinds)) != len(kinds):
            self.fail(f"kinds must be a non-empty list without repeats, got {self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        if self.dtype not in ("float16", "float32"):
            self.fail(f"unknown store dtype {self.dtype!r}; use 'float16' or 'float32'")
        if self.compression not in (None, "gzip", "lzf"):
            self.fail(f"unknown compression {self.compression!r}; use None, 'gzip' or 'lzf'")
        if self.layers is not None:
            layers = tuple(sorted({int(layer) for layer in self.layers}))
            if not layers or layers[0] < 0:
                self.fail(f"layers must be non-negative layer indices, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)



def store_filename(provenance: dict[str, Any], token_set: TokenSet) -> str:
    """A file name for the store of this model and token set: `<model>[-ckpt<step>]__<hash12>.h5`."""
    name = str(provenance.get("name", "model")).replace("/", "_")
    ck = provenance.get("checkpoint")
    return f"{name}{'' if ck is None else f'-ckpt{ck}'}__{token_set.hash[:12]}.h5"


# ---------------------------------------------------------------------------- planning


def _prov(lm_or_provenance) -> dict[str, Any]:
    return lm_or_provenance.provenance if isinstance(lm_or_provenance, LoadedModel) else dict(lm_or_provenance)


def check_compatible(prov: dict[str, Any], token_set: TokenSet, tokenizer=None) -> None:
    """Refuse a token set the model cannot run: rows longer than its context, ids beyond its
    vocabulary, or another tokenizer than the one that made the token set."""
    if token_set.ctx_len > int(prov["n_ctx"]):
        raise UniversalNeuronsError(
            f"the token set's rows have ctx_len={token_set.ctx_len} but {prov.get('name')} accepts at most "
            f"n_ctx={prov['n_ctx']} positions; rebuild the token set with TokenSetConfig(ctx_len<={prov['n_ctx']})")
    top = int(token_set.ids.max()) if token_set.ids.size else 0
    if top >= int(prov["d_vocab"]) or int(token_set.ids.min()) < 0:
        raise UniversalNeuronsError(
            f"the token set holds token id {top} but {prov.get('name')} has a vocabulary of {prov['d_vocab']} "
            f"(ids 0..{int(prov['d_vocab']) - 1}); it was built with another tokenizer "
            f"({token_set.tokenizer_info.get('name_or_path')!r}). Rebuild it with this model family's tokenizer")
    if tokenizer is not None:
        from .tokens import tokenizer_info

        mine = tokenizer_info(tokenizer)["fingerprint"]
        if mine != token_set.tokenizer_info.get("fingerprint"):
            log.warning("the token set was built with tokenizer %s (fingerprint %.12s), %s loads one with fingerprint "
                        "%.12s; check they are the same family", token_set.tokenizer_info.get("name_or_path"),
                        token_set.tokenizer_info.get("fingerprint"), prov.get("name"), mine)


def _layers(prov: dict[str, Any], config: StoreConfig) -> list[int]:
    n = int(prov["n_layers"])
    layers = list(range(n)) if config.layers is None else list(config.layers)
    if layers[-1] >= n:
        raise UniversalNeuronsError(f"layer {layers[-1]} does not exist in {prov.get('name')} (layers 0..{n - 1})")
    return layers


def _chunk_tokens(d_mlp: int, itemsize: int, n_tokens: int) -> int:
    """Largest power of two of tokens whose (token, d_mlp) chunk fits ~1 MiB, at most n_tokens."""
    t = 1
    while t * 2 * d_mlp * itemsize <= _CHUNK_BYTES:
        t *= 2
    return max(1, min(t, n_tokens))


def preflight_cache(lm_or_provenance, token_set: TokenSet, config: StoreConfig = StoreConfig(), *,
                    path: str | os.PathLike | None = None) -> dict[str, Any]:
    """What `cache_activations` will write, checked before any forward pass.

    Args:
        lm_or_provenance: a `LoadedModel`, or its `provenance` dict.
        token_set: the rows to cache, `[row, pos]`.
        config: the `StoreConfig` of the planned store.
        path: where the store will go (adds the free disk space there).

    Returns:
        `{n_tokens, n_rows, ctx_len, n_counted, datasets: {hook: {shape, dtype, chunks}},
        bytes, bytes_free, fits}`.

    Raises:
        UniversalNeuronsError: the model cannot run the token set.
    """
    prov = _prov(lm_or_provenance)
    check_compatible(prov, token_set)
    d_mlp, itemsize = int(prov["d_mlp"]), np.dtype(config.dtype).itemsize
    chunk = _chunk_tokens(d_mlp, itemsize, token_set.n_tokens)
    datasets = {hook_name(layer, k): {"shape": (token_set.n_tokens, d_mlp), "dtype": config.dtype,
                                  "chunks": (chunk, d_mlp)}
                for layer in _layers(prov, config) for k in config.kinds}
    nbytes = len(datasets) * token_set.n_tokens * d_mlp * itemsize + token_set.n_tokens * (4 + 1 + 4)
    out: dict[str, Any] = {"n_tokens": token_set.n_tokens, "n_rows": token_set.n_rows, "ctx_len": token_set.ctx_len,
                           "n_counted": token_set.n_counted, "datasets": datasets, "bytes": int(nbytes),
                           "compression": config.compression, "bytes_free": None, "fits": None}
    if path is not None:
        parent = Path(path).resolve().parent
        while not parent.exists():
            parent = parent.parent
        out["bytes_free"] = int(shutil.disk_usage(parent).free)
        out["fits"] = out["bytes_free"] >= nbytes
    return out


def check_space(plan: dict[str, Any], path: str | os.PathLike, config: StoreConfig) -> None:
    """Refuse, before any work, a store that cannot fit in its folder's free space
    (uncompressed stores only: a compressed size is not known in advance).

    Raises:
        DiskSpaceError: naming the bytes needed and free.
    """
    if plan.get("fits") is False and config.compression is None:
        gib = 2**30
        raise DiskSpaceError(
            f"the store at {path} needs {plan['bytes'] / gib:.2f} GiB but only {plan['bytes_free'] / gib:.2f} GiB "
            "are free there; free some space, choose another -o, or cache fewer tokens (--n-tokens when "
            "tokenizing) or layers")


# ---------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """One writer per store: a non-blocking `filelock` on `<path>.lock`; the holder's pid is in
    `<path>.lock.pid` so that a refused writer can say who holds it."""
    from filelock import FileLock, Timeout

    lock_path = path.with_name(path.name + ".lock")
    pid_path = path.with_name(path.name + ".lock.pid")
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = pid_path.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise UniversalNeuronsError(
            f"another process (pid {holder}) is writing {path}; wait for it to finish or stop it. "
            f"If no such process runs, delete {lock_path}") from None
    try:
        pid_path.write_text(str(os.getpid()))
        yield
    finally:
        pid_path.unlink(missing_ok=True)
        lock.release()
        lock_path.unlink(missing_ok=True)


def _identity(prov: dict[str, Any]) -> dict[str, Any]:
    return {k: prov.get(k) for k in _MODEL_IDENTITY}


def _read_head(path: Path) -> dict[str, Any] | None:
    """The identifying attributes of an existing store or partial, or None if unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            return {"kind": a.get("kind"), "token_set_hash": str(a.get("token_set_hash")),
                    "model": from_json(a["model"]) if "model" in a else None,
                    "store_config": from_json(a["store_config"]) if "store_config" in a else None,
                    "complete_rows": int(a.get("complete_rows", 0))}
    except (OSError, KeyError, ValueError):
        return None


def _create(path: Path, lm: LoadedModel, token_set: TokenSet, config: StoreConfig, layers: list[int]) -> None:
    import h5py

    dtype, n, d = np.dtype(config.dtype), token_set.n_tokens, lm.d_mlp
    chunk = _chunk_tokens(d, dtype.itemsize, n)
    with h5py.File(path, "w") as f:
        for layer in layers:
            for k in config.kinds:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                kwargs: dict[str, Any] = {"chunks": (chunk, d), "compression": config.compression}
                if config.compression is None:  # all chunks allocated now: later writes touch no metadata,
                    kwargs.pop("compression")  # so a killed writer leaves a readable file
                    dcpl.set_chunk((chunk, d))
                    if config.checksum:
                        dcpl.set_fletcher32()
                    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                    space = h5py.h5s.create_simple((n, d))
                    dsid = h5py.h5d.create(f.id, hook_name(layer, k).encode(), h5py.h5t.py_create(dtype), space,
                                           dcpl=dcpl)
                    ds = h5py.Dataset(dsid)
                else:
                    ds = f.create_dataset(hook_name(layer, k), shape=(n, d), dtype=dtype, fletcher32=config.checksum,
                                          **kwargs)
                ds.dims[0].label, ds.dims[1].label = "token", "neuron"
                ds.attrs.update({"layer": layer, "kind": k})
        for name, arr in (("token_ids", token_set.ids), ("mask", token_set.mask), ("doc_index", token_set.doc_index)):
            f.create_dataset(name, data=arr.reshape(-1), fletcher32=config.checksum).dims[0].label = "token"
        f.attrs.update(token_set.attrs())
        f.attrs.update({
            "kind": STORE_KIND, "schema_version": SCHEMA_VERSION, "provenance": to_json(provenance_base(STORE_KIND)),
            "model": to_json(lm.provenance), "store_config": to_json(config.to_dict()), "layers": layers,
            "n_layers": len(layers), "d_mlp": d, "ctx_len": token_set.ctx_len, "n_rows": token_set.n_rows,
            "n_tokens": n, "dims": ["token", "neuron"], "complete_rows": 0,
            "checksum": "fletcher32" if config.checksum else "none",
        })


def _resume_point(partial: Path, lm: LoadedModel, token_set: TokenSet, config: StoreConfig) -> int | None:
    """Rows already written in a resumable `partial`, None when there is nothing to resume."""
    if not partial.exists():
        return None
    head = _read_head(partial)
    if head is None or head["kind"] != STORE_KIND:
        log.warning("%s is unreadable (killed while its metadata was written?); starting it again", partial)
        return None
    if head["token_set_hash"] != token_set.hash:
        raise UniversalNeuronsError(
            f"{partial} is an unfinished store for token set {head['token_set_hash']}, not the requested "
            f"{token_set.hash}; pass overwrite=True to discard it, or write to another path")
    same_model = _identity(head["model"] or {}) == from_json(to_json(_identity(lm.provenance)))
    if not same_model or head["store_config"] != from_json(to_json(config.to_dict())):
        raise UniversalNeuronsError(
            f"{partial} is an unfinished store for another model or configuration "
            f"({(head['model'] or {}).get('name')}, {head['store_config']}); pass overwrite=True to discard it, "
            "or resume it with the same model, checkpoint, weight processing and StoreConfig")
    if (head["model"] or {}).get("device") != lm.provenance.get("device"):
        log.warning("resuming %s on %s; it was started on %s (rounding may differ between devices)",
                    partial, lm.provenance.get("device"), head["model"].get("device"))
    return head["complete_rows"]


def _default_batch_rows(lm: LoadedModel, token_set: TokenSet, n_hooks: int) -> int:
    per_row = token_set.ctx_len * lm.d_mlp * 4 * max(n_hooks, 1)
    return int(max(1, min(64, _BATCH_BYTES // per_row, token_set.n_rows)))


def cache_activations(
    lm: LoadedModel,
    token_set: TokenSet,
    path: str | os.PathLike,
    *,
    config: StoreConfig = StoreConfig(),
    batch_rows: int | None = None,
    overwrite: bool = False,
    progress_bar: bool | None = None,
) -> Path:
    """Run `lm` over every row of `token_set` and stream its MLP activations to `path`.

    Resumes a killed run from its last complete batch; the finished file equals an
    uninterrupted one. Never replaces an existing store unless `overwrite=True` (and then
    only once the new one is complete).

    Args:
        lm: the model (its device is where the forward passes run).
        token_set: the rows to run, `[row, pos]`.
        path: the `.h5` file to create.
        config: which hooks, dtype, compression, layers.
        batch_rows: rows per forward pass (default: ~256 MiB of activations, at most 64).
        progress_bar: show a tokens/s bar (None follows the global switch).

    Returns:
        the path of the finished store.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    check_compatible(lm.provenance, token_set, lm.tokenizer)
    layers = _layers(lm.provenance, config)
    hooks = [hook_name(layer, k) for layer in layers for k in config.kinds]
    if batch_rows is None:
        batch_rows = _default_batch_rows(lm, token_set, len(hooks))
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ConfigError(f"batch_rows must be a positive integer, got {batch_rows!r}; fix --batch-rows")
    check_writable(path, overwrite=True)  # the folder exists and is writable (existing files are handled below)
    if not partial.exists():  # a partial already holds its space (every chunk is allocated when it is made)
        check_space(preflight_cache(lm, token_set, config, path=path), path, config)
    with _writer_lock(path):
        if path.exists():
            head = _read_head(path)
            theirs = head["token_set_hash"] if head else "unreadable"
            if head is not None and theirs != token_set.hash and not overwrite:
                raise OutputExistsError(
                    f"{path} holds activations of token set {theirs}, not the requested {token_set.hash}; "
                    "choose another path, or pass --overwrite (overwrite=True in Python) to replace it")
            if not overwrite:
                raise OutputExistsError(f"{exists_message(path)}; to read it, open it with ActivationStore.open")
        start = None if overwrite else _resume_point(partial, lm, token_set, config)
        try:
            if start is None:
                _create(partial, lm, token_set, config, layers)
                start = 0
            elif start:
                log.info("resuming %s from row %d of %d", partial, start, token_set.n_rows)
            _write_rows(lm, token_set, partial, config, layers, start, batch_rows, progress_bar)
        except _Overflow:
            partial.unlink()  # float16 cannot hold this model's activations: the partial can never be finished
            raise
        except (OSError, RuntimeError) as e:
            if isinstance(e, UniversalNeuronsError) or not _is_write_failure(e):
                raise
            raise StoreWriteError(
                f"could not write {partial} ({e}); the disk is full or a file-size limit was reached. The rows "
                "finished so far are kept there: free space and run the same command again to resume") from e
        os.replace(partial, path)
    return path


def _is_write_failure(e: BaseException) -> bool:
    """Whether an HDF5 error is the operating system refusing a write (no space, file too large)."""
    text = str(e)
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(
        s in text for s in ("File too large", "No space left", "write failed", "unable to extend file"))


def after_batch(rows_done: int) -> None:
    """Called by `cache_activations` each time a batch is flushed to disk, with the number of
    rows now complete. Does nothing; tests and tools replace it (`monkeypatch.setattr`) to
    watch a run or interrupt it at a known point."""


def _write_rows(lm, token_set, partial, config, layers, start, batch_rows, progress_bar) -> None:
    import h5py

    ctx, d = token_set.ctx_len, lm.d_mlp
    fp16 = config.dtype == "float16"
    with h5py.File(partial, "r+") as f:
        dsets = {hook_name(layer, k): f[hook_name(layer, k)] for layer in layers for k in config.kinds}
        bar = progress(total=token_set.n_tokens, initial=start * ctx, desc=f"cache {lm.name}", unit="tok",
                       unit_scale=True, enabled=progress_bar)
        try:
            for r0 in range(start, token_set.n_rows, batch_rows):
                r1 = min(r0 + batch_rows, token_set.n_rows)
                toks = torch.from_numpy(token_set.ids[r0:r1]).long()
                acts = mlp_activations(lm, toks, kinds=config.kinds, layers=layers)
                for name, a in acts.items():
                    a = a.reshape(-1, d)
                    if fp16:
                        big = float(a.abs().max())
                        if not big <= _FP16_MAX:  # also NaN
                            raise _Overflow(
                                f"{name} of {lm.name} reaches |x| = {big:.6g} in rows {r0}..{r1 - 1}, beyond float16's "
                                f"range (max {_FP16_MAX:g}); cache with StoreConfig(dtype='float32')")
                        a = a.to(torch.float16)
                    else:
                        a = a.to(torch.float32)
                    dsets[name].write_direct(np.ascontiguousarray(a.cpu().numpy()), dest_sel=np.s_[r0 * ctx:r1 * ctx])
                f.attrs["complete_rows"] = r1
                f.flush()
                bar.update((r1 - r0) * ctx)
                after_batch(r1)
        finally:
            bar.close()
