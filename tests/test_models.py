import pytest
import torch

from universal_neurons.activations import (
    UniversalNeuronsError,
    hook_name,
    load_model,
    mlp_activations,
    parse_hook_name,
    run_with_post_hooks,
)


def test_activations_equal_run_with_cache(tiny_family, tokenizer):
    lm = load_model(tiny_family[0], checkpoint=0)
    torch.manual_seed(0)
    toks = torch.randint(0, len(tokenizer), (3, 32))
    acts = mlp_activations(lm, toks, kinds=("post", "pre"))
    _, cache = lm.model.run_with_cache(toks)
    assert len(acts) == 4
    for name, act in acts.items():
        assert torch.equal(act, cache[name])


def test_weight_processing_preserves_activations_and_loss(tiny_family, tokenizer):
    raw = load_model(tiny_family[0], process_weights=False)
    proc = load_model(tiny_family[0], process_weights=True)
    assert proc.provenance["weight_processing"]["fold_ln"] and not raw.provenance["weight_processing"]["fold_ln"]
    toks = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(1))
    a, b = mlp_activations(raw, toks), mlp_activations(proc, toks)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    la = raw.model(toks, return_type="loss")
    lb = proc.model(toks, return_type="loss")
    assert abs(la.item() - lb.item()) < 1e-4


def test_post_hooks_are_scoped_even_after_an_error(tiny_family, tokenizer):
    lm = load_model(tiny_family[0])
    toks = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(2))
    clean = run_with_post_hooks(lm, toks)

    def boom(act):
        raise ValueError("user bug")

    with pytest.raises(ValueError):
        run_with_post_hooks(lm, toks, {1: boom})
    torch.testing.assert_close(run_with_post_hooks(lm, toks), clean, atol=0, rtol=0)
    zeroed = run_with_post_hooks(lm, toks, {1: lambda a: a * 0})
    assert not torch.allclose(zeroed, clean)


def test_provenance_records_what_was_loaded(tiny_family):
    lm = load_model(tiny_family[1], checkpoint=0)
    p = lm.provenance
    assert p["checkpoint"] == 0 and p["source"] == "local"
    assert (p["n_layers"], p["d_mlp"]) == (2, 64)
    assert p["training_record"]["seed"] == 2
    assert "torch" in p["versions"]


def test_hook_names_round_trip():
    assert hook_name(3) == "blocks.3.mlp.hook_post"
    assert parse_hook_name(hook_name(5, "pre")) == (5, "pre")
    with pytest.raises(UniversalNeuronsError, match="not an MLP neuron hook"):
        parse_hook_name("blocks.3.attn.hook_z")


def test_bad_model_specs_have_clear_errors(tiny_family, tmp_path):
    with pytest.raises(UniversalNeuronsError, match=r"has no checkpoint 7; it has \[0\]"):
        load_model(tiny_family[0], checkpoint=7)
    with pytest.raises(UniversalNeuronsError, match="not a model directory"):
        load_model(tmp_path)
    with pytest.raises(UniversalNeuronsError, match="layer"):
        mlp_activations(load_model(tiny_family[0]), torch.zeros(1, 4, dtype=torch.long), layers=[5])


def test_missing_tokenizer_is_refused(tiny_family, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_family[0] / "checkpoint-0", d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(UniversalNeuronsError, match="no tokenizer"):
        load_model(d)


def test_hub_model_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UniversalNeuronsError, match=r"alias-gpt2-small-x21.*checkpoint-400.*huggingface-cli download"):
        load_model("stanford-gpt2-small-a", checkpoint=400)
