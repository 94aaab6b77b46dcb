"""What the explanations stage computes: its configuration, the neuron families and the cuts
that assign them (docs/explanations.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from universal_neurons.config import Config

__all__ = ["ExplainConfig", "FAMILIES", "family_cuts"]

# Families a neuron's activation-based explanation can give it, in precedence order when two
# families score alike; "other" when none reaches its cut, "dead" when the neuron is constant.
FAMILIES = ("unigram", "alphabet", "previous_token", "position", "other", "dead")


@dataclass(frozen=True)
class ExplainConfig(Config):
    """Which neurons are explained and how; stored in every explanation file's provenance."""

    k: int = 20  # top-activating examples per neuron (Neuroscope shows 20)
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)  # activation quantiles with examples (empty: none)
    quantile_examples: int = 3  # examples at each quantile
    context_before: int = 24  # tokens of context before each example (clipped to its row)
    context_after: int = 4  # tokens of context after it
    n_unigrams: int = 500  # the most frequent token ids get a unigram feature each (current and previous token)
    position_edges: tuple[int, ...] | None = None  # position bucket edges; None = 1, 2, 4, 8, ... up to ctx_len
    n_contrast: int = 16  # non-universal reference neurons sampled (seeded) for contrast, with their partners
    seed: int = 0  # seeds the contrast sample
    best_features: int = 5  # best features kept per neuron
    vocab_tokens: int = 10  # top promoted and suppressed vocabulary tokens per neuron
    unigram_vr: float = 0.5  # unigram family: best current-token unigram feature explains >= this share of variance
    alphabet_vr: float = 0.5  # alphabet family: best current-token first-letter feature >= this
    previous_vr: float = 0.5  # previous-token family: best feature of the previous token >= this
    position_vr: float = 0.5  # position family: best position bucket, or the position's eta^2, >= this
    memory_budget: int = 2 * 2**30  # bytes for the accumulators; above it, blocks of neurons, passes each
    batch_rows: int = 32  # token rows per batch
    device: str = "auto"  # "auto" = CUDA when present, else CPU

    def __post_init__(self) -> None:
        for name in ("k", "batch_rows", "best_features"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                self.fail(f"{name}={v!r} must be a positive integer")
        for name in ("quantile_examples", "context_before", "context_after", "n_unigrams", "n_contrast", "seed",
                     "vocab_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                self.fail(f"{name}={v!r} must be a non-negative integer")
        qs = tuple(float(q) for q in self.quantiles)
        if any(not 0.0 < q <= 1.0 for q in qs) or len(set(qs)) != len(qs):
            self.fail(f"quantiles={self.quantiles!r} must be distinct numbers in (0, 1], e.g. (0.5, 0.9, 0.99)")
        object.__setattr__(self, "quantiles", qs)
        if self.position_edges is not None:
            edges = tuple(int(e) for e in self.position_edges)
            if not edges or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
                self.fail(f"position_edges={self.position_edges!r} must be increasing non-negative positions")
            object.__setattr__(self, "position_edges", edges)
        for name in ("unigram_vr", "alphabet_vr", "previous_vr", "position_vr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
                self.fail(f"{name}={v!r} must be a share of variance in (0, 1]")
        if isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, (int, np.integer)) \
                or self.memory_budget <= 0:
            self.fail(f"memory_budget={self.memory_budget!r} must be a positive number of bytes, e.g. 2 * 2**30")
        if not isinstance(self.device, str) or not self.device:
            self.fail(f"device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def edges(self, ctx_len: int) -> list[int]:
        """Position bucket edges for rows of `ctx_len`: `[e0, e1, ..., ctx_len]`, bucket i = `[e_i, e_{i+1})`."""
        if self.position_edges is not None:
            inner = [e for e in self.position_edges if e < ctx_len]
        else:
            inner = [0] + [2**i for i in range(0, 64) if 2**i < ctx_len]
        return sorted(set(inner)) + [ctx_len]


def family_cuts(config: ExplainConfig) -> dict[str, Any]:
    """The family rules in words and numbers (what the provenance and the docs record)."""
    return {
        "order": list(FAMILIES),
        "rule": "the family whose score is highest among those reaching their cut (ties: the order above); "
                "'other' when none does, 'dead' when the neuron is constant over the counted tokens",
        "unigram": f"max VR of a current-token unigram feature >= {config.unigram_vr}",
        "alphabet": f"max VR of a current-token first-letter feature >= {config.alphabet_vr}",
        "previous_token": "max VR of a previous-token feature (unigram, class or first letter) >= "
                          f"{config.previous_vr}",
        "position": f"max(VR of a position bucket, eta^2 of the position) >= {config.position_vr}",
    }
