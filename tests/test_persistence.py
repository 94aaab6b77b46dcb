"""Persistence across checkpoints: hand counts on constructed universality tables, refusals, and
the whole per-checkpoint pipeline on a tiny two-checkpoint family (with reuse of earlier runs)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import SAMPLE_TEXT, make_family
from universal_neurons import PersistenceResult, persistence_from_tables, persistence_stage, run_persistence
from universal_neurons.activations import (
    GPT2Config,
    TokenSetConfig,
    checkpoint_dir,
    init_gpt2,
    load_token_set,
    save_model_dir,
)
from universal_neurons.cli.main import main as cli
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.pipeline import PipelineConfig, run_pipeline

TEXT = [SAMPLE_TEXT * 3, SAMPLE_TEXT[::-1] * 2, SAMPLE_TEXT.upper() * 2]
N = np.nan

# 2 layers x 3 neurons; flat index = layer * 3 + neuron
UNIVERSAL = {0: [0, 1, 4], 100: [1, 4, 5], 200: []}
# partners (flat index into the other model, -1 = dead) per step and model
PARTNERS = {
    0: {"b": [3, 2, 0, 1, 5, -1], "c": [0, 1, 2, 3, 4, 5]},
    100: {"b": [3, 0, 0, 1, 5, -1], "c": [1, 1, 2, 3, 0, 5]},  # b: neuron 1 moved; c: neurons 0 and 4 moved
    200: {"b": [3, 0, 0, 1, 5, -1], "c": [1, 1, 2, 3, 0, 5]},
}


def _table(step: int) -> pd.DataFrame:
    flat = np.arange(6)
    uni = np.isin(flat, UNIVERSAL[step])
    excess = np.where(uni, 0.8, 0.1)
    if step == 200:
        excess[2] = np.nan  # a dead neuron
    cols = {"layer": flat // 3, "neuron": flat % 3, "excess_corr": excess, "is_universal": uni}
    for m, p in PARTNERS[step].items():
        p = np.asarray(p)
        cols[f"partner_layer_{m}"] = np.where(p >= 0, p // 3, -1)
        cols[f"partner_neuron_{m}"] = np.where(p >= 0, p % 3, -1)
    return pd.DataFrame(cols)


@pytest.fixture
def tables():
    return {s: _table(s) for s in (200, 0, 100)}  # order of the dict does not matter


def test_hand_counted_persistence(tables, tmp_path):
    res = persistence_from_tables(tables)
    assert res.steps == [0, 100, 200]
    expected = np.array([[1, 2 / 3, 0], [2 / 3, 1, 0], [N, N, N]])  # U_200 is empty: its row is undefined
    np.testing.assert_allclose(res.overall.to_numpy(), expected)
    pl = res.per_layer.set_index(["layer", "t", "t2"])["persistence"]
    assert pl[(0, 0, 100)] == 0.5 and pl[(1, 0, 100)] == 1.0 and pl[(0, 100, 0)] == 1.0 and pl[(1, 100, 0)] == 0.5
    assert np.isnan(pl[(0, 200, 0)]) and pl[(0, 0, 0)] == 1.0 and pl[(1, 0, 200)] == 0.0
    pc = res.partner_consistency.set_index(["model", "t", "t2"])
    assert pc.loc[("b", 0, 100), "consistency"] == 2 / 3  # of {0, 1, 4}: 0 and 4 keep their partner in b
    assert pc.loc[("c", 0, 100), "consistency"] == 1 / 3  # only 1 keeps its partner in c
    assert pc.loc[("mean", 0, 100), "consistency"] == 0.5
    assert pc.loc[("b", 0, 100), "consistency_persistent"] == 0.5  # of {1, 4}: 4
    assert pc.loc[("b", 100, 0), "consistency"] == 1 / 3  # of {1, 4, 5}: 4 (5's partner is dead at both)
    assert pc.loc[("b", 100, 100), "consistency"] == 2 / 3  # a dead partner never counts, even against itself
    assert pc.loc[("c", 0, 0), "consistency"] == 1.0 and np.isnan(pc.loc[("c", 200, 0), "consistency"])
    em = res.emergence.set_index(["step", "layer"])
    assert em.loc[(0, 0), "n_universal"] == 2 and em.loc[(100, 1), "n_universal"] == 2
    assert em.loc[(200, 1), "n_universal"] == 0 and em.loc[(0, 1), "n_neurons"] == 3
    assert em.loc[(0, 0), "fraction"] == 2 / 3
    np.testing.assert_allclose(em.loc[(0, 0), "mean_excess"], (0.8 + 0.8 + 0.1) / 3)
    assert em.loc[(200, 0), "mean_excess"] == pytest.approx(0.1)  # the dead neuron's NaN is skipped
    # re-flagging with another threshold: everything but the dead neuron is universal
    low = persistence_from_tables(tables, threshold=0.05)
    assert low.overall.loc[0, 200] == 5 / 6 and low.overall.loc[200, 0] == 1.0
    # save / load round trip
    res.save(tmp_path / "p")
    back = PersistenceResult.load(tmp_path / "p")
    assert back.steps == res.steps
    pd.testing.assert_frame_equal(back.overall, res.overall, check_names=False)
    for name in ("per_layer", "partner_consistency", "emergence"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(res, name), check_dtype=False, obj=name)
    with pytest.raises(UniversalNeuronsError, match="already holds persistence"):
        res.save(tmp_path / "p")


def test_self_comparison_is_one(tables):
    same = persistence_from_tables({0: tables[0], 5: tables[0].copy()})
    np.testing.assert_array_equal(same.overall.to_numpy(), np.ones((2, 2)))
    assert (same.per_layer["persistence"] == 1.0).all()
    mean = same.partner_consistency.query("model == 'mean'")
    np.testing.assert_allclose(mean["consistency"], 1.0)  # no universal neuron of this table has a dead partner


def test_bad_tables_are_refused(tables):
    with pytest.raises(UniversalNeuronsError, match="at least two"):
        persistence_from_tables({0: tables[0]})
    with pytest.raises(UniversalNeuronsError, match="same shapes"):
        persistence_from_tables({0: tables[0], 100: tables[100].iloc[:4]})
    with pytest.raises(UniversalNeuronsError, match="partner models"):
        persistence_from_tables({0: tables[0], 100: tables[100].drop(columns=["partner_layer_c", "partner_neuron_c"])})
    with pytest.raises(UniversalNeuronsError, match="lacks"):
        persistence_from_tables({0: tables[0], 100: tables[100].drop(columns=["is_universal"])})


def _two_checkpoint_family(root, tokenizer):
    """Seeds 1 and 2 at step 0 (their init) and step 10 (the init moved by small seeded noise)."""
    cfg = GPT2Config(n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_ctx=32, d_vocab=len(tokenizer))
    dirs = make_family(root, seeds=(1, 2), steps=(0,), config=cfg, tokenizer=tokenizer)
    g = torch.Generator().manual_seed(0)
    for seed, d in zip((1, 2), dirs):
        model = init_gpt2(cfg, seed=seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
        save_model_dir(model, tokenizer, checkpoint_dir(d, 10), {"seed": seed, "step": 10, "name": d.name})
    return dirs


def test_run_persistence_on_a_tiny_family_reuses_checkpoint_runs(tmp_path, tokenizer, capsys):
    dirs = _two_checkpoint_family(tmp_path / "family", tokenizer)
    cfg = PipelineConfig(tokens=TokenSetConfig(ctx_len=32, n_tokens=32 * 16), batch_rows=8, threshold=0.001)
    out = tmp_path / "run"
    res = run_persistence(dirs, None, TEXT, out, config=cfg)  # steps: every saved checkpoint
    assert res.steps == [0, 10]
    for t in (0, 10):
        for f in ("tokens.h5", "stores/a.h5", "stores/b.h5", "correlation.h5", "universality.csv", "summary.json"):
            assert (out / "checkpoints" / f"step-{t}" / f).exists(), (t, f)
    for f in ("persistence_overall.csv", "persistence_per_layer.csv", "partner_consistency.csv", "emergence.csv",
              "persistence.json"):
        assert (out / "persistence" / f).exists(), f
    n_uni = res.provenance["n_universal"]
    assert all(v > 0 for v in n_uni.values()), n_uni  # threshold 0 leaves both sets non-empty
    np.testing.assert_array_equal(np.diag(res.overall.to_numpy()), [1.0, 1.0])
    assert 0.0 <= res.overall.loc[0, 10] <= 1.0
    em = res.emergence.set_index(["step", "layer"])
    assert em["n_universal"].groupby("step").sum().to_dict() == {0: n_uni["0"], 10: n_uni["10"]}
    summaries = {t: json.loads((out / "checkpoints" / f"step-{t}" / "summary.json").read_text()) for t in (0, 10)}
    assert [m["checkpoint"] for m in summaries[10]["inputs"]["models"]] == [10, 10]
    assert summaries[0]["inputs"]["token_set"]["hash"] == summaries[10]["inputs"]["token_set"]["hash"]

    # a second call reuses every per-checkpoint store and correlation result
    reused = [out / "checkpoints" / f"step-{t}" / f for t in (0, 10) for f in ("correlation.h5", "stores/a.h5")]
    mtimes = [p.stat().st_mtime_ns for p in reused]
    again = run_persistence(dirs, [10, 0], TEXT, out, config=cfg)
    assert [p.stat().st_mtime_ns for p in reused] == mtimes
    pd.testing.assert_frame_equal(again.overall, res.overall)
    # the CLI on the same directory (token set from the first run) reuses them too
    assert cli(["persistence", *map(str, dirs), "--text", str(out / "checkpoints" / "step-0" / "tokens.h5"),
                "-o", str(out), "--threshold", "0.001", "--batch-rows", "8"]) == 0
    assert [p.stat().st_mtime_ns for p in reused] == mtimes
    text = capsys.readouterr().out
    assert "persistence |U_t ∩ U_t'|/|U_t| of consecutive checkpoints: 0->10:" in text
    pd.testing.assert_frame_equal(PersistenceResult.load(out / "persistence").overall, res.overall,
                                  check_names=False)

    # as a pipeline stage: the main run is the final checkpoint, step 0 is run beside it
    ts = load_token_set(out / "checkpoints" / "step-0" / "tokens.h5")
    main = run_pipeline(dirs, ts, tmp_path / "main", config=cfg, extra_stages=[persistence_stage()])
    summary = json.loads((tmp_path / "main" / "summary.json").read_text())
    assert summary["persistence"]["steps"] == [0, 10]
    assert summary["persistence"]["adjacent"][0]["persistence"] == pytest.approx(res.overall.loc[0, 10])
    assert (main.out_dir / "checkpoints" / "step-0" / "correlation.h5").exists()
    assert not (main.out_dir / "checkpoints" / "step-10").exists()  # the main run is that checkpoint

    # steps a seed lacks, a single step, hub models without steps
    with pytest.raises(UniversalNeuronsError, match="no checkpoint 5"):
        run_persistence(dirs, [0, 5], TEXT, out, config=cfg)
    with pytest.raises(UniversalNeuronsError, match="at least two steps"):
        run_persistence(dirs, [0], TEXT, out, config=cfg)
    with pytest.raises(UniversalNeuronsError, match="pass the steps"):
        run_persistence(["stanford-gpt2-small-a", "stanford-gpt2-small-b"], None, TEXT, out, config=cfg)
