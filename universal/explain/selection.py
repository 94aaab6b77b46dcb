"""Which neurons are explained: groups of one reference neuron and its partner in each other
seed, read off the universality table (docs/explanations.md).

By default every universal neuron of the reference is a group, and a seeded sample of
non-universal (and not dead) reference neurons with their partners is added for contrast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from universal_neurons.errors import InputError

from .config import ExplainConfig
from .source import Unit

__all__ = ["NeuronGroup", "table_labels", "group_of", "default_groups", "units_of"]


@dataclass(frozen=True)
class NeuronGroup:
    """A reference neuron and its partners, explained side by side.

    Attributes:
        layer, neuron: the reference neuron.
        role: `universal`, `contrast` (sampled non-universal) or `chosen` (asked for by name).
        members: the reference unit first, then the partner in each other model (label order);
            a model without a partner (a dead neuron) is left out.
        max_corr: label -> correlation of the partner with the reference neuron.
        excess_corr: the reference neuron's excess correlation (NaN when unknown).
    """

    layer: int
    neuron: int
    role: str
    members: tuple[Unit, ...]
    max_corr: dict[str, float] = field(default_factory=dict)
    excess_corr: float = float("nan")

    @property
    def reference(self) -> Unit:
        return self.members[0]

    def member(self, label: str) -> Unit | None:
        """The group's neuron in model `label`, or None."""
        return next((u for u in self.members if u.label == label), None)


def table_labels(table: pd.DataFrame, reference: str | None = None) -> list[str]:
    """The family's labels, reference first, from the table's `partner_layer_<m>` columns.

    Args:
        table: a universality table.
        reference: the reference's label (default `table.attrs['reference']`, else 'a').
    """
    ref = reference or table.attrs.get("reference") or "a"
    others = [c[len("partner_layer_"):] for c in table.columns if c.startswith("partner_layer_")]
    if not others:
        raise InputError("the universality table has no partner_layer_<m> columns; it must come from "
                         "`universal-neurons flag` / the pipeline")
    return [ref, *others]


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def group_of(table: pd.DataFrame, layer: int, neuron: int, *, labels: Sequence[str], role: str | None = None
             ) -> NeuronGroup:
    """The group of reference neuron `layer.neuron`.

    Raises:
        InputError: the table has no such neuron.
    """
    hit = table[(table["layer"] == int(layer)) & (table["neuron"] == int(neuron))]
    if hit.empty:
        raise InputError(f"the universality table has no reference neuron {layer}.{neuron} (layers "
                         f"{sorted(set(table['layer']))}, neurons 0..{int(table['neuron'].max())})")
    row = hit.iloc[0]
    members, corr = [Unit(labels[0], int(layer), int(neuron))], {}
    for lab in labels[1:]:
        pl, pn = _finite(row.get(f"partner_layer_{lab}")), _finite(row.get(f"partner_neuron_{lab}"))
        if np.isfinite(pl) and np.isfinite(pn) and pl >= 0 and pn >= 0:
            members.append(Unit(lab, int(pl), int(pn)))
            corr[lab] = _finite(row.get(f"max_corr_{lab}"))
    if role is None:
        role = "universal" if bool(row.get("is_universal", False)) else "chosen"
    return NeuronGroup(int(layer), int(neuron), role, tuple(members), corr, _finite(row.get("excess_corr")))


def default_groups(table: pd.DataFrame, labels: Sequence[str], config: ExplainConfig) -> list[NeuronGroup]:
    """Every universal reference neuron, then `config.n_contrast` non-universal, live ones drawn
    with `config.seed` (sorted by layer, neuron), each with its partners."""
    universal = table[table["is_universal"].astype(bool)]
    groups = [group_of(table, r.layer, r.neuron, labels=labels, role="universal") for r in universal.itertuples()]
    dead = table["dead"].astype(bool) if "dead" in table else pd.Series(False, index=table.index)
    pool = table[~table["is_universal"].astype(bool) & ~dead]
    n = min(config.n_contrast, len(pool))
    if n:
        pick = np.sort(np.random.default_rng(config.seed).choice(len(pool), size=n, replace=False))
        for r in pool.iloc[pick].itertuples():
            groups.append(group_of(table, r.layer, r.neuron, labels=labels, role="contrast"))
    return groups


def units_of(groups: Sequence[NeuronGroup]) -> tuple[list[Unit], list[int]]:
    """The distinct neurons of the groups, in first-seen order, and each one's group (the first
    group it belongs to: its partners there are the ones shown beside it)."""
    units: list[Unit] = []
    home: list[int] = []
    seen: dict[Unit, int] = {}
    for g, group in enumerate(groups):
        for u in group.members:
            if u not in seen:
                seen[u] = len(units)
                units.append(u)
                home.append(g)
    return units, home
