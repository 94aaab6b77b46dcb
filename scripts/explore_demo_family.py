"""Exploration harness behind the demo family's default configuration (docs/demo_family.md).

Trains K seeds of one configuration on the demo corpus (or reuses them from `--root/--tag`),
then measures, on held-out tokens and at every saved checkpoint, each reference neuron's max
correlation with the other seeds against a Haar-rotation baseline (dense in-memory
computation, independent of the streaming engine). The excess is averaged over the other seeds,
as in the paper. Prints one JSON line and appends it to `--root/results.jsonl`.

    python scripts/explore_demo_family.py --tag relu-4m --n-tokens 4000000 --seeds 2
    python scripts/explore_demo_family.py --tag relu-4m-l3 --layers 3 --n-tokens 4000000 --seeds 2

Training runs with one thread unless TORCH_THREADS is set: two threads thrash on a 2-core
machine that other jobs share.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from universal_neurons.activations import GPT2Config, TokenSetConfig, build_token_set, load_model, mlp_activations
from universal_neurons.demo_data import demo_documents, demo_tokenizer
from universal_neurons.training import TrainConfig, train_family


def token_rows(tok, split: str, n_ctx: int) -> np.ndarray:
    docs = [d["text"] for d in demo_documents(split)]
    return build_token_set(docs, tok, TokenSetConfig(ctx_len=n_ctx)).ids.astype(np.int64)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """`[token, neuron]` -> zero mean, unit norm per column (float32; dead columns become NaN)."""
    x = x.double()
    x = x - x.mean(0)
    return (x / x.norm(dim=0)).float()


def haar(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def activations(seed_dir: Path, step: int, rows: np.ndarray, mask: torch.Tensor, d_mlp: int) -> torch.Tensor:
    """`[token, layer * d_mlp]` post-activations of the counted tokens."""
    lm = load_model(seed_dir, checkpoint=step, process_weights=False)
    parts = []
    for i in range(0, len(rows), 16):
        acts = mlp_activations(lm, torch.from_numpy(rows[i:i + 16]))
        parts.append(torch.cat([v.reshape(-1, d_mlp) for v in acts.values()], dim=1))
    return torch.cat(parts)[mask]


def excess(acts: list[torch.Tensor], n_layers: int, d_mlp: int) -> dict:
    """Max-corr, baseline and excess of the reference's neurons, averaged over the other seeds."""
    gen = torch.Generator().manual_seed(0)
    za = standardize(acts[0])
    mx, bl = [], []
    for y in acts[1:]:
        mx.append(torch.nan_to_num(za.T @ standardize(y), nan=-2).max(1).values)
        rotated = torch.cat([y[:, layer * d_mlp:(layer + 1) * d_mlp] @ haar(d_mlp, gen).T
                             for layer in range(n_layers)], dim=1)
        bl.append(torch.nan_to_num(za.T @ standardize(rotated), nan=-2).max(1).values)
    mx_t, bl_t = torch.stack(mx).mean(0), torch.stack(bl).mean(0)
    dead = torch.isnan(za).any(0)  # never active on these tokens: no correlation, left out of the statistics
    mx_t[dead], bl_t[dead] = float("nan"), float("nan")
    exc = mx_t - bl_t
    per = []
    for layer in range(n_layers):
        s = slice(layer * d_mlp, (layer + 1) * d_mlp)
        e = exc[s][~dead[s]]
        q = e.quantile(torch.tensor([0.5, 0.9, 0.99])).tolist()
        per.append({"layer": layer, "n_dead": int(dead[s].sum()), "max_corr": round(mx_t[s].nanmean().item(), 3),
                    "baseline": round(bl_t[s].nanmean().item(), 3), "excess_mean": round(e.mean().item(), 3),
                    "excess_med": round(q[0], 3), "excess_p90": round(q[1], 3), "excess_p99": round(q[2], 3),
                    "excess_max": round(e.max().item(), 3), "n_univ": int((e > 0.5).sum()),
                    "frac_univ": round((e > 0.5).float().mean().item(), 4)})
    return {"frac_univ": round((exc > 0.5).float().mean().item(), 4), "n_univ": int((exc > 0.5).sum()),
            "layers": per, "universal": torch.nonzero(exc > 0.5).flatten().tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", required=True)
    ap.add_argument("--root", default="/tmp/explore")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-tokens", type=int, default=2_000_000)
    ap.add_argument("--epochs", type=int, default=1, help="passes over the training rows allowed (max_epochs)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--act", default="relu")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--batch-rows", type=int, default=32)
    ap.add_argument("--checkpoints", type=int, default=5, help="log-spaced checkpoints (n_checkpoints)")
    ap.add_argument("--fractions", default="0.5,0.75", help="more checkpoints at these fractions of training")
    ap.add_argument("--eval-tokens", type=int, default=65_536)
    args = ap.parse_args()

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "1")))
    tok = demo_tokenizer()
    mcfg = GPT2Config(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, d_mlp=args.d_mlp,
                      n_ctx=args.n_ctx, d_vocab=len(tok), act_fn=args.act)
    fractions = tuple(float(f) for f in args.fractions.split(",") if f)
    cfg = TrainConfig(model=mcfg, n_tokens=args.n_tokens, lr=args.lr, weight_decay=args.wd,
                      batch_rows=args.batch_rows, max_epochs=args.epochs, n_checkpoints=args.checkpoints,
                      checkpoint_fractions=fractions)
    t0 = time.time()
    load0 = open("/proc/loadavg").read().split()[:3]
    train = token_rows(tok, "train", args.n_ctx)
    held = token_rows(tok, "heldout", args.n_ctx)
    n_val = 65_536 // args.n_ctx
    fam = Path(args.root) / args.tag
    res = train_family(train, held[:n_val], tok, config=cfg, seeds=list(range(args.seeds)), family_dir=fam,
                       show_progress=False)
    t_train = time.time() - t0
    # the demo's studied rows: the held-out rows after the validation ones
    rows = held[n_val:][: args.eval_tokens // args.n_ctx]
    mask = np.ones_like(rows, dtype=bool)
    mask[:, 0] = False
    mask &= rows != tok.eos_token_id
    newline = [i for i in range(len(tok)) if tok.decode([i]) == "\n"]  # the 'paper' newline mask
    mask &= ~np.isin(rows, newline)
    m = torch.from_numpy(mask.reshape(-1))
    out = {"tag": args.tag, "args": vars(args), "train_s": round(t_train, 1), "load_at_start": load0,
           "load_after_training": open("/proc/loadavg").read().split()[:3],
           "val_loss": [round(r.final["val_loss"], 4) for r in res], "steps": {}}
    for step in cfg.checkpoint_steps():
        acts = [activations(r.seed_dir, step, rows, m, args.d_mlp) for r in res]
        stats = excess(acts, args.layers, args.d_mlp)
        if step in (0, cfg.n_steps):
            out["init" if step == 0 else "final"] = stats
        out["steps"][step] = {"frac_univ": stats["frac_univ"], "n_univ": stats["n_univ"],
                              "per_layer": [x["n_univ"] for x in stats["layers"]],
                              "excess_mean": [x["excess_mean"] for x in stats["layers"]]}
    out["total_s"] = round(time.time() - t0, 1)
    print(json.dumps(out))
    with open(Path(args.root) / "results.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
