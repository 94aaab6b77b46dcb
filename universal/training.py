"""Train a seed family: K GPT-2-style models of one configuration, each from its own seed
(initialisation and data order), with checkpoints saved like the hub's `checkpoint-{step}`.

Token rows in (BOS first, like every token set of the toolkit), model directories out:

    family_dir/seed-a/checkpoint-0/      config.json, weights, tokenizer, universal_neurons.json
    family_dir/seed-a/checkpoint-120/
    family_dir/seed-a/resume.pt          optimiser state of the last checkpoint (for resuming)

Each checkpoint directory loads offline with `universal_neurons.activations.load_model(seed_dir, checkpoint=step)`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from universal_neurons.activations import GPT2Config, checkpoint_dir, init_gpt2, list_checkpoints, save_model_dir
from universal_neurons.artifacts import atomic_path, plain, read_json, write_json
from universal_neurons.config import Config
from universal_neurons.errors import ConfigError, InputError, OutputExistsError
from universal_neurons.runtime import package_versions, pick_device, progress

__all__ = [
    "TrainConfig", "TrainResult", "train_seed", "train_family", "check_seeds", "log_spaced_steps", "seed_label",
    "next_token_loss",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig(Config):
    """How each seed of a family is trained. The demo family's settings are
    `universal_neurons.demo.DEMO_TRAIN_CONFIG` (docs/demo_family.md has the measurements behind them)."""

    model: GPT2Config = field(default_factory=GPT2Config)
    n_tokens: int = 4_000_000  # training tokens per seed
    max_epochs: int = 1  # passes over the training rows n_tokens may take (each pass in a fresh order)
    batch_rows: int = 32  # rows of n_ctx tokens per optimiser step
    lr: float = 3e-3  # peak AdamW learning rate; small models tolerate a high one
    warmup_steps: int = 50  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # GPT-2 / nanoGPT default, on matrices only
    betas: tuple[float, float] = (0.9, 0.95)  # nanoGPT's betas for short runs
    grad_clip: float = 1.0
    n_checkpoints: int = 5  # saved at log-spaced steps, always including 0 and the last step
    # more checkpoints at these fractions of training: late-forming structure seen at several steps
    checkpoint_fractions: tuple[float, ...] = ()
    bf16: bool = True  # bf16 autocast: ~1.5-7x faster on CPU than fp32, fp32 master weights
    eval_tokens: int = 65_536  # validation tokens scored at every checkpoint

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):  # GPT2Config is a plain dataclass: from_dict leaves it a dict
            object.__setattr__(self, "model", GPT2Config(**self.model))
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "checkpoint_fractions", tuple(self.checkpoint_fractions))
        for name in ("n_tokens", "batch_rows", "n_checkpoints", "max_epochs"):
            if int(getattr(self, name)) <= 0:
                self.fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_checkpoints < 2:
            self.fail("n_checkpoints must be >= 2 (step 0 and the last step)")
        if not self.lr > 0:
            self.fail(f"lr must be positive, got {self.lr}")
        if not all(0 < f < 1 for f in self.checkpoint_fractions):
            self.fail(f"checkpoint_fractions must lie strictly between 0 and 1, got {self.checkpoint_fractions}")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimiser step: `batch_rows * n_ctx`."""
        return self.batch_rows * self.model.n_ctx

    @property
    def n_steps(self) -> int:
        """Optimiser steps of a seed (at least one)."""
        return max(1, self.n_tokens // self.tokens_per_step)

    def checkpoint_steps(self) -> list[int]:
        """The steps saved as `checkpoint-<step>/`: `log_spaced_steps` and `checkpoint_fractions`."""
        extra = {int(round(f * self.n_steps)) for f in self.checkpoint_fractions}
        return sorted(set(log_spaced_steps(self.n_steps, self.n_checkpoints)) | extra)


@dataclass
class TrainResult:
    """One trained seed.

    Attributes:
        seed: its initialisation and data-order seed.
        seed_dir: the directory holding its `checkpoint-<step>/` directories.
        records: one training record per checkpoint (seed, step, tokens seen, losses, config).
    """

    seed: int
    seed_dir: Path
    records: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        """The record of the last checkpoint."""
        return self.records[-1]


def seed_label(k: int) -> str:
    """The label of the `k`-th model of a family: `a, b, c, ...` (the reference is `a`), then `s26, s27, ...`."""
    return chr(ord("a") + k) if k < 26 else f"s{k}"


def log_spaced_steps(n_steps: int, n: int) -> list[int]:
    """`n` checkpoint steps from 0 to `n_steps`, log-uniform in between (like the Stanford
    checkpoints, dense early when representations change fastest).

    Args:
        n_steps: the last step.
        n: how many steps (every step when `n_steps < n`).

    Returns:
        The steps, ascending, 0 and `n_steps` included.
    """
    if n_steps < n:
        return list(range(0, n_steps + 1))
    inner = np.geomspace(max(1.0, n_steps / 64), n_steps, n - 1)  # first step ~1.5% into training
    return sorted({0, *(int(round(s)) for s in inner), n_steps})


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decayed = (step - cfg.warmup_steps) / max(1, cfg.n_steps - cfg.warmup_steps)  # fraction of the cosine
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, decayed))))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [param for param in model.parameters() if param.dim() >= 2]
    no_decay = [param for param in model.parameters() if param.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW: one kernel for all parameters, several times faster than foreach on CPU here
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


def ce_chunk_rows(device: torch.device) -> int:
    """Token rows per chunk of the fused unembedding + cross-entropy: on a CPU 128 rows keep
    the `[128, d_vocab]` fp32 logits of the demo's vocabulary (2 MB) in cache; a GPU wants big GEMMs."""
    return 128 if device.type == "cpu" else 8192


def _ce_chunks(hidden: torch.Tensor, w_u: torch.Tensor, targets: torch.Tensor, *, chunk: int, grads: bool):
    """Summed cross-entropy of `hidden @ w_u.T` against `targets`, chunk by chunk, and (when
    `grads`) the gradients of the mean loss: the `[token, d_vocab]` logits are never held whole.

    Args:
        hidden: `[token, d_model]` final residual stream (after ln_f), in the GEMM dtype.
        w_u: `[d_vocab, d_model]` unembedding, in the GEMM dtype.
        targets: `[token]` next-token ids.
        chunk: tokens per chunk.
        grads: also return d(mean loss)/d hidden and d(mean loss)/d w_u.

    Returns:
        `(loss_sum, grad_hidden, grad_w_u)`, loss_sum a float64 scalar; the gradients are fp32
        `[token, d_model]` and `[d_vocab, d_model]`, or None when not `grads`.
    """
    n = targets.numel()
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if grads else None
    grad_w = torch.zeros(w_u.shape, dtype=torch.float32, device=hidden.device) if grads else None
    for s in range(0, n, chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        logits = torch.mm(h, w_u.T).float()  # [chunk, d_vocab], fp32 for the softmax (as autocast does)
        target_logit = logits.gather(1, t[:, None])
        top = logits.amax(1, keepdim=True)
        probs = logits.sub_(top).exp_()  # one exp pass serves both the loss and its gradient
        total = probs.sum(1, keepdim=True)
        loss += (top + total.log() - target_logit).sum(dtype=torch.float64)
        if grad_h is not None and grad_w is not None:
            probs.div_(total)
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            d_logits = probs.mul_(1.0 / n).to(w_u.dtype)  # d(mean loss)/d logits, [chunk, d_vocab]
            grad_h[s : s + chunk] = torch.mm(d_logits, w_u)
            grad_w += torch.mm(d_logits.T, h)
    return loss, grad_h, grad_w


class _FusedUnembedCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy of `hidden @ w_u.T`, with the backward pass done in the
    forward pass, chunk by chunk (the loss is the graph's last node, so its incoming gradient is
    a scalar). Same arithmetic as bf16 autocast on `lm_head` plus fp32 `cross_entropy`, without
    materialising the logits: about 3x faster on a CPU for the demo's 4,096-token vocabulary."""

    @staticmethod
    def forward(ctx, hidden, w_u, targets, chunk, gemm_dtype):
        loss, grad_h, grad_w = _ce_chunks(hidden.to(gemm_dtype), w_u.to(gemm_dtype), targets, chunk=chunk,
                                          grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        return (loss / targets.numel()).float()

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def next_token_loss(model, batch: torch.Tensor, *, bf16: bool) -> torch.Tensor:
    """Mean next-token cross-entropy of a Hugging Face GPT-2 over every position of `batch`.

    The transformer body runs under bf16 autocast (when `bf16`); the unembedding and the loss are
    fused (`_FusedUnembedCrossEntropy`): bf16 GEMMs, fp32 softmax, gradients computed chunk by
    chunk, equal to `cross_entropy(model(batch).logits[:, :-1].float(), batch[:, 1:])` up to bf16
    rounding. Under `torch.no_grad()` no gradient is computed.

    Args:
        model: a `GPT2LMHeadModel` (its `lm_head` has no bias and is tied to `wte`).
        batch: `[batch, pos]` token ids.
        bf16: bf16 autocast and bf16 unembedding GEMMs; fp32 otherwise.

    Returns:
        The scalar loss (nats).
    """
    with torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.transformer(batch).last_hidden_state  # [batch, pos, d_model]
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [token, d_model]
    targets = batch[:, 1:].reshape(-1)
    gemm_dtype = torch.bfloat16 if bf16 else torch.float32
    chunk = ce_chunk_rows(batch.device)
    w_u = model.lm_head.weight  # [d_vocab, d_model]
    if torch.is_grad_enabled():
        return _FusedUnembedCrossEntropy.apply(hidden, w_u, targets, chunk, gemm_dtype)
    loss, _, _ = _ce_chunks(hidden.to(gemm_dtype), w_u.to(gemm_dtype), targets, chunk=chunk, grads=False)
    return (loss / targets.numel()).float()


@torch.no_grad()
def _evaluate(model, rows: torch.Tensor, batch_rows: int, bf16: bool) -> float:
    """Mean next-token loss over `rows` `[row, pos]`."""
    model.eval()
    total, n_rows = 0.0, 0
    for start in range(0, len(rows), batch_rows):
        batch = rows[start : start + batch_rows]
        total += next_token_loss(model, batch, bf16=bf16).item() * len(batch)
        n_rows += len(batch)
    model.train()
    return total / max(n_rows, 1)


def train_seed(
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    tokenizer,
    *,
    config: TrainConfig,
    seed: int,
    seed_dir: str | os.PathLike,
    name: str | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train one seed and save its checkpoints; resumes from `seed_dir` if a run was killed.

    Args:
        train_rows: `Int[ndarray, "row pos"]` training token rows with BOS first, pos = n_ctx
            (`TokenSet.ids` of `build_token_set(..., TokenSetConfig(ctx_len=n_ctx))`).
        val_rows: `Int[ndarray, "row pos"]` validation rows, the same way.
        tokenizer: saved next to every checkpoint.
        config: the training settings.
        seed: initialisation and data order.
        seed_dir: where `checkpoint-{step}/` directories and `resume.pt` go.
        name: the model's name in its training records (default: the directory's name).
        device: where to train; None picks CUDA when present.
        show_progress: show a progress bar.

    Returns:
        A `TrainResult` with one training record per checkpoint (seed, step, tokens seen,
        train and validation loss).

    Raises:
        InputError: the rows have the wrong shape, a token outside the vocabulary, or are too few.
        OutputExistsError: `seed_dir` holds a run of another configuration or seed.
    """
    cfg = config
    dev = pick_device(device)
    seed_dir = Path(seed_dir)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    rows = np.asarray(train_rows, dtype=np.int64)
    for what, checked in (("training", rows), ("validation", val_rows)):
        if checked.ndim != 2 or checked.shape[1] != cfg.model.n_ctx:
            raise InputError(
                f"{what} rows have shape {checked.shape}; expected (rows, n_ctx={cfg.model.n_ctx}): build them with "
                f"TokenSetConfig(ctx_len={cfg.model.n_ctx})")
        if int(checked.max()) >= cfg.model.d_vocab:
            raise InputError(
                f"token id {int(checked.max())} in the {what} rows is outside the model's vocabulary "
                f"({cfg.model.d_vocab}); set GPT2Config.d_vocab to the tokenizer's size")
    need = cfg.n_steps * cfg.batch_rows
    if need > len(rows) * cfg.max_epochs:
        raise InputError(
            f"training {cfg.n_tokens:,} tokens needs {need} rows of {cfg.model.n_ctx} but the training text has "
            f"{len(rows)} ({len(rows) * cfg.model.n_ctx:,} tokens) and max_epochs={cfg.max_epochs}; lower n_tokens, "
            "add text or raise max_epochs"
        )
    n_val = max(1, cfg.eval_tokens // cfg.model.n_ctx)
    val_batch = torch.from_numpy(np.asarray(val_rows, dtype=np.int64)[:n_val]).to(dev)  # [row, pos]
    # data order is part of the seed: one permutation per pass (the first as for a single pass)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(rows)) for _ in range(-(-need // len(rows)))])[:need]
    steps = cfg.checkpoint_steps()

    model = init_gpt2(cfg.model, seed=seed, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id or bos).to(dev)
    opt = _optimizer(model, cfg)
    records: list[dict[str, Any]] = []
    start = 0
    resume = seed_dir / "resume.pt"
    done = [step for step in list_checkpoints(seed_dir) if step in steps]
    if done and resume.exists():
        state = torch.load(resume, map_location=dev, weights_only=False)
        if state["config"] != plain(cfg.to_dict()) or state["seed"] != seed:
            raise OutputExistsError(
                f"{seed_dir} holds a run with another configuration or seed; choose a new directory "
                "or delete it to start over"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, records = state["step"], state["records"]
        log.info("resuming %s from step %d", seed_dir, start)
    model.train()

    def checkpoint(step: int, train_loss: float | None) -> None:
        val = _evaluate(model, val_batch, cfg.batch_rows, cfg.bf16)
        rec = {
            "name": name or seed_dir.name,
            "seed": seed,
            "step": step,
            "tokens_seen": step * cfg.tokens_per_step,
            "train_loss": train_loss,
            "val_loss": val,
            "config": cfg.to_dict(),
            "versions": package_versions(),
        }
        records.append(rec)
        save_model_dir(model, tokenizer, checkpoint_dir(seed_dir, step), rec)
        # atomic: a kill never leaves a half-written resume file
        with atomic_path(resume, overwrite=True) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "records": records, "seed": seed, "config": plain(cfg.to_dict())}, tmp)

    if start == 0 and not done:
        checkpoint(0, None)
    bar = progress(range(start, cfg.n_steps), enabled=show_progress, desc=f"train {name or seed_dir.name}",
                   unit="step", initial=start, total=cfg.n_steps)
    t0, ema = time.perf_counter(), None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        idx = order[step * cfg.batch_rows : (step + 1) * cfg.batch_rows]
        batch = torch.from_numpy(rows[idx]).to(dev)
        loss = next_token_loss(model, batch, bf16=cfg.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        done_steps = step + 1
        if step % 10 == 0:
            rate = (done_steps - start) * cfg.tokens_per_step / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{rate:,.0f}")
        if done_steps in steps:
            checkpoint(done_steps, ema)
    bar.close()
    return TrainResult(seed=seed, seed_dir=seed_dir, records=records)


def check_seeds(seeds: Sequence[int]) -> None:
    """Refuse a seed list that cannot make a family: empty, one seed (nothing to compare),
    repeated seeds (two identical models), or seeds that are not non-negative integers.

    Raises:
        ConfigError: naming the problem and the `--seeds` fix.
    """
    seeds = list(seeds)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0]
    if bad:
        raise ConfigError(f"seeds must be non-negative integers, got {bad}; fix --seeds (e.g. --seeds 0,1,2,3,4)")
    if len(seeds) < 2:
        raise ConfigError(f"a seed family needs at least two seeds, got {seeds}; pass e.g. --seeds 0,1,2,3,4")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"seed(s) {repeated} repeated: the same seed trains the same model twice; "
                          "pass distinct seeds to --seeds")


def train_family(
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    tokenizer,
    *,
    config: TrainConfig,
    seeds: Sequence[int],
    family_dir: str | os.PathLike,
    device: str | None = None,
    show_progress: bool = True,
) -> list[TrainResult]:
    """Train every seed into `family_dir/seed-{a,b,...}`; finished seeds are reused, killed ones resumed.

    Args:
        train_rows: `Int[ndarray, "row pos"]` training token rows (see `train_seed`).
        val_rows: `Int[ndarray, "row pos"]` validation rows.
        tokenizer: saved next to every checkpoint.
        config: the training settings of every seed.
        seeds: one seed per model; the first is the reference `seed-a`.
        family_dir: where the seed directories and `family.json` (configuration and seeds) go.
        device: where to train; None picks CUDA when present.
        show_progress: show progress bars.

    Returns:
        One `TrainResult` per seed, in order.

    Raises:
        ConfigError: no seeds, a repeated seed, or a seed that is not a non-negative integer.
        OutputExistsError: `family_dir` holds a family of another configuration or seeds.
        InputError: see `train_seed`.
    """
    check_seeds(seeds)
    family_dir = Path(family_dir)
    family_dir.mkdir(parents=True, exist_ok=True)
    manifest = family_dir / "family.json"
    spec = plain({"config": config.to_dict(), "seeds": list(map(int, seeds))})
    if manifest.exists():
        old = read_json(manifest, what="family manifest")
        if old.get("config") != spec["config"] or old.get("seeds") != spec["seeds"]:
            raise OutputExistsError(
                f"{family_dir} holds a family trained with another configuration or seeds; pass a new "
                "directory, or delete it to retrain"
            )
    else:
        write_json(manifest, spec)
    out = []
    steps = config.checkpoint_steps()
    for k, seed in enumerate(seeds):
        seed_dir = family_dir / f"seed-{seed_label(k)}"
        if list_checkpoints(seed_dir)[-1:] == [steps[-1]]:
            records = [read_json(checkpoint_dir(seed_dir, step) / "universal_neurons.json", what="training record")
                       for step in steps]
            log.info("reusing %s (already trained)", seed_dir)
            out.append(TrainResult(seed=seed, seed_dir=seed_dir, records=records))
            continue
        out.append(train_seed(train_rows, val_rows, tokenizer, config=config, seed=seed, seed_dir=seed_dir,
                              name=f"seed-{seed_label(k)}", device=device, show_progress=show_progress))
    return out
