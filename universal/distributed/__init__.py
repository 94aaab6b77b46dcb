"""Scale-out: every stage that scans tokens (caching, correlation, all pairs, activation moments,
ablation, agreement) on a Dask cluster (docs/distributed.md).

Work is split by *token shards*: contiguous runs of whole batches (or rows), each a task.

    correlate_distributed   task (shard s, reference block p) -> CorrelationPartial on the worker's device;
                            the driver merges shard partials of block p in shard order (the same Chan merge
                            as one process, `merge_partials`) and `finalize`s each block
    cache_distributed       task (shard s) -> its own activation store of rows [r0, r1);
                            the driver stitches them into one store of HDF5 virtual datasets
    correlate_all_pairs_distributed
                            every model the reference in turn: one correlate_distributed per reference
    moments_distributed     task (shard s) -> a StreamingMoments per (layer, kind) of rows [r0, r1) of a
    store_moments_distributed   live model, or of tokens [t0, t1) of a store; the driver merges them in
                            shard order (`StreamingMoments.merge`)
    ablation_distributed    the driver builds the AblationPlan once (sets, controls, means); task (shard s)
    evaluate_plan_distributed   -> the plan evaluated on rows [r0, r1) (per-row sums); the plan turns the
                            sums of all shards, in shard order, into the result one process would give

Functional agreement maps the same way (task (shard s) -> the models' per-row divergence sums on
rows [r0, r1), concatenated in row order): `universal_neurons.agreement.cluster`, built on this
package's `submit`, `gather_in_order`, `row_shards` and `ModelSpec`.

Every task is keyed by its shard (and block), so a worker killed mid-task is simply re-run by
the scheduler (`distributed.scheduler.allowed-failures`, default 3) and every partial is merged
exactly once, in a fixed order: the result does not depend on which worker ran what.

    with using_cluster("local:2") as client:                     # or "tcp://host:8786", or None
        res = correlate_distributed(store_shards(paths, batch_tokens=8192), layouts, cfg, cluster=client)

`cluster` is `"local:N"` (a LocalCluster of N single-threaded processes), a scheduler address
(`"tcp://host:port"`), `"scheduler-file:<path>"` (dask-jobqueue, dask-mpi, dask-cuda), a
`distributed.Client`, or None: in-process, exactly as `correlate` / `cache_activations`.

The parts:

    cluster.py       connect / using_cluster, keyed task submission, gathering in shard order,
                     `before_task` (the hook every task calls first; tests replace it to inject faults)
    shards.py        ShardedSource and its store / live-model / in-memory / reordered forms, shard and
                     row ranges, ModelSpec (a model as a worker loads it)
    correlation.py   correlate_distributed, correlate_all_pairs_distributed
    caching.py       cache_distributed, stitch_stores
    stages.py        moments_distributed, store_moments_distributed, ablation_distributed,
                     evaluate_plan_distributed
"""

from .caching import cache_distributed, stitch_stores
from .cluster import connect, using_cluster
from .correlation import correlate_all_pairs_distributed, correlate_distributed
from .shards import ModelSpec, ShardedSource, batch_shards, live_shards, reordered, shard_ranges, store_shards
from .stages import (
    ablation_distributed,
    evaluate_plan_distributed,
    moments_distributed,
    store_moments_distributed,
)

__all__ = [
    "connect",
    "using_cluster",
    "ModelSpec",
    "ShardedSource",
    "store_shards",
    "live_shards",
    "batch_shards",
    "reordered",
    "shard_ranges",
    "correlate_distributed",
    "correlate_all_pairs_distributed",
    "cache_distributed",
    "stitch_stores",
    "moments_distributed",
    "store_moments_distributed",
    "ablation_distributed",
    "evaluate_plan_distributed",
]
