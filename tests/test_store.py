"""universal_neurons.activations.store: stores checked against TransformerLens' own run_with_cache, a real
SIGKILL part-way through caching, and every refusal leaving existing files untouched."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT

from universal_neurons.activations import UniversalNeuronsError, load_model
from universal_neurons.activations import store as store_module
from universal_neurons.activations.build import build_token_set
from universal_neurons.activations.reader import ActivationStore
from universal_neurons.activations.sources import LiveSource, iter_aligned
from universal_neurons.activations.store import StoreConfig, cache_activations, preflight_cache, store_filename
from universal_neurons.activations.tokens import TokenSet, TokenSetConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = SAMPLE_TEXT.split("\n\n") * 4


@pytest.fixture(scope="module")
def lms(tiny_family):
    return [load_model(d, checkpoint=0) for d in tiny_family]


@pytest.fixture(scope="module")
def ts(tokenizer):
    return build_token_set(DOCS, tokenizer, TokenSetConfig(ctx_len=32))  # ~58 rows of the tiny n_ctx


@pytest.fixture(scope="module")
def ts_other(tokenizer):
    return build_token_set(DOCS, tokenizer, TokenSetConfig(ctx_len=32, n_tokens=32 * 24, seed=7))


@pytest.fixture(scope="module")
def fp32_store(lms, ts, tmp_path_factory):
    return cache_activations(lms[0], ts, tmp_path_factory.mktemp("s") / "a.h5",
                             config=StoreConfig(dtype="float32", kinds=("post", "pre")), batch_rows=8)


_REF: dict = {}


def _reference(lm, ts, batch_rows=8):
    """{hook: [token, d_mlp]} from TransformerLens' own run_with_cache, same row batches (memoised)."""
    key = (id(lm), ts.hash, batch_rows)
    if key not in _REF:
        _REF[key] = _run_with_cache(lm, ts, batch_rows)
    return _REF[key]


def _run_with_cache(lm, ts, batch_rows):
    out = {}
    for r in range(0, ts.n_rows, batch_rows):
        _, cache = lm.model.run_with_cache(torch.from_numpy(ts.ids[r:r + batch_rows]).long())
        for k, v in cache.items():
            if ".mlp.hook_" in k and k.endswith(("hook_post", "hook_pre")):
                out.setdefault(k, []).append(v.reshape(-1, lm.d_mlp).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def _datasets(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def test_fp32_store_equals_run_with_cache_and_is_self_describing(fp32_store, lms, ts):
    ref = _reference(lms[0], ts)
    with ActivationStore.open(fp32_store) as st:
        assert st.hooks == [f"blocks.{layer}.mlp.hook_{k}" for layer in (0, 1) for k in ("post", "pre")]
        for h in st.hooks:
            assert st[h].dtype == np.float32 and st[h].shape == (ts.n_tokens, 64)
            np.testing.assert_array_equal(st[h][:], ref[h])
            np.testing.assert_array_equal(st[h][100:250], ref[h][100:250])
            assert st[h].chunks[1] == 64 and st[h].chunks[0] * 64 * 4 <= 1 << 20 and st[h].compression is None
            assert [d.label for d in st[h].dims] == ["token", "neuron"]
        np.testing.assert_array_equal(st.neuron(1, 5), ref["blocks.1.mlp.hook_post"][:, 5])
        np.testing.assert_array_equal(st.token_ids, ts.ids.reshape(-1))
        np.testing.assert_array_equal(st.mask, ts.mask.reshape(-1))
        assert st.token_set_hash == ts.hash and (st.n_layers, st.d_mlp, st.n_tokens) == (2, 64, ts.n_tokens)
        assert st.model["checkpoint"] == 0 and st.model["weight_processing"]["fold_ln"]
        assert st.provenance["artefact"] == "activation_store" and "h5py" in st.provenance["versions"]
        assert st.token_set_config == ts.config and st.config.dtype == "float32"
        with pytest.raises(UniversalNeuronsError, match="has no 'blocks.7.mlp.hook_post'"):
            st["blocks.7.mlp.hook_post"]


def test_fp16_store_is_fp32_rounded(lms, ts, fp32_store, tmp_path):
    p = cache_activations(lms[0], ts, tmp_path / "h.h5", batch_rows=16)  # default: float16, post only
    ref = _reference(lms[0], ts)
    with ActivationStore.open(p) as st:
        assert st.hooks == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
        for h in st.hooks:
            assert st[h].dtype == np.float16
            np.testing.assert_array_equal(st[h][:], ref[h].astype(np.float16))
    z = cache_activations(lms[0], ts, tmp_path / "z.h5", config=StoreConfig(compression="lzf"), batch_rows=16)
    with ActivationStore.open(z) as st:
        assert st["blocks.1.mlp.hook_post"].compression == "lzf"
        np.testing.assert_array_equal(st["blocks.1.mlp.hook_post"][:], ref["blocks.1.mlp.hook_post"].astype(np.float16))


def test_iter_aligned_and_live_source_agree_with_the_store(fp32_store, lms, ts, tmp_path):
    b = cache_activations(lms[1], ts, tmp_path / "b.h5", config=StoreConfig(dtype="float32"), batch_rows=8)
    ref_a, ref_b = _reference(lms[0], ts), _reference(lms[1], ts)
    cat = [np.concatenate([r[f"blocks.{layer}.mlp.hook_post"] for layer in (0, 1)], axis=1) for r in (ref_a, ref_b)]
    src = iter_aligned([fp32_store, b], batch_tokens=1000)
    for _ in range(2):  # re-iterable: each pass starts again
        batches = list(src)
        assert len(batches) == len(src)
        mask = torch.cat([m for m, _ in batches])
        assert mask.dtype == torch.bool and torch.equal(mask, torch.from_numpy(ts.mask.reshape(-1)))
        for k in range(2):
            acts = torch.cat([a[k] for _, a in batches])
            assert acts.shape == (ts.n_tokens, 128)
            np.testing.assert_array_equal(acts.numpy(), cat[k])
    with ActivationStore.open(b) as open_b:  # open stores work too, and stay open
        first = next(iter(iter_aligned([fp32_store, open_b], batch_tokens=1)))
        assert first[1][1].shape == (open_b.chunk_tokens, 128) and open_b.hooks
        np.testing.assert_array_equal(first[1][1].numpy(), cat[1][: open_b.chunk_tokens])
    pre = torch.cat([a[0] for _, a in iter_aligned([fp32_store], 64, kind="pre")])
    np.testing.assert_array_equal(pre[:, 64:].numpy(), ref_a["blocks.1.mlp.hook_pre"])
    live = LiveSource(lms, ts, batch_rows=8)
    for _ in range(2):
        got = list(live)
        assert len(got) == len(live) and torch.equal(torch.cat([m for m, _ in got]), mask)
        for k in range(2):
            np.testing.assert_array_equal(torch.cat([a[k] for _, a in got]).numpy(), cat[k])


def test_killed_run_resumes_to_identical_datasets(tiny_family, lms, ts, tmp_path, monkeypatch):
    tok_path = ts.save(tmp_path / "tokens.h5")
    out = tmp_path / "k.h5"
    partial = out.with_name(out.name + ".partial")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_cache_worker.py"), str(tiny_family[0]),
                             str(tok_path), str(out), "float16"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("rows") and int(line.split()[1]) >= 12:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists() and partial.exists()
    with h5py.File(partial, "r") as f:
        done = int(f.attrs["complete_rows"])
    assert 12 <= done < ts.n_rows
    with pytest.raises(UniversalNeuronsError, match="unfinished run"):
        ActivationStore.open(out)
    seen = []
    monkeypatch.setattr(store_module, "after_batch", seen.append)
    cache_activations(lms[0], ts, out, config=StoreConfig(kinds=("post", "pre")), batch_rows=4)
    monkeypatch.undo()
    assert seen[0] == done + 4 and not partial.exists()  # restarted from the last complete batch
    clean = cache_activations(lms[0], ts, tmp_path / "clean.h5", config=StoreConfig(kinds=("post", "pre")),
                              batch_rows=4)
    got, want = _datasets(out), _datasets(clean)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_resume_refuses_a_partial_for_another_config(lms, ts, tmp_path, monkeypatch):
    out = tmp_path / "r.h5"

    def stop(rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "after_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(lms[0], ts, out, batch_rows=8)
    monkeypatch.undo()
    partial = out.with_name("r.h5.partial")
    before = _snapshot(partial)
    with pytest.raises(UniversalNeuronsError, match="another model or configuration.*overwrite=True"):
        cache_activations(lms[0], ts, out, config=StoreConfig(dtype="float32"), batch_rows=8)
    with pytest.raises(UniversalNeuronsError, match="another model or configuration"):
        cache_activations(lms[1], ts, out, batch_rows=8)
    assert _snapshot(partial) == before


def test_refuses_existing_store_and_other_token_set(fp32_store, lms, ts, ts_other):
    before = _snapshot(fp32_store)
    with pytest.raises(UniversalNeuronsError, match="already exists.*overwrite=True"):
        cache_activations(lms[0], ts, fp32_store, config=StoreConfig(dtype="float32", kinds=("post", "pre")))
    with pytest.raises(UniversalNeuronsError, match=f"token set {ts.hash}, not the requested {ts_other.hash}"):
        cache_activations(lms[0], ts_other, fp32_store)
    assert _snapshot(fp32_store) == before
    assert not fp32_store.with_name(fp32_store.name + ".partial").exists()


def test_overwrite_replaces_only_when_complete(lms, ts_other, tmp_path):
    p = cache_activations(lms[0], ts_other, tmp_path / "o.h5", batch_rows=8)
    with ActivationStore.open(p) as st:
        old = st["blocks.0.mlp.hook_post"][:]
    cache_activations(lms[1], ts_other, p, overwrite=True, batch_rows=8)
    with ActivationStore.open(p) as st:
        assert st.model["training_record"]["seed"] == 2 and not np.array_equal(st["blocks.0.mlp.hook_post"][:], old)


def test_second_concurrent_writer_is_refused(lms, ts_other, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    errors = []

    def second_writer(rows):
        if rows == 8:
            with pytest.raises(UniversalNeuronsError, match=rf"another process \(pid {os.getpid()}\) is writing") as e:
                cache_activations(lms[1], ts_other, out, batch_rows=8)
            errors.append(e)
            with pytest.raises(UniversalNeuronsError, match="is writing"):
                cache_activations(lms[0], ts_other, out, overwrite=True)

    monkeypatch.setattr(store_module, "after_batch", second_writer)
    cache_activations(lms[0], ts_other, out, config=StoreConfig(dtype="float32"), batch_rows=8)
    monkeypatch.undo()
    assert len(errors) == 1 and not Path(str(out) + ".lock").exists()
    ref = _reference(lms[0], ts_other)
    with ActivationStore.open(out) as st:  # the first writer's file is intact
        np.testing.assert_array_equal(st["blocks.1.mlp.hook_post"][:], ref["blocks.1.mlp.hook_post"])


def test_fp16_overflow_is_reported_and_leaves_nothing_corrupt(tokenizer, ts_other, tmp_path):
    from universal_neurons.activations import GPT2Config, init_gpt2, save_model_dir

    cfg = GPT2Config(n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_ctx=32, d_vocab=len(tokenizer))
    model = init_gpt2(cfg, seed=1)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias.fill_(1e5)  # gelu(x) = x for large x: 1e5 > 65504
    save_model_dir(model, tokenizer, tmp_path / "big", {"name": "big"})
    lm = load_model(tmp_path / "big")
    out = tmp_path / "big.h5"
    p = cache_activations(lm, ts_other, out, config=StoreConfig(dtype="float32", layers=(0,)), batch_rows=8)
    before = _snapshot(p)
    with pytest.raises(UniversalNeuronsError, match=r"blocks.1.mlp.hook_post of big reaches \|x\| = 1.*"
                                                    r"beyond float16.*dtype='float32'"):
        cache_activations(lm, ts_other, out, overwrite=True, batch_rows=8)
    assert _snapshot(p) == before and sorted(os.listdir(tmp_path)) == ["big", "big.h5"]
    p = cache_activations(lm, ts_other, out, config=StoreConfig(dtype="float32"), overwrite=True, batch_rows=8)
    with ActivationStore.open(p) as st:
        assert st["blocks.1.mlp.hook_post"][:].max() > 65504


def test_bad_inputs_create_nothing(lms, ts, fp32_store, ts_other, tokenizer, tmp_path):
    b = cache_activations(lms[1], ts_other, tmp_path / "b.h5", batch_rows=8)
    with pytest.raises(UniversalNeuronsError, match=f"different token sets.*{fp32_store}: {ts.hash}.*{b}"):
        iter_aligned([fp32_store, b], 256)
    with pytest.raises(UniversalNeuronsError, match="no blocks.0.mlp.hook_pre"):
        iter_aligned([b], 256, kind="pre")
    with pytest.raises(UniversalNeuronsError, match="unknown hook kind 'mid'"):
        StoreConfig(kinds=("mid",))
    with pytest.raises(UniversalNeuronsError, match="unknown hook kind 'mid'"):
        iter_aligned([b], 256, kind="mid")
    with pytest.raises(UniversalNeuronsError, match="no activation store at .*cache_activations"):
        ActivationStore.open(tmp_path / "missing.h5")
    with pytest.raises(UniversalNeuronsError, match="no activation store at"):
        iter_aligned([b, tmp_path / "missing.h5"], 256)
    long_ts = build_token_set(DOCS, tokenizer, TokenSetConfig(ctx_len=64))
    with pytest.raises(UniversalNeuronsError, match="ctx_len=64 but seed-a accepts at most n_ctx=32"):
        cache_activations(lms[0], long_ts, tmp_path / "long.h5")
    with pytest.raises(UniversalNeuronsError, match="ctx_len=64"):
        preflight_cache(lms[0], long_ts)
    ids = ts_other.ids.copy()
    ids[3, 7] = 5000
    alien = TokenSet(ids=ids, mask=ts_other.mask, doc_index=ts_other.doc_index, source_rows=ts_other.source_rows,
                     config=ts_other.config, tokenizer_info=ts_other.tokenizer_info)
    with pytest.raises(UniversalNeuronsError, match="token id 5000 but seed-a has a vocabulary of 400"):
        cache_activations(lms[0], alien, tmp_path / "alien.h5")
    with pytest.raises(UniversalNeuronsError, match="token id 5000"):
        LiveSource(lms, alien, 4)
    with pytest.raises(UniversalNeuronsError, match="layer 5 does not exist"):
        cache_activations(lms[0], ts_other, tmp_path / "l.h5", config=StoreConfig(layers=(5,)))
    assert sorted(os.listdir(tmp_path)) == ["b.h5"]


def test_preflight_counts_what_will_be_written(lms, ts, tmp_path):
    pf = preflight_cache(lms[0].provenance, ts, StoreConfig(kinds=("post", "pre")), path=tmp_path / "x.h5")
    assert pf["n_tokens"] == ts.n_tokens and pf["n_counted"] == int(ts.mask.sum())
    assert len(pf["datasets"]) == 4 and pf["datasets"]["blocks.1.mlp.hook_pre"]["shape"] == (ts.n_tokens, 64)
    assert pf["bytes"] == 4 * ts.n_tokens * 64 * 2 + ts.n_tokens * 9 and pf["fits"]
    p = cache_activations(lms[0], ts, tmp_path / store_filename(lms[0].provenance, ts),
                          config=StoreConfig(kinds=("post", "pre")))
    assert p.name == f"seed-a-ckpt0__{ts.hash[:12]}.h5"
    assert abs(p.stat().st_size - pf["bytes"]) < 0.1 * pf["bytes"]
