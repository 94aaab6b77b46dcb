"""The ablation study as a pipeline stage (`run_pipeline(extra_stages=[ablation_stage(...)])`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from universal_neurons.activations import TokenSet, load_from_provenance
from universal_neurons.artifacts import plain, reuse_or_refuse

from .config import AblationConfig
from .means import neuron_means
from .output import AblationResult
from .plan import AblationPlan, ablation_study

__all__ = ["ablation_stage"]

log = logging.getLogger(__name__)

_HEADLINE = ["group", "n_neurons", "delta_ce", "delta_ce_lo", "delta_ce_hi", "control_delta_ce_mean",
             "ratio_delta_ce", "p_value", "paired_delta_ce", "paired_delta_ce_lo", "paired_delta_ce_hi",
             "delta_ce_per_neuron"]


def ablation_stage(config: AblationConfig = AblationConfig(), *, eval_tokens: TokenSet | None = None,
                   subdir: str = "ablation", overwrite: bool = False, device: str | None = None,
                   cluster: Any = None) -> Callable[[Any], dict[str, Any]]:
    """A stage for `run_pipeline(extra_stages=[...])`: the ablation study of the reference model (`a`).

    The model is reloaded exactly as the pipeline loaded it. It is evaluated on held-out tokens:
    `eval_tokens` when given, else the rows `run_pipeline` held out of the study
    (`PipelineResult.held_out`, `PipelineConfig.held_out_share`); with neither, on the studied
    tokens themselves, with a loud warning in the log and the result. Means (kind='mean') come
    from the pipeline's store of `a` when cached, else are streamed over the pipeline's token
    set, so they are never estimated on the held-out tokens they are evaluated on.

    Writes `out_dir/<subdir>/` (`ablation_runs.csv`, `ablation_summary.csv`, `ablation.json`,
    `ablation_rows.h5`). An existing result from the same model, tokens and config is reused; one
    from other inputs is refused unless `overwrite=True`.

    Args:
        config: the study's settings.
        eval_tokens: held-out tokens to evaluate on; None: the pipeline's held-out rows.
        subdir: the stage's folder inside the pipeline's output directory.
        overwrite: recompute and replace an existing result.
        device: where the model is reloaded; None picks CUDA when present.
        cluster: a Dask client or spec to evaluate the study on: the plan (sets, controls, means)
            is built here, its evaluation split over row shards on the workers (each loads the
            model), the same result as in process; None: the run's own cluster
            (`PipelineResult.client`, from `PipelineConfig.cluster`), or in process when the run
            has none.

    Returns:
        `stage(result: PipelineResult) -> {"ablation": {dir, kind, positions, tokens, warnings,
        groups: [headline numbers]}}`; `tokens` = the evaluated token set's hash and its relation
        to the study's (held-out, same, different).

    Raises:
        OutputExistsError: (from the stage) the folder holds a study of other inputs and not `overwrite`.
    """

    def stage(result) -> dict[str, Any]:
        prov = result.model_provenance[0]
        ts = next(t for t in (eval_tokens, getattr(result, "held_out", None), result.token_set) if t is not None)
        out = Path(result.out_dir) / subdir

        def same_inputs(path: Path) -> bool:
            p = AblationResult.load(path.parent).provenance
            return (p["token_set"]["hash"] == ts.hash and p["config"] == plain(config.to_dict())
                    and p["model"].get("resolved") == prov["resolved"] and p["checkpoint"] == prov["checkpoint"])

        if reuse_or_refuse(out / "ablation.json", overwrite=overwrite, matches=same_inputs,
                           what="set of ablation results"):
            log.info("reusing %s", out)
            return {"ablation": _headline(AblationResult.load(out), out)}
        lm = load_from_provenance(prov, device=device)
        if prov["source"] != "hub":  # a local `resolved` is the checkpoint directory itself: keep the family's names
            lm.provenance.update(checkpoint=prov["checkpoint"], name=prov["name"])
        if not result.table["is_universal"].any():  # not an error of the run: report it, keep the summary
            log.warning("no universal neurons in the reference model; the ablation stage is skipped")
            return {"ablation": {"dir": None, "kind": config.kind, "positions": config.positions,
                                 "skipped": "no universal neurons", "groups": []}}
        means = None
        if config.kind == "mean":
            store_path = Path(result.out_dir) / "stores" / f"{result.labels[0]}.h5"
            means = (neuron_means(store_path, result.token_set) if store_path.exists()
                     else neuron_means(lm, result.token_set, batch_rows=min(64, config.batch_rows or 16)))
        on = cluster if cluster is not None else getattr(result, "client", None)
        if on is None:
            res = ablation_study(lm, result.table, ts, config, means=means, study_hash=result.token_set.hash)
        else:
            # imported here: universal_neurons.distributed imports this package
            from universal_neurons.distributed import ModelSpec, evaluate_plan_distributed

            plan = AblationPlan.build(lm, result.table, ts, config, means=means, study_hash=result.token_set.hash)
            res = evaluate_plan_distributed(plan, ModelSpec.from_provenance(prov), ts, cluster=on, device=device)
        res.provenance["means"] = f"pipeline token set {result.token_set.hash[:12]}" if means is not None else None
        res.save(out, overwrite=overwrite)
        return {"ablation": _headline(res, out)}

    return stage


def _headline(res: AblationResult, out: Path) -> dict[str, Any]:
    tokens = res.provenance["token_set"]
    return {"dir": str(out), "kind": res.provenance["kind"], "positions": res.provenance.get("positions"),
            "tokens": {k: tokens.get(k) for k in ("hash", "n_rows", "relation_to_study", "study_hash")},
            "warnings": res.provenance.get("warnings", []),
            "groups": [{k: _json_value(v) for k, v in r.items()} for r in res.summary[_HEADLINE].to_dict("records")]}


def _json_value(v):
    """A JSON value for the summary: numpy scalars unwrapped, NaN (undefined) as None."""
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and v != v else v
