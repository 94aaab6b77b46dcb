"""universal_neurons.distributed on a real LocalCluster (2 worker processes x 1 thread): every result is
checked against the single-process engine, including after a worker is SIGKILLed mid-task."""

import contextlib
import functools
import os
import signal
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("distributed")
import cloudpickle  # noqa: E402  (installed with distributed)
from conftest import SAMPLE_TEXT  # noqa: E402

from universal_neurons import CorrelationConfig, CorrelationResult, ModelLayout, correlate, universality_table  # noqa: E402
from universal_neurons.activations import (  # noqa: E402
    ActivationStore,
    StoreConfig,
    UniversalNeuronsError,
    cache_activations,
    iter_aligned,
    load_model,
)
from universal_neurons.activations.build import build_token_set  # noqa: E402
from universal_neurons.activations.sources import LiveSource  # noqa: E402
from universal_neurons.activations.tokens import TokenSetConfig  # noqa: E402
from universal_neurons.cli.main import main as cli  # noqa: E402
from universal_neurons.distributed import (  # noqa: E402
    batch_shards,
    cache_distributed,
    cluster,  # noqa: E402
    connect,
    correlate_distributed,
    live_shards,
    shard_ranges,
    stitch_stores,
    store_shards,
    using_cluster,
)

# the fault-injection hook below is defined here: send it to the workers by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

DOCS = SAMPLE_TEXT.split("\n\n") * 32  # ~14k tokens: 4 chunks of 4096 in a d_mlp=64 float32 store
F32 = StoreConfig(dtype="float32")


def _warm_imports():
    from transformer_lens.model_bridge import TransformerBridge  # noqa: F401

    import universal_neurons.activations.models  # noqa: F401


@pytest.fixture(scope="module")
def client():
    c = connect("local:2")
    from distributed import fire_and_forget

    for w in c.scheduler_info()["workers"]:  # the workers import TransformerLens while this process builds stores
        fire_and_forget(c.submit(_warm_imports, workers=[w], pure=False))
    yield c
    c.close()


@pytest.fixture(scope="module")
def ts(tokenizer):
    return build_token_set(DOCS, tokenizer, TokenSetConfig(ctx_len=32))  # ~450 rows


@pytest.fixture(scope="module")
def stores(tiny_family, ts, tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return [cache_activations(load_model(m, checkpoint=0), ts, d / f"{k}.h5", config=F32, batch_rows=32)
            for k, m in enumerate(tiny_family)]


LAYOUTS = [ModelLayout("a", 2, 64), ModelLayout("b", 2, 64)]


def _assert_same(r0: CorrelationResult, r1: CorrelationResult, atol=1e-10):
    """Equal up to floating-point merge order; partners and the universality table identical."""
    assert r0.n_tokens == r1.n_tokens
    for name in ("max_corr", "baseline", "min_corr"):
        np.testing.assert_allclose(getattr(r1, name), getattr(r0, name), rtol=0, atol=atol, err_msg=name)
    np.testing.assert_array_equal(r1.partner, r0.partner)
    np.testing.assert_array_equal(r1.baseline_partner, r0.baseline_partner)
    for lab in r0.mean:
        np.testing.assert_allclose(r1.mean[lab], r0.mean[lab], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(r1.var[lab], r0.var[lab], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(r1.dead[lab], r0.dead[lab])
    t0, t1 = universality_table(r0), universality_table(r1)
    np.testing.assert_array_equal(t1["is_universal"].to_numpy(), t0["is_universal"].to_numpy())
    np.testing.assert_allclose(t1["excess_corr"].to_numpy(float), t0["excess_corr"].to_numpy(float), atol=atol)


def _planted(n_batches=7, tokens=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(tokens, 40, generator=g) * 0.1 + 1e3  # mean 10^4 x the spread: tests the shifted merge
        y = torch.cat([x[:, :20] * 2 + torch.randn(tokens, 20, generator=g) * 0.1,
                       torch.randn(tokens, 20, generator=g)], 1)
        out.append((torch.rand(tokens, generator=g) > 0.2, [x, y.flip(1)]))
    return out


# ----------------------------------------------------------------------------- correlation


def test_store_shards_equal_single_process_and_table_is_identical(client, stores):
    cfg = CorrelationConfig()  # rotation baseline, one block
    r0 = correlate(iter_aligned(stores, batch_tokens=4096), LAYOUTS, cfg)
    r1 = correlate_distributed(iter_aligned(stores, batch_tokens=4096), LAYOUTS, cfg, cluster=client, n_shards=3)
    _assert_same(r0, r1)
    assert r1.provenance["distributed"]["tasks"] == 3 and r1.config == cfg


@pytest.mark.parametrize("baseline", ["permutation", "gaussian"])
def test_blocks_and_per_batch_baselines_equal_single_process(client, baseline):
    """Two reference blocks x 3 shards; the baselines' per-batch noise follows global batch indices."""
    batches = _planted()
    layouts = [ModelLayout("a", 2, 20), ModelLayout("b", 1, 40)]
    cfg = CorrelationConfig(baseline=baseline, block_size=20, top_k=2, hist_bins=4)
    r0 = correlate(batches, layouts, cfg)
    r1 = correlate_distributed(batch_shards(batches), layouts, cfg, cluster=client, n_shards=3)
    _assert_same(r0, r1, atol=1e-9)
    np.testing.assert_array_equal(r1.histogram, r0.histogram)
    np.testing.assert_array_equal(r1.top_k_partner, r0.top_k_partner)
    assert r1.provenance["passes"] == 2 and r1.provenance["distributed"]["tasks"] == 6
    np.testing.assert_array_equal(r1.partner[0][:20], 39 - np.arange(20))  # planted: b's columns are flipped


def _kill_once(kind, shard, block, *, marker, victim):
    """Fault injection (replaces `cluster.before_task`): the first worker to reach shard `victim`
    dies there with SIGKILL, once."""
    if shard != victim:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: exactly one attempt dies
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_is_retried_and_the_result_is_unchanged(client, stores, tmp_path, monkeypatch):
    cfg = CorrelationConfig()
    src = store_shards(stores, batch_tokens=4096)
    r0 = correlate(iter_aligned(stores, batch_tokens=4096), LAYOUTS, cfg)
    calm = correlate_distributed(src, LAYOUTS, cfg, cluster=client, n_shards=4)
    marker = tmp_path / "killed"
    # the hook in place at submit time travels to the workers with every task
    monkeypatch.setattr(cluster, "before_task", functools.partial(_kill_once, marker=str(marker), victim=1))
    hit = correlate_distributed(src, LAYOUTS, cfg, cluster=client, n_shards=4)
    assert marker.exists() and int(marker.read_text()) > 0  # a worker really died mid-correlation
    for name in ("max_corr", "partner", "baseline", "baseline_partner", "min_corr"):  # bit for bit
        np.testing.assert_array_equal(getattr(hit, name), getattr(calm, name), err_msg=name)
    _assert_same(r0, hit)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it, for the tests after this one


def test_live_models_on_workers_equal_live_source(client, tiny_family, ts):
    lms = [load_model(m, checkpoint=0) for m in tiny_family]
    r0 = correlate(LiveSource(lms, ts, batch_rows=32), LAYOUTS, CorrelationConfig())
    src = live_shards(tiny_family, ts, batch_rows=32, checkpoint=0)
    r1 = correlate_distributed(src, LAYOUTS, CorrelationConfig(), cluster=client, n_shards=2)
    _assert_same(r0, r1, atol=1e-6)  # forward passes on other processes (1 thread) may round differently


def test_no_cluster_runs_in_process(stores):
    cfg = CorrelationConfig()
    r0 = correlate(iter_aligned(stores, batch_tokens=4096), LAYOUTS, cfg)
    r1 = correlate_distributed(store_shards(stores, batch_tokens=4096), LAYOUTS, cfg, cluster=None)
    np.testing.assert_array_equal(r1.max_corr, r0.max_corr)
    assert "distributed" not in r1.provenance


# ----------------------------------------------------------------------------- caching and stitching


def _assert_store_like(stitched: Path, plain: Path):
    with ActivationStore.open(stitched) as s, ActivationStore.open(plain) as p:
        assert s.hooks == p.hooks and s.n_tokens == p.n_tokens and s.token_set_hash == p.token_set_hash
        assert s.config == p.config and s.layers == p.layers and s.d_mlp == p.d_mlp
        np.testing.assert_array_equal(s.token_ids, p.token_ids)
        np.testing.assert_array_equal(s.mask, p.mask)
        np.testing.assert_array_equal(s.doc_index, p.doc_index)
        for h in p.hooks:
            np.testing.assert_allclose(s[h][()], p[h][()], rtol=0, atol=1e-6, err_msg=h)
            np.testing.assert_array_equal(s[h][100:300, 5], s[h][()][100:300, 5])  # lazy slices across shards
            assert s[h].dims[0].label == "token" and dict(s[h].attrs)["layer"] == dict(p[h].attrs)["layer"]
        with h5py.File(stitched) as fs, h5py.File(plain) as fp:
            skip = {"provenance"}
            assert {k: fs.attrs[k] for k in fs.attrs if k not in skip}.keys() == \
                   {k: fp.attrs[k] for k in fp.attrs if k not in skip}.keys()
            for k in ("complete_rows", "n_rows", "n_tokens", "token_set_hash", "token_set_config", "store_config"):
                assert fs.attrs[k] == fp.attrs[k], k


def test_cache_shards_stitch_into_one_store_every_reader_accepts(client, tiny_family, ts, stores, tmp_path):
    out = tmp_path / "run" / "a.h5"
    path = cache_distributed(tiny_family[0], ts, out, cluster=client, config=F32, checkpoint=0, batch_rows=32,
                             n_shards=3)
    assert path == out and len(list((tmp_path / "run" / "a.h5.shards").glob("shard-*.h5"))) == 3
    _assert_store_like(out, stores[0])
    # shard paths are relative: the stitched store still opens after moving the directory, from any cwd
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    cwd = os.getcwd()
    os.chdir("/")
    try:
        _assert_store_like(moved / "a.h5", stores[0])
    finally:
        os.chdir(cwd)
    # a second run reuses the finished shards and refuses to replace the stitched store silently
    with pytest.raises(UniversalNeuronsError, match="already exists"):
        cache_distributed(tiny_family[0], ts, moved / "a.h5", cluster=client, config=F32, checkpoint=0,
                          batch_rows=32, n_shards=3)


def test_stitched_store_feeds_iter_aligned_and_correlate(client, tiny_family, ts, stores, tmp_path):
    shards = []
    for k, (r0, r1) in enumerate([(0, 160), (160, 320), (320, ts.n_rows)]):
        shards.append(cache_activations(load_model(tiny_family[1], checkpoint=0), ts.select_rows(r0, r1),
                                        tmp_path / f"b{k}.h5", config=F32, batch_rows=32))
    stitched = stitch_stores(shards, ts, tmp_path / "b.h5")
    src = iter_aligned([stores[0], stitched], batch_tokens=4096)
    cfg = CorrelationConfig()
    _assert_same(correlate(iter_aligned(stores, batch_tokens=4096), LAYOUTS, cfg), correlate(src, LAYOUTS, cfg), 1e-6)


def test_stitch_refuses_mismatched_shards(tiny_family, ts, stores, tmp_path):
    lm = load_model(tiny_family[0], checkpoint=0)
    half = cache_activations(lm, ts.select_rows(0, 64), tmp_path / "h.h5", config=F32, batch_rows=32)
    with pytest.raises(UniversalNeuronsError, match="rows"):
        stitch_stores([half, half], ts, tmp_path / "y.h5")
    assert not (tmp_path / "y.h5").exists()


# ----------------------------------------------------------------------------- switch, CLI, errors


def test_cli_correlate_with_cluster_address(client, stores, tmp_path, capsys):
    out = tmp_path / "corr.h5"
    assert cli(["correlate", *map(str, stores), "-o", str(out), "--batch-tokens", "4096",
                "--cluster", client.scheduler.address]) == 0
    r0 = correlate(iter_aligned(stores, batch_tokens=4096), LAYOUTS, CorrelationConfig())
    _assert_same(r0, CorrelationResult.load(out))
    assert "cluster" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["local:0", "local:x", "gpu", 3, "scheduler-file:/nonexistent.json"])
def test_bad_cluster_specs_say_what_to_use(spec):
    with pytest.raises(UniversalNeuronsError, match="local:N|scheduler"):
        connect(spec)


def test_connect_none_and_shard_ranges():
    assert connect(None) is None and connect("") is None
    with using_cluster(None) as c:
        assert c is None
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_ranges(2, 5) == [(0, 1), (1, 2)]


def test_pipeline_on_a_cluster_gives_the_in_process_table(client, tiny_family, ts, tmp_path):
    from universal_neurons.pipeline import PipelineConfig, run_pipeline

    base = dict(tokens=ts.config, batch_rows=32, store=F32)
    local = run_pipeline(tiny_family, ts, tmp_path / "local", checkpoint=0, config=PipelineConfig(**base))
    dist = run_pipeline(tiny_family, ts, tmp_path / "dist", checkpoint=0,
                        config=PipelineConfig(**base, cluster=client.scheduler.address))
    assert (tmp_path / "dist" / "stores" / "a.h5.shards").is_dir()  # cached by the workers, stitched
    for c in ("is_universal", "partner_layer_b", "partner_neuron_b"):
        np.testing.assert_array_equal(local.table[c].to_numpy(), dist.table[c].to_numpy(), err_msg=c)
    np.testing.assert_allclose(local.table["excess_corr"], dist.table["excess_corr"], rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- properties and ablation


def test_moments_merge_of_shards_equals_scipy():
    from scipy import stats

    from universal_neurons.properties import StreamingMoments

    x = np.random.default_rng(0).standard_normal((301, 6)) * 0.1 + 1e3  # large mean: the shifted merge matters
    parts = []
    for a, b in [(0, 7), (7, 7), (7, 150), (150, 301)]:  # an empty shard too
        acc = StreamingMoments(6)
        for i in range(a, b, 40):
            acc.update(x[i:min(i + 40, b)])
        parts.append(acc)
    merged = functools.reduce(lambda p, q: p.merge(q), parts).result()
    assert merged["count"] == 301
    np.testing.assert_allclose(merged["mean"], x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(merged["var"], x.var(0), rtol=1e-9)
    np.testing.assert_allclose(merged["skew"], stats.skew(x, bias=True), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(merged["kurt"], stats.kurtosis(x, fisher=False, bias=True), rtol=1e-6, atol=1e-9)
    with pytest.raises(UniversalNeuronsError, match="columns"):
        StreamingMoments(3).merge(StreamingMoments(6))


def test_moments_on_workers_equal_activation_moments(client, tiny_family, ts):
    from universal_neurons.distributed import moments_distributed
    from universal_neurons.properties import activation_moments

    df0 = activation_moments(load_model(tiny_family[0], checkpoint=0), token_set=ts, batch_rows=32)
    df1 = moments_distributed(tiny_family[0], ts, cluster=client, checkpoint=0, n_shards=3, batch_rows=32)
    assert list(df1.columns) == list(df0.columns)
    assert df1.attrs["moments"]["n_tokens"] == df0.attrs["moments"]["n_tokens"]
    assert df1.attrs["moments"]["token_set_hash"] == ts.hash and len(df1.attrs["moments"]["distributed"]["shards"]) == 3
    for c in df0.columns:
        np.testing.assert_allclose(df1[c].to_numpy(float), df0[c].to_numpy(float), rtol=1e-9, atol=1e-12, err_msg=c)


def test_ablation_on_workers_equals_ablation_study(client, tiny_family, ts):
    from universal_neurons.ablation import AblationConfig, ablation_study
    from universal_neurons.distributed import ablation_distributed

    cfg = AblationConfig(kind="mean", n_controls=2, n_bootstrap=200, batch_rows=64, seed=3)
    neurons = {0: [1, 5, 9], 1: [3, 7]}
    r0 = ablation_study(load_model(tiny_family[0], checkpoint=0), neurons, ts, cfg)
    r1 = ablation_distributed(tiny_family[0], neurons, ts, cfg, cluster=client, checkpoint=0, n_shards=3)
    assert r1.sets == r0.sets and len(r1.provenance["distributed"]["shards"]) == 3
    for k, v in r0.row_sums.items():
        np.testing.assert_allclose(r1.row_sums[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
    num = r0.runs.select_dtypes("number").columns
    np.testing.assert_array_equal(r1.runs.drop(columns=num).to_numpy(), r0.runs.drop(columns=num).to_numpy())
    np.testing.assert_allclose(r1.runs[num].to_numpy(float), r0.runs[num].to_numpy(float), rtol=1e-9, atol=1e-12)
    # same rows, same bootstrap draws: the single-process summary (bit for bit on a CPU cluster; the tolerance
    # only admits forward passes that round differently on another device or thread count)
    pd.testing.assert_frame_equal(r1.summary, r0.summary, check_exact=False, rtol=1e-9, atol=1e-12)


def test_moments_and_ablation_without_cluster_run_in_process(tiny_family, ts):
    from universal_neurons.ablation import AblationConfig, ablation_study
    from universal_neurons.distributed import ablation_distributed, moments_distributed
    from universal_neurons.properties import activation_moments

    lm = load_model(tiny_family[0], checkpoint=0)
    small = ts.select_rows(0, 64)
    df = moments_distributed(tiny_family[0], small, cluster=None, checkpoint=0, kinds=("post",))
    pd.testing.assert_frame_equal(df, activation_moments(lm, token_set=small, kinds=("post",)), check_exact=True)
    assert "distributed" not in df.attrs["moments"]
    cfg = AblationConfig(kind="zero", n_controls=1, n_bootstrap=20, per_layer=False)
    r = ablation_distributed(tiny_family[0], [(0, 1), (1, 2)], small, cfg, cluster=None, checkpoint=0)
    pd.testing.assert_frame_equal(r.runs, ablation_study(lm, [(0, 1), (1, 2)], small, cfg).runs, check_exact=True)
    assert "distributed" not in r.provenance


# ----------------------------------------------------------------------------- every stage that scans tokens


def _let_workers_come_back(client):
    """The nanny restarts a killed worker. What follows plans its shards from the workers alive, so a restart
    that a loaded machine makes slow (imports on 2 busy cores) is waited for a while, not failed on: the
    results above are what shows that the loss was survived."""
    with contextlib.suppress(TimeoutError):
        client.wait_for_workers(2, timeout=120)


def _kill_once_per_kind(kind, shard, block, *, marker_dir, victim, kinds):
    """Fault injection: for each job kind in `kinds`, the first worker to reach shard `victim` of it dies
    there with SIGKILL, once per kind."""
    if kind in kinds:
        _kill_once(kind, shard, block, marker=os.path.join(marker_dir, kind), victim=victim)


def _assert_frames_close(got: pd.DataFrame, want: pd.DataFrame, rtol=1e-9, atol=1e-12):
    """The same columns and rows; numbers equal up to float association, everything else exactly."""
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    num = want.select_dtypes("number").columns
    pd.testing.assert_frame_equal(got.drop(columns=num), want.drop(columns=num))
    np.testing.assert_allclose(got[num].to_numpy(float), want[num].to_numpy(float), rtol=rtol, atol=atol)


def test_all_pairs_on_a_cluster_equal_in_process_with_a_killed_worker(client, stores, tmp_path, monkeypatch, capsys):
    """One distributed correlate per reference: each equals `correlate` with that store first (up to merge order),
    and the in-process all-pairs result (its one-pass triangle's float32 GEMMs round differently: 1e-6)."""
    from universal_neurons.pipeline import correlate_stores

    local = correlate_stores(stores, tmp_path / "local.h5", batch_tokens=4096, all_pairs=True)
    marker = tmp_path / "killed"
    monkeypatch.setattr(cluster, "before_task", functools.partial(_kill_once, marker=str(marker), victim=1))
    out = tmp_path / "ap.h5"
    assert cli(["correlate", *map(str, stores), "--all-pairs", "-o", str(out), "--batch-tokens", "4096",
                "--cluster", client.scheduler.address]) == 0
    assert marker.exists()  # a worker died during one reference's correlation
    assert "preflight, reference b" in capsys.readouterr().out
    for r, lab in enumerate(("a", "b")):
        res = CorrelationResult.load(tmp_path / f"ap-ref-{lab}.h5")
        assert res.provenance["all_pairs"] == "one distributed correlate run per reference"
        # workers: those alive when this reference was planned (a killed one may not be back yet)
        assert res.provenance["distributed"]["workers"] in (1, 2) and res.labels == local[lab].labels
        order = [r, 1 - r]
        one = correlate(iter_aligned([stores[i] for i in order], batch_tokens=4096), [LAYOUTS[i] for i in order],
                        CorrelationConfig())
        _assert_same(one, res)
        np.testing.assert_allclose(res.max_corr, local[lab].max_corr, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(res.partner, local[lab].partner)
    _let_workers_come_back(client)


@pytest.fixture(scope="module")
def pre_store(tiny_family, ts, tmp_path_factory):
    """A store of model a holding hook_pre and hook_post (what the properties' store moments read)."""
    path = tmp_path_factory.mktemp("pre") / "a.h5"
    return cache_activations(load_model(tiny_family[0], checkpoint=0), ts, path,
                             config=StoreConfig(dtype="float32", kinds=("post", "pre")), batch_rows=32)


def test_properties_cli_on_a_cluster_equals_in_process(client, tiny_family, ts, stores, pre_store, tmp_path):
    from universal_neurons.distributed import store_moments_distributed
    from universal_neurons.properties import activation_moments, load_properties

    tokens = ts.save(tmp_path / "tokens.h5")
    common = ["properties", str(tiny_family[0]), "--checkpoint", "0", "--batch-rows", "32"]
    for source in (["--tokens", str(tokens)], ["--store", str(pre_store)]):  # live moments, store moments
        name = source[0][2:]
        assert cli([*common, *source, "-o", str(tmp_path / f"{name}-here.csv")]) == 0
        assert cli([*common, *source, "-o", str(tmp_path / f"{name}-cluster.csv"),
                    "--cluster", client.scheduler.address]) == 0
        here, there = load_properties(tmp_path / f"{name}-here.csv"), load_properties(tmp_path / f"{name}-cluster.csv")
        _assert_frames_close(there, here)
        spread = there.attrs["provenance"]["moments"]["distributed"]
        assert len(spread["shards"]) == 2 * spread["workers"]  # 2 per worker
        assert "distributed" not in here.attrs["provenance"]["moments"]
    # store moments over uneven token ranges: one process's numbers
    df0 = activation_moments(pre_store, token_set=ts, batch_rows=7)
    df1 = store_moments_distributed(pre_store, cluster=client, token_set=ts, n_shards=3, batch_rows=7)
    _assert_frames_close(df1, df0)
    with pytest.raises(UniversalNeuronsError, match="hook_pre"):  # refused on the driver, before any task
        store_moments_distributed(stores[0], cluster=client)


@pytest.fixture(scope="module")
def table_path(stores, tmp_path_factory):
    """A universality table of model a with a few universal neurons (a low threshold: untrained seeds)."""
    from universal_neurons import save_universality_table

    res = correlate(iter_aligned(stores, batch_tokens=4096), LAYOUTS, CorrelationConfig())
    table = universality_table(res, threshold=0.05)
    assert 0 < table["is_universal"].sum() < 30
    path = tmp_path_factory.mktemp("table") / "universality.csv"
    save_universality_table(table, path, provenance=res.provenance)
    return path


def test_ablate_cli_on_a_cluster_equals_in_process(client, tiny_family, ts, table_path, tmp_path, capsys):
    from universal_neurons.ablation import AblationResult

    tokens = ts.save(tmp_path / "tokens.h5")
    common = ["ablate", str(tiny_family[0]), "--checkpoint", "0", "--table", str(table_path), "--tokens", str(tokens),
              "--kind", "mean", "--controls", "2", "--bootstrap", "100", "--batch-rows", "64"]
    assert cli([*common, "-o", str(tmp_path / "here")]) == 0
    assert cli([*common, "-o", str(tmp_path / "there"), "--cluster", client.scheduler.address]) == 0
    assert "row shard(s) on 2 worker(s)" in capsys.readouterr().out
    here, there = AblationResult.load(tmp_path / "here"), AblationResult.load(tmp_path / "there")
    assert there.sets == here.sets
    _assert_frames_close(there.runs, here.runs)
    _assert_frames_close(there.summary, here.summary)
    # per-token files are written by one process only: refused before any work
    assert cli([*common, "-o", str(tmp_path / "pt"), "--per-token", "--cluster", client.scheduler.address]) == 2
    assert "--per-token is not available with --cluster" in capsys.readouterr().err
    assert not (tmp_path / "pt").exists()


def test_later_stages_of_a_run_on_a_cluster_equal_in_process_with_killed_workers(client, tiny_family, ts, tmp_path,
                                                                                  monkeypatch):
    """properties (live moments), ablation and agreement run on the run's cluster; a worker dies in each."""
    from universal_neurons.ablation import AblationConfig, AblationResult, ablation_stage
    from universal_neurons.agreement import AgreementConfig, AgreementResult, agreement_stage
    from universal_neurons.pipeline import PipelineConfig, run_pipeline
    from universal_neurons.properties import load_properties, properties_stage

    def stages():
        return [properties_stage(), ablation_stage(AblationConfig(n_controls=2, n_bootstrap=100, batch_rows=64)),
                agreement_stage(config=AgreementConfig(n_bootstrap=100, batch_rows=64))]

    base = dict(tokens=ts.config, batch_rows=32, store=F32, threshold=0.05)
    local = run_pipeline(tiny_family, ts, tmp_path / "local", checkpoint=0, config=PipelineConfig(**base),
                         extra_stages=stages())
    markers = tmp_path / "killed"
    markers.mkdir()
    kinds = ("moments", "ablation", "agreement")
    monkeypatch.setattr(cluster, "before_task", functools.partial(_kill_once_per_kind, marker_dir=str(markers),
                                                                  victim=1, kinds=kinds))
    dist = run_pipeline(tiny_family, ts, tmp_path / "dist", checkpoint=0, extra_stages=stages(),
                        config=PipelineConfig(**base, cluster=client.scheduler.address))
    assert sorted(p.name for p in markers.iterdir()) == sorted(kinds)  # a worker died in each stage
    assert dist.client is None and int(local.table["is_universal"].sum()) > 0
    pd.testing.assert_frame_equal(dist.table, local.table, check_exact=False, rtol=0, atol=1e-10)
    for name in ("properties.csv", "property_comparison.csv"):
        _assert_frames_close(load_properties(tmp_path / "dist" / name), load_properties(tmp_path / "local" / name))
    assert "distributed" in load_properties(tmp_path / "dist" / "properties.csv").attrs["provenance"]["moments"]
    a0, a1 = AblationResult.load(tmp_path / "local" / "ablation"), AblationResult.load(tmp_path / "dist" / "ablation")
    assert a1.sets == a0.sets and a1.provenance["distributed"]["workers"] in (1, 2)  # a killed one may be away
    _assert_frames_close(a1.runs, a0.runs)
    _assert_frames_close(a1.summary, a0.summary)
    g0 = AgreementResult.load(tmp_path / "local" / "agreement")
    g1 = AgreementResult.load(tmp_path / "dist" / "agreement")
    _assert_frames_close(g1.table, g0.table)
    _assert_frames_close(g1.by_step, g0.by_step)
    for k, v in g0.rows.items():
        np.testing.assert_allclose(g1.rows[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
    _let_workers_come_back(client)
