"""The `agreement` subcommand: functional agreement of a seed family on a token set."""

from __future__ import annotations

from pathlib import Path

from .flags import cluster_arg, say
from .main import command
from .options import Flag, add_flags, config_from_args

AGREEMENT_FLAGS = (
    Flag("pairs", "--pairs", "which pairs: reference = a against each other model, all = every unordered pair, "
         "ordered = every ordered pair", choices=("reference", "all", "ordered")),
    Flag("dtype", "--dtype", "precision of the log-softmax and divergences (float32: error ~1e-6 nats)",
         choices=("float64", "float32")),
    Flag("batch_rows", "--batch-rows", "token rows per forward pass; None = automatic (~256 MiB of log-probabilities)"),
    Flag("n_bootstrap", "--bootstrap", "bootstrap replicates over token rows"),
    Flag("ci", "--ci", "confidence level of the intervals"),
    Flag("seed", "--seed", "seed of the bootstrap's row draws"),
)


def _steps(text: str | None) -> tuple[int, ...] | str | None:
    """`--steps`: None, 'all', or comma-separated integers (a clear error otherwise)."""
    from universal_neurons.errors import ConfigError

    if text is None or text == "all":
        return text
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--steps takes 'all' or comma-separated integers (e.g. 0,100,1000), got {text!r}") from None


def _add_agreement(p):
    from universal_neurons.agreement import AgreementConfig

    p.add_argument("models", nargs="+", help="hub names, model directories or seed directories (checkpoint-<step>/) "
                                             "of one family, reference first")
    p.add_argument("--tokens", required=True, help="token set (.h5) to compare on: held-out tokens, e.g. "
                                                   "tokens_held_out.h5 of a `run`")
    p.add_argument("-o", "--out", required=True, help="output directory (agreement.csv, agreement_by_step.csv, ...)")
    p.add_argument("--steps", default=None, help="compare at these checkpoint steps (comma-separated), or 'all' = "
                                                 "every step the seed directories share; default: --checkpoint only")
    p.add_argument("--checkpoint", type=int, default=None, help="training step loaded for every model without --steps")
    p.add_argument("--no-init", action="store_true", help="do not add step 0 (initialisation) as the baseline "
                                                          "(default: added when every seed directory saved it)")
    p.add_argument("--labels", default=None, help="comma-separated short names, one per model (default a,b,c,...)")
    add_flags(p, AgreementConfig, AGREEMENT_FLAGS)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    cluster_arg(p)


@command("agreement", "how alike the seeds' next-token distributions are: KL both ways, Jensen-Shannon, top-1 "
                      "agreement, per pair and checkpoint")(_add_agreement)
def _agreement(a):
    from universal_neurons.activations import load_token_set
    from universal_neurons.agreement import AgreementConfig, agreement_over_checkpoints, functional_agreement
    from universal_neurons.agreement.result import FILES, check_output
    from universal_neurons.artifacts import check_not_input

    out = Path(a.out)
    for name in FILES.values():
        check_not_input(out / name, [a.tokens])
    check_output(out, overwrite=a.overwrite)  # before any model loads
    cfg = config_from_args(AgreementConfig, a, AGREEMENT_FLAGS)
    ts = load_token_set(a.tokens)
    labels = a.labels.split(",") if a.labels else None
    init = False if a.no_init else None
    steps = _steps(a.steps)
    common = dict(labels=labels, config=cfg, init=init, device=a.device, tokens=f"--tokens {a.tokens}",
                  cluster=a.cluster)
    if steps is not None:
        res = agreement_over_checkpoints(a.models, None if steps == "all" else steps, ts, **common)
    else:
        res = functional_agreement(a.models, ts, checkpoint=a.checkpoint, **common)
    res.save(out, overwrite=a.overwrite)
    say(f"agreement of {len(a.models)} models ({cfg.pairs} pairs) over {int(res.by_step['n_predictions'].iloc[0]):,} "
         f"predictions of token set {ts.hash[:12]}; mean over pairs, {cfg.ci:.0%} intervals:")
    for step, r in zip(res.steps, res.by_step.itertuples()):
        tag = " (initialisation)" if r.at_init else ""
        say(f"  step {'final' if step is None else step}{tag}: top-1 {r.top1:.4f} [{r.top1_lo:.4f}, {r.top1_hi:.4f}], "
             f"JS {r.js:.4f} [{r.js_lo:.4f}, {r.js_hi:.4f}], KL(a‖m) {r.kl_am:.4f}, KL(m‖a) {r.kl_ma:.4f} nats")
    say(f"results -> {out}")
