"""Functional agreement: a model against itself agrees exactly; the numbers equal a direct
scipy computation from the two models' own logits (Hugging Face, not TransformerLens); JS is
symmetric; training makes seeds agree more than at initialisation; files, stage and CLI."""

import json

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax, rel_entr
from transformers import GPT2LMHeadModel

from universal_neurons.activations import GPT2Config, TokenSetConfig, build_token_set, checkpoint_dir
from universal_neurons.agreement import (
    AgreementConfig,
    AgreementResult,
    agreement_over_checkpoints,
    agreement_stage,
    fig_agreement,
    functional_agreement,
)
from universal_neurons.cli.main import main
from universal_neurons.demo_data import demo_documents, demo_tokenizer
from universal_neurons.errors import ConfigError, IncompatibleInputsError, OutputExistsError
from universal_neurons.pipeline import PipelineConfig, run_pipeline
from universal_neurons.training import TrainConfig, train_family

N_CTX = 32
FAST = AgreementConfig(n_bootstrap=200)
# float64 path against scipy on float32 logits from another library: both see the same float32
# logits up to rounding in the forward pass (measured: 1e-8 relative), well inside this tolerance.
RTOL, ATOL = 1e-6, 1e-9


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Three tiny seeds trained for ~80 steps on the demo corpus, checkpoints at steps 0, 1 and 78,
    and a held-out token set of 24 rows."""
    tok = demo_tokenizer()
    cfg = TokenSetConfig(ctx_len=N_CTX)
    train = build_token_set([d["text"] for _, d in zip(range(30), demo_documents("train"))], tok, cfg)
    held = build_token_set([d["text"] for _, d in zip(range(3), demo_documents("heldout"))], tok, cfg)
    model = GPT2Config(n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=N_CTX, d_vocab=len(tok))
    train_cfg = TrainConfig(model=model, n_tokens=40_000, batch_rows=16, warmup_steps=5, n_checkpoints=3,
                            eval_tokens=2048)
    root = tmp_path_factory.mktemp("agreement-family")
    res = train_family(train.ids, held.ids[-64:], tok, config=train_cfg, seeds=[0, 1, 2], family_dir=root,
                       show_progress=False)
    return {"seeds": [r.seed_dir for r in res], "steps": train_cfg.checkpoint_steps(),
            "tokens": held.select_rows(0, 24), "tokenizer": tok}


def test_a_model_against_itself_agrees_exactly(family):
    seed = family["seeds"][0]
    res = functional_agreement([seed, seed], family["tokens"], init=False, config=FAST)
    row = res.table.iloc[0]
    assert row.kl_am == 0.0 and row.kl_ma == 0.0 and row.js == 0.0
    assert row.top1 == 1.0 and row.top1_lo == 1.0
    assert row.n_predictions > 0


def _direct(seed_dirs, step, ts):
    """Per-metric means from each model's Hugging Face logits, scipy only, over the counted predictions."""
    ids = torch.from_numpy(ts.ids).long()
    logits = []
    for seed in seed_dirs:
        hf = GPT2LMHeadModel.from_pretrained(checkpoint_dir(seed, step)).eval()
        with torch.no_grad():
            logits.append(hf(ids).logits[:, :-1].double().numpy())  # [row, pos-1, d_vocab]
    counted = ts.mask[:, :-1] & ts.mask[:, 1:]  # predicting pos+1 from pos: both positions masked in
    lp_a, lp_m = (log_softmax(x[counted], axis=-1) for x in logits)  # [prediction, d_vocab]
    p_a, p_m = np.exp(lp_a), np.exp(lp_m)
    return {"kl_am": rel_entr(p_a, p_m).sum(-1).mean(), "kl_ma": rel_entr(p_m, p_a).sum(-1).mean(),
            "js": (jensenshannon(p_a, p_m, axis=-1) ** 2).mean(),  # natural log (scipy's default base)
            "top1": (logits[0][counted].argmax(-1) == logits[1][counted].argmax(-1)).mean(),
            "n": int(counted.sum())}


@pytest.mark.parametrize("step_index", [0, -1], ids=["init", "trained"])
def test_values_equal_a_direct_computation_and_js_is_symmetric(family, step_index):
    step = family["steps"][step_index]
    pair = family["seeds"][:2]
    ts = family["tokens"].select_rows(0, 6)
    want = _direct(pair, step, ts)
    res = functional_agreement(pair, ts, checkpoint=step, init=False, config=AgreementConfig(pairs="ordered",
                                                                                             n_bootstrap=50))
    ab, ba = res.table.iloc[0], res.table.iloc[1]
    assert (ab.a, ab.m, ba.a, ba.m) == ("a", "b", "b", "a")
    assert ab.n_predictions == want["n"]
    for metric in ("kl_am", "kl_ma", "js"):
        assert ab[metric] == pytest.approx(want[metric], rel=RTOL, abs=ATOL), metric
    assert ab.top1 == pytest.approx(want["top1"], abs=1e-12)
    assert 0 < ab.js < np.log(2)
    # symmetric: (b, a) swaps the KL directions and keeps JS and top-1 bit for bit
    assert ba.js == ab.js and ba.top1 == ab.top1
    assert ba.kl_am == ab.kl_ma and ba.kl_ma == ab.kl_am
    swapped = functional_agreement(pair[::-1], ts, checkpoint=step, init=False,
                                   config=AgreementConfig(n_bootstrap=50)).table.iloc[0]
    assert swapped.js == pytest.approx(ab.js, rel=1e-12) and swapped.kl_am == pytest.approx(ab.kl_ma, rel=1e-12)
    # float32 log-softmax: the documented error (docs/agreement.md) holds on these models
    f32 = functional_agreement(pair, ts, checkpoint=step, init=False,
                               config=AgreementConfig(dtype="float32", n_bootstrap=50)).table.iloc[0]
    for metric in ("kl_am", "kl_ma", "js"):
        assert abs(f32[metric] - ab[metric]) < 1e-5, (metric, f32[metric] - ab[metric])


def test_training_makes_seeds_agree_more_than_at_initialisation(family):
    res = agreement_over_checkpoints(family["seeds"], None, family["tokens"], config=AgreementConfig(pairs="all"))
    assert res.steps == family["steps"]
    assert len(res.table) == 3 * len(family["steps"])  # every unordered pair of three seeds, at each step
    init, final = res.by_step.iloc[0], res.by_step.iloc[-1]
    assert init.at_init and not final.at_init
    print(f"top-1 agreement: init {init.top1:.3f} [{init.top1_lo:.3f}, {init.top1_hi:.3f}], "
          f"trained {final.top1:.3f} [{final.top1_lo:.3f}, {final.top1_hi:.3f}]")
    assert final.top1_lo > init.top1_hi  # intervals apart, not just the point estimates
    trained = res.table[res.table["step"] == family["steps"][-1]]
    at_init = res.table[res.table["step"] == 0]
    assert (trained["top1"].to_numpy() > at_init["top1"].to_numpy()).all()  # every pair
    for k, row in res.by_step.iterrows():
        for metric in ("kl_am", "js", "top1"):
            assert row[f"{metric}_lo"] <= row[metric] <= row[f"{metric}_hi"]
    fig = fig_agreement(res)
    assert isinstance(fig, go.Figure) and len(fig.data) == 2 * (3 + 1)


def test_result_files_round_trip_and_refuse_overwrite(family, tmp_path):
    res = functional_agreement(family["seeds"][:2], family["tokens"], config=FAST)
    assert res.steps == [0, family["steps"][-1]]  # the final weights, with step 0 as the baseline
    assert res.provenance["token_set"]["hash"] == family["tokens"].hash
    assert res.provenance["mask_policy"]["exclude_newlines"] is True
    res.save(tmp_path)
    back = AgreementResult.load(tmp_path)
    assert back.table.equals(res.table) and back.steps == res.steps
    np.testing.assert_array_equal(back.rows["js"], res.rows["js"])
    with pytest.raises(OutputExistsError, match="overwrite"):
        res.save(tmp_path)
    res.save(tmp_path, overwrite=True)


def test_refusals(family, tmp_path):
    with pytest.raises(ConfigError, match="pairs"):
        AgreementConfig(pairs="some")
    with pytest.raises(ConfigError, match="at least two"):
        functional_agreement(family["seeds"][:1], family["tokens"])
    from conftest import make_family, make_tokenizer

    other = make_family(tmp_path, seeds=(5,), tokenizer=make_tokenizer(300))[0]
    with pytest.raises(IncompatibleInputsError, match="vocabular"):
        functional_agreement([family["seeds"][0], other], family["tokens"], init=False)


def test_stage_uses_the_runs_held_out_tokens(family, tmp_path):
    text = [d["text"] for _, d in zip(range(6), demo_documents("heldout"))]
    cfg = PipelineConfig(tokens=TokenSetConfig(ctx_len=N_CTX, n_tokens=4096), held_out_share=0.2,
                         held_out_tokens=768)
    stage = agreement_stage(config=FAST)
    run = run_pipeline(family["seeds"], text, tmp_path, config=cfg, extra_stages=[stage])
    got = run.summary["agreement"]
    assert got["tokens"]["hash"] == run.held_out.hash and got["tokens"]["which"].startswith("held-out")
    assert got["steps"] == family["steps"]  # every checkpoint the seeds saved
    assert [s["step"] for s in got["by_step"]] == family["steps"]
    saved = json.loads((tmp_path / "summary.json").read_text())["agreement"]
    assert saved["by_step"][-1]["top1"] == got["by_step"][-1]["top1"]
    assert (tmp_path / "agreement" / "agreement_by_step.csv").exists()
    # a second call reuses the result; other settings are refused unless overwrite
    assert stage(run)["agreement"]["by_step"] == got["by_step"]
    with pytest.raises(OutputExistsError, match="other inputs"):
        agreement_stage(config=AgreementConfig(n_bootstrap=100))(run)


def test_cli(family, tmp_path):
    ts_path = family["tokens"].save(tmp_path / "tokens.h5")
    seeds = [str(s) for s in family["seeds"][:2]]
    argv = ["agreement", *seeds, "--tokens", str(ts_path), "-o", str(tmp_path / "out"), "--steps", "all",
            "--bootstrap", "50"]
    assert main(argv) == 0
    res = AgreementResult.load(tmp_path / "out")
    assert res.steps == family["steps"] and res.provenance["config"]["n_bootstrap"] == 50
    assert main(argv) == 2  # refused: the result exists
    assert main([*argv, "--overwrite", "--steps", "0,78", "--pairs", "ordered"]) == 0
    assert AgreementResult.load(tmp_path / "out").steps == [0, 78]
