"""The explanations of a run directory: `explain_run` computes and writes them, `explain_stage`
is the same as a `run_pipeline(extra_stages=[...])` stage, and `explain` shows one neuron.

A run directory (`universal_neurons.pipeline`) gives everything: the universality table (which
neurons and their partners), `stores/<label>.h5` (the activations; without stores the models
run live over `tokens.h5`) and, in `summary.json`, the models (for their tokenizer and weights).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from universal_neurons.activations import LoadedModel, TokenSet, load_from_provenance
from universal_neurons.artifacts import read_json, refuse_existing
from universal_neurons.errors import InputError, InputNotFoundError

from .config import ExplainConfig, family_cuts
from .engine import explain_neurons
from .features import vocab_texts
from .result import Explanations
from .selection import NeuronGroup, default_groups, group_of, table_labels
from .source import LiveModelSource, StoreSource
from .storage import EXPLANATIONS_DIR, explanation_data, explanation_paths, load_explanations, save_explanations
from .view import NeuronExplanation

__all__ = ["explain_run", "explain_stage", "explain", "load_models", "summarise"]

log = logging.getLogger(__name__)


def _run_inputs(run_dir: Path) -> tuple[dict[str, Any], Any]:
    from universal_neurons.universality import load_universality_table

    if not (run_dir / "summary.json").exists():
        raise InputNotFoundError(f"{run_dir} has no summary.json; give the output directory of a pipeline run "
                                 "(`universal-neurons run ... -o DIR`)")
    summary = read_json(run_dir / "summary.json", what="run summary")
    table_path = next((p for p in (run_dir / "universality.csv", run_dir / "universality.h5") if p.exists()), None)
    if table_path is None:
        raise InputNotFoundError(f"{run_dir} has no universality.csv; run the pipeline first")
    return summary, load_universality_table(table_path)


def load_models(provenance: Sequence[dict[str, Any]], labels: Sequence[str], *, device: str | None = None,
                process_weights: bool | None = None) -> dict[str, LoadedModel]:
    """The family's models as the run loaded them (label -> `LoadedModel`)."""
    return {lab: load_from_provenance(p, device=device, process_weights=process_weights)
            for lab, p in zip(labels, provenance)}


def explain_run(run_dir: str | os.PathLike, *, config: ExplainConfig = ExplainConfig(),
                neurons: Sequence[tuple[int, int]] | None = None, models: Mapping[str, LoadedModel] | None = None,
                table=None, token_set: TokenSet | None = None, save: bool = True, overwrite: bool = False
                ) -> Explanations:
    """Explain the neurons of a run: top and quantile examples, variance reductions, families, output tokens.

    Args:
        run_dir: a pipeline run directory.
        config: what to compute.
        neurons: reference neurons `(layer, neuron)` to explain (with their partners); default
            every universal neuron and `config.n_contrast` sampled others.
        models: label -> `LoadedModel` of every model (tokenizer and weights); default: loaded
            from the run's summary.
        table: the universality table (default: the run's).
        token_set: the run's token set, for live activations when the run kept no stores
            (default: `tokens.h5`).
        save: write `run_dir/explanations/` (see `storage.py`); False keeps it in memory.
        overwrite: replace earlier explanation files (else they are refused before any work).

    Returns:
        The `Explanations`, with the output side.
    """
    run = Path(run_dir)
    if save:
        refuse_existing(*explanation_paths(run / EXPLANATIONS_DIR).values(), overwrite=overwrite)
    summary, run_table = _run_inputs(run)
    table = run_table if table is None else table
    inputs = summary.get("inputs", {})
    labels = list(inputs.get("labels") or table_labels(table))
    if models is None:
        run_cfg = summary.get("config", {})
        models = load_models(inputs.get("models", []), labels, device=run_cfg.get("device"),
                             process_weights=bool(run_cfg.get("process_weights", True)))
    if neurons is None:
        groups = default_groups(table, labels, config)
    else:
        groups = [group_of(table, layer, neuron, labels=labels) for layer, neuron in neurons]
    ex = _explain(run, labels, models, groups, config, lambda: token_set or TokenSet.load(run / "tokens.h5"))
    if save:
        save_explanations(ex, run / EXPLANATIONS_DIR, overwrite=overwrite)
    return ex


def _explain(run: Path, labels: list[str], models: Mapping[str, LoadedModel], groups: Sequence[NeuronGroup],
             config: ExplainConfig, token_set: Callable[[], TokenSet]) -> Explanations:
    """The run's stores when it kept them (else the models live over its tokens), the reference's
    tokenizer for the vocabulary, every model's weights for the output side."""
    stores = {lab: run / "stores" / f"{lab}.h5" for lab in labels}
    if all(p.exists() for p in stores.values()):
        source: Any = StoreSource(stores)
    else:
        log.info("no activation stores in %s: running the models live over the run's tokens", run)
        source = LiveModelSource({lab: models[lab] for lab in labels}, token_set())
    ref = models[labels[0]]
    texts = vocab_texts(ref.tokenizer, max(ref.d_vocab, len(ref.tokenizer)))
    return explain_neurons(source, groups, texts, config=config).with_output(models)


def summarise(ex: Explanations, out_dir: Path | None = None) -> dict[str, Any]:
    """The headline numbers `summary.json` records for the stage."""
    neurons = ex.neurons()
    refs = neurons[neurons["is_reference"]]
    by_role = {role: {k: int(v) for k, v in g["family"].value_counts().items()} for role, g in refs.groupby("role")}
    return {
        "groups": len(ex.groups), "neurons": len(ex.units), "n_tokens": ex.n_tokens,
        "universal": int((refs["role"] == "universal").sum()), "families_of_reference_neurons": by_role,
        "family_rules": family_cuts(ex.config), "token_set_hash": ex.source.get("token_set_hash"),
        "source": ex.source.get("kind"), "blocks": ex.blocks,
        **({"dir": str(out_dir), "files": {k: str(v) for k, v in explanation_paths(out_dir).items()}}
           if out_dir is not None else {}),
    }


def explain_stage(*, config: ExplainConfig = ExplainConfig(), overwrite: bool = True
                  ) -> Callable[[Any], dict[str, Any]]:
    """A `run_pipeline(extra_stages=[...])` stage writing `out_dir/explanations/`.

    Args:
        config: what to compute.
        overwrite: replace the files of an earlier run (else they are refused before any work).

    Returns:
        The stage: `result -> {"explanations": {groups, neurons, n_tokens, universal,
        families_of_reference_neurons, family_rules, token_set_hash, source, blocks, dir, files,
        seconds}}`.
    """

    def stage(result) -> dict[str, Any]:
        start = time.perf_counter()
        out = Path(result.out_dir)
        refuse_existing(*explanation_paths(out / EXPLANATIONS_DIR).values(), overwrite=overwrite)
        run_cfg = result.summary.get("config", {})
        models = load_models(result.model_provenance, result.labels, device=run_cfg.get("device"),
                             process_weights=bool(run_cfg.get("process_weights", True)))
        labels = list(result.labels)
        ex = _explain(out, labels, models, default_groups(result.table, labels, config), config,
                      lambda: result.token_set)
        save_explanations(ex, out / EXPLANATIONS_DIR, overwrite=overwrite)
        return {"explanations": {**summarise(ex, out / EXPLANATIONS_DIR), "seconds": time.perf_counter() - start}}

    return stage


def _find_group(data, label: str, layer: int, neuron: int) -> int | None:
    want = f"{label}:{layer}.{neuron}"
    groups = data.provenance.get("groups", [])
    # a reference neuron's own group first, then any group the neuron is a partner in
    for g, info in enumerate(groups):
        if info["members"] and info["members"][0] == want:
            return g
    return next((g for g, info in enumerate(groups) if want in info["members"]), None)


def explain(run_dir: str | os.PathLike, layer, neuron: int | None = None, *, label: str | None = None,
            config: ExplainConfig | None = None, n_contexts: int | None = None) -> NeuronExplanation:
    """One neuron of a run, explained beside its partners in the other seeds.

    Read from `run_dir/explanations/` when the neuron was explained there; otherwise a
    reference neuron is computed now from the run's stores (nothing is written).

    Args:
        run_dir: a pipeline run directory.
        layer: the layer, or a universality-table row (anything with `layer` and `neuron`).
        neuron: the neuron (omit when `layer` is a row).
        label: the model (default the reference).
        config: settings for a neuron computed now (default `ExplainConfig()`).
        n_contexts: top contexts shown (default all stored).

    Returns:
        A `NeuronExplanation` (`print()` it, or show it in a notebook).

    Raises:
        InputError: the neuron is neither explained in the run nor a reference neuron.
    """
    if neuron is None:
        row = layer
        try:
            layer, neuron = int(row["layer"]), int(row["neuron"])
        except (TypeError, KeyError, IndexError):
            layer, neuron = int(row.layer), int(row.neuron)
    run = Path(run_dir)
    saved = run / EXPLANATIONS_DIR
    if explanation_paths(saved)["arrays"].exists():
        data = load_explanations(saved)
        g = _find_group(data, label or data.labels[0], int(layer), int(neuron))
        if g is not None:
            return NeuronExplanation(data, g, n_contexts=n_contexts)
    summary, _ = _run_inputs(run)
    labels = summary.get("inputs", {}).get("labels") or []
    if label is not None and labels and label != labels[0]:
        raise InputError(f"{label}:{layer}.{neuron} is not among the explained neurons of {run}; explain the reference "
                         f"neuron it partners ({labels[0]}:L.N) instead, or compute more neurons with "
                         "`universal-neurons explain RUN --all`")
    ex = explain_run(run, config=config or ExplainConfig(), neurons=[(int(layer), int(neuron))], save=False)
    return NeuronExplanation(explanation_data(ex), 0, n_contexts=n_contexts)
