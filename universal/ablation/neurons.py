"""Which neurons are ablated: sets checked against a model, and the seeded random control sets
they are compared with."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from universal_neurons.activations import LoadedModel
from universal_neurons.errors import IncompatibleInputsError, InputError

__all__ = ["Neurons", "neuron_set", "control_sets", "count", "flat", "split_table"]

Neurons = dict[int, np.ndarray]  # layer -> sorted unique neuron indices (int64)


def _pairs_of(neurons) -> np.ndarray:
    """`[n, 2]` int64 (layer, neuron) pairs from a table, an array or pairs."""
    if isinstance(neurons, pd.DataFrame):
        missing = {"layer", "neuron"} - set(neurons.columns)
        if missing:
            raise InputError(f"the neuron table has no column(s) {sorted(missing)}; it needs 'layer' and "
                             f"'neuron' (it has {list(neurons.columns)[:12]})")
        return neurons[["layer", "neuron"]].to_numpy(dtype=np.int64).reshape(-1, 2)
    if isinstance(neurons, Mapping):
        return np.array([(int(layer), int(i)) for layer, idx in neurons.items() for i in np.ravel(idx)],
                        dtype=np.int64).reshape(-1, 2)
    arr = np.asarray(list(neurons) if not isinstance(neurons, np.ndarray) else neurons)
    if arr.size == 0:
        return np.zeros((0, 2), np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"neurons must be (layer, neuron) integer pairs, a {{layer: [neurons]}} dict or "
                         f"a table with 'layer' and 'neuron' columns; got an array of shape {arr.shape} "
                         f"and dtype {arr.dtype}")
    return arr.astype(np.int64)


def neuron_set(neurons, lm: LoadedModel) -> Neurons:
    """Check a set of neurons against a model and group it by layer.

    Args:
        neurons: `(layer, neuron)` pairs, `{layer: [neuron, ...]}`, or a DataFrame with `layer` and
            `neuron` columns (every row is in the set). Duplicates are dropped.
        lm: the model the neurons belong to.

    Returns:
        `{layer: Int[ndarray, "k"]}` sorted unique indices; layers without neurons are absent.

    Raises:
        InputError: the neurons are not given in one of the forms above.
        IncompatibleInputsError: a layer or neuron index the model does not have.
    """
    pairs = _pairs_of(neurons)
    bad_l = sorted({int(layer) for layer in pairs[:, 0] if not 0 <= layer < lm.n_layers})
    if bad_l:
        raise IncompatibleInputsError(f"layer(s) {bad_l} do not exist in {lm.name}, which has layers "
                                      f"0..{lm.n_layers - 1}; the neuron list was made for another model")
    bad_n = sorted({int(i) for i in pairs[:, 1] if not 0 <= i < lm.d_mlp})
    if bad_n:
        raise IncompatibleInputsError(
            f"neuron index(es) {bad_n[:5]}{' ...' if len(bad_n) > 5 else ''} do not exist in {lm.name}, whose "
            f"layers have d_mlp={lm.d_mlp} neurons (0..{lm.d_mlp - 1}); the neuron list was made for a model of "
            "another shape")
    return {layer: np.unique(pairs[pairs[:, 0] == layer, 1]) for layer in sorted({int(x) for x in pairs[:, 0]})}


def count(s: Neurons) -> int:
    """Number of neurons in a set."""
    return int(sum(len(v) for v in s.values()))


def flat(s: Neurons, d_mlp: int) -> np.ndarray:
    """`Int[ndarray, "k"]`: the set's neurons as flat indices `layer * d_mlp + neuron`."""
    return np.concatenate([layer * d_mlp + v for layer, v in s.items()]) if s else np.zeros(0, np.int64)


def split_table(table_or_neurons, lm: LoadedModel, exclude_dead: bool) -> tuple[Neurons, np.ndarray]:
    """The set to ablate and the pool its controls are drawn from.

    Args:
        table_or_neurons: a universality table (the set = its `is_universal` rows; universal
            and, with `exclude_dead`, dead neurons leave the pool), or any form `neuron_set` takes.
        lm: the model the neurons belong to.
        exclude_dead: keep the table's `dead` neurons out of the pool.

    Returns:
        `(set, pool)`, `pool` a `Bool[ndarray, "layer*d_mlp"]` (True = may be drawn).

    Raises:
        IncompatibleInputsError: a table of several reference models, or of a model of another shape.
    """
    n_all = lm.n_layers * lm.d_mlp
    pool = np.ones(n_all, bool)
    if isinstance(table_or_neurons, pd.DataFrame) and "is_universal" in table_or_neurons.columns:
        t = table_or_neurons
        if "reference" in t.columns and t["reference"].nunique() > 1:
            raise IncompatibleInputsError("the table holds several reference models (all-pairs mode); select one, "
                                          "e.g. table[table.reference == 'a']")
        if len(t) != n_all:
            raise IncompatibleInputsError(
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
    pool[flat(universal, lm.d_mlp)] = False
    return universal, pool


def control_sets(neurons: Neurons, pool: np.ndarray, *, d_mlp: int, n_controls: int, seed: int) -> list[Neurons]:
    """Seeded random sets with the same number of neurons per layer as `neurons`, drawn from `pool`.

    Args:
        neurons: `{layer: indices}` (see `neuron_set`).
        pool: `Bool[ndarray, "layer*d_mlp"]`, True = may be drawn (callers exclude the set itself,
            universal and dead neurons).
        d_mlp: neurons per layer.
        n_controls: how many sets.
        seed: draw k takes layer l's neurons with `default_rng(SeedSequence([seed, l + 1, k]))`, so
            the draws repeat, and a one-layer group's draw k is the all-layers group's draw k
            restricted to that layer (a set in one layer is then evaluated once for both).

    Returns:
        A list of `{layer: sorted indices}`, each disjoint from `neurons` when the pool is.

    Raises:
        InputError: a layer has fewer candidates in the pool than neurons to match.
    """
    for layer, idx in neurons.items():
        cand = np.flatnonzero(pool[layer * d_mlp:(layer + 1) * d_mlp])
        if len(cand) < len(idx):
            raise InputError(
                f"layer {layer} has {len(idx)} neurons to ablate but only {len(cand)} candidates for a control "
                "set (not ablated, not universal, not dead); ablate fewer neurons of that layer, or keep dead "
                "neurons in the pool with AblationConfig(controls_exclude_dead=False)")
    out = []
    for k in range(n_controls):
        draw: Neurons = {}
        for layer, idx in neurons.items():
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(layer) + 1, k]))
            cand = np.flatnonzero(pool[layer * d_mlp:(layer + 1) * d_mlp])
            draw[layer] = np.sort(rng.choice(cand, size=len(idx), replace=False))
        out.append(draw)
    return out
