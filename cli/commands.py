"""The subcommands. Each one: arguments in, one public API call, a line saying where results are."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .main import command
from .options import Flag, add_flags, config_from_args, field_default

TOKEN_FLAGS = (
    Flag("ctx_len", "--ctx-len", "row length incl. BOS (the paper: 512)"),
    Flag("n_tokens", "--n-tokens", "tokens to sample (whole rows); default all"),
    Flag("seed", "--seed", "seed of the row sample"),
    Flag("exclude_newlines", "--keep-newlines", "do not mask newline tokens", negate=True),
    Flag("text_field", "--text-field", "field of .jsonl records"),
    Flag("hf_split", "--hf-split", "split of an hf:<dataset> source"),
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

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)


def _ints(s: str, flag: str) -> tuple[int, ...]:
    """A comma-separated list of integers given to `flag`; a clear error otherwise."""
    from universal_neurons.errors import ConfigError

    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers (e.g. 0,1,2), got {s!r}") from None


# The config classes are imported inside the functions: a subcommand's options are built only
# when that subcommand runs, so `universal-neurons --help` imports neither torch nor TransformerLens.


def _token_args(p: argparse.ArgumentParser) -> None:
    from universal_neurons.activations.tokens import TokenSetConfig

    add_flags(p, TokenSetConfig, TOKEN_FLAGS)


def _cluster_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default=None,
                   help="run on Dask: local:N (N worker processes here), tcp://host:port (a running scheduler) or "
                        "scheduler-file:PATH; default in-process (docs/distributed.md)")


def _token_config(a):
    from universal_neurons.activations.tokens import TokenSetConfig

    return config_from_args(TokenSetConfig, a, TOKEN_FLAGS)


def _corr_args(p: argparse.ArgumentParser) -> None:
    from universal_neurons.correlation import CorrelationConfig

    add_flags(p, CorrelationConfig, CORRELATION_FLAGS)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")


def _corr_config(a):
    from universal_neurons.correlation import CorrelationConfig

    return config_from_args(CorrelationConfig, a, CORRELATION_FLAGS, device=a.device or "auto")


def _store_args(p: argparse.ArgumentParser) -> None:
    from universal_neurons.activations.store import StoreConfig

    p.add_argument("--pre", action="store_true", help="also store hook_pre (the pre-activation)")
    p.add_argument("--fp32", action="store_true", help="store float32 (default float16)")
    p.add_argument("--compression", choices=["gzip", "lzf"], default=field_default(StoreConfig, "compression"))


def _store_config(a):
    from universal_neurons.activations.store import StoreConfig

    kinds = field_default(StoreConfig, "kinds")
    return StoreConfig(kinds=(*kinds, "pre") if a.pre else kinds,
                       dtype="float32" if a.fp32 else field_default(StoreConfig, "dtype"), compression=a.compression)


# ---------------------------------------------------------------------------- tokenize


def _add_tokenize(p):
    p.add_argument("source", help="text file, .jsonl, folder of them, or hf:<dataset>")
    p.add_argument("--model", required=True, help="model (name or directory) whose tokenizer to use")
    p.add_argument("-o", "--out", required=True, help="token-set file (.h5)")
    p.add_argument("--overwrite", action="store_true")
    _token_args(p)


@command("tokenize", "build a token set (ids, mask, hash) from text with a model's tokenizer")(_add_tokenize)
def _tokenize(a):
    from universal_neurons.activations import build_token_set, load_model
    from universal_neurons.artifacts import check_not_input, check_writable

    check_not_input(a.out, [a.source])
    check_writable(a.out, overwrite=a.overwrite)  # before the model loads and the text is read
    lm = load_model(a.model, device="cpu")
    ts = build_token_set(a.source, lm.tokenizer, _token_config(a))
    path = ts.save(a.out, overwrite=a.overwrite)
    _say(f"token set: {ts.n_rows} rows x {ts.ctx_len} = {ts.n_tokens:,} tokens ({ts.n_counted:,} counted), "
         f"hash {ts.hash[:12]} -> {path}")


# ---------------------------------------------------------------------------- cache


def _add_cache(p):
    p.add_argument("model", help="hub name or model directory")
    p.add_argument("--tokens", required=True, help="token set from `universal-neurons tokenize`")
    p.add_argument("-o", "--out", required=True, help="store file (.h5)")
    p.add_argument("--checkpoint", type=int, default=None, help="training step")
    _store_args(p)
    p.add_argument("--batch-rows", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    _cluster_arg(p)


@command("cache", "run a model over a token set and stream its MLP activations to HDF5 (resumable)")(_add_cache)
def _cache(a):
    from universal_neurons.activations import cache_activations, load_model, load_token_set, preflight_cache
    from universal_neurons.activations.store import check_space
    from universal_neurons.artifacts import check_not_input, check_writable

    check_not_input(a.out, [a.tokens])
    check_writable(a.out, overwrite=True)  # an existing store is resumed or refused by cache_activations
    ts = load_token_set(a.tokens)
    cfg = _store_config(a)
    if a.cluster:  # shards cached by the workers, stitched into one store at --out
        from universal_neurons.distributed import cache_distributed

        path = cache_distributed(a.model, ts, a.out, cluster=a.cluster, config=cfg, checkpoint=a.checkpoint,
                                 device=a.device, batch_rows=a.batch_rows, overwrite=a.overwrite)
        _say(f"activations of {a.model} (cluster {a.cluster}) -> {path}")
        return
    lm = load_model(a.model, checkpoint=a.checkpoint, device=a.device)
    pf = preflight_cache(lm, ts, cfg, path=a.out)
    _say("preflight: " + ", ".join(f"{k}={v}" for k, v in pf.items() if not isinstance(v, (list, dict))))
    check_space(pf, a.out, cfg)
    path = cache_activations(lm, ts, a.out, config=cfg, batch_rows=a.batch_rows, overwrite=a.overwrite)
    _say(f"activations of {lm.name} -> {path}")


# ---------------------------------------------------------------------------- correlate / flag


def _add_correlate(p):
    p.add_argument("stores", nargs="+", help="activation stores of one token set; the first is the reference")
    p.add_argument("-o", "--out", required=True, help="correlation result (.h5)")
    p.add_argument("--labels", default=None, help="comma-separated labels (default a,b,c,...)")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--full-matrix", default=None, help="also write the full correlation matrices here (.h5)")
    p.add_argument("--all-pairs", action="store_true", help="every model as the reference in turn (beyond the paper)")
    p.add_argument("--allow-same-model", action="store_true",
                   help="accept two stores of the same model and checkpoint (refused by default)")
    p.add_argument("--overwrite", action="store_true")
    _corr_args(p)
    _cluster_arg(p)


@command("correlate", "correlate every neuron of the reference with every neuron of the others, with a baseline")(_add_correlate)
def _correlate(a):
    from universal_neurons.pipeline import correlate_stores

    res = correlate_stores(a.stores, a.out, labels=a.labels.split(",") if a.labels else None, config=_corr_config(a),
                           batch_tokens=a.batch_tokens, cluster=a.cluster, all_pairs=a.all_pairs,
                           full_matrix_path=a.full_matrix, device=a.device, overwrite=a.overwrite,
                           allow_same_model=a.allow_same_model, say=_say)
    if a.all_pairs:
        return 0
    if a.cluster:
        _say(f"cluster {a.cluster}: {res.provenance['distributed']}")
    dead = ", ".join(f"{k}: {int(v.sum())}" for k, v in res.dead.items())
    _say(f"correlated {res.n_tokens:,} tokens; dead neurons {dead} -> {a.out}")


def _add_flag(p):
    p.add_argument("correlation", help="result of `universal-neurons correlate`")
    p.add_argument("-o", "--out", required=True, help="table file: .csv or .h5")
    from universal_neurons.universality import UNIVERSAL_THRESHOLD

    p.add_argument("--threshold", type=float, default=UNIVERSAL_THRESHOLD,
                   help=f"universal iff excess_corr > threshold (default: {UNIVERSAL_THRESHOLD}, the paper's)")
    p.add_argument("--overwrite", action="store_true")


@command("flag", "build the universality table (excess correlation over the baseline) and flag universal neurons")(_add_flag)
def _flag(a):
    from universal_neurons import CorrelationResult, save_universality_table, universality_table
    from universal_neurons.pipeline import family_summary

    res = CorrelationResult.load(a.correlation)
    table = universality_table(res, threshold=a.threshold)
    save_universality_table(table, a.out, provenance=res.provenance, overwrite=a.overwrite)
    s = family_summary(table, res, a.threshold)
    per = "; ".join(f"layer {d['layer']}: {d['universal']}/{d['neurons']}" for d in s["per_layer"])
    _say(f"{s['universal']} of {s['neurons']} neurons universal ({100 * s['universal_fraction']:.2f}%; {per}) -> {a.out}")


# ---------------------------------------------------------------------------- run


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    """What every pipeline-running subcommand (run, persistence) takes."""
    from universal_neurons.pipeline import PipelineConfig

    p.add_argument("--labels", default=None)
    add_flags(p, PipelineConfig, PIPELINE_FLAGS)
    p.add_argument("--overwrite", action="store_true")
    _token_args(p)
    _corr_args(p)


def _pipeline_config(a, *, cluster: str | None = None):
    from universal_neurons.pipeline import PipelineConfig

    return config_from_args(PipelineConfig, a, PIPELINE_FLAGS, tokens=_token_config(a), correlation=_corr_config(a),
                            device=a.device, cluster=cluster)


def _add_run(p):
    p.add_argument("models", nargs="+", help="hub names or model directories of one seed family, reference first")
    p.add_argument("--steps", default=None, help="also run at these checkpoint steps and measure persistence")
    p.add_argument("--ablation-tokens", default=None,
                   help="held-out token set (.h5) for the ablation, instead of rows held out of --text (then "
                        "--held-out-share is 0); it must not be the studied tokens")
    p.add_argument("--skip", default=None, help="comma-separated later stages to skip: properties,ablation,persistence,report")
    p.add_argument("--text", required=True, help="text file, .jsonl, folder, or hf:<dataset>")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--checkpoint", type=int, default=None, help="training step loaded for every model")
    _pipeline_args(p)
    _cluster_arg(p)


@command("run", "the whole pipeline (tokenize, cache, correlate, flag, later stages) for models you name")(_add_run)
def _run(a):
    from universal_neurons.pipeline import PipelineConfig, run_pipeline

    cfg = _pipeline_config(a, cluster=a.cluster)
    if a.ablation_tokens:  # the explicit held-out set replaces the rows held out of the text
        cfg = cfg.replace(held_out_share=0.0)
    stages = _later_stages(a, steps=_ints(a.steps, "--steps") if a.steps else None, overwrite=a.overwrite)
    res = run_pipeline(a.models, a.text, a.out, checkpoint=a.checkpoint, labels=a.labels.split(",") if a.labels else None,
                       config=cfg, overwrite=a.overwrite, extra_stages=stages)
    _print_summary(res.summary)
    _say(f"results -> {res.out_dir}" + (f"; report -> {res.summary['report']}" if "report" in res.summary else ""))


def _later_stages(a, *, steps, overwrite: bool) -> list:
    """The stages after flagging, as the demo runs them; `--skip` names the ones to leave out."""
    from universal_neurons.activations import load_token_set
    from universal_neurons.ablation import AblationConfig, ablation_stage
    from universal_neurons.persistence import persistence_stage
    from universal_neurons.properties import properties_stage
    from universal_neurons.report import report_stage

    skip = set(a.skip.split(",")) if a.skip else set()
    stages = []
    if "properties" not in skip:
        stages.append(properties_stage())
    if "ablation" not in skip:
        held = load_token_set(a.ablation_tokens) if a.ablation_tokens else None
        stages.append(ablation_stage(AblationConfig(), eval_tokens=held, overwrite=overwrite, device=a.device))
    if steps and "persistence" not in skip:
        stages.append(persistence_stage(steps=steps))
    if "report" not in skip:
        stages.append(report_stage)
    return stages


def _print_summary(summary: dict) -> None:
    u = summary["universality"]
    _say(f"universal neurons: {u['universal']} of {u['neurons']} ({100 * u['universal_fraction']:.2f}%) "
         f"at excess_corr > {u['threshold']} over {u['n_tokens']:,} tokens")
    for d in u["per_layer"]:
        q = d["excess_quantiles"]
        _say(f"  layer {d['layer']}: {d['universal']:4d}/{d['neurons']} universal, mean max-corr {d['mean_max_corr']:.3f}, "
             f"baseline {d['mean_baseline']:.3f}, excess median {q.get('0.5', float('nan')):.3f}, "
             f"p90 {q.get('0.9', float('nan')):.3f}, p99 {q.get('0.99', float('nan')):.3f}")


# ---------------------------------------------------------------------------- train-seeds


def _add_train(p):
    p.add_argument("-o", "--out", required=True, help="family directory (seed-a/, seed-b/, ...)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (one model each)")
    p.add_argument("--text", default=None, help="training text (default: the built-in demo corpus)")
    p.add_argument("--n-tokens", type=int, default=None, help="training tokens per seed")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--d-mlp", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--ctx", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--checkpoints", type=int, default=None, help="number of log-spaced checkpoints")
    p.add_argument("--device", default=None)


@command("train-seeds", "train a family of small GPT-2 models from different seeds, with checkpoints (resumable)")(_add_train)
def _train(a):
    import dataclasses

    from universal_neurons.demo import DEMO_TRAIN_CONFIG, demo_token_sets, text_stream
    from universal_neurons.demo_data import demo_tokenizer
    from universal_neurons.training import check_seeds, train_family

    seeds = _ints(a.seeds, "--seeds")
    check_seeds(seeds)  # before the text is read or anything is trained

    cfg = DEMO_TRAIN_CONFIG
    model_over = {k: v for k, v in {"n_layers": a.layers, "d_model": a.d_model, "d_mlp": a.d_mlp,
                                    "n_heads": a.heads, "n_ctx": a.ctx}.items() if v is not None}
    train_over = {k: v for k, v in {"n_tokens": a.n_tokens, "lr": a.lr, "n_checkpoints": a.checkpoints}.items()
                  if v is not None}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_over), **train_over)
    if a.text:
        tokenizer, train, val = text_stream(a.text, cfg)
    else:
        tokenizer = demo_tokenizer()
        sets = demo_token_sets(tokenizer, n_ctx=cfg.model.n_ctx)
        train, val = sets["train"].ids, sets["val"].ids
    results = train_family(train, val, tokenizer, config=cfg, seeds=seeds, family_dir=a.out, device=a.device)
    for r in results:
        _say(f"{r.seed_dir.name} (seed {r.seed}): val loss {r.final['val_loss']:.3f} after {r.final['tokens_seen']:,} "
             f"tokens; checkpoints {[rec['step'] for rec in r.records]}")
    _say(f"family -> {a.out}")


# ---------------------------------------------------------------------------- demo


def _add_demo(p):
    p.add_argument("-o", "--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--family-dir", default=None, help="where the trained family is kept (default: user cache)")
    p.add_argument("--retrain", action="store_true", help="train the family again even if cached")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--device", default=None)


@command("demo", "train (or reuse) the built-in seed family and run every stage on it")(_add_demo)
def _demo(a):
    from universal_neurons.demo import run_demo

    res = run_demo(out_dir=a.out, family_dir=a.family_dir, retrain=a.retrain, overwrite=a.overwrite, device=a.device)
    _say("validation loss per seed: " + ", ".join(f"{k} {v:.3f}" for k, v in res["val_loss"].items())
         + f" (unigram entropy of the corpus {res['unigram_entropy']:.3f} nats)")
    _print_summary(res["summary"])
    for k, v in res["outputs"].items():
        _say(f"{k}: {v}")


# ---------------------------------------------------------------------------- ablate


def _add_ablate(p):
    p.add_argument("model", help="hub name or model directory (the reference model of the table)")
    p.add_argument("--table", required=True,
                   help="universality table (.csv/.h5; ablates is_universal), or a CSV of layer,neuron to ablate")
    p.add_argument("--tokens", required=True,
                   help="HELD-OUT token set (`universal-neurons tokenize`, or tokens_held_out.h5 of a `run`): tokens "
                        "that did not choose the universal neurons; the result records whether they are the "
                        "table's own, and warns if so")
    p.add_argument("-o", "--out", required=True, help="output directory")
    from universal_neurons.ablation import AblationConfig

    add_flags(p, AblationConfig, ABLATION_FLAGS)
    p.add_argument("--checkpoint", type=int, default=None, help="training step")
    p.add_argument("--store", default=None, help="activation store of MODEL on --tokens to read means from")
    p.add_argument("--per-token", action="store_true", help="also write per-token values (ablation_tokens.h5)")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")


@command("ablate", "ablate universal neurons as a group (and per layer) against random controls; ΔCE, KL, entropy")(_add_ablate)
def _ablate(a):
    from universal_neurons.activations import load_model, load_token_set
    from universal_neurons import AblationConfig, AblationResult, ablation_study, load_universality_table

    AblationResult.check_out_dir(a.out, overwrite=a.overwrite)
    cfg = config_from_args(AblationConfig, a, ABLATION_FLAGS)
    table = load_universality_table(a.table)
    ts = load_token_set(a.tokens)
    lm = load_model(a.model, checkpoint=a.checkpoint, device=a.device)
    out = Path(a.out)
    per_token = out / "ablation_tokens.h5" if a.per_token else None
    res = ablation_study(lm, table, ts, cfg, store=a.store, per_token_path=per_token, overwrite=a.overwrite)
    res.save(out, overwrite=a.overwrite)
    for r in res.summary.itertuples():
        _say(f"{r.group}: {r.n_neurons} neurons, ΔCE {r.delta_ce:+.4f} [{r.delta_ce_lo:+.4f}, {r.delta_ce_hi:+.4f}], "
             f"KL {r.kl:.4f}; controls ΔCE {r.control_delta_ce_mean:+.4f} [{r.control_delta_ce_lo:+.4f}, "
             f"{r.control_delta_ce_hi:+.4f}], ratio {r.ratio_delta_ce:.2f}; paired ΔCE {r.paired_delta_ce:+.4f} "
             f"[{r.paired_delta_ce_lo:+.4f}, {r.paired_delta_ce_hi:+.4f}] ({r.paired_delta_ce_per_neuron:+.5f} per "
             f"neuron), p {r.p_value:.3f} (>= {r.p_value_min:.3f})")
    tokens = res.provenance["token_set"]
    _say(f"{cfg.kind} ablation at {cfg.positions} positions over {int(res.summary['n_tokens'].iloc[0]):,} predictions "
         f"of token set {tokens['hash'][:12]} ({tokens['relation_to_study']} relative to the table's) -> {out}")
    for w in res.provenance["warnings"]:
        _say(f"WARNING: {w}")


# ---------------------------------------------------------------------------- properties


def _add_properties(p):
    p.add_argument("model", help="hub name or model directory")
    p.add_argument("--tokens", default=None, help="token set (`universal-neurons tokenize`); required without --store")
    p.add_argument("--store", default=None, help="activation store of MODEL holding hook_pre and hook_post "
                                                 "(`cache --pre`); default: run the model live over --tokens")
    p.add_argument("--table", default=None, help="universality table of MODEL (.csv/.h5): adds the universal-vs-other "
                                                 "comparison")
    p.add_argument("-o", "--out", required=True, help="properties table (.csv; provenance in <out>.json)")
    p.add_argument("--comparison", default=None, help="comparison table (default: property_comparison.csv next to -o)")
    p.add_argument("--checkpoint", type=int, default=None, help="training step")
    p.add_argument("--no-weight-processing", action="store_true",
                   help="raw weights (default: fold LN, centre writing weights and unembedding, as the paper)")
    from universal_neurons.properties import PropertiesConfig

    add_flags(p, PropertiesConfig, PROPERTIES_FLAGS)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")


@command("properties", "per-neuron weight, activation-moment and vocabulary properties; universal vs other")(_add_properties)
def _properties(a):
    from universal_neurons.activations import UniversalNeuronsError, load_model, load_token_set
    from universal_neurons import (PropertiesConfig, compare_universal, load_universality_table, neuron_properties,
                           save_properties)

    if a.tokens is None and a.store is None:
        raise UniversalNeuronsError("pass --tokens (moments from the live model) or --store (moments from a store)")
    ts = load_token_set(a.tokens) if a.tokens else None
    lm = load_model(a.model, checkpoint=a.checkpoint, device=a.device, process_weights=not a.no_weight_processing)
    props = neuron_properties(lm, token_set=ts, store=a.store, config=config_from_args(PropertiesConfig, a, PROPERTIES_FLAGS))
    path = save_properties(props, a.out, overwrite=a.overwrite)
    fam = ", ".join(f"{k} {v}" for k, v in props["family"].value_counts().items())
    _say(f"properties of {len(props):,} neurons of {lm.name} (families: {fam}) -> {path}")
    if a.table:
        comp = compare_universal(load_universality_table(a.table), props)
        cpath = save_properties(comp, a.comparison or Path(a.out).with_name("property_comparison.csv"),
                                overwrite=a.overwrite)
        for r in comp.itertuples():
            _say(f"  {r.property:>20}: median universal {r.median_universal:.4g} vs other {r.median_other:.4g}, "
                 f"rank-biserial {r.rank_biserial:+.3f}, p {r.p_value:.2g}")
        _say(f"comparison ({int(comp['n_universal'].iloc[0])} universal neurons) -> {cpath}")


# ---------------------------------------------------------------------------- persistence


def _add_persistence(p):
    p.add_argument("models", nargs="+", help="hub names or local seed directories (checkpoint-<step>/), reference first")
    p.add_argument("--steps", default=None, help="comma-separated checkpoint steps (hub models: required; seed "
                                                 "directories: default every saved checkpoint)")
    p.add_argument("--text", required=True, help="text file, .jsonl, folder, hf:<dataset>, or a token set (.h5)")
    p.add_argument("-o", "--out", required=True, help="output directory (checkpoints/step-<t>/, persistence/)")
    _pipeline_args(p)


@command("persistence", "universal neurons at several training checkpoints: persistence, partner consistency, emergence")(_add_persistence)
def _persistence(a):
    from universal_neurons.activations import load_token_set
    from universal_neurons import run_persistence
    from universal_neurons.pipeline import PipelineConfig

    cfg = _pipeline_config(a)
    text = load_token_set(a.text) if a.text.endswith((".h5", ".hdf5")) else a.text
    res = run_persistence(a.models, _ints(a.steps, "--steps") if a.steps else None, text, a.out,
                          labels=a.labels.split(",") if a.labels else None, config=cfg, overwrite=a.overwrite)
    for t, g in res.emergence.groupby("step"):
        per = ", ".join(f"L{r.layer} {r.n_universal}" for r in g.itertuples())
        _say(f"step {t}: {int(g['n_universal'].sum())} universal ({per})")
    adj = "; ".join(f"{t}->{t2}: {res.overall.loc[t, t2]:.3f}" for t, t2 in zip(res.steps, res.steps[1:]))
    _say(f"persistence |U_t ∩ U_t'|/|U_t| of consecutive checkpoints: {adj}")
    _say(f"results -> {Path(a.out) / 'persistence'}")


# ---------------------------------------------------------------------------- report


def _add_report(p):
    p.add_argument("run_dir", help="output directory of a pipeline run (`universal-neurons run/demo -o DIR`)")
    p.add_argument("-o", "--out", default=None, help="HTML file (default RUN_DIR/report.html)")
    p.add_argument("--title", default=None, help="title at the top of the report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report file")


@command("report", "one self-contained HTML report of a run (figures, universal neurons, provenance; works offline)")(_add_report)
def _report(a):
    from universal_neurons.report import Report

    report = Report.from_run(a.run_dir, title=a.title)
    path = report.save(a.out or Path(a.run_dir) / "report.html", overwrite=a.overwrite)
    _say(f"report ({', '.join(s.title for s in report.sections)}) -> {path}")
