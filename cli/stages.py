"""The subcommands of the later stages: ablate, properties, persistence, report."""

from __future__ import annotations

from pathlib import Path

from .flags import (
    ABLATION_FLAGS,
    PROPERTIES_FLAGS,
    cluster_arg,
    ints,
    pipeline_args,
    pipeline_config,
    say,
)
from .main import command
from .options import add_flags, config_from_args

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
    p.add_argument("--device", default=None,
                   help="where the model runs (default: CUDA when present); with --cluster, on each worker")
    p.add_argument("--overwrite", action="store_true")
    cluster_arg(p)


@command("ablate", "ablate universal neurons as a group (and per layer) "
         "against random controls; ΔCE, KL, entropy")(_add_ablate)
def _ablate(a):
    from universal_neurons import AblationConfig, AblationResult, ablation_study, load_universality_table
    from universal_neurons.activations import load_model, load_token_set
    from universal_neurons.errors import ConfigError

    AblationResult.check_out_dir(a.out, overwrite=a.overwrite)
    if a.cluster and a.per_token:
        raise ConfigError("--per-token is not available with --cluster (the workers would each hold part of the "
                          "file); drop --per-token, or run without --cluster")
    cfg = config_from_args(AblationConfig, a, ABLATION_FLAGS)
    table = load_universality_table(a.table)
    ts = load_token_set(a.tokens)
    out = Path(a.out)
    if a.cluster:  # the plan is built here, its row shards evaluated on the workers
        from universal_neurons.distributed import ablation_distributed

        res = ablation_distributed(a.model, table, ts, cfg, cluster=a.cluster, checkpoint=a.checkpoint,
                                   store=a.store, device=a.device)
    else:
        lm = load_model(a.model, checkpoint=a.checkpoint, device=a.device)
        per_token = out / "ablation_tokens.h5" if a.per_token else None
        res = ablation_study(lm, table, ts, cfg, store=a.store, per_token_path=per_token, overwrite=a.overwrite)
    res.save(out, overwrite=a.overwrite)
    for r in res.summary.itertuples():
        say(f"{r.group}: {r.n_neurons} neurons, ΔCE {r.delta_ce:+.4f} [{r.delta_ce_lo:+.4f}, {r.delta_ce_hi:+.4f}], "
             f"KL {r.kl:.4f}; controls ΔCE {r.control_delta_ce_mean:+.4f} [{r.control_delta_ce_lo:+.4f}, "
             f"{r.control_delta_ce_hi:+.4f}], ratio {r.ratio_delta_ce:.2f}; paired ΔCE {r.paired_delta_ce:+.4f} "
             f"[{r.paired_delta_ce_lo:+.4f}, {r.paired_delta_ce_hi:+.4f}] ({r.paired_delta_ce_per_neuron:+.5f} per "
             f"neuron), p {r.p_value:.3f} (>= {r.p_value_min:.3f})")
    tokens = res.provenance["token_set"]
    say(f"{cfg.kind} ablation at {cfg.positions} positions over {int(res.summary['n_tokens'].iloc[0]):,} predictions "
         f"of token set {tokens['hash'][:12]} ({tokens['relation_to_study']} relative to the table's) -> {out}")
    for w in res.provenance["warnings"]:
        say(f"WARNING: {w}")
    if a.cluster:
        say(f"cluster {a.cluster}: {len(res.provenance['distributed']['shards'])} row shard(s) on "
            f"{res.provenance['distributed']['workers']} worker(s)")


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
    p.add_argument("--device", default=None, help="where the model runs here (default: CUDA when present); with "
                                                  "--cluster each worker uses its own GPU when it has one")
    p.add_argument("--overwrite", action="store_true")
    cluster_arg(p)


@command("properties", "per-neuron weight, activation-moment and "
         "vocabulary properties; universal vs other")(_add_properties)
def _properties(a):
    from universal_neurons import (
        PropertiesConfig,
        compare_universal,
        load_universality_table,
        neuron_properties,
        save_properties,
    )
    from universal_neurons.activations import UniversalNeuronsError, load_model, load_token_set

    if a.tokens is None and a.store is None:
        raise UniversalNeuronsError("pass --tokens (moments from the live model) or --store (moments from a store)")
    ts = load_token_set(a.tokens) if a.tokens else None
    lm = load_model(a.model, checkpoint=a.checkpoint, device=a.device, process_weights=not a.no_weight_processing)
    config = config_from_args(PropertiesConfig, a, PROPERTIES_FLAGS)
    props = neuron_properties(lm, token_set=ts, store=a.store, config=config, cluster=a.cluster)
    path = save_properties(props, a.out, overwrite=a.overwrite)
    fam = ", ".join(f"{k} {v}" for k, v in props["family"].value_counts().items())
    say(f"properties of {len(props):,} neurons of {lm.name} (families: {fam}) -> {path}")
    if a.table:
        comp = compare_universal(load_universality_table(a.table), props)
        cpath = save_properties(comp, a.comparison or Path(a.out).with_name("property_comparison.csv"),
                                overwrite=a.overwrite)
        for r in comp.itertuples():
            say(f"  {r.property:>20}: median universal {r.median_universal:.4g} vs other {r.median_other:.4g}, "
                 f"rank-biserial {r.rank_biserial:+.3f}, p {r.p_value:.2g}")
        say(f"comparison ({int(comp['n_universal'].iloc[0])} universal neurons) -> {cpath}")


# ---------------------------------------------------------------------------- persistence


def _add_persistence(p):
    p.add_argument("models", nargs="+",
                   help="hub names or local seed directories (checkpoint-<step>/), reference first")
    p.add_argument("--steps", default=None, help="comma-separated checkpoint steps (hub models: required; seed "
                                                 "directories: default every saved checkpoint)")
    p.add_argument("--text", required=True, help="text file, .jsonl, folder, hf:<dataset>, or a token set (.h5)")
    p.add_argument("-o", "--out", required=True, help="output directory (checkpoints/step-<t>/, persistence/)")
    pipeline_args(p)


@command("persistence", "universal neurons at several training checkpoints: "
         "persistence, partner consistency, emergence")(_add_persistence)
def _persistence(a):
    from universal_neurons import run_persistence
    from universal_neurons.activations import load_token_set

    cfg = pipeline_config(a)
    text = load_token_set(a.text) if a.text.endswith((".h5", ".hdf5")) else a.text
    res = run_persistence(a.models, ints(a.steps, "--steps") if a.steps else None, text, a.out,
                          labels=a.labels.split(",") if a.labels else None, config=cfg, overwrite=a.overwrite)
    for t, g in res.emergence.groupby("step"):
        per = ", ".join(f"L{r.layer} {r.n_universal}" for r in g.itertuples())
        say(f"step {t}: {int(g['n_universal'].sum())} universal ({per})")
    adj = "; ".join(f"{t}->{t2}: {res.overall.loc[t, t2]:.3f}" for t, t2 in zip(res.steps, res.steps[1:]))
    say(f"persistence |U_t ∩ U_t'|/|U_t| of consecutive checkpoints: {adj}")
    say(f"results -> {Path(a.out) / 'persistence'}")


# ---------------------------------------------------------------------------- report


def _add_report(p):
    p.add_argument("run_dir", help="output directory of a pipeline run (`universal-neurons run/demo -o DIR`)")
    p.add_argument("-o", "--out", default=None, help="HTML file (default RUN_DIR/report.html)")
    p.add_argument("--title", default=None, help="title at the top of the report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report file")


@command("report", "one self-contained HTML report of a run (figures, "
         "universal neurons, provenance; works offline)")(_add_report)
def _report(a):
    from universal_neurons.report import Report

    report = Report.from_run(a.run_dir, title=a.title)
    path = report.save(a.out or Path(a.run_dir) / "report.html", overwrite=a.overwrite)
    say(f"report ({', '.join(s.title for s in report.sections)}) -> {path}")
