"""Caching throughput and memory of `cache_activations` on a small GPT-2 (prints figures).

    python benchmarks/bench_caching.py [--rows 64 512] [--batch-rows 16] [--dtype float16] [--device auto]

Figures, each with its ratio to the target:
- caching throughput (tokens/s) at the smaller token count;
- time of caching / time of a bare forward pass (`lm.model(tokens, return_type=None)`, which
  includes the unembedding) on the same tokens and batches: target <= 1.15;
- time of caching / time of the activation forward alone (`mlp_activations`, no disk): the
  cost of writing, target <= 1.15;
- peak resident memory while caching (sampled) at two token counts, 8x apart, each in a fresh
  process: target flat, i.e. peak(large) / peak(small) <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("UNIVERSAL_NEURONS_PROGRESS", "0")

from common import PeakRSS, bench_tokenizer, rss_mib  # noqa: E402  (benchmarks/common.py)

from universal_neurons.activations import (  # noqa: E402
    ActivationStore,
    GPT2Config,
    init_gpt2,
    load_model,
    mlp_activations,
    save_model_dir,
)
from universal_neurons.activations import store as store_module  # noqa: E402
from universal_neurons.activations.store import StoreConfig, cache_activations  # noqa: E402
from universal_neurons.activations.tokens import TokenSet, TokenSetConfig, tokenizer_info  # noqa: E402

CFG = GPT2Config(n_layers=2, d_model=128, n_heads=4, d_mlp=512, n_ctx=256, d_vocab=4096)
CTX = 256


def _model_dir(root: Path) -> Path:
    return save_model_dir(init_gpt2(CFG, seed=0), bench_tokenizer(), root / "model", {"name": "bench-gpt2"})


def _token_set(lm, rows: int) -> TokenSet:
    ids = np.random.default_rng(0).integers(1, CFG.d_vocab, size=(rows, CTX), dtype=np.int32)
    ids[:, 0] = 0
    mask = np.ones_like(ids, dtype=bool)
    mask[:, 0] = False
    return TokenSet(ids=ids, mask=mask, doc_index=np.zeros_like(ids), source_rows=np.arange(rows),
                    config=TokenSetConfig(ctx_len=CTX), tokenizer_info=tokenizer_info(lm.tokenizer))


def _best_times(fns, repeats: int) -> list[float]:
    """Best wall time of each function; runs are interleaved so load from other processes
    on a shared machine hits every function alike."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def child_memory(model_dir: str, rows: int, batch_rows: int, dtype: str, device: str, out: str) -> None:
    """Cache `rows` rows in this fresh process; print resident memory (MiB) after a warm-up
    forward and its peak during caching, sampled every 2 ms by a thread."""

    lm = load_model(model_dir, device=device)
    ts = _token_set(lm, rows)
    for ids, _ in list(ts.batches(batch_rows))[:3]:  # the allocator's working set settles in a few batches
        mlp_activations(lm, torch.from_numpy(ids).long())
    after_batch: list[float] = []
    store_module.after_batch = lambda _: after_batch.append(rss_mib())
    with PeakRSS() as mem:
        cache_activations(lm, ts, out, config=StoreConfig(dtype=dtype), batch_rows=batch_rows, overwrite=True)
    q = max(1, len(after_batch) // 4)  # resident memory after each batch: last quarter vs first quarter
    trend = float(np.mean(after_batch[-q:]) - np.mean(after_batch[:q]))
    print(json.dumps({"rows": rows, "before_mib": mem.before, "peak_mib": mem.peak, "trend_mib": trend}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs=2, default=[64, 512], help="two token-set sizes, in rows of 256")
    ap.add_argument("--batch-rows", type=int, default=16)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--_child", nargs=3, metavar=("MODEL_DIR", "ROWS", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        child_memory(a._child[0], int(a._child[1]), a.batch_rows, a.dtype, a.device, a._child[2])
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = _model_dir(root)
        lm = load_model(model_dir, device=a.device)
        ts = _token_set(lm, min(a.rows))
        n = ts.n_tokens
        batches = [torch.from_numpy(ids).long().to(lm.device) for ids, _ in ts.batches(a.batch_rows)]

        def bare():
            with torch.inference_mode():
                for t in batches:
                    lm.model(t, return_type=None)

        def acts_only():
            for t in batches:
                mlp_activations(lm, t)

        def cache():
            cache_activations(lm, ts, root / "bench.h5", config=StoreConfig(dtype=a.dtype), batch_rows=a.batch_rows,
                              overwrite=True)

        def cache_unchecked():
            cache_activations(lm, ts, root / "bench-nosum.h5", config=StoreConfig(dtype=a.dtype, checksum=False),
                              batch_rows=a.batch_rows, overwrite=True)

        def read(name):
            def run():
                with ActivationStore.open(root / name) as st:
                    for h in st.hooks:
                        st[h][:]
            return run

        t_bare, t_acts, t_cache, t_nosum = _best_times([bare, acts_only, cache, cache_unchecked], a.repeats)
        t_read, t_read_nosum = _best_times([read("bench.h5"), read("bench-nosum.h5")], a.repeats)
        mem = []
        for rows in sorted(a.rows):
            cmd = [sys.executable, __file__, "--batch-rows", str(a.batch_rows), "--dtype", a.dtype, "--device",
                   a.device, "--_child", str(model_dir), str(rows), str(root / f"mem{rows}.h5")]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            mem.append(json.loads(res.stdout.strip().splitlines()[-1]))

    print(f"device {lm.device}, model 2 layers d_model 128 d_mlp 512 vocab 4096, ctx {CTX}, "
          f"batch {a.batch_rows} rows, store {a.dtype}, {n} tokens, best of {a.repeats}")
    print(f"caching throughput            {n / t_cache:12,.0f} tokens/s")
    print(f"bare forward (with unembed)   {n / t_bare:12,.0f} tokens/s")
    print(f"activation forward, no disk   {n / t_acts:12,.0f} tokens/s")
    print(f"caching without checksums     {n / t_nosum:12,.0f} tokens/s")
    print(f"Fletcher-32 cost, caching     {t_cache / t_nosum:12.3f} x   (with / without checksums)")
    print(f"Fletcher-32 cost, reading     {t_read / t_read_nosum:12.3f} x   (whole store, with / without; "
          f"{n / t_read:,.0f} tokens/s checked)")
    r1, r2 = t_cache / t_bare, t_cache / t_acts
    print(f"caching / bare forward        {r1:12.3f} x   (target <= 1.15: {r1 / 1.15:.2f} of target)")
    print(f"caching / activation forward  {r2:12.3f} x   (target <= 1.15: {r2 / 1.15:.2f} of target)")
    for m in mem:
        print(f"peak RSS at {m['rows'] * CTX:>8,} tokens  {m['peak_mib']:9.1f} MiB "
              f"(+{m['peak_mib'] - m['before_mib']:.1f} MiB while caching)")
    print(f"RSS after each batch at {mem[-1]['rows'] * CTX:,} tokens: last quarter - first quarter = "
          f"{mem[-1]['trend_mib']:+.1f} MiB (allocator noise is ~±50 MiB; a leak would grow with every batch)")
    flat = mem[-1]["peak_mib"] / mem[0]["peak_mib"]
    grow = (mem[-1]["peak_mib"] - mem[-1]["before_mib"]) - (mem[0]["peak_mib"] - mem[0]["before_mib"])
    print(f"peak ratio {mem[-1]['rows'] // mem[0]['rows']}x tokens  {flat:12.3f} x   (target <= 1.10 flat: "
          f"{flat / 1.10:.2f} of target; caching growth differs by {grow:+.1f} MiB)")


if __name__ == "__main__":
    main()
