"""Baselines: Haar rotations, seeded streams, and the rotation identity against numpy."""

import numpy as np
import torch

from universal_neurons.baselines import (
    derive_seed,
    gaussian_units,
    haar_orthogonal,
    rotate_comoments,
    rotated_comoment_diag,
    rotation_matrices,
    token_permutation,
)


def test_haar_is_orthogonal_and_not_trivial():
    q = haar_orthogonal(64, seed=3).numpy()
    assert np.abs(q @ q.T - np.eye(64)).max() < 1e-5
    assert np.abs(q.T @ q - np.eye(64)).max() < 1e-5
    assert np.abs(q - np.eye(64)).max() > 0.1
    assert abs(abs(np.linalg.det(q)) - 1) < 1e-8


def test_haar_sign_fix_removes_qr_bias():
    # Haar: E[Q_ii] = 0. Plain Householder QR without the sign fix gives about -0.2 at d=8.
    qs = np.stack([haar_orthogonal(8, seed=s).numpy() for s in range(400)])
    assert abs(np.diagonal(qs, axis1=1, axis2=2).mean()) < 0.05
    # and the entries have the Haar variance 1/d
    assert abs(qs.var() - 1 / 8) < 0.01


def test_rotation_streams_are_seeded_and_distinct():
    r1 = rotation_matrices("b", 3, 16, seed=7)
    r2 = rotation_matrices("b", 3, 16, seed=7)
    assert r1.shape == (3, 16, 16) and r1.dtype == torch.float64
    assert torch.equal(r1, r2)
    assert not torch.equal(r1[0], r1[1])  # each layer its own stream
    assert not torch.equal(r1, rotation_matrices("c", 3, 16, seed=7))  # each model its own stream
    assert not torch.equal(r1, rotation_matrices("b", 3, 16, seed=8))
    assert derive_seed(7, 1, 2) == derive_seed(7, 1, 2) != derive_seed(7, 2, 1)


def test_gaussian_units_and_permutation_are_seeded():
    z1 = gaussian_units(100, 5, seed=1, label="b", batch_index=2)
    assert torch.equal(z1, gaussian_units(100, 5, seed=1, label="b", batch_index=2))
    assert not torch.equal(z1, gaussian_units(100, 5, seed=1, label="b", batch_index=3))
    p = token_permutation(50, seed=1, label="b", batch_index=0)
    assert torch.equal(torch.sort(p).values, torch.arange(50))
    assert torch.equal(p, token_permutation(50, seed=1, label="b", batch_index=0))


def test_rotation_identity_equals_explicit_rotation():
    rng = np.random.default_rng(0)
    L, d, T = 2, 12, 500
    x = rng.standard_normal((T, 5))
    y = rng.standard_normal((T, L * d)) + x[:, :1]
    R = rotation_matrices("m", L, d, seed=0)
    xc, yc = x - x.mean(0), y - y.mean(0)
    C = torch.from_numpy(xc.T @ yc)
    sigma = torch.stack([torch.from_numpy(yc[:, k * d:(k + 1) * d].T @ yc[:, k * d:(k + 1) * d]) for k in range(L)])
    # explicit: u = R y per layer
    u = np.concatenate([y[:, k * d:(k + 1) * d] @ R[k].numpy().T for k in range(L)], axis=1)
    uc = u - u.mean(0)
    np.testing.assert_allclose(rotate_comoments(C, R).numpy(), xc.T @ uc, atol=1e-9)
    np.testing.assert_allclose(rotated_comoment_diag(sigma, R).numpy(), (uc ** 2).sum(0), rtol=1e-10)
