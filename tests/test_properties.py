"""Neuron properties against independent references: scipy moments (raw kurtosis, the paper's
convention) on the same masked tokens, numpy cosines and norms, planted prediction/suppression
neurons, the paper's family counts on its released tables, scipy's Mann-Whitney U."""

import json
import logging
from pathlib import Path

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
from universal_neurons.properties import CONVENTIONS, family_cuts

TEXT = [SAMPLE_TEXT * 3, SAMPLE_TEXT[::-1] * 2, SAMPLE_TEXT.upper() * 2]
RTOL = 1e-6
GURNEE = Path(__file__).parent / "data" / "gurnee2024"  # the paper's released tables, trimmed (README there)


def _scipy_moments(x: np.ndarray) -> dict[str, np.ndarray]:
    """The reference: population variance, biased skew, *raw* kurtosis (a Gaussian has 3)."""
    x = x.astype(np.float64)
    return {"mean": x.mean(0), "var": x.var(0), "skew": st.skew(x, axis=0, bias=True),
            "kurt": st.kurtosis(x, axis=0, fisher=False, bias=True)}


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


def test_kurtosis_is_raw_mean_z4_as_in_the_paper():
    rng = np.random.default_rng(3)
    n = 200_000
    x = np.stack([rng.standard_normal(n), rng.laplace(size=n), rng.exponential(size=n)], axis=1)
    acc = StreamingMoments(x.shape[1])
    for a in range(0, n, 65_536):
        acc.update(x[a:a + 65_536])
    r = acc.result()
    z = (x - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(r["kurt"], (z ** 4).mean(0), rtol=1e-9)
    np.testing.assert_allclose(r["kurt"], st.kurtosis(x, axis=0, fisher=False, bias=True), rtol=1e-9)
    np.testing.assert_allclose(r["skew"], (z ** 3).mean(0), rtol=1e-6, atol=1e-9)
    # raw: a Gaussian has 3, a Laplace 6, an exponential 9 (excess would be 0, 3, 6)
    np.testing.assert_allclose(r["kurt"], [3.0, 6.0, 9.0], rtol=0.1)


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
    for k in ("pre", "post"):  # raw kurtosis is at least skew^2 + 1 (Pearson); excess kurtosis need not be
        kurt, skew = df[f"{k}_kurt"].dropna(), df.loc[df[f"{k}_kurt"].notna(), f"{k}_skew"]
        assert (kurt >= skew ** 2 + 1 - 1e-9).all(), k


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
    kurt = df["vocab_kurt"].dropna()
    assert (kurt >= df.loc[kurt.index, "vocab_skew"] ** 2 + 1 - 1e-9).all()  # raw kurtosis (Pearson's bound)
    assert df.attrs == {}  # weights alone carry no provenance; neuron_properties adds it


def test_planted_prediction_and_suppression_neurons(caplog):
    rng = np.random.default_rng(1)
    L, d_model, d_mlp, vocab = 2, 128, 16, 500
    W_U = rng.normal(size=(d_model, vocab))
    W_out = rng.normal(size=(L, d_mlp, d_model))
    W_out[1, 3] = 2.0 * W_U[:, 7]  # writes exactly towards token 7: predicts it
    W_out[1, 4] = -W_U[:, 7]  # writes against it: suppresses it
    weights = {"W_in": rng.normal(size=(L, d_model, d_mlp)), "b_in": rng.normal(size=(L, d_mlp)), "W_out": W_out,
               "W_U": W_U}
    props = weight_properties(weights)
    with caplog.at_level(logging.WARNING, logger="universal_neurons.properties.families"):
        paper = classify_families(props)  # the default: the paper's fixed cuts
    # d_model 128: random directions have vocab_var ~ 1/128 > 0.005, so the paper's cut takes nearly all
    assert paper["is_partition"].mean() > 0.5 and "family_rule='quantile'" in caplog.text
    df = classify_families(props, PropertiesConfig(family_rule="quantile"))
    for d in (paper, df):
        fam = d.set_index(["layer", "neuron"])["family"]
        assert fam[(1, 3)] == "prediction" and fam[(1, 4)] == "suppression"
        assert (d["family"] == "prediction").sum() == 1 and (d["family"] == "suppression").sum() == 1
    assert df.loc[(df.layer == 1) & (df.neuron == 3), "vocab_kurt"].item() > 10
    assert df.loc[(df.layer == 1) & (df.neuron == 3), "vocab_skew"].item() > 0
    assert 1 <= df["is_partition"].sum() <= np.ceil(0.05 * len(df))  # top 5% of vocab_var
    # entropy candidates: only in the last layer, large l2_penalty and low vocab_var there
    ent = df[df.is_entropy]
    assert (ent.layer == 1).all()
    # the fixed cuts, against the columns directly
    vvar, l2 = props["vocab_var"].to_numpy(), props["l2_penalty"].to_numpy()
    np.testing.assert_array_equal(paper["is_partition"], vvar > 0.005)
    np.testing.assert_array_equal(paper["is_entropy"], (props["layer"] == 1) & (l2 >= 1.0) & (vvar <= 0.001))
    cut = classify_families(props, PropertiesConfig(partition_var=np.median(vvar), entropy_l2_penalty=0.0,
                                                    entropy_vocab_var=np.inf, partition_quantile=0.0))
    assert cut["is_partition"].sum() == len(props) // 2  # the quantile fields are not read by the paper rule
    np.testing.assert_array_equal(cut["is_entropy"], props["layer"] == 1)
    with pytest.raises(UniversalNeuronsError, match="W_out has shape"):
        weight_properties({**weights, "W_out": W_out[:, :, :-1]})


# prediction, suppression, partition, entropy candidates (booleans) under the default (paper) rules
PAPER_COUNTS = {"stanford-gpt2-small-a": (89, 124, 13, 60),
                "stanford-gpt2-medium-a": (126, 165, 2, 32),
                "pythia-160m": (33, 46, 1, 8)}


@pytest.mark.parametrize("model, pred_plus_supp", [("stanford-gpt2-small-a", 213), ("stanford-gpt2-medium-a", 291),
                                                    ("pythia-160m", 79)])
def test_families_give_the_papers_counts_on_its_released_tables(model, pred_plus_supp, caplog):
    released = pd.read_csv(GURNEE / f"{model}-universal.csv")  # raw vocab_kurt, as the paper computed it
    with caplog.at_level(logging.WARNING):
        df = classify_families(released)
    assert "partition cut" not in caplog.text  # the cut fits GPT-2-sized models
    counts = tuple(int(df[f"is_{name}"].sum()) for name in ("prediction", "suppression", "partition", "entropy"))
    assert counts[0] + counts[1] == pred_plus_supp  # the paper's figure
    assert counts == PAPER_COUNTS[model]
    # independent: the paper's cuts with pandas
    heavy = released.vocab_kurt > 10
    assert counts[:3] == ((heavy & (released.vocab_skew > 0)).sum(), (heavy & (released.vocab_skew < 0)).sum(),
                          (released.vocab_var > 0.005).sum())
    assert (df["family"] == "prediction").sum() + (df["family"] == "suppression").sum() == pred_plus_supp
    if model == "stanford-gpt2-medium-a":  # the paper's entropy notebook: layer >= 22, l2 >= 1, vocab_var <= 0.001
        ent = classify_families(released, PropertiesConfig(entropy_layers=2))["is_entropy"]
        np.testing.assert_array_equal(ent, (released.layer >= 22) & (released.l2_penalty >= 1)
                                      & (released.vocab_var <= 0.001))
        assert ent.sum() == 59


def test_family_rule_is_checked_and_named():
    with pytest.raises(UniversalNeuronsError, match="family_rule must be 'paper'"):
        PropertiesConfig(family_rule="top5")
    with pytest.raises(UniversalNeuronsError, match="partition_var must be a cut"):
        PropertiesConfig(partition_var=float("nan"))
    assert family_cuts() == {
        "rule": "paper", "prediction": "vocab_kurt > 10 (raw kurtosis, Gaussian 3) and vocab_skew > 0",
        "suppression": "vocab_kurt > 10 (raw kurtosis, Gaussian 3) and vocab_skew < 0",
        "partition": "vocab_var > 0.005", "entropy": "in the last layer, l2_penalty >= 1 and vocab_var <= 0.001"}
    assert "0.95 quantile" in family_cuts(PropertiesConfig(family_rule="quantile"))["partition"]
    assert CONVENTIONS["kurt"].startswith("raw (Gaussian 3)")


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
    assert props.attrs["provenance"]["conventions"]["kurt"].startswith("raw (Gaussian 3)")
    assert props.attrs["provenance"]["families"] == p["family_rules"] == family_cuts()
    assert p["conventions"]["kurt"] == CONVENTIONS["kurt"]
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


def test_a_table_with_excess_kurtosis_is_named_on_load(tmp_path, caplog):
    table = tmp_path / "old.csv"
    pd.DataFrame({"layer": [0], "neuron": [0], "pre_kurt": [0.1]}).to_csv(table, index=False)
    (tmp_path / "old.csv.json").write_text(json.dumps({"conventions": "kurt: scipy.stats.kurtosis(fisher=True, "
                                                                      "bias=True) (excess)"}))
    with caplog.at_level(logging.WARNING, logger="universal_neurons.properties.stage"):
        assert load_properties(table)["pre_kurt"].item() == 0.1  # read as written
    assert "excess kurtosis" in caplog.text and "add 3" in caplog.text
