"""Ablation against independent references: TransformerLens' own loss on a copy of the model
with W_out rows zeroed, a planted constant neuron, the empty set; controls, errors, CLI, stage."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import SAMPLE_TEXT
from universal_neurons import (
    AblationConfig,
    AblationResult,
    ablate,
    ablation_stage,
    ablation_study,
    control_sets,
    neuron_means,
    save_universality_table,
)
from universal_neurons.ablation import counted_predictions
from universal_neurons.activations import (
    StoreConfig,
    TokenSetConfig,
    UniversalNeuronsError,
    build_token_set,
    cache_activations,
    load_model,
)
from universal_neurons.cli.main import main as cli

TEXT = [SAMPLE_TEXT * 2, SAMPLE_TEXT.upper()]
NO_MASK = TokenSetConfig(ctx_len=32, exclude_bos=False, exclude_special=False, exclude_newlines=False)
FAST = dict(n_controls=3, n_bootstrap=200)


def _mlp(lm, layer):
    return lm.model.blocks[layer].mlp._original_component  # the Hugging Face GPT-2 MLP the bridge runs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forward passes on a shared 2-core machine: a second intra-op thread only spins
    (measured ~25x slower per pass under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tiny_family):
    return tiny_family[0]


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(model_dir, checkpoint=0, device="cpu")


@pytest.fixture(scope="module")
def ts(lm):  # the default mask: BOS, EOS and newlines excluded
    return build_token_set(TEXT, lm.tokenizer, TokenSetConfig(ctx_len=32))


@pytest.fixture(scope="module")
def ts_all(lm):  # nothing masked out: the clean loss must be TransformerLens' return_type="loss"
    return build_token_set(TEXT, lm.tokenizer, NO_MASK)


def _tl_masked_loss(model, ts):
    """TransformerLens' per-token loss, averaged over the predictions the mask counts."""
    with torch.no_grad():
        per_tok = model(torch.from_numpy(ts.ids).long(), return_type="loss", loss_per_token=True).double().numpy()
    counted = counted_predictions(ts.mask)[:, :-1]
    return per_tok, per_tok[counted].mean()


def _table(lm, universal, dead=()):
    """A universality table of `lm` with the given (layer, neuron) flagged universal / dead."""
    n = lm.n_layers * lm.d_mlp
    t = pd.DataFrame({"layer": np.arange(n) // lm.d_mlp, "neuron": np.arange(n) % lm.d_mlp,
                      "excess_corr": np.zeros(n), "is_universal": False, "dead": False})
    for col, pairs in (("is_universal", universal), ("dead", dead)):
        for layer, i in pairs:
            t.loc[layer * lm.d_mlp + i, col] = True
    return t


# ---------------------------------------------------------------------------- parity with TransformerLens


def test_zero_ablation_equals_zeroed_w_out_rows(model_dir, lm, ts, ts_all):
    neurons = {0: list(range(0, 64, 2)), 1: [3, 7, 11]}
    copy = load_model(model_dir, checkpoint=0, device="cpu")
    with torch.no_grad():
        # Conv1D weight [d_mlp, d_model]: row i is neuron i's output (W_out[layer, i])
        for layer, idx in neurons.items():
            _mlp(copy, layer).c_proj.weight[idx] = 0.0
    assert torch.equal(copy.model.W_out[0, 0], torch.zeros(lm.d_model))
    cfg = AblationConfig(kind="zero", n_bootstrap=50)
    with torch.no_grad():
        tl_loss = copy.model(torch.from_numpy(ts_all.ids).long(), return_type="loss").item()
    m_all = ablate(lm, neurons, ts_all, cfg)
    assert m_all.n_tokens == ts_all.n_rows * 31
    assert m_all.ce_ablated == pytest.approx(tl_loss, abs=2e-6)
    # per token, under the default mask: the same numbers where counted, NaN elsewhere
    m = ablate(lm, neurons, ts, cfg, per_token=True)
    per_tok, masked = _tl_masked_loss(copy.model, ts)
    counted = counted_predictions(ts.mask)
    got = m.per_token["ce_ablated"]
    np.testing.assert_allclose(got[:, :-1][counted[:, :-1]], per_tok[counted[:, :-1]], rtol=0, atol=1e-5)
    assert np.isnan(got[~counted]).all()
    assert m.ce_ablated == pytest.approx(masked, abs=2e-6)
    assert m.delta_ce != 0 and np.nanmax(np.abs(got - m.per_token["ce_clean"])) > 1e-2  # the ablation does something
    # the hooks were scoped: the original model still gives its own loss
    _, clean = _tl_masked_loss(lm.model, ts)
    assert m.ce_clean == pytest.approx(clean, abs=2e-6)


def test_empty_set_changes_nothing_and_clean_loss_is_transformer_lens(lm, ts, ts_all):
    for tokens in (ts_all, ts):
        m = ablate(lm, [], tokens, AblationConfig(kind="zero", n_bootstrap=50))
        assert m.delta_ce == 0.0 and m.kl == 0.0 and m.delta_entropy == 0.0 and m.n_neurons == 0
        _, ref = _tl_masked_loss(lm.model, tokens)
        assert m.ce_clean == pytest.approx(ref, abs=2e-6)
        assert m.n_tokens == counted_predictions(tokens.mask).sum()


def test_mean_ablation_of_a_constant_neuron_changes_nothing(model_dir, ts):
    lm2 = load_model(model_dir, checkpoint=0, device="cpu")
    with torch.no_grad():  # neuron 5 of layer 0: no input weights, bias 0.7 -> post = gelu(0.7) at every token
        _mlp(lm2, 0).c_fc.weight[:, 5] = 0.0
        _mlp(lm2, 0).c_fc.bias[5] = 0.7
    means = neuron_means(lm2, ts)
    assert means.shape == (2, 64)
    m = ablate(lm2, [(0, 5)], ts, AblationConfig(kind="mean", n_bootstrap=50))
    assert abs(m.delta_ce) < 1e-6 and abs(m.kl) < 1e-6
    f = ablate(lm2, [(0, 5)], ts, AblationConfig(kind="fixed", value=float(means[0, 5]), n_bootstrap=50))
    assert abs(f.delta_ce) < 1e-6 and abs(f.kl) < 1e-6
    other = ablate(lm2, [(0, 5)], ts, AblationConfig(kind="fixed", value=3.0, n_bootstrap=50))
    assert other.kl > 1e-6


def test_means_from_store_equal_streamed_means(lm, ts, tmp_path):
    store = cache_activations(lm, ts, tmp_path / "a.h5", config=StoreConfig(dtype="float32"), batch_rows=8)
    streamed = neuron_means(lm, ts, batch_rows=5)
    with torch.no_grad():
        _, cache = lm.model.run_with_cache(torch.from_numpy(ts.ids).long(),
                                           names_filter=lambda n: n.endswith("hook_post"))
    ref = np.stack([cache[f"blocks.{layer}.mlp.hook_post"].double().numpy()[ts.mask].mean(0) for layer in range(2)])
    np.testing.assert_allclose(streamed, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(neuron_means(store, ts), ref, rtol=0, atol=1e-6)
    # a store of another token set is refused for means
    other = build_token_set([SAMPLE_TEXT], lm.tokenizer, NO_MASK)
    with pytest.raises(UniversalNeuronsError, match="cached on token set"):
        ablation_study(lm, [(0, 1)], other, AblationConfig(**FAST), store=store)


# ---------------------------------------------------------------------------- controls and the study


def test_controls_match_layer_counts_and_avoid_universal_and_dead(lm, ts, tmp_path):
    universal = [(0, i) for i in (1, 4, 9, 16, 25)] + [(1, i) for i in (2, 3, 5)]
    dead = [(0, i) for i in range(30, 40)]
    table = _table(lm, universal, dead)
    cfg = AblationConfig(kind="zero", **FAST)
    res = ablation_study(lm, table, ts, cfg)
    forbidden = set(universal) | set(dead)
    assert list(res.summary["group"]) == ["all layers", "layer 0", "layer 1"]
    assert len(res.runs) == 3 * (1 + 3) == len(res.sets)
    for (_, run), s in zip(res.runs.iterrows(), res.sets):
        uni = res.sets[res.runs.index[(res.runs.group == run.group) & (res.runs.set == "universal")][0]]
        assert {layer: len(v) for layer, v in s.items()} == {layer: len(v) for layer, v in uni.items()}
        assert sum(len(v) for v in s.values()) == run.n_neurons
        if run.set == "control":
            assert not {(layer, i) for layer, v in s.items() for i in v} & forbidden
    # seeded draws repeat (the study's controls are control_sets' draws); another seed draws other sets
    pool = np.ones(128, bool)
    pool[[layer * 64 + i for layer, i in forbidden]] = False
    uni = {0: np.array([1, 4, 9, 16, 25]), 1: np.array([2, 3, 5])}

    def plain(sets):
        return [{k: v.tolist() for k, v in s.items()} for s in sets]

    assert plain(control_sets(uni, pool, d_mlp=64, n_controls=3, seed=0)) == res.sets[1:4]
    assert plain(control_sets(uni, pool, d_mlp=64, n_controls=3, seed=1)) != res.sets[1:4]
    # the summary is computed from the runs: p-value with the +1 correction, ratio of means
    for _, g in res.summary.iterrows():
        runs = res.runs[res.runs.group == g.group]
        u = runs[runs.set == "universal"].iloc[0]
        c = runs[runs.set == "control"]["delta_ce"].to_numpy()
        assert g.p_value == pytest.approx((1 + (c >= u.delta_ce).sum()) / (1 + len(c)))
        if c.mean() > 0:
            assert g.ratio_delta_ce == pytest.approx(u.delta_ce / c.mean())
        else:  # "times as harmful as random" means nothing when random ablation does no harm
            assert np.isnan(g.ratio_delta_ce)
        assert g.delta_ce_lo <= g.delta_ce <= g.delta_ce_hi and g.control_delta_ce_lo <= g.control_delta_ce_hi
    # the study's universal set gives what ablate() gives for it
    one = ablate(lm, universal, ts, cfg)
    assert res.runs.loc[0, "delta_ce"] == pytest.approx(one.delta_ce, abs=1e-9)
    # saved with provenance, loaded back, never silently overwritten
    res.save(tmp_path / "abl")
    back = AblationResult.load(tmp_path / "abl")
    pd.testing.assert_frame_equal(back.runs, res.runs)
    assert back.sets == res.sets and back.provenance["token_set"]["hash"] == ts.hash
    assert back.provenance["kind"] == "zero" and back.provenance["config"]["seed"] == 0
    np.testing.assert_array_equal(back.row_sums["kl"], res.row_sums["kl"])
    with pytest.raises(UniversalNeuronsError, match="already holds ablation results"):
        res.save(tmp_path / "abl")
    res.save(tmp_path / "abl", overwrite=True)


def test_per_token_file_and_neuron_list_input(lm, ts, tmp_path):
    import h5py

    res = ablation_study(lm, {0: [3], 1: [4, 5]}, ts, AblationConfig(kind="fixed", value=0.0, per_layer=False, **FAST),
                         per_token_path=tmp_path / "tok.h5")
    assert list(res.runs["set"]) == ["universal"] + ["control"] * 3
    with h5py.File(tmp_path / "tok.h5") as f:
        assert f["ce_ablated"].shape == (4, ts.n_rows, 32)
        counted = f["counted"][()]
        kl = f["kl"][()]
    np.testing.assert_allclose(np.nansum(kl, axis=(1, 2)) / counted.sum(), res.runs["kl"], rtol=1e-5)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_the_fix(lm, ts):
    cfg = AblationConfig(kind="zero", **FAST)
    with pytest.raises(UniversalNeuronsError, match=r"layer\(s\) \[5\] do not exist"):
        ablate(lm, [(5, 0)], ts, cfg)
    with pytest.raises(UniversalNeuronsError, match="d_mlp=64"):
        ablate(lm, [(0, 64)], ts, cfg)
    big = pd.DataFrame({"layer": np.repeat([0, 1], 128), "neuron": np.tile(np.arange(128), 2),
                        "is_universal": np.arange(256) % 50 == 0})
    with pytest.raises(UniversalNeuronsError, match="another shape"):
        ablation_study(lm, big, ts, cfg)
    with pytest.raises(UniversalNeuronsError, match="nothing to ablate"):
        ablation_study(lm, _table(lm, []), ts, cfg)
    empty = build_token_set(TEXT, lm.tokenizer, TokenSetConfig(ctx_len=32))
    empty.ids, empty.mask = empty.ids[:0], empty.mask[:0]
    with pytest.raises(UniversalNeuronsError, match="empty"):
        ablate(lm, [(0, 1)], empty, cfg)
    masked = build_token_set(TEXT, lm.tokenizer, TokenSetConfig(ctx_len=32))
    masked.mask = np.zeros_like(masked.mask)
    with pytest.raises(UniversalNeuronsError, match="no counted predictions"):
        ablate(lm, [(0, 1)], masked, cfg)
    with pytest.raises(UniversalNeuronsError, match="masks out every token"):
        ablate(lm, [(0, 1)], masked, AblationConfig(kind="mean"))
    with pytest.raises(UniversalNeuronsError, match="unknown ablation kind 'resample'"):
        AblationConfig(kind="resample")
    with pytest.raises(UniversalNeuronsError, match="needs a finite value"):
        AblationConfig(kind="fixed")
    with pytest.raises(UniversalNeuronsError, match="only used with kind='fixed'"):
        AblationConfig(kind="zero", value=1.0)
    with pytest.raises(UniversalNeuronsError, match="ci must be"):
        AblationConfig(ci=95)
    with pytest.raises(UniversalNeuronsError, match="means have shape"):
        ablate(lm, [(0, 1)], ts, AblationConfig(kind="mean"), means=np.zeros((3, 64)))
    too_many = _table(lm, [(1, i) for i in range(40)])
    with pytest.raises(UniversalNeuronsError, match="candidates for a control set"):
        ablation_study(lm, too_many, ts, cfg)


# ---------------------------------------------------------------------------- CLI and pipeline stage


def test_cli_ablate(model_dir, lm, ts, tmp_path, capsys):
    table = tmp_path / "universality.csv"
    save_universality_table(_table(lm, [(0, 2), (0, 8), (1, 1)]), table)
    tokens = ts.save(tmp_path / "tokens.h5")
    args = ["ablate", str(model_dir), "--checkpoint", "0", "--table", str(table), "--tokens", str(tokens),
            "-o", str(tmp_path / "out"), "--kind", "zero", "--controls", "2", "--bootstrap", "100"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "all layers: 3 neurons" in out and "layer 1: 1 neurons" in out
    summary = pd.read_csv(tmp_path / "out" / "ablation_summary.csv")
    assert list(summary["n_controls"]) == [2, 2, 2]
    assert cli(args) == 2
    assert "already holds ablation results" in capsys.readouterr().err
    assert cli(args[:-6] + ["--kind", "fixed", "-o", str(tmp_path / "o2")]) == 2
    assert "needs a finite value" in capsys.readouterr().err


def test_pipeline_stage_writes_reuses_and_refuses(lm, ts, tmp_path):
    fake = SimpleNamespace(out_dir=tmp_path, labels=["a", "b"], token_set=ts, table=_table(lm, [(0, 3), (1, 9)]),
                           model_provenance=[lm.provenance])
    held_out = build_token_set([SAMPLE_TEXT.lower()], lm.tokenizer, TokenSetConfig(ctx_len=32))
    cfg = AblationConfig(kind="mean", **FAST)
    out = ablation_stage(cfg, eval_tokens=held_out)(fake)
    groups = out["ablation"]["groups"]
    assert [g["group"] for g in groups] == ["all layers", "layer 0", "layer 1"] and groups[0]["n_neurons"] == 2
    res = AblationResult.load(tmp_path / "ablation")
    assert res.provenance["token_set"]["hash"] == held_out.hash
    assert res.provenance["means"].startswith("pipeline token set")
    assert ablation_stage(cfg, eval_tokens=held_out)(fake) == out  # reused
    with pytest.raises(UniversalNeuronsError, match="other inputs"):
        ablation_stage(AblationConfig(kind="zero", **FAST), eval_tokens=held_out)(fake)
    # a family without universal neurons: the stage reports it and lets the pipeline finish
    none = SimpleNamespace(**{**vars(fake), "out_dir": tmp_path / "none", "table": _table(lm, [])})
    assert ablation_stage(cfg)(none)["ablation"]["skipped"] == "no universal neurons"
