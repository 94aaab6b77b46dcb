"""Stage: persistence of universal neurons across training checkpoints (METHOD.md §9).

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

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from universal_neurons.activations import StoreConfig, TokenSetConfig, list_checkpoints
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import from_json, provenance_base, to_json

from .correlation import CorrelationConfig
from .pipeline import PipelineConfig, run_pipeline
from .universality import flag_universal

__all__ = ["PersistenceResult", "persistence_from_tables", "run_persistence", "persistence_stage", "resolve_steps"]

log = logging.getLogger("universal_neurons")

_FILES = {"overall": "persistence_overall.csv", "per_layer": "persistence_per_layer.csv",
          "partner_consistency": "partner_consistency.csv", "emergence": "emergence.csv"}
_PROVENANCE = "persistence.json"


@dataclass
class PersistenceResult:
    """Persistence tables of one seed family over its checkpoints (see the module docstring).

    - `steps`: ascending checkpoint steps.
    - `overall`: DataFrame `[step t, step t']` of `|U_t ∩ U_t'| / |U_t|` (NaN where U_t is empty).
    - `per_layer`: long DataFrame `layer, t, t2, n_t, n_t2, n_both, persistence`.
    - `partner_consistency`: long DataFrame `model, t, t2, n_t, n_same, consistency, n_both,
      n_both_same, consistency_persistent` (`model='mean'`: mean over models).
    - `emergence`: long DataFrame `step, layer, n_neurons, n_universal, fraction, mean_excess`.
    """

    steps: list[int]
    overall: pd.DataFrame
    per_layer: pd.DataFrame
    partner_consistency: pd.DataFrame
    emergence: pd.DataFrame
    provenance: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the four CSV tables and `persistence.json` into `out_dir`."""
        out = Path(out_dir)
        if not overwrite and any((out / f).exists() for f in [*_FILES.values(), _PROVENANCE]):
            raise UniversalNeuronsError(f"{out} already holds persistence results; pass overwrite=True "
                                        "(--overwrite) or choose another directory")
        out.mkdir(parents=True, exist_ok=True)
        self.overall.to_csv(out / _FILES["overall"], index_label="t")
        for name in ("per_layer", "partner_consistency", "emergence"):
            getattr(self, name).to_csv(out / _FILES[name], index=False)
        (out / _PROVENANCE).write_text(to_json({**self.provenance, "steps": self.steps, "files": _FILES}))
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "PersistenceResult":
        """Read what `save` wrote."""
        out = Path(out_dir)
        missing = [f for f in [*_FILES.values(), _PROVENANCE] if not (out / f).is_file()]
        if missing:
            raise UniversalNeuronsError(f"{out} has no {missing[0]}; compute persistence with run_persistence "
                                        "(`universal-neurons persistence`)")
        prov = from_json((out / _PROVENANCE).read_text())
        overall = pd.read_csv(out / _FILES["overall"], index_col="t")
        overall.columns = [int(c) for c in overall.columns]
        overall.columns.name = "t2"
        return cls(steps=[int(s) for s in prov["steps"]], overall=overall,
                   per_layer=pd.read_csv(out / _FILES["per_layer"]),
                   partner_consistency=pd.read_csv(out / _FILES["partner_consistency"], dtype={"model": str}),
                   emergence=pd.read_csv(out / _FILES["emergence"]), provenance=prov)


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def _check_tables(tables: Mapping[int, pd.DataFrame]) -> tuple[list[int], list[str]]:
    steps = sorted(tables)
    if len(steps) < 2:
        raise UniversalNeuronsError(f"persistence compares checkpoints and needs at least two; got steps {steps}")
    first = tables[steps[0]]
    labels = None
    for t in steps:
        tab = tables[t]
        need = {"layer", "neuron", "is_universal", "excess_corr"} - set(tab.columns)
        if need:
            raise UniversalNeuronsError(f"the table of step {t} lacks {sorted(need)}; pass universality tables")
        if len(tab) != len(first) or not (np.array_equal(tab["layer"].to_numpy(), first["layer"].to_numpy())
                                          and np.array_equal(tab["neuron"].to_numpy(), first["neuron"].to_numpy())):
            raise UniversalNeuronsError(
                f"the universality table of step {t} has {len(tab)} neurons in {tab['layer'].nunique()} layers, the "
                f"one of step {steps[0]} {len(first)} in {first['layer'].nunique()}; every checkpoint must be of "
                "the same models (same shapes, neurons in the same order)")
        mine = sorted(c[len("partner_layer_"):] for c in tab.columns if c.startswith("partner_layer_"))
        if labels is not None and mine != labels:
            raise UniversalNeuronsError(f"the table of step {t} has partner models {mine}, others have {labels}; "
                                        "use the same family (same labels) at every checkpoint")
        labels = mine
    return steps, labels or []


def persistence_from_tables(tables: Mapping[int, pd.DataFrame], *, threshold: float | None = None,
                            provenance: dict[str, Any] | None = None) -> PersistenceResult:
    """Persistence, partner consistency and emergence from one universality table per checkpoint.

    **Arguments**
    - `tables`: `{step: universality table}` of the same reference model and family (same
      shapes and labels), at least two steps.
    - `threshold`: re-flag `is_universal = excess_corr > threshold` (None: use each table's flag).
    - `provenance`: extra fields recorded with the result.

    **Returns** a `PersistenceResult`.
    """
    tables = {int(t): tab for t, tab in tables.items()}
    steps, labels = _check_tables(tables)
    U = {t: (flag_universal(tables[t]["excess_corr"].to_numpy(float), threshold) if threshold is not None
             else tables[t]["is_universal"].to_numpy(bool)) for t in steps}
    layer = tables[steps[0]]["layer"].to_numpy()
    layers = sorted(set(layer.tolist()))

    overall = pd.DataFrame([[_ratio(int((U[t] & U[t2]).sum()), int(U[t].sum())) for t2 in steps] for t in steps],
                           index=pd.Index(steps, name="t"), columns=pd.Index(steps, name="t2"))
    per_layer = []
    for l in layers:
        in_l = layer == l
        for t in steps:
            for t2 in steps:
                n_t, n_t2, n_both = (int((in_l & m).sum()) for m in (U[t], U[t2], U[t] & U[t2]))
                per_layer.append({"layer": l, "t": t, "t2": t2, "n_t": n_t, "n_t2": n_t2, "n_both": n_both,
                                  "persistence": _ratio(n_both, n_t)})

    partners = {t: {m: (tables[t][f"partner_layer_{m}"].to_numpy(), tables[t][f"partner_neuron_{m}"].to_numpy())
                    for m in labels} for t in steps}
    consistency = []
    for t in steps:
        for t2 in steps:
            both = U[t] & U[t2]
            rows = []
            for m in labels:
                (la, na), (lb, nb) = partners[t][m], partners[t2][m]
                same = (la == lb) & (na == nb) & (la >= 0)
                rows.append({"model": m, "t": t, "t2": t2, "n_t": int(U[t].sum()), "n_same": int((U[t] & same).sum()),
                             "consistency": _ratio(int((U[t] & same).sum()), int(U[t].sum())),
                             "n_both": int(both.sum()), "n_both_same": int((both & same).sum()),
                             "consistency_persistent": _ratio(int((both & same).sum()), int(both.sum()))})
            if rows:
                mean = {k: float(np.mean([r[k] for r in rows])) for k in ("consistency", "consistency_persistent")}
                rows.append({"model": "mean", "t": t, "t2": t2, "n_t": rows[0]["n_t"],
                             "n_same": float(np.mean([r["n_same"] for r in rows])), **mean,
                             "n_both": rows[0]["n_both"],
                             "n_both_same": float(np.mean([r["n_both_same"] for r in rows]))})
            consistency += rows

    emergence = []
    for t in steps:
        excess = tables[t]["excess_corr"].to_numpy(float)
        for l in layers:
            in_l = layer == l
            e = excess[in_l & np.isfinite(excess)]
            emergence.append({"step": t, "layer": l, "n_neurons": int(in_l.sum()), "n_universal": int(U[t][in_l].sum()),
                              "fraction": float(U[t][in_l].mean()), "mean_excess": float(e.mean()) if len(e) else np.nan})

    cols = ["model", "t", "t2", "n_t", "n_same", "consistency", "n_both", "n_both_same", "consistency_persistent"]
    prov = {**provenance_base("persistence"), "threshold": threshold, "models": labels,
            "n_universal": {str(t): int(U[t].sum()) for t in steps},
            "definitions": {"persistence": "|U_t & U_t2| / |U_t|, NaN when U_t is empty",
                            "consistency": "fraction of U_t whose partner (layer, neuron) in model m is the same "
                                           "at t and t2; consistency_persistent: the same over U_t & U_t2"},
            **(provenance or {})}
    return PersistenceResult(steps=steps, overall=overall, per_layer=pd.DataFrame(per_layer),
                             partner_consistency=pd.DataFrame(consistency, columns=cols),
                             emergence=pd.DataFrame(emergence), provenance=prov)


# ---------------------------------------------------------------------------- running


def resolve_steps(models: Sequence[str | os.PathLike], steps: Sequence[int] | None) -> list[int]:
    """The checkpoint steps to study: `steps` (checked against local seed directories), or,
    when None, every step saved by all the local seed directories. At least two."""
    local = [Path(m) for m in models if Path(m).exists()]
    if steps is None:
        if len(local) != len(models):
            raise UniversalNeuronsError("hub models have no list of checkpoints here; pass the steps to compare "
                                        "(--steps 0,1000,...)")
        have = [set(list_checkpoints(m)) for m in local]
        common = sorted(set.intersection(*have)) if have else []
        if not common:
            raise UniversalNeuronsError(f"the seed directories share no checkpoint-<step>/ sub-directory "
                                        f"({ {str(m): sorted(h) for m, h in zip(local, have)} }); pass seed "
                                        "directories written by train_family, or hub models with --steps")
        steps = common
    steps = sorted({int(s) for s in steps})
    if len(steps) < 2:
        raise UniversalNeuronsError(f"persistence compares checkpoints and needs at least two steps; got {steps}")
    for m in local:
        have = set(list_checkpoints(m))
        lacking = [s for s in steps if s not in have]
        if lacking:
            raise UniversalNeuronsError(f"{m} has no checkpoint {lacking[0]} (it has {sorted(have) or 'none'}); "
                                        "pass steps every seed has")
    return steps


def _tables_provenance(runs: Mapping[int, Any]) -> dict[str, Any]:
    return {"runs": {str(t): {"out_dir": str(r.out_dir), "token_set": r.token_set.hash,
                              "models": [{k: p.get(k) for k in ("name", "resolved", "checkpoint", "revision")}
                                         for p in r.model_provenance]} for t, r in runs.items()}}


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

    **Arguments**
    - `models`: hub names (with `steps`) or local seed directories holding `checkpoint-<step>/`.
    - `steps`: checkpoint steps; None = every step all local seed directories saved.
    - `text`: what `build_token_set` reads, or a `TokenSet`.
    - `labels`, `config`, `overwrite`: as in `run_pipeline` (`config.threshold` flags universality).

    **Returns** a `PersistenceResult` (also saved).
    """
    steps = resolve_steps(models, steps)
    out = Path(out_dir)
    runs: dict[int, Any] = {}
    ts = text
    for t in steps:
        log.info("checkpoint %d (%d of %d)", t, len(runs) + 1, len(steps))
        runs[t] = run_pipeline(models, ts, out / "checkpoints" / f"step-{t}", checkpoint=t, labels=labels,
                               config=config, overwrite=overwrite)
        ts = runs[t].token_set  # tokenised once: every checkpoint sees the same tokens
    res = persistence_from_tables({t: r.table for t, r in runs.items()},
                                  provenance={"threshold": config.threshold, **_tables_provenance(runs)})
    res.save(out / "persistence", overwrite=True)
    return res


def _config_from_summary(d: dict[str, Any]) -> PipelineConfig:
    d = dict(d)
    return PipelineConfig(tokens=TokenSetConfig.from_dict(d.pop("tokens")), store=StoreConfig.from_dict(d.pop("store")),
                          correlation=CorrelationConfig.from_dict(d.pop("correlation")),
                          **{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(PipelineConfig)}})


def _run_step(prov: dict[str, Any]) -> int | None:
    if prov.get("checkpoint") is not None:
        return int(prov["checkpoint"])
    name = Path(str(prov.get("resolved", ""))).name
    return int(name[len("checkpoint-"):]) if name.startswith("checkpoint-") and name[11:].isdigit() else None


def persistence_stage(seed_dirs: Sequence[str | os.PathLike] | None = None, steps: Sequence[int] | None = None, *,
                      config: PipelineConfig | None = None) -> Callable[[Any], dict[str, Any]]:
    """A `run_pipeline(extra_stages=[...])` stage: persistence over the family's checkpoints.

    The main run is the checkpoint it was run at (the final one when none was named); every
    other step runs into `out_dir/checkpoints/step-<t>/` on the run's token set, and the tables go
    to `out_dir/persistence/`.

    **Arguments**
    - `seed_dirs`: the seed directories (default: the parents of the run's `checkpoint-<step>`
      model directories).
    - `steps`: default every checkpoint all seeds saved (`list_checkpoints`).
    - `config`: pipeline settings of the other checkpoints (default: the main run's).

    **Returns** the stage; it returns `{"persistence": {steps, n_universal, adjacent, files}}`
    with `adjacent = [{t, t2, persistence}]` for consecutive steps.
    """

    def stage(result) -> dict[str, Any]:
        dirs = list(seed_dirs) if seed_dirs is not None else None
        if dirs is None:
            dirs = []
            for p in result.model_provenance:
                r = Path(str(p.get("resolved", "")))
                if p.get("source") != "local" or not r.name.startswith("checkpoint-"):
                    raise UniversalNeuronsError(f"{p.get('name')} is not a local seed directory with checkpoints; pass "
                                                "seed_dirs= (or use run_persistence with hub models and steps)")
                dirs.append(r.parent)
        cfg = config or _config_from_summary(result.summary["config"])
        here = _run_step(result.model_provenance[0])
        out = Path(result.out_dir)
        runs: dict[int, Any] = {}
        for t in resolve_steps(dirs, steps):
            if t == here:
                runs[t] = result
                continue
            runs[t] = run_pipeline(dirs, result.token_set, out / "checkpoints" / f"step-{t}", checkpoint=t,
                                   labels=result.labels, config=cfg)
        res = persistence_from_tables({t: r.table for t, r in runs.items()},
                                      provenance={"threshold": cfg.threshold, **_tables_provenance(runs)})
        res.save(out / "persistence", overwrite=True)
        adjacent = [{"t": a, "t2": b, "persistence": _none_if_nan(res.overall.loc[a, b])}
                    for a, b in zip(res.steps, res.steps[1:])]
        return {"persistence": {"steps": res.steps, "n_universal": res.provenance["n_universal"],
                                "adjacent": adjacent, "files": {k: str(out / "persistence" / f) for k, f in _FILES.items()}}}

    return stage


def _none_if_nan(x) -> float | None:
    return float(x) if np.isfinite(x) else None
