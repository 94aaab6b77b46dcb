"""universal_neurons.activations.tokens: checked against hand-built token streams from the tokenizer itself."""

import json
import os

import numpy as np
import pytest
from conftest import SAMPLE_TEXT

from universal_neurons.activations import UniversalNeuronsError
from universal_neurons.activations.build import build_token_set
from universal_neurons.activations.tokens import (
    TokenSet,
    TokenSetConfig,
    load_token_set,
    newline_ids,
    tokenizer_info,
)

DOCS = ["Call me Ishmael.\nSome years ago.", "It is a truth.", "We the People of the United States."]


def _enc(tokenizer, s):
    return tokenizer(s, add_special_tokens=False)["input_ids"]


def test_hand_checked_rows_mask_and_documents(tokenizer):
    ctx = 5
    ts = build_token_set(DOCS, tokenizer, TokenSetConfig(ctx_len=ctx))
    eos = tokenizer.eos_token_id
    parts = [_enc(tokenizer, d) for d in DOCS]
    stream = parts[0] + [eos] + parts[1] + [eos] + parts[2]  # EOS between documents, kept
    docs = [0] * len(parts[0]) + [0] + [1] * len(parts[1]) + [1] + [2] * len(parts[2])
    n_rows = len(stream) // (ctx - 1)  # incomplete tail dropped, never padded
    assert ts.ids.shape == (n_rows, ctx) and ts.ids.dtype == np.int32 and n_rows >= 4
    expect = np.array([[tokenizer.bos_token_id] + stream[r * 4:(r + 1) * 4] for r in range(n_rows)])
    np.testing.assert_array_equal(ts.ids, expect)
    np.testing.assert_array_equal(ts.doc_index[:, 1:], np.array(docs[: n_rows * 4]).reshape(n_rows, 4))
    assert (ts.doc_index[:, 0] == -1).all()
    # the paper's mask (the default): the ids that are exactly "\n"; "all": any whitespace with a newline
    nl = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\n"]
    nl_all = [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]) and not tokenizer.decode([i]).strip()]
    assert nl and set(newline_ids(tokenizer)) == set(nl) and set(newline_ids(tokenizer, "all")) == set(nl_all)
    assert any(set(nl) & set(stream[: n_rows * 4]))  # the example does contain a newline and an EOS
    expect_mask = ~np.isin(expect, [eos, *nl])
    expect_mask[:, 0] = False
    np.testing.assert_array_equal(ts.mask, expect_mask)
    assert ts.n_tokens == n_rows * ctx and ts.source["row_order"] == "stream"
    assert [b[0].shape[0] for b in ts.batches(3)] == [3] * (n_rows // 3) + ([n_rows % 3] if n_rows % 3 else [])


def test_mask_options_and_explicit_newline_ids(tokenizer):
    keep_all = TokenSetConfig(ctx_len=5, exclude_bos=False, exclude_special=False, exclude_newlines=False)
    assert build_token_set(DOCS, tokenizer, keep_all).mask.all()
    nl = newline_ids(tokenizer)
    only_nl = TokenSetConfig(ctx_len=5, exclude_bos=False, exclude_special=False, newline_ids=nl)
    ts = build_token_set(DOCS, tokenizer, only_nl)
    np.testing.assert_array_equal(ts.mask, ~np.isin(ts.ids, nl))


def test_seeded_sampling_repeats_and_differs(tokenizer):
    docs = SAMPLE_TEXT.split("\n\n") * 5
    full = build_token_set(docs, tokenizer, TokenSetConfig(ctx_len=16))
    cfg = TokenSetConfig(ctx_len=16, n_tokens=16 * 10 + 7, seed=3)
    a, b = build_token_set(docs, tokenizer, cfg), build_token_set(docs, tokenizer, cfg)
    c = build_token_set(docs, tokenizer, TokenSetConfig(ctx_len=16, n_tokens=16 * 10, seed=4))
    assert a.n_rows == 10 and a.hash == b.hash and a.hash != c.hash
    assert (np.diff(a.source_rows) > 0).all()  # stream order
    np.testing.assert_array_equal(a.ids, full.ids[a.source_rows])
    s = build_token_set(docs, tokenizer, TokenSetConfig(ctx_len=16, n_tokens=160, seed=3, shuffle=True))
    assert sorted(s.source_rows) == sorted(a.source_rows) and s.source["row_order"] == "shuffled"
    assert not (np.diff(s.source_rows) > 0).all()


def test_save_load_round_trip_and_hash(tokenizer, tmp_path):
    ts = build_token_set(DOCS, tokenizer, TokenSetConfig(ctx_len=5, n_tokens=15, seed=1))
    p = ts.save(tmp_path / "t.h5")
    back = load_token_set(p)
    for k in ("ids", "mask", "doc_index", "source_rows"):
        np.testing.assert_array_equal(getattr(back, k), getattr(ts, k))
    assert back.config == ts.config and back.hash == ts.hash and back.tokenizer_info == ts.tokenizer_info
    json.dumps(ts.config.to_dict())
    info = tokenizer_info(tokenizer)
    assert len(info["fingerprint"]) == 64 and info["vocab_size"] == len(tokenizer)
    ids2 = ts.ids.copy()
    ids2[0, 1] += 1
    mask2 = ts.mask.copy()
    mask2[0, 1] = ~mask2[0, 1]
    args = dict(doc_index=ts.doc_index, source_rows=ts.source_rows, config=ts.config, tokenizer_info=info)
    assert TokenSet(ids=ids2, mask=ts.mask, **args).hash != ts.hash
    assert TokenSet(ids=ts.ids, mask=mask2, **args).hash != ts.hash
    before = (p.read_bytes(), p.stat().st_mtime_ns)
    with pytest.raises(UniversalNeuronsError, match="already exists.*overwrite=True"):
        ts.save(p)
    assert (p.read_bytes(), p.stat().st_mtime_ns) == before


def test_files_folders_and_jsonl(tokenizer, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(DOCS[0])
    (tmp_path / "d" / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS[1:]) + "\n")
    cfg = TokenSetConfig(ctx_len=5, text_field="body")
    np.testing.assert_array_equal(build_token_set(tmp_path / "d", tokenizer, cfg).ids,
                                  build_token_set(DOCS, tokenizer, cfg).ids)
    with pytest.raises(UniversalNeuronsError, match="no string field 'text'.*text_field"):
        build_token_set(tmp_path / "d" / "b.jsonl", tokenizer, TokenSetConfig(ctx_len=5))


def test_bad_inputs(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(UniversalNeuronsError, match="does not exist"):
        build_token_set(tmp_path / "nope.txt", tokenizer)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UniversalNeuronsError, match="holds no text"):
        build_token_set(tmp_path / "empty.txt", tokenizer)
    with pytest.raises(UniversalNeuronsError, match="holds no text"):
        build_token_set([], tokenizer)
    with pytest.raises(UniversalNeuronsError, match="fewer than one row"):
        build_token_set(["Hi"], tokenizer, TokenSetConfig(ctx_len=64))
    with pytest.raises(UniversalNeuronsError, match="gives only"):
        build_token_set(DOCS, tokenizer, TokenSetConfig(ctx_len=5, n_tokens=10_000))
    with pytest.raises(UniversalNeuronsError, match="ctx_len must be"):
        TokenSetConfig(ctx_len=1)
    with pytest.raises(UniversalNeuronsError, match="n_tokens must be"):
        TokenSetConfig(ctx_len=8, n_tokens=4)
    with pytest.raises(UniversalNeuronsError, match="no token set at"):
        load_token_set(tmp_path / "missing.h5")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UniversalNeuronsError, match="hub is unreachable.*local .txt/.jsonl"):
        build_token_set("hf:wikitext:wikitext-2-raw-v1", tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]
