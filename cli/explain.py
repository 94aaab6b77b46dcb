"""The `explain` subcommand: one neuron beside its partners as text (and HTML), or the
explanations stage's files for a whole run directory."""

from __future__ import annotations

from .flags import say
from .main import command
from .options import Flag, add_flags, config_from_args

EXPLAIN_FLAGS = (
    Flag("k", "--k", "top-activating examples per neuron"),
    Flag("n_contrast", "--contrast", "non-universal reference neurons sampled for contrast (with their partners)"),
    Flag("seed", "--seed", "seed of the contrast sample"),
    Flag("n_unigrams", "--unigrams", "most frequent token ids given a unigram feature each"),
    Flag("batch_rows", "--batch-rows", "token rows per batch"),
    Flag("memory_budget", "--memory-gb", "accumulator budget in GiB; above it, blocks of neurons", type=float,
         to_field=lambda gib: int(gib * 2**30), from_field=lambda b: b / 2**30),
    Flag("quantile_examples", "--quantile-examples", "examples stored at each activation quantile"),
    Flag("context_before", "--context-before", "tokens of context before each example"),
    Flag("context_after", "--context-after", "tokens of context after each example"),
    Flag("best_features", "--best-features", "best features kept per neuron"),
    Flag("vocab_tokens", "--vocab-tokens", "top promoted and suppressed vocabulary tokens per neuron"),
    Flag("unigram_vr", "--unigram-vr", "unigram family: share of variance the best current-token feature explains"),
    Flag("alphabet_vr", "--alphabet-vr", "alphabet family: share of variance of the best first-letter feature"),
    Flag("previous_vr", "--previous-vr", "previous-token family: share of variance of the best previous-token feature"),
    Flag("position_vr", "--position-vr", "position family: share of variance of the position"),
)


def _neuron(spec: str) -> tuple[str | None, int, int]:
    """`L.N` or `LABEL:L.N` -> (label or None, layer, neuron)."""
    from universal_neurons.errors import ConfigError

    label, _, rest = spec.rpartition(":")
    try:
        layer, neuron = (int(x) for x in rest.split("."))
    except ValueError:
        raise ConfigError(f"--neuron takes LAYER.NEURON (e.g. 1.123) or LABEL:LAYER.NEURON (b:1.45), got {spec!r}") \
            from None
    return label or None, layer, neuron


def _add_explain(p):
    from universal_neurons.explain import ExplainConfig

    p.add_argument("run_dir", help="output directory of a pipeline run (`universal-neurons run/demo -o DIR`)")
    p.add_argument("--neuron", default=None, help="the neuron to show: LAYER.NEURON of the reference (or LABEL:L.N)")
    p.add_argument("--html", default=None, help="also write the neuron's view as one self-contained HTML file")
    p.add_argument("--all", action="store_true",
                   help="compute the explanations of the run's universal neurons and a contrast sample into "
                        "RUN_DIR/explanations/ (what the pipeline's stage writes)")
    p.add_argument("--contexts", type=int, default=None, help="top contexts shown (default: every one stored)")
    add_flags(p, ExplainConfig, EXPLAIN_FLAGS)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier explanation files / the HTML file")


@command("explain", "what a neuron responds to and what it does, beside its partners in the other seeds")(_add_explain)
def _explain(a):
    from universal_neurons.artifacts import check_writable, write_text
    from universal_neurons.errors import ConfigError
    from universal_neurons.explain import ExplainConfig, explain, explain_run
    from universal_neurons.explain.stage import summarise
    from universal_neurons.explain.storage import EXPLANATIONS_DIR

    if not a.all and not a.neuron:
        raise ConfigError("pass --neuron LAYER.NEURON to show one neuron, or --all to compute the run's explanations")
    cfg = config_from_args(ExplainConfig, a, EXPLAIN_FLAGS, device=a.device or "auto")
    target = _neuron(a.neuron) if a.neuron else None
    if a.html:
        if not target:
            raise ConfigError("--html writes one neuron's view: add --neuron LAYER.NEURON")
        check_writable(a.html, overwrite=a.overwrite)  # before any work
    if a.all:
        from pathlib import Path

        ex = explain_run(a.run_dir, config=cfg, overwrite=a.overwrite)
        s = summarise(ex, Path(a.run_dir) / EXPLANATIONS_DIR)
        fams = "; ".join(f"{role}: " + ", ".join(f"{k} {v}" for k, v in f.items())
                         for role, f in s["families_of_reference_neurons"].items())
        say(f"explained {s['neurons']} neurons in {s['groups']} groups ({s['universal']} universal) over "
             f"{s['n_tokens']:,} tokens; families of the reference neurons: {fams or 'none'} -> {s['dir']}")
    if target:
        label, layer, neuron = target
        view = explain(a.run_dir, layer, neuron, label=label, config=cfg, n_contexts=a.contexts)
        say(str(view))
        if a.html:
            write_text(a.html, view.html(), overwrite=a.overwrite)
            say(f"HTML -> {a.html}")
