"""Stage: neuron properties (METHOD.md §7), one row per neuron of a model, joinable with the
universality table on `layer, neuron`.

Columns of a properties table:

    layer, neuron
    w_in_norm, input_bias, w_out_norm, in_out_sim, l2_penalty        weights
    vocab_mean, vocab_var, vocab_skew, vocab_kurt                    cos(w_out_i, W_U[:, v]) over the vocabulary
    pre_mean, pre_var, pre_skew, pre_kurt, activation_frequency      hook_pre over the masked-in tokens
    post_mean, post_var, post_skew, post_kurt                        hook_post over the same tokens
    is_prediction, is_suppression, is_partition, is_entropy, family  families from weights alone

Moment conventions (all exact, float64): `*_var` is the population variance (divide by n),
`*_skew` = scipy.stats.skew(bias=True), `*_kurt` = scipy.stats.kurtosis(fisher=True, bias=True),
i.e. *excess* kurtosis (a Gaussian has 0). A neuron whose variance is zero has NaN skew and kurt.
`activation_frequency` is the fraction of masked-in tokens with pre-activation > 0.
Activation moments are streamed over token batches with the pairwise update of Pébay (2008) /
Terriberry for the central sums M2, M3, M4, so they are exact up to float64 rounding and never
hold all activations in memory (the paper used histograms clipped to [-10, 15]).

Weight statistics depend on the weight processing on load (fold LN, centre writing weights,
centre unembedding); it is recorded in the provenance (`df.attrs['provenance']`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from universal_neurons.activations import ActivationStore, LoadedModel, TokenSet, hook_name, load_model, mlp_activations, mlp_weights
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import from_json, progress, provenance_base, to_json

__all__ = [
    "PropertiesConfig",
    "StreamingMoments",
    "WEIGHT_COLUMNS",
    "VOCAB_COLUMNS",
    "ACTIVATION_COLUMNS",
    "FAMILIES",
    "weight_properties",
    "activation_moments",
    "classify_families",
    "neuron_properties",
    "join_universality",
    "compare_universal",
    "save_properties",
    "load_properties",
    "properties_stage",
]

log = logging.getLogger("universal_neurons")

WEIGHT_COLUMNS = ["w_in_norm", "input_bias", "w_out_norm", "in_out_sim", "l2_penalty"]
VOCAB_COLUMNS = ["vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"]
ACTIVATION_COLUMNS = ["pre_mean", "pre_var", "pre_skew", "pre_kurt", "activation_frequency",
                      "post_mean", "post_var", "post_skew", "post_kurt"]
FAMILIES = ("prediction", "suppression", "partition", "entropy", "other")  # precedence order of `family`


@dataclass(frozen=True)
class PropertiesConfig:
    """Thresholds of the weight-based families and how moments are computed; stored in provenance."""

    prediction_kurtosis: float = 10.0  # paper: vocab_kurt > 10 (positive skew: prediction, negative: suppression)
    partition_quantile: float = 0.95  # partition: vocab_var above this quantile over all neurons (top 5%)
    entropy_layers: int = 1  # entropy candidates live in the last this-many layers
    entropy_l2_quantile: float = 0.9  # ... with l2_penalty above this quantile of those layers
    entropy_vocab_var_quantile: float = 0.25  # ... and vocab_var below this quantile of those layers
    vocab_dtype: str = "float32"  # cos GEMM precision: float32 is ~1e-7 off float64 and 2-4x faster on CPU
    vocab_chunk: int = 256  # neurons per cos block: [chunk, d_vocab] at a time (GPT-2: 51 MB in float32)
    batch_rows: int = 32  # token rows per forward pass / store read for activation moments
    device: str | None = None  # where the cos GEMM runs (None = CUDA when present)

    def __post_init__(self) -> None:
        for k in ("partition_quantile", "entropy_l2_quantile", "entropy_vocab_var_quantile"):
            if not 0.0 <= float(getattr(self, k)) <= 1.0:
                raise UniversalNeuronsError(f"PropertiesConfig.{k} must be a quantile in [0, 1], got {getattr(self, k)}")
        for k in ("entropy_layers", "vocab_chunk", "batch_rows"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise UniversalNeuronsError(f"PropertiesConfig.{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.vocab_dtype not in ("float32", "float64"):
            raise UniversalNeuronsError(f"PropertiesConfig.vocab_dtype must be 'float32' or 'float64', got {self.vocab_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- streaming moments


class StreamingMoments:
    """Exact mean, variance, skew and excess kurtosis per column, merged batch by batch.

    Each batch's central sums are computed two-pass in float64, then merged into the running
    ones with Pébay's pairwise formulas (no large-mean cancellation, unlike raw power sums).

    **Arguments:** `n_columns`: number of neurons (columns of every batch).
    """

    def __init__(self, n_columns: int) -> None:
        z = lambda: torch.zeros(n_columns, dtype=torch.float64)  # noqa: E731
        self.n = 0
        self.mean, self.m2, self.m3, self.m4 = z(), z(), z(), z()
        self.positive = torch.zeros(n_columns, dtype=torch.int64)

    def update(self, x: torch.Tensor | np.ndarray) -> None:
        """Add a batch `x: Float[Tensor, "token neuron"]` (already masked): its own moments, merged in."""
        x = torch.as_tensor(x).to(torch.float64)
        if x.shape[0] == 0:
            return
        mb = x.mean(0)
        d = x - mb
        d2 = d * d
        batch = StreamingMoments(x.shape[1])
        batch.n = int(x.shape[0])
        batch.mean, batch.m2, batch.m3, batch.m4 = (t.cpu() for t in (mb, d2.sum(0), (d2 * d).sum(0), (d2 * d2).sum(0)))
        batch.positive = (x > 0).sum(0).to("cpu", torch.int64)
        self.merge(batch)

    def merge(self, other: "StreamingMoments") -> "StreamingMoments":
        """Fold in the moments of other tokens (another batch, or another worker's token shard); in place.

        Pébay (2008) eq. 2.1-2.3 / Chan et al. for the central sums, exact up to float64 rounding,
        so a merge of shard partials equals one pass over all tokens up to merge order.

        **Returns** `self`.
        """
        if other.mean.shape != self.mean.shape:
            raise UniversalNeuronsError(f"cannot merge moments of {other.mean.shape[0]} columns into moments of "
                                        f"{self.mean.shape[0]}; merge partials of the same neurons")
        if other.n == 0:
            return self
        if self.n == 0:  # nothing to combine: copy, so a single partial is returned bit for bit
            self.n, self.positive = other.n, other.positive.clone()
            self.mean, self.m2, self.m3, self.m4 = (t.clone() for t in (other.mean, other.m2, other.m3, other.m4))
            return self
        na, nb = float(self.n), float(other.n)
        n = na + nb
        delta = other.mean - self.mean
        # a = self, b = other
        m4 = (self.m4 + other.m4 + delta ** 4 * na * nb * (na * na - na * nb + nb * nb) / n ** 3
              + 6 * delta ** 2 * (na * na * other.m2 + nb * nb * self.m2) / n ** 2
              + 4 * delta * (na * other.m3 - nb * self.m3) / n)
        m3 = (self.m3 + other.m3 + delta ** 3 * na * nb * (na - nb) / n ** 2
              + 3 * delta * (na * other.m2 - nb * self.m2) / n)
        self.m2 = self.m2 + other.m2 + delta ** 2 * na * nb / n
        self.m3, self.m4 = m3, m4
        self.mean = self.mean + delta * nb / n
        self.n += other.n
        self.positive = self.positive + other.positive
        return self

    def result(self) -> dict[str, np.ndarray]:
        """`{count, mean, var, skew, kurt, frequency}`, each `[neuron]` (count is a scalar).

        var = M2/n; skew = sqrt(n) M3 / M2^1.5; kurt = n M4 / M2^2 - 3; frequency = fraction > 0.
        Zero (or, like scipy, float-rounding-level) variance gives NaN skew and kurt.
        """
        if self.n == 0:
            raise UniversalNeuronsError("no tokens were counted (every position masked out?); moments need at "
                                        "least one masked-in token: use a longer text or a looser mask")
        n = float(self.n)
        mean, m2, m3, m4 = (t.numpy() for t in (self.mean, self.m2, self.m3, self.m4))
        var = m2 / n
        const = var <= (np.finfo(np.float64).resolution * mean) ** 2  # scipy's test for constant data
        with np.errstate(divide="ignore", invalid="ignore"):
            skew = np.where(const, np.nan, np.sqrt(n) * m3 / m2 ** 1.5)
            kurt = np.where(const, np.nan, n * m4 / m2 ** 2 - 3.0)
        return {"count": self.n, "mean": mean.copy(), "var": var, "skew": skew, "kurt": kurt,
                "frequency": self.positive.numpy() / n}


# ---------------------------------------------------------------------------- weights


def _weights_of(weights) -> dict[str, torch.Tensor]:
    w = mlp_weights(weights) if isinstance(weights, LoadedModel) else dict(weights)
    missing = {"W_in", "b_in", "W_out", "W_U"} - set(w)
    if missing:
        raise UniversalNeuronsError(f"weights lack {sorted(missing)}; pass a LoadedModel or the dict of mlp_weights")
    w = {k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).detach().cpu() for k, v in w.items()}
    L, dm, dmlp = w["W_in"].shape
    want = {"b_in": (L, dmlp), "W_out": (L, dmlp, dm), "W_U": (dm, w["W_U"].shape[-1])}
    for k, s in want.items():
        if tuple(w[k].shape) != s:
            raise UniversalNeuronsError(f"{k} has shape {tuple(w[k].shape)}; with W_in [layer, d_model, d_mlp] = "
                                        f"{(L, dm, dmlp)} it must be {s}")
    return w


def weight_properties(weights: LoadedModel | Mapping[str, Any], *,
                      config: PropertiesConfig = PropertiesConfig()) -> pd.DataFrame:
    """Weight and vocabulary-composition properties of every neuron.

    **Arguments**
    - `weights`: a `LoadedModel`, or `{W_in: [layer, d_model, d_mlp], b_in: [layer, d_mlp],
      W_out: [layer, d_mlp, d_model], W_U: [d_model, d_vocab]}` (tensors or arrays).
    - `config`: `vocab_dtype`, `vocab_chunk`, `device` are used here.

    **Returns** DataFrame `[layer*d_mlp rows]`: `layer, neuron`, `WEIGHT_COLUMNS`, `VOCAB_COLUMNS`.
    Vocabulary columns whose unembedding column is all zero are left out of the vocab moments.
    """
    w = _weights_of(weights)
    W_in, b_in, W_out, W_U = (w[k].double() for k in ("W_in", "b_in", "W_out", "W_U"))
    L, _, d = W_in.shape
    w_in = W_in.transpose(1, 2)  # [layer, d_mlp, d_model]
    in_norm, out_norm = w_in.norm(dim=-1), W_out.norm(dim=-1)  # [layer, d_mlp]
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = ((w_in * W_out).sum(-1) / (in_norm * out_norm)).numpy()
    cols: dict[str, Any] = {
        "layer": np.repeat(np.arange(L), d), "neuron": np.tile(np.arange(d), L),
        "w_in_norm": in_norm.numpy().ravel(), "input_bias": b_in.numpy().ravel(),
        "w_out_norm": out_norm.numpy().ravel(), "in_out_sim": sim.ravel(),
        "l2_penalty": (in_norm ** 2 + out_norm ** 2).numpy().ravel(),
    }
    cols.update(_vocab_moments(W_out.reshape(L * d, -1), W_U, config))
    return pd.DataFrame(cols)


def _vocab_moments(W_out: torch.Tensor, W_U: torch.Tensor, config: PropertiesConfig) -> dict[str, np.ndarray]:
    """Moments over the vocabulary of cos(w_out_i, W_U[:, v]); W_out `[neuron, d_model]`."""
    from universal_neurons.activations import pick_device

    dev, dt = pick_device(config.device), getattr(torch, config.vocab_dtype)
    u_norm = W_U.norm(dim=0)
    keep = u_norm > 0
    if not bool(keep.all()):
        log.warning("%d unembedding columns are all zero; left out of the vocab moments", int((~keep).sum()))
    U = (W_U[:, keep] / u_norm[keep]).to(dev, dt)  # [d_model, vocab]
    o_norm = W_out.norm(dim=1, keepdim=True)
    O = (W_out / o_norm).to(dt)  # zero rows -> NaN rows -> NaN moments
    out = {k: np.empty(W_out.shape[0]) for k in VOCAB_COLUMNS}
    for a in range(0, W_out.shape[0], config.vocab_chunk):
        b = min(a + config.vocab_chunk, W_out.shape[0])
        cos = (O[a:b].to(dev) @ U).T  # [vocab, chunk]: a whole "batch" for the moments
        acc = StreamingMoments(b - a)
        acc.update(cos)
        r = acc.result()
        for k, key in zip(VOCAB_COLUMNS, ("mean", "var", "skew", "kurt")):
            out[k][a:b] = r[key]
    return out


# ---------------------------------------------------------------------------- activations


def activation_moments(
    source: LoadedModel | ActivationStore | str | os.PathLike,
    *,
    token_set: TokenSet | None = None,
    kinds: Sequence[str] = ("pre", "post"),
    batch_rows: int = 32,
    progress_bar: bool | None = None,
) -> pd.DataFrame:
    """Exact moments of neuron activations over the masked-in tokens, streamed.

    **Arguments**
    - `source`: an activation store (path or open `ActivationStore`) holding the hooks of `kinds`,
      or a `LoadedModel` run live over `token_set` (both kinds from one forward pass).
    - `token_set`: the rows for a live model; for a store, optional, checked against its hash.
    - `kinds`: `'pre'` gives `pre_mean, pre_var, pre_skew, pre_kurt, activation_frequency`;
      `'post'` gives `post_mean, post_var, post_skew, post_kurt`.
    - `batch_rows`: rows per forward pass / store read.

    **Returns** DataFrame `[layer*d_mlp rows]`: `layer, neuron` and the columns above;
    `df.attrs['moments']` holds `n_tokens`, `token_set_hash` and the source.
    """
    kinds = tuple(kinds)
    if not kinds or set(kinds) - {"pre", "post"}:
        raise UniversalNeuronsError(f"kinds must name 'pre' and/or 'post', got {kinds!r}")
    if isinstance(source, LoadedModel):
        accs, layers, d, info = live_moments(source, token_set, kinds, batch_rows, progress_bar)
    else:
        accs, layers, d, info = _moments_store(source, token_set, kinds, batch_rows, progress_bar)
    return moments_frame(accs, layers, d, kinds, info)


def moments_frame(accs: Mapping[tuple[int, str], StreamingMoments], layers: Sequence[int], d: int,
                   kinds: Sequence[str], info: dict[str, Any]) -> pd.DataFrame:
    """The table `activation_moments` returns, from finished `{(layer, kind): StreamingMoments}`."""
    cols: dict[str, Any] = {"layer": np.repeat(layers, d), "neuron": np.tile(np.arange(d), len(layers))}
    for kind in kinds:
        res = [accs[(l, kind)].result() for l in layers]
        for stat in ("mean", "var", "skew", "kurt"):
            cols[f"{kind}_{stat}"] = np.concatenate([r[stat] for r in res])
        if kind == "pre":
            cols["activation_frequency"] = np.concatenate([r["frequency"] for r in res])
        info["n_tokens"] = int(res[0]["count"])
    df = pd.DataFrame(cols)
    df.attrs["moments"] = info
    return df


def check_live(lm, token_set) -> None:
    if token_set is None:
        raise UniversalNeuronsError("activation moments of a live model need a token_set (the rows to run)")
    if token_set.ctx_len > lm.n_ctx or int(token_set.ids.max()) >= lm.d_vocab:
        raise UniversalNeuronsError(f"the token set (ctx_len {token_set.ctx_len}, max id {int(token_set.ids.max())}) "
                                    f"does not fit {lm.name} (n_ctx {lm.n_ctx}, d_vocab {lm.d_vocab}); build it "
                                    "with this model's tokenizer and ctx_len <= n_ctx")


def live_moments(lm, token_set, kinds, batch_rows, progress_bar):
    check_live(lm, token_set)
    layers, d = list(range(lm.n_layers)), lm.d_mlp
    accs = {(l, k): StreamingMoments(d) for l in layers for k in kinds}
    bar = progress(total=token_set.n_tokens, desc=f"moments {lm.name}", unit="tok", unit_scale=True,
                   enabled=progress_bar)
    try:
        for ids, mask in token_set.batches(batch_rows):
            acts = mlp_activations(lm, torch.from_numpy(ids).long(), kinds=kinds)
            m = torch.from_numpy(mask.reshape(-1)).to(lm.device)
            for (l, k), acc in accs.items():
                acc.update(acts[hook_name(l, k)].reshape(-1, d)[m])
            bar.update(ids.size)
    finally:
        bar.close()
    return accs, layers, d, {"source": "live", "model": lm.provenance, "token_set_hash": token_set.hash}


def _moments_store(source, token_set, kinds, batch_rows, progress_bar):
    own = not isinstance(source, ActivationStore)
    store = ActivationStore.open(source) if own else source
    try:
        for k in kinds:
            missing = [hook_name(l, k) for l in store.layers if hook_name(l, k) not in store]
            if missing:
                raise UniversalNeuronsError(
                    f"{store.path} has no {missing[0]} (it holds {', '.join(store.hooks[:4])}"
                    f"{', ...' if len(store.hooks) > 4 else ''}); {k}-activation moments need it: cache with "
                    f"StoreConfig(kinds=('post', 'pre')) (`universal-neurons cache --pre`) or pass the live model")
        if token_set is not None and token_set.hash != store.token_set_hash:
            raise UniversalNeuronsError(f"{store.path} holds activations of token set {store.token_set_hash[:12]}, "
                                        f"not of the given one ({token_set.hash[:12]})")
        layers, d = list(store.layers), store.d_mlp
        accs = {(l, k): StreamingMoments(d) for l in layers for k in kinds}
        mask = torch.from_numpy(store.mask)
        step = batch_rows * store.ctx_len
        for a in progress(range(0, store.n_tokens, step), desc=f"moments {store.path.name}", enabled=progress_bar):
            b = min(a + step, store.n_tokens)
            m = mask[a:b]
            for (l, k), acc in accs.items():
                acc.update(torch.from_numpy(store[hook_name(l, k)][a:b])[m])
        info = {"source": "store", "store": str(Path(store.path).resolve()), "store_dtype": store.config.dtype,
                "model": store.model, "token_set_hash": store.token_set_hash}
    finally:
        if own:
            store.close()
    return accs, layers, d, info


# ---------------------------------------------------------------------------- families


def classify_families(props: pd.DataFrame, config: PropertiesConfig = PropertiesConfig()) -> pd.DataFrame:
    """Weight-based families (METHOD.md §7) as boolean columns plus one `family` label.

    - prediction: `vocab_kurt > prediction_kurtosis` and `vocab_skew > 0`;
    - suppression: `vocab_kurt > prediction_kurtosis` and `vocab_skew < 0`;
    - partition: `vocab_var` above its `partition_quantile` over all neurons;
    - entropy (candidates): in the last `entropy_layers` layers, `l2_penalty` above its
      `entropy_l2_quantile` and `vocab_var` below its `entropy_vocab_var_quantile` there.
    `family` is the first that applies in the order of `FAMILIES`, else `'other'`.

    **Arguments:** `props` with `layer, l2_penalty, vocab_var, vocab_skew, vocab_kurt`.

    **Returns** a copy of `props` with `is_prediction, is_suppression, is_partition, is_entropy, family`.
    """
    need = {"layer", "l2_penalty", "vocab_var", "vocab_skew", "vocab_kurt"} - set(props.columns)
    if need:
        raise UniversalNeuronsError(f"families need the columns {sorted(need)}; compute weight_properties first")
    df = props.copy()
    kurt, skew, vvar = (df[c].to_numpy(float) for c in ("vocab_kurt", "vocab_skew", "vocab_var"))
    with np.errstate(invalid="ignore"):
        heavy = kurt > config.prediction_kurtosis
        df["is_prediction"] = heavy & (skew > 0)
        df["is_suppression"] = heavy & (skew < 0)
        df["is_partition"] = vvar > np.nanquantile(vvar, config.partition_quantile) if np.isfinite(vvar).any() else False
        last = df["layer"].to_numpy() >= df["layer"].max() - config.entropy_layers + 1
        l2 = df["l2_penalty"].to_numpy(float)
        ent = np.zeros(len(df), bool)
        if last.any() and np.isfinite(vvar[last]).any():
            ent[last] = ((l2[last] > np.nanquantile(l2[last], config.entropy_l2_quantile))
                         & (vvar[last] < np.nanquantile(vvar[last], config.entropy_vocab_var_quantile)))
        df["is_entropy"] = ent
    family = np.full(len(df), "other", dtype=object)
    for name in reversed(FAMILIES[:-1]):  # earlier families win
        family[df[f"is_{name}"].to_numpy(bool)] = name
    df["family"] = family
    return df


# ---------------------------------------------------------------------------- one table


def neuron_properties(
    lm: LoadedModel,
    *,
    token_set: TokenSet | None = None,
    store: ActivationStore | str | os.PathLike | None = None,
    config: PropertiesConfig = PropertiesConfig(),
    model_provenance: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Every property of every neuron of `lm` in one table (see the module docstring for columns).

    **Arguments**
    - `lm`: the model (weights in its loaded processing).
    - `token_set` / `store`: activation moments from a store holding hook_pre and hook_post
      (preferred when given), else live over `token_set`; neither: weight columns only.
    - `model_provenance`: recorded instead of `lm.provenance` (e.g. the run's, with its checkpoint).

    **Returns** DataFrame `[layer*d_mlp rows]`, provenance in `df.attrs['provenance']`.
    """
    df = weight_properties(lm, config=config)
    moments: dict[str, Any] | None = None
    if store is not None or token_set is not None:
        src = store if store is not None else lm
        act = activation_moments(src, token_set=token_set, batch_rows=config.batch_rows)
        if len(act) != len(df) or not (act["layer"].to_numpy() == df["layer"].to_numpy()).all():
            raise UniversalNeuronsError(f"the activations cover {len(act)} neurons (layers "
                                        f"{sorted(set(act['layer']))}) but {lm.name} has {len(df)} "
                                        f"({lm.n_layers} layers x {lm.d_mlp}); cache every layer of this model")
        moments = act.attrs["moments"]
        df = pd.concat([df, act.drop(columns=["layer", "neuron"])], axis=1)
    df = classify_families(df, config)
    prov = model_provenance or lm.provenance
    df.attrs["provenance"] = {
        **provenance_base("neuron_properties"),
        "model": prov, "weight_processing": prov.get("weight_processing"), "config": config.to_dict(),
        "moments": None if moments is None else {k: v for k, v in moments.items() if k != "model"},
        "conventions": "var: population; skew: scipy.stats.skew(bias=True); kurt: scipy.stats.kurtosis("
                       "fisher=True, bias=True) (excess); activation_frequency: fraction of pre > 0",
    }
    return df


def save_properties(df: pd.DataFrame, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a properties (or comparison) table as CSV with its provenance in `<path>.json`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UniversalNeuronsError(f"{path} already exists; pass overwrite=True (--overwrite) or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    Path(str(path) + ".json").write_text(to_json(df.attrs.get("provenance", {})))
    return path


def load_properties(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by `save_properties`; provenance in `df.attrs['provenance']`."""
    path = Path(path)
    if not path.is_file():
        raise UniversalNeuronsError(f"no properties table at {path}; compute one with neuron_properties "
                                    "(`universal-neurons properties`)")
    df = pd.read_csv(path)
    side = Path(str(path) + ".json")
    if side.exists():
        df.attrs["provenance"] = from_json(side.read_text())
    return df


# ---------------------------------------------------------------------------- universal vs other


def join_universality(properties: pd.DataFrame, universality: pd.DataFrame) -> pd.DataFrame:
    """Properties joined with a universality table on `layer, neuron` (one row per neuron).

    Raises `UniversalNeuronsError` when the two tables describe models of different shapes.
    """
    def shape(t):
        return len(t), int(t["layer"].max()) + 1 if len(t) else 0

    for name, t in (("properties", properties), ("universality", universality)):
        if not {"layer", "neuron"} <= set(t.columns):
            raise UniversalNeuronsError(f"the {name} table has no layer/neuron columns")
    if "reference" in universality.columns:
        raise UniversalNeuronsError("this universality table stacks several references (all-pairs); select one "
                                    "with table[table.reference == 'a'] first")
    (np_, lp), (nu, lu) = shape(properties), shape(universality)
    keys_p = set(zip(properties["layer"], properties["neuron"]))
    keys_u = set(zip(universality["layer"], universality["neuron"]))
    if np_ != nu or keys_p != keys_u:
        raise UniversalNeuronsError(
            f"the properties table has {np_} neurons in {lp} layers but the universality table has {nu} in {lu}; "
            "they come from models of different shapes. Compute properties of the reference model of that table")
    uni = universality.drop(columns=[c for c in universality.columns if c in properties.columns
                                     and c not in ("layer", "neuron")])
    return properties.merge(uni, on=["layer", "neuron"], how="left", validate="one_to_one")


def compare_universal(table: pd.DataFrame, props: pd.DataFrame | Sequence[str] | None = None) -> pd.DataFrame:
    """Universal vs other neurons, per property: medians and a Mann-Whitney U test.

    **Arguments**
    - `table`: a table with `is_universal` and the property columns (e.g. `join_universality`'s),
      or a universality table when `props` is a properties DataFrame (joined here).
    - `props`: property names to compare (default: every property column present), or a
      properties DataFrame.

    **Returns** DataFrame, one row per property: `property, n_universal, n_other, median_universal,
    median_other, mean_universal, mean_other, u_statistic, p_value, rank_biserial`. NaN values are
    dropped per property. `u_statistic` is U of the universal group (two-sided test, scipy's
    `mannwhitneyu`); `rank_biserial = 2 U / (n_universal n_other) - 1` in [-1, 1], positive when
    universal neurons tend to have larger values. Statistics are NaN where a group is empty.
    """
    from scipy.stats import mannwhitneyu

    if isinstance(props, pd.DataFrame):
        table, props = join_universality(props, table), None
    if "is_universal" not in table.columns:
        raise UniversalNeuronsError("the table has no is_universal column; pass a universality table and a "
                                    "properties table, or join them with join_universality")
    if props is None:
        props = [c for c in WEIGHT_COLUMNS + VOCAB_COLUMNS + ACTIVATION_COLUMNS if c in table.columns]
    missing = [p for p in props if p not in table.columns]
    if missing:
        raise UniversalNeuronsError(f"no column(s) {missing} in the table; it has {list(table.columns)}")
    uni = table["is_universal"].to_numpy(bool)
    rows = []
    for p in props:
        v = table[p].to_numpy(float)
        x, y = v[uni & np.isfinite(v)], v[~uni & np.isfinite(v)]
        row = {"property": p, "n_universal": len(x), "n_other": len(y),
               "median_universal": np.median(x) if len(x) else np.nan, "median_other": np.median(y) if len(y) else np.nan,
               "mean_universal": x.mean() if len(x) else np.nan, "mean_other": y.mean() if len(y) else np.nan,
               "u_statistic": np.nan, "p_value": np.nan, "rank_biserial": np.nan}
        if len(x) and len(y):
            u, pv = mannwhitneyu(x, y, alternative="two-sided")
            row.update(u_statistic=float(u), p_value=float(pv), rank_biserial=2.0 * float(u) / (len(x) * len(y)) - 1.0)
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- pipeline stage


def _finite(x) -> float | None:
    """JSON-safe number: NaN (an empty group) becomes None."""
    return float(x) if np.isfinite(x) else None


def _load_reference(prov: dict[str, Any], process_weights: bool, device: str | None) -> LoadedModel:
    if prov.get("source") == "local":  # `resolved` already is the checkpoint directory
        return load_model(prov["resolved"], device=device, process_weights=process_weights)
    return load_model(prov["name"], checkpoint=prov.get("checkpoint"), device=device, process_weights=process_weights)


def properties_stage(*, config: PropertiesConfig = PropertiesConfig(), source: str = "auto",
                     overwrite: bool = True) -> Callable[[Any], dict[str, Any]]:
    """A `run_pipeline(extra_stages=[...])` stage: properties of the reference model `a`.

    Weights come from `a` at the run's checkpoint with the run's weight processing. Moments come
    from `out_dir/stores/a.h5` when it holds hook_pre and hook_post (`source='auto'` or
    `'store'`; a float16 store gives float16-rounded moments, recorded in the provenance), else
    from the live model over the run's token set (`'live'`).

    Writes `out_dir/properties.csv` (+ `.json` provenance) and `out_dir/property_comparison.csv`
    (+ `.json`); returns `{"properties": {n_neurons, n_tokens, families, medians, files}}`, where
    `medians[prop] = {universal, other, p_value, rank_biserial}`.
    """
    if source not in ("auto", "store", "live"):
        raise UniversalNeuronsError(f"source must be 'auto', 'store' or 'live', got {source!r}")

    def stage(result) -> dict[str, Any]:
        out = Path(result.out_dir)
        run_cfg = result.summary.get("config", {})
        prov = result.model_provenance[0]
        lm = _load_reference(prov, bool(run_cfg.get("process_weights", True)), run_cfg.get("device"))
        store_path = out / "stores" / f"{result.labels[0]}.h5"
        store = None
        if source != "live" and store_path.exists():
            with ActivationStore.open(store_path) as s:
                has_all = all(hook_name(l, k) in s for l in range(lm.n_layers) for k in ("pre", "post"))
            store = store_path if has_all else None
        if source == "store" and store is None:
            raise UniversalNeuronsError(f"{store_path} is missing or lacks hook_pre; run the pipeline with "
                                        "PipelineConfig(store=StoreConfig(kinds=('post', 'pre'))) or use source='live'")
        props = neuron_properties(lm, token_set=None if store is not None else result.token_set, store=store,
                                  config=config, model_provenance=prov)
        props.attrs["provenance"]["label"] = result.labels[0]
        comp = compare_universal(result.table, props)
        comp.attrs["provenance"] = {**provenance_base("property_comparison"), "properties": "properties.csv",
                                    "threshold": result.table.attrs.get("threshold"),
                                    "test": "scipy.stats.mannwhitneyu two-sided; rank_biserial = 2U/(n1 n2) - 1"}
        save_properties(props, out / "properties.csv", overwrite=overwrite)
        save_properties(comp, out / "property_comparison.csv", overwrite=overwrite)
        med = {r.property: {k: _finite(getattr(r, c)) for k, c in (("universal", "median_universal"),
               ("other", "median_other"), ("p_value", "p_value"), ("rank_biserial", "rank_biserial"))}
               for r in comp.itertuples()}
        moments = props.attrs["provenance"]["moments"] or {}
        return {"properties": {
            "n_neurons": int(len(props)), "n_tokens": moments.get("n_tokens"), "moment_source": moments.get("source"),
            "families": {k: int(v) for k, v in props["family"].value_counts().items()},
            "medians": med,
            "files": {"properties": str(out / "properties.csv"), "comparison": str(out / "property_comparison.csv")},
        }}

    return stage
