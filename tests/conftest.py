"""Shared fixtures: a small tokenizer and tiny GPT-2 seed families built offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("UNIVERSAL_NEURONS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    """Tests never touch the user's cache: one temporary cache per session, shared by the tests
    (and notebooks) that train the tiny demo family, so it is trained once."""
    import tempfile

    config._un_cache = tempfile.mkdtemp(prefix="universal-neurons-test-cache-")
    os.environ["XDG_CACHE_HOME"] = config._un_cache


def pytest_unconfigure(config):
    import shutil

    if getattr(config, "_un_cache", None):
        shutil.rmtree(config._un_cache, ignore_errors=True)

# Public-domain prose (Austen, Melville, the US Constitution) with newlines, so token sets
# have documents, newlines and varied statistics.
SAMPLE_TEXT = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.
However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other of their daughters.

Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world.
It is a way I have of driving off the spleen and regulating the circulation.

We the People of the United States, in Order to form a more perfect Union, establish Justice, insure domestic Tranquility, provide for the common defence, promote the general Welfare, and secure the Blessings of Liberty to ourselves and our Posterity, do ordain and establish this Constitution for the United States of America.
"""


def make_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on SAMPLE_TEXT, GPT-2 style (id 0 = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 20, trainer)
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot)


def make_family(root, seeds=(1, 2), steps=(0,), config=None, tokenizer=None):
    """Untrained tiny GPT-2 seeds saved as `root/seed-<k>/checkpoint-<step>/` (one init per seed;
    every step holds the same weights unless the caller changes them)."""
    from universal_neurons.activations import GPT2Config, checkpoint_dir, init_gpt2, save_model_dir

    tokenizer = tokenizer or make_tokenizer()
    config = config or GPT2Config(n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_ctx=32, d_vocab=len(tokenizer))
    dirs = []
    for k, seed in enumerate(seeds):
        model = init_gpt2(config, seed=seed)
        seed_dir = root / f"seed-{chr(ord('a') + k)}"
        for step in steps:
            save_model_dir(model, tokenizer, checkpoint_dir(seed_dir, step), {"seed": seed, "step": step, "name": seed_dir.name})
        dirs.append(seed_dir)
    return dirs


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


# GPT-2's pre-tokenisation regex (its encoder.py; what tokenizers' ByteLevel(use_regex=True) applies),
# not TikTokenConverter's default, which is cl100k's and splits whitespace and newlines differently
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2's real tokenizer (50,257 ids, `<|endoftext|>` = 50256 as BOS and EOS), built offline
    from the BPE ranks PyPI `openai-whisper` ships as `whisper/assets/gpt2.tiktoken` (installed
    with --no-deps by scripts/test.sh; located, never imported)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("whisper")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    asset = next((Path(f) / "assets" / "gpt2.tiktoken" for f in folders), None)
    if asset is None or not asset.is_file():
        pytest.skip("GPT-2's BPE ranks are not installed (whisper/assets/gpt2.tiktoken); run "
                    "`pip install --no-deps openai-whisper==20250625` (scripts/test.sh does)")
    pytest.importorskip("tiktoken", reason="reading gpt2.tiktoken needs `tiktoken` (the test extras)")
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    eot = "<|endoftext|>"
    backend = TikTokenConverter(vocab_file=str(asset), pattern=GPT2_PATTERN, extra_special_tokens=[eot]).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot, unk_token=eot)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, tokenizer):
    """Two untrained tiny GPT-2 seeds (2 layers, d_mlp 64, n_ctx 32), one checkpoint (step 0)."""
    return make_family(tmp_path_factory.mktemp("family"), tokenizer=tokenizer)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; a second one only thrashes on a shared 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
