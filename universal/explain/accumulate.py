"""The streaming state of the explanations engine: one object per pass over the tokens, each
updated batch by batch and merged shard by shard, exactly (docs/explanations.md).

    MainPartial      top-k (packed keys), histogram of the value keys' high digit, total moments,
                     activation sums per current id, previous id and position   (pass 1)
    RefinePartial    histogram of the low digit inside each quantile's high digit  (32-bit keys only)
    ExamplesPartial  the smallest (value, token) pairs at or above each exact quantile value

Only counted tokens (mask True) enter any of them. Sums are float64 and *shifted* by a
per-neuron constant (the first batch's mean), so a neuron whose mean is large against its
spread loses nothing; two partials with different shifts merge after an exact change of shift.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from universal_neurons.errors import IncompatibleInputsError, InputError
from universal_neurons.moments import Moments

from .keys import DIGIT, EMPTY_ASC, EMPTY_DESC, asc_keys, desc_keys, digits, top_merge, value_keys
from .source import Batch

__all__ = ["MainPartial", "RefinePartial", "ExamplesPartial", "counted", "quantile_ranks", "quantile_plan",
           "refine_plan"]

_BINS = 2**DIGIT


def counted(batch: Batch, vocab: int) -> tuple[torch.Tensor, ...]:
    """The counted tokens of a batch.

    Returns:
        `(acts [token, unit] float32, token index [token], current id [token], previous id
        [token] (vocab = none: the row's first position), position [token])`, counted tokens only.
    """
    rows, ctx = batch.ids.shape
    sel = batch.mask.reshape(-1).nonzero().squeeze(1)
    ids = batch.ids
    prev = torch.cat([torch.full((rows, 1), vocab, dtype=ids.dtype, device=ids.device), ids[:, :-1]], dim=1)
    cur = ids.reshape(-1)[sel]
    if len(cur) and (int(cur.max()) >= vocab or int(cur.min()) < 0):
        raise InputError(f"token id {int(cur.max())} is outside the vocabulary of {vocab} ids; the stores and the "
                         "tokenizer belong to different families")
    return batch.acts[sel], batch.r0 * ctx + sel, cur, prev.reshape(-1)[sel], sel % ctx


class MainPartial:
    """Pass 1 over a block of units (neurons).

    Args:
        n_units: neurons of the block.
        vocab: vocabulary size (ids 0..vocab-1).
        ctx_len: row length.
        k: top activations kept per neuron.
        bits: 16 or 32 (`keys.value_keys`).
        histogram: also histogram the value keys' high 16 bits (needed for quantiles).
        device: where the state lives.

    Attributes:
        n: counted tokens seen.
        top: `[k, unit]` packed descending keys (`keys.desc_keys`), best first.
        hist: `[unit, 65536]` int32 counts of the high digit, or None.
        moments: total count, mean, M2 per unit (`universal_neurons.moments.Moments`).
        shift: `[unit]` float64 constant subtracted before summing (None before the first batch).
        count_cur, sum_cur: `[vocab]` tokens per current id and `[vocab, unit]` their shifted sums.
        count_prev, sum_prev: the same per previous id, `[vocab + 1]` (last slot: none).
        count_pos, sum_pos: the same per position, `[ctx_len]`.
    """

    def __init__(self, n_units: int, *, vocab: int, ctx_len: int, k: int, bits: int, histogram: bool,
                 device: torch.device | str = "cpu") -> None:
        def f64(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        def i64(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int64, device=device)

        self.bits, self.k, self.vocab, self.n = bits, k, vocab, 0
        self.top = torch.full((k, n_units), EMPTY_DESC, dtype=torch.int64, device=device)
        self.hist = torch.zeros(n_units, _BINS, dtype=torch.int32, device=device) if histogram else None
        self.moments = Moments(n_units, order=2, device=device)
        self.shift: torch.Tensor | None = None
        self.count_cur, self.sum_cur = i64(vocab), f64(vocab, n_units)
        self.count_prev, self.sum_prev = i64(vocab + 1), f64(vocab + 1, n_units)
        self.count_pos, self.sum_pos = i64(ctx_len), f64(ctx_len, n_units)

    @property
    def n_units(self) -> int:
        return int(self.top.shape[1])

    def update(self, batch: Batch) -> None:
        """Fold in the counted tokens of one batch."""
        a, t, cur, prev, pos = counted(batch, self.vocab)
        if len(t) == 0:
            return
        a64 = a.double()
        if self.shift is None:
            self.shift = a64.mean(0)
        d = a64 - self.shift
        self.sum_cur.index_add_(0, cur, d)
        self.sum_prev.index_add_(0, prev, d)
        self.sum_pos.index_add_(0, pos, d)
        self.count_cur += torch.bincount(cur, minlength=self.vocab)
        self.count_prev += torch.bincount(prev, minlength=self.vocab + 1)
        self.count_pos += torch.bincount(pos, minlength=self.count_pos.shape[0])
        self.moments.merge(Moments.of_batch(a64, order=2))
        vk = value_keys(a, self.bits)
        self.top = top_merge(self.top, desc_keys(vk, t), self.k)
        if self.hist is not None:
            high, _ = digits(vk, self.bits)
            flat = (high + torch.arange(self.n_units, device=high.device) * _BINS).reshape(-1)
            self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        self.n += len(t)

    def merge(self, other: "MainPartial") -> "MainPartial":
        """Fold in another shard's partial of the same units (in place; returns self).

        Raises:
            IncompatibleInputsError: `other` covers other units or settings.
        """
        same = (other.n_units == self.n_units and other.k == self.k and other.bits == self.bits
                and other.vocab == self.vocab and (other.hist is None) == (self.hist is None))
        if not same:
            raise IncompatibleInputsError("cannot merge explanation partials of different neurons or settings; "
                                          "merge the shards of one block")
        if other.n == 0:
            return self
        dev = self.top.device
        if self.shift is None:
            self.shift = other.shift.to(dev)  # type: ignore[union-attr]
        move = (other.shift.to(dev) - self.shift).unsqueeze(0)  # type: ignore[union-attr]
        for name in ("cur", "prev", "pos"):
            cnt = getattr(other, f"count_{name}").to(dev)
            s = getattr(other, f"sum_{name}").to(dev) + cnt.unsqueeze(1).double() * move  # re-shifted to self.shift
            getattr(self, f"sum_{name}").add_(s)
            getattr(self, f"count_{name}").add_(cnt)
        self.moments.merge(other.moments)
        self.top = top_merge(self.top, other.top.to(dev), self.k)
        if self.hist is not None:
            self.hist += other.hist.to(dev)  # type: ignore[union-attr]
        self.n += other.n
        return self


def quantile_ranks(n: int, quantiles: Sequence[float]) -> list[int]:
    """1-based ranks of the quantiles' order statistics among n values: `max(1, ceil(q * n))`,
    the inverted empirical CDF (numpy's `method='inverted_cdf'`), with q read as the decimal it
    is written as (so 0.9 of 10 values is rank 9, where float arithmetic would give 10)."""
    return [max(1, min(n, math.ceil(Fraction(repr(float(q))) * n))) for q in quantiles]


def _locate(cum: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For cumulative counts `[unit, bins]` and ranks `[unit, q]`: the bin holding each rank
    and the count below that bin."""
    b = torch.searchsorted(cum, ranks)  # first bin whose cumulative count reaches the rank
    below = torch.where(b > 0, torch.gather(cum, 1, (b - 1).clamp(min=0)), torch.zeros_like(b))
    return b, below


def quantile_plan(main: MainPartial, quantiles: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """From pass 1: the high digit of each quantile's value key, and each quantile's rank
    within that digit's bin.

    Returns:
        `(high [unit, q], rank_in_bin [unit, q])`; with 16-bit keys `high` is the whole key
        (as unsigned) and the quantile value is exact.
    """
    assert main.hist is not None
    ranks = torch.tensor(quantile_ranks(main.n, quantiles), dtype=torch.int64, device=main.hist.device)
    cum = main.hist.to(torch.int64).cumsum(1)
    high, below = _locate(cum, ranks.expand(main.n_units, -1).contiguous())
    return high, ranks.unsqueeze(0) - below


def refine_plan(hist2: torch.Tensor, high: torch.Tensor, rank_in_bin: torch.Tensor) -> torch.Tensor:
    """The exact 32-bit value keys of the quantiles from the low-digit histograms
    (`RefinePartial.hist`, `[unit, q, 65536]`)."""
    n, q = high.shape
    cum = hist2.to(torch.int64).cumsum(2).reshape(n * q, _BINS)
    low, _ = _locate(cum, rank_in_bin.reshape(n * q, 1))
    return ((high << DIGIT) | low.reshape(n, q)) - 2**31


class RefinePartial:
    """Pass 2 (32-bit keys): the low digit's histogram among tokens whose high digit is a
    quantile's, per unit and quantile.

    Args:
        high: `[unit, q]` the high digit of each quantile (`quantile_plan`).
    """

    def __init__(self, high: torch.Tensor) -> None:
        self.high = high
        n, q = high.shape
        self.hist = torch.zeros(n, q, _BINS, dtype=torch.int32, device=high.device)
        self._base = ((torch.arange(n, device=high.device).unsqueeze(1) * q
                       + torch.arange(q, device=high.device).unsqueeze(0)) * _BINS)  # [unit, q]

    def update(self, batch: Batch, vocab: int) -> None:
        """Fold in the counted tokens of one batch."""
        a = counted(batch, vocab)[0]
        if len(a) == 0:
            return
        hi, lo = digits(value_keys(a, 32), 32)
        match = hi.unsqueeze(2) == self.high.unsqueeze(0)  # [token, unit, q]
        flat = (self._base.unsqueeze(0) + lo.unsqueeze(2))[match]  # type: ignore[union-attr]
        self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))

    def merge(self, other: "RefinePartial") -> "RefinePartial":
        """Add another shard's histograms (in place; returns self)."""
        self.hist += other.hist.to(self.hist.device)
        return self


class ExamplesPartial:
    """The last pass: per unit and quantile, the `m` smallest (value, token index) pairs whose
    value is at least the quantile's exact value.

    Args:
        thresholds: `[unit, q]` value keys of the quantiles (`value_keys` scale).
        m: examples per quantile.
        bits: 16 or 32.

    Attributes:
        low: `[m, q, unit]` packed ascending keys (`keys.asc_keys`), smallest first.
    """

    def __init__(self, thresholds: torch.Tensor, m: int, bits: int) -> None:
        self.thresholds, self.m, self.bits = thresholds, m, bits
        n, q = thresholds.shape
        self.low = torch.full((m, q, n), EMPTY_ASC, dtype=torch.int64, device=thresholds.device)

    def update(self, batch: Batch, vocab: int) -> None:
        """Fold in the counted tokens of one batch."""
        a, t = counted(batch, vocab)[:2]
        if len(a) == 0 or self.m == 0:
            return
        vk = value_keys(a, self.bits)  # [token, unit]
        packed = asc_keys(vk, t).unsqueeze(1)  # [token, 1, unit]
        ok = vk.unsqueeze(1) >= self.thresholds.T.unsqueeze(0)  # [token, q, unit]
        cand = torch.where(ok, packed, torch.full_like(packed, EMPTY_ASC))
        self.low = top_merge(self.low, cand, self.m, largest=False)

    def merge(self, other: "ExamplesPartial") -> "ExamplesPartial":
        """Keep the smallest keys of both shards (in place; returns self)."""
        self.low = top_merge(self.low, other.low.to(self.low.device), self.m, largest=False)
        return self


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's values on the CPU as numpy (what the engine hands on)."""
    return t.detach().cpu().numpy()
