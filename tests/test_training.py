"""Seed-family training: it learns language, seeds differ, a killed run resumes exactly."""

import numpy as np
import pytest
import torch

from universal_neurons.activations import GPT2Config, TokenSetConfig, build_token_set, list_checkpoints, load_model
from universal_neurons.demo import unigram_entropy
from universal_neurons.demo_data import demo_documents, demo_tokenizer
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.training import TrainConfig, log_spaced_steps, next_token_loss, train_family, train_seed

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


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_loss_matches_cross_entropy_of_the_logits(bf16):
    """The fused unembedding + cross-entropy gives the loss and gradients of the plain
    `cross_entropy(model(batch).logits)`, in fp32 to float precision and in bf16 to its rounding."""
    from universal_neurons.activations import init_gpt2

    model = init_gpt2(small_config().model, seed=0)
    # 189 targets: one full chunk and a partial one
    batch = torch.randint(0, 4096, (3, N_CTX), generator=torch.Generator().manual_seed(0))

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(batch).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 4096), batch[:, 1:].reshape(-1))
    fused = next_token_loss(model, batch, bf16=bf16)
    with torch.no_grad():
        no_grad = next_token_loss(model, batch, bf16=bf16)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-2 if bf16 else 1e-6)
    assert no_grad.item() == fused.item()
    g_ref, g_fused = grads(ref), grads(fused)
    assert g_ref.keys() == g_fused.keys()
    for k in g_ref:  # the tied wte/lm_head gets both its embedding and its unembedding gradient
        err = ((g_fused[k] - g_ref[k]).norm() / g_ref[k].norm()).item()
        assert err < (1e-2 if bf16 else 1e-5), (k, err)


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
    with pytest.raises(UniversalNeuronsError, match="lower n_tokens, add text or raise max_epochs"):
        train_seed(train, val, tok, config=small_config(n_tokens=10**9), seed=0, seed_dir=tmp_path)


def test_checkpoint_fractions_add_late_checkpoints():
    cfg = small_config(checkpoint_fractions=(0.5, 0.75))
    n = cfg.n_steps
    assert cfg.checkpoint_steps() == sorted({*log_spaced_steps(n, 4), round(n / 2), round(0.75 * n)})
    assert len(cfg.checkpoint_steps()) == 6
    with pytest.raises(UniversalNeuronsError, match="strictly between 0 and 1"):
        small_config(checkpoint_fractions=(1.0,))


def test_epochs_repeat_every_row_once_per_pass(rows, tmp_path, monkeypatch):
    """Past one pass over the rows (max_epochs > 1) each pass visits every row once, in a new order."""
    import universal_neurons.training as training

    tok, train, val = rows
    few = train[:40]
    cfg = small_config(n_tokens=5 * 16 * N_CTX, max_epochs=2, n_checkpoints=2)  # 5 steps of 16 rows: 2 passes of 40
    with pytest.raises(UniversalNeuronsError, match="raise max_epochs"):
        train_seed(few, val, tok, config=cfg.replace(max_epochs=1), seed=0, seed_dir=tmp_path / "one")
    seen = []
    real = training.next_token_loss

    def recording(model, batch, **kw):
        if torch.is_grad_enabled():  # training steps, not validation
            seen.extend(tuple(r) for r in batch.tolist())
        return real(model, batch, **kw)

    monkeypatch.setattr(training, "next_token_loss", recording)
    train_seed(few, val, tok, config=cfg, seed=0, seed_dir=tmp_path / "two", show_progress=False)
    rows_ = [tuple(r) for r in few.tolist()]
    assert sorted(seen[:40]) == sorted(rows_)  # the first pass: every row once
    assert len(seen) == 80 and sorted(seen[40:]) == sorted(rows_)
    assert seen[40:] != seen[:40]  # a fresh order for the second pass
