"""Seed-family training: it learns language, seeds differ, a killed run resumes exactly."""

import numpy as np
import pytest
import torch

from universal_neurons.activations import GPT2Config, TokenSetConfig, build_token_set, list_checkpoints, load_model
from universal_neurons.demo import unigram_entropy
from universal_neurons.demo_data import demo_documents, demo_tokenizer
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.training import TrainConfig, log_spaced_steps, train_family, train_seed

N_CTX = 64


@pytest.fixture(scope="module")
def rows():
    tok = demo_tokenizer()
    docs = [d["text"] for _, d in zip(range(60), demo_documents("train"))]
    held = [d["text"] for _, d in zip(range(3), demo_documents("heldout"))]
    cfg = TokenSetConfig(ctx_len=N_CTX)
    return tok, build_token_set(docs, tok, cfg).ids, build_token_set(held, tok, cfg).ids[:64]


def small_config(**kw):
    model = GPT2Config(n_layers=1, d_model=64, n_heads=4, d_mlp=256, n_ctx=N_CTX, d_vocab=4096)
    return TrainConfig(model=model, **{"n_tokens": 160_000, "batch_rows": 16, "warmup_steps": 10,
                                       "n_checkpoints": 4, "eval_tokens": 4096, **kw})


def test_log_spaced_steps():
    assert log_spaced_steps(1000, 5) == [0, 16, 63, 250, 1000]
    assert log_spaced_steps(3, 5) == [0, 1, 2, 3]


def test_family_learns_language_and_seeds_differ(rows, tmp_path):
    tok, train, val = rows
    cfg = small_config()
    res = train_family(train, val, tok, config=cfg, seeds=[0, 1], family_dir=tmp_path, show_progress=False)
    entropy = unigram_entropy(train, 4096)
    for r in res:
        assert [rec["step"] for rec in r.records] == cfg.checkpoint_steps()
        assert r.records[0]["val_loss"] > np.log(4096) - 0.5  # at init: about uniform over the vocabulary
        # 160k tokens of a 1-layer model: already beyond unigram statistics (test_demo checks the demo's margin)
        assert r.final["val_loss"] < entropy - 0.2, (r.final["val_loss"], entropy)
        assert r.final["val_loss"] < r.records[0]["val_loss"] - 1.5
    model_a = load_model(res[0].seed_dir, process_weights=False)
    model_b = load_model(res[1].seed_dir, process_weights=False)
    assert not torch.allclose(model_a.model.W_in, model_b.model.W_in)
    assert list_checkpoints(res[0].seed_dir) == cfg.checkpoint_steps()
    # a second call reuses the finished family instead of retraining
    again = train_family(train, val, tok, config=cfg, seeds=[0, 1], family_dir=tmp_path, show_progress=False)
    assert [r.final["val_loss"] for r in again] == [r.final["val_loss"] for r in res]
    with pytest.raises(UniversalNeuronsError, match="another configuration"):
        train_family(train, val, tok, config=small_config(lr=1e-3), seeds=[0, 1], family_dir=tmp_path)


def test_killed_run_resumes_to_the_same_weights(rows, tmp_path, monkeypatch):
    tok, train, val = rows
    cfg = small_config(n_tokens=60_000)
    whole = train_seed(train, val, tok, config=cfg, seed=3, seed_dir=tmp_path / "whole", show_progress=False)

    import universal_neurons.training as training

    real = training.save_model_dir
    calls = {"n": 0}

    def dying_save(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        if calls["n"] == 3:  # killed right after the third checkpoint is on disk
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(training, "save_model_dir", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_seed(train, val, tok, config=cfg, seed=3, seed_dir=tmp_path / "resumed", show_progress=False)
    monkeypatch.setattr(training, "save_model_dir", real)
    assert len(list_checkpoints(tmp_path / "resumed")) == 3
    resumed = train_seed(train, val, tok, config=cfg, seed=3, seed_dir=tmp_path / "resumed", show_progress=False)
    assert [r["step"] for r in resumed.records] == [r["step"] for r in whole.records]
    wa = load_model(whole.seed_dir, process_weights=False).model.state_dict()
    wb = load_model(resumed.seed_dir, process_weights=False).model.state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_bad_training_input(rows, tmp_path):
    tok, train, val = rows
    with pytest.raises(UniversalNeuronsError, match="expected \\(rows, n_ctx=64\\)"):
        train_seed(train[:, :32], val, tok, config=small_config(), seed=0, seed_dir=tmp_path)
    with pytest.raises(UniversalNeuronsError, match="outside the model's vocabulary"):
        cfg = TrainConfig(model=GPT2Config(n_layers=1, d_model=64, n_heads=4, d_mlp=256, n_ctx=N_CTX, d_vocab=100))
        train_seed(train, val, tok, config=cfg, seed=0, seed_dir=tmp_path)
    with pytest.raises(UniversalNeuronsError, match="lower n_tokens or add text"):
        train_seed(train, val, tok, config=small_config(n_tokens=10**9), seed=0, seed_dir=tmp_path)
