"""The streaming kernel: next-token log-probabilities of every model on one batch of token rows
at a time, reduced to per-row sums over the counted predictions for each pair of models.

Nothing larger than one batch of log-probabilities is ever held: `[batch, pos, d_vocab]` per
model, freed before the next batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from universal_neurons.ablation.evaluate import check_counted, counted_predictions
from universal_neurons.activations import LoadedModel, TokenSet, run_with_post_hooks
from universal_neurons.runtime import progress

from .config import METRICS

__all__ = ["PairRowSums", "pair_divergences", "agreement_row_sums", "auto_batch_rows", "LN2"]

LN2 = math.log(2.0)
_LOGPROB_BUDGET = 256 << 20  # bytes of log-probabilities (and temporaries) per batch when batch_rows is automatic
_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class PairRowSums:
    """Per-row sums over the counted predictions of one token set, for each pair of models.

    Attributes:
        n: `Float[ndarray, "row"]` counted predictions per row (the same for every pair).
        values: `{metric: Float[ndarray, "pair row"]}` for `kl_am`, `kl_ma`, `js` (sums of the
            divergence, nats) and `top1` (the number of counted predictions whose argmax agrees).
    """

    n: np.ndarray
    values: dict[str, np.ndarray]

    def swapped(self) -> PairRowSums:
        """The same pairs the other way round, `(m, a)` for `(a, m)`: the two KL directions
        trade places; JS and top-1 agreement are symmetric."""
        v = self.values
        return PairRowSums(n=self.n, values={**v, "kl_am": v["kl_ma"], "kl_ma": v["kl_am"]})

    @classmethod
    def concat(cls, parts: Sequence[PairRowSums]) -> PairRowSums:
        """The sums of consecutive row shards, in row order, as one (what a cluster run gathers)."""
        return cls(n=np.concatenate([p.n for p in parts]),
                   values={m: np.concatenate([p.values[m] for p in parts], axis=1) for m in parts[0].values})


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`(x * y).sum(-1)` for `[..., d_vocab]` tensors: on CPU as a batched GEMV (no temporary,
    twice as fast); on CUDA elementwise, so a global TF32 matmul switch cannot round it."""
    if x.is_cuda:
        return (x * y).sum(-1)
    v = x.shape[-1]
    return torch.bmm(x.reshape(-1, 1, v), y.reshape(-1, v, 1)).reshape(x.shape[:-1])


def pair_divergences(logp_a: torch.Tensor, logp_m: torch.Tensor, p_a: torch.Tensor | None = None,
                     p_m: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL in both directions and the Jensen-Shannon divergence of two next-token distributions.

    With `e = log P_m - log P_a` and `M = (P_a + P_m) / 2`: `log P_a - log M = t := ln 2 -
    softplus(e)` and `log P_m - log M = e + t`, so

        KL(P_a || P_m) = -sum P_a e,   KL(P_m || P_a) = sum P_m e,
        JS = (sum (P_a + P_m) t + KL(P_m || P_a)) / 2,

    from the difference of log-probabilities alone: no cancellation between large entropies,
    no `log 0` where a probability underflows, exactly 0 for identical inputs, and symmetric
    in the two models up to rounding (1e-15 relative in float64).

    Args:
        logp_a, logp_m: `Float[Tensor, "... d_vocab"]` log-probabilities (log-softmax of logits).
        p_a, p_m: their `exp`, when the caller already has them.

    Returns:
        `(kl_am, kl_ma, js)`, each `Float[Tensor, "..."]` in nats: `KL(P_a || P_m)`,
        `KL(P_m || P_a)` and JS, which lies in `[0, ln 2]`.
    """
    p_a = logp_a.exp() if p_a is None else p_a
    p_m = logp_m.exp() if p_m is None else p_m
    e = logp_m - logp_a
    kl_am = -_dot(p_a, e)
    kl_ma = _dot(p_m, e)
    # softplus is linear above `threshold`; at 40 the cut-off error e^-40 is below float64 rounding
    t = torch.nn.functional.softplus(e, threshold=40.0).neg_().add_(LN2)
    js = 0.5 * (_dot(p_a + p_m, t) + kl_ma)
    return kl_am, kl_ma, js


def auto_batch_rows(n_models: int, ts: TokenSet, d_vocab: int, dtype: str, batch_rows: int | None) -> int:
    """`batch_rows`, or when None as many rows as keep one batch's log-probabilities, their
    exponentials and a pair's temporaries near 256 MiB."""
    if batch_rows is not None:
        return int(batch_rows)
    per_row = (2 * n_models + 5) * ts.ctx_len * d_vocab * torch.finfo(_TORCH_DTYPES[dtype]).bits // 8
    return int(max(1, min(ts.n_rows, _LOGPROB_BUDGET // per_row)))


def agreement_row_sums(lms: Sequence[LoadedModel], ts: TokenSet, pairs: Sequence[tuple[int, int]], *,
                       dtype: str = "float64", batch_rows: int | None = None, desc: str = "agreement",
                       progress_bar: bool | None = None, require_counted: bool = True) -> PairRowSums:
    """Per-row sums of the pairs' divergences and argmax agreements over the counted predictions.

    The logits at position `pos` predict token `pos + 1`; that prediction is counted iff
    `mask[pos]` and `mask[pos + 1]` (the ablation's rule, `counted_predictions`). Each model
    runs once per batch, whatever the number of pairs it is in.

    Args:
        lms: the models, on one device, with one vocabulary.
        ts: the token rows.
        pairs: `(i, j)` indices into `lms`.
        dtype: 'float64' or 'float32', the log-softmax's and the divergences' precision.
        batch_rows: rows per forward pass (None: automatic).
        desc: the progress bar's label.
        progress_bar: None follows the global switch.
        require_counted: refuse a token set without a counted prediction; False for a row
            shard of a larger set (a cluster task), which may have none.

    Returns:
        `PairRowSums` over `ts.n_rows` rows and `len(pairs)` pairs.

    Raises:
        InputError: the token set has no counted prediction (with `require_counted`).
    """
    counted_all = counted_predictions(ts.mask)  # [row, pos]
    if require_counted:
        check_counted(counted_all)
    R, P = ts.n_rows, len(pairs)
    used = sorted({i for pair in pairs for i in pair})
    tdtype = _TORCH_DTYPES[dtype]
    rows = auto_batch_rows(len(used), ts, lms[0].d_vocab, dtype, batch_rows)
    device = lms[0].device
    values = {name: np.zeros((P, R)) for name in METRICS}
    bar = progress(total=R, desc=desc, unit="row", enabled=progress_bar)
    try:
        for r0 in range(0, R, rows):
            ids = torch.from_numpy(ts.ids[r0:r0 + rows]).long().to(device)
            counted = torch.from_numpy(counted_all[r0:r0 + rows, :-1]).to(device)  # [batch, pos-1]
            weight = counted.to(torch.float64)
            logp, prob, top = {}, {}, {}
            for i in used:
                logits = run_with_post_hooks(lms[i], ids)[:, :-1]  # [batch, pos-1, d_vocab]
                logp[i] = torch.log_softmax(logits.to(device=device, dtype=tdtype), dim=-1)
                del logits
                prob[i] = logp[i].exp()
                top[i] = logp[i].argmax(-1)  # [batch, pos-1]
            stop = r0 + len(ids)
            for k, (i, j) in enumerate(pairs):
                kl_am, kl_ma, js = pair_divergences(logp[i], logp[j], prob[i], prob[j])
                for name, v in (("kl_am", kl_am), ("kl_ma", kl_ma), ("js", js), ("top1", top[i] == top[j])):
                    values[name][k, r0:stop] = (v.to(torch.float64) * weight).sum(1).cpu().numpy()
            del logp, prob, top
            bar.update(len(ids))
    finally:
        bar.close()
    return PairRowSums(n=counted_all.sum(1).astype(np.float64), values=values)
