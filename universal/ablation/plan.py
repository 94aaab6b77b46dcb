"""The ablation plan: every set to ablate, with its means and settings, drawn once; evaluated on
token rows (all of them in process, a row shard per cluster task); turned into a result.

    plan = AblationPlan.build(lm, table, token_set, config)      # sets, controls, means, checks
    sums = plan.evaluate(lm, token_set)                          # per-row sums [set, row]
    result = plan.result(sums)                                   # runs, summary, bootstrap
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import pandas as pd

from universal_neurons.activations import ActivationStore, LoadedModel, TokenSet
from universal_neurons.artifacts import check_writable
from universal_neurons.errors import InputError
from universal_neurons.runtime import provenance_base, to_json

from .bootstrap import bootstrap_replicates, interval, summarise
from .config import AblationConfig
from .evaluate import (
    RowSums,
    Sink,
    auto_batch_rows,
    check_counted,
    check_tokens,
    counted_predictions,
    evaluate,
    hooks_for,
)
from .heldout import study_hash as table_study_hash
from .heldout import token_relation
from .means import check_means, study_means
from .neurons import Neurons, control_sets, count, neuron_set, split_table
from .output import RUN_COLUMNS, AblationMetrics, AblationResult, FileSink, MemorySink

__all__ = ["AblationPlan", "SetInfo", "ablation_study", "ablate"]

log = logging.getLogger(__name__)


class SetInfo(NamedTuple):
    """What one ablated set of a plan is: its group, the group's layer (-1 = all), its role, its draw."""

    group: str  # "all layers" | "layer l"
    layer: int
    role: str  # "universal" | "control"
    draw: int  # control index, -1 for the universal set


@dataclass(frozen=True)
class AblationPlan:
    """Every set an ablation evaluates, and everything needed to evaluate it anywhere.

    Built once (on the driver of a cluster run); small and picklable, so a cluster task can
    carry it and evaluate it on its own rows with its own copy of the model.

    Attributes:
        config: the study's settings.
        labels: one per set, e.g. "layer 0/control 2".
        sets: the neurons of every set, `{layer: Int[ndarray, "k"]}`, in `runs` order: per group
            the universal set, then its controls.
        info: per set, its `SetInfo`.
        means: `Float[ndarray, "layer d_mlp"]` for kind='mean', else None.
        batch_rows: rows per forward pass.
        provenance: model, token set, config, seeds and means source of the result.
    """

    config: AblationConfig
    labels: tuple[str, ...]
    sets: tuple[Neurons, ...]
    info: tuple[SetInfo, ...]
    means: np.ndarray | None
    batch_rows: int
    provenance: dict[str, Any]

    @classmethod
    def build(cls, lm: LoadedModel, table_or_neurons, token_set: TokenSet,
              config: AblationConfig = AblationConfig(), *, means: np.ndarray | None = None,
              store: ActivationStore | str | os.PathLike | None = None,
              study_hash: str | None = None) -> AblationPlan:
        """The plan of a study: the universal set (all layers, then each layer alone with
        `config.per_layer`), each followed by `config.n_controls` seeded controls.

        Args:
            lm: the reference model.
            table_or_neurons: a universality table (the set = `is_universal`; universal and, by
                default, dead neurons never enter controls; it must cover every neuron of `lm`), or a
                list of `(layer, neuron)` / `{layer: [neurons]}` / a table without `is_universal`
                (every row is in the set).
            token_set: the held-out tokens the plan is evaluated on (checked against `lm` here).
            config: the study's settings.
            means: `Float[ndarray, "layer d_mlp"]` for kind='mean'.
            store: activation store of `lm` on `token_set` to read the means from; with neither,
                they are streamed over `token_set`.
            study_hash: hash of the token set that chose the neurons; None reads it from the
                table's provenance. Recorded with how `token_set` relates to it (`heldout.py`).

        Returns:
            The plan.

        Raises:
            InputError, IncompatibleInputsError, ConfigError: tokens, neurons or means the study
                cannot use (each message names the fix).
        """
        check_tokens(lm, token_set)
        labels, sets, info = _study_sets(lm, table_or_neurons, config)
        return cls._finish(lm, token_set, config, labels, sets, info, means=means, store=store,
                           study=study_hash or table_study_hash(table_or_neurons))

    @classmethod
    def for_set(cls, lm: LoadedModel, neurons, token_set: TokenSet, config: AblationConfig = AblationConfig(), *,
                means: np.ndarray | None = None, store: ActivationStore | str | os.PathLike | None = None,
                study_hash: str | None = None) -> AblationPlan:
        """The plan of one set of neurons, without controls (what `ablate` evaluates).

        Args: as for `build`; `neurons` in any form `neuron_set` takes (it may be empty).
        """
        check_tokens(lm, token_set)
        s = neuron_set(neurons, lm)
        return cls._finish(lm, token_set, config, ["set"], [s], [SetInfo("set", -1, "universal", -1)], means=means,
                           store=store, study=study_hash or table_study_hash(neurons))

    @classmethod
    def _finish(cls, lm, token_set, config, labels, sets, info, *, means, store, study) -> AblationPlan:
        batch_rows = auto_batch_rows(lm, token_set, config.batch_rows)
        mv, means_source = study_means(lm, token_set, config, means=means, store=store, batch_rows=batch_rows)
        for s in sets:
            check_means(mv, s)
        check_counted(counted_predictions(token_set.mask))
        return cls(config, tuple(labels), tuple(sets), tuple(info), mv, batch_rows,
                   _provenance(lm, token_set, config, means_source, study))

    def evaluate(self, lm: LoadedModel, rows: TokenSet, *, sink: Sink | None = None,
                 progress_bar: bool | None = None) -> RowSums:
        """Ablate every set of the plan on `rows`: what one cluster task maps over its shard.

        Args:
            lm: the model the plan was built for (any copy of it, on any device).
            rows: the token set the plan was built on, or consecutive rows of it
                (`token_set.select_rows(r0, r1)`); a shard may count no prediction at all.
            sink: receives per-token values (`MemorySink`, `FileSink`) when given.
            progress_bar: None follows the global switch.

        Returns:
            `RowSums` of `rows` (`[row]`, `[set, row]`). A set that occurs more than once (a
            one-layer group repeats the all-layers group when one layer holds the whole set)
            is run once and its sums repeated.
        """
        at = self.unique_sets() if sink is None else np.arange(len(self.sets))  # a sink takes every set's tokens
        run = np.unique(at)
        hooks = [hooks_for(self.sets[i], self.config.kind, self.config.value, self.means, lm.device) for i in run]
        sums = evaluate(lm, rows, hooks, batch_rows=self.batch_rows, positions=self.config.positions, sink=sink,
                        desc="ablation study", progress_bar=progress_bar, require_counted=False)
        if len(run) == len(self.sets):
            return sums
        k = np.searchsorted(run, at)  # set -> its row among the evaluated sets
        return RowSums(n=sums.n, ce_clean=sums.ce_clean, entropy_clean=sums.entropy_clean,
                       ce_ablated=sums.ce_ablated[k], kl=sums.kl[k], entropy_ablated=sums.entropy_ablated[k])

    def unique_sets(self) -> np.ndarray:
        """`Int[ndarray, "set"]`: for every set, the first set of the plan with the same neurons."""
        first: dict[tuple, int] = {}
        return np.array([first.setdefault(tuple((layer, v.tobytes()) for layer, v in s.items()), i)
                         for i, s in enumerate(self.sets)], dtype=np.int64)

    def result(self, sums: RowSums | Sequence[RowSums], **provenance: Any) -> AblationResult:
        """Runs, summary (bootstrap over rows) and the saved row sums.

        Args:
            sums: the plan's evaluation on all rows, or on consecutive row shards in row order.
            **provenance: added to the plan's provenance (e.g. `distributed={...}`).

        Returns:
            The `AblationResult`.
        """
        if not isinstance(sums, RowSums):
            sums = RowSums.concat(list(sums))
        runs = pd.DataFrame([{"group": i.group, "layer": i.layer, "set": i.role, "draw": i.draw, "n_neurons": count(s),
                              **sums.point(k)} for k, (i, s) in enumerate(zip(self.info, self.sets))],
                            columns=RUN_COLUMNS)
        runs["delta_ce_per_neuron"] = runs["delta_ce"] / runs["n_neurons"].where(runs["n_neurons"] > 0)
        summary = summarise(runs, sums, self.config)
        sets = [{int(layer): [int(n) for n in v] for layer, v in s.items()} for s in self.sets]
        return AblationResult(runs=runs, summary=summary, sets=sets, row_sums=sums.arrays(),
                              provenance={**self.provenance, **provenance})

    def describe(self, n_rows: int) -> str:
        """One line for the log: how many sets over how many rows."""
        return (f"ablating {len(self.sets)} sets ({len(self.sets) // (1 + self.config.n_controls)} groups x "
                f"(1 + {self.config.n_controls} controls); {len(np.unique(self.unique_sets()))} distinct) over "
                f"{n_rows} rows at {self.config.positions} positions")


def _study_sets(lm: LoadedModel, table_or_neurons,
                config: AblationConfig) -> tuple[list[str], list[Neurons], list[SetInfo]]:
    """Every set of the study, in `runs` order: per group the universal set, then its seeded controls."""
    universal, pool = split_table(table_or_neurons, lm, config.controls_exclude_dead)
    if not universal:
        raise InputError("the neuron set is empty (no neuron is flagged universal); nothing to ablate. "
                         "Lower the universality threshold or pass your own list of (layer, neuron)")
    groups: list[tuple[str, int, Neurons]] = [("all layers", -1, universal)]
    if config.per_layer:  # also when one layer holds them all: tables then look alike across models
        groups += [(f"layer {layer}", layer, {layer: idx}) for layer, idx in universal.items()]
    labels, sets, info = [], [], []
    for name, layer, s in groups:
        labels.append(f"{name}/universal")
        sets.append(s)
        info.append(SetInfo(name, layer, "universal", -1))
        for k, c in enumerate(control_sets(s, pool, d_mlp=lm.d_mlp, n_controls=config.n_controls, seed=config.seed)):
            labels.append(f"{name}/control {k}")
            sets.append(c)
            info.append(SetInfo(name, layer, "control", k))
    return labels, sets, info


def _provenance(lm: LoadedModel, ts: TokenSet, config: AblationConfig, means_source: str | None,
                study: str | None) -> dict[str, Any]:
    relation = token_relation(ts, study)
    warning = relation.pop("warning")
    return {**provenance_base("ablation"), "model": lm.provenance, "checkpoint": lm.provenance.get("checkpoint"),
            "token_set": {"hash": ts.hash, "n_rows": ts.n_rows, "ctx_len": ts.ctx_len, "config": ts.config.to_dict(),
                          "source": ts.source, **relation},
            "config": config.to_dict(), "kind": config.kind,
            "positions": config.positions,
            "written_at": ("positions where the token set's mask is True" if config.positions == "counted"
                           else "every position, masked ones (BOS, EOS, newlines) included"),
            "seeds": {"controls": config.seed, "bootstrap": config.seed},
            "means": means_source, "hook": "blocks.{layer}.mlp.hook_post",
            "counted": "prediction at pos (of token pos+1) counted iff mask[pos] and mask[pos+1]",
            "bootstrap_unit": "token row (and control draw for control means and the paired difference)",
            "p_value": "(1 + #controls with delta_ce >= universal) / (1 + n_controls), one-sided",
            "warnings": [warning] if warning else []}


def ablation_study(lm: LoadedModel, table_or_neurons, token_set: TokenSet,
                   config: AblationConfig = AblationConfig(), *,
                   store: ActivationStore | str | os.PathLike | None = None, means: np.ndarray | None = None,
                   study_hash: str | None = None, per_token_path: str | os.PathLike | None = None,
                   overwrite: bool = False, progress_bar: bool | None = None) -> AblationResult:
    """Ablate the universal set (all layers, then each layer alone) against matched random controls.

    Build the plan, evaluate it on every row of `token_set`, turn the sums into the result.

    Args:
        lm: the reference model.
        table_or_neurons: a universality table or a list of neurons (see `AblationPlan.build`).
        token_set: held-out tokens (see the package docstring for what is counted).
        config: the study's settings.
        store: activation store of `lm` on `token_set`, to read means from (kind='mean').
        means: `Float[ndarray, "layer d_mlp"]` given directly (e.g. from another token set);
            neither: streamed over `token_set`.
        study_hash: hash of the token set that chose the neurons (default: from the table's
            provenance); the result records whether `token_set` is held out from it.
        per_token_path: also write per-token values of every set to this HDF5 file.
        overwrite: replace an existing `per_token_path`.
        progress_bar: None follows the global switch.

    Returns:
        The `AblationResult`.

    Raises:
        OutputExistsError: `per_token_path` exists and not `overwrite` (before any work).
    """
    if per_token_path is not None:
        check_writable(per_token_path, overwrite=overwrite)
    plan = AblationPlan.build(lm, table_or_neurons, token_set, config, means=means, store=store,
                              study_hash=study_hash)
    log.info("%s", plan.describe(token_set.n_rows))
    if per_token_path is None:
        sums = plan.evaluate(lm, token_set, progress_bar=progress_bar)
    else:
        with FileSink(per_token_path, len(plan.sets), token_set, list(plan.labels),
                      {"provenance": to_json(plan.provenance)}, overwrite, plan.batch_rows) as sink:
            sums = plan.evaluate(lm, token_set, sink=sink, progress_bar=progress_bar)
    return plan.result(sums)


def ablate(lm: LoadedModel, neurons, token_set: TokenSet, config: AblationConfig = AblationConfig(), *,
           means: np.ndarray | None = None, store: ActivationStore | str | os.PathLike | None = None,
           per_token: bool = False, per_token_path: str | os.PathLike | None = None, overwrite: bool = False,
           progress_bar: bool | None = None) -> AblationMetrics:
    """Ablate one set of neurons at `hook_post` and measure the change of next-token predictions.

    Args:
        lm: the model; hooks are scoped to each forward pass, so the model is unchanged afterwards.
        neurons: `(layer, neuron)` pairs, `{layer: [neurons]}` or a table with `layer, neuron` columns.
        token_set: held-out tokens; counted predictions follow the package docstring.
        config: kind / value / positions / bootstrap settings (controls are `ablation_study`'s business).
        means: `Float[ndarray, "layer d_mlp"]` for kind='mean'; else read from `store` (of this token
            set) or streamed over `token_set`.
        store: activation store of `lm` on `token_set` to read the means from.
        per_token: also return per-token values (small token sets).
        per_token_path: write per-token values to this HDF5 file instead.
        overwrite: replace an existing `per_token_path`.
        progress_bar: None follows the global switch.

    Returns:
        `AblationMetrics`.
    """
    if per_token_path is not None:
        check_writable(per_token_path, overwrite=overwrite)
    plan = AblationPlan.for_set(lm, neurons, token_set, config, means=means, store=store)
    pt = None
    if per_token_path is not None:
        with FileSink(per_token_path, 1, token_set, ["set"], {"provenance": to_json(plan.provenance)}, overwrite,
                      plan.batch_rows) as sink:
            sums = plan.evaluate(lm, token_set, progress_bar=progress_bar, sink=sink)
    else:
        memory = MemorySink(1, token_set) if per_token else None
        sums = plan.evaluate(lm, token_set, progress_bar=progress_bar, sink=memory)
        if memory is not None:
            pt = {k: (v[0] if v.ndim == 3 else v) for k, v in memory.arrays.items()}
    boot = bootstrap_replicates(sums, config)
    dce_lo, dce_hi = interval(boot["delta_ce"][:, 0], config.ci)
    kl_lo, kl_hi = interval(boot["kl"][:, 0], config.ci)
    point, n = sums.point(0), count(plan.sets[0])
    return AblationMetrics(n_neurons=n, **point, delta_ce_lo=dce_lo, delta_ce_hi=dce_hi, kl_lo=kl_lo, kl_hi=kl_hi,
                           delta_ce_per_neuron=point["delta_ce"] / n if n else float("nan"), row_sums=sums.arrays(0),
                           per_token=pt, provenance=plan.provenance)
