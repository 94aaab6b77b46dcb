"""The explanations stage: exact top-k and quantile examples (against a full sort), variance
reductions (against pandas), planted neurons found and labelled, shards and blocks that merge
exactly, the files, the views, the pipeline stage and the CLI."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from universal_neurons.activations import StoreConfig, TokenSet, TokenSetConfig, hook_name
from universal_neurons.activations.store import STORE_KIND
from universal_neurons.errors import ConfigError, IncompatibleInputsError, InputError, OutputExistsError
from universal_neurons.explain import (
    ExplainConfig,
    MainPartial,
    NeuronGroup,
    StoreSource,
    Unit,
    explain_neurons,
    quantile_ranks,
)
from universal_neurons.explain.storage import load_explanations, save_explanations
from universal_neurons.explain.view import NeuronExplanation
from universal_neurons.runtime import SCHEMA_VERSION, provenance_base, to_json

# ---------------------------------------------------------------------------- synthetic stores


def token_set(ids: np.ndarray, mask: np.ndarray | None = None) -> TokenSet:
    """A token set over given ids (`[row, pos]`, id 0 = BOS/EOS)."""
    ids = np.asarray(ids, np.int32)
    mask = np.ones_like(ids, bool) if mask is None else mask
    return TokenSet(ids=ids, mask=mask, doc_index=np.zeros_like(ids), source_rows=np.arange(len(ids)),
                    config=TokenSetConfig(ctx_len=ids.shape[1]),
                    tokenizer_info={"name_or_path": "synthetic", "fingerprint": "0", "vocab_size": int(ids.max()) + 1,
                                    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})


def write_store(path, ts: TokenSet, acts: np.ndarray, *, name: str = "m", dtype: str = "float32",
                chunk: int = 64):
    """An activation store with `cache_activations`' layout: `acts` is `[layer, token, neuron]`."""
    n_layers, n_tokens, d_mlp = acts.shape
    with h5py.File(path, "w") as f:
        for layer in range(n_layers):
            f.create_dataset(hook_name(layer, "post"), data=acts[layer].astype(dtype),
                             chunks=(min(chunk, n_tokens), d_mlp), fletcher32=True)
        for key, arr in (("token_ids", ts.ids), ("mask", ts.mask), ("doc_index", ts.doc_index)):
            f.create_dataset(key, data=arr.reshape(-1), fletcher32=True)
        f.attrs.update(ts.attrs())
        f.attrs.update({"kind": STORE_KIND, "schema_version": SCHEMA_VERSION,
                        "provenance": to_json(provenance_base(STORE_KIND)),
                        "model": to_json({"name": name, "resolved": name, "checkpoint": None}),
                        "store_config": to_json(StoreConfig(dtype=dtype).to_dict()), "layers": list(range(n_layers)),
                        "n_layers": n_layers, "d_mlp": d_mlp, "ctx_len": ts.ctx_len, "n_rows": ts.n_rows,
                        "n_tokens": n_tokens, "complete_rows": ts.n_rows})
    return path


def stored(path, layer: int, neuron: int) -> np.ndarray:
    """A neuron's activations as the store holds them, in float32."""
    with h5py.File(path, "r") as f:
        return f[hook_name(layer, "post")][:, neuron].astype(np.float32)


ROWS, CTX, VOCAB = 24, 16, 40
# a vocabulary with every kind of token class (id 0 is BOS/EOS)
TEXTS = ["<|endoftext|>", " the", " The", "\n", ",", ".", " (", ")", '"', " 1999", "42", " I", " you", " he", " she",
         " we", " apple", " Apple", " APPLE", " quick", " queen", " quote", " ?", " x", "\n\n", " 7", " banana", "Bob",
         " it", " they", " cat", " dog", " zebra", "!", "-", " ...", " year", " 2024", " me", " my"]
assert len(TEXTS) == VOCAB


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Two stores (float16 'a', float32 'b') of one token set, with ties and masked tokens."""
    root = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(ROWS, CTX))
    ids[:, 0] = 0
    mask = np.ones_like(ids, bool)
    mask[:, 0] = False
    mask[3, 5:9] = False
    ids[5, 7] = 0  # an EOS inside a row: start of document after it
    mask[5, 7] = False
    ts = token_set(ids, mask)
    acts = rng.normal(size=(2, ts.n_tokens, 8)).astype(np.float32)
    acts[0, :, 1] = np.round(acts[0, :, 1])  # few distinct values: ties everywhere
    acts[0, :, 2] = 0.0  # constant: every token ties
    acts[0, np.flatnonzero(~mask.reshape(-1))[:3], 3] = 50.0  # masked tokens never count, however large
    other = acts + rng.normal(size=acts.shape).astype(np.float32) * 0.3
    other[1, :, 4] = np.round(other[1, :, 4] * 8) + 3e6  # mean far above the spread (float32 only)
    return {"ts": ts, "a": write_store(root / "a.h5", ts, acts, name="a", dtype="float16"),
            "b": write_store(root / "b.h5", ts, other, name="b", dtype="float32")}


def groups_of(pairs) -> list[NeuronGroup]:
    return [NeuronGroup(layer, neuron, "chosen", (Unit("a", layer, neuron), Unit("b", layer, partner)), {"b": 0.5},
                        0.5) for layer, neuron, partner in pairs]


PAIRS = [(0, 1, 1), (0, 2, 5), (0, 3, 3), (1, 4, 4), (1, 0, 0)]
CFG = ExplainConfig(k=7, quantiles=(0.5, 0.9, 0.99), quantile_examples=4, context_before=3, context_after=2,
                    batch_rows=5, device="cpu", n_unigrams=10)


@pytest.fixture(scope="module")
def explained(family):
    src = StoreSource({"a": family["a"], "b": family["b"]})
    return src, explain_neurons(src, groups_of(PAIRS), TEXTS, config=CFG)


# ---------------------------------------------------------------------------- exactness


def _sorted_desc(values: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Counted token indices by value descending, then token index ascending (a full sort)."""
    idx = np.flatnonzero(counted)
    return idx[np.lexsort((idx, -values[idx]))]


def test_top_k_equals_a_full_sort_ties_included(family, explained):
    src, ex = explained
    counted = family["ts"].mask.reshape(-1)
    frame = ex.examples_frame()
    assert src.bits == 32  # one float32 store: 32-bit keys, three passes
    for i, u in enumerate(ex.units):
        values = stored(family[u.label], u.layer, u.neuron)
        want = _sorted_desc(values, counted)[:CFG.k]
        got = frame[(frame["unit"] == i) & (frame["kind"] == "top")].sort_values("rank")
        np.testing.assert_array_equal(got["token"].to_numpy(), want, err_msg=str(u))
        np.testing.assert_array_equal(got["value"].to_numpy(np.float32), values[want], err_msg=str(u))
    constant = frame[(frame["unit"] == ex.unit_index(Unit("a", 0, 2))) & (frame["kind"] == "top")]
    assert constant["token"].tolist() == np.flatnonzero(counted)[:CFG.k].tolist()  # all tie: lowest indices
    masked = frame[frame["label"] == "a"]
    assert (masked["value"] < 50).all()  # the large activations of masked tokens are never examples


def test_quantiles_are_exact_order_statistics(family, explained):
    _, ex = explained
    counted = family["ts"].mask.reshape(-1)
    n = int(counted.sum())
    assert ex.n_tokens == n
    frame = ex.examples_frame()
    for i, u in enumerate(ex.units):
        values = stored(family[u.label], u.layer, u.neuron)[counted]
        idx = np.flatnonzero(counted)
        for k, (q, r) in enumerate(zip(CFG.quantiles, quantile_ranks(n, CFG.quantiles))):
            v = np.sort(values)[r - 1]
            assert ex.quantile_values[i, k] == v
            assert v == np.quantile(values, q, method="inverted_cdf")  # n is not a multiple of 1/q: no float quirk
            at = idx[values >= v]
            want = at[np.lexsort((at, values[values >= v]))][:CFG.quantile_examples]
            got = frame[(frame["unit"] == i) & (frame["kind"] == f"q{q:g}")].sort_values("rank")
            np.testing.assert_array_equal(got["token"].to_numpy(), want, err_msg=f"{u} q{q}")


def test_quantile_ranks_read_q_as_written():
    assert quantile_ranks(10, [0.9, 0.5, 1.0, 0.01]) == [9, 5, 10, 1]
    assert quantile_ranks(1001, [0.5]) == [501]


def test_float16_stores_need_one_histogram_pass(family):
    src = StoreSource({"a": family["a"]})
    assert src.bits == 16
    groups = [NeuronGroup(0, n, "chosen", (Unit("a", 0, n),)) for n in range(4)]
    ex = explain_neurons(src, groups, TEXTS, config=CFG)
    counted = family["ts"].mask.reshape(-1)
    n = int(counted.sum())
    for i, u in enumerate(ex.units):
        values = stored(family["a"], 0, u.neuron)
        assert ex.examples_frame().query(f"unit == {i} and kind == 'top'")["token"].tolist() == \
            _sorted_desc(values, counted)[:CFG.k].tolist()
        for k, r in enumerate(quantile_ranks(n, CFG.quantiles)):
            assert ex.quantile_values[i, k] == np.sort(values[counted])[r - 1]


def test_shards_and_blocks_merge_to_one_pass(family, explained):
    src, one = explained
    sharded = explain_neurons(src, groups_of(PAIRS), TEXTS, config=CFG, row_shards=[(0, 7), (7, 8), (8, ROWS)])
    pd.testing.assert_frame_equal(sharded.examples_frame(), one.examples_frame())
    np.testing.assert_array_equal(sharded.context_ids, one.context_ids)
    np.testing.assert_array_equal(sharded.quantile_values, one.quantile_values)
    np.testing.assert_allclose(sharded.vr, one.vr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sharded.var, one.var, rtol=1e-10)  # a mean of 3e6: float64 rounding
    # a budget of one group per block: a pass per block, the same numbers
    tiny = CFG.replace(memory_budget=3 * __import__("universal_neurons.explain", fromlist=["unit_bytes"]).unit_bytes(
        VOCAB, CTX, CFG, 32))
    blocked = explain_neurons(src, groups_of(PAIRS), TEXTS, config=tiny)
    assert blocked.blocks == len(PAIRS)
    pd.testing.assert_frame_equal(blocked.examples_frame(), one.examples_frame())
    np.testing.assert_allclose(blocked.vr, one.vr, rtol=0, atol=1e-12)


def test_main_partials_merge_exactly(family):
    src = StoreSource({"a": family["a"], "b": family["b"]})
    units = [Unit("a", 0, 1), Unit("a", 0, 2), Unit("b", 1, 4)]

    def run(rows):
        p = MainPartial(len(units), vocab=VOCAB, ctx_len=CTX, k=5, bits=32, histogram=True)
        for batch in src.batches(units, rows=rows, batch_rows=3):
            p.update(batch)
        return p

    whole, parts = run((0, ROWS)), run((0, 10)).merge(run((10, ROWS)))
    assert torch.equal(whole.top, parts.top) and torch.equal(whole.hist, parts.hist)
    assert whole.n == parts.n and torch.equal(whole.count_prev, parts.count_prev)
    torch.testing.assert_close(whole.moments.m2, parts.moments.m2, rtol=1e-10, atol=0)  # b:1.4 has mean 3e6
    # different shifts, the same sums once re-shifted
    torch.testing.assert_close(whole.sum_cur + whole.count_cur.unsqueeze(1) * whole.shift,
                               parts.sum_cur + parts.count_cur.unsqueeze(1) * parts.shift, rtol=1e-12, atol=1e-6)
    with pytest.raises(IncompatibleInputsError, match="merge"):
        whole.merge(MainPartial(2, vocab=VOCAB, ctx_len=CTX, k=5, bits=32, histogram=True))


# ---------------------------------------------------------------------------- variance reduction


def _token_frame(family, u: Unit) -> pd.DataFrame:
    """Counted tokens of the family's token set with a unit's activation, current / previous id, position."""
    ts = family["ts"]
    prev = np.concatenate([np.full((ts.n_rows, 1), -1), ts.ids[:, :-1]], axis=1)
    pos = np.tile(np.arange(ts.ctx_len), ts.n_rows)
    df = pd.DataFrame({"a": stored(family[u.label], u.layer, u.neuron).astype(np.float64),
                       "cur": ts.ids.reshape(-1), "prev": prev.reshape(-1), "pos": pos})
    return df[ts.mask.reshape(-1)].reset_index(drop=True)


def _member(df: pd.DataFrame, key: str, classes: dict[str, np.ndarray]) -> np.ndarray:
    """Whether each token has the feature `key`, computed from its definition."""
    def of(ids, member):
        return np.where(ids >= 0, member[np.clip(ids, 0, None)], False)

    side, kind, *rest = key.split(":")
    if side == "pos":
        lo, _, hi = kind.partition("-")
        return df["pos"].between(int(lo), int(hi or lo)).to_numpy()
    if side == "seq":
        return of(df["prev"].to_numpy(), classes["special" if kind == "start_of_document" else "newline"])
    ids = df["cur" if side == "cur" else "prev"].to_numpy()
    if kind == "id":
        return ids == int(rest[0])
    return of(ids, classes[rest[0]])


def test_variance_reduction_equals_a_pandas_group_by(family, explained):
    _, ex = explained
    table = ex.features.table
    assert set(table["kind"]) == {"unigram", "class", "alphabet", "position", "sequence"}
    checked = 0
    for i, u in enumerate(ex.units):
        df = _token_frame(family, u)
        var = df["a"].var(ddof=0)
        for f, key in enumerate(table["key"]):
            has = _member(df, key, ex.features.classes)
            p = has.mean()
            if p in (0.0, 1.0) or var == 0:
                assert np.isnan(ex.vr[i, f]), (u, key)
                continue
            within = df.groupby(has)["a"].var(ddof=0)
            want = (var - (p * within[True] + (1 - p) * within[False])) / var
            assert abs(ex.vr[i, f] - want) < 1e-9, (str(u), key, ex.vr[i, f], want)
            checked += 1
        for name, col in (("current_token", "cur"), ("previous_token", "prev"), ("position", "pos")):
            g = df.groupby(col)["a"]
            eta = (g.count() * (g.mean() - df["a"].mean()) ** 2).sum() / (var * len(df)) if var else np.nan
            np.testing.assert_allclose(ex.eta2[name][i], eta, rtol=0, atol=1e-9, err_msg=f"{u} {name}")
    assert checked > 500
    counts = ex.features_frame()
    assert (counts["count"] == [_member(_token_frame(family, ex.units[0]), k, ex.features.classes).sum()
                                for k in counts["key"]]).all()


def test_planted_neurons_are_found_and_labelled(tmp_path):
    rng = np.random.default_rng(1)
    rows, ctx = 64, 16
    ids = rng.integers(1, VOCAB, size=(rows, ctx))
    ids[:, 0] = 0
    mask = np.ones_like(ids, bool)
    mask[:, 0] = False
    ts = token_set(ids, mask)
    cur = ids.reshape(-1)
    prev = np.concatenate([np.zeros((rows, 1), int), ids[:, :-1]], axis=1).reshape(-1)
    pos = np.tile(np.arange(ctx), rows)
    noise = rng.normal(size=(6, cur.size)) * 0.01
    acts = np.stack([
        3.0 * (cur == 16) + noise[0],  # unigram: " apple"
        2.0 * (prev == 1) + noise[1],  # previous token: " the"
        pos / ctx + noise[2],  # position
        1.0 * np.isin(cur, [19, 20, 21]) + noise[3],  # alphabet: starts with q (three tokens)
        rng.normal(size=cur.size),  # nothing
        np.zeros(cur.size),  # dead
    ], axis=1)[None].astype(np.float32)
    path = write_store(tmp_path / "planted.h5", ts, acts)
    groups = [NeuronGroup(0, n, "chosen", (Unit("a", 0, n),)) for n in range(6)]
    cfg = ExplainConfig(k=5, n_unigrams=VOCAB, device="cpu", batch_rows=16)
    ex = explain_neurons(StoreSource({"a": path}), groups, TEXTS, config=cfg)
    n = ex.neurons().set_index("neuron")
    assert n["family"].tolist() == ["unigram", "previous_token", "position", "alphabet", "other", "dead"]
    assert n.loc[0, "best_feature"] == "cur:id:16" and n.loc[0, "best_vr"] > 0.99
    assert n.loc[1, "best_feature"] == "prev:id:1" and n.loc[1, "best_vr"] > 0.99
    assert n.loc[2, "eta2_position"] > 0.99 and n.loc[2, "best_feature"].startswith("pos:")
    assert n.loc[3, "best_feature"] == "cur:class:letter_q" and n.loc[3, "best_vr"] > 0.99
    assert n.loc[4, "family_score"] < 0.2 and np.isnan(n.loc[5, "family_score"])
    top = ex.examples_frame().query("neuron == 0 and kind == 'top'")
    assert (family_tokens := ts.ids.reshape(-1)[top["token"]]).tolist() == [16] * 5, family_tokens
    # the cuts are configurable: above every score, nothing is a unigram neuron
    strict = explain_neurons(StoreSource({"a": path}), groups[:1], TEXTS, config=cfg.replace(unigram_vr=1.0))
    assert strict.family == ["other"]


# ---------------------------------------------------------------------------- files and views


def test_files_round_trip_and_views(family, explained, tmp_path):
    _, ex = explained
    out = tmp_path / "explanations"
    paths = save_explanations(ex, out)
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_explanations(ex, out)
    data = load_explanations(out)
    pd.testing.assert_frame_equal(data.examples, ex.examples_frame(), check_dtype=False)
    pd.testing.assert_frame_equal(data.neurons[["label", "layer", "neuron", "family"]],
                                  ex.neurons()[["label", "layer", "neuron", "family"]])
    np.testing.assert_array_equal(data.vr, ex.vr)
    np.testing.assert_array_equal(data.context_acts, ex.context_acts)
    assert data.texts == TEXTS and data.labels == ["a", "b"]
    prov = json.loads(open(paths["provenance"]).read())
    assert prov["token_set_hash"] == family["ts"].hash and set(prov["source"]["stores"]) == {"a", "b"}
    assert prov["feature_definitions"]["classes"]["year"] and prov["config"]["k"] == CFG.k
    view = NeuronExplanation(data, 0)
    text = str(view)
    top = data.examples.query("unit == 0 and kind == 'top'").iloc[0]
    marked = TEXTS[family["ts"].ids.reshape(-1)[top["token"]]].replace("\n", "\u23ce")
    assert f"[[{marked}]]" in text and "a:0.1" in text and "at quantile 0.5 of a" in text
    page = view.html()
    assert page.startswith("<!DOCTYPE html>") and "http" not in page and "<script" not in page
    assert view._repr_html_().count('class="tok focus"') == 2 * (CFG.k + len(CFG.quantiles) * CFG.quantile_examples)
    # the counterpart's activation sits beside the reference's on every token of a context
    e = int(top["example"])
    ref_col, partner_col = ex.context_acts[e]
    assert np.isfinite(ref_col[CFG.context_before]) and np.isfinite(partner_col[CFG.context_before])


def test_config_is_checked():
    with pytest.raises(ConfigError, match="quantiles"):
        ExplainConfig(quantiles=(0.5, 1.5))
    with pytest.raises(ConfigError, match="k="):
        ExplainConfig(k=0)
    with pytest.raises(ConfigError, match="unigram_vr"):
        ExplainConfig(unigram_vr=0.0)
    assert ExplainConfig().edges(16) == [0, 1, 2, 4, 8, 16]
    assert ExplainConfig(position_edges=(0, 5)).edges(16) == [0, 5, 16]


def test_refusals(family):
    src = StoreSource({"a": family["a"], "b": family["b"]})
    with pytest.raises(InputError, match="no store for model"):
        explain_neurons(src, [NeuronGroup(0, 0, "chosen", (Unit("c", 0, 0),))], TEXTS, config=CFG)
    with pytest.raises(InputError, match="does not exist"):
        explain_neurons(src, [NeuronGroup(0, 99, "chosen", (Unit("a", 0, 99),))], TEXTS, config=CFG)
    with pytest.raises(InputError, match="outside the vocabulary"):
        explain_neurons(src, groups_of(PAIRS[:1]), TEXTS[:5], config=CFG)
    with pytest.raises(ConfigError, match="memory_budget"):
        explain_neurons(src, groups_of(PAIRS[:1]), TEXTS, config=CFG.replace(memory_budget=1000))


# ---------------------------------------------------------------------------- the stage, explain(), the CLI


@pytest.fixture(scope="module")
def run_dir(tiny_family, tmp_path_factory):
    """A pipeline run of the tiny family with the explanations stage."""
    from tests.conftest import SAMPLE_TEXT
    from universal_neurons.explain import explain_stage
    from universal_neurons.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(tokens=TokenSetConfig(ctx_len=32), batch_rows=8, held_out_share=0.0)
    stage = explain_stage(config=ExplainConfig(k=5, n_contrast=3, device="cpu"))
    res = run_pipeline(tiny_family, [SAMPLE_TEXT * 3, SAMPLE_TEXT.upper() * 2], tmp_path_factory.mktemp("run"),
                       config=cfg, extra_stages=[stage])
    return res


def test_pipeline_stage_writes_the_files(run_dir):
    from universal_neurons.explain import FILES, load_explanations

    out = run_dir.out_dir
    summary = json.loads((out / "summary.json").read_text())["explanations"]
    for name in FILES.values():
        assert (out / "explanations" / name).exists(), name
    data = load_explanations(out / "explanations")
    table = run_dir.table
    n_universal = int(table["is_universal"].sum())
    refs = data.neurons[data.neurons["is_reference"]]
    assert summary["groups"] == n_universal + 3 == len(refs) and summary["universal"] == n_universal
    assert set(data.neurons["label"]) == {"a", "b"} and summary["n_tokens"] == run_dir.token_set.n_counted
    # partners are the table's, with its correlations
    row = table.set_index(["layer", "neuron"]).loc[(int(refs.iloc[0]["layer"]), int(refs.iloc[0]["neuron"]))]
    partner = data.neurons.query("group == 0 and label == 'b'").iloc[0]
    assert (partner["layer"], partner["neuron"]) == (row["partner_layer_b"], row["partner_neuron_b"])
    assert partner["corr_with_reference"] == pytest.approx(row["max_corr_b"])
    # the output side: cos with the unembedding, from the models' weights
    out_tokens = data.output_tokens
    assert set(out_tokens["direction"]) == {"promoted", "suppressed"} and out_tokens["cos"].abs().max() <= 1
    prov = data.provenance
    assert prov["token_set_hash"] == run_dir.token_set.hash and prov["source"]["kind"] == "stores"
    assert all(s["path"].endswith(f"stores/{lab}.h5") for lab, s in prov["source"]["stores"].items())


def test_explain_shows_a_neuron_from_files_or_computes_it(run_dir):
    from universal_neurons.explain import explain

    data_refs = json.loads((run_dir.out_dir / "explanations" / "explanations.json").read_text())["groups"]
    first = data_refs[0]["members"][0]  # "a:L.N"
    layer, neuron = (int(x) for x in first.split(":")[1].split("."))
    row = run_dir.table.query(f"layer == {layer} and neuron == {neuron}").iloc[0]
    view = explain(run_dir.out_dir, row)
    assert view.reference["layer"] == layer and "[[" in str(view) and "<table>" in view._repr_html_()
    assert explain(run_dir.out_dir, layer, neuron).info == view.info
    # a neuron outside the stored set is computed on the spot (nothing is written)
    explained = {tuple(int(x) for x in g["members"][0].split(":")[1].split(".")) for g in data_refs}
    other = next((lay, n) for lay, n in zip(run_dir.table["layer"], run_dir.table["neuron"])
                 if (lay, n) not in explained)
    live = explain(run_dir.out_dir, *other, config=ExplainConfig(k=3, quantiles=(), device="cpu"))
    assert (live.reference["layer"], live.reference["neuron"]) == other and "[[" in str(live)
    with pytest.raises(InputError, match="reference"):
        explain(run_dir.out_dir, *other, label="b")


def test_cli_explain(run_dir, tmp_path, capsys):
    from universal_neurons.cli.main import main

    first = json.loads((run_dir.out_dir / "explanations" / "explanations.json").read_text())["groups"][0]
    spec = first["members"][0].split(":")[1]
    html_path = tmp_path / "n.html"
    assert main(["explain", str(run_dir.out_dir), "--neuron", spec, "--html", str(html_path), "--contexts", "3"]) == 0
    out = capsys.readouterr().out
    assert f"neuron a:{spec}" in out and "[[" in out and html_path.read_text().startswith("<!DOCTYPE html>")
    assert main(["explain", str(run_dir.out_dir), "--neuron", spec, "--html", str(html_path)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["explain", str(run_dir.out_dir), "--all", "--k", "4", "--contrast", "2"]) == 2  # files exist
    assert "--overwrite" in capsys.readouterr().err
    assert main(["explain", str(run_dir.out_dir), "--all", "--k", "4", "--contrast", "2", "--overwrite",
                 "--device", "cpu"]) == 0
    assert "explained" in capsys.readouterr().out
    assert main(["explain", str(run_dir.out_dir)]) == 2 and "--neuron" in capsys.readouterr().err
    assert main(["explain", str(run_dir.out_dir), "--neuron", "x"]) == 2


def test_live_models_give_what_their_float32_stores_give(run_dir, tmp_path):
    from universal_neurons.activations import cache_activations
    from universal_neurons.explain import LiveModelSource, default_groups, load_models, vocab_texts

    labels = list(run_dir.labels)
    models = load_models(run_dir.model_provenance, labels, device="cpu")
    ts = run_dir.token_set.select_rows(0, 12)
    stores = {lab: cache_activations(models[lab], ts, tmp_path / f"{lab}.h5", config=StoreConfig(dtype="float32"))
              for lab in labels}
    groups = default_groups(run_dir.table, labels, ExplainConfig(n_contrast=4))
    texts = vocab_texts(models["a"].tokenizer, models["a"].d_vocab)
    cfg = ExplainConfig(k=6, quantiles=(0.5, 0.95), device="cpu", batch_rows=5)
    live = explain_neurons(LiveModelSource(models, ts), groups, texts, config=cfg)
    cached = explain_neurons(StoreSource(stores), groups, texts, config=cfg)
    assert live.bits == cached.bits == 32 and live.source["kind"] == "live"
    pd.testing.assert_frame_equal(live.examples_frame(), cached.examples_frame())
    np.testing.assert_array_equal(live.context_acts, cached.context_acts)
    np.testing.assert_allclose(live.vr, cached.vr, rtol=0, atol=1e-12)
