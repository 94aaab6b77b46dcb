"""The properties' activation moments and the ablation study on a cluster: one task per row
shard, results combined on the driver in shard order exactly as one process combines batches."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import pandas as pd

from universal_neurons.ablation import AblationConfig, AblationPlan, AblationResult, RowSums, ablation_study
from universal_neurons.activations import TokenSet
from universal_neurons.errors import ConfigError
from universal_neurons.properties import activation_moments, check_live, live_moments, moments_frame

from .cluster import gather_in_order, new_run, submit, using_cluster, worker_count
from .shards import ModelSpec, row_shards, worker_model

__all__ = ["ablation_distributed", "moments_distributed"]

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


def _ablation_task(m: ModelSpec, rows: TokenSet, plan: AblationPlan, device) -> RowSums:
    return plan.evaluate(worker_model(m, device), rows, progress_bar=False)


def ablation_distributed(model: str | os.PathLike, table_or_neurons, token_set: TokenSet,
                         config: AblationConfig | None = None, *, cluster=None, checkpoint: int | None = None,
                         process_weights: bool = True, n_shards: int | None = None, means: np.ndarray | None = None,
                         dtype: str = "float32", device: str | None = None) -> AblationResult:
    """`ablation_study` split over token-row shards.

    The driver loads `model` once (CPU) and builds the `AblationPlan`: the universal and control
    sets (the config's seed) and, for kind='mean', the means streamed over `token_set` unless
    `means` is given. Every task evaluates that same plan on its rows and returns per-row sums;
    the plan turns the sums of all shards, in shard order, into the result one process would
    give, so it equals `ablation_study` up to forward-pass rounding.

    Args:
        model: hub name or model directory every worker can read.
        table_or_neurons, token_set, config, means: as for `ablation_study`.
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
        return ablation_study(worker_model(m, device), table_or_neurons, token_set, config, means=means)
    plan = AblationPlan.build(worker_model(m, "cpu"), table_or_neurons, token_set, config, means=means)
    with using_cluster(cluster) as client:
        n_workers = worker_count(client)
        shards = row_shards(token_set, plan.batch_rows, n_shards or 2 * n_workers)
        run = new_run()
        futures = [submit(client, "ablation", run, s, _ablation_task, m, token_set.select_rows(r0, r1), plan, device)
                   for s, (r0, r1) in enumerate(shards)]
        log.info("%s of %s on %d worker(s): %d shard(s)", plan.describe(token_set.n_rows), m.spec, n_workers,
                 len(shards))
        parts = list(gather_in_order(client, futures))
    return plan.result(parts, distributed={"workers": n_workers, "shards": shards})
