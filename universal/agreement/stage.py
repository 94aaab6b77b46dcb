"""Agreement as a pipeline stage (`run_pipeline(extra_stages=[agreement_stage(...)])`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from universal_neurons.activations import TokenSet, list_checkpoints
from universal_neurons.artifacts import plain, reuse_or_refuse

from .config import METRICS, AgreementConfig
from .result import FILES, AgreementResult
from .run import agreement_over_checkpoints, functional_agreement, model_spec

__all__ = ["agreement_stage", "HELD_OUT_FILE"]

log = logging.getLogger(__name__)

HELD_OUT_FILE = "tokens_held_out.h5"  # what run_pipeline writes when it holds rows out of the study


def _tokens(result, given: TokenSet | None) -> tuple[TokenSet, str]:
    """The token set to compare on and which it is: given, the run's held-out rows, or the run's own."""
    if given is not None:
        return given, "given to agreement_stage"
    held = Path(result.out_dir) / HELD_OUT_FILE
    if held.is_file():
        return TokenSet.load(held), f"held-out ({HELD_OUT_FILE} of the run)"
    log.info("the run has no %s; agreement is measured on the run's own tokens", HELD_OUT_FILE)
    return result.token_set, "the run's tokens (tokens.h5; no held-out rows)"


def _plan(result, steps: Sequence[int] | None) -> tuple[list[str], int | None, list[int] | None]:
    """The models to reload, the run's step, and the steps to compare at (None: the run's only)."""
    specs, here = zip(*(model_spec(p) for p in result.model_provenance))
    local = all(Path(s).is_dir() and list_checkpoints(s) for s in specs)
    if steps is not None:
        return list(specs), here[0], sorted({int(s) for s in steps})
    if local:
        common = sorted(set.intersection(*(set(list_checkpoints(s)) for s in specs)))
        return list(specs), here[0], common or None
    return list(specs), here[0], None


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _headline(res: AgreementResult, out: Path) -> dict[str, Any]:
    cols = ["n_pairs", *[c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi")]]
    tokens = res.provenance["token_set"]
    return {"dir": str(out), "pairs": res.provenance["pairs"], "steps": res.steps,
            "tokens": {k: tokens.get(k) for k in ("hash", "n_rows", "n_counted_predictions", "which")},
            "by_step": [{"step": step, "at_init": bool(row["at_init"]), **{c: _finite(plain(row[c])) for c in cols}}
                        for step, (_, row) in zip(res.steps, res.by_step.iterrows())],
            "files": {k: str(out / f) for k, f in FILES.items()}}


def agreement_stage(*, steps: Sequence[int] | None = None, tokens: TokenSet | None = None,
                    config: AgreementConfig = AgreementConfig(), init: bool | None = None, subdir: str = "agreement",
                    device: str | None = None, overwrite: bool = False,
                    cluster: Any = None) -> Callable[[Any], dict[str, Any]]:
    """A `run_pipeline(extra_stages=[...])` stage: functional agreement of the run's models.

    Tokens: `tokens` when given, else the run's held-out rows when its folder has
    `tokens_held_out.h5`, else the run's own token set; which one is recorded. Checkpoints:
    `steps` when given; else every checkpoint all the models' seed directories saved (the
    run's local `checkpoint-<step>` models); else only the run's checkpoint (with step 0 when
    every seed saved it, see `functional_agreement`'s `init`).

    Writes `out_dir/<subdir>/` (`agreement.csv`, `agreement_by_step.csv`, `agreement_rows.npz`,
    `agreement.json`). A result there from the same models, steps, tokens and config is reused;
    one from other inputs is refused unless `overwrite=True`.

    Args:
        steps: checkpoint steps to compare at (None: as above).
        tokens: the rows to compare on (None: as above).
        config: pairs, precision, batch rows, bootstrap.
        init: as in `functional_agreement`.
        subdir: the stage's folder inside the run's directory.
        device: where the models run; None picks CUDA when present.
        overwrite: recompute and replace an existing result.
        cluster: a Dask client or spec to run the forward passes on (row shards); None: the
            run's own cluster (`PipelineResult.client`, from `PipelineConfig.cluster`), or in
            process when the run has none.

    Returns:
        `stage(result: PipelineResult) -> {"agreement": {dir, pairs, steps, tokens, by_step, files}}`,
        `by_step` = per step the means over pairs of `kl_am, kl_ma, js, top1` with intervals
        (`_lo`, `_hi`); `tokens.which` says which tokens were used.

    Raises:
        OutputExistsError: (from the stage) the folder holds a result of other inputs and not `overwrite`.
    """

    def stage(result) -> dict[str, Any]:
        out = Path(result.out_dir) / subdir
        ts, which = _tokens(result, tokens)
        specs, here, wanted = _plan(result, steps)
        labels = list(result.labels)

        def same_inputs(path: Path) -> bool:
            prov = AgreementResult.load(path.parent).provenance
            models = {m.get("spec") for run in prov["models"].values() for m in run}
            expected = wanted or ([here] if here is not None else [])
            return (prov["token_set"]["hash"] == ts.hash and prov["config"] == plain(config.to_dict())
                    and prov["labels"] == labels and models == set(specs) and set(expected) <= set(prov["steps"]))

        if reuse_or_refuse(out / FILES["provenance"], overwrite=overwrite, matches=same_inputs,
                           what="set of agreement results"):
            log.info("reusing %s", out)
            return {"agreement": _headline(AgreementResult.load(out), out)}
        on = cluster if cluster is not None else getattr(result, "client", None)
        if wanted is not None and len(wanted) > 1:
            res = agreement_over_checkpoints(specs, wanted, ts, labels=labels, config=config, init=init,
                                             device=device, tokens=which, cluster=on)
        else:
            step = wanted[0] if wanted else here
            res = functional_agreement(specs, ts, checkpoint=step, labels=labels, config=config, init=init,
                                       device=device, tokens=which, cluster=on)
        res.save(out, overwrite=overwrite)
        return {"agreement": _headline(res, out)}

    return stage
