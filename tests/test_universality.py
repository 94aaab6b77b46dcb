"""Universality table: hand-computed excess correlations, strict threshold, storage, end to end."""

import numpy as np
import pytest
import torch

from universal_neurons.correlation import CorrelationConfig, CorrelationResult, ModelLayout, correlate
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import set_progress
from universal_neurons.universality import (
    PAPER_COLUMNS,
    flag_universal,
    load_universality_table,
    save_universality_table,
    universality_table,
)

set_progress(False)

REF = ModelLayout("a", 2, 2)
OTHERS = (ModelLayout("b", 2, 2), ModelLayout("c", 1, 4), ModelLayout("d", 4, 1))


def _planted() -> CorrelationResult:
    # rows: models b, c, d; columns: the 4 reference neurons. Values exact in binary.
    max_corr = np.array([[0.75, 0.875, 0.5, np.nan],
                         [0.75, 1.0, 0.25, np.nan],
                         [0.75, 0.625, 0.75, np.nan]])
    baseline = np.array([[0.25, 0.125, 0.25, np.nan],
                         [0.25, 0.25, 0.125, np.nan],
                         [0.25, 0.125, 0.125, np.nan]])
    partner = np.array([[3, 1, 0, -1], [2, 2, 1, -1], [0, 3, 1, -1]])
    return CorrelationResult(reference=REF, others=OTHERS, max_corr=max_corr, partner=partner,
                             baseline=baseline, baseline_partner=partner,
                             dead={"a": np.array([False, False, False, True])})


def test_planted_table_numbers_and_strict_threshold():
    table = universality_table(_planted())
    assert list(table.columns[:10]) == PAPER_COLUMNS
    assert table["layer"].tolist() == [0, 0, 1, 1] and table["neuron"].tolist() == [0, 1, 0, 1]
    # neuron 0: excess = mean(0.5, 0.5, 0.5) = 0.5 exactly -> not universal (strict)
    # neuron 1: (0.75 + 0.75 + 0.5) / 3 = 2/3 -> universal
    # neuron 2: (0.25 + 0.125 + 0.625) / 3 = 1/3
    np.testing.assert_allclose(table["excess_corr"][:3], [0.5, 2 / 3, 1 / 3])
    assert table["is_universal"].tolist() == [False, True, False, False]
    assert table.loc[1, "max_corr"] == 1.0 and table.loc[1, "min_corr"] == 0.625
    assert table.loc[1, "mean_corr"] == pytest.approx(2.5 / 3)
    assert table.loc[2, "max_baseline"] == 0.25 and table.loc[2, "min_baseline"] == 0.125
    assert table.loc[2, "mean_baseline"] == pytest.approx(0.5 / 3)
    # per-model columns and partners split into (layer, neuron) of each model's own layout
    assert table["max_corr_c"].tolist()[:3] == [0.75, 1.0, 0.25]
    assert table["partner_layer_b"].tolist() == [1, 0, 0, -1] and table["partner_neuron_b"].tolist() == [1, 1, 0, -1]
    assert table["partner_layer_c"].tolist() == [0, 0, 0, -1] and table["partner_neuron_c"].tolist() == [2, 2, 1, -1]
    assert table["partner_layer_d"].tolist() == [0, 3, 1, -1]
    # the dead neuron: NaN, flagged, never universal
    assert table.loc[3, "dead"] and np.isnan(table.loc[3, "excess_corr"])
    # a lower threshold admits neuron 0 only when it is strictly exceeded
    assert universality_table(_planted(), threshold=0.49)["is_universal"].tolist() == [True, True, False, False]


def test_flag_universal_is_strict_and_nan_safe():
    assert flag_universal(np.array([0.5, 0.5000001, np.nan, 0.7])).tolist() == [False, True, False, True]
    assert flag_universal(np.array([0.3]), threshold=0.2).tolist() == [True]
    with pytest.raises(UniversalNeuronsError, match="threshold"):
        flag_universal(np.array([0.3]), threshold=float("nan"))


def test_no_baseline_is_an_error():
    result = _planted()
    result.baseline = None
    with pytest.raises(UniversalNeuronsError, match="baseline='rotation'"):
        universality_table(result)


@pytest.mark.parametrize("ext", [".csv", ".h5"])
def test_save_load_roundtrip(tmp_path, ext):
    table = universality_table(_planted())
    path = tmp_path / f"u{ext}"
    save_universality_table(table, path, provenance={"token_set_hash": "xyz"})
    back = load_universality_table(path)
    assert list(back.columns) == list(table.columns)
    np.testing.assert_array_equal(back.to_numpy(dtype=float), table.to_numpy(dtype=float))
    assert back.attrs["provenance"]["token_set_hash"] == "xyz"
    assert back.attrs["provenance"]["threshold"] == 0.5
    with pytest.raises(UniversalNeuronsError, match="already exists"):
        save_universality_table(table, path)
    with pytest.raises(UniversalNeuronsError, match=".csv, .h5"):
        save_universality_table(table, tmp_path / "u.parquet")


def test_all_pairs_tables_stack_with_reference_column():
    result = _planted()
    table = universality_table({"a": result, "a2": result})
    assert table.columns[0] == "reference" and len(table) == 8
    assert table["reference"].tolist() == ["a"] * 4 + ["a2"] * 4


def test_end_to_end_planted_universal_neurons():
    # 5 models; reference neurons 0..31 have a noisy copy in layer 1 of every other model,
    # the rest have none. Excess ~ 0.99 - 0.3 (rotation baseline at d_mlp=128) vs ~ 0.
    rng = np.random.default_rng(0)
    n_tokens, lay = 3000, ModelLayout("a", 2, 128)
    x = rng.standard_normal((n_tokens, 256)).astype(np.float32)
    acts = [x]
    for _ in range(4):
        y = rng.standard_normal((n_tokens, 256))
        y[:, 128:160] = x[:, :32] + 0.1 * rng.standard_normal((n_tokens, 32))
        acts.append(y.astype(np.float32))
    layouts = [lay] + [ModelLayout(s, 2, 128) for s in "bcde"]
    src = [(torch.ones(1000, dtype=torch.bool), [torch.from_numpy(a[i:i + 1000]) for a in acts])
           for i in range(0, n_tokens, 1000)]
    table = universality_table(correlate(src, layouts, CorrelationConfig(seed=1)))
    assert table["is_universal"].tolist() == [True] * 32 + [False] * 224
    assert (table["partner_layer_b"][:32] == 1).all() and (table["partner_neuron_e"][:32] == np.arange(32)).all()
    assert (table["mean_corr"][:32] > 0.98).all() and (table["excess_corr"][32:] < 0.2).all()
    assert (table["mean_baseline"] < 0.45).all()
