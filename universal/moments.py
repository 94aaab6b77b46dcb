"""Exact streaming moments per unit (neuron, column), merged batch by batch or shard by shard.

One implementation serves the correlation engine (count, mean and M2 of every neuron, beside
its co-moments) and the properties stage (up to M4, for skew and kurtosis). State is float64
torch tensors on whichever device the caller works on (CPU or CUDA).

Merges are the exact pairwise updates of Chan, Golub & LeVeque (1979) for the mean and M2 and
of Pébay (2008, eq. 2.1-2.3) for M3 and M4: the central sums of two disjoint sets of tokens,
each about its own mean, combine into those of their union. No large raw power sums are
subtracted, so a neuron whose mean is 10^4 times its spread loses nothing, and shards merged
in token order equal one pass over all tokens up to float64 rounding.

`StreamingMoments.result` is the one place skew and kurtosis are defined: skew `mean(z^3)`,
kurtosis *raw* `mean(z^4)` (a Gaussian has 3), the paper's convention (docs/method.md §7).

    acc = Moments(n_units, order=2)
    for x in batches:                       # x: [token, unit]
        acc.merge(Moments.of_batch(x, order=2))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import ConfigError, IncompatibleInputsError, InputError

__all__ = ["Moments", "StreamingMoments"]

class Moments:
    """Count, mean and central sums M2..M_order of a set of units over the tokens seen so far.

    `order` 1 keeps only the mean (the correlation engine's later passes, which need the mean
    change of each batch but not its spread), 2 adds M2, 4 adds M3 and M4.

    Attributes:
        n: tokens counted.
        mean: `[unit]` float64 mean.
        sums: `[M2, M3, M4][:order - 1]`, each `[unit]` float64 sums of `(x - mean)^k`.

    Args:
        n_units: units (columns of every batch).
        order: highest central sum kept, 1 to 4.
        device: where the state lives (default CPU).
    """

    def __init__(self, n_units: int, *, order: int = 2, device: torch.device | str | None = None) -> None:
        if order not in (1, 2, 3, 4):
            raise ConfigError(f"Moments order must be 1, 2, 3 or 4, got {order!r}")
        self.n = 0
        self.mean = torch.zeros(n_units, dtype=torch.float64, device=device)
        self.sums = [torch.zeros(n_units, dtype=torch.float64, device=device) for _ in range(order - 1)]

    @classmethod
    def from_sums(cls, n: int, mean: torch.Tensor, *sums: torch.Tensor | None) -> "Moments":
        """Moments already summed elsewhere (a batch kernel's), wrapped without a copy.

        Args:
            n: tokens they cover.
            mean: `[unit]` float64 mean of those tokens.
            *sums: `[unit]` float64 central sums M2, M3, M4 about `mean`, as far as computed;
                None stands for "not computed" (and ends the list).

        Returns:
            A `Moments` of the order of the sums given.
        """
        self = cls.__new__(cls)
        self.n, self.mean, self.sums = int(n), mean, []
        for t in sums[:3]:
            if t is None:
                break
            self.sums.append(t)
        return self

    @classmethod
    def of_batch(cls, x: torch.Tensor | np.ndarray, *, order: int = 2) -> "Moments":
        """The moments of one batch, two-pass in float64 (its mean first, then sums about it).

        Args:
            x: `[token, unit]` values, any float dtype, on any device.
            order: highest central sum, 1 to 4.

        Returns:
            `Moments` on `x`'s device (empty, n = 0, when `x` has no rows).
        """
        x = torch.as_tensor(x).to(torch.float64)
        if x.ndim != 2:
            raise InputError(f"a batch of moments must be [token, unit], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return cls(x.shape[1], order=order, device=x.device)
        mean = x.mean(0)
        sums = []
        if order >= 2:
            d = x - mean
            d2 = d * d
            sums.append(d2.sum(0))
            if order >= 3:
                sums.append((d2 * d).sum(0))
            if order >= 4:
                sums.append((d2 * d2).sum(0))
        return cls.from_sums(x.shape[0], mean, *sums)

    @property
    def order(self) -> int:
        """The highest central sum kept (1 = the mean only)."""
        return 1 + len(self.sums)

    def _sum(self, k: int) -> torch.Tensor:
        if self.order < k:
            raise ConfigError(f"these moments keep sums up to M{self.order}, not M{k}; "
                              f"accumulate them with order >= {k}")
        return self.sums[k - 2]

    @property
    def m2(self) -> torch.Tensor:
        """`[unit]` sum of squared deviations from the mean."""
        return self._sum(2)

    @property
    def m3(self) -> torch.Tensor:
        """`[unit]` sum of cubed deviations."""
        return self._sum(3)

    @property
    def m4(self) -> torch.Tensor:
        """`[unit]` sum of fourth powers of the deviations."""
        return self._sum(4)

    @property
    def n_units(self) -> int:
        return int(self.mean.shape[0])

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(t.numel() * t.element_size() for t in [self.mean, *self.sums])

    def to(self, device: torch.device | str) -> "Moments":
        """Move the state to `device` (in place; returns self)."""
        self.mean, self.sums = self.mean.to(device), [t.to(device) for t in self.sums]
        return self

    def merge(self, other: "Moments") -> "Moments":
        """Fold in the moments of other tokens (a batch, or another worker's shard); in place.

        Chan et al. for the mean and M2, Pébay (2008) eq. 2.1-2.3 for M3 and M4, exact up to
        float64 rounding. Sums of `other` above this accumulator's order are ignored; `other`
        is left unchanged (brought to this device if it lives elsewhere).

        Args:
            other: moments of the same units, of at least this order.

        Returns:
            self.

        Raises:
            IncompatibleInputsError: `other` covers other units or keeps fewer central sums.
        """
        if other.mean.shape != self.mean.shape:
            raise IncompatibleInputsError(f"cannot merge moments of {other.n_units} columns into moments of "
                                          f"{self.n_units}; merge partials of the same neurons")
        if other.order < self.order:
            raise IncompatibleInputsError(f"cannot merge moments up to M{other.order} into moments up to "
                                          f"M{self.order}; compute the batch's sums up to M{self.order}")
        if other.n == 0:
            return self
        dev = self.device
        mean_b = other.mean.to(dev)
        b = [t.to(dev) for t in other.sums[:len(self.sums)]]
        if self.n == 0:  # nothing to combine: copy, so a single part is returned bit for bit
            self.n, self.mean, self.sums = other.n, mean_b.clone(), [t.clone() for t in b]
            return self
        a = self.sums
        na, nb = float(self.n), float(other.n)
        n = na + nb
        delta = mean_b - self.mean
        new = list(a)
        # a = self, b = other; M4 and M3 read the old lower sums, so they go first
        if len(a) >= 3:
            new[2] = (a[2] + b[2] + delta ** 4 * na * nb * (na * na - na * nb + nb * nb) / n ** 3
                      + 6 * delta ** 2 * (na * na * b[0] + nb * nb * a[0]) / n ** 2
                      + 4 * delta * (na * b[1] - nb * a[1]) / n)
        if len(a) >= 2:
            new[1] = (a[1] + b[1] + delta ** 3 * na * nb * (na - nb) / n ** 2
                      + 3 * delta * (na * b[0] - nb * a[0]) / n)
        if len(a) >= 1:
            a[0] += b[0] + delta * delta * (na * nb / n)  # in place: new[0] is a[0]
        self.sums = new
        self.mean += delta * (nb / n)
        self.n += other.n
        return self


class StreamingMoments(Moments):
    """Exact mean, variance, skew and raw kurtosis per column, merged batch by batch, and
    the fraction of positive values (a neuron's activation frequency).

    Kurtosis is *raw*, `mean(z^4)` (a Gaussian has 3), the convention of Gurnee et al. (2024)
    and of their released tables; see `result`.

    Order-4 `Moments` (kept on the CPU) plus the count of positive values. Each batch's
    central sums are computed two-pass in float64, then merged in with Pébay's formulas.

    Args:
        n_columns: number of neurons (columns of every batch).
    """

    def __init__(self, n_columns: int) -> None:
        super().__init__(n_columns, order=4)
        self.positive = torch.zeros(n_columns, dtype=torch.int64)

    def update(self, x: torch.Tensor | np.ndarray) -> None:
        """Add a batch (already masked): its own moments, merged in.

        Args:
            x: `[token, neuron]` values, any float dtype, on any device.
        """
        x = torch.as_tensor(x).to(torch.float64)
        if x.shape[0] == 0:
            return
        Moments.merge(self, Moments.of_batch(x, order=4))
        self.positive += (x > 0).sum(0).to("cpu", torch.int64)

    def merge(self, other: "StreamingMoments") -> "StreamingMoments":  # type: ignore[override]
        """Fold in the moments of other tokens (another worker's token shard); in place.

        A merge of shard partials equals one pass over all tokens up to merge order.

        Args:
            other: a `StreamingMoments` of the same columns.

        Returns:
            self.
        """
        if not isinstance(other, StreamingMoments):
            raise IncompatibleInputsError(f"cannot merge a {type(other).__name__} into StreamingMoments; "
                                          "merge the StreamingMoments of another shard")
        super().merge(other)
        self.positive += other.positive.to(self.positive.device)
        return self

    def to(self, device: torch.device | str) -> "StreamingMoments":
        super().to(device)
        self.positive = self.positive.to(device)
        return self

    def result(self) -> dict[str, Any]:
        """The statistics, with scipy's conventions.

        var = M2/n (population); skew = sqrt(n) M3 / M2^1.5 = mean(z^3)
        (`scipy.stats.skew(bias=True)`); kurt = n M4 / M2^2 = mean(z^4), *raw* kurtosis, a
        Gaussian has 3 (`scipy.stats.kurtosis(fisher=False, bias=True)`; subtract 3 for the
        excess kurtosis scipy reports by default); frequency = fraction > 0. Zero (or, like
        scipy, float-rounding-level) variance gives NaN skew and kurt.

        Returns:
            `{count, mean, var, skew, kurt, frequency}`, each `[neuron]` (count is an int).

        Raises:
            InputError: no token was counted.
        """
        if self.n == 0:
            raise InputError("no tokens were counted (every position masked out?); moments need at "
                             "least one masked-in token: use a longer text or a looser mask")
        n = float(self.n)
        mean, m2, m3, m4 = (t.cpu().numpy() for t in (self.mean, *self.sums))
        var = m2 / n
        const = var <= (np.finfo(np.float64).resolution * mean) ** 2  # scipy's test for constant data
        with np.errstate(divide="ignore", invalid="ignore"):
            skew = np.where(const, np.nan, np.sqrt(n) * m3 / m2 ** 1.5)
            kurt = np.where(const, np.nan, n * m4 / m2 ** 2)  # raw: no - 3
        return {"count": self.n, "mean": mean.copy(), "var": var, "skew": skew, "kurt": kurt,
                "frequency": self.positive.cpu().numpy() / n}
