"""What a correlation run is: the models' layouts, its configuration, and its memory plan
(how many reference neurons one pass over the tokens can hold, and what the run costs)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from universal_neurons.config import Config
from universal_neurons.errors import ConfigError

from .. import baselines

__all__ = [
    "ModelLayout",
    "CorrelationConfig",
    "PRECISIONS",
    "FULL_DTYPES",
    "ROW_ALIGN",
    "check_layouts",
    "check_precision",
    "n_cross",
    "bytes_per_row",
    "fixed_bytes",
    "block_rows",
    "preflight",
    "reference_blocks",
]

PRECISIONS = ("fp32", "tf32", "bf16")
FULL_DTYPES = ("float16", "float32")
ROW_ALIGN = 64  # blocks are multiples of this, so a row's GEMM is the same call blocked or not


@dataclass(frozen=True)
class ModelLayout:
    """How one model's neurons are laid out: flat index = layer * d_mlp + neuron.

    Args:
        label: e.g. "a", "b" or a model name; unique within a family.
        n_layers: MLP layers.
        d_mlp: neurons per layer.
    """

    label: str
    n_layers: int
    d_mlp: int

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ConfigError(f"model label {self.label!r} must be a non-empty string")
        for name in ("n_layers", "d_mlp"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"ModelLayout {self.label!r}: {name}={v!r} must be a positive int")

    @property
    def n_neurons(self) -> int:
        """`n_layers * d_mlp`, the width of the model's `[token, neuron]` activations."""
        return self.n_layers * self.d_mlp


@dataclass(frozen=True)
class CorrelationConfig(Config):
    """How `correlate` runs. Stored in every result's attributes."""

    baseline: str = "rotation"        # docs/method.md §5: "rotation" (paper), "gaussian", "permutation" or "none"
    seed: int = 0                     # seeds the baseline's rotations / noise / permutations
    # "fp32" exact (max error ~1e-6); "bf16" ~2x faster on CPU (measured), error ~2e-3; "tf32" CUDA only
    precision: str = "fp32"
    absolute: bool = False            # rank partners by |rho| (max_corr, baseline, top_k are then >= 0)
    memory_budget: int = 2 * 2**30    # bytes for the accumulators; above it, blocks of reference neurons, one pass each
    block_size: int | None = None     # reference neurons per pass; None = as many as memory_budget allows
    top_k: int = 0                    # keep the k best partners per reference neuron (0 = off)
    hist_bins: int = 0                # per-neuron histogram of rho over j on [-1, 1] (0 = off; e.g. 40)
    device: str = "auto"              # "auto" = CUDA when present, else CPU
    dead_var: float = 0.0             # a neuron with variance <= this over the masked tokens is dead
    full_matrix_dtype: str = "float16"  # dtype of the optional full matrix file (float16 halves its size)

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> None:
            self.fail(f"{name}={getattr(self, name)!r} is invalid; {fix}")
        if self.baseline not in baselines.BASELINES:
            bad("baseline", f"unknown baseline kind; use one of {', '.join(baselines.BASELINES)}")
        if self.precision not in PRECISIONS:
            bad("precision", f"use one of {', '.join(PRECISIONS)} (fp16 has no fast CPU kernel)")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            bad("seed", "use a non-negative int")
        if not isinstance(self.memory_budget, (int, np.integer)) or self.memory_budget <= 0:
            bad("memory_budget", "use a positive number of bytes, e.g. 2 * 2**30")
        if self.block_size is not None and (not isinstance(self.block_size, (int, np.integer)) or self.block_size < 1):
            bad("block_size", "use a positive int or None (chosen from memory_budget)")
        for name in ("top_k", "hist_bins"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 0:
                bad(name, "use a non-negative int (0 = off)")
        if not (isinstance(self.dead_var, (int, float)) and self.dead_var >= 0):
            bad("dead_var", "use a non-negative float")
        if self.full_matrix_dtype not in FULL_DTYPES:
            bad("full_matrix_dtype", f"use one of {', '.join(FULL_DTYPES)}")


def check_layouts(layouts: Sequence[ModelLayout]) -> tuple[ModelLayout, ...]:
    """The layouts as a tuple, checked: at least two, all `ModelLayout`, labels unique.

    Raises:
        ConfigError: fewer than two models, something else than a layout, or a repeated label.
    """
    layouts = tuple(layouts)
    if len(layouts) < 2:
        raise ConfigError(f"got {len(layouts)} model layout(s); pass the reference model first and at least one other")
    if not all(isinstance(lay, ModelLayout) for lay in layouts):
        raise ConfigError("layouts must be ModelLayout(label, n_layers, d_mlp) objects")
    labels = [lay.label for lay in layouts]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"model labels {labels} repeat; give every model its own label")
    return layouts


def check_precision(config: CorrelationConfig, device) -> None:
    """Refuse TF32 off CUDA (it is a CUDA matmul mode)."""
    if config.precision == "tf32" and device.type != "cuda":
        raise ConfigError("precision='tf32' needs a CUDA device; use 'fp32' (exact) or 'bf16' (fast) on CPU")


def n_cross(config: CorrelationConfig) -> int:
    """How many `[block, N_m]` float64 co-moment matrices each reference row needs."""
    return 1 + (config.baseline in ("gaussian", "permutation"))


def bytes_per_row(layouts: Sequence[ModelLayout], config: CorrelationConfig) -> int:
    """Accumulator bytes per reference neuron of a pass."""
    n_other = sum(lay.n_neurons for lay in layouts[1:])
    widest = max(lay.n_neurons for lay in layouts[1:])
    # float64 co-moments per cross matrix, the batch GEMM's output (float32) and its float64
    # copy (shared by the cross matrices), and ~4 float64 [row, N_m] temporaries while one
    # model's correlations are summarised.
    return n_cross(config) * n_other * 8 + n_other * (4 + 8) + 4 * 8 * widest


def fixed_bytes(layouts: Sequence[ModelLayout], config: CorrelationConfig) -> int:
    """Accumulator bytes of a pass that do not grow with its reference rows (Σ_y, R, moments)."""
    sq = sum(lay.n_layers * lay.d_mlp ** 2 for lay in layouts[1:])
    n_all = sum(lay.n_neurons for lay in layouts)
    rot = 2 * 8 * sq if config.baseline == "rotation" else 0  # Σ_y and R, float64
    return rot + 4 * 8 * n_all


def block_rows(layouts: Sequence[ModelLayout], config: CorrelationConfig) -> int:
    """Reference neurons per pass: `config.block_size`, else as many as `memory_budget` holds.

    Raises:
        ConfigError: the budget cannot hold even one block.
    """
    n_a = layouts[0].n_neurons
    if config.block_size is not None:
        return min(int(config.block_size), n_a)
    room = config.memory_budget - fixed_bytes(layouts, config)
    rows = room // bytes_per_row(layouts, config)
    if rows < 1:
        need = fixed_bytes(layouts, config) + bytes_per_row(layouts, config) * min(n_a, ROW_ALIGN)
        raise ConfigError(f"memory_budget={config.memory_budget} bytes cannot hold the accumulators "
                          f"(at least {need} bytes for one block); raise memory_budget")
    if rows >= n_a:
        return n_a
    return max(ROW_ALIGN, rows // ROW_ALIGN * ROW_ALIGN) if n_a > ROW_ALIGN else int(rows)


def reference_blocks(layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None) -> list[tuple[int, int]]:
    """The reference rows of each pass over the tokens.

    One block when the accumulators fit `config.memory_budget` (or `config.block_size`),
    else several, each a pass over the tokens.

    Args:
        layouts: the reference first.
        config: the run's configuration (default `CorrelationConfig()`).

    Returns:
        `[(i0, i1), ...]`, flat reference neuron ranges in order.
    """
    config = config or CorrelationConfig()
    layouts = check_layouts(layouts)
    n_a, block = layouts[0].n_neurons, block_rows(layouts, config)
    return [(i, min(i + block, n_a)) for i in range(0, n_a, block)]


def preflight(layouts: Sequence[ModelLayout], n_tokens: int,
              config: CorrelationConfig | None = None) -> dict[str, Any]:
    """What a `correlate` run will cost, before running it.

    Args:
        layouts: the reference first.
        n_tokens: masked-in tokens.
        config: the run's configuration (default `CorrelationConfig()`).

    Returns:
        `{gemm_flops, accumulator_bytes, block_size, passes, summary}`, `summary` a one-line
        description (what the CLI prints).
    """
    config = config or CorrelationConfig()
    layouts = check_layouts(layouts)
    n_a = layouts[0].n_neurons
    n_other = sum(lay.n_neurons for lay in layouts[1:])
    block = block_rows(layouts, config)
    passes = math.ceil(n_a / block)
    flops = 2.0 * n_tokens * n_a * n_other * n_cross(config)
    if config.baseline == "rotation":
        sq = sum(lay.n_layers * lay.d_mlp ** 2 for lay in layouts[1:])
        flops += 2.0 * n_tokens * sq  # Σ_y, first pass only
    acc = fixed_bytes(layouts, config) + block * bytes_per_row(layouts, config)
    summary = (f"correlate {layouts[0].label} ({n_a} neurons) vs {len(layouts) - 1} model(s) "
               f"({n_other} neurons) over {n_tokens} tokens: {flops / 1e12:.2f} TFLOP, "
               f"{acc / 2**30:.2f} GiB accumulators, {passes} pass(es) of {block} reference neurons, "
               f"baseline={config.baseline}, precision={config.precision}")
    return {"gemm_flops": flops, "accumulator_bytes": acc, "block_size": block,
            "passes": passes, "summary": summary}
