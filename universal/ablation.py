"""Stage: universality table -> functional impact (METHOD.md §8).

Ablate a *set* of MLP neurons at `blocks.{l}.mlp.hook_post` (zero, mean, or a fixed value)
and measure, on a held-out token set, how much the model's next-token predictions change:

    ce        mean next-token cross-entropy, clean and ablated; delta_ce = ablated - clean
    kl        mean KL(clean || ablated) of the next-token distributions
    entropy   mean prediction entropy; delta_entropy = ablated - clean

Counted predictions. The logits at position p predict token p+1. That prediction is counted
iff `mask[p]` and `mask[p+1]` are both True: the input token is one every other statistic
counts, and so is the target (no scoring of predicted EOS, newlines or BOS). It is the rule of
TransformerLens' `lm_cross_entropy_loss(..., attention_mask=mask)`, and with an all-True mask
the clean loss equals `model(tokens, return_type="loss")`. The last position predicts nothing.
Ablation itself acts at every position, masked or not: the mask decides what is counted.

Controls. Each ablated set is compared with `n_controls` seeded random sets with the same
number of neurons in every layer, drawn from the neurons that are neither in the set nor
universal (nor dead, by default). Per-layer groups ablate the universal neurons of one layer
at a time, against controls from that layer.

Confidence intervals bootstrap over token *rows*, not tokens: tokens of a row share their
context and are dependent, rows are (nearly) independent. Every replicate resamples rows with
replacement, the same rows for all sets (paired), and for the control mean also resamples the
control draws. Memory: per-row sums per set (`rows x sets x 3` float64), never per-token
values unless asked for; the clean forward pass of each batch is shared by all sets.

Outputs of `AblationResult.save(dir)`: `ablation_runs.csv` (one row per ablated set),
`ablation_summary.csv` (one row per group), `ablation.json` (provenance, config, the exact
neurons of every set) and `ablation_rows.h5` (per-row sums, for other statistics later).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from universal_neurons.activations import ActivationStore, LoadedModel, TokenSet, hook_name, mlp_activations, run_with_post_hooks
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import from_json, progress, provenance_base, to_json

__all__ = [
    "ABLATION_KINDS",
    "AblationConfig",
    "AblationMetrics",
    "AblationResult",
    "ablate",
    "ablation_study",
    "ablation_stage",
    "control_sets",
    "counted_predictions",
    "neuron_means",
    "neuron_set",
]

log = logging.getLogger("universal_neurons")

ABLATION_KINDS = ("zero", "mean", "fixed")
_LOGIT_BUDGET = 128 << 20  # bytes of fp32 logits per batch when batch_rows is automatic
_PER_TOKEN_IN_MEMORY = 20_000_000  # per-token values returned in memory up to this many; beyond: a file
_FILES = ("ablation_runs.csv", "ablation_summary.csv", "ablation.json", "ablation_rows.h5")

Neurons = dict[int, np.ndarray]  # layer -> sorted unique neuron indices (int64)


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class AblationConfig:
    """How neurons are ablated and how the result is compared with chance. Stored with every result."""

    kind: str = "mean"  # zero | mean | fixed; mean keeps the layer's input on-distribution (GELU means are not 0)
    value: float | None = None  # the activation written by kind='fixed' (required then, refused otherwise)
    n_controls: int = 5  # random control sets per ablated set (p-value resolution is 1/(n_controls+1))
    seed: int = 0  # seeds the control draws and the bootstrap
    n_bootstrap: int = 1000  # bootstrap replicates (over token rows, and control draws for the control mean)
    ci: float = 0.95  # confidence level of the percentile intervals
    batch_rows: int | None = None  # rows per forward pass; None = ~128 MiB of fp32 logits per batch
    per_layer: bool = True  # also ablate the universal neurons of each layer alone, with matched controls
    controls_exclude_dead: bool = True  # dead neurons (constant activation) would make controls look harmless

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise UniversalNeuronsError(f"AblationConfig: {msg}")

        if self.kind not in ABLATION_KINDS:
            bad(f"unknown ablation kind {self.kind!r}; use one of {', '.join(ABLATION_KINDS)}")
        if self.kind == "fixed":
            if self.value is None or not np.isfinite(float(self.value)):
                bad(f"kind='fixed' needs a finite value (the activation to write), got value={self.value!r}")
            object.__setattr__(self, "value", float(self.value))
        elif self.value is not None:
            bad(f"value={self.value!r} is only used with kind='fixed'; drop it or set kind='fixed'")
        for name, lo in (("n_controls", 0), ("n_bootstrap", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                bad(f"{name} must be an integer >= {lo}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0.0 < float(self.ci) < 1.0:
            bad(f"ci must be in (0, 1), e.g. 0.95, got {self.ci!r}")
        if self.batch_rows is not None and (isinstance(self.batch_rows, bool) or not isinstance(self.batch_rows, int)
                                            or self.batch_rows < 1):
            bad(f"batch_rows must be None (automatic) or a positive integer, got {self.batch_rows!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AblationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UniversalNeuronsError(f"AblationConfig has no field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------- neuron sets


def _pairs_of(neurons) -> np.ndarray:
    """`[n, 2]` int64 (layer, neuron) pairs from a table, an array or pairs."""
    if isinstance(neurons, pd.DataFrame):
        missing = {"layer", "neuron"} - set(neurons.columns)
        if missing:
            raise UniversalNeuronsError(f"the neuron table has no column(s) {sorted(missing)}; it needs 'layer' and "
                                        f"'neuron' (it has {list(neurons.columns)[:12]})")
        return neurons[["layer", "neuron"]].to_numpy(dtype=np.int64).reshape(-1, 2)
    if isinstance(neurons, Mapping):
        return np.array([(int(l), int(i)) for l, idx in neurons.items() for i in np.ravel(idx)],
                        dtype=np.int64).reshape(-1, 2)
    arr = np.asarray(list(neurons) if not isinstance(neurons, np.ndarray) else neurons)
    if arr.size == 0:
        return np.zeros((0, 2), np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise UniversalNeuronsError(f"neurons must be (layer, neuron) integer pairs, a {{layer: [neurons]}} dict or "
                                    f"a table with 'layer' and 'neuron' columns; got an array of shape {arr.shape} "
                                    f"and dtype {arr.dtype}")
    return arr.astype(np.int64)


def neuron_set(neurons, lm: LoadedModel) -> Neurons:
    """Check a set of neurons against a model and group it by layer.

    **Arguments**
    - `neurons`: `(layer, neuron)` pairs, `{layer: [neuron, ...]}`, or a DataFrame with `layer` and
      `neuron` columns (every row is in the set). Duplicates are dropped.
    - `lm`: the model the neurons belong to.

    **Returns** `{layer: Int[ndarray, "k"]}` sorted unique indices; layers without neurons are absent.
    """
    pairs = _pairs_of(neurons)
    bad_l = sorted({int(l) for l in pairs[:, 0] if not 0 <= l < lm.n_layers})
    if bad_l:
        raise UniversalNeuronsError(f"layer(s) {bad_l} do not exist in {lm.name}, which has layers 0..{lm.n_layers - 1}; "
                                    "the neuron list was made for another model")
    bad_n = sorted({int(i) for i in pairs[:, 1] if not 0 <= i < lm.d_mlp})
    if bad_n:
        raise UniversalNeuronsError(f"neuron index(es) {bad_n[:5]}{' ...' if len(bad_n) > 5 else ''} do not exist in "
                                    f"{lm.name}, whose layers have d_mlp={lm.d_mlp} neurons (0..{lm.d_mlp - 1}); "
                                    "the neuron list was made for a model of another shape")
    out: Neurons = {}
    for l in sorted({int(l) for l in pairs[:, 0]}):
        out[l] = np.unique(pairs[pairs[:, 0] == l, 1])
    return out


def _count(s: Neurons) -> int:
    return int(sum(len(v) for v in s.values()))


def _flat(s: Neurons, d_mlp: int) -> np.ndarray:
    return np.concatenate([l * d_mlp + v for l, v in s.items()]) if s else np.zeros(0, np.int64)


def _split_table(table_or_neurons, lm: LoadedModel, exclude_dead: bool) -> tuple[Neurons, np.ndarray]:
    """The set to ablate and the control pool (bool `[layer * d_mlp]`, True = may be drawn)."""
    n_all = lm.n_layers * lm.d_mlp
    pool = np.ones(n_all, bool)
    if isinstance(table_or_neurons, pd.DataFrame) and "is_universal" in table_or_neurons.columns:
        t = table_or_neurons
        if "reference" in t.columns and t["reference"].nunique() > 1:
            raise UniversalNeuronsError("the table holds several reference models (all-pairs mode); select one, "
                                        "e.g. table[table.reference == 'a']")
        if len(t) != n_all:
            raise UniversalNeuronsError(
                f"the universality table has {len(t)} neurons but {lm.name} has {lm.n_layers} layers x "
                f"{lm.d_mlp} = {n_all}; the table was made for a model of another shape")
        neuron_set(t, lm)  # every row must be a neuron of this model
        flags = t["is_universal"].astype(bool).to_numpy()
        universal = neuron_set(t[flags], lm)
        all_pairs = _pairs_of(t)
        pool[all_pairs[flags, 0] * lm.d_mlp + all_pairs[flags, 1]] = False
        if exclude_dead and "dead" in t.columns:
            dead = t["dead"].astype(bool).to_numpy()
            pool[all_pairs[dead, 0] * lm.d_mlp + all_pairs[dead, 1]] = False
    else:
        universal = neuron_set(table_or_neurons, lm)
    pool[_flat(universal, lm.d_mlp)] = False
    return universal, pool


def control_sets(neurons: Neurons, pool: np.ndarray, *, d_mlp: int, n_controls: int, seed: int,
                 group: int = -1) -> list[Neurons]:
    """Seeded random sets with the same number of neurons per layer as `neurons`, drawn from `pool`.

    **Arguments**
    - `neurons`: `{layer: indices}` (see `neuron_set`).
    - `pool`: `Bool[ndarray, "layer*d_mlp"]`, True = may be drawn (callers exclude the set itself,
      universal and dead neurons).
    - `n_controls`: how many sets; `seed`, `group`: draw k of group g uses `SeedSequence([seed, g + 1, k])`,
      so draws repeat and do not depend on which other groups were drawn.

    **Returns** a list of `{layer: sorted indices}`, each disjoint from `neurons` when the pool is.
    """
    out = []
    for k in range(n_controls):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(group) + 1, k]))
        draw: Neurons = {}
        for l, idx in neurons.items():
            cand = np.flatnonzero(pool[l * d_mlp:(l + 1) * d_mlp])
            if len(cand) < len(idx):
                raise UniversalNeuronsError(
                    f"layer {l} has {len(idx)} neurons to ablate but only {len(cand)} candidates for a control set "
                    "(not ablated, not universal, not dead); ablate fewer neurons of that layer, or keep dead "
                    "neurons in the pool with AblationConfig(controls_exclude_dead=False)")
            draw[l] = np.sort(rng.choice(cand, size=len(idx), replace=False))
        out.append(draw)
    return out


# ---------------------------------------------------------------------------- means


def neuron_means(source: LoadedModel | ActivationStore | str | os.PathLike, token_set: TokenSet | None = None, *,
                 batch_rows: int = 16, progress_bar: bool | None = None) -> np.ndarray:
    """Mean `hook_post` activation of every neuron over the masked-in tokens.

    **Arguments**
    - `source`: a `LoadedModel` (streamed over `token_set`, which is then required) or an activation
      store (object or path; its mask is used, and it must be of `token_set` when one is given).
    - `token_set`: the tokens; `batch_rows`: rows per forward pass for a model.

    **Returns** `Float[ndarray, "layer d_mlp"]` float64; layers a store does not hold are NaN.
    """
    if isinstance(source, LoadedModel):
        if token_set is None:
            raise UniversalNeuronsError("neuron_means of a model needs the token set to average over")
        _check_tokens(source, token_set)
        total = torch.zeros(source.n_layers, source.d_mlp, dtype=torch.float64)
        n = 0
        for ids, mask in progress(token_set.batches(batch_rows), desc="neuron means", unit="batch",
                                  total=-(-token_set.n_rows // batch_rows), enabled=progress_bar):
            acts = mlp_activations(source, torch.from_numpy(ids).long())
            m = torch.from_numpy(mask.reshape(-1)).to(source.device)
            for l in range(source.n_layers):
                a = acts[hook_name(l)].reshape(-1, source.d_mlp)[m]
                total[l] += a.double().sum(0).cpu()
            n += int(mask.sum())
        if n == 0:
            raise UniversalNeuronsError("the token set masks out every token; there is no mean to take. Rebuild it "
                                        "with a laxer mask or on more text")
        return (total / n).numpy()
    owned = not isinstance(source, ActivationStore)
    store = ActivationStore.open(source) if owned else source
    try:
        if token_set is not None and store.token_set_hash != token_set.hash:
            raise UniversalNeuronsError(
                f"the activation store {store.path} was cached on token set {store.token_set_hash[:12]}, not on this "
                f"one ({token_set.hash[:12]}); cache the model on this token set, or compute the means from that "
                "store on purpose with neuron_means(store) and pass means=")
        mask = store.mask
        if not mask.any():
            raise UniversalNeuronsError(f"the store {store.path} masks out every token; there is no mean to take")
        out = np.full((store.n_layers, store.d_mlp), np.nan)
        step = store.chunk_tokens * max(1, 16384 // store.chunk_tokens)
        for l in store.layers:
            if hook_name(l) not in store:
                continue
            ds, acc = store[hook_name(l)], np.zeros(store.d_mlp)
            for a in range(0, store.n_tokens, step):
                m = mask[a:a + step]
                acc += ds[a:a + step][m].astype(np.float64).sum(0)
            out[l] = acc / mask.sum()
        return out
    finally:
        if owned:
            store.close()


# ---------------------------------------------------------------------------- the evaluation engine


def _check_tokens(lm: LoadedModel, ts: TokenSet) -> None:
    if ts.n_rows == 0:
        raise UniversalNeuronsError("the token set is empty (0 rows); build one with build_token_set on more text")
    if ts.ctx_len > lm.n_ctx:
        raise UniversalNeuronsError(f"the token set's rows have ctx_len={ts.ctx_len} but {lm.name} accepts at most "
                                    f"n_ctx={lm.n_ctx}; rebuild it with TokenSetConfig(ctx_len<={lm.n_ctx})")
    top = int(ts.ids.max())
    if top >= lm.d_vocab or int(ts.ids.min()) < 0:
        raise UniversalNeuronsError(f"the token set holds token id {top} but {lm.name} has a vocabulary of "
                                    f"{lm.d_vocab}; it was built with another tokenizer: rebuild it with this model's")


def counted_predictions(mask: np.ndarray) -> np.ndarray:
    """`Bool[ndarray, "row pos"]`: True where the prediction made at `pos` (of token pos+1) is
    counted, i.e. `mask[pos] & mask[pos + 1]`; the last position is never counted."""
    out = np.zeros_like(mask, dtype=bool)
    out[:, :-1] = mask[:, :-1] & mask[:, 1:]
    return out


def _auto_batch_rows(lm: LoadedModel, ts: TokenSet, batch_rows: int | None) -> int:
    if batch_rows is not None:
        return batch_rows
    return int(max(1, min(ts.n_rows, _LOGIT_BUDGET // (ts.ctx_len * lm.d_vocab * 4))))


def _hooks_for(s: Neurons, kind: str, value: float | None, means: np.ndarray | None,
               device) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    """`{layer: f(act[batch, pos, d_mlp]) -> act}` writing the ablation value into the set's neurons."""
    hooks = {}
    for l, idx in s.items():
        if kind == "zero":
            vals = np.zeros(len(idx))
        elif kind == "fixed":
            vals = np.full(len(idx), value)
        else:
            vals = means[l, idx]
        ix = torch.as_tensor(idx, dtype=torch.long, device=device)
        vt = torch.as_tensor(vals, dtype=torch.float64, device=device)

        def f(act: torch.Tensor, ix=ix, vt=vt) -> torch.Tensor:
            out = act.clone()  # never write into a tensor the model may still hold
            out[..., ix] = vt.to(act.dtype)
            return out

        hooks[l] = f
    return hooks


@dataclass
class _RowSums:
    """Per-row sums over counted predictions. `[row]` for the clean model, `[set, row]` per ablated set."""

    n: np.ndarray
    ce_clean: np.ndarray
    entropy_clean: np.ndarray
    ce_ablated: np.ndarray
    kl: np.ndarray
    entropy_ablated: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence["_RowSums"]) -> "_RowSums":
        """The row sums of consecutive row shards, in order: one `_RowSums` over all their rows."""
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts], axis=-1)
                      for f in dataclasses.fields(cls)})

    def point(self, s: int) -> dict[str, float]:
        n = self.n.sum()
        ce_c, ce_a = self.ce_clean.sum() / n, self.ce_ablated[s].sum() / n
        return {"ce_clean": float(ce_c), "ce_ablated": float(ce_a), "delta_ce": float((self.ce_ablated[s] - self.ce_clean).sum() / n),
                "kl": float(self.kl[s].sum() / n),
                "delta_entropy": float((self.entropy_ablated[s] - self.entropy_clean).sum() / n), "n_tokens": int(n)}


class _MemorySink:
    """Per-token values kept in memory (small token sets): `[set, row, pos]` float32, NaN where not counted."""

    def __init__(self, n_sets: int, ts: TokenSet) -> None:
        if n_sets * ts.n_tokens * 3 > _PER_TOKEN_IN_MEMORY:
            raise UniversalNeuronsError(f"{n_sets} sets x {ts.n_tokens:,} tokens of per-token values is too much to "
                                        "return in memory; pass per_token_path= to write them to an HDF5 file")
        shape = (n_sets, ts.n_rows, ts.ctx_len)
        self.arrays = {"ce_clean": np.full(shape[1:], np.nan, np.float32),
                       "entropy_clean": np.full(shape[1:], np.nan, np.float32),
                       **{k: np.full(shape, np.nan, np.float32) for k in ("ce_ablated", "kl", "entropy_ablated")}}

    def write(self, r0: int, values: dict[str, np.ndarray]) -> None:
        for k, v in values.items():
            a = self.arrays[k]
            if a.ndim == 3:
                a[:, r0:r0 + v.shape[1]] = v
            else:
                a[r0:r0 + v.shape[0]] = v

    def close(self) -> None:
        pass


class _FileSink:
    """Per-token values streamed into HDF5: `/ce_clean, /entropy_clean [row, pos]`,
    `/ce_ablated, /kl, /entropy_ablated [set, row, pos]`, float32, NaN where not counted."""

    def __init__(self, path: Path, n_sets: int, ts: TokenSet, labels: list[str], attrs: dict[str, str],
                 overwrite: bool, batch_rows: int) -> None:
        import h5py

        if path.exists() and not overwrite:
            raise UniversalNeuronsError(f"{path} already exists; pass overwrite=True to replace it or choose another path")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(path.name + ".partial")
        self.f = h5py.File(self.tmp, "w")
        rows = min(batch_rows, ts.n_rows)
        for k in ("ce_clean", "entropy_clean"):
            d = self.f.create_dataset(k, shape=(ts.n_rows, ts.ctx_len), dtype="f4", chunks=(rows, ts.ctx_len))
            d.dims[0].label, d.dims[1].label = "row", "pos"
        for k in ("ce_ablated", "kl", "entropy_ablated"):
            d = self.f.create_dataset(k, shape=(n_sets, ts.n_rows, ts.ctx_len), dtype="f4",
                                      chunks=(1, rows, ts.ctx_len))
            d.dims[0].label, d.dims[1].label, d.dims[2].label = "set", "row", "pos"
        self.f.create_dataset("counted", data=counted_predictions(ts.mask))
        self.f.attrs.update({**attrs, "sets": to_json(labels),
                             "position_rule": "value at pos is the prediction of token pos+1; NaN = not counted"})

    def write(self, r0: int, values: dict[str, np.ndarray]) -> None:
        for k, v in values.items():
            if v.ndim == 3:
                self.f[k][:, r0:r0 + v.shape[1]] = v
            else:
                self.f[k][r0:r0 + v.shape[0]] = v

    def close(self, ok: bool = True) -> None:
        self.f.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _check_counted(counted: np.ndarray) -> None:
    if not counted.any():
        raise UniversalNeuronsError(
            "the token set has no counted predictions: a prediction is counted where a position and the next one are "
            "both masked-in, and the mask excludes every such pair; rebuild the token set with a laxer mask "
            "(e.g. exclude_newlines=False) or on more text")


def _evaluate(lm: LoadedModel, ts: TokenSet, hook_sets: Sequence[dict[int, Callable] | None], *, batch_rows: int,
              sink=None, desc: str = "ablation", progress_bar: bool | None = None,
              require_counted: bool = True) -> _RowSums:
    """One clean forward pass per batch, shared by one ablated pass per set (an empty set reuses the clean one).

    `require_counted=False` for a row shard: the whole token set was checked by the driver."""
    S, R = len(hook_sets), ts.n_rows
    counted_all = counted_predictions(ts.mask)
    if require_counted:
        _check_counted(counted_all)
    sums = _RowSums(n=counted_all.sum(1).astype(np.float64), ce_clean=np.zeros(R), entropy_clean=np.zeros(R),
                    ce_ablated=np.zeros((S, R)), kl=np.zeros((S, R)), entropy_ablated=np.zeros((S, R)))
    bar = progress(total=R * S, desc=desc, unit="row-set", enabled=progress_bar)
    try:
        for r0 in range(0, R, batch_rows):
            ids = torch.from_numpy(ts.ids[r0:r0 + batch_rows]).long().to(lm.device)
            counted = torch.from_numpy(counted_all[r0:r0 + batch_rows, :-1]).to(lm.device)
            cw = counted.to(torch.float64)
            target = ids[:, 1:, None]
            logp = torch.log_softmax(run_with_post_hooks(lm, ids)[:, :-1].float(), dim=-1)  # [batch, pos-1, d_vocab]
            p = logp.exp()
            ce_c = -logp.gather(-1, target)[..., 0]  # [batch, pos-1]
            ent_c = -(p * logp).sum(-1)
            sums.ce_clean[r0:r0 + len(ids)] = (ce_c.double() * cw).sum(1).cpu().numpy()
            sums.entropy_clean[r0:r0 + len(ids)] = (ent_c.double() * cw).sum(1).cpu().numpy()
            per_tok: dict[str, list] = {"ce_ablated": [], "kl": [], "entropy_ablated": []}
            for s, hooks in enumerate(hook_sets):
                if hooks:
                    logq = torch.log_softmax(run_with_post_hooks(lm, ids, hooks)[:, :-1].float(), dim=-1)
                    ce_a = -logq.gather(-1, target)[..., 0]
                    kl = (p * (logp - logq)).sum(-1)
                    ent_a = -(logq.exp() * logq).sum(-1)
                    del logq
                else:
                    ce_a, kl, ent_a = ce_c, torch.zeros_like(ce_c), ent_c
                for name, v in (("ce_ablated", ce_a), ("kl", kl), ("entropy_ablated", ent_a)):
                    getattr(sums, name)[s, r0:r0 + len(ids)] = (v.double() * cw).sum(1).cpu().numpy()
                    if sink is not None:
                        per_tok[name].append(_pad_last(v, counted))
                bar.update(len(ids))
            if sink is not None:
                sink.write(r0, {"ce_clean": _pad_last(ce_c, counted), "entropy_clean": _pad_last(ent_c, counted),
                                **{k: np.stack(v) for k, v in per_tok.items()}})
    finally:
        bar.close()
    return sums


def _pad_last(v: torch.Tensor, counted: torch.Tensor) -> np.ndarray:
    """`[batch, pos-1]` -> `[batch, pos]` float32 with NaN where not counted (and at the last position)."""
    out = torch.full((v.shape[0], v.shape[1] + 1), float("nan"), dtype=torch.float32)
    out[:, :-1] = torch.where(counted, v, torch.nan).float().cpu()
    return out.numpy()


# ---------------------------------------------------------------------------- bootstrap


def _bootstrap_replicates(sums: _RowSums, config: AblationConfig) -> dict[str, np.ndarray]:
    """Per-set bootstrap replicates `[replicate, set]` of delta_ce and kl, resampling rows (paired across sets)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 0, 2**31 - 1]))
    R, B = len(sums.n), config.n_bootstrap
    dce = (sums.ce_ablated - sums.ce_clean).T  # [row, set]
    kl = sums.kl.T
    out = {"delta_ce": np.empty((B, dce.shape[1])), "kl": np.empty((B, dce.shape[1]))}
    step = max(1, min(B, 2_000_000 // max(R, 1)))
    for b0 in range(0, B, step):
        b = min(step, B - b0)
        idx = rng.integers(0, R, size=(b, R))
        w = np.bincount((idx + np.arange(b)[:, None] * R).ravel(), minlength=b * R).reshape(b, R).astype(np.float64)
        den = w @ sums.n
        den[den == 0] = np.nan  # a replicate of rows without counted predictions says nothing
        out["delta_ce"][b0:b0 + b] = (w @ dce) / den[:, None]
        out["kl"][b0:b0 + b] = (w @ kl) / den[:, None]
    return out


def _interval(x: np.ndarray, ci: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(x, [a, 1.0 - a])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------- one set


@dataclass
class AblationMetrics:
    """The effect of ablating one set of neurons.

    **Fields**: `n_neurons`; `ce_clean`, `ce_ablated`, `delta_ce`, `kl`, `delta_entropy` (means over
    `n_tokens` counted predictions, nats); `delta_ce_lo/hi`, `kl_lo/hi` (bootstrap over rows);
    `row_sums` (`{name: Float[ndarray, "row"]}` sums per row, with the count `n`); `per_token`
    (`{name: Float[ndarray, "row pos"]}`, NaN where not counted) when asked for.
    """

    n_neurons: int
    ce_clean: float
    ce_ablated: float
    delta_ce: float
    kl: float
    delta_entropy: float
    n_tokens: int
    delta_ce_lo: float
    delta_ce_hi: float
    kl_lo: float
    kl_hi: float
    row_sums: dict[str, np.ndarray] = field(repr=False)
    per_token: dict[str, np.ndarray] | None = field(default=None, repr=False)


def _means_for(lm: LoadedModel, ts: TokenSet, config: AblationConfig, means, store, batch_rows: int) -> np.ndarray | None:
    if config.kind != "mean":
        return None
    if means is not None and store is not None:
        raise UniversalNeuronsError("pass means= or store=, not both")
    if store is not None:
        means = neuron_means(store, ts)
    elif means is None:
        means = neuron_means(lm, ts, batch_rows=max(1, min(batch_rows, 64)))
    means = np.asarray(means, dtype=np.float64)
    if means.shape != (lm.n_layers, lm.d_mlp):
        raise UniversalNeuronsError(f"means have shape {means.shape} but {lm.name} needs (n_layers, d_mlp) = "
                                    f"({lm.n_layers}, {lm.d_mlp}); they belong to another model")
    return means


def _check_means(means: np.ndarray | None, s: Neurons) -> None:
    if means is None:
        return
    for l, idx in s.items():
        if not np.isfinite(means[l, idx]).all():
            raise UniversalNeuronsError(f"no mean activation for layer {l} (the store does not hold that layer, or "
                                        "the means are NaN); cache every layer or compute means from the model")


def ablate(lm: LoadedModel, neurons, token_set: TokenSet, config: AblationConfig = AblationConfig(), *,
           means: np.ndarray | None = None, store: ActivationStore | str | os.PathLike | None = None,
           per_token: bool = False, per_token_path: str | os.PathLike | None = None, overwrite: bool = False,
           progress_bar: bool | None = None) -> AblationMetrics:
    """Ablate one set of neurons at `hook_post` and measure the change of next-token predictions.

    **Arguments**
    - `lm`: the model; hooks are scoped to each forward pass, so the model is unchanged afterwards.
    - `neurons`: `(layer, neuron)` pairs, `{layer: [neurons]}` or a table with `layer, neuron` columns.
    - `token_set`: held-out tokens; counted predictions follow the module docstring.
    - `config`: kind / value / bootstrap settings (controls are `ablation_study`'s business).
    - `means`: `Float[ndarray, "layer d_mlp"]` for kind='mean'; else read from `store` (of this token
      set) or streamed over `token_set`.
    - `per_token`: also return per-token values (small token sets); `per_token_path`: write them to HDF5.

    **Returns** `AblationMetrics`.
    """
    _check_tokens(lm, token_set)
    s = neuron_set(neurons, lm)
    batch_rows = _auto_batch_rows(lm, token_set, config.batch_rows)
    mv = _means_for(lm, token_set, config, means, store, batch_rows)
    _check_means(mv, s)
    sink = None
    if per_token_path is not None:
        sink = _FileSink(Path(per_token_path), 1, token_set, ["set"],
                         {"provenance": to_json(_provenance(lm, token_set, config, "given" if means is not None else "computed"))},
                         overwrite, batch_rows)
    elif per_token:
        sink = _MemorySink(1, token_set)
    ok = False
    try:
        sums = _evaluate(lm, token_set, [_hooks_for(s, config.kind, config.value, mv, lm.device)],
                         batch_rows=batch_rows, sink=sink, progress_bar=progress_bar)
        ok = True
    finally:
        if isinstance(sink, _FileSink):
            sink.close(ok)
    boot = _bootstrap_replicates(sums, config)
    pt = None
    if isinstance(sink, _MemorySink):
        pt = {k: (v[0] if v.ndim == 3 else v) for k, v in sink.arrays.items()}
    return AblationMetrics(
        n_neurons=_count(s), **sums.point(0),
        delta_ce_lo=_interval(boot["delta_ce"][:, 0], config.ci)[0], delta_ce_hi=_interval(boot["delta_ce"][:, 0], config.ci)[1],
        kl_lo=_interval(boot["kl"][:, 0], config.ci)[0], kl_hi=_interval(boot["kl"][:, 0], config.ci)[1],
        row_sums={"n": sums.n, "ce_clean": sums.ce_clean, "entropy_clean": sums.entropy_clean,
                  "ce_ablated": sums.ce_ablated[0], "kl": sums.kl[0], "entropy_ablated": sums.entropy_ablated[0]},
        per_token=pt)


# ---------------------------------------------------------------------------- the study


RUN_COLUMNS = ["group", "layer", "set", "draw", "n_neurons", "ce_clean", "ce_ablated", "delta_ce", "kl",
               "delta_entropy", "n_tokens"]
SUMMARY_COLUMNS = ["group", "layer", "n_neurons", "delta_ce", "delta_ce_lo", "delta_ce_hi", "kl", "kl_lo", "kl_hi",
                   "delta_entropy", "control_delta_ce_mean", "control_delta_ce_lo", "control_delta_ce_hi",
                   "control_kl_mean", "ratio_delta_ce", "p_value", "n_controls", "n_tokens"]


@dataclass
class AblationResult:
    """Universal set(s) against controls.

    **Fields**
    - `runs`: one row per ablated set (`RUN_COLUMNS`): `group` ("all layers" / "layer l"), `layer`
      (-1 = all), `set` ("universal" / "control"), `draw` (control index, -1 for the universal set), ...
    - `summary`: one row per group (`SUMMARY_COLUMNS`): the universal set with bootstrap intervals,
      the control mean with intervals over rows and draws, `ratio_delta_ce` (universal / control
      mean; NaN unless the control mean is > 0), `p_value` = (1 + #controls with delta_ce >= universal)
      / (1 + n_controls).
    - `sets`: the neurons of every run, `[{layer: [neurons]}]` in `runs` order.
    - `row_sums`: per-row sums (`n, ce_clean, entropy_clean [row]`; `ce_ablated, kl, entropy_ablated
      [set, row]`); `provenance`: model, checkpoint, token set, config, seeds, means source.
    """

    runs: pd.DataFrame
    summary: pd.DataFrame
    sets: list[dict[int, list[int]]]
    row_sums: dict[str, np.ndarray]
    provenance: dict[str, Any]

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write `ablation_runs.csv`, `ablation_summary.csv`, `ablation.json`, `ablation_rows.h5` into `out_dir`."""
        import h5py

        out = self.check_out_dir(out_dir, overwrite=overwrite)
        out.mkdir(parents=True, exist_ok=True)
        self.runs.to_csv(out / "ablation_runs.csv", index=False)
        self.summary.to_csv(out / "ablation_summary.csv", index=False)
        meta = {"provenance": self.provenance, "sets": self.sets}
        (out / "ablation.json").write_text(json.dumps(from_json(to_json(meta)), indent=1))
        with h5py.File(out / "ablation_rows.h5", "w") as f:
            for k, v in self.row_sums.items():
                f.create_dataset(k, data=v)
            f.attrs["provenance"] = to_json(self.provenance)
            f.attrs["note"] = "sums over counted predictions per token row; [set, row] in ablation_runs.csv order"
        return out

    @staticmethod
    def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Refuse (before any work) a directory that already holds ablation results, unless `overwrite`."""
        out = Path(out_dir)
        existing = [f for f in _FILES if (out / f).exists()]
        if existing and not overwrite:
            raise UniversalNeuronsError(f"{out} already holds ablation results ({', '.join(existing)}); pass "
                                        "overwrite=True (--overwrite) or choose another directory")
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "AblationResult":
        """Read what `save` wrote."""
        import h5py

        out = Path(out_dir)
        missing = [f for f in _FILES if not (out / f).exists()]
        if missing:
            raise UniversalNeuronsError(f"{out} holds no complete ablation result (missing {', '.join(missing)}); "
                                        "run ablation_study(...).save(dir) or `universal-neurons ablate`")
        meta = json.loads((out / "ablation.json").read_text())
        with h5py.File(out / "ablation_rows.h5", "r") as f:
            rows = {k: f[k][()] for k in f}
        sets = [{int(l): list(v) for l, v in s.items()} for s in meta["sets"]]
        return cls(runs=pd.read_csv(out / "ablation_runs.csv"), summary=pd.read_csv(out / "ablation_summary.csv"),
                   sets=sets, row_sums=rows, provenance=meta["provenance"])


def _provenance(lm: LoadedModel, ts: TokenSet, config: AblationConfig, means_source: str) -> dict[str, Any]:
    return {**provenance_base("ablation"), "model": lm.provenance, "checkpoint": lm.provenance.get("checkpoint"),
            "token_set": {"hash": ts.hash, "n_rows": ts.n_rows, "ctx_len": ts.ctx_len, "config": ts.config.to_dict(),
                          "source": ts.source},
            "config": config.to_dict(), "kind": config.kind, "seeds": {"controls": config.seed, "bootstrap": config.seed},
            "means": means_source, "hook": "blocks.{layer}.mlp.hook_post",
            "counted": "prediction at pos (of token pos+1) counted iff mask[pos] and mask[pos+1]",
            "bootstrap_unit": "token row"}


def ablation_study(lm: LoadedModel, table_or_neurons, token_set: TokenSet, config: AblationConfig = AblationConfig(), *,
                   store: ActivationStore | str | os.PathLike | None = None, means: np.ndarray | None = None,
                   per_token_path: str | os.PathLike | None = None, overwrite: bool = False,
                   progress_bar: bool | None = None) -> AblationResult:
    """Ablate the universal set (all layers, then each layer alone) against matched random controls.

    **Arguments**
    - `lm`: the reference model.
    - `table_or_neurons`: a universality table (the set = `is_universal`; universal and, by default,
      dead neurons never enter controls; it must cover every neuron of `lm`), or your own list of
      `(layer, neuron)` / `{layer: [neurons]}` / a table without `is_universal` (every row is in the set).
    - `token_set`: held-out tokens (see the module docstring for what is counted).
    - `store`: activation store of `lm` on `token_set`, to read means from (kind='mean'); `means`:
      `Float[ndarray, "layer d_mlp"]` given directly (e.g. from another token set); neither: streamed.
    - `per_token_path`: also write per-token values of every set to this HDF5 file.

    **Returns** `AblationResult`.
    """
    _check_tokens(lm, token_set)
    labels, sets, meta = _study_sets(lm, table_or_neurons, config)
    batch_rows = _auto_batch_rows(lm, token_set, config.batch_rows)
    if store is not None and config.kind == "mean":
        with _opened(store) as st:
            if (st.n_layers, st.d_mlp) != (lm.n_layers, lm.d_mlp):
                raise UniversalNeuronsError(f"the store {st.path} holds a model with {st.n_layers} layers x {st.d_mlp} "
                                            f"neurons, {lm.name} has {lm.n_layers} x {lm.d_mlp}; pass that model's store")
            if st.model.get("resolved") != lm.provenance.get("resolved") or st.model.get("checkpoint") != lm.provenance.get("checkpoint"):
                log.warning("the store %s was cached from %s (checkpoint %s), not %s (checkpoint %s)", st.path,
                            st.model.get("name"), st.model.get("checkpoint"), lm.name, lm.provenance.get("checkpoint"))
            mv = _means_for(lm, token_set, config, None, st, batch_rows)
        means_source = f"store {Path(st.path).resolve()}"
    else:
        mv, means_source = _study_means(lm, token_set, config, means, batch_rows)
    for s in sets:
        _check_means(mv, s)
    prov = _provenance(lm, token_set, config, means_source)
    sink = None
    if per_token_path is not None:
        sink = _FileSink(Path(per_token_path), len(sets), token_set, labels, {"provenance": to_json(prov)}, overwrite,
                         batch_rows)
    log.info("ablating %d sets (%d groups x (1 + %d controls)) over %d rows", len(sets), len(sets) // (1 + config.n_controls),
             config.n_controls, token_set.n_rows)
    ok = False
    try:
        sums = _evaluate_sets(lm, token_set, sets, config, mv, batch_rows=batch_rows, sink=sink,
                              progress_bar=progress_bar)
        ok = True
    finally:
        if sink is not None:
            sink.close(ok)
    return _study_result(sums, sets, meta, config, prov)


def _study_sets(lm: LoadedModel, table_or_neurons,
                config: AblationConfig) -> tuple[list[str], list[Neurons], list[tuple[str, int, str, int]]]:
    """Every set of the study, in `runs` order: per group the universal set, then its seeded controls.

    **Returns** `(labels, sets, meta)`, `meta[i] = (group, layer, 'universal' | 'control', draw)`.
    """
    universal, pool = _split_table(table_or_neurons, lm, config.controls_exclude_dead)
    if not universal:
        raise UniversalNeuronsError("the neuron set is empty (no neuron is flagged universal); nothing to ablate. "
                                    "Lower the universality threshold or pass your own list of (layer, neuron)")
    groups: list[tuple[str, int, Neurons]] = [("all layers", -1, universal)]
    if config.per_layer:  # also when one layer holds them all: tables then look alike across models
        groups += [(f"layer {l}", l, {l: idx}) for l, idx in universal.items()]
    labels, sets, meta = [], [], []
    for name, layer, s in groups:
        labels.append(f"{name}/universal")
        sets.append(s)
        meta.append((name, layer, "universal", -1))
        for k, c in enumerate(control_sets(s, pool, d_mlp=lm.d_mlp, n_controls=config.n_controls, seed=config.seed,
                                           group=layer)):
            labels.append(f"{name}/control {k}")
            sets.append(c)
            meta.append((name, layer, "control", k))
    return labels, sets, meta


def _study_means(lm: LoadedModel, token_set: TokenSet, config: AblationConfig, means: np.ndarray | None,
                 batch_rows: int) -> tuple[np.ndarray | None, str | None]:
    """Means for kind='mean' (given, else streamed over `token_set`) and where they came from."""
    mv = _means_for(lm, token_set, config, means, None, batch_rows)
    source = None if mv is None else ("given" if means is not None else f"streamed over token set {token_set.hash[:12]}")
    return mv, source


def _evaluate_sets(lm: LoadedModel, ts: TokenSet, sets: Sequence[Neurons], config: AblationConfig,
                   means: np.ndarray | None, *, batch_rows: int, sink=None, progress_bar: bool | None = None,
                   require_counted: bool = True) -> _RowSums:
    """Per-row sums `[set, row]` of ablating each of `sets` on the rows of `ts` (a whole set or a row shard)."""
    return _evaluate(lm, ts, [_hooks_for(s, config.kind, config.value, means, lm.device) for s in sets],
                     batch_rows=batch_rows, sink=sink, desc="ablation study", progress_bar=progress_bar,
                     require_counted=require_counted)


def _study_result(sums: _RowSums, sets: Sequence[Neurons], meta: Sequence[tuple[str, int, str, int]],
                  config: AblationConfig, prov: dict[str, Any]) -> AblationResult:
    """Runs, summary (bootstrap over rows) and the saved row sums, from the per-row sums of every set."""
    runs = pd.DataFrame([{"group": g, "layer": l, "set": kind, "draw": d, "n_neurons": _count(s), **sums.point(i)}
                         for i, ((g, l, kind, d), s) in enumerate(zip(meta, sets))], columns=RUN_COLUMNS)
    summary = _summarise(runs, sums, config)
    row_sums = {"n": sums.n, "ce_clean": sums.ce_clean, "entropy_clean": sums.entropy_clean,
                "ce_ablated": sums.ce_ablated, "kl": sums.kl, "entropy_ablated": sums.entropy_ablated}
    plain = [{int(l): [int(i) for i in v] for l, v in s.items()} for s in sets]
    return AblationResult(runs=runs, summary=summary, sets=plain, row_sums=row_sums, provenance=prov)


class _opened:
    """An ActivationStore (opened here from a path, closed on exit) or the caller's open one."""

    def __init__(self, store) -> None:
        self.owned = not isinstance(store, ActivationStore)
        self.store = ActivationStore.open(store) if self.owned else store

    def __enter__(self) -> ActivationStore:
        return self.store

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.store.close()


def _summarise(runs: pd.DataFrame, sums: _RowSums, config: AblationConfig) -> pd.DataFrame:
    boot = _bootstrap_replicates(sums, config)
    rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 0, 2**31 - 2]))
    rows = []
    for (group, layer), g in runs.groupby(["group", "layer"], sort=False):
        u = int(g.index[g["set"] == "universal"][0])
        ctrl = g.index[g["set"] == "control"].to_numpy()
        ur = runs.loc[u]
        row = {"group": group, "layer": int(layer), "n_neurons": int(ur.n_neurons), "delta_ce": ur.delta_ce,
               "kl": ur.kl, "delta_entropy": ur.delta_entropy, "n_controls": len(ctrl), "n_tokens": int(ur.n_tokens)}
        row["delta_ce_lo"], row["delta_ce_hi"] = _interval(boot["delta_ce"][:, u], config.ci)
        row["kl_lo"], row["kl_hi"] = _interval(boot["kl"][:, u], config.ci)
        if len(ctrl):
            c_dce = runs.loc[ctrl, "delta_ce"].to_numpy()
            pick = ctrl[rng.integers(0, len(ctrl), size=(config.n_bootstrap, len(ctrl)))]  # [replicate, draw]
            c_boot = np.take_along_axis(boot["delta_ce"], pick, axis=1).mean(1)
            row["control_delta_ce_mean"] = float(c_dce.mean())
            row["control_delta_ce_lo"], row["control_delta_ce_hi"] = _interval(c_boot, config.ci)
            row["control_kl_mean"] = float(runs.loc[ctrl, "kl"].mean())
            # a ratio means "times as harmful as random" only when random ablation does harm
            row["ratio_delta_ce"] = (ur.delta_ce / row["control_delta_ce_mean"] if row["control_delta_ce_mean"] > 0
                                     else np.nan)
            row["p_value"] = (1 + int((c_dce >= ur.delta_ce).sum())) / (1 + len(ctrl))
        else:
            row.update({k: np.nan for k in ("control_delta_ce_mean", "control_delta_ce_lo", "control_delta_ce_hi",
                                             "control_kl_mean", "ratio_delta_ce", "p_value")})
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# ---------------------------------------------------------------------------- pipeline stage


def ablation_stage(config: AblationConfig = AblationConfig(), *, eval_tokens: TokenSet | None = None,
                   subdir: str = "ablation", overwrite: bool = False,
                   device: str | None = None) -> Callable[[Any], dict[str, Any]]:
    """A stage for `run_pipeline(extra_stages=[...])`: the ablation study of the reference model (`a`).

    The model is reloaded exactly as the pipeline loaded it. It is evaluated on `eval_tokens`
    (held-out; default the pipeline's token set). Means (kind='mean') come from the pipeline's
    store of `a` when cached, else are streamed over the pipeline's token set, so they are never
    estimated on the held-out tokens they are evaluated on unless no held-out set is given.

    Writes `out_dir/<subdir>/` (`ablation_runs.csv`, `ablation_summary.csv`, `ablation.json`,
    `ablation_rows.h5`). An existing result from the same model, tokens and config is reused; one
    from other inputs is refused unless `overwrite=True`.

    **Returns** `stage(result: PipelineResult) -> {"ablation": {dir, groups: [headline numbers]}}`.
    """

    def stage(result) -> dict[str, Any]:
        from universal_neurons.activations import load_model

        prov = result.model_provenance[0]
        ts = eval_tokens if eval_tokens is not None else result.token_set
        out = Path(result.out_dir) / subdir
        if (out / "ablation.json").exists() and not overwrite:
            old = AblationResult.load(out)
            p = old.provenance
            if (p["token_set"]["hash"] == ts.hash and p["config"] == json.loads(to_json(config.to_dict()))
                    and p["model"].get("resolved") == prov["resolved"] and p["checkpoint"] == prov["checkpoint"]):
                log.info("reusing %s", out)
                return {"ablation": _headline(old, out)}
            raise UniversalNeuronsError(f"{out} holds an ablation study of other inputs; pass overwrite=True "
                                        "(--overwrite) or use a new output directory")
        local = prov["source"] != "hub"  # a local `resolved` is the checkpoint directory itself
        lm = load_model(prov["resolved"], checkpoint=None if local else prov["checkpoint"], device=device,
                        dtype=prov.get("dtype", "float32"), process_weights=bool(prov["weight_processing"]["fold_ln"]))
        if local:
            lm.provenance.update(checkpoint=prov["checkpoint"], name=prov["name"])
        if not result.table["is_universal"].any():  # not an error of the run: report it, keep the summary
            log.warning("no universal neurons in the reference model; the ablation stage is skipped")
            return {"ablation": {"dir": None, "kind": config.kind, "skipped": "no universal neurons", "groups": []}}
        means = None
        if config.kind == "mean":
            store_path = Path(result.out_dir) / "stores" / f"{result.labels[0]}.h5"
            means = (neuron_means(store_path, result.token_set) if store_path.exists()
                     else neuron_means(lm, result.token_set, batch_rows=min(64, config.batch_rows or 16)))
        res = ablation_study(lm, result.table, ts, config, means=means)
        res.provenance["means"] = f"pipeline token set {result.token_set.hash[:12]}" if means is not None else None
        res.save(out, overwrite=overwrite)
        return {"ablation": _headline(res, out)}

    return stage


def _headline(res: AblationResult, out: Path) -> dict[str, Any]:
    keep = ["group", "n_neurons", "delta_ce", "delta_ce_lo", "delta_ce_hi", "control_delta_ce_mean",
            "ratio_delta_ce", "p_value"]
    return {"dir": str(out), "kind": res.provenance["kind"],
            "groups": [{k: _plain(v) for k, v in r.items()} for r in res.summary[keep].to_dict("records")]}


def _plain(v):
    """A JSON value for the summary: numpy scalars unwrapped, NaN (undefined) as None."""
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and v != v else v
