"""What several subcommands share: the flags generated from the configuration classes
(`cli/options.py` makes them; `tests/test_cli.py` checks every config field is covered), the
config each command builds from its flags, and printing."""

from __future__ import annotations

import argparse
import sys

from .options import Flag, add_flags, config_from_args, field_default

__all__ = ["TOKEN_FLAGS", "PIPELINE_FLAGS", "ABLATION_FLAGS", "PROPERTIES_FLAGS", "CORRELATION_FLAGS", "say", "ints",
           "token_args", "token_config", "cluster_arg", "correlation_args", "correlation_config", "store_args",
           "store_config", "pipeline_args", "pipeline_config", "print_summary"]

TOKEN_FLAGS = (
    Flag("ctx_len", "--ctx-len", "row length incl. BOS (the paper: 512)"),
    Flag("n_tokens", "--n-tokens", "tokens to sample (whole rows); default all"),
    Flag("seed", "--seed", "seed of the row sample"),
    Flag("exclude_newlines", "--keep-newlines", "do not mask newline tokens", negate=True),
    Flag("text_field", "--text-field", "field of .jsonl records"),
    Flag("hf_split", "--hf-split", "split of an hf:<dataset> source"),
    Flag("newline_mask", "--newline-mask", "newline tokens masked: paper = exactly '\\n' (GPT-2 id 198), all = any "
         "whitespace token with a newline", choices=("paper", "all")),
    Flag("encoding_errors", "--encoding-errors", "text that is not valid UTF-8: strict refuses it, replace reads "
         "bad bytes as U+FFFD", choices=("strict", "replace")),
)
PIPELINE_FLAGS = (
    Flag("threshold", "--threshold", "universal iff excess_corr > threshold"),
    Flag("cache", "--no-cache", "correlate from live models; write no activation stores", negate=True),
    Flag("batch_rows", "--batch-rows", "token rows per forward pass / correlation batch"),
    Flag("process_weights", "--no-weight-processing",
         "raw weights (default: fold LN, centre writing weights and unembedding, as the paper)", negate=True),
    Flag("held_out_share", "--held-out-share",
         "share of the text's rows kept out of the study as the ablation's held-out tokens (0 = none)"),
    Flag("held_out_tokens", "--held-out-tokens", "at most this many held-out tokens (whole rows)"),
)
ABLATION_FLAGS = (
    Flag("kind", "--kind", "value written into the ablated neurons", choices=("zero", "mean", "fixed")),
    Flag("value", "--value", "the activation written by --kind fixed"),
    Flag("n_controls", "--controls", "random control sets per ablated set"),
    Flag("seed", "--seed", "seed of control draws and bootstrap"),
    Flag("n_bootstrap", "--bootstrap", "bootstrap replicates"),
    Flag("batch_rows", "--batch-rows", "rows per forward pass (default: automatic)"),
    Flag("per_layer", "--no-per-layer", "skip the one-layer-at-a-time groups", negate=True),
    Flag("positions", "--positions", "where the ablated value is written: counted = the token set's masked-in "
         "positions (not BOS, EOS, newlines), all = every position", choices=("counted", "all")),
)
PROPERTIES_FLAGS = (
    Flag("batch_rows", "--batch-rows", "token rows per forward pass / store read for activation moments"),
    Flag("family_rule", "--family-rule", "families by the paper's fixed cuts, or by quantiles of this model's "
         "neurons (docs/method.md §7)", choices=("paper", "quantile")),
)
CORRELATION_FLAGS = (
    Flag("baseline", "--baseline", "chance baseline", choices=("rotation", "gaussian", "permutation", "none")),
    Flag("seed", "--baseline-seed", "seed of the baseline's rotations / noise / permutations"),
    Flag("precision", "--precision", "GEMM precision: fp32 exact; bf16 ~2x faster on CPU, error ~2e-3",
         choices=("fp32", "bf16", "tf32")),
    Flag("absolute", "--absolute", "rank partners by |rho|"),
    Flag("memory_budget", "--memory-gb", "accumulator budget in GiB; above it, neuron blocks", type=float,
         to_field=lambda gib: int(gib * 2**30), from_field=lambda b: b / 2**30),
    Flag("top_k", "--top-k", "keep the k best partners per neuron (0 = off)"),
    Flag("hist_bins", "--hist-bins", "per-neuron histogram of rho on [-1, 1] (0 = off)"),
)

def say(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)


def ints(s: str, flag: str) -> tuple[int, ...]:
    """A comma-separated list of integers given to `flag`; a clear error otherwise."""
    from universal_neurons.errors import ConfigError

    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers (e.g. 0,1,2), got {s!r}") from None


# The config classes are imported inside the functions: a subcommand's options are built only
# when that subcommand runs, so `universal-neurons --help` imports neither torch nor TransformerLens.


def token_args(p: argparse.ArgumentParser) -> None:
    from universal_neurons.activations.tokens import TokenSetConfig

    add_flags(p, TokenSetConfig, TOKEN_FLAGS)


def cluster_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default=None,
                   help="run on Dask: local:N (N worker processes here), tcp://host:port (a running scheduler) or "
                        "scheduler-file:PATH; default in-process (docs/distributed.md)")


def token_config(a):
    from universal_neurons.activations.tokens import TokenSetConfig

    return config_from_args(TokenSetConfig, a, TOKEN_FLAGS)


def correlation_args(p: argparse.ArgumentParser) -> None:
    from universal_neurons.correlation import CorrelationConfig

    add_flags(p, CorrelationConfig, CORRELATION_FLAGS)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")


def correlation_config(a):
    from universal_neurons.correlation import CorrelationConfig

    return config_from_args(CorrelationConfig, a, CORRELATION_FLAGS, device=a.device or "auto")


def store_args(p: argparse.ArgumentParser) -> None:
    from universal_neurons.activations.store import StoreConfig

    p.add_argument("--pre", action="store_true", help="also store hook_pre (the pre-activation)")
    p.add_argument("--fp32", action="store_true", help="store float32 (default float16)")
    p.add_argument("--compression", choices=["gzip", "lzf"], default=field_default(StoreConfig, "compression"))


def store_config(a):
    from universal_neurons.activations.store import StoreConfig

    kinds = field_default(StoreConfig, "kinds")
    return StoreConfig(kinds=(*kinds, "pre") if a.pre else kinds,
                       dtype="float32" if a.fp32 else field_default(StoreConfig, "dtype"), compression=a.compression)


def pipeline_args(p: argparse.ArgumentParser) -> None:
    """What every pipeline-running subcommand (run, persistence) takes."""
    from universal_neurons.pipeline import PipelineConfig

    p.add_argument("--labels", default=None)
    add_flags(p, PipelineConfig, PIPELINE_FLAGS)
    p.add_argument("--overwrite", action="store_true")
    token_args(p)
    correlation_args(p)


def pipeline_config(a, *, cluster: str | None = None):
    from universal_neurons.pipeline import PipelineConfig

    return config_from_args(PipelineConfig, a, PIPELINE_FLAGS, tokens=token_config(a),
                            correlation=correlation_config(a),
                            device=a.device, cluster=cluster)


def print_summary(summary: dict) -> None:
    u = summary["universality"]
    say(f"universal neurons: {u['universal']} of {u['neurons']} ({100 * u['universal_fraction']:.2f}%) "
         f"at excess_corr > {u['threshold']} over {u['n_tokens']:,} tokens")
    for d in u["per_layer"]:
        q = d["excess_quantiles"]
        say(f"  layer {d['layer']}: {d['universal']:4d}/{d['neurons']} universal, "
            f"mean max-corr {d['mean_max_corr']:.3f}, "
             f"baseline {d['mean_baseline']:.3f}, excess median {q.get('0.5', float('nan')):.3f}, "
             f"p90 {q.get('0.9', float('nan')):.3f}, p99 {q.get('0.99', float('nan')):.3f}")
