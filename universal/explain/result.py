"""What the explanations engine returns: every array of one run in memory, and its tables
(the files `storage.py` writes are these tables and arrays)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

from universal_neurons.activations import LoadedModel
from universal_neurons.runtime import provenance_base

from .config import ExplainConfig, family_cuts
from .features import CLASS_DEFINITIONS, FeatureSet
from .selection import NeuronGroup
from .source import Unit
from .vocabulary import output_tokens

__all__ = ["Explanations", "quantile_column"]


def quantile_column(q: float) -> str:
    """The neurons table's column of quantile q (`q0.5`, `q0.99`)."""
    return f"q{q:g}"


@dataclass
class Explanations:
    """The explanations of a set of neuron groups (see docs/explanations.md for every field).

    Arrays are indexed by *unit* (a distinct neuron of some model, `units[i]`) and by *feature*
    (`features.table` row). `home[i]` is the group a unit is shown in (its first); `examples`
    holds `(unit, kind, rank, token, value)` tuples, `kind` 'top' or `q<quantile>`, in the order
    of `context_ids` `[example, window]` and `context_acts` `[example, model, window]` (the
    activation, on each window token, of the unit's counterpart in each model of `labels`).
    """

    config: ExplainConfig
    groups: list[NeuronGroup]
    units: list[Unit]
    home: np.ndarray
    labels: list[str]
    features: FeatureSet
    feature_counts: np.ndarray
    n_tokens: int
    vr: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eta2: dict[str, np.ndarray]
    quantile_values: np.ndarray
    scores: dict[str, np.ndarray]
    family: list[str]
    family_score: np.ndarray
    best_idx: np.ndarray
    best_vr: np.ndarray
    examples: list[tuple[int, str, int, int, float]]
    context_ids: np.ndarray
    context_acts: np.ndarray
    texts: list[str]
    source: dict[str, Any]
    bits: int
    shards: list[tuple[int, int]]
    blocks: int
    output: dict[str, np.ndarray] | None = None
    extra_provenance: dict[str, Any] = field(default_factory=dict)

    def with_output(self, models: Mapping[str, LoadedModel]) -> "Explanations":
        """Add the output side (top promoted / suppressed tokens) from the models' weights; returns self."""
        self.output = output_tokens(self.units, models, self.config.vocab_tokens)
        self.extra_provenance["output_models"] = {lab: lm.provenance for lab, lm in models.items()}
        return self

    def unit_index(self, unit: Unit) -> int:
        """The row of `unit` (KeyError when it was not explained)."""
        return self.units.index(unit)

    def neurons(self) -> pd.DataFrame:
        """One row per unit: who it is, its group, statistics, quantiles, eta^2, family scores,
        family and best feature."""
        rows = []
        keys = self.features.table["key"].to_numpy()
        names = self.features.table["name"].to_numpy()
        top = {unit: value for unit, kind, rank, _, value in self.examples if kind == "top" and rank == 0}
        for i, u in enumerate(self.units):
            g = self.groups[int(self.home[i])]
            ref = g.reference
            best = int(self.best_idx[i, 0]) if self.best_idx.shape[1] else -1
            rows.append({
                "unit": i, "label": u.label, "layer": u.layer, "neuron": u.neuron, "group": int(self.home[i]),
                "reference_layer": ref.layer, "reference_neuron": ref.neuron, "role": g.role,
                "is_reference": u == ref, "corr_with_reference": 1.0 if u == ref else g.max_corr.get(u.label, np.nan),
                "excess_corr": g.excess_corr, "n_tokens": self.n_tokens, "mean": self.mean[i], "var": self.var[i],
                "max_activation": top.get(i, np.nan),
                **{quantile_column(q): self.quantile_values[i, k] for k, q in enumerate(self.config.quantiles)},
                **{f"eta2_{k}": v[i] for k, v in self.eta2.items()},
                **{f"score_{k}": v[i] for k, v in self.scores.items()},
                "family": self.family[i], "family_score": self.family_score[i],
                "best_feature": keys[best] if best >= 0 else "", "best_feature_name": names[best] if best >= 0 else "",
                "best_vr": self.best_vr[i, 0] if best >= 0 else np.nan,
            })
        return pd.DataFrame(rows)

    def features_frame(self) -> pd.DataFrame:
        """The feature definitions with each feature's count and share of the counted tokens."""
        df = self.features.table.copy()
        df["count"] = self.feature_counts
        df["share"] = self.feature_counts / max(self.n_tokens, 1)
        return df

    def best_features_frame(self) -> pd.DataFrame:
        """Long table: each unit's best features (`rank` 0 = best) with their VR."""
        t = self.features.table
        rows = []
        for i, u in enumerate(self.units):
            for r in range(self.best_idx.shape[1]):
                f = int(self.best_idx[i, r])
                if f < 0:
                    continue
                rows.append({"unit": i, "label": u.label, "layer": u.layer, "neuron": u.neuron, "rank": r,
                             "feature": f, "key": t["key"].iat[f], "name": t["name"].iat[f], "kind": t["kind"].iat[f],
                             "side": t["side"].iat[f], "vr": self.best_vr[i, r]})
        return pd.DataFrame(rows, columns=["unit", "label", "layer", "neuron", "rank", "feature", "key", "name", "kind",
                                           "side", "vr"])

    def examples_frame(self) -> pd.DataFrame:
        """Long table: one row per example, `example` indexing the context arrays."""
        ctx = self._ctx_len()
        rows = [{"example": e, "unit": u, "label": self.units[u].label, "layer": self.units[u].layer,
                 "neuron": self.units[u].neuron, "kind": kind, "rank": rank, "token": token,
                 "row": token // ctx, "pos": token % ctx, "value": value}
                for e, (u, kind, rank, token, value) in enumerate(self.examples)]
        return pd.DataFrame(rows, columns=["example", "unit", "label", "layer", "neuron", "kind", "rank", "token",
                                           "row", "pos", "value"])

    def output_frame(self) -> pd.DataFrame:
        """Long table of the output side (empty without it): direction, rank, token id, its text as a
        JSON string literal (quotes and control characters escaped), cos."""
        rows = []
        if self.output is not None:
            for i, u in enumerate(self.units):
                for d in ("promoted", "suppressed"):
                    for r, (t, c) in enumerate(zip(self.output[f"{d}_ids"][i], self.output[f"{d}_cos"][i])):
                        if t >= 0:
                            rows.append({"unit": i, "label": u.label, "layer": u.layer, "neuron": u.neuron,
                                         "direction": d, "rank": r, "token_id": int(t),
                                         "token": json.dumps(self.texts[t] if t < len(self.texts) else "",
                                                             ensure_ascii=False), "cos": float(c)})
        return pd.DataFrame(rows, columns=["unit", "label", "layer", "neuron", "direction", "rank", "token_id", "token",
                                           "cos"])

    def _ctx_len(self) -> int:
        return int(self.source.get("ctx_len") or self.features.edges[-1])

    def provenance(self) -> dict[str, Any]:
        """What the files record: inputs (stores or models, token set hash), settings, features."""
        return {
            **provenance_base("explanations"),
            "config": self.config.to_dict(), "family_rules": family_cuts(self.config),
            "source": self.source, "token_set_hash": self.source.get("token_set_hash"),
            "labels": self.labels, "n_tokens_counted": self.n_tokens, "key_bits": self.bits,
            "row_shards": self.shards, "blocks": self.blocks,
            "feature_definitions": {"classes": CLASS_DEFINITIONS, "unigram_ids": self.features.unigram_ids.tolist(),
                                    "position_edges": self.features.edges,
                                    "unigrams": f"the {self.config.n_unigrams} most frequent counted ids "
                                                "(ties: lower id), for the current and the previous token"},
            "quantile_definition": "value: the order statistic of rank ceil(q n) among the n counted tokens "
                                   "(inverted CDF); examples: the smallest (value, token index) pairs with value "
                                   ">= it",
            "groups": [{"layer": g.layer, "neuron": g.neuron, "role": g.role, "members": [str(u) for u in g.members],
                        "max_corr": g.max_corr, "excess_corr": g.excess_corr} for g in self.groups],
            **self.extra_provenance,
        }
