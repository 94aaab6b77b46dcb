"""The cluster itself: connecting to Dask, submitting keyed shard tasks, gathering their results
in shard order, and the hook every task calls before its work."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Any, Callable, Iterator

from universal_neurons.errors import ConfigError, InputNotFoundError, UniversalNeuronsError
from universal_neurons.runtime import set_progress

__all__ = ["before_task", "connect", "gather_in_order", "new_run", "submit", "using_cluster", "worker_count"]

log = logging.getLogger(__name__)

_SPECS = "'local:N', 'tcp://host:port', 'scheduler-file:<path>', a distributed.Client, or None"


def _dask():
    try:
        import distributed
    except ImportError:
        raise UniversalNeuronsError("running on a cluster needs Dask: pip install 'universal-neurons[cluster]' "
                                    "(dask[distributed]; add dask-jobqueue for SLURM/PBS, dask-cuda for GPUs)"
                                    ) from None
    return distributed


def connect(spec):
    """A `distributed.Client` for `spec`, or None for in-process runs.

    Args:
        spec: None / `""` (in-process); `"local:N"`: a LocalCluster of N worker processes with one
            thread each on this machine (closed with the client); `"tcp://host:port"` (or `tls://`,
            `ucx://`): an existing scheduler; `"scheduler-file:<path>"`: the scheduler that wrote
            `<path>` (dask-jobqueue, dask-mpi); a `Client`: returned as is.

    Returns:
        A `Client` the caller closes, or None.

    Raises:
        ConfigError: a spec of none of these forms.
        InputNotFoundError: no scheduler file at the path.
        UniversalNeuronsError: no scheduler answers at the address, or Dask is not installed.
    """
    if spec is None or spec == "" or spec == "none":
        return None
    distributed = _dask()
    if isinstance(spec, distributed.Client):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"cluster={spec!r} is not understood; use {_SPECS}")
    if spec.startswith("local:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"cluster={spec!r}: N in 'local:N' must be a positive number of worker processes")
        # one thread per worker: torch in each process then uses one core (the nanny sets OMP_NUM_THREADS=1)
        return distributed.Client(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    if spec.startswith("scheduler-file:"):
        path = spec.split(":", 1)[1]
        if not os.path.exists(path):
            raise InputNotFoundError(f"no scheduler file at {path}; start the scheduler first (dask-scheduler "
                                     "--scheduler-file PATH, or a dask-jobqueue cluster)")
        return distributed.Client(scheduler_file=path)
    if "://" in spec:
        try:
            return distributed.Client(spec, timeout="30s")
        except OSError as e:
            raise UniversalNeuronsError(f"no Dask scheduler answers at {spec} ({e}); start one (`dask scheduler`) "
                                        "and its workers, or use 'local:N'") from e
    raise ConfigError(f"cluster={spec!r} is not understood; use 'local:N', 'tcp://host:port' or "
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


def worker_count(client) -> int:
    """Workers the scheduler knows now (at least 1: shard counts are planned from it)."""
    return max(1, len(client.scheduler_info().get("workers", {})))


def new_run() -> str:
    """A short id that keeps the task keys of one job apart from every other job's."""
    return uuid.uuid4().hex[:8]


def before_task(kind: str, shard: int, block: int) -> None:
    """Called by every cluster task just before its work; does nothing.

    Tests replace it (`monkeypatch.setattr(cluster, "before_task", hook)`) to inject faults, e.g.
    kill the worker running one shard. The function in place when a job is *submitted* is sent to
    the workers with each of its tasks (pickled), so a replacement reaches worker processes too.

    Args:
        kind: the job: 'correlate', 'cache', 'moments', 'ablation' or 'agreement'.
        shard: the task's token shard.
        block: the task's reference block (correlate), else 0.
    """


def _run(hook: Callable[[str, int, int], None], kind: str, shard: int, block: int, fn: Callable, *args):
    """What a worker runs: no progress bars (worker logs are no place for them), the hook, the task."""
    set_progress(False)
    hook(kind, shard, block)
    return fn(*args)


def submit(client, kind: str, run: str, shard: int, fn: Callable, *args, block: int | None = None):
    """Submit `fn(*args)` as the task of one shard (and block), keyed so that a retry replaces it.

    Args:
        client: the `distributed.Client`.
        kind: the job (see `before_task`); also the key's prefix.
        run: `new_run()` of this job.
        shard: the token shard.
        fn: a module-level function (pickled by reference).
        *args: its arguments (pickled: keep them small, or paths).
        block: the reference block of a correlate task.

    Returns:
        The task's `Future`.
    """
    key = f"{kind}-{run}-" + (f"block{block}-" if block is not None else "") + f"shard{shard}"
    return client.submit(_run, before_task, kind, shard, block or 0, fn, *args, key=key, pure=False)


def gather_in_order(client, futures: list) -> Iterator[Any]:
    """Each shard's result once, in shard order (deterministic whatever finishes first); releases as it goes."""
    try:
        for fut in futures:
            part = fut.result()
            fut.release()
            yield part
    finally:
        client.cancel(futures)
