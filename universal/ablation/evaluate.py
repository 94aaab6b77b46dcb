"""The evaluation engine: forward passes with a set of neurons overwritten at
`blocks.{layer}.mlp.hook_post`, reduced to per-row sums of the counted predictions."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from universal_neurons.activations import LoadedModel, TokenSet, run_with_post_hooks
from universal_neurons.errors import ConfigError, IncompatibleInputsError, InputError
from universal_neurons.runtime import progress

from .neurons import Neurons

__all__ = ["RowSums", "Sink", "auto_batch_rows", "check_counted", "check_tokens", "counted_predictions",
           "evaluate", "hooks_for"]

_LOGIT_BUDGET = 128 << 20  # bytes of fp32 logits per batch when batch_rows is automatic

Writer = Callable[..., torch.Tensor]  # f(act: [batch, pos, d_mlp], where: [batch, pos] | None) -> act
Hooks = dict[int, Writer]


def check_tokens(lm: LoadedModel, ts: TokenSet) -> None:
    """Refuse a token set the model cannot run: empty, rows longer than `n_ctx`, ids outside the vocabulary.

    Raises:
        InputError: an empty token set.
        IncompatibleInputsError: rows or token ids that do not fit the model.
    """
    if ts.n_rows == 0:
        raise InputError("the token set is empty (0 rows); build one with build_token_set on more text")
    if ts.ctx_len > lm.n_ctx:
        raise IncompatibleInputsError(f"the token set's rows have ctx_len={ts.ctx_len} but {lm.name} accepts at "
                                      f"most n_ctx={lm.n_ctx}; rebuild it with TokenSetConfig(ctx_len<={lm.n_ctx})")
    top = int(ts.ids.max())
    if top >= lm.d_vocab or int(ts.ids.min()) < 0:
        raise IncompatibleInputsError(f"the token set holds token id {top} but {lm.name} has a vocabulary of "
                                      f"{lm.d_vocab}; it was built with another tokenizer: rebuild it with this "
                                      "model's")


def counted_predictions(mask: np.ndarray) -> np.ndarray:
    """Which predictions are counted.

    Args:
        mask: `Bool[ndarray, "row pos"]`, the token set's mask.

    Returns:
        `Bool[ndarray, "row pos"]`: True where the prediction made at `pos` (of token pos+1) is
        counted, i.e. `mask[pos] & mask[pos + 1]`; the last position is never counted.
    """
    out = np.zeros_like(mask, dtype=bool)
    out[:, :-1] = mask[:, :-1] & mask[:, 1:]
    return out


def check_counted(counted: np.ndarray) -> None:
    """Refuse a token set without a single counted prediction (`Bool[ndarray, "row pos"]`).

    Raises:
        InputError: nothing is counted.
    """
    if not counted.any():
        raise InputError(
            "the token set has no counted predictions: a prediction is counted where a position and the next one are "
            "both masked-in, and the mask excludes every such pair; rebuild the token set with a laxer mask "
            "(e.g. exclude_newlines=False) or on more text")


def auto_batch_rows(lm: LoadedModel, ts: TokenSet, batch_rows: int | None) -> int:
    """`batch_rows`, or when None as many rows as keep one batch's fp32 logits near 128 MiB."""
    if batch_rows is not None:
        return batch_rows
    return int(max(1, min(ts.n_rows, _LOGIT_BUDGET // (ts.ctx_len * lm.d_vocab * 4))))


def hooks_for(s: Neurons, kind: str, value: float | None, means: np.ndarray | None, device) -> Hooks:
    """Post-activation hooks that write the ablation value into the set's neurons.

    Args:
        s: the set, `{layer: indices}`.
        kind: 'zero', 'mean' or 'fixed'.
        value: the activation of kind='fixed'.
        means: `Float[ndarray, "layer d_mlp"]` for kind='mean'.
        device: where the model runs.

    Returns:
        `{layer: f(act, where) -> act}`: `act` is `Float[Tensor, "batch pos d_mlp"]`, `where`
        a `Bool[Tensor, "batch pos"]` of the positions written (None = every position).
    """
    if kind == "mean" and means is None:
        raise ConfigError("kind='mean' needs the neurons' means; pass means= (see neuron_means)")
    hooks: Hooks = {}
    for layer, idx in s.items():
        if kind == "zero":
            vals = np.zeros(len(idx))
        elif kind == "fixed":
            vals = np.full(len(idx), value)
        else:
            vals = means[layer, idx]  # type: ignore[index]  # checked above
        hooks[layer] = _writer(torch.as_tensor(idx, dtype=torch.long, device=device),
                               torch.as_tensor(vals, dtype=torch.float64, device=device))
    return hooks


def _writer(ix: torch.Tensor, values: torch.Tensor) -> Writer:
    """`f(act[batch, pos, d_mlp], where[batch, pos] | None) -> act` with neurons `ix` set to
    `values` at the positions `where` (every position when None)."""

    def f(act: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        out = act.clone()  # never write into a tensor the model may still hold
        v = values.to(act.dtype)
        if where is None:
            out[..., ix] = v
        else:
            sel = out[..., ix]  # [batch, pos, k], a copy
            out[..., ix] = torch.where(where[..., None], v, sel)
        return out

    return f


def _bound(hooks: Hooks, where: torch.Tensor | None) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    """The set's writers for one batch: `{layer: f(act) -> act}` writing at `where`."""
    return {layer: functools.partial(f, where=where) for layer, f in hooks.items()}


@dataclass
class RowSums:
    """Per-row sums over counted predictions: `[row]` for the clean model, `[set, row]` per ablated set.

    Attributes:
        n: `[row]` counted predictions per row.
        ce_clean, entropy_clean: `[row]` sums of the clean cross-entropy and prediction entropy.
        ce_ablated, kl, entropy_ablated: `[set, row]` sums of the ablated cross-entropy,
            KL(clean || ablated) and ablated entropy.
    """

    n: np.ndarray
    ce_clean: np.ndarray
    entropy_clean: np.ndarray
    ce_ablated: np.ndarray
    kl: np.ndarray
    entropy_ablated: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[RowSums]) -> RowSums:
        """The row sums of consecutive row shards, in order: one `RowSums` over all their rows."""
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts], axis=-1)
                      for f in dataclasses.fields(cls)})

    def point(self, s: int) -> dict[str, Any]:
        """Means over every counted prediction of set `s`: the columns of a run."""
        n = self.n.sum()
        ce_c, ce_a = self.ce_clean.sum() / n, self.ce_ablated[s].sum() / n
        return {"ce_clean": float(ce_c), "ce_ablated": float(ce_a),
                "delta_ce": float((self.ce_ablated[s] - self.ce_clean).sum() / n),
                "kl": float(self.kl[s].sum() / n),
                "delta_entropy": float((self.entropy_ablated[s] - self.entropy_clean).sum() / n), "n_tokens": int(n)}

    def arrays(self, s: int | None = None) -> dict[str, np.ndarray]:
        """`{name: array}` of every field; with `s`, the ablated fields of that set only (`[row]`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if s is not None:
            out.update({k: out[k][s] for k in ("ce_ablated", "kl", "entropy_ablated")})
        return out


class Sink(Protocol):
    """Where per-token values go: `write(r0, {name: [row, pos] or [set, row, pos] float32})`."""

    def write(self, r0: int, values: dict[str, np.ndarray]) -> None: ...


def evaluate(lm: LoadedModel, ts: TokenSet, hook_sets: Sequence[Hooks | None], *, batch_rows: int,
             positions: str = "counted", sink: Sink | None = None, desc: str = "ablation",
             progress_bar: bool | None = None, require_counted: bool = True) -> RowSums:
    """Per-row sums of ablating each hook set on the rows of `ts`.

    One clean forward pass per batch is shared by one ablated pass per set (an empty set reuses
    the clean one). Hooks are scoped to each pass: the model is unchanged afterwards.

    Args:
        lm: the model.
        ts: the rows (a whole token set or a row shard of one).
        hook_sets: per set, `hooks_for(...)`.
        batch_rows: rows per forward pass.
        positions: 'counted' writes the ablated value where `ts.mask` is True only, 'all' at
            every position.
        sink: receives per-token values when given.
        desc: the progress bar's label.
        progress_bar: None follows the global switch.
        require_counted: False for a row shard (the caller checked the whole token set; a shard
            may count nothing).

    Returns:
        `RowSums` over `ts.n_rows` rows and `len(hook_sets)` sets.

    Raises:
        InputError: `require_counted` and no prediction is counted.
    """
    S, R = len(hook_sets), ts.n_rows
    counted_all = counted_predictions(ts.mask)
    if require_counted:
        check_counted(counted_all)
    sums = RowSums(n=counted_all.sum(1).astype(np.float64), ce_clean=np.zeros(R), entropy_clean=np.zeros(R),
                   ce_ablated=np.zeros((S, R)), kl=np.zeros((S, R)), entropy_ablated=np.zeros((S, R)))
    bar = progress(total=R * S, desc=desc, unit="row-set", enabled=progress_bar)
    try:
        for r0 in range(0, R, batch_rows):
            ids = torch.from_numpy(ts.ids[r0:r0 + batch_rows]).long().to(lm.device)
            counted = torch.from_numpy(counted_all[r0:r0 + batch_rows, :-1]).to(lm.device)
            where = torch.from_numpy(ts.mask[r0:r0 + batch_rows]).to(lm.device) if positions == "counted" else None
            cw = counted.to(torch.float64)
            target = ids[:, 1:, None]
            logp = torch.log_softmax(run_with_post_hooks(lm, ids)[:, :-1].float(), dim=-1)  # [batch, pos-1, d_vocab]
            p = logp.exp()
            ce_c = -logp.gather(-1, target)[..., 0]  # [batch, pos-1]
            ent_c = -(p * logp).sum(-1)
            sums.ce_clean[r0:r0 + len(ids)] = (ce_c.double() * cw).sum(1).cpu().numpy()
            sums.entropy_clean[r0:r0 + len(ids)] = (ent_c.double() * cw).sum(1).cpu().numpy()
            per_tok: dict[str, list] = {"ce_ablated": [], "kl": [], "entropy_ablated": []}
            for s, hooks in enumerate(hook_sets):
                if hooks:
                    logq = torch.log_softmax(run_with_post_hooks(lm, ids, _bound(hooks, where))[:, :-1].float(),
                                             dim=-1)
                    ce_a = -logq.gather(-1, target)[..., 0]
                    tmp = torch.sub(logp, logq)  # in place from here: the [batch, pos, d_vocab] passes dominate
                    kl = tmp.mul_(p).sum(-1)
                    ent_a = -torch.exp(logq, out=tmp).mul_(logq).sum(-1)
                    del logq, tmp
                else:
                    ce_a, kl, ent_a = ce_c, torch.zeros_like(ce_c), ent_c
                for name, v in (("ce_ablated", ce_a), ("kl", kl), ("entropy_ablated", ent_a)):
                    getattr(sums, name)[s, r0:r0 + len(ids)] = (v.double() * cw).sum(1).cpu().numpy()
                    if sink is not None:
                        per_tok[name].append(_pad_last(v, counted))
                bar.update(len(ids))
            if sink is not None:
                sink.write(r0, {"ce_clean": _pad_last(ce_c, counted), "entropy_clean": _pad_last(ent_c, counted),
                                **{k: np.stack(v) for k, v in per_tok.items()}})
    finally:
        bar.close()
    return sums


def _pad_last(v: torch.Tensor, counted: torch.Tensor) -> np.ndarray:
    """`[batch, pos-1]` -> `[batch, pos]` float32 with NaN where not counted (and at the last position)."""
    out = torch.full((v.shape[0], v.shape[1] + 1), float("nan"), dtype=torch.float32)
    out[:, :-1] = torch.where(counted, v, torch.nan).float().cpu()
    return out.numpy()
