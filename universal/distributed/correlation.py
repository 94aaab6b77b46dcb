"""The correlation stage on a cluster: one task per (token shard, reference block) accumulates a
`CorrelationPartial`; the driver merges each block's partials in shard order and finalises. All
pairs: the same, once per reference."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from universal_neurons.correlation import (
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
from universal_neurons.errors import UniversalNeuronsError

from .cluster import new_run, submit, using_cluster, worker_count
from .shards import ShardedSource, as_sharded, reordered, shard_ranges, task_source

__all__ = ["correlate_distributed", "correlate_all_pairs_distributed"]

log = logging.getLogger(__name__)


def _correlate_task(src: ShardedSource, b0: int, b1: int, layouts, config, block_index: int) -> CorrelationPartial:
    acc = accumulate(src.batches(b0, b1), layouts, config, block_index=block_index, first_batch=b0)
    return acc.to("cpu")


def correlate_distributed(source, layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None, *,
                          cluster=None, n_shards: int | None = None, provenance: dict[str, Any] | None = None,
                          full_matrix_path: str | os.PathLike | None = None, overwrite: bool = False,
                          driver_device: str = "cpu") -> CorrelationResult:
    """`correlate` split over token shards (and reference blocks) on a Dask cluster.

    Args:
        source: `store_shards(...)`, `live_shards(...)`, `batch_shards(list)`, an `AlignedSource`
            from `iter_aligned`, or any `ShardedSource`.
        layouts: as for `correlate`.
        config: as for `correlate`. `config.memory_budget` is per task (one shard's accumulators);
            above it the reference neurons are split into blocks and every (shard, block) is a task.
        cluster: see `connect`; None runs `correlate` in process over the whole source.
        n_shards: token shards (default 2 per worker; more balances load and shortens retries,
            but every shard returns one block of float64 co-moments to merge).
        provenance, full_matrix_path, overwrite: as for `correlate`.
        driver_device: where the driver merges and finalises (default CPU).

    Returns:
        `CorrelationResult`, equal to the single-process result up to floating-point merge order
        (partners and the universality table identical but for exact ties);
        `provenance['distributed']` = `{workers, shards, tasks}`.
    """
    config = config or CorrelationConfig()
    src = as_sharded(source)
    if cluster is None:
        return correlate(src, layouts, config, provenance=provenance, full_matrix_path=full_matrix_path,
                         overwrite=overwrite)
    blocks = reference_blocks(layouts, config)  # also checks the layouts, before any task starts
    with using_cluster(cluster) as client:
        n_workers = worker_count(client)
        shards = shard_ranges(src.n_batches, n_shards or 2 * n_workers)
        run = new_run()
        futures: dict[tuple[int, int], Any] = {}
        for p in range(len(blocks)):  # block-major: block 0's shards are scheduled first
            for s, (b0, b1) in enumerate(shards):
                futures[p, s] = submit(client, "correlate", run, s, _correlate_task, task_source(src, b0, b1), b0, b1,
                                       tuple(layouts), config, p, block=p)
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


def correlate_all_pairs_distributed(source, layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None, *,
                                    cluster, n_shards: int | None = None,
                                    provenance: dict[str, Any] | None = None) -> dict[str, CorrelationResult]:
    """Every model as the reference in turn, on a cluster: one `correlate_distributed` per reference.

    Each reference's result is `correlate_distributed` of the source with that model first, so it
    equals `correlate` run with that model first, which is what `correlate_all_pairs` gives in
    process (its one-pass triangle equals it up to floating-point association). The cost is that
    of separate runs: the source is read (or its models run) once per reference and every pair's
    co-moments are computed from both sides, twice the GEMMs of the triangle; the references'
    tasks share the cluster one after the other.

    Args:
        source: as for `correlate_distributed`, models in the order of `layouts`.
        layouts: every model of the family.
        config: as for `correlate`.
        cluster: a `distributed.Client` or a spec (`connect`); opened once for every reference.
        n_shards: token shards per reference (default 2 per worker).
        provenance: stored with every result.

    Returns:
        label -> `CorrelationResult`, in the order of `layouts`; each result's provenance says
        `all_pairs` = how it was computed, and `distributed` as for `correlate_distributed`.
    """
    config = config or CorrelationConfig()
    src = as_sharded(source)
    layouts = list(layouts)
    results = {}
    with using_cluster(cluster) as client:
        for r, lay in enumerate(layouts):
            order = [r] + [i for i in range(len(layouts)) if i != r]
            log.info("all pairs on the cluster: reference %s (%d of %d)", lay.label, r + 1, len(layouts))
            res = correlate_distributed(reordered(src, order), [layouts[i] for i in order], config, cluster=client,
                                        n_shards=n_shards, provenance=provenance)
            res.provenance["all_pairs"] = "one distributed correlate run per reference"
            results[lay.label] = res
    return results
