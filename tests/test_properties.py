"""Neuron properties against independent references: scipy moments on the same masked tokens,
numpy cosines and norms, planted prediction/suppression neurons, scipy's Mann-Whitney U."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st
import torch

from tests.conftest import SAMPLE_TEXT
from universal_neurons import (
    PropertiesConfig,
    StreamingMoments,
    activation_moments,
    classify_families,
    compare_universal,
    join_universality,
    load_properties,
    load_universality_table,
    properties_stage,
    weight_properties,
)
from universal_neurons.activations import (
    StoreConfig,
    TokenSetConfig,
    UniversalNeuronsError,
    build_token_set,
    cache_activations,
    hook_name,
    load_model,
    mlp_activations,
    mlp_weights,
)
from universal_neurons.cli.main import main as cli
from universal_neurons.pipeline import PipelineConfig, run_pipeline

TEXT = [SAMPLE_TEXT * 3, SAMPLE_TEXT[::-1] * 2, SAMPLE_TEXT.upper() * 2]
RTOL = 1e-6


def _scipy_moments(x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.astype(np.float64)
    return {"mean": x.mean(0), "var": x.var(0), "skew": st.skew(x, axis=0, bias=True),
            "kurt": st.kurtosis(x, axis=0, fisher=True, bias=True)}


@pytest.fixture(scope="module")
def lm(tiny_family):
    return load_model(tiny_family[0], device="cpu")


@pytest.fixture(scope="module")
def token_set(lm):
    return build_token_set(TEXT, lm.tokenizer, TokenSetConfig(ctx_len=32, n_tokens=32 * 20))  # 20 rows: fast


def test_streaming_moments_match_scipy_on_uneven_batches():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_gamma(0.3, (3001, 3)) * 5 + 1e4,  # large mean next to the spread, skewed
                        rng.standard_t(3, (3001, 2)),  # heavy tails
                        np.where(rng.random((3001, 2)) < 0.02, rng.normal(3, 1, (3001, 2)), -0.1)], axis=1)  # sparse
    acc, i = StreamingMoments(x.shape[1]), 0
    for b in (1, 2, 0, 997, 13, 1500, 488):
        acc.update(torch.from_numpy(x[i:i + b]) if b % 2 else x[i:i + b])
        i += b
    assert i == len(x)
    r, ref = acc.result(), _scipy_moments(x)
    assert r["count"] == len(x)
    for k in ("mean", "var", "skew", "kurt"):
        np.testing.assert_allclose(r[k], ref[k], rtol=RTOL, atol=0, err_msg=k)
    np.testing.assert_array_equal(r["frequency"], (x > 0).sum(0) / len(x))
    const = StreamingMoments(1)
    const.update(np.full((5, 1), 2.5))
    c = const.result()
    assert c["var"][0] == 0 and np.isnan(c["skew"][0]) and np.isnan(c["kurt"][0])
    with pytest.raises(UniversalNeuronsError, match="no tokens were counted"):
        StreamingMoments(2).result()


def test_live_moments_match_scipy_on_tiny_model(lm, token_set):
    batch_rows = 3  # uneven: the last batch is shorter
    assert token_set.n_rows % batch_rows
    df = activation_moments(lm, token_set=token_set, batch_rows=batch_rows)
    assert len(df) == lm.n_layers * lm.d_mlp and df.attrs["moments"]["n_tokens"] == token_set.n_counted
    # reference: the same forward batches from mlp_activations, concatenated, mask applied, scipy
    acts = {h: [] for h in (hook_name(layer, k) for layer in range(lm.n_layers) for k in ("pre", "post"))}
    for ids, _ in token_set.batches(batch_rows):
        for h, a in mlp_activations(lm, torch.from_numpy(ids).long(), kinds=("pre", "post")).items():
            acts[h].append(a.reshape(-1, lm.d_mlp).numpy())
    mask = token_set.mask.reshape(-1)
    for layer in range(lm.n_layers):
        rows = df["layer"] == layer
        for k in ("pre", "post"):
            x = np.concatenate(acts[hook_name(layer, k)])[mask]
            ref = _scipy_moments(x)
            for stat in ("mean", "var", "skew", "kurt"):
                np.testing.assert_allclose(df.loc[rows, f"{k}_{stat}"], ref[stat], rtol=RTOL,
                                           err_msg=f"{layer} {k}_{stat}")
            if k == "pre":
                np.testing.assert_array_equal(df.loc[rows, "activation_frequency"], (x > 0).sum(0) / len(x))


def test_store_moments_equal_live_and_need_hook_pre(lm, token_set, tmp_path):
    both = cache_activations(lm, token_set, tmp_path / "both.h5", batch_rows=4,
                             config=StoreConfig(kinds=("post", "pre"), dtype="float32"))
    stored = activation_moments(both, token_set=token_set, batch_rows=5)
    live = activation_moments(lm, token_set=token_set, batch_rows=4)
    assert stored.attrs["moments"]["source"] == "store"
    for c in live.columns:
        np.testing.assert_allclose(stored[c], live[c], rtol=1e-9, err_msg=c)
    post_only = cache_activations(lm, token_set, tmp_path / "post.h5", batch_rows=4)
    with pytest.raises(UniversalNeuronsError, match=r"has no blocks\.0\.mlp\.hook_pre.*kinds=\('post', 'pre'\)"):
        activation_moments(post_only)
    assert list(activation_moments(post_only, kinds=("post",)).columns) == ["layer", "neuron", "post_mean", "post_var",
                                                                            "post_skew", "post_kurt"]


def test_weight_properties_match_numpy(lm):
    w = {k: v.numpy().astype(np.float64) for k, v in mlp_weights(lm).items()}
    df = weight_properties(lm, config=PropertiesConfig(vocab_dtype="float64"))
    fast = weight_properties(lm)  # float32 cos GEMM
    w_in = np.moveaxis(w["W_in"], 1, 2).reshape(-1, w["W_in"].shape[1])  # [neuron, d_model]
    w_out = w["W_out"].reshape(-1, w["W_out"].shape[-1])
    n_in, n_out = np.linalg.norm(w_in, axis=1), np.linalg.norm(w_out, axis=1)
    np.testing.assert_allclose(df["w_in_norm"], n_in, rtol=1e-12)
    np.testing.assert_allclose(df["w_out_norm"], n_out, rtol=1e-12)
    np.testing.assert_array_equal(df["l2_penalty"], df["w_in_norm"] ** 2 + df["w_out_norm"] ** 2)
    np.testing.assert_allclose(df["in_out_sim"], (w_in * w_out).sum(1) / (n_in * n_out), rtol=1e-10)
    np.testing.assert_array_equal(df["input_bias"], w["b_in"].ravel())
    cos = (w_out / n_out[:, None]) @ (w["W_U"] / np.linalg.norm(w["W_U"], axis=0))  # [neuron, vocab]
    ref = _scipy_moments(cos.T)
    for stat in ("mean", "var", "skew", "kurt"):
        np.testing.assert_allclose(df[f"vocab_{stat}"], ref[stat], rtol=1e-9, atol=1e-12, err_msg=stat)
        np.testing.assert_allclose(fast[f"vocab_{stat}"], ref[stat], rtol=1e-4, atol=1e-6, err_msg=stat)
    assert df.attrs == {}  # weights alone carry no provenance; neuron_properties adds it


def test_planted_prediction_and_suppression_neurons():
    rng = np.random.default_rng(1)
    L, d_model, d_mlp, vocab = 2, 128, 16, 500
    W_U = rng.normal(size=(d_model, vocab))
    W_out = rng.normal(size=(L, d_mlp, d_model))
    W_out[1, 3] = 2.0 * W_U[:, 7]  # writes exactly towards token 7: predicts it
    W_out[1, 4] = -W_U[:, 7]  # writes against it: suppresses it
    weights = {"W_in": rng.normal(size=(L, d_model, d_mlp)), "b_in": rng.normal(size=(L, d_mlp)), "W_out": W_out,
               "W_U": W_U}
    df = classify_families(weight_properties(weights))
    fam = df.set_index(["layer", "neuron"])["family"]
    assert fam[(1, 3)] == "prediction" and fam[(1, 4)] == "suppression"
    assert (df["family"] == "prediction").sum() == 1 and (df["family"] == "suppression").sum() == 1
    assert df.loc[(df.layer == 1) & (df.neuron == 3), "vocab_kurt"].item() > 10
    assert df.loc[(df.layer == 1) & (df.neuron == 3), "vocab_skew"].item() > 0
    assert 1 <= df["is_partition"].sum() <= np.ceil(0.05 * len(df))  # top 5% of vocab_var
    # entropy candidates: only in the last layer, large l2_penalty and low vocab_var there
    ent = df[df.is_entropy]
    assert (ent.layer == 1).all()
    with pytest.raises(UniversalNeuronsError, match="W_out has shape"):
        weight_properties({**weights, "W_out": W_out[:, :, :-1]})


def test_compare_universal_against_scipy():
    rng = np.random.default_rng(2)
    n = 40
    props = pd.DataFrame({"layer": np.repeat([0, 1], n // 2), "neuron": np.tile(np.arange(n // 2), 2),
                          "w_out_norm": rng.normal(size=n), "pre_skew": rng.normal(size=n)})
    uni = np.zeros(n, bool)
    uni[[1, 5, 22, 30, 31]] = True
    props.loc[uni, "w_out_norm"] += 3.0  # universal neurons have larger weight norm
    props.loc[3, "pre_skew"] = np.nan  # a dead neuron: dropped
    table = pd.DataFrame({"layer": props.layer, "neuron": props.neuron, "is_universal": uni, "excess_corr": uni * 0.7})
    comp = compare_universal(table, props).set_index("property")
    x, y = props.loc[uni, "w_out_norm"], props.loc[~uni, "w_out_norm"]
    u, p = st.mannwhitneyu(x, y, alternative="two-sided")
    r = comp.loc["w_out_norm"]
    assert (r.n_universal, r.n_other) == (5, 35)
    assert r.median_universal == np.median(x) and r.median_other == np.median(y)
    assert r.u_statistic == u and r.p_value == p and r.rank_biserial == 2 * u / (5 * 35) - 1
    assert r.rank_biserial == 1.0  # every universal neuron above every other
    assert comp.loc["pre_skew", "n_other"] == 34
    joined = join_universality(props, table)
    pd.testing.assert_frame_equal(compare_universal(joined, ["w_out_norm", "pre_skew"]), comp.reset_index())
    with pytest.raises(UniversalNeuronsError, match="different shapes"):
        compare_universal(table.iloc[:30], props)
    with pytest.raises(UniversalNeuronsError, match="no is_universal"):
        compare_universal(props)
    empty = compare_universal(table.assign(is_universal=False), props)
    assert empty["p_value"].isna().all() and (empty["n_universal"] == 0).all()


def test_properties_stage_in_pipeline_and_cli(tiny_family, tmp_path, capsys):
    cfg = PipelineConfig(tokens=TokenSetConfig(ctx_len=32, n_tokens=32 * 20), batch_rows=8,
                         store=StoreConfig(kinds=("post", "pre"), dtype="float32"))
    res = run_pipeline(tiny_family, TEXT, tmp_path / "run", config=cfg, extra_stages=[properties_stage()])
    out = res.out_dir
    summary = json.loads((out / "summary.json").read_text())
    p = summary["properties"]
    assert p["moment_source"] == "store" and p["n_neurons"] == 128 and p["n_tokens"] == res.token_set.n_counted
    assert sum(p["families"].values()) == 128 and set(p["medians"]) >= {"w_out_norm", "pre_kurt"}
    props = load_properties(out / "properties.csv")
    assert props.attrs["provenance"]["weight_processing"] == {"fold_ln": True, "center_writing_weights": True,
                                                              "center_unembed": True}
    assert props.attrs["provenance"]["moments"]["token_set_hash"] == res.token_set.hash
    for c in ["layer", "neuron", "w_in_norm", "input_bias", "w_out_norm", "in_out_sim", "l2_penalty", "vocab_mean",
              "vocab_var", "vocab_skew", "vocab_kurt", "pre_mean", "pre_var", "pre_skew", "pre_kurt",
              "activation_frequency", "post_mean", "post_var", "post_skew", "post_kurt", "is_prediction",
              "is_suppression", "is_partition", "is_entropy", "family"]:
        assert c in props.columns, c
    comp = pd.read_csv(out / "property_comparison.csv")
    assert list(comp.columns) == ["property", "n_universal", "n_other", "median_universal", "median_other",
                                  "mean_universal", "mean_other", "u_statistic", "p_value", "rank_biserial"]
    # the live model gives the same moments as the float32 store
    live = properties_stage(source="live")(res)["properties"]
    assert live["moment_source"] == "live"
    again = load_properties(out / "properties.csv")
    for c in ("pre_mean", "pre_kurt", "activation_frequency", "post_var"):
        np.testing.assert_allclose(again[c], props[c], rtol=1e-9, err_msg=c)

    # the CLI: store and table in, properties and comparison out
    dest = tmp_path / "cli" / "props.csv"
    assert cli(["properties", str(tiny_family[0]), "--tokens", str(out / "tokens.h5"), "--store",
                str(out / "stores" / "a.h5"), "--table", str(out / "universality.csv"), "-o", str(dest)]) == 0
    text = capsys.readouterr().out
    assert "properties of 128 neurons" in text and "rank-biserial" in text
    np.testing.assert_allclose(pd.read_csv(dest)["pre_skew"], props["pre_skew"], rtol=1e-12)
    assert (dest.parent / "property_comparison.csv").exists()
    # a universality table of another model shape, and a store without hook_pre, are refused
    other = load_universality_table(out / "universality.csv").iloc[:64]
    other.to_csv(tmp_path / "half.csv", index=False)
    assert cli(["properties", str(tiny_family[0]), "--tokens", str(out / "tokens.h5"), "--table",
                str(tmp_path / "half.csv"), "-o", str(tmp_path / "p2.csv")]) == 2
    assert "different shapes" in capsys.readouterr().err
    with pytest.raises(UniversalNeuronsError, match="lacks hook_pre"):
        run_pipeline(tiny_family, TEXT, tmp_path / "post-only", config=PipelineConfig(
            tokens=TokenSetConfig(ctx_len=32, n_tokens=32 * 20), batch_rows=8),
            extra_stages=[properties_stage(source="store")])
