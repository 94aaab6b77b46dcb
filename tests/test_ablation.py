"""Ablation against independent references: TransformerLens' own loss on a copy of the model
with W_out rows zeroed (every position) and a hand-written masked hook (counted positions), a
planted constant neuron, the empty set; controls; the statistics against a naive bootstrap and
a planted harmful set; held-out tokens; hooks that do not attach; errors, CLI, stage."""

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
from universal_neurons.ablation import control_picks, counted_predictions, row_indices, token_relation
from universal_neurons.activations import (
    StoreConfig,
    TokenSetConfig,
    UniversalNeuronsError,
    build_token_set,
    cache_activations,
    load_model,
    mlp_activations,
    run_with_post_hooks,
    save_model_dir,
)
from universal_neurons.activations import hooks as hooks_module
from universal_neurons.activations.build import build_study_and_held_out
from universal_neurons.cli.main import main as cli
from universal_neurons.errors import IncompatibleInputsError, InputError
from universal_neurons.pipeline import PipelineConfig, run_pipeline

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
    cfg = AblationConfig(kind="zero", n_bootstrap=50, positions="all")  # zeroed rows act at every position
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


def test_counted_positions_write_only_where_the_mask_counts(lm, ts):
    """The default writes the ablated value where the mask is True only; BOS, EOS and newlines keep
    their activations. Reference: TransformerLens with a hand-written masked hook."""
    neurons = {0: [1, 5, 9, 20], 1: [3, 7]}
    value = 0.3
    mask = torch.from_numpy(ts.mask)

    def hook(idx):
        def fn(act, hook):  # noqa: ARG001
            act = act.clone()
            for i in idx:
                act[..., i] = torch.where(mask, torch.tensor(value, dtype=act.dtype), act[..., i])
            return act
        return fn

    fwd = [(f"blocks.{layer}.mlp.hook_post", hook(idx)) for layer, idx in neurons.items()]
    with torch.no_grad():
        logits = lm.model.run_with_hooks(torch.from_numpy(ts.ids).long(), fwd_hooks=fwd, return_type="logits")
    target = torch.from_numpy(ts.ids[:, 1:, None]).long()
    ref = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, target)[..., 0]
    assert AblationConfig().positions == "counted"
    m = ablate(lm, neurons, ts, AblationConfig(kind="fixed", value=value, n_bootstrap=50), per_token=True)
    counted = counted_predictions(ts.mask)[:, :-1]
    np.testing.assert_allclose(m.per_token["ce_ablated"][:, :-1][counted], ref.numpy()[counted], rtol=0, atol=1e-5)
    assert m.provenance["positions"] == "counted" and "mask is True" in m.provenance["written_at"]
    # writing at every position (BOS included) is another intervention, with another effect
    everywhere = ablate(lm, neurons, ts, AblationConfig(kind="fixed", value=value, n_bootstrap=50, positions="all"))
    assert abs(everywhere.delta_ce - m.delta_ce) > 1e-5 and everywhere.provenance["positions"] == "all"
    # with nothing masked the two are the same intervention
    all_in = build_token_set(TEXT, lm.tokenizer, NO_MASK)
    a = ablate(lm, neurons, all_in, AblationConfig(kind="fixed", value=value, n_bootstrap=50))
    b = ablate(lm, neurons, all_in, AblationConfig(kind="fixed", value=value, n_bootstrap=50, positions="all"))
    assert a.delta_ce == b.delta_ce and a.kl == b.kl
    with pytest.raises(UniversalNeuronsError, match="unknown positions"):
        AblationConfig(positions="masked")


def test_unknown_hook_name_is_an_error_not_a_zero_effect(model_dir, lm, ts, monkeypatch):
    ids = torch.from_numpy(ts.ids[:2]).long()
    with pytest.raises(UniversalNeuronsError, match="unknown hook kind"):
        hooks_module.hook_name(0, "mid")
    with pytest.raises(UniversalNeuronsError, match=r"layer\(s\) \[7\] do not exist"):
        run_with_post_hooks(lm, ids, {7: lambda act: act})
    # weight processing off: hook_post is an alias of the MLP's output-projection input, and still attaches
    raw = load_model(model_dir, checkpoint=0, device="cpu", process_weights=False)
    processed = ablate(lm, [(0, 1), (1, 2)], ts, AblationConfig(kind="zero", n_bootstrap=20))
    unprocessed = ablate(raw, [(0, 1), (1, 2)], ts, AblationConfig(kind="zero", n_bootstrap=20))
    assert unprocessed.delta_ce != 0 and unprocessed.delta_ce == pytest.approx(processed.delta_ce, abs=1e-5)
    # a name the bridge does not have is refused, never run as an unhooked (ΔCE = 0) pass
    real = hooks_module.hook_name
    monkeypatch.setattr(hooks_module, "hook_name", lambda layer, kind="post": real(layer, kind) + "_typo")
    for model in (lm, raw):
        with pytest.raises(IncompatibleInputsError, match="no hook point blocks.0.mlp.hook_post_typo"):
            ablate(model, [(0, 1)], ts, AblationConfig(kind="zero", n_bootstrap=20))
        with pytest.raises(IncompatibleInputsError, match="no hook point"):
            mlp_activations(model, ids)


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
        assert g.paired_delta_ce == pytest.approx(u.delta_ce - c.mean(), abs=1e-12)
        assert g.paired_delta_ce_lo <= g.paired_delta_ce_hi and g.p_value_min == pytest.approx(1 / 4)
        assert g.delta_ce_per_neuron == pytest.approx(u.delta_ce / u.n_neurons)
        assert g.paired_delta_ce_per_neuron == pytest.approx(g.paired_delta_ce / g.n_neurons)
        assert g.control_delta_ce_per_neuron == pytest.approx(c.mean() / u.n_neurons)
    np.testing.assert_allclose(res.runs["delta_ce_per_neuron"], res.runs["delta_ce"] / res.runs["n_neurons"])
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


def test_paired_interval_is_a_naive_bootstrap(lm, ts):
    """The summary's intervals, redone by hand from the per-row values: a loop over replicates, each
    resampling rows (the same rows for every set) and the control draws, with the documented seeds."""
    cfg = AblationConfig(kind="zero", n_controls=7, n_bootstrap=300, seed=4, ci=0.9)
    res = ablation_study(lm, _table(lm, [(0, 3), (0, 17), (1, 9)]), ts, cfg)
    rs = res.row_sums
    dce_rows = rs["ce_ablated"] - rs["ce_clean"]  # [set, row]
    R = len(rs["n"])
    for _, g in res.summary.iterrows():
        runs = res.runs[res.runs.group == g.group]
        u, ctrl = runs.index[runs.set == "universal"][0], runs.index[runs.set == "control"].to_numpy()
        uni, ctl, paired = [], [], []
        for b in range(cfg.n_bootstrap):
            idx = np.random.default_rng(np.random.SeedSequence([4, 2**31 - 1, 0, b])).integers(0, R, size=R)
            pick = np.random.default_rng(np.random.SeedSequence([4, 2**31 - 1, int(g.layer) + 2, b])).integers(0, 7, 7)
            per_set = dce_rows[:, idx].sum(1) / rs["n"][idx].sum()
            uni.append(per_set[u])
            ctl.append(np.mean([per_set[ctrl[j]] for j in pick]))
            paired.append(uni[-1] - ctl[-1])
        for col, reps in (("delta_ce", uni), ("control_delta_ce", ctl), ("paired_delta_ce", paired)):
            lo, hi = np.quantile(reps, [0.05, 0.95])
            assert g[f"{col}_lo"] == pytest.approx(lo, abs=1e-12) and g[f"{col}_hi"] == pytest.approx(hi, abs=1e-12)
        # the point estimate is on all rows, the same rows for the set and its controls
        assert g.paired_delta_ce == pytest.approx(dce_rows[u].sum() / rs["n"].sum()
                                                  - np.mean(dce_rows[ctrl].sum(1) / rs["n"].sum()), abs=1e-12)
    # the helpers the package uses are these seeds
    np.testing.assert_array_equal(row_indices(R, 4, 3),
                                  np.random.default_rng(np.random.SeedSequence([4, 2**31 - 1, 0, 3])).integers(0, R, R))
    assert control_picks(7, -1, 4, 5).shape == (5, 7)


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    """The tiny seed trained briefly on the sample text (it nearly memorises it), with held-out rows of
    that text: a model with neurons whose removal raises the loss."""
    from transformers import GPT2LMHeadModel

    tok = load_model(model_dir, checkpoint=0, device="cpu").tokenizer
    study, held = build_study_and_held_out(TEXT, tok, TokenSetConfig(ctx_len=32), share=0.25)
    hf = GPT2LMHeadModel.from_pretrained(model_dir / "checkpoint-0")
    torch.manual_seed(0)
    opt = torch.optim.Adam(hf.parameters(), lr=1e-2)
    ids = torch.from_numpy(study.ids).long()
    for _ in range(150):
        loss = hf(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = save_model_dir(hf.eval(), tok, tmp_path_factory.mktemp("trained") / "model", {"name": "trained"})
    return load_model(path, device="cpu"), held


def test_planted_harmful_set_is_significant_and_a_random_set_is_not(trained):
    """With the default settings (99 controls, 1000 replicates): the six largest-norm neurons of a
    trained model are significant at 0.05 and their paired interval excludes 0, for every seed; a
    random set of the same size is not, and its paired interval covers 0."""
    lm, held = trained
    norms = lm.model.W_out.detach().norm(dim=-1).numpy().ravel()  # [layer * d_mlp]
    top = np.argsort(norms)[::-1][:6]
    planted = [(int(i) // lm.d_mlp, int(i) % lm.d_mlp) for i in top]
    others = np.setdiff1d(np.arange(norms.size), top)
    assert AblationConfig().n_controls == 99
    for seed in range(3):
        cfg = AblationConfig(seed=seed)
        hit = ablation_study(lm, planted, held, cfg).summary.iloc[0]
        assert hit.group == "all layers" and hit.n_controls == 99 and hit.p_value_min == pytest.approx(0.01)
        assert hit.p_value <= 0.05 and hit.paired_delta_ce_lo > 0, hit.to_dict()
        assert hit.delta_ce_per_neuron == pytest.approx(hit.delta_ce / 6)
        draw = np.random.default_rng(100 + seed).choice(others, size=6, replace=False)
        random_set = [(int(i) // lm.d_mlp, int(i) % lm.d_mlp) for i in draw]
        miss = ablation_study(lm, random_set, held, cfg).summary.iloc[0]
        assert miss.p_value > 0.05 and miss.paired_delta_ce_lo <= 0 <= miss.paired_delta_ce_hi, miss.to_dict()


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


# ---------------------------------------------------------------------------- held-out tokens


def test_held_out_token_sets_are_disjoint_rows_of_the_same_text(lm):
    tok, cfg = lm.tokenizer, TokenSetConfig(ctx_len=32)
    full = build_token_set(TEXT, tok, cfg)
    study, held = build_study_and_held_out(TEXT, tok, cfg, share=0.25)
    assert held.n_rows == int(np.ceil(0.25 * full.n_rows)) and study.n_rows == full.n_rows - held.n_rows
    assert not set(study.source_rows) & set(held.source_rows)
    np.testing.assert_array_equal(held.ids, full.ids[held.source_rows])  # the same rows of the same stream
    assert study.source["held_out"]["hash"] == held.hash and held.source["held_out_from"]["hash"] == study.hash
    # with n_tokens the studied rows are exactly build_token_set's; the held-out ones come from the rest, capped
    cfg_n = TokenSetConfig(ctx_len=32, n_tokens=32 * 20)
    study_n, held_n = build_study_and_held_out(TEXT, tok, cfg_n, share=0.5, max_tokens=32 * 3)
    assert study_n.hash == build_token_set(TEXT, tok, cfg_n).hash and held_n.n_rows == 3
    assert not set(study_n.source_rows) & set(held_n.source_rows)
    # an explicit held-out set of an existing study set, with its own seed
    own = build_token_set(TEXT, tok, TokenSetConfig(ctx_len=32, n_tokens=32 * 5, seed=9), held_out_from=study_n)
    assert not set(own.source_rows) & set(study_n.source_rows) and own.source["held_out_from"]["hash"] == study_n.hash
    with pytest.raises(IncompatibleInputsError, match="not cut from this text"):
        build_token_set([SAMPLE_TEXT.lower() * 3], tok, cfg, held_out_from=study_n)
    # what the result records about them
    assert token_relation(held, study.hash)["relation_to_study"] == "held-out"
    assert token_relation(study, study.hash)["warning"]
    assert token_relation(study, None)["relation_to_study"] == "unknown"
    assert token_relation(own, study.hash)["relation_to_study"] == "different"
    # refused when no row is left to study, or none to hold out
    with pytest.raises(InputError, match="none is left for held-out tokens"):
        build_study_and_held_out(TEXT, tok, TokenSetConfig(ctx_len=32, n_tokens=32 * full.n_rows), share=0.1)


def test_run_pipeline_holds_rows_out_and_ablates_there(tiny_family, tokenizer, tmp_path):
    from universal_neurons.activations import TokenSet

    text = [SAMPLE_TEXT * 3, SAMPLE_TEXT[::-1] * 2, SAMPLE_TEXT.upper() * 2]
    cfg = PipelineConfig(tokens=TokenSetConfig(ctx_len=32), batch_rows=8, threshold=0.02)
    assert cfg.held_out_share == 0.1  # the default: a tenth of the rows, at most 16,384 tokens
    stage = ablation_stage(AblationConfig(kind="zero", **FAST))
    res = run_pipeline(tiny_family, text, tmp_path / "run", config=cfg, extra_stages=[stage])
    study, held = res.token_set, res.held_out
    n_avail = study.source["n_rows_available"]
    assert held.n_rows == int(np.ceil(0.1 * n_avail)) and study.n_rows + held.n_rows == n_avail
    assert not set(study.source_rows) & set(held.source_rows)
    assert TokenSet.load(tmp_path / "run" / "tokens_held_out.h5").hash == held.hash
    assert res.summary["held_out_tokens"]["hash"] == held.hash
    assert res.summary["held_out_tokens"]["disjoint_from"] == study.hash
    abl = AblationResult.load(tmp_path / "run" / "ablation")
    tokens = abl.provenance["token_set"]
    assert (tokens["hash"], tokens["relation_to_study"], tokens["disjoint_from"]) == (held.hash, "held-out", study.hash)
    assert abl.provenance["positions"] == "counted" and abl.provenance["warnings"] == []
    head = res.summary["ablation"]
    assert head["positions"] == "counted" and head["tokens"]["relation_to_study"] == "held-out"
    # no held-out share: measured on the studied tokens, and the result and its summary say so loudly
    same = run_pipeline(tiny_family, text, tmp_path / "same", config=cfg.replace(held_out_share=0.0),
                        extra_stages=[stage])
    assert same.held_out is None and not (tmp_path / "same" / "tokens_held_out.h5").exists()
    assert same.summary["ablation"]["tokens"]["relation_to_study"] == "same"
    assert "not on held-out tokens" in same.summary["ablation"]["warnings"][0]
    # refused before any activation is cached: no row left to study, or none to hold out
    words = SAMPLE_TEXT.split(" ")
    one_row = next(t for t in (" ".join(words[:k]) for k in range(1, len(words)))
                   if 31 <= len(tokenizer(t)["input_ids"]) < 62)  # one row of 1 + 31 tokens
    with pytest.raises(InputError, match="leaves none to study"):
        run_pipeline(tiny_family, [one_row], tmp_path / "short", config=cfg)
    with pytest.raises(InputError, match="none is left for held-out tokens"):
        run_pipeline(tiny_family, text, tmp_path / "all", config=cfg.replace(
            tokens=TokenSetConfig(ctx_len=32, n_tokens=32 * n_avail)))
    for d in ("short", "all"):
        assert not (tmp_path / d / "stores").exists() and not (tmp_path / d / "correlation.h5").exists()


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
    # the table does not record its tokens here: the result says "unknown"; counted positions by default
    res = AblationResult.load(tmp_path / "out")
    assert res.provenance["token_set"]["relation_to_study"] == "unknown" and res.provenance["positions"] == "counted"
    # tokens held out of the table's study set, and the study set itself (a loud warning, kept in the result)
    study = build_token_set(TEXT, lm.tokenizer, TokenSetConfig(ctx_len=32, n_tokens=32 * 20))
    held = build_token_set(TEXT, lm.tokenizer, TokenSetConfig(ctx_len=32, seed=3), held_out_from=study)
    save_universality_table(_table(lm, [(0, 2), (0, 8), (1, 1)]), tmp_path / "t2.csv",
                            provenance={"token_set": {"hash": study.hash}})
    for name, tokens, relation in (("held", held, "held-out"), ("same", study, "same")):
        path = tokens.save(tmp_path / f"{name}.h5")
        assert cli(["ablate", str(model_dir), "--checkpoint", "0", "--table", str(tmp_path / "t2.csv"), "--tokens",
                    str(path), "-o", str(tmp_path / name), "--kind", "zero", "--controls", "2", "--bootstrap", "50",
                    "--positions", "all"]) == 0
        out = capsys.readouterr().out
        res = AblationResult.load(tmp_path / name)
        assert res.provenance["token_set"]["relation_to_study"] == relation and f"({relation} relative" in out
        assert res.provenance["positions"] == "all" and "at all positions" in out
        assert bool(res.provenance["warnings"]) == (relation == "same") == ("WARNING" in out)


def test_cli_held_out_flags():
    from universal_neurons.cli import flags
    from universal_neurons.cli.main import build_parser

    a = build_parser("run").parse_args(["run", "m1", "m2", "--text", "t", "-o", "o", "--held-out-share", "0.25",
                                        "--held-out-tokens", "4096"])
    cfg = flags.pipeline_config(a)
    assert (cfg.held_out_share, cfg.held_out_tokens) == (0.25, 4096)
    with pytest.raises(UniversalNeuronsError, match="held_out_share"):
        PipelineConfig(held_out_share=1.0)
    ablate_help = _help_text(["ablate", "--help"])
    assert "HELD-OUT token set" in ablate_help and "--positions {counted,all}" in ablate_help
    assert "--held-out-share" in _help_text(["run", "--help"])


def _help_text(argv):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        cli(argv)
    return " ".join(buf.getvalue().split())


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
