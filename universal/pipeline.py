"""The whole pipeline for a seed family, one stage after the other, each output on disk:

    out_dir/tokens.h5             the token set every model sees (ids, mask, hash)
    out_dir/stores/<label>.h5     activations of each model (skipped with cache=False)
    out_dir/correlation.h5        max-correlation, partners and baselines per pair (a, m)
    out_dir/universality.csv/.h5  the universality table
    out_dir/summary.json          headline numbers and the provenance of every input

A stage whose output already exists is reused when it was made from the same inputs, and
refused (never silently overwritten) when it was not, unless `overwrite=True`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from universal_neurons.activations import (
    LiveSource,
    StoreConfig,
    TokenSet,
    TokenSetConfig,
    build_token_set,
    cache_activations,
    iter_aligned,
    load_model,
)
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import from_json, provenance_base, to_json

from .correlation import CorrelationConfig, CorrelationResult, ModelLayout, correlate
from .distributed import cache_distributed, correlate_distributed, live_shards, using_cluster
from .training import seed_label
from .universality import save_universality_table, universality_table

__all__ = ["PipelineConfig", "PipelineResult", "run_pipeline", "family_summary"]

log = logging.getLogger("universal_neurons")


@dataclass(frozen=True)
class PipelineConfig:
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PipelineResult:
    out_dir: Path
    labels: list[str]
    token_set: TokenSet
    correlation: CorrelationResult
    table: pd.DataFrame
    summary: dict[str, Any]
    model_provenance: list[dict[str, Any]]


def _token_set(text, tokenizer, config: PipelineConfig, path: Path, overwrite: bool) -> TokenSet:
    if isinstance(text, TokenSet):
        ts = text
    else:
        ts = build_token_set(text, tokenizer, config.tokens)
    if path.exists() and not overwrite:
        old = TokenSet.load(path)
        if old.hash != ts.hash:
            raise UniversalNeuronsError(
                f"{path} holds another token set (hash {old.hash[:12]}, this run {ts.hash[:12]}); "
                "use a new output directory or pass overwrite=True (--overwrite)"
            )
        return old
    ts.save(path, overwrite=overwrite)
    return ts


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

    **Arguments**
    - `models`: hub names or local directories of one family (same tokenizer and shapes).
    - `text`: what `build_token_set` reads (files, folder, list of strings), or a `TokenSet`.
    - `out_dir`: where every output goes (see the module docstring).
    - `checkpoint`: training step loaded for every model (None = final weights).
    - `labels`: short names per model (default `a, b, c, ...`).
    - `extra_stages`: later stages (properties, ablation, ...) called with the result; what
      each returns is added to the summary.

    **Returns** a `PipelineResult`.
    """
    if len(models) < 2:
        raise UniversalNeuronsError(f"a seed family needs at least two models, got {len(models)}")
    labels = list(labels) if labels else [seed_label(k) for k in range(len(models))]
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise UniversalNeuronsError(f"labels {labels} must be unique, one per model ({len(models)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lms = [load_model(m, checkpoint=checkpoint, device=config.device, process_weights=config.process_weights)
           for m in models]
    shapes = {(lm.n_layers, lm.d_mlp) for lm in lms}
    if len(shapes) > 1:
        raise UniversalNeuronsError(f"the models have different shapes (n_layers, d_mlp): {sorted(shapes)}; "
                                    "a seed family shares one architecture")
    ts = _token_set(text, lms[0].tokenizer, config, out / "tokens.h5", overwrite)
    log.info("token set: %d rows x %d = %d tokens (%d counted), hash %s", ts.n_rows, ts.ctx_len, ts.n_tokens,
             ts.n_counted, ts.hash[:12])

    with using_cluster(config.cluster) as client:
        result = _correlate_stage(models, lms, labels, ts, out, checkpoint, config, overwrite, client)
    return _finish(result, lms, labels, ts, out, config, extra_stages)


def _correlate_stage(models, lms, labels, ts: TokenSet, out: Path, checkpoint, config: PipelineConfig, overwrite: bool,
                     client) -> CorrelationResult:
    if config.cache:
        stores = []
        for lab, lm, spec in zip(labels, lms, models):
            path = out / "stores" / f"{lab}.h5"
            path.parent.mkdir(exist_ok=True)
            if path.exists() and not overwrite:
                from universal_neurons.activations import ActivationStore

                with ActivationStore.open(path) as s:
                    same = (s.token_set_hash == ts.hash and s.model.get("resolved") == lm.provenance["resolved"]
                            and s.model.get("checkpoint") == lm.provenance["checkpoint"] and s.config == config.store)
                if same:
                    log.info("reusing %s", path)
                    stores.append(path)
                    continue
            if client is not None:
                stores.append(cache_distributed(spec, ts, path, cluster=client, config=config.store,
                                                checkpoint=checkpoint, process_weights=config.process_weights,
                                                batch_rows=config.batch_rows, overwrite=overwrite))
            else:
                stores.append(cache_activations(lm, ts, path, config=config.store, batch_rows=config.batch_rows,
                                                overwrite=overwrite))
        source = iter_aligned(stores, batch_tokens=config.batch_rows * ts.ctx_len, device=config.device)
    elif client is not None:
        source = live_shards(list(models), ts, config.batch_rows, checkpoint=checkpoint,
                             process_weights=config.process_weights)
    else:
        source = LiveSource(lms, ts, batch_rows=config.batch_rows, device=config.device)

    layouts = [ModelLayout(lab, lm.n_layers, lm.d_mlp) for lab, lm in zip(labels, lms)]
    prov = {
        "models": [lm.provenance for lm in lms],
        "labels": labels,
        "token_set": {"hash": ts.hash, "config": ts.config.to_dict(), "tokenizer": ts.tokenizer_info,
                      "source": ts.source},
        "mask_policy": {k: v for k, v in ts.config.to_dict().items() if k.startswith("exclude") or k == "newline_ids"},
    }
    corr_path = out / "correlation.h5"
    result = None
    if corr_path.exists() and not overwrite:
        old = CorrelationResult.load(corr_path)
        def ident(p):
            return [p.get("resolved"), p.get("checkpoint"), p.get("revision"), p.get("weight_processing")]

        same_inputs = (old.provenance.get("token_set", {}).get("hash") == ts.hash
                       and [ident(m) for m in old.provenance.get("models", [])] == [ident(lm.provenance) for lm in lms]
                       and old.config == config.correlation)
        if not same_inputs:
            raise UniversalNeuronsError(f"{corr_path} was computed from other models, tokens or settings; use a new "
                                        "output directory or pass overwrite=True (--overwrite)")
        log.info("reusing %s", corr_path)
        result = old
    if result is None:
        if client is not None:
            result = correlate_distributed(source, layouts, config.correlation, cluster=client, provenance=prov)
        else:
            result = correlate(source, layouts, config.correlation, provenance=prov)
        result.save(corr_path, overwrite=True)
    if hasattr(source, "close"):
        source.close()
    return result


def _finish(result: CorrelationResult, lms, labels, ts: TokenSet, out: Path, config: PipelineConfig,
            extra_stages) -> PipelineResult:
    prov = result.provenance
    table = universality_table(result, threshold=config.threshold)
    for ext in ("csv", "h5"):
        save_universality_table(table, out / f"universality.{ext}", provenance=prov, overwrite=True)
    summary = {
        **provenance_base("pipeline_summary"),
        "out_dir": str(out),
        "config": config.to_dict(),
        "inputs": prov,
        "universality": family_summary(table, result, config.threshold),
    }
    res = PipelineResult(out_dir=out, labels=labels, token_set=ts, correlation=result, table=table,
                         summary=summary, model_provenance=[lm.provenance for lm in lms])
    for stage in extra_stages:
        summary.update(stage(res) or {})
    (out / "summary.json").write_text(json.dumps(from_json(to_json(summary)), indent=2))
    return res
