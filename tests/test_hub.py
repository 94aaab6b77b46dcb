"""Hub names at a checkpoint, offline: the main use case (`stanford-gpt2-small-a` at
`--checkpoint 400000`, a Pythia seed at a step) loaded from a Hugging Face cache laid out
on disk, every model checked before any is loaded, and GPT-2's real tokenizer and mask.

The cache is what `hf download <repo> --revision <rev>` leaves: `models--<owner>--<name>/`
with the files in `snapshots/<commit>/` and `refs/<revision>` holding that commit. The models
are tiny (2 layers, d_mlp 64) with the official architectures (GPT-2, GPT-NeoX);
TransformerLens reads their config from the cache like any other, so nothing but their size
differs from the real seeds.
"""

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import SAMPLE_TEXT
from universal_neurons.activations import (
    GPT2Config,
    TokenSetConfig,
    build_token_set,
    check_available,
    init_gpt2,
    load_model,
    mlp_activations,
    save_model_dir,
)
from universal_neurons.cli.main import main as cli
from universal_neurons.errors import ConfigError, InputError, InputNotFoundError, ModelUnavailableError
from universal_neurons.pipeline import PipelineConfig, run_pipeline

STANFORD = {"stanford-gpt2-small-a": "stanford-crfm/alias-gpt2-small-x21",
            "stanford-gpt2-small-b": "stanford-crfm/battlestar-gpt2-small-x49"}
PYTHIA = {"pythia-160m-seed1": "EleutherAI/pythia-160m-seed1", "pythia-160m-seed2": "EleutherAI/pythia-160m-seed2"}
TEXT = [SAMPLE_TEXT * 3, SAMPLE_TEXT[::-1] * 2, SAMPLE_TEXT.upper() * 2]


def tiny_gpt2(tokenizer, seed: int):
    return init_gpt2(GPT2Config(n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_ctx=32, d_vocab=len(tokenizer)),
                     seed=seed)


def tiny_pythia(tokenizer, seed: int):
    """A GPT-NeoX (Pythia's architecture: rotary on a quarter of each head, parallel residual)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, rotary_pct=0.25, use_parallel_residual=True,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPTNeoXForCausalLM(cfg)


class HubCache:
    """A Hugging Face hub cache in a temporary folder, used offline for one test only."""

    def __init__(self, root):
        self.root = root

    def add(self, repo: str, revisions, model, tokenizer) -> str:
        """`repo` at each of `revisions`, all naming one snapshot; returns its fake commit."""
        commit = hashlib.sha1(repo.encode()).hexdigest()
        folder = self.root / ("models--" + repo.replace("/", "--"))
        snapshot = folder / "snapshots" / commit
        model.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        for rev in revisions:
            (folder / "refs" / rev).write_text(commit)
        return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and a temporary HF_HOME / HF_HUB_CACHE for this test only.

    huggingface_hub reads these variables once, when it is imported, so its module constants
    are patched as well; `HF_HUB_OFFLINE` in the environment is what the toolkit reads."""
    from huggingface_hub import constants

    root = tmp_path / "hf" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(root.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return HubCache(root)


def _tokens(tokenizer, n: int = 3):
    return torch.randint(0, len(tokenizer), (n, 32), generator=torch.Generator().manual_seed(0))


def _same_activations(hub, local, tokenizer):
    a, b = mlp_activations(hub, _tokens(tokenizer)), mlp_activations(local, _tokens(tokenizer))
    assert list(a) == list(b) == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------- loading at a checkpoint


def test_stanford_seed_at_a_checkpoint_loads_from_the_hub_cache(hub_cache, tokenizer, tmp_path):
    model = tiny_gpt2(tokenizer, seed=1)
    hub_cache.add(STANFORD["stanford-gpt2-small-a"], ["checkpoint-400000"], model, tokenizer)
    local = save_model_dir(model, tokenizer, tmp_path / "local-a", {"name": "local-a"})

    lm = load_model("stanford-gpt2-small-a", checkpoint=400000, device="cpu")
    p = lm.provenance
    assert (p["name"], p["source"]) == ("stanford-gpt2-small-a", "hub")
    assert p["resolved"] == STANFORD["stanford-gpt2-small-a"]
    assert (p["checkpoint"], p["revision"]) == (400000, "checkpoint-400000")
    assert (lm.n_layers, lm.d_mlp) == (2, 64)
    _same_activations(lm, load_model(local, device="cpu"), tokenizer)

    # a published step that is not cached, a step that was never published, a model without checkpoints
    with pytest.raises(ModelUnavailableError, match=r"cache .* lacks the config.json, weights, tokenizer files of "
                                                    r"stanford-crfm/alias-gpt2-small-x21 at revision checkpoint-399000"
                                                    r".*hf download"):
        load_model("stanford-gpt2-small-a", checkpoint=399000, device="cpu")
    with pytest.raises(ConfigError, match=r"no checkpoint 400001.*0 to 400000.*nearest are 399000 and 400000"):
        check_available("stanford-gpt2-small-a", 400001)
    with pytest.raises(ConfigError, match="no training checkpoints"):
        check_available("gpt2", 1000)


def test_pythia_seed_at_a_step_loads_from_the_hub_cache(hub_cache, tokenizer, tmp_path):
    model = tiny_pythia(tokenizer, seed=1)
    hub_cache.add(PYTHIA["pythia-160m-seed1"], ["step1000"], model, tokenizer)
    local = tmp_path / "local-pythia"
    model.save_pretrained(local)
    tokenizer.save_pretrained(local)

    lm = load_model("pythia-160m-seed1", checkpoint=1000, device="cpu")
    p = lm.provenance
    assert (p["source"], p["resolved"], p["checkpoint"], p["revision"]) == (
        "hub", "EleutherAI/pythia-160m-seed1", 1000, "step1000")
    assert lm.model.cfg.architecture == "GPTNeoXForCausalLM"
    _same_activations(lm, load_model(local, device="cpu"), tokenizer)
    with pytest.raises(ModelUnavailableError, match=r"pythia-160m-seed1 at revision step2000"):
        check_available("pythia-160m-seed1", 2000)


def test_incomplete_cache_and_model_directories_are_refused_before_loading(hub_cache, tokenizer, tmp_path):
    model = tiny_gpt2(tokenizer, seed=1)
    commit = hub_cache.add(STANFORD["stanford-gpt2-small-a"], ["checkpoint-400000"], model, tokenizer)
    snapshot = hub_cache.root / "models--stanford-crfm--alias-gpt2-small-x21" / "snapshots" / commit
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailableError, match=r"lacks the weights of"):
        check_available("stanford-gpt2-small-a", 400000)
    model.save_pretrained(snapshot)
    (snapshot / "tokenizer.json").unlink()  # tokenizer_config.json alone builds no tokenizer
    assert (snapshot / "tokenizer_config.json").exists()
    with pytest.raises(ModelUnavailableError, match=r"lacks the tokenizer files of"):
        check_available("stanford-gpt2-small-a", 400000)

    local = save_model_dir(model, tokenizer, tmp_path / "m", {})
    (local / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights"):
        check_available(local)
    with pytest.raises(InputNotFoundError, match="does not exist"):
        check_available(tmp_path / "nowhere" / "seed-a")


# ---------------------------------------------------------------------------- cache / run through hub names


def test_cli_tokenize_and_cache_through_hub_names(hub_cache, tokenizer, tmp_path, capsys):
    model = tiny_gpt2(tokenizer, seed=1)
    # the hub's main branch holds the final weights: `tokenize --model` loads them for the tokenizer
    hub_cache.add(STANFORD["stanford-gpt2-small-a"], ["checkpoint-400000", "main"], model, tokenizer)
    local = save_model_dir(model, tokenizer, tmp_path / "local-a", {})
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    ts = tmp_path / "tokens.h5"
    assert cli(["tokenize", str(text), "--model", "stanford-gpt2-small-a", "-o", str(ts), "--ctx-len", "32"]) == 0
    for model_args, out in ((["stanford-gpt2-small-a", "--checkpoint", "400000"], "hub.h5"),
                            ([str(local)], "local.h5")):
        code = cli(["cache", *model_args, "--tokens", str(ts), "-o", str(tmp_path / out), "--fp32"])
        assert code == 0, capsys.readouterr().err
    with h5py.File(tmp_path / "hub.h5") as hub, h5py.File(tmp_path / "local.h5") as loc:
        for name in ("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"):
            np.testing.assert_array_equal(hub[name][:], loc[name][:], err_msg=name)
    from universal_neurons.activations import ActivationStore

    with ActivationStore.open(tmp_path / "hub.h5") as s:
        assert (s.model["resolved"], s.model["checkpoint"], s.model["revision"]) == (
            STANFORD["stanford-gpt2-small-a"], 400000, "checkpoint-400000")


def test_cli_run_through_stanford_names_at_a_checkpoint(hub_cache, tokenizer, tmp_path, capsys):
    locals_ = []
    for seed, (alias, repo) in enumerate(STANFORD.items(), start=1):
        model = tiny_gpt2(tokenizer, seed=seed)
        hub_cache.add(repo, ["checkpoint-400000"], model, tokenizer)
        locals_.append(save_model_dir(model, tokenizer, tmp_path / f"local-{alias[-1]}", {}))
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    common = ["--text", str(text), "--ctx-len", "32", "--batch-rows", "8", "--skip", "agreement,report"]
    assert cli(["run", *STANFORD, "--checkpoint", "400000", "-o", str(tmp_path / "hub"), *common]) == 0, \
        capsys.readouterr().err
    summary = json.loads((tmp_path / "hub" / "summary.json").read_text())
    models = summary["inputs"]["models"]
    assert [(m["name"], m["resolved"], m["checkpoint"], m["revision"]) for m in models] == [
        (alias, repo, 400000, "checkpoint-400000") for alias, repo in STANFORD.items()]
    assert {"properties", "ablation"} <= set(summary)  # the later stages reload the models from their provenance

    assert cli(["run", *map(str, locals_), "-o", str(tmp_path / "local"), *common]) == 0, capsys.readouterr().err
    for label in ("a", "b"):
        with h5py.File(tmp_path / "hub" / "stores" / f"{label}.h5") as hub, \
                h5py.File(tmp_path / "local" / "stores" / f"{label}.h5") as loc:
            for name in ("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"):
                np.testing.assert_array_equal(hub[name][:], loc[name][:], err_msg=f"{label} {name}")


def test_run_pipeline_through_pythia_names_at_a_step(hub_cache, tokenizer, tmp_path):
    for seed, repo in enumerate(PYTHIA.values(), start=1):
        hub_cache.add(repo, ["step1000"], tiny_pythia(tokenizer, seed=seed), tokenizer)
    cfg = PipelineConfig(tokens=TokenSetConfig(ctx_len=32), batch_rows=8)
    res = run_pipeline(list(PYTHIA), TEXT, tmp_path / "run", checkpoint=1000, config=cfg)
    assert [(m["resolved"], m["checkpoint"], m["revision"]) for m in res.model_provenance] == [
        (repo, 1000, "step1000") for repo in PYTHIA.values()]
    assert len(res.table) == 2 * 64 and res.table["excess_corr"].notna().all()


# ---------------------------------------------------------------------------- every model checked first


def test_run_with_a_missing_last_model_fails_before_loading_the_first(hub_cache, tokenizer, tmp_path, capsys,
                                                                      monkeypatch):
    import universal_neurons.pipeline as pipeline

    hub_cache.add(STANFORD["stanford-gpt2-small-a"], ["checkpoint-400000"], tiny_gpt2(tokenizer, 1), tokenizer)
    loaded, real = [], pipeline.load_model

    def recording(spec, **kw):
        loaded.append(spec)
        return real(spec, **kw)

    monkeypatch.setattr(pipeline, "load_model", recording)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    out = tmp_path / "run"
    code = cli(["run", *STANFORD, "--checkpoint", "400000", "--text", str(text), "-o", str(out), "--ctx-len", "32"])
    err = capsys.readouterr().err
    assert code == 2 and loaded == [] and not out.exists()
    assert "'stanford-gpt2-small-b'" in err and "battlestar-gpt2-small-x49 at revision checkpoint-400000" in err
    assert "hf download stanford-crfm/battlestar-gpt2-small-x49 --revision checkpoint-400000" in err

    # local seeds: the last one lacking the checkpoint, or missing altogether
    from tests.conftest import make_family

    fam = make_family(tmp_path / "fam", steps=(0, 5), tokenizer=tokenizer)
    shutil.rmtree(fam[1] / "checkpoint-5")
    with pytest.raises(InputNotFoundError, match=r"seed-b has no checkpoint 5; it has \[0\]"):
        run_pipeline(fam, TEXT, out, checkpoint=5)
    with pytest.raises(InputNotFoundError, match="missing-seed does not exist"):
        run_pipeline([fam[0], tmp_path / "missing-seed"], TEXT, out)
    assert loaded == []


# ---------------------------------------------------------------------------- GPT-2's tokenizer and mask


def test_gpt2_tokenizer_is_gpt2s(gpt2_tokenizer):
    assert gpt2_tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert len(gpt2_tokenizer) == 50257
    assert gpt2_tokenizer.bos_token_id == gpt2_tokenizer.eos_token_id == 50256
    assert gpt2_tokenizer.decode([50256]) == "<|endoftext|>"
    assert gpt2_tokenizer.decode([198]) == "\n" and gpt2_tokenizer.decode([628]) == "\n\n"
    # GPT-2's regex splits a blank line before a word into two 198s; "\n\n" (628) ends a run or a text
    assert gpt2_tokenizer("a\n\nb")["input_ids"] == [64, 198, 198, 65]
    assert gpt2_tokenizer("a\n\n\nb")["input_ids"] == [64, 628, 198, 65]


def test_default_mask_for_gpt2_masks_198_not_628(gpt2_tokenizer):
    docs = ["First line.\nSecond line.\n\n\nA new paragraph.\n\n", "One more.\nAnd the last.\n\n"] * 4
    paper = build_token_set(docs, gpt2_tokenizer, TokenSetConfig(ctx_len=16))
    ids, mask = paper.ids, paper.mask
    assert (ids == 198).any() and (ids == 628).any()
    assert not mask[ids == 198].any()  # the paper's mask: the single "\n" token
    assert mask[ids == 628].all()  # "\n\n" is counted, as in the paper
    assert paper.source["newline_rule"] == "paper" and paper.source["newline_ids"] == [198]

    wide = build_token_set(docs, gpt2_tokenizer, TokenSetConfig(ctx_len=16, newline_mask="all"))
    np.testing.assert_array_equal(wide.ids, ids)
    assert not wide.mask[ids == 198].any() and not wide.mask[ids == 628].any()
    assert wide.source["newline_rule"] == "all" and {198, 628} <= set(wide.source["newline_ids"])
    assert wide.n_counted < paper.n_counted
