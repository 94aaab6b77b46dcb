"""Neuron families from weights alone (docs/method.md §7), and universal vs other neurons per property."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from universal_neurons.errors import IncompatibleInputsError, InputError

from .config import ACTIVATION_COLUMNS, FAMILIES, VOCAB_COLUMNS, WEIGHT_COLUMNS, PropertiesConfig

__all__ = ["classify_families", "family_cuts", "join_universality", "compare_universal"]

log = logging.getLogger(__name__)


def classify_families(props: pd.DataFrame, config: PropertiesConfig = PropertiesConfig()) -> pd.DataFrame:
    """Weight-based families (docs/method.md §7) as boolean columns plus one `family` label.

    Kurtosis is raw (a Gaussian has 3), as in the paper and in our tables. Under both rules:

    - prediction: `vocab_kurt > prediction_kurtosis` and `vocab_skew > 0`;
    - suppression: `vocab_kurt > prediction_kurtosis` and `vocab_skew < 0`.

    `family_rule='paper'` (default), the paper's fixed cuts:

    - partition: `vocab_var > partition_var`;
    - entropy (candidates): in the last `entropy_layers` layers, `l2_penalty >= entropy_l2_penalty`
      and `vocab_var <= entropy_vocab_var`.

    `family_rule='quantile'`, cuts relative to this model's neurons:

    - partition: `vocab_var` above its `partition_quantile` over all neurons;
    - entropy (candidates): in the last `entropy_layers` layers, `l2_penalty` above its
      `entropy_l2_quantile` and `vocab_var` below its `entropy_vocab_var_quantile` there.

    `family` is the first that applies in the order of `FAMILIES`, else `'other'`. A NaN
    property (a dead neuron) satisfies no cut.

    Args:
        props: `[neuron rows]` with `layer, l2_penalty, vocab_var, vocab_skew, vocab_kurt`
            (a properties table, or the paper's released tables).
        config: the rule and its cuts.

    Returns:
        A copy of `props` with `is_prediction, is_suppression, is_partition, is_entropy, family`.

    Raises:
        InputError: a needed column is missing.
    """
    need = {"layer", "l2_penalty", "vocab_var", "vocab_skew", "vocab_kurt"} - set(props.columns)
    if need:
        raise InputError(f"families need the columns {sorted(need)}; compute weight_properties first")
    df = props.copy()
    kurt, skew, vvar, l2 = (df[c].to_numpy(float) for c in ("vocab_kurt", "vocab_skew", "vocab_var", "l2_penalty"))
    layer = df["layer"].to_numpy()
    last = layer >= layer.max() - config.entropy_layers + 1 if len(df) else np.zeros(0, bool)
    with np.errstate(invalid="ignore"):
        heavy = kurt > config.prediction_kurtosis
        df["is_prediction"] = heavy & (skew > 0)
        df["is_suppression"] = heavy & (skew < 0)
        if config.family_rule == "paper":
            df["is_partition"] = vvar > config.partition_var
            _warn_if_unscaled(df["is_partition"].to_numpy(bool), vvar, config)
            df["is_entropy"] = last & (l2 >= config.entropy_l2_penalty) & (vvar <= config.entropy_vocab_var)
        else:
            df["is_partition"], df["is_entropy"] = _quantile_cuts(vvar, l2, last, config)
    family = np.full(len(df), "other", dtype=object)
    for name in reversed(FAMILIES[:-1]):  # earlier families win
        family[df[f"is_{name}"].to_numpy(bool)] = name
    df["family"] = family
    return df


def _warn_if_unscaled(partition: np.ndarray, vvar: np.ndarray, config: PropertiesConfig) -> None:
    """Log a warning when the paper's fixed partition cut puts most neurons in the family.

    The cut `vocab_var > 0.005` was set for GPT-2 (d_model 768-1024), where a random output
    direction has vocab_var about 1/d_model ~ 0.001; in a small model (d_model 128: ~0.008)
    nearly every neuron passes it.

    Args:
        partition: `[neuron]` the partition flags.
        vvar: `[neuron]` vocab_var.
        config: the cut.
    """
    finite = np.isfinite(vvar)
    if finite.sum() >= 10 and partition[finite].mean() > 0.5:
        log.warning("%.0f%% of neurons have vocab_var > %g, the paper's partition cut, set for GPT-2-sized "
                    "models (random directions: vocab_var ~ 1/d_model; here the median is %.3g); for a model "
                    "this small use PropertiesConfig(family_rule='quantile') or a larger partition_var",
                    100 * partition[finite].mean(), config.partition_var, float(np.median(vvar[finite])))


def family_cuts(config: PropertiesConfig = PropertiesConfig()) -> dict[str, str]:
    """The family rules `classify_families` applies under `config`, in words (for provenance
    and reports).

    Args:
        config: the rule and its cuts.

    Returns:
        `{rule, prediction, suppression, partition, entropy}`, each a readable condition.
    """
    kurt = f"vocab_kurt > {config.prediction_kurtosis:g} (raw kurtosis, Gaussian 3)"
    last = "the last layer" if config.entropy_layers == 1 else f"the last {config.entropy_layers} layers"
    if config.family_rule == "paper":
        partition = f"vocab_var > {config.partition_var:g}"
        entropy = (f"in {last}, l2_penalty >= {config.entropy_l2_penalty:g} and "
                   f"vocab_var <= {config.entropy_vocab_var:g}")
    else:
        partition = f"vocab_var above its {config.partition_quantile:g} quantile over all neurons"
        entropy = (f"in {last}, l2_penalty above its {config.entropy_l2_quantile:g} quantile and vocab_var "
                   f"below its {config.entropy_vocab_var_quantile:g} quantile there")
    return {"rule": config.family_rule, "prediction": f"{kurt} and vocab_skew > 0",
            "suppression": f"{kurt} and vocab_skew < 0", "partition": partition, "entropy": entropy}


def _quantile_cuts(vvar: np.ndarray, l2: np.ndarray, last: np.ndarray,
                  config: PropertiesConfig) -> tuple[np.ndarray, np.ndarray]:
    """Partition and entropy under `family_rule='quantile'`.

    Args:
        vvar: `[neuron]` vocab_var.
        l2: `[neuron]` l2_penalty.
        last: `[neuron]` True in the last `entropy_layers` layers.
        config: the `*_quantile` fields.

    Returns:
        (is_partition, is_entropy), each `[neuron]` bool.
    """
    partition = np.zeros(len(vvar), bool)
    entropy = np.zeros(len(vvar), bool)
    with np.errstate(invalid="ignore"):
        if np.isfinite(vvar).any():
            partition = vvar > np.nanquantile(vvar, config.partition_quantile)
        if last.any() and np.isfinite(vvar[last]).any():
            entropy[last] = ((l2[last] > np.nanquantile(l2[last], config.entropy_l2_quantile))
                             & (vvar[last] < np.nanquantile(vvar[last], config.entropy_vocab_var_quantile)))
    return partition, entropy


def join_universality(properties: pd.DataFrame, universality: pd.DataFrame) -> pd.DataFrame:
    """Properties joined with a universality table on `layer, neuron` (one row per neuron).

    Args:
        properties: a properties table.
        universality: a universality table of the same model (one reference).

    Returns:
        `properties` with the universality columns it lacks.

    Raises:
        InputError: a table has no layer/neuron columns, or the universality table stacks
            several references.
        IncompatibleInputsError: the two tables describe models of different shapes.
    """
    def shape(t):
        return len(t), int(t["layer"].max()) + 1 if len(t) else 0

    for name, t in (("properties", properties), ("universality", universality)):
        if not {"layer", "neuron"} <= set(t.columns):
            raise InputError(f"the {name} table has no layer/neuron columns")
    if "reference" in universality.columns:
        raise InputError("this universality table stacks several references (all-pairs); select one "
                         "with table[table.reference == 'a'] first")
    (np_, lp), (nu, lu) = shape(properties), shape(universality)
    keys_p = set(zip(properties["layer"], properties["neuron"]))
    keys_u = set(zip(universality["layer"], universality["neuron"]))
    if np_ != nu or keys_p != keys_u:
        raise IncompatibleInputsError(
            f"the properties table has {np_} neurons in {lp} layers but the universality table has {nu} in {lu}; "
            "they come from models of different shapes. Compute properties of the reference model of that table")
    uni = universality.drop(columns=[c for c in universality.columns if c in properties.columns
                                     and c not in ("layer", "neuron")])
    return properties.merge(uni, on=["layer", "neuron"], how="left", validate="one_to_one")


def compare_universal(table: pd.DataFrame, props: pd.DataFrame | Sequence[str] | None = None) -> pd.DataFrame:
    """Universal vs other neurons, per property: medians and a Mann-Whitney U test.

    NaN values are dropped per property. `u_statistic` is U of the universal group (two-sided
    test, scipy's `mannwhitneyu`); `rank_biserial = 2 U / (n_universal n_other) - 1` in
    [-1, 1], positive when universal neurons tend to have larger values. Statistics are NaN
    where a group is empty.

    Args:
        table: a table with `is_universal` and the property columns (e.g. `join_universality`'s),
            or a universality table when `props` is a properties DataFrame (joined here).
        props: property names to compare (default: every property column present), or a
            properties DataFrame.

    Returns:
        DataFrame, one row per property: `property, n_universal, n_other, median_universal,
        median_other, mean_universal, mean_other, u_statistic, p_value, rank_biserial`.

    Raises:
        InputError: no `is_universal` column, or a property column is missing.
    """
    from scipy.stats import mannwhitneyu

    if isinstance(props, pd.DataFrame):
        table, props = join_universality(props, table), None
    if "is_universal" not in table.columns:
        raise InputError("the table has no is_universal column; pass a universality table and a "
                         "properties table, or join them with join_universality")
    if props is None:
        props = [c for c in WEIGHT_COLUMNS + VOCAB_COLUMNS + ACTIVATION_COLUMNS if c in table.columns]
    missing = [p for p in props if p not in table.columns]
    if missing:
        raise InputError(f"no column(s) {missing} in the table; it has {list(table.columns)}")
    uni = table["is_universal"].to_numpy(bool)
    rows = []
    for p in props:
        v = table[p].to_numpy(float)
        x, y = v[uni & np.isfinite(v)], v[~uni & np.isfinite(v)]
        row = {"property": p, "n_universal": len(x), "n_other": len(y),
               "median_universal": np.median(x) if len(x) else np.nan,
               "median_other": np.median(y) if len(y) else np.nan,
               "mean_universal": x.mean() if len(x) else np.nan, "mean_other": y.mean() if len(y) else np.nan,
               "u_statistic": np.nan, "p_value": np.nan, "rank_biserial": np.nan}
        if len(x) and len(y):
            u, pv = mannwhitneyu(x, y, alternative="two-sided")
            row.update(u_statistic=float(u), p_value=float(pv), rank_biserial=2.0 * float(u) / (len(x) * len(y)) - 1.0)
        rows.append(row)
    return pd.DataFrame(rows)
