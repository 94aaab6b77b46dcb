"""The built-in demo corpus and its 4k-vocabulary tokenizer (no network needed).

Stage: tokens. Public-domain English prose (State of the Union addresses,
Moby-Dick, Jane Austen's six novels, the World English Bible) shipped inside the
package, split into a training part and a held-out part, with a byte-level BPE
tokenizer trained on the training part only. ``universal/data/DEMO_DATA.md``
lists the sources, licences and counts; ``scripts/build_demo_corpus.py``
rebuilds everything.

    >>> tok = demo_tokenizer()
    >>> doc = next(demo_documents("heldout"))
    >>> sorted(doc)
    ['source', 'text', 'title']
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Iterator

from universal_neurons.errors import ConfigError, InputError, InputNotFoundError

__all__ = ["DEMO_DATA_DIR", "DEMO_SPLITS", "demo_documents", "demo_tokenizer"]

DEMO_DATA_DIR: Path = Path(__file__).resolve().parent / "data"
DEMO_SPLITS: tuple[str, ...] = ("train", "heldout")  # held-out: every 20th document of each source

_EOT = "<|endoftext|>"  # id 0; BOS, EOS, unk and pad, as in GPT-2
_TOKENIZER_FILE = "demo_tokenizer.json"


def _split_path(split: str) -> Path:
    if split not in DEMO_SPLITS:
        raise ConfigError(
            f"unknown demo corpus split {split!r}: use one of {', '.join(map(repr, DEMO_SPLITS))}"
        )
    path = DEMO_DATA_DIR / f"demo_corpus_{split}.jsonl.xz"
    if not path.is_file():
        raise InputNotFoundError(
            f"demo corpus file {path} is missing: reinstall the package or run scripts/build_demo_corpus.py"
        )
    return path


def demo_documents(split: str = "train") -> Iterator[dict[str, str]]:
    """Read the demo corpus lazily, one document at a time, in the shipped order.

    Args:
        split: `"train"` (~5.0M tokens) or `"heldout"` (~0.27M tokens, never used to train
            the tokenizer).

    Returns:
        An iterator of dicts with keys `source` (`"sotu"`, `"moby_dick"`, `"austen"` or
        `"web_bible"`), `title` and `text`. Paragraphs in `text` are separated by
        `"\\n\\n"`, verse lines by `"\\n"`.

    Raises:
        ConfigError: an unknown split.
        InputNotFoundError: the data file is missing.
    """
    path = _split_path(split)  # checked now, not at the first next()
    return _read_jsonl_xz(path)


def _read_jsonl_xz(path: Path) -> Iterator[dict[str, str]]:
    with lzma.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def demo_tokenizer():
    """The demo corpus' byte-level BPE tokenizer as a Hugging Face fast tokenizer.

    Built from the tokenizer file itself (in transformers 5, building a GPT-2
    tokenizer from vocab/merges file paths silently gives an empty one).
    Nothing is added on encode, as with GPT-2: prepend `bos_token_id` yourself.

    Returns:
        A `transformers.PreTrainedTokenizerFast` with 4,096 tokens, whose bos/eos/unk/pad
        token is `"<|endoftext|>"` (id 0). `"\\n"` is one token.

    Raises:
        InputNotFoundError: the tokenizer file is missing.
        InputError: it loads empty or without `<|endoftext|>` at id 0.
    """
    from transformers import PreTrainedTokenizerFast  # heavy import: only when asked for

    path = DEMO_DATA_DIR / _TOKENIZER_FILE
    if not path.is_file():
        raise InputNotFoundError(
            f"demo tokenizer file {path} is missing: reinstall the package or run scripts/build_demo_corpus.py"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token=_EOT,
        eos_token=_EOT,
        unk_token=_EOT,
        pad_token=_EOT,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )
    if not tokenizer.encode("Hello world", add_special_tokens=False) or tokenizer.convert_tokens_to_ids(_EOT) != 0:
        raise InputError(
            f"demo tokenizer from {path} loaded empty or without {_EOT} at id 0: "
            "check the transformers version (>= 4.45) or rebuild with scripts/build_demo_corpus.py"
        )
    return tokenizer
