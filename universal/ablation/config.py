"""How neurons are ablated and how the result is compared with chance: `AblationConfig`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from universal_neurons.config import Config

__all__ = ["ABLATION_KINDS", "ABLATION_POSITIONS", "AblationConfig"]

ABLATION_KINDS = ("zero", "mean", "fixed")
ABLATION_POSITIONS = ("counted", "all")


def _is_int(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


@dataclass(frozen=True)
class AblationConfig(Config):
    """How neurons are ablated and how the result is compared with chance. Stored with every result.

    Raises:
        ConfigError: on creation, for a value the study cannot use (the message names the fix).
    """

    kind: str = "mean"  # zero | mean | fixed; mean keeps the layer's input on-distribution (GELU means are not 0)
    value: float | None = None  # the activation written by kind='fixed' (required then, refused otherwise)
    n_controls: int = 99  # random control sets per ablated set; the smallest p-value is 1/(n_controls+1) = 0.01
    seed: int = 0  # seeds the control draws and the bootstrap
    n_bootstrap: int = 1000  # bootstrap replicates (over token rows, and control draws for the control mean)
    ci: float = 0.95  # confidence level of the percentile intervals
    batch_rows: int | None = None  # rows per forward pass; None = ~128 MiB of fp32 logits per batch
    per_layer: bool = True  # also ablate the universal neurons of each layer alone, with matched controls
    controls_exclude_dead: bool = True  # dead neurons (constant activation) would make controls look harmless
    positions: str = "counted"  # counted: write only where the token set's mask is True (where the means were
    # taken; BOS, EOS and newlines keep their activations); all: every position

    def __post_init__(self) -> None:
        if self.kind not in ABLATION_KINDS:
            self.fail(f"unknown ablation kind {self.kind!r}; use one of {', '.join(ABLATION_KINDS)}")
        if self.kind == "fixed":
            if self.value is None or not np.isfinite(float(self.value)):
                self.fail(f"kind='fixed' needs a finite value (the activation to write), got value={self.value!r}")
            object.__setattr__(self, "value", float(self.value))
        elif self.value is not None:
            self.fail(f"value={self.value!r} is only used with kind='fixed'; drop it or set kind='fixed'")
        if self.positions not in ABLATION_POSITIONS:
            self.fail(f"unknown positions {self.positions!r}; use 'counted' (the token set's masked-in positions) "
                      "or 'all'")
        for name, lo in (("n_controls", 0), ("n_bootstrap", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                self.fail(f"{name} must be an integer >= {lo}, got {v!r}")
        if not _is_int(self.seed) or self.seed < 0:
            self.fail(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0.0 < float(self.ci) < 1.0:
            self.fail(f"ci must be in (0, 1), e.g. 0.95, got {self.ci!r}")
        if self.batch_rows is not None and (isinstance(self.batch_rows, bool) or not isinstance(self.batch_rows, int)
                                            or self.batch_rows < 1):
            self.fail(f"batch_rows must be None (automatic) or a positive integer, got {self.batch_rows!r}")
