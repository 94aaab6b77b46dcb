"""Functional agreement on a Dask cluster: one task per row shard runs the models on its rows and
returns their per-row sums; the driver concatenates them in row order (docs/distributed.md)."""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from universal_neurons.activations import TokenSet
from universal_neurons.distributed import ModelSpec
from universal_neurons.distributed.cluster import gather_in_order, new_run, submit, using_cluster, worker_count
from universal_neurons.distributed.shards import row_shards, worker_model

from .kernel import PairRowSums, agreement_row_sums

__all__ = ["agreement_row_sums_distributed"]

log = logging.getLogger(__name__)


def _agreement_task(models: tuple[ModelSpec, ...], rows: TokenSet, pairs: tuple[tuple[int, int], ...], dtype: str,
                    batch_rows: int, device: str | None) -> PairRowSums:
    lms = [worker_model(m, device) for m in models]
    with torch.inference_mode():
        return agreement_row_sums(lms, rows, pairs, dtype=dtype, batch_rows=batch_rows, progress_bar=False,
                                  require_counted=False)


def agreement_row_sums_distributed(models: Sequence[ModelSpec], token_set: TokenSet,
                                   pairs: Sequence[tuple[int, int]], *, cluster, batch_rows: int,
                                   dtype: str = "float64", n_shards: int | None = None,
                                   device: str | None = None) -> PairRowSums:
    """`agreement_row_sums` split over token-row shards: each task runs the models on its rows.

    Every row's sums come from that row alone, and the shards run the batches of `batch_rows`
    rows one process would run, so the concatenated sums equal the single-process ones (bit for
    bit on the same kind of device and thread count).

    Args:
        models: the models every worker loads (`ModelSpec.from_provenance`), in pair-index order.
        token_set: the rows (checked against the models by the caller).
        pairs: `(i, j)` indices into `models`.
        cluster: a `distributed.Client` or a spec (`universal_neurons.distributed.connect`).
        batch_rows: rows per forward pass (resolved by the caller with `auto_batch_rows`).
        dtype: 'float64' or 'float32'.
        n_shards: default 2 per worker.
        device: the workers' device (None: their GPU when they have one).

    Returns:
        `PairRowSums` over every row of `token_set`: `n [row]`, `values[metric] [pair, row]`.
    """
    with using_cluster(cluster) as client:
        n_workers = worker_count(client)
        shards = row_shards(token_set, batch_rows, n_shards or 2 * n_workers)
        run = new_run()
        futures = [submit(client, "agreement", run, s, _agreement_task, tuple(models), token_set.select_rows(r0, r1),
                          tuple(pairs), dtype, batch_rows, device)
                   for s, (r0, r1) in enumerate(shards)]
        log.info("agreement of %d pair(s) on %d worker(s): %d shard(s) of %d rows", len(pairs), n_workers,
                 len(shards), token_set.n_rows)
        return PairRowSums.concat(list(gather_in_order(client, futures)))
