"""The built-in demo: a seed family trained offline on the shipped public-domain corpus,
then every stage of the pipeline on held-out text.

    universal-neurons demo            # train (or reuse) the family, run everything
    run_demo(out_dir="runs/demo")     # the same from Python

The family is cached under the user cache directory (`$XDG_CACHE_HOME/universal-neurons`,
or `~/.cache/universal-neurons`), keyed by a hash of its training configuration, so a second
run reuses it. The held-out split of the corpus is never trained on: its first rows score
validation loss during training, the rest are the token set the pipeline studies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from universal_neurons.activations import GPT2Config, TokenSet, TokenSetConfig, build_token_set
from universal_neurons.artifacts import read_json, write_json
from universal_neurons.errors import ConfigError
from universal_neurons.runtime import to_json

from .demo_data import demo_documents, demo_tokenizer
from .training import TrainConfig, train_family

__all__ = [
    "DEMO_TRAIN_CONFIG",
    "DEMO_SEEDS",
    "DEMO_EVAL_TOKENS",
    "TINY_DEMO_CONFIG",
    "DEMO_THRESHOLD",
    "demo_family_dir",
    "demo_token_sets",
    "text_stream",
    "unigram_entropy",
    "run_demo",
]

log = logging.getLogger(__name__)

# Chosen by measurement (docs/demo_family.md): see that page for what each alternative reached.
DEMO_TRAIN_CONFIG = TrainConfig(
    # ReLU, not GPT-2's GELU: at this size only ReLU seeds share neurons past the paper's cut; d_model 64 with
    # d_mlp 256 (GPT-2's ratio) puts the largest share of neurons past it (1.6% of 512 over five seeds)
    model=GPT2Config(n_layers=2, d_model=64, n_heads=4, d_mlp=256, n_ctx=256, d_vocab=4096, act_fn="relu"),
    n_tokens=8_000_000,  # 1.6 passes over the 5.1M training tokens
    max_epochs=2,
    checkpoint_fractions=(0.5, 0.75),  # universal neurons form after ~2M tokens: three checkpoints in the last half
)
DEMO_SEEDS = (0, 1, 2, 3, 4)  # five seeds, as in the follow-up paper
DEMO_THRESHOLD = 0.5  # the paper's cut on excess correlation
# A family small enough to train in seconds: for tests and for notebooks run in CI.
TINY_DEMO_CONFIG = TrainConfig(
    model=GPT2Config(n_layers=2, d_model=64, n_heads=4, d_mlp=128, n_ctx=64, d_vocab=4096),
    n_tokens=400_000, batch_rows=16, warmup_steps=10, n_checkpoints=4, eval_tokens=8192,
)
# 128 held-out rows of 256 studied by the pipeline: 65,536 found the same eight universal neurons, in twice the time
DEMO_EVAL_TOKENS = 32_768
_VAL_TOKENS = 65_536  # first held-out tokens: validation loss during training
# held-out tokens after the studied ones, where ablation (100 sets: the universal one and 99 controls) and
# agreement are measured; 32 rows detect a planted harmful set at p <= 0.02 (docs/demo_family.md)
_ABLATION_TOKENS = 8_192


def _cache_root() -> Path:
    """`$XDG_CACHE_HOME/universal-neurons`, or `~/.cache/universal-neurons`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "universal-neurons"


def demo_family_dir(config: TrainConfig = DEMO_TRAIN_CONFIG, seeds=DEMO_SEEDS) -> Path:
    """Where the demo family with this configuration is cached.

    Args:
        config: the family's training settings.
        seeds: its seeds.

    Returns:
        `<cache>/demo-family-<hash of config and seeds>`.
    """
    key = hashlib.sha256(to_json({"config": config.to_dict(), "seeds": list(seeds)}).encode()).hexdigest()[:10]
    return _cache_root() / f"demo-family-{key}"


def demo_token_sets(tokenizer=None, *, n_ctx: int = 256, eval_tokens: int = DEMO_EVAL_TOKENS,
                    cache_dir: Path | None = None) -> dict[str, TokenSet]:
    """Token sets of the demo corpus, cached as HDF5.

    Args:
        tokenizer: default the demo tokenizer.
        n_ctx: tokens per row, BOS included.
        eval_tokens: held-out tokens the pipeline studies.
        cache_dir: where the tokenised splits are cached (default under the user cache).

    Returns:
        `train` (every training row), `val` (the first 65,536 held-out tokens), `eval` (the
        following held-out rows, `eval_tokens` of them) and `ablation` (up to 8,192 held-out
        tokens after those, when any are left); each `[row, pos]` with pos = `n_ctx`.

    Raises:
        ConfigError: the held-out split is too short for `eval_tokens`.
    """
    tokenizer = tokenizer or demo_tokenizer()
    cache_dir = Path(cache_dir or _cache_root() / "demo-tokens")
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "heldout"):
        path = cache_dir / f"{split}-ctx{n_ctx}.h5"
        if path.exists():
            out[split] = TokenSet.load(path)
            continue
        docs = [doc["text"] for doc in demo_documents(split)]
        token_set = build_token_set(docs, tokenizer, TokenSetConfig(ctx_len=n_ctx))
        token_set.source.update({"kind": "demo-corpus", "split": split})
        token_set.save(path, overwrite=True)  # a cache: whatever is there was made from the same corpus
        out[split] = token_set
    held = out.pop("heldout")
    n_val, n_eval = _VAL_TOKENS // n_ctx, eval_tokens // n_ctx
    if held.n_rows < n_val + n_eval:
        raise ConfigError(f"the held-out split has {held.n_rows} rows of {n_ctx}; the demo needs "
                          f"{n_val} for validation plus {n_eval} to study: lower eval_tokens")
    out["val"] = held.select_rows(0, n_val)
    out["eval"] = held.select_rows(n_val, n_val + n_eval)
    # ablation is measured on held-out rows that neither scored training nor fed the correlations
    n_abl = min(held.n_rows - n_val - n_eval, _ABLATION_TOKENS // n_ctx)
    if n_abl > 0:
        out["ablation"] = held.select_rows(n_val + n_eval, n_val + n_eval + n_abl)
        # recorded so that the ablation result states its tokens are held out of the studied ones
        out["ablation"].source["held_out_from"] = {"hash": out["eval"].hash, "n_rows": out["eval"].n_rows,
                                                   "disjoint_rows": True}
    return out


def text_stream(text, config: TrainConfig, tokenizer=None) -> tuple[Any, np.ndarray, np.ndarray]:
    """Training and validation rows from a user's text (5% of rows held out for validation).

    Args:
        text: what `build_token_set` reads.
        config: the training settings (their `n_ctx`).
        tokenizer: default the demo tokenizer.

    Returns:
        `(tokenizer, train_rows, val_rows)`, rows `[row, pos]` with pos = `n_ctx`.
    """
    tokenizer = tokenizer or demo_tokenizer()
    token_set = build_token_set(text, tokenizer, TokenSetConfig(ctx_len=config.model.n_ctx, shuffle=True, seed=0))
    n_val = max(1, token_set.n_rows // 20)
    return tokenizer, token_set.ids[n_val:], token_set.ids[:n_val]


def unigram_entropy(rows: np.ndarray, d_vocab: int) -> float:
    """Entropy (nats) of the unigram token distribution: the loss of a model that ignores context.

    Args:
        rows: `[row, pos]` token ids; the BOS column is left out.
        d_vocab: the vocabulary size.

    Returns:
        The entropy in nats.
    """
    counts = np.bincount(rows[:, 1:].ravel(), minlength=d_vocab).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def _timed(name: str, stage, timings: dict[str, float]):
    """`stage`, recording its seconds in `timings[name]`."""

    def run(result):
        start = time.perf_counter()
        try:
            return stage(result)
        finally:
            timings[name] = time.perf_counter() - start

    return run


def run_demo(
    *,
    out_dir: str | os.PathLike = "runs/demo",
    family_dir: str | os.PathLike | None = None,
    retrain: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    config: TrainConfig = DEMO_TRAIN_CONFIG,
    seeds=DEMO_SEEDS,
    eval_tokens: int = DEMO_EVAL_TOKENS,
    threshold: float = DEMO_THRESHOLD,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse) the demo family and run every stage of the pipeline on held-out text.

    Args:
        out_dir: where the pipeline's outputs go.
        family_dir: where the family is trained (default: the user cache, keyed by `config` and `seeds`).
        retrain: delete the cached family first.
        overwrite: replace outputs of an earlier run in `out_dir`.
        device: where to train and compute; None picks CUDA when present.
        config: the family's training settings.
        seeds: one seed per model.
        eval_tokens: held-out tokens the pipeline studies.
        threshold: the cut on excess correlation.
        show_progress: show progress bars.

    Returns:
        A dict with `family_dir`, `val_loss` per seed, `training_records`, `unigram_entropy`,
        `timings` (seconds per stage), the pipeline `summary`, `outputs` (name -> path) and
        the universality `table`.
    """
    from .ablation import AblationConfig, ablation_stage
    from .agreement import agreement_stage
    from .explain import explain_stage
    from .persistence import persistence_stage
    from .pipeline import PipelineConfig, run_pipeline
    from .properties import properties_stage
    from .report import report_stage

    start = time.perf_counter()
    timings: dict[str, float] = {}
    tokenizer = demo_tokenizer()
    sets = demo_token_sets(tokenizer, n_ctx=config.model.n_ctx, eval_tokens=eval_tokens)
    family = Path(family_dir) if family_dir else demo_family_dir(config, seeds)
    if retrain and family.exists():
        shutil.rmtree(family)
    results = train_family(sets["train"].ids, sets["val"].ids, tokenizer, config=config, seeds=seeds,
                           family_dir=family, device=device, show_progress=show_progress)
    timings["train"] = time.perf_counter() - start
    seed_dirs = [r.seed_dir for r in results]
    out = Path(out_dir)
    pcfg = PipelineConfig(tokens=sets["eval"].config, threshold=threshold, device=device)
    pipeline_start = time.perf_counter()
    stages = [
        _timed("properties", properties_stage(), timings),
        _timed("ablation", ablation_stage(AblationConfig(), eval_tokens=sets.get("ablation"), overwrite=overwrite,
                                          device=device), timings),
        _timed("persistence", persistence_stage(seed_dirs, config=pcfg), timings),
        # how alike the seeds' outputs are, on the ablation's held-out rows, at every saved checkpoint
        _timed("agreement", agreement_stage(tokens=sets.get("ablation"), device=device, overwrite=overwrite),
               timings),
        _timed("explanations", explain_stage(), timings),
        _timed("report", report_stage, timings),  # last: it reads what the others wrote
    ]
    run = run_pipeline(seed_dirs, sets["eval"], out, config=pcfg, overwrite=overwrite, extra_stages=stages)
    timings["pipeline"] = time.perf_counter() - pipeline_start
    demo = {
        "family_dir": str(family),
        "val_loss": {r.seed_dir.name: r.final["val_loss"] for r in results},
        "training_records": {r.seed_dir.name: r.records for r in results},
        "unigram_entropy": unigram_entropy(sets["train"].ids, config.model.d_vocab),
        "timings": timings,
    }
    summary = read_json(out / "summary.json", what="run summary")
    summary["demo"] = demo
    write_json(out / "summary.json", summary, overwrite=True)  # the run's own summary, completed
    outputs = {"summary": str(out / "summary.json"), "universality table": str(out / "universality.csv")}
    for name, path in (("properties", "properties.csv"), ("ablation", "ablation/ablation_summary.csv"),
                       ("persistence", "persistence/persistence_overall.csv"), ("agreement", "agreement/agreement.csv"),
                       ("explanations", "explanations/neurons.csv"), ("report", "report.html")):
        if (out / path).exists():
            outputs[name] = str(out / path)
    return {**demo, "summary": summary, "outputs": outputs, "table": run.table}
