"""What the properties stage computes: its configuration, the columns of its tables, the families."""

from __future__ import annotations

from dataclasses import dataclass

from universal_neurons.config import Config

__all__ = ["PropertiesConfig", "WEIGHT_COLUMNS", "VOCAB_COLUMNS", "ACTIVATION_COLUMNS", "FAMILIES", "FAMILY_RULES",
           "CONVENTIONS"]

WEIGHT_COLUMNS = ["w_in_norm", "input_bias", "w_out_norm", "in_out_sim", "l2_penalty"]
VOCAB_COLUMNS = ["vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"]
ACTIVATION_COLUMNS = ["pre_mean", "pre_var", "pre_skew", "pre_kurt", "activation_frequency",
                      "post_mean", "post_var", "post_skew", "post_kurt"]
FAMILIES = ("prediction", "suppression", "partition", "entropy", "other")  # precedence order of `family`
FAMILY_RULES = ("paper", "quantile")

# Recorded in every properties table's provenance, so a reader knows which kurtosis it holds.
CONVENTIONS = {
    "var": "population (divide by n)",
    "skew": "mean(z^3) = scipy.stats.skew(bias=True)",
    "kurt": "raw (Gaussian 3): mean(z^4) = scipy.stats.kurtosis(fisher=False, bias=True)",
    "activation_frequency": "fraction of masked-in tokens with pre-activation > 0",
}


@dataclass(frozen=True)
class PropertiesConfig(Config):
    """Cuts of the weight-based families and how moments are computed; stored in provenance.

    `family_rule='paper'` (the default) uses the paper's fixed cuts; `'quantile'` replaces the
    partition and entropy cuts by quantiles of this model's own neurons (the `*_quantile`
    fields, read only then). Prediction and suppression use `prediction_kurtosis` under both
    rules. Every kurtosis is raw (a Gaussian has 3). See docs/method.md §7.
    """

    family_rule: str = "paper"  # 'paper': the fixed cuts below; 'quantile': partition/entropy by quantiles
    prediction_kurtosis: float = 10.0  # paper: raw vocab_kurt > 10 (positive skew: prediction, negative: suppression)
    partition_var: float = 0.005  # paper: partition when vocab_var > this
    entropy_layers: int = 1  # entropy candidates live in the last this-many layers (paper, GPT-2 medium: 2)
    entropy_l2_penalty: float = 1.0  # paper: ... with l2_penalty >= this
    entropy_vocab_var: float = 0.001  # paper: ... and vocab_var <= this
    partition_quantile: float = 0.95  # quantile rule: vocab_var above this quantile over all neurons (top 5%)
    entropy_l2_quantile: float = 0.9  # quantile rule: l2_penalty above this quantile of the last layers
    entropy_vocab_var_quantile: float = 0.25  # quantile rule: vocab_var below this quantile of the last layers
    vocab_dtype: str = "float32"  # cos GEMM precision: float32 is ~1e-7 off float64 and 2-4x faster on CPU
    vocab_chunk: int = 256  # neurons per cos block: [chunk, d_vocab] at a time (GPT-2: 51 MB in float32)
    batch_rows: int = 32  # token rows per forward pass / store read for activation moments
    device: str | None = None  # where the cos GEMM runs (None = CUDA when present)

    def __post_init__(self) -> None:
        if self.family_rule not in FAMILY_RULES:
            self.fail(f"family_rule must be 'paper' (fixed cuts) or 'quantile', got {self.family_rule!r}")
        for k in ("partition_quantile", "entropy_l2_quantile", "entropy_vocab_var_quantile"):
            if not 0.0 <= float(getattr(self, k)) <= 1.0:
                self.fail(f"{k} must be a quantile in [0, 1], got {getattr(self, k)}")
        for k in ("partition_var", "entropy_l2_penalty", "entropy_vocab_var"):
            if not float(getattr(self, k)) >= 0.0:  # also refuses NaN
                self.fail(f"{k} must be a cut >= 0, got {getattr(self, k)}")
        for k in ("entropy_layers", "vocab_chunk", "batch_rows"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                self.fail(f"{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.vocab_dtype not in ("float32", "float64"):
            self.fail(f"vocab_dtype must be 'float32' or 'float64', got {self.vocab_dtype!r}")
