"""Benchmark of the explanations stage: throughput, cost over a plain read of the same stores,
and peak memory as the tokens grow (prints figures).

    .venv/bin/python benchmarks/bench_explain.py [--rows 32 128] [--universal 20] [--device auto]

A family of three untrained GPT-2s (2 layers, d_model 128, d_mlp 512, vocabulary 4,096) is cached
with `cache_activations` (float16, the default store) on rows of 256 token ids drawn from a
Zipf-like distribution. The neuron set is the default one of `default_groups` on a synthetic
universality table: `--universal` reference neurons with their partners in the two other seeds,
plus 16 contrast groups. Figures:

- pass 1 alone (top-k, the value histogram, and the sums behind every feature's variance
  reduction: 500 unigrams, the classes, letters, positions, for current and previous token), in
  tokens/s and as a ratio to a plain read of the same hooks of the same stores in the same batches;
- the whole stage (`explain_neurons`: pass 1, the quantile examples' pass, the contexts), tokens/s;
- peak resident memory of the whole stage at two token counts, 4x apart, each in a fresh process.
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
import pandas as pd
import torch

os.environ.setdefault("UNIVERSAL_NEURONS_PROGRESS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import PeakRSS, bench_tokenizer  # noqa: E402  (benchmarks/common.py)

from universal_neurons.activations import (  # noqa: E402
    ActivationStore,
    GPT2Config,
    cache_activations,
    hook_name,
    init_gpt2,
    load_model,
    save_model_dir,
)
from universal_neurons.activations.tokens import TokenSet, TokenSetConfig, tokenizer_info  # noqa: E402
from universal_neurons.explain import (  # noqa: E402
    ExplainConfig,
    MainPartial,
    StoreSource,
    default_groups,
    explain_neurons,
    units_of,
    vocab_texts,
)
from universal_neurons.explain.engine import run_pass  # noqa: E402
from universal_neurons.runtime import pick_device  # noqa: E402

CFG = GPT2Config(n_layers=2, d_model=128, n_heads=4, d_mlp=512, n_ctx=256, d_vocab=4096)
CTX, LABELS = 256, ("a", "b", "c")


def _token_set(lm, rows: int) -> TokenSet:
    rng = np.random.default_rng(0)
    p = 1.0 / (np.arange(1, CFG.d_vocab) + 10.0)  # Zipf-like: a few frequent ids, a long tail
    ids = rng.choice(np.arange(1, CFG.d_vocab), size=(rows, CTX), p=p / p.sum()).astype(np.int32)
    ids[:, 0] = 0
    mask = np.ones_like(ids, dtype=bool)
    mask[:, 0] = False
    return TokenSet(ids=ids, mask=mask, doc_index=np.zeros_like(ids), source_rows=np.arange(rows),
                    config=TokenSetConfig(ctx_len=CTX), tokenizer_info=tokenizer_info(lm.tokenizer))


def _table(n_universal: int) -> pd.DataFrame:
    """A universality table of reference a: `n_universal` universal neurons, random partners."""
    rng = np.random.default_rng(1)
    n = CFG.n_layers * CFG.d_mlp
    flat = np.arange(n)
    t = pd.DataFrame({"layer": flat // CFG.d_mlp, "neuron": flat % CFG.d_mlp, "is_universal": False, "dead": False,
                      "excess_corr": rng.uniform(0, 0.4, n)})
    t.loc[rng.choice(n, n_universal, replace=False), ["is_universal", "excess_corr"]] = [True, 0.6]
    for lab in LABELS[1:]:
        partner = rng.integers(0, n, n)
        t[f"partner_layer_{lab}"], t[f"partner_neuron_{lab}"] = partner // CFG.d_mlp, partner % CFG.d_mlp
        t[f"max_corr_{lab}"] = rng.uniform(0.2, 0.9, n)
    return t


def _family(root: Path, rows_list: list[int], device: str) -> tuple[dict[int, dict[str, str]], str]:
    tok = bench_tokenizer()
    stores: dict[int, dict[str, str]] = {}
    model_dir = ""
    for k, lab in enumerate(LABELS):
        d = save_model_dir(init_gpt2(CFG, seed=k), tok, root / f"seed-{lab}", {"name": f"bench-{lab}"})
        model_dir = model_dir or str(d)
        lm = load_model(d, device=device)
        for rows in rows_list:
            path = root / f"{lab}-{rows}.h5"
            cache_activations(lm, _token_set(lm, rows), path, batch_rows=16, progress_bar=False)
            stores.setdefault(rows, {})[lab] = str(path)
    return stores, model_dir


def _setup(stores: dict[str, str], model_dir: str, n_universal: int):
    lm = load_model(model_dir, device="cpu")
    texts = vocab_texts(lm.tokenizer, CFG.d_vocab)
    groups = default_groups(_table(n_universal), list(LABELS), ExplainConfig())
    return StoreSource(stores), groups, texts


def child_memory(stores_json: str, model_dir: str, n_universal: int, device: str) -> None:
    """The whole stage in this fresh process; print resident memory before and its peak during."""
    stores = json.loads(stores_json)
    src, groups, texts = _setup(stores, model_dir, n_universal)
    cfg = ExplainConfig(device=device)
    explain_neurons(src, groups[:1], texts, config=cfg.replace(quantiles=()))  # warm-up: imports, allocator
    with PeakRSS() as mem:
        explain_neurons(src, groups, texts, config=cfg)
    print(json.dumps({"tokens": src.n_tokens, "before_mib": mem.before, "peak_mib": mem.peak}))


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (page cache, allocator)
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs=2, default=[32, 128], help="two token-set sizes, in rows of 256")
    ap.add_argument("--universal", type=int, default=20, help="universal reference neurons (each with 2 partners)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--_child", nargs=2, metavar=("STORES_JSON", "MODEL_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        child_memory(a._child[0], a._child[1], a.universal, a.device)
        return
    device = pick_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        stores, model_dir = _family(Path(tmp), sorted(a.rows), "cpu")
        timed = max(a.rows)  # the larger token set: per-token costs, not the fixed ones (features, contexts)
        src, groups, texts = _setup(stores[timed], model_dir, a.universal)
        units, _ = units_of(groups)
        cfg = ExplainConfig(device=str(device))
        hooks = sorted({(u.label, hook_name(u.layer, "post")) for u in units})

        def plain():
            opened = {lab: ActivationStore.open(p) for lab, p in stores[timed].items()}
            try:
                for r in range(0, src.n_rows, cfg.batch_rows):
                    t0, t1 = r * CTX, min(r + cfg.batch_rows, src.n_rows) * CTX
                    for lab, h in hooks:
                        opened[lab][h][t0:t1]
            finally:
                for s in opened.values():
                    s.close()

        def pass1():
            run_pass(src, units, lambda: MainPartial(len(units), vocab=len(texts), ctx_len=CTX, k=cfg.k, bits=src.bits,
                                                     histogram=True, device=device),
                     lambda s, batch: s.update(batch), [(0, src.n_rows)], cfg, device, "pass 1")

        def whole():
            explain_neurons(src, groups, texts, config=cfg)

        t_plain, t_pass1, t_whole = (_best(f, a.repeats) for f in (plain, pass1, whole))
        n = src.n_tokens
        mem = []
        for rows in sorted(a.rows):
            cmd = [sys.executable, __file__, "--universal", str(a.universal), "--device", a.device,
                   "--_child", json.dumps(stores[rows]), model_dir]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            mem.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"device {device}, 3 models x 2 layers x 512 neurons (float16 stores), ctx {CTX}, vocabulary {CFG.d_vocab}, "
          f"batch {cfg.batch_rows} rows, {n:,} tokens, best of {a.repeats}")
    print(f"neuron set: {a.universal} universal + 16 contrast groups with partners = {len(groups)} groups, "
          f"{len(units)} neurons; {len(hooks)} hooks read")
    print(f"plain read of those hooks      {n / t_plain:12,.0f} tokens/s")
    print(f"pass 1 (top-k + all features)  {n / t_pass1:12,.0f} tokens/s  {t_pass1 / t_plain:6.2f} x the plain read")
    print(f"whole stage (+ quantiles, ctx) {n / t_whole:12,.0f} tokens/s  {t_whole / t_plain:6.2f} x the plain read")
    for m in mem:
        print(f"peak RSS at {m['tokens']:>8,} tokens  {m['peak_mib']:9.1f} MiB "
              f"(+{m['peak_mib'] - m['before_mib']:.1f} MiB during the stage)")
    flat = mem[-1]["peak_mib"] / mem[0]["peak_mib"]
    print(f"peak ratio {mem[-1]['tokens'] // mem[0]['tokens']}x tokens  {flat:12.3f} x   (flat: <= 1.10)")


if __name__ == "__main__":
    main()
