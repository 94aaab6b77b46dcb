"""The explanations engine: passes over the tokens for blocks of neurons under a memory budget,
shards of rows merged exactly, and the examples' contexts read back (docs/explanations.md).

Per block of neuron groups (a reference neuron with its partners; a group is never split):

    pass 1   top-k, histogram of the value keys' high digit, total moments, sums per
             current id / previous id / position                      (MainPartial)
    pass 2   only for float32 values: the low digit inside each quantile's bin   (RefinePartial)
    pass 3   the examples at each exact quantile value                  (ExamplesPartial)
    rows     the rows holding the examples, for their contexts

With no quantiles asked for, pass 1 is the only pass.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

from universal_neurons.errors import ConfigError
from universal_neurons.runtime import pick_device, progress

from .accumulate import (
    ExamplesPartial,
    MainPartial,
    RefinePartial,
    as_numpy,
    quantile_plan,
    refine_plan,
)
from .config import ExplainConfig
from .features import FeatureSet, build_features
from .keys import DIGIT, check_tokens, key_values, split_asc, split_desc
from .result import Explanations
from .selection import NeuronGroup, units_of
from .source import Unit
from .variance import assign_families, best_features, eta_squared, family_scores, variance_reduction

__all__ = ["unit_bytes", "plan_blocks", "explain_neurons", "run_pass"]

log = logging.getLogger(__name__)


def unit_bytes(vocab: int, ctx_len: int, config: ExplainConfig, bits: int) -> int:
    """Accumulator bytes per neuron of a block: the largest pass's state plus one batch's temporaries."""
    tokens = config.batch_rows * ctx_len
    q = len(config.quantiles)
    hist = 2**DIGIT * 4 if q else 0
    pass1 = 8 * (2 * vocab + 1 + ctx_len) + 8 * config.k + hist + tokens * 96  # sums, top-k, histogram, batch
    refine = q * 2**DIGIT * 4 + tokens * q * 17 if (q and bits == 32) else 0
    examples = 8 * q * config.quantile_examples + tokens * q * 17
    return max(pass1, refine, examples)


def plan_blocks(groups: Sequence[NeuronGroup], vocab: int, ctx_len: int, config: ExplainConfig,
                bits: int) -> list[list[int]]:
    """Groups packed in order into blocks whose neurons fit `config.memory_budget`.

    Returns:
        `[[group index, ...], ...]`.

    Raises:
        ConfigError: one group alone needs more than the budget.
    """
    per = unit_bytes(vocab, ctx_len, config, bits)
    cap = config.memory_budget // per
    blocks: list[list[int]] = []
    seen: set[Unit] = set()
    for g, group in enumerate(groups):
        members = set(group.members)
        if len(members) > cap:
            raise ConfigError(f"memory_budget={config.memory_budget} bytes holds {cap} neuron(s) ({per} bytes each "
                              f"for a vocabulary of {vocab}); a group needs {len(members)}: raise memory_budget")
        if blocks and len(seen | members) <= cap:
            blocks[-1].append(g)
            seen |= members
        else:
            blocks.append([g])
            seen = set(members)
    return blocks


def run_pass(source, units: Sequence[Unit], make: Callable[[], Any], update: Callable[[Any, Any], None],
             shards: Sequence[tuple[int, int]], config: ExplainConfig, device: torch.device, desc: str) -> Any:
    """One pass over `shards` of rows: a fresh state per shard (`make()`), fed every batch
    (`update(state, batch)`), the shards' states merged in shard order (`state.merge`)."""
    total = sum(b - a for a, b in shards) * source.ctx_len
    bar = progress(total=total, desc=desc, unit="tok", unit_scale=True)
    merged = None
    try:
        for rows in shards:
            state = make()
            for batch in source.batches(units, rows=rows, batch_rows=config.batch_rows, device=device):
                update(state, batch)
                bar.update(batch.ids.numel())
            merged = state if merged is None else merged.merge(state)
    finally:
        bar.close()
    return merged


def _examples(main: MainPartial, ex: ExamplesPartial | None, config: ExplainConfig,
              bits: int) -> list[tuple[int, str, int, int, float]]:
    """`(block column, kind, rank, token, value)` of every example of a block."""
    out = []
    vk, top_idx = split_desc(main.top)
    val, idx = as_numpy(key_values(vk, bits)), as_numpy(top_idx)
    for j in range(main.n_units):
        for r in range(config.k):
            if idx[r, j] >= 0:
                out.append((j, "top", r, int(idx[r, j]), float(val[r, j])))
    if ex is not None:
        vk2, low_idx = split_asc(ex.low)
        val2, idx2 = as_numpy(key_values(vk2, bits)), as_numpy(low_idx)
        for j in range(main.n_units):
            for qi, q in enumerate(config.quantiles):
                for r in range(ex.m):
                    if idx2[r, qi, j] >= 0:
                        out.append((j, f"q{q:g}", r, int(idx2[r, qi, j]), float(val2[r, qi, j])))
    return out


def _contexts(source, block_units: Sequence[Unit], examples: list[tuple[int, str, int, int, float]],
              counterparts: np.ndarray, config: ExplainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Token ids `[example, window]` and counterpart activations `[example, model, window]` of the
    windows around the examples (the example at `context_before`; -1 / NaN outside its row).

    `counterparts[j, m]`: the block column of unit j's counterpart in model m (-1: none).
    """
    ctx, before, after = source.ctx_len, config.context_before, config.context_after
    width = before + 1 + after
    ids = np.full((len(examples), width), -1, np.int32)
    acts = np.full((len(examples), counterparts.shape[1], width), np.nan, np.float32)
    if not examples:
        return ids, acts
    tokens = np.array([e[3] for e in examples], np.int64)
    rows = tokens // ctx
    wanted = np.unique(rows)
    for c0 in range(0, len(wanted), config.batch_rows):
        chunk = wanted[c0:c0 + config.batch_rows]
        row_ids, row_acts = source.read_rows(chunk, block_units)  # [row, pos], [row, pos, unit]
        for e in np.flatnonzero(np.isin(rows, chunk)):
            j, pos = examples[e][0], int(tokens[e] % ctx)
            r = int(np.searchsorted(chunk, rows[e]))
            lo, hi = max(0, pos - before), min(ctx, pos + after + 1)
            w0 = lo - (pos - before)
            ids[e, w0:w0 + hi - lo] = row_ids[r, lo:hi]
            for m, col in enumerate(counterparts[j]):
                if col >= 0:
                    acts[e, m, w0:w0 + hi - lo] = row_acts[r, lo:hi, col]
    return ids, acts


def _block_passes(source, block_units: list[Unit], config: ExplainConfig, vocab: int, bits: int,
                  shards: list[tuple[int, int]], device: torch.device, tag: str
                  ) -> tuple[MainPartial, torch.Tensor | None, ExamplesPartial | None]:
    """Every pass of one block: `(pass 1, quantile value keys [unit, q] or None, quantile examples or None)`."""
    n_q = len(config.quantiles)

    def main_state() -> MainPartial:
        return MainPartial(len(block_units), vocab=vocab, ctx_len=source.ctx_len, k=config.k, bits=bits,
                           histogram=n_q > 0, device=device)

    main = run_pass(source, block_units, main_state, lambda s, batch: s.update(batch), shards, config, device,
                    f"{tag} pass 1")
    if not (n_q and main.n):
        return main, None, None
    high, rank_in_bin = quantile_plan(main, config.quantiles)
    if bits == 16:
        thresholds = high - 2**15  # 16-bit keys: the histogram already resolved every value
    else:
        refined = run_pass(source, block_units, lambda: RefinePartial(high), lambda s, batch: s.update(batch, vocab),
                           shards, config, device, f"{tag} pass 2")
        thresholds = refine_plan(refined.hist, high, rank_in_bin)
    ex = run_pass(source, block_units, lambda: ExamplesPartial(thresholds, config.quantile_examples, bits),
                  lambda s, batch: s.update(batch, vocab), shards, config, device, f"{tag} examples")
    return main, thresholds, ex


def explain_neurons(source, groups: Sequence[NeuronGroup], texts: Sequence[str], *,
                    config: ExplainConfig = ExplainConfig(), row_shards: Sequence[tuple[int, int]] | None = None
                    ) -> Explanations:
    """Top-activating and quantile examples, variance reductions and families of every neuron
    of `groups`, from one source of aligned activations.

    Args:
        source: a `StoreSource` or `LiveModelSource` (reference first).
        groups: the neuron groups (`default_groups`, `group_of`).
        texts: `[vocab]` decoded text of every token id (`vocab_texts`).
        config: what to compute.
        row_shards: contiguous row ranges in order, each run as its own partial and merged
            exactly (what a cluster's workers would run); default one shard of every row.

    Returns:
        `Explanations` (without the output side; see `Explanations.with_output`).

    Raises:
        InputError: a neuron the source lacks, or token ids outside `texts`.
        ConfigError: one group needs more than `config.memory_budget`.
    """
    units, home = units_of(groups)
    source.check_units(units)
    check_tokens(source.n_tokens)
    device = pick_device(config.device)
    vocab, bits, labels = len(texts), source.bits, list(source.labels)
    shards = list(row_shards) if row_shards else [(0, source.n_rows)]
    blocks = plan_blocks(groups, vocab, source.ctx_len, config, bits)
    log.info("explaining %d neurons of %d groups over %d tokens on %s: %d block(s), %d-bit keys", len(units),
             len(groups), source.n_tokens, device, len(blocks), bits)
    index = {u: i for i, u in enumerate(units)}
    n_u, n_q = len(units), len(config.quantiles)
    mean, var, qvals = np.full(n_u, np.nan), np.full(n_u, np.nan), np.full((n_u, n_q), np.nan)
    eta2: dict[str, np.ndarray] = {}
    vr_rows: dict[int, np.ndarray] = {}
    examples: list[tuple[int, str, int, int, float]] = []
    ctx_ids, ctx_acts = [], []
    features: FeatureSet | None = None
    counts, n_counted = np.zeros(0, np.int64), 0
    width = config.context_before + 1 + config.context_after
    for b, block in enumerate(blocks):
        block_units = list(dict.fromkeys(u for g in block for u in groups[g].members))
        new = [j for j, u in enumerate(block_units) if index[u] not in vr_rows]  # a shared partner: its first block
        main, thresholds, ex = _block_passes(source, block_units, config, vocab, bits, shards, device,
                                             f"explain block {b + 1}/{len(blocks)}")
        if features is None:  # counts per id are the same in every block
            features = build_features(texts, as_numpy(main.count_cur), source.ctx_len, n_unigrams=config.n_unigrams,
                                      edges=config.edges(source.ctx_len), special_ids=source.special_ids)
        vr, counts = variance_reduction(main, features)
        n_counted = main.n
        eta = eta_squared(main)
        q = as_numpy(key_values(thresholds, bits)) if thresholds is not None else None
        m = as_numpy(main.moments.mean) if main.n else np.full(len(block_units), np.nan)
        v = as_numpy(main.moments.m2) / main.n if main.n else np.full(len(block_units), np.nan)
        for j in new:
            i = index[block_units[j]]
            vr_rows[i], mean[i], var[i] = vr[j], m[j], v[j]
            for name, e in eta.items():
                eta2.setdefault(name, np.full(n_u, np.nan))[i] = e[j]
            if q is not None:
                qvals[i] = q[j]
        keep = set(new)
        block_ex = [e for e in _examples(main, ex, config, bits) if e[0] in keep]
        col = {u: j for j, u in enumerate(block_units)}
        counterparts = np.full((len(block_units), len(labels)), -1, np.int64)
        for j, u in enumerate(block_units):
            for k, lab in enumerate(labels):
                other = groups[home[index[u]]].member(lab)
                counterparts[j, k] = col.get(other, -1) if other is not None else -1
        ids, acts = _contexts(source, block_units, block_ex, counterparts, config)
        examples.extend((index[block_units[e[0]]], *e[1:]) for e in block_ex)
        ctx_ids.append(ids)
        ctx_acts.append(acts)
    assert features is not None
    kinds = {"top": 0, **{f"q{q:g}": k + 1 for k, q in enumerate(config.quantiles)}}
    order = sorted(range(len(examples)), key=lambda e: (examples[e][0], kinds[examples[e][1]], examples[e][2]))
    examples = [examples[e] for e in order]  # by unit, kind, rank: the same whatever the blocks
    all_ids = np.concatenate(ctx_ids)[order] if ctx_ids else np.zeros((0, width), np.int32)
    all_acts = np.concatenate(ctx_acts)[order] if ctx_acts else np.zeros((0, len(labels), width), np.float32)
    vr_all = np.stack([vr_rows[i] for i in range(n_u)]) if n_u else np.zeros((0, len(features)))
    scores = family_scores(vr_all, features.table, eta2.get("position", np.full(n_u, np.nan)))
    family, family_score = assign_families(scores, var, config)
    best_idx, best_vr = best_features(vr_all, config.best_features)
    return Explanations(
        config=config, groups=list(groups), units=units, home=np.asarray(home, np.int64), labels=labels,
        features=features, feature_counts=counts, n_tokens=int(n_counted), vr=vr_all, mean=mean, var=var,
        eta2=eta2, quantile_values=qvals, scores=scores, family=family, family_score=family_score,
        best_idx=best_idx, best_vr=best_vr, examples=examples,
        context_ids=all_ids, context_acts=all_acts,
        texts=list(texts), source=source.describe(), bits=bits,
        shards=[(int(a), int(b)) for a, b in shards], blocks=len(blocks),
    )
