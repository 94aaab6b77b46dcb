"""The Python API: load the models at each checkpoint, stream the token set once per
checkpoint, and summarise (`functional_agreement`, `agreement_over_checkpoints`)."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from universal_neurons.ablation.evaluate import check_tokens, counted_predictions
from universal_neurons.activations import LoadedModel, TokenSet, list_checkpoints, load_model
from universal_neurons.activations.tokens import tokenizer_info
from universal_neurons.errors import ConfigError, IncompatibleInputsError
from universal_neurons.runtime import provenance_base

from ..distributed import ModelSpec, using_cluster
from ..persistence import resolve_steps
from ..training import seed_label
from .cluster import agreement_row_sums_distributed
from .config import METRICS, AgreementConfig
from .kernel import PairRowSums, agreement_row_sums, auto_batch_rows
from .result import AgreementResult, summarise

__all__ = ["functional_agreement", "agreement_over_checkpoints", "model_spec", "pair_indices", "DEFINITIONS"]

log = logging.getLogger(__name__)

DEFINITIONS = {
    "kl_am": "mean over counted predictions of KL(P_a || P_m) = sum_v P_a(v) (log P_a(v) - log P_m(v)), nats",
    "kl_ma": "mean over counted predictions of KL(P_m || P_a), nats",
    "js": "mean Jensen-Shannon divergence (KL(P_a || M) + KL(P_m || M)) / 2, M = (P_a + P_m) / 2, natural log: "
          "in [0, ln 2 = 0.693] nats",
    "top1": "fraction of counted predictions where argmax P_a = argmax P_m",
    "counted": "the logits at pos predict token pos+1; counted iff mask[pos] and mask[pos+1] (as the ablation)",
    "interval": "percentile bootstrap over token rows (the ablation's row draws), ratio of sums per replicate",
    "at_init": "step 0: the seeds before training, where near-uniform predictions make KL small; top-1 agreement "
               "is the fair comparison with trained checkpoints",
}


def model_spec(provenance: dict[str, Any]) -> tuple[str, int | None]:
    """What to pass to `load_model` to reload a model at another checkpoint, and its own step.

    Args:
        provenance: `LoadedModel.provenance`.

    Returns:
        `(spec, step)`: a local `checkpoint-<step>` directory gives its seed directory and that
        step; another local directory itself and its recorded checkpoint; a hub model its
        canonical repository and its checkpoint.
    """
    resolved = Path(str(provenance.get("resolved", "")))
    if provenance.get("source") == "local":
        suffix = resolved.name[len("checkpoint-"):]
        if resolved.name.startswith("checkpoint-") and suffix.isdigit():
            return str(resolved.parent), int(suffix)
        return str(resolved), provenance.get("checkpoint")
    return str(provenance.get("resolved") or provenance.get("name")), provenance.get("checkpoint")


def pair_indices(n_models: int, pairs: str) -> list[tuple[int, int]]:
    """The pairs computed for `n_models` models: `(0, j)` for 'reference', `(i, j), i < j`
    otherwise ('ordered' adds the reversed pairs afterwards, from the same sums)."""
    if pairs == "reference":
        return [(0, j) for j in range(1, n_models)]
    return [(i, j) for i in range(n_models) for j in range(i + 1, n_models)]


def _check_family(lms: Sequence[LoadedModel], ts: TokenSet) -> None:
    """Refuse models that cannot be compared on `ts`: another vocabulary, rows too long."""
    vocab = {lm.d_vocab for lm in lms}
    if len(vocab) > 1:
        raise IncompatibleInputsError(f"the models have vocabularies of {sorted(vocab)} tokens; next-token "
                                      "distributions are compared only within one tokenizer's vocabulary")
    for lm in lms:
        check_tokens(lm, ts)
    prints = {tokenizer_info(lm.tokenizer)["fingerprint"] for lm in lms}
    if len(prints) > 1:
        raise IncompatibleInputsError("the models load different tokenizers (same vocabulary size, other tokens); "
                                      "their distributions are over different token lists. Compare one family")
    if ts.tokenizer_info.get("fingerprint") not in prints:
        log.warning("the token set was built with tokenizer %s, not the models' own; check it is the same family",
                    ts.tokenizer_info.get("name_or_path"))


def _load(models: Sequence[Any], step: int | None, device: str | None, process_weights: bool) -> list[LoadedModel]:
    return [m if isinstance(m, LoadedModel) else
            load_model(m, checkpoint=step, device=device, process_weights=process_weights) for m in models]


def _step_of(lm: LoadedModel) -> int | None:
    return model_spec(lm.provenance)[1]


def _final_step(model: Any) -> int | None:
    """The step a model named without a checkpoint loads at, when its directory says so."""
    if isinstance(model, LoadedModel):
        return _step_of(model)
    path = Path(model)
    if not path.is_dir():
        return None  # a hub model's final weights: no step known here
    if (path / "config.json").exists():
        suffix = path.name[len("checkpoint-"):]
        return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() else None
    saved = list_checkpoints(path)
    return saved[-1] if saved else None


def _at_step(lms: Sequence[LoadedModel], ts: TokenSet, pairs: list[tuple[int, int]], config: AgreementConfig,
             desc: str, client: Any = None, device: str | None = None) -> PairRowSums:
    _check_family(lms, ts)
    if client is not None:
        rows = auto_batch_rows(len({i for pair in pairs for i in pair}), ts, lms[0].d_vocab, config.dtype,
                               config.batch_rows)  # the batches one process would run
        return agreement_row_sums_distributed([ModelSpec.from_provenance(lm.provenance) for lm in lms], ts, pairs,
                                              cluster=client, batch_rows=rows, dtype=config.dtype, device=device)
    with torch.inference_mode():
        return agreement_row_sums(lms, ts, pairs, dtype=config.dtype, batch_rows=config.batch_rows, desc=desc)


def _init_available(specs: Sequence[Any]) -> bool:
    """Whether every model is a local seed directory that saved step 0."""
    return all(not isinstance(s, LoadedModel) and Path(s).is_dir() and 0 in list_checkpoints(s) for s in specs)


def _token_provenance(ts: TokenSet, tokens: str | None) -> dict[str, Any]:
    counted = counted_predictions(ts.mask)
    return {"hash": ts.hash, "n_rows": ts.n_rows, "ctx_len": ts.ctx_len, "n_counted_predictions": int(counted.sum()),
            "source": ts.source, "which": tokens or "given"}


def _mask_policy(ts: TokenSet) -> dict[str, Any]:
    return {k: v for k, v in ts.config.to_dict().items()
            if k.startswith("exclude") or k in ("newline_ids", "extra_exclude_ids")}


def _model_record(label: str, lm: LoadedModel) -> dict[str, Any]:
    keys = ("name", "source", "resolved", "checkpoint", "revision", "weight_processing", "dtype", "device")
    spec, step = model_spec(lm.provenance)
    return {"label": label, "spec": spec, "step": step, **{k: lm.provenance.get(k) for k in keys}}


def _compute(models: Sequence[Any], steps: Sequence[int | None], ts: TokenSet, *, labels: Sequence[str] | None,
             config: AgreementConfig, device: str | None, process_weights: bool, tokens: str | None,
             cluster: Any = None) -> AgreementResult:
    """Every pair at every step in `steps` (None: the models as given or their final weights)."""
    if cluster is None:
        return _compute_steps(models, steps, ts, labels=labels, config=config, device=device,
                              process_weights=process_weights, tokens=tokens, client=None)
    with using_cluster(cluster) as client:  # one cluster for every step
        return _compute_steps(models, steps, ts, labels=labels, config=config, device=device,
                              process_weights=process_weights, tokens=tokens, client=client)


def _compute_steps(models: Sequence[Any], steps: Sequence[int | None], ts: TokenSet, *, labels: Sequence[str] | None,
                   config: AgreementConfig, device: str | None, process_weights: bool, tokens: str | None,
                   client: Any) -> AgreementResult:
    if len(models) < 2:
        raise ConfigError(f"agreement compares at least two models, got {len(models)}")
    labels = list(labels) if labels else [seed_label(k) for k in range(len(models))]
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise ConfigError(f"labels {labels} must be unique, one per model ({len(models)})")
    pairs = pair_indices(len(models), config.pairs)
    entries: list[dict[str, Any]] = []
    sums: list[np.ndarray] = []
    per_metric: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    runs: dict[str, list[dict[str, Any]]] = {}
    for k, step in enumerate(steps):
        lms = _load(models, step, device, process_weights)
        here = step if step is not None else _step_of(lms[0])
        log.info("agreement at step %s (%d of %d): %d pairs over %d rows", here, k + 1, len(steps), len(pairs),
                 ts.n_rows)
        res = _at_step(lms, ts, pairs, config, desc=f"agreement, step {here}", client=client, device=device)
        runs[str(here)] = [_model_record(label, lm) for label, lm in zip(labels, lms)]
        ordered = [(pairs, res)] + ([([(j, i) for i, j in pairs], res.swapped())] if config.pairs == "ordered" else [])
        for pair_list, part in ordered:
            entries += [{"step": here, "at_init": here == 0, "a": labels[i], "m": labels[j]} for i, j in pair_list]
            for m in METRICS:
                per_metric[m].append(part.values[m])
        sums.append(res.n)
        del lms
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    n = sums[0]
    values = {m: np.concatenate(per_metric[m], axis=0) for m in METRICS}
    order = sorted(range(len(entries)), key=lambda e: (entries[e]["step"] is None, entries[e]["step"] or 0))
    entries = [entries[e] for e in order]  # ascending steps; pairs keep their order within a step
    values = {m: v[order] for m, v in values.items()}
    table, by_step = summarise(entries, n, values, config)
    provenance = {
        **provenance_base("functional_agreement"),
        "labels": labels, "pairs": config.pairs, "steps": list(dict.fromkeys(r["step"] for r in entries)),
        "models": runs, "token_set": _token_provenance(ts, tokens), "mask_policy": _mask_policy(ts),
        "config": config.to_dict(), "definitions": DEFINITIONS,
        "process_weights": process_weights,
    }
    return AgreementResult(table=table, by_step=by_step, rows={"n": n, **values}, provenance=provenance)


def functional_agreement(
    models: Sequence[str | os.PathLike | LoadedModel],
    token_set: TokenSet,
    *,
    checkpoint: int | None = None,
    labels: Sequence[str] | None = None,
    config: AgreementConfig = AgreementConfig(),
    init: bool | None = None,
    device: str | None = None,
    process_weights: bool = False,
    tokens: str | None = None,
    cluster: Any = None,
) -> AgreementResult:
    """How alike the models' next-token distributions are on `token_set`, pair by pair.

    For every pair `(a, m)` (`config.pairs`), over the counted predictions of the token set:
    mean KL(P_a || P_m), KL(P_m || P_a), Jensen-Shannon divergence (natural log, in [0, ln 2])
    and top-1 agreement, each with a bootstrap interval over token rows. Streams the token set
    in batches of rows: at most one batch of `[batch, pos, d_vocab]` log-probabilities per model.

    Args:
        models: hub names, local model or seed directories, or `LoadedModel`s (used as loaded;
            the first is the reference `a`).
        token_set: the rows to compare on (held-out tokens, ideally).
        checkpoint: the training step loaded for every named model (None: final weights).
        labels: short names per model (default `a, b, c, ...`).
        config: pairs, precision, batch rows, bootstrap.
        init: also compare the same pairs at step 0 (initialisation): None = when every model is
            a local seed directory holding `checkpoint-0/`; True = always (loading step 0);
            False = never.
        device: where the models run; None picks CUDA when present.
        process_weights: load with the paper's weight processing; off by default because it
            does not change the next-token distributions (the unembedding is centred, the
            softmax shift-invariant) and costs load time.
        tokens: a note recorded with the token set (which tokens these are, e.g. 'held-out').
        cluster: a Dask client or spec (`universal_neurons.distributed.connect`): the forward
            passes run on its workers, split over row shards (each worker loads the models; the
            result equals the in-process one); None runs here.

    Returns:
        An `AgreementResult`; steps ascending, step 0 rows have `at_init=True`.

    Raises:
        ConfigError: fewer than two models, bad labels.
        IncompatibleInputsError: models of different vocabularies or tokenizers, a token set
            they cannot run.
        InputError: the token set has no counted prediction.
    """
    if init and any(isinstance(m, LoadedModel) for m in models):
        raise ConfigError("init=True reloads the models at step 0, which a LoadedModel cannot be; pass model names "
                          "or directories")
    steps: list[int | None] = [checkpoint]
    here = checkpoint if checkpoint is not None else _final_step(models[0])
    if (init or (init is None and _init_available(models))) and here != 0:
        steps.append(0)
    return _compute(models, steps, token_set, labels=labels, config=config, device=device,
                    process_weights=process_weights, tokens=tokens, cluster=cluster)


def agreement_over_checkpoints(
    models: Sequence[str | os.PathLike],
    steps: Sequence[int] | None,
    token_set: TokenSet,
    *,
    labels: Sequence[str] | None = None,
    config: AgreementConfig = AgreementConfig(),
    init: bool | None = None,
    device: str | None = None,
    process_weights: bool = False,
    tokens: str | None = None,
    cluster: Any = None,
) -> AgreementResult:
    """`functional_agreement` at every checkpoint, on one token set.

    Args:
        models: hub names (with `steps`) or local seed directories holding `checkpoint-<step>/`.
        steps: the checkpoint steps; None = every step all the seed directories saved.
        token_set: the rows to compare on.
        labels, config, device, process_weights, tokens, cluster: as in `functional_agreement`.
        init: add step 0 when missing from `steps`: None = when every seed directory saved it.

    Returns:
        An `AgreementResult` with one block of pairs per step, ascending.

    Raises:
        ConfigError: hub models without steps; see also `functional_agreement`.
        InputNotFoundError: a seed directory lacks one of `steps`.
    """
    if steps is not None and len(set(steps)) == 1:
        wanted = [int(next(iter(steps)))]
    else:
        wanted = resolve_steps(models, steps)
    if (init or (init is None and _init_available(models))) and 0 not in wanted:
        wanted = [0, *wanted]
    return _compute(models, sorted(wanted), token_set, labels=labels, config=config, device=device,
                    process_weights=process_weights, tokens=tokens, cluster=cluster)
