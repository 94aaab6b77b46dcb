"""Exploration harness behind the demo family's default configuration (docs/demo_family.md).

Trains K seeds of one configuration on the demo corpus, then measures, on held-out tokens,
each reference neuron's max correlation with the other seeds against a Haar-rotation baseline
(dense in-memory computation, independent of the streaming engine). Prints one JSON line.

    python scripts/explore_demo_family.py --tag base --n-tokens 2000000 --seeds 3
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
    x = x.double()
    x = x - x.mean(0)
    sd = x.norm(dim=0)
    return (x / sd).float()


def haar(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", required=True)
    ap.add_argument("--root", default="/tmp/explore")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-tokens", type=int, default=2_000_000)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--act", default="gelu_new")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--batch-rows", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=100_000)
    args = ap.parse_args()

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "1")))  # 2 threads thrash on a shared 2-core machine
    tok = demo_tokenizer()
    mcfg = GPT2Config(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, d_mlp=args.d_mlp,
                      n_ctx=args.n_ctx, d_vocab=len(tok), act_fn=args.act)
    cfg = TrainConfig(model=mcfg, n_tokens=args.n_tokens, lr=args.lr, weight_decay=args.wd, batch_rows=args.batch_rows)
    t0 = time.time()
    train = token_rows(tok, "train", args.n_ctx)
    held = token_rows(tok, "heldout", args.n_ctx)
    n_val = 65_536 // args.n_ctx
    fam = Path(args.root) / args.tag
    res = train_family(train, held[:n_val], tok, config=cfg, seeds=list(range(args.seeds)), family_dir=fam,
                       show_progress=False)
    t_train = time.time() - t0
    # evaluation rows from the other end of the held-out split, never seen in validation
    rows_ = held[n_val:][: args.eval_tokens // args.n_ctx]
    n_rows = len(rows_)
    rows = rows_
    mask = np.ones_like(rows, dtype=bool)
    mask[:, 0] = False
    mask &= rows != tok.eos_token_id
    nl = [i for i in range(len(tok)) if "\n" in tok.decode([i]) and tok.decode([i]).strip() == ""]
    mask &= ~np.isin(rows, nl)
    m = torch.from_numpy(mask.reshape(-1))
    out = {"tag": args.tag, "args": vars(args), "train_s": round(t_train, 1),
           "val_loss": [r.final["val_loss"] for r in res]}
    for step_kind in ("init", "final"):
        acts = []
        for r in res:
            lm = load_model(r.seed_dir, checkpoint=0 if step_kind == "init" else None, process_weights=False)
            parts = []
            for i in range(0, n_rows, 16):
                a = mlp_activations(lm, torch.from_numpy(rows[i:i + 16]))
                parts.append(torch.cat([v.reshape(-1, args.d_mlp) for v in a.values()], dim=1))
            acts.append(torch.cat(parts)[m])
        gen = torch.Generator().manual_seed(0)
        za = standardize(acts[0])
        mx, bl = [], []
        for y in acts[1:]:
            zy = standardize(y)
            c = za.T @ zy
            c = torch.nan_to_num(c, nan=-2)
            mx.append(c.max(1).values)
            ry = torch.cat([y[:, layer * args.d_mlp:(layer + 1) * args.d_mlp] @ haar(args.d_mlp, gen).T
                            for layer in range(args.layers)], dim=1)
            cb = torch.nan_to_num(za.T @ standardize(ry), nan=-2)
            bl.append(cb.max(1).values)
        mx_t, bl_t = torch.stack(mx), torch.stack(bl)
        exc = (mx_t - bl_t).mean(0)
        per = []
        for layer in range(args.layers):
            s = slice(layer * args.d_mlp, (layer + 1) * args.d_mlp)
            e = exc[s]
            per.append({"layer": layer, "max_corr": round(mx_t[:, s].mean().item(), 3),
                        "baseline": round(bl_t[:, s].mean().item(), 3),
                        "excess_med": round(e.median().item(), 3), "excess_p90": round(e.quantile(0.9).item(), 3),
                        "excess_max": round(e.max().item(), 3), "frac_univ": round((e > 0.5).float().mean().item(), 4)})
        out[step_kind] = {"frac_univ": round((exc > 0.5).float().mean().item(), 4), "layers": per}
    out["total_s"] = round(time.time() - t0, 1)
    print(json.dumps(out))
    with open(Path(args.root) / "results.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
