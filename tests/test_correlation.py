"""Correlation engine against numpy.corrcoef in float64, planted partners, blocking, errors."""

import logging

import h5py
import numpy as np
import pytest
import torch

from universal_neurons.baselines import rotation_matrices
from universal_neurons.correlation import (
    CorrelationConfig,
    CorrelationResult,
    ModelLayout,
    correlate,
    correlate_all_pairs,
    preflight,
)
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import from_json, set_progress

set_progress(False)

A, B = ModelLayout("a", 2, 24), ModelLayout("b", 3, 16)
SIZES = (300, 1000, 41, 659)  # uneven batches, 2000 tokens


def _source(arrays, mask, sizes=SIZES, dtype=torch.float32):
    """List of (mask, [acts per model]) batches cut at `sizes`."""
    out, s = [], 0
    for n in sizes:
        sl = slice(s, s + n)
        out.append((torch.from_numpy(mask[sl]), [torch.from_numpy(a[sl]).to(dtype) for a in arrays]))
        s += n
    return out


def _data(kind, rng, T=2000):
    base = rng.standard_normal((T, 48))
    if kind == "large_mean":     # mean 1e4 x spread: one-pass sum(xy) in low precision fails here
        x = base + 1e4
    elif kind == "student_t":    # heavy tails
        x = rng.standard_t(2, size=(T, 48))
    elif kind == "sparse":       # mostly zero, like post-GELU firing
        x = np.where(rng.random((T, 48)) < 0.05, rng.exponential(3.0, (T, 48)), 0.0)
        x[:5, :] = 1.0           # every neuron fires at least once
    elif kind == "sorted_large_mean":  # tokens ordered by neuron 0: each batch's first rows are its extremes
        x = base + 1e4
    else:
        x = base
    y = 0.7 * x[:, rng.permutation(48)] + 0.5 * rng.standard_normal((T, 48))
    if kind in ("large_mean", "sorted_large_mean"):
        y = y - 3e4
    if kind == "sorted_large_mean":
        order = np.argsort(x[:, 0])
        x, y = x[order], y[order]
    return x.astype(np.float32), y.astype(np.float32)


def _numpy_corr(x, y, mask):
    x, y = x.astype(np.float64)[mask], y.astype(np.float64)[mask]
    return np.corrcoef(x.T, y.T)[: x.shape[1], x.shape[1]:]


@pytest.mark.parametrize("kind", ["gaussian", "large_mean", "sorted_large_mean", "student_t", "sparse"])
def test_matches_numpy_corrcoef(kind, tmp_path):
    rng = np.random.default_rng(1)
    x, y = _data(kind, rng)
    mask = rng.random(2000) > 0.25
    ref = _numpy_corr(x, y, mask)
    r = correlate(_source([x, y], mask), [A, B], CorrelationConfig(full_matrix_dtype="float32"),
                  full_matrix_path=tmp_path / "full.h5")
    with h5py.File(tmp_path / "full.h5") as f:
        full = f["corr/b"][()]
    assert np.abs(full - ref).max() <= 1e-5
    assert np.abs(r.max_corr[0] - ref.max(1)).max() <= 1e-5
    assert np.abs(r.min_corr[0] - ref.min(1)).max() <= 1e-5
    assert (r.partner[0] == ref.argmax(1)).all()
    assert r.n_tokens == mask.sum()
    xm = x.astype(np.float64)[mask]
    np.testing.assert_allclose(r.mean["a"], xm.mean(0), rtol=1e-12, atol=1e-6 * xm.std())
    np.testing.assert_allclose(r.var["a"], xm.var(0), rtol=1e-6)


def _independent(rng, T, n):
    """Realistic-ish activations: independent GELU-like units, not a low-rank mixture."""
    g = rng.standard_normal((T, n))
    return (g * 0.5 * (1 + np.tanh(0.8 * g)) + 0.05 * rng.standard_normal((T, n))).astype(np.float32)


def test_planted_permutation_found_and_rotation_baseline_low():
    rng = np.random.default_rng(2)
    lay_a, lay_m = ModelLayout("a", 2, 64), ModelLayout("m", 2, 64)
    x = _independent(rng, 3000, 128)
    perm = rng.permutation(128)          # across layers too: y_j = x_perm[j]
    y = x[:, perm]
    mask = np.ones(3000, bool)
    r = correlate(_source([x, y], mask, (1000, 1000, 1000)), [lay_a, lay_m])
    assert np.abs(r.max_corr[0] - 1).max() <= 1e-4
    assert (perm[r.partner[0]] == np.arange(128)).all()
    layer, neuron = r.partner_of("m")
    assert (layer * 64 + neuron == r.partner[0]).all()
    assert r.baseline[0].max() < 0.9
    assert r.baseline[0].mean() < 0.6


def _rotation_direct(x, y, mask, lay, seed):
    R = rotation_matrices(lay.label, lay.n_layers, lay.d_mlp, seed=seed).numpy()
    d = lay.d_mlp
    u = np.concatenate([y.astype(np.float64)[:, k * d:(k + 1) * d] @ R[k].T for k in range(lay.n_layers)], 1)
    return _numpy_corr(x, u, mask)


def test_rotation_identity_equals_direct_computation():
    rng = np.random.default_rng(3)
    x, y = _data("large_mean", rng)
    mask = rng.random(2000) > 0.1
    r = correlate(_source([x, y], mask), [A, B], CorrelationConfig(seed=11))
    direct = _rotation_direct(x, y, mask, B, 11)
    assert np.abs(r.baseline[0] - direct.max(1)).max() <= 1e-5
    assert (r.baseline_partner[0] == direct.argmax(1)).all()


@pytest.mark.parametrize("baseline", ["rotation", "gaussian", "permutation"])
def test_blocked_equals_unblocked_and_runs_repeat(baseline):
    rng = np.random.default_rng(4)
    lay_a = ModelLayout("a", 2, 96)
    x = _independent(rng, 1200, 192)
    y = (x[:, :48] + rng.standard_normal((1200, 48))).astype(np.float32)
    mask = rng.random(1200) > 0.2
    src = _source([x, y], mask, (500, 700))
    cfg = dict(baseline=baseline, top_k=3, hist_bins=8, seed=5)
    whole = correlate(src, [lay_a, B], CorrelationConfig(**cfg))
    again = correlate(src, [lay_a, B], CorrelationConfig(**cfg))
    blocked = correlate(src, [lay_a, B], CorrelationConfig(block_size=64, **cfg))
    assert blocked.provenance["passes"] == 3 and whole.provenance["passes"] == 1
    for name in CorrelationResult._ARRAYS:
        np.testing.assert_array_equal(getattr(blocked, name), getattr(whole, name), err_msg=name)
        np.testing.assert_array_equal(getattr(again, name), getattr(whole, name), err_msg=name)
    other = correlate(src, [lay_a, B], CorrelationConfig(**{**cfg, "seed": 6}))
    assert not np.array_equal(other.baseline, whole.baseline)


def test_memory_budget_forces_blocks():
    lay_a = ModelLayout("a", 4, 256)
    small = CorrelationConfig(memory_budget=2**20)
    plan = preflight([lay_a, B], 10_000, small)
    assert plan["passes"] > 1 and plan["block_size"] % 64 == 0
    assert plan["accumulator_bytes"] <= small.memory_budget
    assert preflight([lay_a, B], 10_000)["passes"] == 1
    assert "TFLOP" in plan["summary"]
    with pytest.raises(UniversalNeuronsError, match="raise memory_budget"):
        preflight([lay_a, B], 10, CorrelationConfig(memory_budget=1000))


def test_dead_neurons_are_nan_excluded_and_counted(caplog, tmp_path):
    rng = np.random.default_rng(5)
    x, y = _data("gaussian", rng)
    x[:, 3] = 2.5                    # dead in a
    y[:, 7] = -1.0                   # dead in b
    y[:, 9] = x[:, 0] * 1e-3 + 4.0   # alive, a perfect partner for neuron 0
    mask = np.ones(2000, bool)
    with caplog.at_level(logging.WARNING, logger="universal_neurons"):
        r = correlate(_source([x, y], mask), [A, B], CorrelationConfig(top_k=2, full_matrix_dtype="float32"),
                      full_matrix_path=tmp_path / "f.h5")
    assert np.isnan(r.max_corr[0, 3]) and r.partner[0, 3] == -1 and np.isnan(r.baseline[0, 3])
    assert (r.partner[0] != 7).all()
    assert r.partner[0, 0] == 9 and abs(r.max_corr[0, 0] - 1) < 1e-5
    assert r.n_dead == {"a": 1, "b": 1}
    assert r.dead["b"][7] and not r.dead["b"][9]
    assert "dead neurons" in caplog.text and "a: 1 of 48" in caplog.text
    with h5py.File(tmp_path / "f.h5") as f:
        full = f["corr/b"][()]
    assert np.isnan(full[3]).all() and np.isnan(full[:, 7]).all()
    assert np.isfinite(np.delete(np.delete(full, 3, 0), 7, 1)).all()


@pytest.mark.parametrize("baseline", ["gaussian", "permutation"])
def test_gaussian_and_permutation_baselines_near_chance(baseline):
    rng = np.random.default_rng(6)
    x = _independent(rng, 4000, 48)
    y = x[:, ::-1].copy()
    mask = rng.random(4000) > 0.1
    r = correlate(_source([x, y], mask, (1500, 2500)), [A, B], CorrelationConfig(baseline=baseline))
    assert np.abs(r.max_corr[0] - 1).max() < 1e-4
    # max of 48 nearly independent correlations over n tokens: ~ 2-3 / sqrt(n)
    assert r.baseline[0].max() < 5 / np.sqrt(r.n_tokens)
    assert r.baseline[0].mean() > 0.5 / np.sqrt(r.n_tokens)


def test_bf16_error_is_small_and_measured():
    rng = np.random.default_rng(7)
    x, y = _data("large_mean", rng)
    mask = np.ones(2000, bool)
    ref = _numpy_corr(x, y, mask)
    r = correlate(_source([x, y], mask, ), [A, B],
                  CorrelationConfig(precision="bf16"))
    err = np.abs(r.max_corr[0] - ref.max(1)).max()
    assert err < 1e-2  # measured ~1e-3; docs/correlation.md


def test_top_k_histogram_absolute():
    rng = np.random.default_rng(8)
    x, y = _data("student_t", rng)
    mask = rng.random(2000) > 0.3
    ref = _numpy_corr(x, y, mask)
    r = correlate(_source([x, y], mask), [A, B], CorrelationConfig(top_k=4, hist_bins=20, absolute=True))
    np.testing.assert_allclose(r.max_corr[0], np.abs(ref).max(1), atol=1e-5)
    np.testing.assert_allclose(r.top_k_corr[0], -np.sort(-np.abs(ref), 1)[:, :4], atol=1e-5)
    assert (r.top_k_partner[0, :, 0] == np.abs(ref).argmax(1)).all()
    hist = np.stack([np.histogram(row, bins=20, range=(-1, 1))[0] for row in ref])
    np.testing.assert_array_equal(r.histogram[0], hist)
    assert r.hist_edges.shape == (21,)


def test_inputs_may_be_half_precision():
    rng = np.random.default_rng(9)
    x, y = _data("gaussian", rng)
    x16, y16 = x.astype(np.float16), y.astype(np.float16)
    mask = np.ones(2000, bool)
    ref = _numpy_corr(x16, y16, mask)
    r = correlate(_source([x16, y16], mask, dtype=torch.float16), [A, B])
    assert np.abs(r.max_corr[0] - ref.max(1)).max() <= 1e-5


def test_save_load_roundtrip_with_provenance(tmp_path):
    rng = np.random.default_rng(10)
    x, y = _data("gaussian", rng)
    r = correlate(_source([x, y], np.ones(2000, bool)), [A, B], CorrelationConfig(top_k=2, hist_bins=5),
                  provenance={"models": ["a", "b"], "token_set_hash": "abc"})
    r.save(tmp_path / "c.h5")
    back = CorrelationResult.load(tmp_path / "c.h5")
    for name in CorrelationResult._ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), getattr(r, name))
    assert back.reference == A and back.others == (B,) and back.config == r.config
    assert back.n_tokens == 2000 and back.dead["b"].dtype == bool
    with h5py.File(tmp_path / "c.h5") as f:
        prov = from_json(f.attrs["provenance"])
    assert prov["artefact"] == "correlation" and prov["token_set_hash"] == "abc"
    assert prov["config"]["baseline"] == "rotation" and "device" in prov and "versions" in prov
    with pytest.raises(UniversalNeuronsError, match=r"already exists; pass --overwrite \(overwrite=True"):
        r.save(tmp_path / "c.h5")
    r.save(tmp_path / "c.h5", overwrite=True)


def test_all_pairs_every_model_as_reference():
    rng = np.random.default_rng(11)
    x, y = _data("gaussian", rng)
    z = (x[:, ::-1] + rng.standard_normal((2000, 48))).astype(np.float32)
    C = ModelLayout("c", 1, 48)
    mask = rng.random(2000) > 0.2
    res = correlate_all_pairs(_source([x, y, z], mask), [A, B, C])
    assert list(res) == ["a", "b", "c"]
    assert res["b"].labels == ["a", "c"]
    np.testing.assert_allclose(res["b"].max_corr[0], _numpy_corr(y, x, mask).max(1), atol=1e-5)
    np.testing.assert_allclose(res["c"].max_corr[1], _numpy_corr(z, y, mask).max(1), atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_all_pairs_one_pass_equals_one_correlate_per_reference(precision):
    """The one-pass triangle (C^{m,a} = (C^{a,m})^T) against correlate run with each model first."""
    rng = np.random.default_rng(12)
    x, y = _data("large_mean", rng)
    z = (x[:, ::-1] + rng.standard_normal((2000, 48))).astype(np.float32)
    lays = [A, B, ModelLayout("c", 2, 24)]
    mask = rng.random(2000) > 0.2
    src = _source([x, y, z], mask)
    cfg = CorrelationConfig(precision=precision, top_k=3)
    res = correlate_all_pairs(src, lays, cfg)
    tol = 1e-6 if precision == "fp32" else 2e-2
    for r, lay in enumerate(lays):
        order = [r] + [i for i in range(3) if i != r]
        one = correlate([(m, [a[i] for i in order]) for m, a in src], [lays[i] for i in order], cfg)
        got = res[lay.label]
        assert got.provenance["all_pairs"].startswith("one pass") and got.labels == one.labels
        for name in ("max_corr", "min_corr", "baseline", "top_k_corr"):
            np.testing.assert_allclose(getattr(got, name), getattr(one, name), atol=tol, err_msg=name)
        if precision == "fp32":
            np.testing.assert_array_equal(got.partner, one.partner)
            np.testing.assert_allclose(got.mean[lay.label], one.mean[lay.label], rtol=1e-12)
    # independent check: numpy for the pair (c, a), which the triangle stores transposed
    np.testing.assert_allclose(res["c"].max_corr[0], _numpy_corr(z, x, mask).max(1),
                               atol=1e-5 if precision == "fp32" else 2e-2)


def test_all_pairs_falls_back_to_one_run_per_reference():
    rng = np.random.default_rng(13)
    x, y = _data("gaussian", rng)
    mask = np.ones(2000, bool)
    # the gaussian baseline, and 2 blocks per reference
    for cfg in (CorrelationConfig(baseline="gaussian"), CorrelationConfig(memory_budget=100_000)):
        res = correlate_all_pairs(_source([x, y], mask), [A, B], cfg)
        assert res["a"].provenance["all_pairs"] == "one correlate run per reference"
        np.testing.assert_allclose(res["b"].max_corr[0], _numpy_corr(y, x, mask).max(1), atol=1e-5)


def test_all_pairs_preflight_counts_the_triangle():
    from universal_neurons.correlation import preflight_all_pairs

    lays = [A, B, ModelLayout("c", 2, 24)]  # 48 neurons each
    one = preflight_all_pairs(lays, 1000, CorrelationConfig())
    sigma = 2 * 24 ** 2 + 3 * 16 ** 2 + 2 * 24 ** 2
    assert one["gemm_flops"] == 2.0 * 1000 * (3 * 48 * 48 + sigma) and one["passes"] == 1
    assert "one pass" in one["summary"]
    loop = preflight_all_pairs(lays, 1000, CorrelationConfig(baseline="gaussian"))
    single = preflight(lays, 1000, CorrelationConfig(baseline="gaussian"))
    assert loop["passes"] == 3 and loop["gemm_flops"] == 3 * single["gemm_flops"]


def _ok(n=10):
    return torch.ones(n, dtype=torch.bool), [torch.zeros(n, 48), torch.zeros(n, 48)]


@pytest.mark.parametrize("source, layouts, config, message", [
    ([(torch.ones(10, dtype=torch.bool), [torch.randn(10, 48), torch.randn(9, 48)])], [A, B], {},
     "model 'b' has 9 tokens but the mask has 10"),
    ([(torch.ones(10, dtype=torch.bool), [torch.randn(10, 48), torch.randn(10, 50)])], [A, B], {},
     "width 50 but its layout says n_layers\\*d_mlp = 3\\*16 = 48"),
    ([(torch.zeros(10, dtype=torch.bool), [torch.randn(10, 48), torch.randn(10, 48)])], [A, B], {},
     "0 masked-in token"),
    ([(torch.ones(10, dtype=torch.bool), [torch.randn(10, 48)])], [A, B], {},
     "activations for 1 model"),
    ([_ok()], [A], {}, "at least one other"),
    ([_ok()], [A, ModelLayout("a", 3, 16)], {}, "repeat"),
])
def test_bad_inputs_raise_clear_errors(source, layouts, config, message):
    with pytest.raises(UniversalNeuronsError, match=message):
        correlate(source, layouts, CorrelationConfig(**config))


@pytest.mark.parametrize("kwargs, message", [
    ({"baseline": "shuffle"}, "baseline='shuffle' is invalid; unknown baseline kind; use one of rotation"),
    ({"memory_budget": -5}, "memory_budget=-5 is invalid; use a positive number of bytes"),
    ({"precision": "fp16"}, "precision='fp16' is invalid"),
    ({"top_k": -1}, "top_k=-1"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(UniversalNeuronsError, match=message):
        CorrelationConfig(**kwargs)


def test_generator_source_cannot_serve_blocked_passes():
    rng = np.random.default_rng(12)
    lay_a = ModelLayout("a", 2, 96)
    x, y = _independent(rng, 300, 192), _independent(rng, 300, 48)
    gen = iter(_source([x, y], np.ones(300, bool), (300,)))
    with pytest.raises(UniversalNeuronsError, match="re-iterable"):
        correlate(gen, [lay_a, B], CorrelationConfig(block_size=64))


def test_existing_full_matrix_file_not_overwritten(tmp_path):
    (tmp_path / "f.h5").write_bytes(b"")
    with pytest.raises(UniversalNeuronsError, match="already exists"):
        correlate([_ok()], [A, B], full_matrix_path=tmp_path / "f.h5")


def test_config_is_json_serialisable():
    cfg = CorrelationConfig(baseline="gaussian", seed=3, precision="bf16")
    assert CorrelationConfig.from_dict(from_json(__import__("json").dumps(cfg.to_dict()))) == cfg
