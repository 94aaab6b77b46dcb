"""The whole pipeline for a seed family, one stage after the other, each output on disk:

    out_dir/tokens.h5             the token set every model sees (ids, mask, hash)
    out_dir/tokens_held_out.h5    rows of the same text kept out of the study, for the ablation
    out_dir/stores/<label>.h5     activations of each model (skipped with cache=False)
    out_dir/correlation.h5        max-correlation, partners and baselines per pair (a, m)
    out_dir/universality.csv/.h5  the universality table
    out_dir/summary.json          headline numbers, the provenance of every input, and what defines the run

A directory holds one run. One that holds a run of other models, text, checkpoint, labels or
settings (its summary.json says) is refused before any work unless `overwrite=True`, which
replaces the earlier run as a whole (`run_directory.py`). In a directory of the same run, a
stage whose output already exists is reused when it was made from the same inputs, and refused
(never silently overwritten) when it was not.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from universal_neurons.activations import (
    ActivationStore,
    LiveSource,
    StoreConfig,
    TokenSet,
    TokenSetConfig,
    build_token_set,
    cache_activations,
    check_available,
    iter_aligned,
    load_model,
)
from universal_neurons.activations.build import build_study_and_held_out
from universal_neurons.artifacts import check_not_input, check_writable, reuse_or_refuse, write_json
from universal_neurons.config import Config
from universal_neurons.errors import ConfigError, IncompatibleInputsError
from universal_neurons.runtime import provenance_base

from .correlation import (
    CorrelationConfig,
    CorrelationResult,
    ModelLayout,
    correlate,
    correlate_all_pairs,
    preflight,
    preflight_all_pairs,
)
from .distributed import (
    cache_distributed,
    correlate_all_pairs_distributed,
    correlate_distributed,
    live_shards,
    using_cluster,
)
from .run_directory import check_same_run, replacing_run, run_identity
from .training import seed_label
from .universality import check_threshold, save_universality_table, universality_table

__all__ = ["PipelineConfig", "PipelineResult", "run_pipeline", "family_summary", "correlate_stores", "correlate_source",
           "check_distinct_models"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig(Config):
    """Every setting of a pipeline run; stored in summary.json."""

    tokens: TokenSetConfig = field(default_factory=TokenSetConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    correlation: CorrelationConfig = field(default_factory=CorrelationConfig)
    threshold: float = 0.5  # is_universal = excess_corr > threshold (the paper's cut)
    cache: bool = True  # False: correlate straight from live models, nothing cached on disk
    batch_rows: int = 32  # rows per forward pass / per correlation batch
    process_weights: bool = True  # the paper's weight processing (fold LN, centre weights)
    device: str | None = None  # None = CUDA when present
    cluster: str | None = None  # Dask cluster: "local:N", "tcp://host:port" (docs/distributed.md); None = in-process
    held_out_share: float = 0.1  # share of the text's rows kept out of the study: the ablation's held-out tokens
    # (0 = none; the ablation is then measured on the studied tokens unless given others)
    held_out_tokens: int | None = 16_384  # at most this many held-out tokens (whole rows); None = the whole share

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        if isinstance(self.batch_rows, bool) or not isinstance(self.batch_rows, int) or self.batch_rows < 1:
            self.fail(f"batch_rows must be a positive integer, got {self.batch_rows!r}; fix --batch-rows")
        if isinstance(self.held_out_share, bool) or not 0.0 <= float(self.held_out_share) < 1.0:
            self.fail(f"held_out_share must be in [0, 1), e.g. 0.1, got {self.held_out_share!r}")
        if self.held_out_tokens is not None and (isinstance(self.held_out_tokens, bool)
                                                 or not isinstance(self.held_out_tokens, int)
                                                 or self.held_out_tokens < self.tokens.ctx_len):
            self.fail(f"held_out_tokens must be None or an integer >= one row (ctx_len={self.tokens.ctx_len}), got "
                      f"{self.held_out_tokens!r}")


@dataclass
class PipelineResult:
    """What `run_pipeline` made; `held_out` = the rows kept out of the study (None when none were);
    `client` = the run's Dask client while its later stages run (`PipelineConfig.cluster`), so they
    run on the same cluster; None in process, and once `run_pipeline` has returned."""

    out_dir: Path
    labels: list[str]
    token_set: TokenSet
    correlation: CorrelationResult
    table: pd.DataFrame
    summary: dict[str, Any]
    model_provenance: list[dict[str, Any]]
    held_out: TokenSet | None = None
    client: Any = field(default=None, repr=False)


def _saved(ts: TokenSet, path: Path, overwrite: bool, what: str) -> TokenSet:
    if reuse_or_refuse(path, overwrite=overwrite, matches=lambda p: TokenSet.load(p).hash == ts.hash, what=what):
        return TokenSet.load(path)
    ts.save(path, overwrite=overwrite)
    return ts


def _token_sets(text, tokenizer, config: PipelineConfig, out: Path,
                overwrite: bool) -> tuple[TokenSet, TokenSet | None]:
    """The studied token set and, from text with `held_out_share > 0`, the held-out one
    (`build_study_and_held_out`: disjoint rows of the same text); a given `TokenSet` is studied whole."""
    if isinstance(text, TokenSet):
        return _saved(text, out / "tokens.h5", overwrite, "token set"), None
    if not config.held_out_share:
        return _saved(build_token_set(text, tokenizer, config.tokens), out / "tokens.h5", overwrite, "token set"), None
    study, held = build_study_and_held_out(text, tokenizer, config.tokens, share=config.held_out_share,
                                           max_tokens=config.held_out_tokens)
    return (_saved(study, out / "tokens.h5", overwrite, "token set"),
            _saved(held, out / "tokens_held_out.h5", overwrite, "held-out token set"))


def family_summary(table: pd.DataFrame, result: CorrelationResult, threshold: float) -> dict[str, Any]:
    """Headline numbers of a universality table: fractions, per-layer means and quantiles."""
    per_layer = []
    for layer, g in table.groupby("layer"):
        e = g["excess_corr"].dropna()
        per_layer.append({
            "layer": int(layer),
            "neurons": int(len(g)),
            "universal": int(g["is_universal"].sum()),
            "universal_fraction": float(g["is_universal"].mean()),
            "mean_max_corr": float(g["mean_corr"].mean()),
            "mean_baseline": float(g["mean_baseline"].mean()),
            "excess_quantiles": {q: float(e.quantile(float(q))) for q in ("0.5", "0.9", "0.99")} if len(e) else {},
            "dead": int(g["dead"].sum()) if "dead" in g else 0,
        })
    return {
        "threshold": threshold,
        "neurons": int(len(table)),
        "universal": int(table["is_universal"].sum()),
        "universal_fraction": float(table["is_universal"].mean()),
        "n_tokens": int(result.n_tokens),
        "dead": {k: int(v.sum()) for k, v in result.dead.items()},
        "per_layer": per_layer,
    }


def run_pipeline(
    models: Sequence[str | os.PathLike],
    text,
    out_dir: str | os.PathLike,
    *,
    checkpoint: int | None = None,
    labels: Sequence[str] | None = None,
    config: PipelineConfig = PipelineConfig(),
    overwrite: bool = False,
    extra_stages: Sequence[Callable[["PipelineResult"], dict[str, Any]]] = (),
) -> PipelineResult:
    """Tokenise, cache, correlate and flag a seed family; the first model is the reference.

    Args:
        models: hub names or local directories of one family (same tokenizer and shapes).
        text: what `build_token_set` reads (files, folder, list of strings), or a `TokenSet`.
            From text, `config.held_out_share` of the rows (at most `config.held_out_tokens`
            tokens) are held out of the study (`result.held_out`, `tokens_held_out.h5`) for the
            ablation stage; a `TokenSet` is studied whole.
        out_dir: where every output goes (see the module docstring).
        checkpoint: training step loaded for every model (None = final weights).
        labels: short names per model (default `a, b, c, ...`).
        extra_stages: later stages (properties, ablation, ...) called with the result; what
            each returns is added to the summary. With `config.cluster` they find the run's
            client in `result.client` (the properties, ablation and agreement stages use it).
        overwrite: replace an earlier run in `out_dir` as a whole: its outputs are moved aside,
            deleted once this run has finished (also those of stages this run skips), and put
            back if it fails.

    Returns:
        a `PipelineResult`.

    Raises:
        OutputExistsError: `out_dir` holds a run of other models, text, checkpoint, labels or
            settings and not `overwrite` (before any work; the message names what differs).
        InputError: the text leaves no row to study or none to hold out (before any activation
            is cached).
        UniversalNeuronsError: a model or checkpoint that cannot be loaded here (every model is
            checked with `check_available` before the first is loaded).
    """
    if len(models) < 2:
        raise ConfigError(f"a seed family needs at least two models, got {len(models)}")
    labels = list(labels) if labels else [seed_label(k) for k in range(len(models))]
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise ConfigError(f"labels {labels} must be unique, one per model ({len(models)})")
    for m in models:  # every model before loading the first: a missing last one is found in seconds, not hours
        check_available(m, checkpoint)
    out = Path(out_dir)
    identity = run_identity(models, text, checkpoint=checkpoint, labels=labels, config=config)
    check_same_run(out, identity, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    lms = [load_model(m, checkpoint=checkpoint, device=config.device, process_weights=config.process_weights)
           for m in models]
    shapes = {(lm.n_layers, lm.d_mlp) for lm in lms}
    if len(shapes) > 1:
        raise IncompatibleInputsError(f"the models have different shapes (n_layers, d_mlp): {sorted(shapes)}; "
                                    "a seed family shares one architecture")
    with replacing_run(out, overwrite=overwrite):
        return _run(models, lms, labels, text, out, checkpoint, config, overwrite, extra_stages, identity)


def _run(models, lms, labels, text, out: Path, checkpoint, config: PipelineConfig, overwrite: bool, extra_stages,
         identity: dict[str, Any]) -> PipelineResult:
    """Every stage, from the token sets on, into a directory this run may write."""
    ts, held = _token_sets(text, lms[0].tokenizer, config, out, overwrite)
    log.info("token set: %d rows x %d = %d tokens (%d counted), hash %s", ts.n_rows, ts.ctx_len, ts.n_tokens,
             ts.n_counted, ts.hash[:12])
    if held is not None:
        log.info("held-out token set (for the ablation): %d rows, hash %s", held.n_rows, held.hash[:12])

    with using_cluster(config.cluster) as client:  # open until the later stages are done: they run on it too
        result = _correlate_stage(models, lms, labels, ts, out, checkpoint, config, overwrite, client)
        return _finish(result, lms, labels, ts, out, config, extra_stages, held, identity, client)


def _model_identity(prov: dict[str, Any]) -> list[Any]:
    """What must agree for an earlier result of a model to be reused."""
    return [prov.get("resolved"), prov.get("checkpoint"), prov.get("revision"), prov.get("weight_processing")]


def _cached_store(path: Path, lm, ts: TokenSet, config: PipelineConfig, overwrite: bool) -> bool:
    """Whether the store at `path` can be reused for `lm` on `ts` (else it is written again)."""
    if overwrite or not path.exists():
        return False
    with ActivationStore.open(path) as s:
        return (s.token_set_hash == ts.hash and s.model.get("resolved") == lm.provenance["resolved"]
                and s.model.get("checkpoint") == lm.provenance["checkpoint"] and s.config == config.store)


def _correlate_stage(models, lms, labels, ts: TokenSet, out: Path, checkpoint, config: PipelineConfig, overwrite: bool,
                     client) -> CorrelationResult:
    prov = {
        "models": [lm.provenance for lm in lms],
        "labels": labels,
        "token_set": {"hash": ts.hash, "config": ts.config.to_dict(), "tokenizer": ts.tokenizer_info,
                      "source": ts.source},
        "mask_policy": {k: v for k, v in ts.config.to_dict().items() if k.startswith("exclude") or k == "newline_ids"},
    }
    corr_path = out / "correlation.h5"

    def same_inputs(path: Path) -> bool:
        old = CorrelationResult.load(path)
        return (old.provenance.get("token_set", {}).get("hash") == ts.hash
                and [_model_identity(m) for m in old.provenance.get("models", [])]
                == [_model_identity(lm.provenance) for lm in lms]
                and old.config == config.correlation)

    if reuse_or_refuse(corr_path, overwrite=overwrite, matches=same_inputs, what="correlation result"):
        log.info("reusing %s", corr_path)
        return CorrelationResult.load(corr_path)
    if not config.cache:
        source: Any
        if client is not None:
            source = live_shards(list(models), ts, config.batch_rows, checkpoint=checkpoint,
                                 process_weights=config.process_weights)
        else:
            source = LiveSource(lms, ts, batch_rows=config.batch_rows, device=config.device)
        layouts = [ModelLayout(lab, lm.n_layers, lm.d_mlp) for lab, lm in zip(labels, lms)]
        return correlate_source(source, layouts, corr_path, config=config.correlation, provenance=prov,
                                cluster=client, overwrite=True)
    stores = []
    for lab, lm, spec in zip(labels, lms, models):
        path = out / "stores" / f"{lab}.h5"
        if _cached_store(path, lm, ts, config, overwrite):
            log.info("reusing %s", path)
        elif client is not None:
            cache_distributed(spec, ts, path, cluster=client, config=config.store, checkpoint=checkpoint,
                              process_weights=config.process_weights, batch_rows=config.batch_rows,
                              overwrite=overwrite)
        else:
            cache_activations(lm, ts, path, config=config.store, batch_rows=config.batch_rows, overwrite=overwrite)
        stores.append(path)
    result = correlate_stores(stores, corr_path, labels=labels, config=config.correlation,
                              batch_tokens=config.batch_rows * ts.ctx_len, cluster=client, provenance=prov,
                              device=config.device, overwrite=True)
    assert isinstance(result, CorrelationResult)
    return result


def correlate_source(source, layouts: Sequence[ModelLayout], out: str | os.PathLike, *,
                     config: CorrelationConfig = CorrelationConfig(), provenance: dict[str, Any] | None = None,
                     cluster=None, full_matrix_path: str | os.PathLike | None = None,
                     overwrite: bool = False, say: Callable[[str], Any] = log.info) -> CorrelationResult:
    """Correlate one aligned batch source (reference first) and save the result to `out`.

    The outputs are checked (writable, not existing unless `overwrite`) before any work, the
    plan (FLOPs, memory, blocks) is logged, and the pass runs in process or, with `cluster`,
    on Dask (`universal_neurons.distributed`).

    Args:
        source: batches `[token, layer*d_mlp]` per model, e.g. `iter_aligned(stores, ...)`,
            a `LiveSource`, or a `ShardedSource` for a cluster.
        layouts: one `ModelLayout` per model, reference first.
        out: the correlation result file (`.h5`).
        config: the engine's settings.
        provenance: models, token set, mask policy; stored with the result.
        cluster: a Dask client or cluster spec (`local:N`, `tcp://host:port`); None runs here.
        full_matrix_path: also write the full matrices `[neuron_a, neuron_m]` here.
        overwrite: replace existing outputs.
        say: where the plan and progress lines go (the CLI prints them).

    Returns:
        The saved `CorrelationResult`.
    """
    for path in (out, full_matrix_path):
        if path is not None:
            check_writable(path, overwrite=overwrite)
    n_tokens = getattr(source, "n_tokens", None)
    if n_tokens:
        say(f"preflight: {preflight(layouts, n_tokens, config)['summary']}")
    if cluster is not None:
        result = correlate_distributed(source, layouts, config, cluster=cluster, provenance=provenance,
                                       full_matrix_path=full_matrix_path, overwrite=overwrite)
    else:
        result = correlate(source, layouts, config, provenance=provenance, full_matrix_path=full_matrix_path,
                           overwrite=overwrite)
    if hasattr(source, "close"):
        source.close()
    result.save(out, overwrite=overwrite)
    return result


def check_distinct_models(stores: Sequence[str | os.PathLike], models: Sequence[dict[str, Any]], *,
                          allow_same_model: bool = False) -> None:
    """Refuse a store given twice (under any name) and, unless `allow_same_model`, two stores
    of the same model and checkpoint: a model correlated with itself makes every neuron look
    universal.

    Raises:
        IncompatibleInputsError: naming the two stores and the fix.
    """
    for i in range(len(stores)):
        for j in range(i):
            a, b = Path(stores[j]), Path(stores[i])
            if a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b)):
                raise IncompatibleInputsError(f"{b} is given twice (also as {a}); list each model's store once")
            if not allow_same_model and _model_identity(models[i]) == _model_identity(models[j]):
                raise IncompatibleInputsError(
                    f"{a} and {b} hold the same model ({models[i].get('name')} at checkpoint "
                    f"{models[i].get('checkpoint')}): correlating a model with itself makes every neuron look "
                    "universal. Cache a different seed, or pass --allow-same-model (allow_same_model=True) if "
                    "this is what you want")


def all_pairs_paths(out: str | os.PathLike, labels: Sequence[str]) -> list[Path]:
    """Where `correlate_stores(all_pairs=True)` writes each reference's result: `<out>-ref-<label>.h5`."""
    out = Path(out)
    return [out.with_name(f"{out.stem}-ref-{lab}{out.suffix}") for lab in labels]


def correlate_stores(stores: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                     labels: Sequence[str] | None = None, config: CorrelationConfig = CorrelationConfig(),
                     batch_tokens: int = 8192, cluster=None, all_pairs: bool = False,
                     full_matrix_path: str | os.PathLike | None = None, provenance: dict[str, Any] | None = None,
                     device: str | None = None, overwrite: bool = False, allow_same_model: bool = False,
                     say: Callable[[str], Any] = log.info) -> CorrelationResult | dict[str, CorrelationResult]:
    """Correlate activation stores of one token set (the first is the reference) and save.

    What `universal-neurons correlate` and the pipeline's correlation stage both run.

    Args:
        stores: activation stores (`cache_activations`) of the same token set.
        out: result file; with `all_pairs`, each reference `r` goes to `<out>-ref-<r>.h5`.
        labels: short names per store (default `a, b, c, ...`).
        config: the engine's settings.
        batch_tokens: tokens per streamed batch.
        cluster: a Dask client or spec; None runs here. With `all_pairs`, one distributed
            correlate per reference (`correlate_all_pairs_distributed`).
        all_pairs: every model as the reference in turn (beyond the paper).
        full_matrix_path: also write the full matrices (not with `all_pairs`).
        provenance: extra provenance (token set details, mask); the stores' models, paths and
            token-set hash are always recorded.
        device: where the engine computes (None: CUDA when present).
        overwrite: replace existing outputs.
        allow_same_model: accept two stores of the same model and checkpoint (a model
            correlated with itself makes every neuron look universal; refused by default).
        say: where the plan and progress lines go (the CLI prints them).

    Returns:
        The `CorrelationResult`, or with `all_pairs` a dict label -> result.

    Raises:
        ConfigError: labels that do not match the stores, an output that is an input, or
            `full_matrix_path` with `all_pairs`.
        IncompatibleInputsError: a store given twice, or two stores of the same model and
            checkpoint without `allow_same_model`.
        OutputExistsError: an output exists and `overwrite` is False (before any work).
    """
    labels = list(labels) if labels else [seed_label(k) for k in range(len(stores))]
    if len(labels) != len(stores) or len(set(labels)) != len(labels):
        raise ConfigError(f"--labels names {len(labels)} models but {len(stores)} stores were given; give one "
                          "unique label per store")
    if all_pairs and full_matrix_path:
        raise ConfigError("--full-matrix is not available with --all-pairs; run `correlate` with the "
                          "reference's store first for its full matrices")
    outs = all_pairs_paths(out, labels) if all_pairs else [Path(out)]
    for path in [*outs, *([full_matrix_path] if full_matrix_path else [])]:
        check_not_input(path, stores)
        check_writable(path, overwrite=overwrite)
    source = iter_aligned(stores, batch_tokens=batch_tokens, device=device)  # checks one token set, every hook
    layouts, models = [], []
    for lab, path in zip(labels, stores):
        with ActivationStore.open(path) as s:
            layouts.append(ModelLayout(lab, len(s.layers), s.d_mlp))
            models.append(s.model)
    check_distinct_models(stores, models, allow_same_model=allow_same_model)
    prov = {"models": models, "labels": labels, "stores": [str(Path(s).resolve()) for s in stores],
            **(provenance or {})}
    prov.setdefault("token_set", {"hash": source.token_set_hash})
    if not all_pairs:
        return correlate_source(source, layouts, out, config=config, provenance=prov, cluster=cluster,
                                full_matrix_path=full_matrix_path, overwrite=overwrite, say=say)
    if cluster is not None:
        for r, lay in enumerate(layouts):  # every reference is one distributed correlate of its own
            order = [r] + [i for i in range(len(layouts)) if i != r]
            say(f"preflight, reference {lay.label}: "
                f"{preflight([layouts[i] for i in order], source.n_tokens, config)['summary']}")
        results = correlate_all_pairs_distributed(source, layouts, config, cluster=cluster, provenance=prov)
    else:
        say(f"preflight: {preflight_all_pairs(layouts, source.n_tokens, config)['summary']}")
        results = correlate_all_pairs(source, layouts, config, provenance=prov)
    for (lab, res), path in zip(results.items(), outs):
        res.save(path, overwrite=overwrite)
        say(f"reference {lab}: -> {path}")
    return results


def _finish(result: CorrelationResult, lms, labels, ts: TokenSet, out: Path, config: PipelineConfig,
            extra_stages, held: TokenSet | None, identity: dict[str, Any], client) -> PipelineResult:
    prov = result.provenance
    table = universality_table(result, threshold=config.threshold)
    for ext in ("csv", "h5"):
        save_universality_table(table, out / f"universality.{ext}", provenance=prov, overwrite=True)
    summary = {
        **provenance_base("pipeline_summary"),
        "out_dir": str(out),
        "run": identity,
        "config": config.to_dict(),
        "inputs": prov,
        "universality": family_summary(table, result, config.threshold),
        "held_out_tokens": None if held is None else {
            "path": str(out / "tokens_held_out.h5"), "hash": held.hash, "n_rows": held.n_rows,
            "disjoint_from": ts.hash, "rule": held.source.get("held_out_from", {}).get("rule")},
    }
    res = PipelineResult(out_dir=out, labels=labels, token_set=ts, correlation=result, table=table,
                         summary=summary, model_provenance=[lm.provenance for lm in lms], held_out=held, client=client)
    for stage in extra_stages:
        summary.update(stage(res) or {})
    write_json(out / "summary.json", summary, overwrite=True)
    res.client = None  # closed with the run
    return res
