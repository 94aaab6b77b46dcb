"""Wall time of one correlation job on 1 vs 2 local Dask workers, and the scaling efficiency.

    .venv/bin/python benchmarks/bench_distributed.py              # default job, ~1-2 min on 2 cores
    .venv/bin/python benchmarks/bench_distributed.py --tokens 32768 --d-mlp 256   # quicker

The job is the correlation engine's (rotation baseline, fp32): a reference model and two others
with `--layers` x `--d-mlp` neurons each, `--tokens` tokens in batches of `--batch-tokens`, split
into `--shards` token shards. Activations are generated on the workers from (seed, batch index),
so the figures measure the engine and the merge, not disk or network. Each worker has one thread
(as `--cluster local:N` starts them), so 1 -> 2 workers is 1 -> 2 cores; the single-process
engine on one thread is the baseline. Cluster start-up is excluded (each cluster runs a warm-up
job first); the driver's merge and finalisation are included.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from universal_neurons.activations import set_progress
from universal_neurons.correlation import CorrelationConfig, ModelLayout, correlate, preflight
from universal_neurons.distributed import ShardedSource, connect, correlate_distributed


class SyntheticShards(ShardedSource):
    """Correlated activations made on the worker from (seed, batch index): shared structure + noise."""

    def __init__(self, n_batches: int, batch_tokens: int, widths: list[int], seed: int = 0):
        self.n_batches, self.batch_tokens, self.widths, self.seed = n_batches, batch_tokens, widths, seed

    def batches(self, b0, b1):
        for b in range(b0, b1):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            shared = torch.randn(self.batch_tokens, 64, generator=g)
            acts = []
            for k, w in enumerate(self.widths):
                mix = torch.randn(64, w, generator=torch.Generator().manual_seed(self.seed + 7 * k)) / 8
                acts.append(torch.relu(shared @ mix + torch.randn(self.batch_tokens, w, generator=g)))
            yield torch.ones(self.batch_tokens, dtype=torch.bool), acts


def _time(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs per setting")
    a = ap.parse_args()
    set_progress(False)

    layouts = [ModelLayout(label, a.layers, a.d_mlp) for label in ("a", "b", "c")]
    n_batches = a.tokens // a.batch_tokens
    src = SyntheticShards(n_batches, a.batch_tokens, [m.n_neurons for m in layouts])
    cfg = CorrelationConfig(device="cpu")
    pf = preflight(layouts, n_batches * a.batch_tokens, cfg)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} logical cores (load average {load:.1f} at start); torch {torch.__version__}")
    print(f"job: {pf['summary']}; {n_batches} batches in {a.shards} shards")

    torch.set_num_threads(1)
    t_ref, ref = _time(lambda: correlate(src, layouts, cfg), a.repeat)
    print(f"single process, 1 thread:  {t_ref:7.2f} s  ({pf['gemm_flops'] / t_ref / 1e9:.1f} GFLOP/s)")

    times, results = {}, {}
    for n in (1, 2):
        client = connect(f"local:{n}")
        try:
            client.wait_for_workers(n)
            warm = SyntheticShards(2, 256, [m.n_neurons for m in layouts])
            correlate_distributed(warm, layouts, cfg, cluster=client, n_shards=2 * n)  # imports on every worker
            times[n], results[n] = _time(lambda c=client: correlate_distributed(src, layouts, cfg, cluster=c,
                                                                                n_shards=a.shards), a.repeat)
        finally:
            client.close()
        print(f"Dask, {n} worker(s) x 1 thread: {times[n]:7.2f} s  ({pf['gemm_flops'] / times[n] / 1e9:.1f} GFLOP/s)")

    speedup = times[1] / times[2]
    print(f"speed-up 1 -> 2 workers: {speedup:.2f}x; scaling efficiency {100 * speedup / 2:.0f}% "
          f"(overhead of 1 worker vs in-process: {100 * (times[1] / t_ref - 1):+.0f}%)")
    for n, r in results.items():
        diff = np.nanmax(np.abs(r.max_corr - ref.max_corr))
        same = np.array_equal(r.partner, ref.partner)
        print(f"  {n} worker(s): max |max_corr - single process| = {diff:.1e}, partners identical: {same}")
    if os.cpu_count() and os.cpu_count() <= 2:
        print("note: on a 2-core machine shared with other processes, 2 workers compete with the driver and "
              "anything else running; efficiency here is a lower bound of what separate machines or GPUs give")


if __name__ == "__main__":
    main()
