"""How functional agreement is measured and summarised: `AgreementConfig`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from universal_neurons.config import Config

__all__ = ["AgreementConfig", "METRICS", "PAIR_MODES", "DTYPES"]

METRICS = ("kl_am", "kl_ma", "js", "top1")  # the per-pair means, in table order
PAIR_MODES = ("reference", "all", "ordered")
DTYPES = ("float64", "float32")


def _is_int(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


@dataclass(frozen=True)
class AgreementConfig(Config):
    """How the seeds' next-token distributions are compared. Stored with every result.

    Raises:
        ConfigError: on creation, for a value the comparison cannot use (the message names the fix).
    """

    pairs: str = "reference"  # reference: (a, m) for every other model m, as universality pairs them;
    # all: every unordered pair; ordered: every ordered pair (the unordered ones, both ways round)
    dtype: str = "float64"  # log-softmax and divergences; float32 halves memory, error ~1e-6 nats (docs/agreement.md)
    batch_rows: int | None = None  # rows per forward pass; None = ~256 MiB of log-probabilities per batch
    n_bootstrap: int = 1000  # bootstrap replicates over token rows
    ci: float = 0.95  # confidence level of the percentile intervals
    seed: int = 0  # seeds the bootstrap's row draws

    def __post_init__(self) -> None:
        if self.pairs not in PAIR_MODES:
            self.fail(f"unknown pairs {self.pairs!r}; use 'reference' (a against each other model), 'all' (every "
                      "unordered pair) or 'ordered' (every ordered pair)")
        if self.dtype not in DTYPES:
            self.fail(f"unknown dtype {self.dtype!r}; use 'float64' (exact to the logits) or 'float32'")
        if self.batch_rows is not None and (not _is_int(self.batch_rows) or self.batch_rows < 1):
            self.fail(f"batch_rows must be None (automatic) or a positive integer, got {self.batch_rows!r}")
        if not _is_int(self.n_bootstrap) or self.n_bootstrap < 1:
            self.fail(f"n_bootstrap must be an integer >= 1, got {self.n_bootstrap!r}")
        if not _is_int(self.seed) or self.seed < 0:
            self.fail(f"seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.ci, bool) or not 0.0 < float(self.ci) < 1.0:
            self.fail(f"ci must be in (0, 1), e.g. 0.95, got {self.ci!r}")
