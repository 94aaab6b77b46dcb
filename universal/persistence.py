"""Stage: persistence of universal neurons across training checkpoints.

For checkpoints t_1 < ... < t_k of a seed family, U_t is the universal set of the reference
seed at t (from the universality table of a pipeline run at checkpoint t). Reported:

- persistence `|U_t ∩ U_t'| / |U_t|` for every ordered pair (t, t'), overall (a steps x steps
  matrix) and per layer (a long table). It is undefined, NaN, when U_t is empty (per layer:
  when layer l has no universal neuron at t); the diagonal is 1.0 wherever U_t is non-empty.
- partner consistency: of the universal neurons of the reference at t, the fraction whose
  matched partner in model m (argmax correlation, as (layer, neuron)) is the same at t and t';
  per model and as the mean over models (`model = 'mean'`). A dead partner (-1) never matches.
- emergence: per step and layer, the number and fraction of universal neurons and the mean
  excess correlation.

Outputs of `PersistenceResult.save(dir)`:

    persistence_overall.csv     matrix: column `t`, then one column per step t' (header = step)
    persistence_per_layer.csv   layer, t, t2, n_t, n_t2, n_both, persistence
    partner_consistency.csv     model, t, t2, n_t, n_same, consistency, n_both, n_both_same, consistency_persistent
    emergence.csv               step, layer, n_neurons, n_universal, fraction, mean_excess
    persistence.json            provenance (steps, threshold, models, per-step runs)

`run_persistence` runs the whole pipeline once per checkpoint into `out_dir/checkpoints/step-<t>/`
(reusing what a previous call computed there) and writes the tables into `out_dir/persistence/`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from universal_neurons.activations import check_available, list_checkpoints
from universal_neurons.artifacts import atomic_path, read_json, refuse_existing_results, write_json
from universal_neurons.errors import (
    ConfigError,
    IncompatibleInputsError,
    InputError,
    InputNotFoundError,
)
from universal_neurons.runtime import provenance_base

from .pipeline import PipelineConfig, run_pipeline
from .universality import flag_universal

__all__ = ["PersistenceResult", "persistence_from_tables", "run_persistence", "persistence_stage", "resolve_steps"]

log = logging.getLogger(__name__)

_FILES = {"overall": "persistence_overall.csv", "per_layer": "persistence_per_layer.csv",
          "partner_consistency": "partner_consistency.csv", "emergence": "emergence.csv"}
_PROVENANCE = "persistence.json"


@dataclass
class PersistenceResult:
    """Persistence tables of one seed family over its checkpoints (see the module docstring).

    Attributes:
        steps: ascending checkpoint steps.
        overall: DataFrame `[step t, step t']` of `|U_t ∩ U_t'| / |U_t|` (NaN where U_t is empty).
        per_layer: long DataFrame `layer, t, t2, n_t, n_t2, n_both, persistence`.
        partner_consistency: long DataFrame `model, t, t2, n_t, n_same, consistency, n_both,
            n_both_same, consistency_persistent` (`model='mean'`: mean over models).
        emergence: long DataFrame `step, layer, n_neurons, n_universal, fraction, mean_excess`.
        provenance: thresholds, models, per-step runs and definitions.
    """

    steps: list[int]
    overall: pd.DataFrame
    per_layer: pd.DataFrame
    partner_consistency: pd.DataFrame
    emergence: pd.DataFrame
    provenance: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the four CSV tables and `persistence.json` into `out_dir`, each atomically.

        Args:
            out_dir: the directory (created when absent).
            overwrite: replace the files of an earlier result.

        Returns:
            `out_dir` as a `Path`.

        Raises:
            OutputExistsError: `out_dir` holds one of the files and `overwrite` is False
                (checked before anything is written).
        """
        out = refuse_existing_results(out_dir, [*_FILES.values(), _PROVENANCE], what="persistence",
                                      overwrite=overwrite)
        with atomic_path(out / _FILES["overall"], overwrite=overwrite) as tmp:
            self.overall.to_csv(tmp, index_label="t")
        for name in ("per_layer", "partner_consistency", "emergence"):
            with atomic_path(out / _FILES[name], overwrite=overwrite) as tmp:
                getattr(self, name).to_csv(tmp, index=False)
        write_json(out / _PROVENANCE, {**self.provenance, "steps": self.steps, "files": _FILES}, overwrite=overwrite)
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "PersistenceResult":
        """Read what `save` wrote.

        Args:
            out_dir: a directory written by `save`.

        Returns:
            The result.

        Raises:
            InputNotFoundError: a file of the result is missing.
        """
        out = Path(out_dir)
        missing = [f for f in [*_FILES.values(), _PROVENANCE] if not (out / f).is_file()]
        if missing:
            raise InputNotFoundError(f"{out} has no {missing[0]}; compute persistence with run_persistence "
                                     "(`universal-neurons persistence`)")
        prov = read_json(out / _PROVENANCE, what="persistence provenance")
        overall = pd.read_csv(out / _FILES["overall"], index_col="t")
        overall.columns = [int(c) for c in overall.columns]
        overall.columns.name = "t2"
        return cls(steps=[int(s) for s in prov["steps"]], overall=overall,
                   per_layer=pd.read_csv(out / _FILES["per_layer"]),
                   partner_consistency=pd.read_csv(out / _FILES["partner_consistency"], dtype={"model": str}),
                   emergence=pd.read_csv(out / _FILES["emergence"]), provenance=prov)


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def _mean_over(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([row[key] for row in rows]))


def _check_tables(tables: Mapping[int, pd.DataFrame]) -> tuple[list[int], list[str]]:
    steps = sorted(tables)
    if len(steps) < 2:
        raise InputError(f"persistence compares checkpoints and needs at least two; got steps {steps}")
    first = tables[steps[0]]
    labels = None
    for t in steps:
        table = tables[t]
        need = {"layer", "neuron", "is_universal", "excess_corr"} - set(table.columns)
        if need:
            raise InputError(f"the table of step {t} lacks {sorted(need)}; pass universality tables")
        if len(table) != len(first) or not (np.array_equal(table["layer"].to_numpy(), first["layer"].to_numpy())
                                            and np.array_equal(table["neuron"].to_numpy(), first["neuron"].to_numpy())):
            raise IncompatibleInputsError(
                f"the universality table of step {t} has {len(table)} neurons in {table['layer'].nunique()} layers, "
                f"the one of step {steps[0]} {len(first)} in {first['layer'].nunique()}; every checkpoint must be of "
                "the same models (same shapes, neurons in the same order)")
        mine = sorted(c[len("partner_layer_"):] for c in table.columns if c.startswith("partner_layer_"))
        if labels is not None and mine != labels:
            raise IncompatibleInputsError(f"the table of step {t} has partner models {mine}, others have {labels}; "
                                          "use the same family (same labels) at every checkpoint")
        labels = mine
    return steps, labels or []


def persistence_from_tables(tables: Mapping[int, pd.DataFrame], *, threshold: float | None = None,
                            provenance: dict[str, Any] | None = None) -> PersistenceResult:
    """Persistence, partner consistency and emergence from one universality table per checkpoint.

    Args:
        tables: `{step: universality table}` of the same reference model and family (same
            shapes and labels, one row per neuron `[layer * d_mlp]`), at least two steps.
        threshold: re-flag `is_universal = excess_corr > threshold` (None: use each table's flag).
        provenance: extra fields recorded with the result.

    Returns:
        A `PersistenceResult`.

    Raises:
        InputError: fewer than two steps, or a table lacks a needed column.
        IncompatibleInputsError: the tables are of different shapes or families.
    """
    tables = {int(t): table for t, table in tables.items()}
    steps, labels = _check_tables(tables)
    universal = {t: (flag_universal(tables[t]["excess_corr"].to_numpy(float), threshold) if threshold is not None
                     else tables[t]["is_universal"].to_numpy(bool)) for t in steps}  # step -> bool [neuron]
    layer_of = tables[steps[0]]["layer"].to_numpy()  # [neuron]
    layers = sorted(set(layer_of.tolist()))

    overall = pd.DataFrame([[_ratio(int((universal[t] & universal[t2]).sum()), int(universal[t].sum()))
                             for t2 in steps] for t in steps],
                           index=pd.Index(steps, name="t"), columns=pd.Index(steps, name="t2"))
    per_layer = []
    for layer in layers:
        in_layer = layer_of == layer
        for t in steps:
            for t2 in steps:
                n_t, n_t2, n_both = (int((in_layer & members).sum())
                                     for members in (universal[t], universal[t2], universal[t] & universal[t2]))
                per_layer.append({"layer": layer, "t": t, "t2": t2, "n_t": n_t, "n_t2": n_t2, "n_both": n_both,
                                  "persistence": _ratio(n_both, n_t)})

    partners = {t: {label: (tables[t][f"partner_layer_{label}"].to_numpy(),
                            tables[t][f"partner_neuron_{label}"].to_numpy())
                    for label in labels} for t in steps}
    consistency = []
    for t in steps:
        for t2 in steps:
            now = universal[t]
            both = now & universal[t2]
            rows = []
            for label in labels:
                (layer_t, neuron_t), (layer_t2, neuron_t2) = partners[t][label], partners[t2][label]
                same = (layer_t == layer_t2) & (neuron_t == neuron_t2) & (layer_t >= 0)  # a dead partner is -1
                rows.append({"model": label, "t": t, "t2": t2, "n_t": int(now.sum()), "n_same": int((now & same).sum()),
                             "consistency": _ratio(int((now & same).sum()), int(now.sum())),
                             "n_both": int(both.sum()), "n_both_same": int((both & same).sum()),
                             "consistency_persistent": _ratio(int((both & same).sum()), int(both.sum()))})
            if rows:
                rows.append({"model": "mean", "t": t, "t2": t2, "n_t": rows[0]["n_t"],
                             **{key: _mean_over(rows, key) for key in ("n_same", "consistency",
                                                                       "consistency_persistent", "n_both_same")},
                             "n_both": rows[0]["n_both"]})
            consistency += rows

    emergence = []
    for t in steps:
        excess = tables[t]["excess_corr"].to_numpy(float)
        for layer in layers:
            in_layer = layer_of == layer
            live = excess[in_layer & np.isfinite(excess)]
            emergence.append({"step": t, "layer": layer, "n_neurons": int(in_layer.sum()),
                              "n_universal": int(universal[t][in_layer].sum()),
                              "fraction": float(universal[t][in_layer].mean()),
                              "mean_excess": float(live.mean()) if len(live) else np.nan})

    cols = ["model", "t", "t2", "n_t", "n_same", "consistency", "n_both", "n_both_same", "consistency_persistent"]
    prov = {**provenance_base("persistence"), "threshold": threshold, "models": labels,
            "n_universal": {str(t): int(universal[t].sum()) for t in steps},
            "definitions": {"persistence": "|U_t & U_t2| / |U_t|, NaN when U_t is empty",
                            "consistency": "fraction of U_t whose partner (layer, neuron) in model m is the same "
                                           "at t and t2; consistency_persistent: the same over U_t & U_t2"},
            **(provenance or {})}
    return PersistenceResult(steps=steps, overall=overall, per_layer=pd.DataFrame(per_layer),
                             partner_consistency=pd.DataFrame(consistency, columns=cols),
                             emergence=pd.DataFrame(emergence), provenance=prov)


# ---------------------------------------------------------------------------- running


def resolve_steps(models: Sequence[str | os.PathLike], steps: Sequence[int] | None) -> list[int]:
    """The checkpoint steps to study.

    Args:
        models: hub names or local seed directories (holding `checkpoint-<step>/`).
        steps: the steps (checked against the local seed directories); None = every step all
            the local seed directories saved.

    Returns:
        The steps, ascending, at least two.

    Raises:
        ConfigError: `steps` is None with hub models, or names fewer than two steps.
        InputError: the seed directories share no checkpoint.
        InputNotFoundError: a seed directory lacks one of `steps`.
    """
    local = [Path(m) for m in models if Path(m).exists()]
    if steps is None:
        if len(local) != len(models):
            raise ConfigError("hub models have no list of checkpoints here; pass the steps to compare "
                              "(--steps 0,1000,...)")
        saved = [set(list_checkpoints(seed_dir)) for seed_dir in local]
        common = sorted(set.intersection(*saved)) if saved else []
        if not common:
            listing = {str(seed_dir): sorted(have) for seed_dir, have in zip(local, saved)}
            raise InputError(f"the seed directories share no checkpoint-<step>/ sub-directory ({listing}); pass "
                             "seed directories written by train_family, or hub models with --steps")
        steps = common
    steps = sorted({int(step) for step in steps})
    if len(steps) < 2:
        raise ConfigError(f"persistence compares checkpoints and needs at least two steps; got {steps}")
    for seed_dir in local:
        have = set(list_checkpoints(seed_dir))
        lacking = [step for step in steps if step not in have]
        if lacking:
            raise InputNotFoundError(f"{seed_dir} has no checkpoint {lacking[0]} (it has {sorted(have) or 'none'}); "
                                     "pass steps every seed has")
    return steps


def _tables_provenance(runs: Mapping[int, Any]) -> dict[str, Any]:
    """What each checkpoint's universality table was computed from."""
    return {"runs": {str(t): {"out_dir": str(run.out_dir), "token_set": run.token_set.hash,
                              "models": [{k: model.get(k) for k in ("name", "resolved", "checkpoint", "revision")}
                                         for model in run.model_provenance]} for t, run in runs.items()}}


def run_persistence(
    models: Sequence[str | os.PathLike],
    steps: Sequence[int] | None,
    text,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    config: PipelineConfig = PipelineConfig(),
    overwrite: bool = False,
) -> PersistenceResult:
    """Universal sets at every checkpoint of a seed family and their persistence.

    Runs `run_pipeline` once per step into `out_dir/checkpoints/step-<t>/` on one shared token
    set; stores and correlation results already there from the same inputs are reused, never
    recomputed. The tables go to `out_dir/persistence/` (rewritten on every call).

    Args:
        models: hub names (with `steps`) or local seed directories holding `checkpoint-<step>/`.
        steps: checkpoint steps; None = every step all local seed directories saved.
        text: what `build_token_set` reads, or a `TokenSet`.
        out_dir: where the per-checkpoint runs and the tables go.
        labels: as in `run_pipeline`.
        config: as in `run_pipeline` (`config.threshold` flags universality).
        overwrite: as in `run_pipeline`.

    Returns:
        A `PersistenceResult` (also saved).

    Raises:
        ConfigError, InputError, InputNotFoundError: see `resolve_steps`.
        ModelUnavailableError, InputNotFoundError: a model at some step cannot be loaded here (checked for
            every model and step before any work).
    """
    steps = resolve_steps(models, steps)
    for t in steps:  # every model at every step is there before the first step's work
        for model in models:
            check_available(model, checkpoint=t)
    out = Path(out_dir)
    runs: dict[int, Any] = {}
    tokens = text
    for t in steps:
        log.info("checkpoint %d (%d of %d)", t, len(runs) + 1, len(steps))
        runs[t] = run_pipeline(models, tokens, out / "checkpoints" / f"step-{t}", checkpoint=t, labels=labels,
                               config=config, overwrite=overwrite)
        tokens = runs[t].token_set  # tokenised once: every checkpoint sees the same tokens
    result = persistence_from_tables({t: run.table for t, run in runs.items()},
                                     provenance={"threshold": config.threshold, **_tables_provenance(runs)})
    result.save(out / "persistence", overwrite=True)  # derived from the runs above: rewritten every call
    return result


def _run_step(provenance: dict[str, Any]) -> int | None:
    """The checkpoint a model was loaded at: recorded, or read off its `checkpoint-<step>` directory."""
    if provenance.get("checkpoint") is not None:
        return int(provenance["checkpoint"])
    name = Path(str(provenance.get("resolved", ""))).name
    step = name[len("checkpoint-"):]
    return int(step) if name.startswith("checkpoint-") and step.isdigit() else None


def _seed_dirs(model_provenance: Sequence[dict[str, Any]]) -> list[Path]:
    """The seed directories of a run's local `checkpoint-<step>` models."""
    dirs = []
    for model in model_provenance:
        resolved = Path(str(model.get("resolved", "")))
        if model.get("source") != "local" or not resolved.name.startswith("checkpoint-"):
            raise InputError(f"{model.get('name')} is not a local seed directory with checkpoints; pass "
                             "seed_dirs= (or use run_persistence with hub models and steps)")
        dirs.append(resolved.parent)
    return dirs


def persistence_stage(seed_dirs: Sequence[str | os.PathLike] | None = None, steps: Sequence[int] | None = None, *,
                      config: PipelineConfig | None = None) -> Callable[[Any], dict[str, Any]]:
    """A `run_pipeline(extra_stages=[...])` stage: persistence over the family's checkpoints.

    The main run is the checkpoint it was run at (the final one when none was named); every
    other step runs into `out_dir/checkpoints/step-<t>/` on the run's token set, and the tables go
    to `out_dir/persistence/`.

    Args:
        seed_dirs: the seed directories (default: the parents of the run's `checkpoint-<step>`
            model directories).
        steps: default every checkpoint all seeds saved (`list_checkpoints`).
        config: pipeline settings of the other checkpoints (default: the main run's, read back
            from its summary).

    Returns:
        The stage; it returns `{"persistence": {steps, n_universal, adjacent, files}}` with
        `adjacent = [{t, t2, persistence}]` for consecutive steps.
    """

    def stage(main_run) -> dict[str, Any]:
        dirs = list(seed_dirs) if seed_dirs is not None else _seed_dirs(main_run.model_provenance)
        cfg = config or PipelineConfig.from_dict(main_run.summary["config"])
        here = _run_step(main_run.model_provenance[0])
        out = Path(main_run.out_dir)
        runs: dict[int, Any] = {}
        for t in resolve_steps(dirs, steps):
            if t == here:
                runs[t] = main_run
                continue
            runs[t] = run_pipeline(dirs, main_run.token_set, out / "checkpoints" / f"step-{t}", checkpoint=t,
                                   labels=main_run.labels, config=cfg)
        result = persistence_from_tables({t: run.table for t, run in runs.items()},
                                         provenance={"threshold": cfg.threshold, **_tables_provenance(runs)})
        result.save(out / "persistence", overwrite=True)  # derived from the runs: rewritten with them
        adjacent = [{"t": t, "t2": t2, "persistence": _none_if_nan(result.overall.loc[t, t2])}
                    for t, t2 in zip(result.steps, result.steps[1:])]
        return {"persistence": {"steps": result.steps, "n_universal": result.provenance["n_universal"],
                                "adjacent": adjacent,
                                "files": {k: str(out / "persistence" / f) for k, f in _FILES.items()}}}

    return stage


def _none_if_nan(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
