"""The properties' activation moments and the ablation study on a cluster: one task per row
shard (or token range of a store), results combined on the driver in shard order exactly as one
process combines batches. (Functional agreement's cluster path, the same pattern, is
`universal_neurons.agreement.cluster`: that package sits above this one.)"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from universal_neurons.ablation import AblationConfig, AblationPlan, AblationResult, RowSums, ablation_study
from universal_neurons.activations import ActivationStore, TokenSet, hook_name
from universal_neurons.errors import ConfigError, IncompatibleInputsError, InputError
from universal_neurons.moments import StreamingMoments
from universal_neurons.properties import activation_moments, check_live, live_moments, moments_frame

from .cluster import gather_in_order, new_run, submit, using_cluster, worker_count
from .shards import ModelSpec, row_shards, shard_ranges, worker_model

__all__ = ["ablation_distributed", "evaluate_plan_distributed", "moments_distributed", "store_moments_distributed"]

log = logging.getLogger(__name__)


def _moments_task(m: ModelSpec, ts: TokenSet, kinds: tuple[str, ...], batch_rows: int, device):
    accs, _, _, _ = live_moments(worker_model(m, device), ts, kinds, batch_rows, False)
    return accs


def moments_distributed(model: str | os.PathLike, token_set: TokenSet, *, cluster=None, checkpoint: int | None = None,
                        process_weights: bool = True, kinds: Sequence[str] = ("pre", "post"),
                        n_shards: int | None = None, batch_rows: int = 32, dtype: str = "float32",
                        device: str | None = None) -> pd.DataFrame:
    """`activation_moments` of a live model split over token-row shards.

    Each task runs `model` (loaded once per worker, on its own device) over its rows and returns a
    `StreamingMoments` per `(layer, kind)`; the driver merges them in shard order with the exact
    pairwise formulas, so the moments equal one pass over all rows up to float64 merge order.

    Args:
        model: hub name or model directory every worker can read.
        token_set: the tokens; shards are whole batches of `batch_rows` rows.
        cluster: see `connect`; None runs `activation_moments` in process.
        checkpoint, process_weights, dtype: as for `load_model`.
        kinds: 'pre' and/or 'post'.
        n_shards: default 2 per worker.
        batch_rows: rows per forward pass.
        device: the workers' device (None: their GPU when they have one).

    Returns:
        The DataFrame `activation_moments` returns (`[layer*d_mlp rows]`), with
        `df.attrs['moments']['distributed']` = `{workers, shards}` (row ranges).

    Raises:
        ConfigError: unknown kinds or a bad `batch_rows`.
    """
    kinds = tuple(kinds)
    if not kinds or set(kinds) - {"pre", "post"}:
        raise ConfigError(f"kinds must name 'pre' and/or 'post', got {kinds!r}")
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise ConfigError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    m = ModelSpec(os.fspath(model), checkpoint, process_weights, dtype)
    if cluster is None:
        return activation_moments(worker_model(m, device), token_set=token_set, kinds=kinds, batch_rows=batch_rows)
    lm = worker_model(m, "cpu")  # on the driver: checks the token set fits, and names the model in the result
    check_live(lm, token_set)
    with using_cluster(cluster) as client:
        n_workers = worker_count(client)
        shards = row_shards(token_set, batch_rows, n_shards or 2 * n_workers)
        run = new_run()
        futures = [submit(client, "moments", run, s, _moments_task, m, token_set.select_rows(r0, r1), kinds,
                          batch_rows, device)
                   for s, (r0, r1) in enumerate(shards)]
        log.info("moments of %s on %d worker(s): %d shard(s)", m.spec, n_workers, len(shards))
        parts = gather_in_order(client, futures)
        accs = next(parts)
        for part in parts:
            accs = {k: accs[k].merge(v) for k, v in part.items()}
    info = {"source": "live", "model": lm.provenance, "token_set_hash": token_set.hash,
            "distributed": {"workers": n_workers, "shards": shards}}
    return moments_frame(accs, list(range(lm.n_layers)), lm.d_mlp, kinds, info)


def _store_moments_task(path: str, kinds: tuple[str, ...], t0: int, t1: int, step: int):
    """Moments of tokens [t0, t1) of a store, read in the steps `store_moments` reads (from 0)."""
    with ActivationStore.open(path) as store:
        accs = {(layer, k): StreamingMoments(store.d_mlp) for layer in store.layers for k in kinds}
        mask = torch.from_numpy(store.mask[t0:t1])
        for a in range(t0, t1, step):
            b = min(a + step, t1)
            m = mask[a - t0:b - t0]
            for (layer, k), acc in accs.items():
                acc.update(torch.from_numpy(store[hook_name(layer, k)][a:b])[m])
    return accs


def store_moments_distributed(store: str | os.PathLike, *, cluster=None, token_set: TokenSet | None = None,
                              kinds: Sequence[str] = ("pre", "post"), n_shards: int | None = None,
                              batch_rows: int = 32) -> pd.DataFrame:
    """`activation_moments` of an activation store split over token ranges.

    Each task reads its range of the store (whole reads of `batch_rows` rows, as one process
    reads them) and returns a `StreamingMoments` per `(layer, kind)`; the driver merges them in
    shard order with the exact pairwise formulas.

    Args:
        store: the store's path; every worker must read it at this path (a shared filesystem).
        cluster: see `connect`; None runs `activation_moments` in process.
        token_set: optional, checked against the store's token-set hash.
        kinds: 'pre' and/or 'post' (the store must hold them).
        n_shards: default 2 per worker.
        batch_rows: rows per read.

    Returns:
        The DataFrame `activation_moments` returns (`[layer*d_mlp rows]`), with
        `df.attrs['moments']['distributed']` = `{workers, shards}` (token ranges).

    Raises:
        ConfigError: unknown kinds or a bad `batch_rows`.
        InputError: the store lacks a hook of `kinds`.
        IncompatibleInputsError: the token set is not the store's.
    """
    kinds = tuple(kinds)
    if not kinds or set(kinds) - {"pre", "post"}:
        raise ConfigError(f"kinds must name 'pre' and/or 'post', got {kinds!r}")
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise ConfigError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    if cluster is None:
        return activation_moments(store, token_set=token_set, kinds=kinds, batch_rows=batch_rows)
    path = str(Path(store).resolve())
    with ActivationStore.open(path) as s:  # the checks `store_moments` makes, before any task starts
        missing = [hook_name(layer, k) for k in kinds for layer in s.layers if hook_name(layer, k) not in s]
        if missing:
            raise InputError(f"{s.path} has no {missing[0]}; its activation moments need it: cache with "
                             "StoreConfig(kinds=('post', 'pre')) (`universal-neurons cache --pre`) or use the live "
                             "model")
        if token_set is not None and token_set.hash != s.token_set_hash:
            raise IncompatibleInputsError(f"{s.path} holds activations of token set {s.token_set_hash[:12]}, not of "
                                          f"the given one ({token_set.hash[:12]})")
        layers, d, step, n_tokens = list(s.layers), s.d_mlp, batch_rows * s.ctx_len, s.n_tokens
        info = {"source": "store", "store": path, "store_dtype": s.config.dtype, "model": s.model,
                "token_set_hash": s.token_set_hash}
    with using_cluster(cluster) as client:
        n_workers = worker_count(client)
        reads = shard_ranges(-(-n_tokens // step), n_shards or 2 * n_workers)
        shards = [(r0 * step, min(r1 * step, n_tokens)) for r0, r1 in reads]
        run = new_run()
        futures = [submit(client, "moments", run, k, _store_moments_task, path, kinds, t0, t1, step)
                   for k, (t0, t1) in enumerate(shards)]
        log.info("moments of %s on %d worker(s): %d shard(s)", path, n_workers, len(shards))
        parts = gather_in_order(client, futures)
        accs = next(parts)
        for part in parts:
            accs = {k: accs[k].merge(v) for k, v in part.items()}
    return moments_frame(accs, layers, d, kinds, {**info, "distributed": {"workers": n_workers, "shards": shards}})


def _ablation_task(m: ModelSpec, rows: TokenSet, plan: AblationPlan, device) -> RowSums:
    return plan.evaluate(worker_model(m, device), rows, progress_bar=False)


def evaluate_plan_distributed(plan: AblationPlan, model: ModelSpec, token_set: TokenSet, *, cluster,
                              n_shards: int | None = None, device: str | None = None) -> AblationResult:
    """Evaluate an `AblationPlan` on row shards of `token_set` and turn the sums into its result.

    Args:
        plan: built on the driver (`AblationPlan.build`) for `model` on `token_set`.
        model: the model every worker loads (`ModelSpec.from_provenance(lm.provenance)`).
        token_set: the rows the plan was built on; shards are whole forward batches.
        cluster: a `distributed.Client` or a spec (`connect`).
        n_shards: default 2 per worker.
        device: the workers' device (None: their GPU when they have one).

    Returns:
        `plan.result(...)` of the shards' sums in row order: what `ablation_study` gives in one
        process; `provenance['distributed']` = `{workers, shards}` (row ranges).
    """
    with using_cluster(cluster) as client:
        n_workers = worker_count(client)
        shards = row_shards(token_set, plan.batch_rows, n_shards or 2 * n_workers)
        run = new_run()
        futures = [submit(client, "ablation", run, s, _ablation_task, model, token_set.select_rows(r0, r1), plan,
                          device)
                   for s, (r0, r1) in enumerate(shards)]
        log.info("%s of %s on %d worker(s): %d shard(s)", plan.describe(token_set.n_rows), model.spec, n_workers,
                 len(shards))
        parts = list(gather_in_order(client, futures))
    return plan.result(parts, distributed={"workers": n_workers, "shards": shards})


def ablation_distributed(model: str | os.PathLike, table_or_neurons, token_set: TokenSet,
                         config: AblationConfig | None = None, *, cluster=None, checkpoint: int | None = None,
                         process_weights: bool = True, n_shards: int | None = None, means: np.ndarray | None = None,
                         store: ActivationStore | str | os.PathLike | None = None, study_hash: str | None = None,
                         dtype: str = "float32", device: str | None = None) -> AblationResult:
    """`ablation_study` split over token-row shards.

    The driver loads `model` once (CPU) and builds the `AblationPlan`: the universal and control
    sets (the config's seed) and, for kind='mean', the means (given, read from `store`, or
    streamed over `token_set`). Every task evaluates that same plan on its rows and returns
    per-row sums; the plan turns the sums of all shards, in shard order, into the result one
    process would give, so it equals `ablation_study` up to forward-pass rounding.

    Args:
        model: hub name or model directory every worker can read.
        table_or_neurons, token_set, config, means, store, study_hash: as for `ablation_study`.
        cluster: see `connect`; None runs `ablation_study` in process.
        checkpoint, process_weights, dtype: as for `load_model`.
        n_shards: default 2 per worker; shards are whole forward batches.
        device: the workers' device (None: their GPU when they have one).

    Returns:
        `AblationResult`; `provenance['distributed']` = `{workers, shards}` (row ranges).
    """
    config = config or AblationConfig()
    m = ModelSpec(os.fspath(model), checkpoint, process_weights, dtype)
    if cluster is None:
        return ablation_study(worker_model(m, device), table_or_neurons, token_set, config, means=means, store=store,
                              study_hash=study_hash)
    plan = AblationPlan.build(worker_model(m, "cpu"), table_or_neurons, token_set, config, means=means, store=store,
                              study_hash=study_hash)
    return evaluate_plan_distributed(plan, m, token_set, cluster=cluster, n_shards=n_shards, device=device)
