"""Streaming moments (universal_neurons.moments) against numpy on the concatenated tokens."""

import numpy as np
import pytest
import torch

from universal_neurons.errors import ConfigError, IncompatibleInputsError
from universal_neurons.moments import Moments


def test_merged_shards_equal_numpy_with_a_large_mean():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2001, 5)) * 1e-2 + 1e4  # mean 10^6 spreads: raw power sums would lose it all
    cuts = [0, 1, 3, 3, 700, 1400, 2001]  # an empty batch and a one-token batch too
    acc = Moments(5, order=4)
    for a, b in zip(cuts, cuts[1:]):
        acc.merge(Moments.of_batch(torch.from_numpy(x[a:b]), order=4))
    d = x - x.mean(0)
    assert acc.n == len(x)
    np.testing.assert_allclose(acc.mean.numpy(), x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(acc.m2.numpy(), (d ** 2).sum(0), rtol=1e-9)
    np.testing.assert_allclose(acc.m3.numpy(), (d ** 3).sum(0), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(acc.m4.numpy(), (d ** 4).sum(0), rtol=1e-8)


def test_order_one_keeps_the_mean_only_and_lower_orders_are_refused():
    x = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    acc = Moments(3, order=1).merge(Moments.of_batch(x[:1], order=2)).merge(Moments.of_batch(x[1:], order=1))
    assert acc.order == 1 and acc.n == 4 and torch.equal(acc.mean, x.mean(0))
    with pytest.raises(ConfigError, match="keep sums up to M1"):
        _ = acc.m2
    with pytest.raises(IncompatibleInputsError, match="up to M1 into moments up to M2"):
        Moments(3, order=2).merge(Moments.of_batch(x, order=1))
    with pytest.raises(IncompatibleInputsError, match="columns"):
        Moments(2).merge(Moments.of_batch(x))


def test_streaming_kurtosis_is_raw_like_scipy_fisher_false():
    from scipy import stats

    from universal_neurons.moments import StreamingMoments

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal((5001, 2)), rng.standard_t(5, (5001, 2))], axis=1) * 0.1 + 1e3
    acc = StreamingMoments(4)
    for a in range(0, len(x), 1024):
        acc.update(torch.from_numpy(x[a:a + 1024]))
    r = acc.result()
    np.testing.assert_allclose(r["kurt"], stats.kurtosis(x, axis=0, fisher=False, bias=True), rtol=1e-7)
    np.testing.assert_allclose(r["skew"], stats.skew(x, axis=0, bias=True), rtol=1e-5, atol=1e-9)
    assert np.all(np.abs(r["kurt"][:2] - 3.0) < 0.3)  # a Gaussian has 3 (raw), not 0 (excess)
