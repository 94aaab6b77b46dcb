"""The subcommands of the built-in seed family: train-seeds and demo."""

from __future__ import annotations

from .flags import (
    ints,
    print_summary,
    say,
)
from .main import command

# ---------------------------------------------------------------------------- train-seeds


def _add_train(p):
    p.add_argument("-o", "--out", required=True, help="family directory (seed-a/, seed-b/, ...)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (one model each)")
    p.add_argument("--text", default=None, help="training text (default: the built-in demo corpus)")
    p.add_argument("--n-tokens", type=int, default=None, help="training tokens per seed")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--d-mlp", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--ctx", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--checkpoints", type=int, default=None, help="number of log-spaced checkpoints")
    p.add_argument("--device", default=None)


@command("train-seeds", "train a family of small GPT-2 models from different "
         "seeds, with checkpoints (resumable)")(_add_train)
def _train(a):
    import dataclasses

    from universal_neurons.demo import DEMO_TRAIN_CONFIG, demo_token_sets, text_stream
    from universal_neurons.demo_data import demo_tokenizer
    from universal_neurons.training import check_seeds, train_family

    seeds = ints(a.seeds, "--seeds")
    check_seeds(seeds)  # before the text is read or anything is trained

    cfg = DEMO_TRAIN_CONFIG
    model_over = {k: v for k, v in {"n_layers": a.layers, "d_model": a.d_model, "d_mlp": a.d_mlp,
                                    "n_heads": a.heads, "n_ctx": a.ctx}.items() if v is not None}
    train_over = {k: v for k, v in {"n_tokens": a.n_tokens, "lr": a.lr, "n_checkpoints": a.checkpoints}.items()
                  if v is not None}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_over), **train_over)
    if a.text:
        tokenizer, train, val = text_stream(a.text, cfg)
    else:
        tokenizer = demo_tokenizer()
        sets = demo_token_sets(tokenizer, n_ctx=cfg.model.n_ctx)
        train, val = sets["train"].ids, sets["val"].ids
    results = train_family(train, val, tokenizer, config=cfg, seeds=seeds, family_dir=a.out, device=a.device)
    for r in results:
        say(f"{r.seed_dir.name} (seed {r.seed}): val loss {r.final['val_loss']:.3f} after {r.final['tokens_seen']:,} "
             f"tokens; checkpoints {[rec['step'] for rec in r.records]}")
    say(f"family -> {a.out}")


# ---------------------------------------------------------------------------- demo


def _add_demo(p):
    p.add_argument("-o", "--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--family-dir", default=None, help="where the trained family is kept (default: user cache)")
    p.add_argument("--retrain", action="store_true", help="train the family again even if cached")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--device", default=None)


@command("demo", "train (or reuse) the built-in seed family and run every stage on it")(_add_demo)
def _demo(a):
    from universal_neurons.demo import run_demo

    res = run_demo(out_dir=a.out, family_dir=a.family_dir, retrain=a.retrain, overwrite=a.overwrite, device=a.device)
    say("validation loss per seed: " + ", ".join(f"{k} {v:.3f}" for k, v in res["val_loss"].items())
         + f" (unigram entropy of the corpus {res['unigram_entropy']:.3f} nats)")
    print_summary(res["summary"])
    for k, v in res["outputs"].items():
        say(f"{k}: {v}")
