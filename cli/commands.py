"""The subcommands of the pipeline's first stages: tokenize, cache, correlate, flag, and `run`
(all of them, then the later stages). Each: arguments in, one public API call, a line saying
where the results are."""

from __future__ import annotations

from .flags import (
    cluster_arg,
    correlation_args,
    correlation_config,
    ints,
    pipeline_args,
    pipeline_config,
    print_summary,
    say,
    store_args,
    store_config,
    token_args,
    token_config,
)
from .main import command

# ---------------------------------------------------------------------------- tokenize


def _add_tokenize(p):
    p.add_argument("source", help="text file, .jsonl, folder of them, or hf:<dataset>")
    p.add_argument("--model", required=True, help="model (name or directory) whose tokenizer to use")
    p.add_argument("-o", "--out", required=True, help="token-set file (.h5)")
    p.add_argument("--overwrite", action="store_true")
    token_args(p)


@command("tokenize", "build a token set (ids, mask, hash) from text with a model's tokenizer")(_add_tokenize)
def _tokenize(a):
    from universal_neurons.activations import build_token_set, load_model
    from universal_neurons.artifacts import check_not_input, check_writable

    check_not_input(a.out, [a.source])
    check_writable(a.out, overwrite=a.overwrite)  # before the model loads and the text is read
    lm = load_model(a.model, device="cpu")
    ts = build_token_set(a.source, lm.tokenizer, token_config(a))
    path = ts.save(a.out, overwrite=a.overwrite)
    say(f"token set: {ts.n_rows} rows x {ts.ctx_len} = {ts.n_tokens:,} tokens ({ts.n_counted:,} counted), "
         f"hash {ts.hash[:12]} -> {path}")


# ---------------------------------------------------------------------------- cache


def _add_cache(p):
    p.add_argument("model", help="hub name or model directory")
    p.add_argument("--tokens", required=True, help="token set from `universal-neurons tokenize`")
    p.add_argument("-o", "--out", required=True, help="store file (.h5)")
    p.add_argument("--checkpoint", type=int, default=None, help="training step")
    store_args(p)
    p.add_argument("--batch-rows", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    cluster_arg(p)


@command("cache", "run a model over a token set and stream its MLP activations to HDF5 (resumable)")(_add_cache)
def _cache(a):
    from universal_neurons.activations import cache_activations, load_model, load_token_set, preflight_cache
    from universal_neurons.activations.store import check_space
    from universal_neurons.artifacts import check_not_input, check_writable

    check_not_input(a.out, [a.tokens])
    check_writable(a.out, overwrite=True)  # an existing store is resumed or refused by cache_activations
    ts = load_token_set(a.tokens)
    cfg = store_config(a)
    if a.cluster:  # shards cached by the workers, stitched into one store at --out
        from universal_neurons.distributed import cache_distributed

        path = cache_distributed(a.model, ts, a.out, cluster=a.cluster, config=cfg, checkpoint=a.checkpoint,
                                 device=a.device, batch_rows=a.batch_rows, overwrite=a.overwrite)
        say(f"activations of {a.model} (cluster {a.cluster}) -> {path}")
        return
    lm = load_model(a.model, checkpoint=a.checkpoint, device=a.device)
    pf = preflight_cache(lm, ts, cfg, path=a.out)
    say("preflight: " + ", ".join(f"{k}={v}" for k, v in pf.items() if not isinstance(v, (list, dict))))
    check_space(pf, a.out, cfg)
    path = cache_activations(lm, ts, a.out, config=cfg, batch_rows=a.batch_rows, overwrite=a.overwrite)
    say(f"activations of {lm.name} -> {path}")


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
    correlation_args(p)
    cluster_arg(p)


@command("correlate", "correlate every neuron of the reference with every "
         "neuron of the others, with a baseline")(_add_correlate)
def _correlate(a):
    from universal_neurons.pipeline import correlate_stores

    labels = a.labels.split(",") if a.labels else None
    res = correlate_stores(a.stores, a.out, labels=labels, config=correlation_config(a),
                           batch_tokens=a.batch_tokens, cluster=a.cluster, all_pairs=a.all_pairs,
                           full_matrix_path=a.full_matrix, device=a.device, overwrite=a.overwrite,
                           allow_same_model=a.allow_same_model, say=say)
    if a.all_pairs:
        return 0
    if a.cluster:
        say(f"cluster {a.cluster}: {res.provenance['distributed']}")
    dead = ", ".join(f"{k}: {int(v.sum())}" for k, v in res.dead.items())
    say(f"correlated {res.n_tokens:,} tokens; dead neurons {dead} -> {a.out}")


def _add_flag(p):
    p.add_argument("correlation", help="result of `universal-neurons correlate`")
    p.add_argument("-o", "--out", required=True, help="table file: .csv or .h5")
    from universal_neurons.universality import UNIVERSAL_THRESHOLD

    p.add_argument("--threshold", type=float, default=UNIVERSAL_THRESHOLD,
                   help=f"universal iff excess_corr > threshold (default: {UNIVERSAL_THRESHOLD}, the paper's)")
    p.add_argument("--overwrite", action="store_true")


@command("flag", "build the universality table (excess correlation over "
         "the baseline) and flag universal neurons")(_add_flag)
def _flag(a):
    from universal_neurons import CorrelationResult, save_universality_table, universality_table
    from universal_neurons.pipeline import family_summary

    res = CorrelationResult.load(a.correlation)
    table = universality_table(res, threshold=a.threshold)
    save_universality_table(table, a.out, provenance=res.provenance, overwrite=a.overwrite)
    s = family_summary(table, res, a.threshold)
    per = "; ".join(f"layer {d['layer']}: {d['universal']}/{d['neurons']}" for d in s["per_layer"])
    say(f"{s['universal']} of {s['neurons']} neurons universal ({100 * s['universal_fraction']:.2f}%; {per}) "
        f"-> {a.out}")


# ---------------------------------------------------------------------------- run


def _add_run(p):
    p.add_argument("models", nargs="+", help="hub names or model directories of one seed family, reference first")
    p.add_argument("--steps", default=None, help="also run at these checkpoint steps and measure persistence")
    p.add_argument("--ablation-tokens", default=None,
                   help="held-out token set (.h5) for the ablation, instead of rows held out of --text (then "
                        "--held-out-share is 0); it must not be the studied tokens")
    p.add_argument("--skip", default=None,
                   help=f"comma-separated later stages to skip: {','.join(LATER_STAGES)}")
    p.add_argument("--text", required=True, help="text file, .jsonl, folder, or hf:<dataset>")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--checkpoint", type=int, default=None, help="training step loaded for every model")
    pipeline_args(p)
    cluster_arg(p)


@command("run", "the whole pipeline (tokenize, cache, correlate, flag, later stages) for models you name")(_add_run)
def _run(a):
    from universal_neurons.pipeline import run_pipeline

    cfg = pipeline_config(a, cluster=a.cluster)
    if a.ablation_tokens:  # the explicit held-out set replaces the rows held out of the text
        cfg = cfg.replace(held_out_share=0.0)
    steps = ints(a.steps, "--steps") if a.steps else None
    if steps:  # the later stages load every model at every step: all must be there before any work
        from universal_neurons.activations import check_available

        for step in steps:
            for model in a.models:
                check_available(model, checkpoint=step)
    stages = _later_stages(a, steps=steps, overwrite=a.overwrite)
    labels = a.labels.split(",") if a.labels else None
    res = run_pipeline(a.models, a.text, a.out, checkpoint=a.checkpoint, labels=labels,
                       config=cfg, overwrite=a.overwrite, extra_stages=stages)
    print_summary(res.summary)
    say(f"results -> {res.out_dir}" + (f"; report -> {res.summary['report']}" if "report" in res.summary else ""))


LATER_STAGES = ("properties", "ablation", "persistence", "agreement", "explanations", "report")  # in run order


def _later_stages(a, *, steps, overwrite: bool) -> list:
    """The stages after flagging, as the demo runs them; `--skip` names the ones to leave out. With
    `--cluster`, properties, ablation and agreement scan their tokens on the run's cluster (the run
    hands its client to its stages: `PipelineResult.client`)."""
    from universal_neurons.ablation import AblationConfig, ablation_stage
    from universal_neurons.activations import load_token_set
    from universal_neurons.agreement import agreement_stage
    from universal_neurons.errors import ConfigError
    from universal_neurons.persistence import persistence_stage
    from universal_neurons.properties import properties_stage
    from universal_neurons.report import report_stage

    skip = {s.strip() for s in a.skip.split(",") if s.strip()} if a.skip else set()
    unknown = skip - set(LATER_STAGES)
    if unknown:
        raise ConfigError(f"--skip names unknown stage(s) {sorted(unknown)}; the later stages are "
                          f"{','.join(LATER_STAGES)}")
    held = load_token_set(a.ablation_tokens) if a.ablation_tokens else None
    stages = []
    if "properties" not in skip:
        stages.append(properties_stage())
    if "ablation" not in skip:
        stages.append(ablation_stage(AblationConfig(), eval_tokens=held, overwrite=overwrite, device=a.device))
    if steps and "persistence" not in skip:
        stages.append(persistence_stage(steps=steps))
    if "agreement" not in skip:  # on the held-out rows; at every checkpoint of --steps
        stages.append(agreement_stage(tokens=held, steps=steps, overwrite=overwrite, device=a.device))
    if "explanations" not in skip:
        from universal_neurons.explain import explain_stage

        stages.append(explain_stage())  # derived from the run's own outputs, rewritten like the report
    if "report" not in skip:
        stages.append(report_stage)
    return stages
