"""Chance baselines for max-correlation (docs/method.md §5): rotation, gaussian, permutation.

A baseline answers "how high does max_j rho(x_i, u_j) get when the units u_j of
model m carry m's statistics but no alignment with a's neurons?".

- ``rotation`` (default, the paper's): u = R y per layer of m, with R a
  Haar-random orthogonal ``d_mlp x d_mlp`` matrix. It is never applied to the
  activations: because Cov(x, R y) = Cov(x, y) R^T and Var((R y)_j) =
  (R Σ_y R^T)_jj, the correlation engine rotates its co-moments once at the end
  (``rotate_comoments`` / ``rotated_comoment_diag``). Exact, and cheaper than
  rotating every batch.
- ``gaussian``: u_j iid standard normal per masked-in token. Pearson correlation
  is invariant to affine maps u -> s u + c (s > 0), so standard normal units are
  equivalent to gaussian units with any given mean and variance ("the same
  marginal moments"): no need to match them.
- ``permutation``: u = y with the tokens of m shuffled within each batch among
  the masked-in positions, so x_i meets misaligned y_j with y's exact marginals.

Every random stream is derived from one recorded seed plus fixed keys (model
label, layer or batch index), so runs repeat bit for bit and blocked passes
over the same data see the same noise.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from universal_neurons.errors import IncompatibleInputsError

__all__ = [
    "BASELINES",
    "derive_seed",
    "haar_orthogonal",
    "rotation_matrices",
    "gaussian_units",
    "token_permutation",
    "rotate_comoments",
    "rotated_comoment_diag",
]

BASELINES = ("rotation", "gaussian", "permutation", "none")

# Distinct first keys keep the rotation, gaussian and permutation streams apart.
_ROTATION, _GAUSSIAN, _PERMUTATION = 1, 2, 3


def _label_key(label: str) -> int:
    # crc32 is stable across processes (unlike hash()), so streams are reproducible.
    return zlib.crc32(label.encode("utf-8"))


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from `seed` and integer `keys` (numpy SeedSequence).

    Args:
        seed: the recorded seed.
        *keys: integers that tell the streams apart (kind, model label, layer or batch).

    Returns:
        A non-negative int below 2**63.
    """
    ss = np.random.SeedSequence([int(seed), *(int(k) for k in keys)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def haar_orthogonal(d: int, *, seed: int) -> torch.Tensor:
    """A Haar-distributed random orthogonal matrix.

    QR of a standard Gaussian matrix, then columns of Q multiplied by
    sign(diag(R)): without the sign fix, Q is not Haar (Mezzadri 2007).

    Args:
        d: size.
        seed: the generator's seed.

    Returns:
        float64 tensor `[d, d]` with Q Q^T = I.
    """
    g = torch.from_numpy(np.random.default_rng(seed).standard_normal((d, d)))
    # LAPACK's Householder QR (geqrf, then orgqr for Q), as numpy.linalg.qr does; torch's
    # build of it is ~1.4x faster here, and the finish of a correlation run waits on it
    h, tau = torch.geqrf(g)
    q = torch.linalg.householder_product(h, tau)
    signs = torch.sign(torch.diagonal(h))
    signs[signs == 0] = 1.0
    return q * signs[None, :]


def rotation_matrices(label: str, n_layers: int, d_mlp: int, *, seed: int) -> torch.Tensor:
    """One Haar rotation per layer of model `label`, each from its own derived stream.

    Args:
        label: the model's label (keys its streams).
        n_layers: layers of the model.
        d_mlp: neurons per layer.
        seed: the run's baseline seed.

    Returns:
        float64 tensor `[layer, d_mlp, d_mlp]`.
    """
    return torch.stack([
        haar_orthogonal(d_mlp, seed=derive_seed(seed, _ROTATION, _label_key(label), layer))
        for layer in range(n_layers)
    ])


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def gaussian_units(n_tokens: int, n_units: int, *, seed: int, label: str, batch_index: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal units for one batch of model `label` (the gaussian baseline).

    Args:
        n_tokens: masked-in tokens of the batch.
        n_units: units (the model's neurons).
        seed: the run's baseline seed.
        label: the model's label.
        batch_index: the batch's global index.
        device: where to draw them.

    Returns:
        float32 tensor `[token, unit]`; the same arguments give the same numbers on the
        same device type.
    """
    device = torch.device(device)
    g = _generator(device, derive_seed(seed, _GAUSSIAN, _label_key(label), batch_index))
    return torch.randn(n_tokens, n_units, generator=g, device=device, dtype=torch.float32)


def token_permutation(n_tokens: int, *, seed: int, label: str, batch_index: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """A seeded shuffle of the `n_tokens` masked-in positions of one batch of model `label`.

    Args:
        n_tokens: masked-in tokens of the batch.
        seed: the run's baseline seed.
        label: the model's label.
        batch_index: the batch's global index.
        device: where to draw it.

    Returns:
        int64 tensor `[token]`, a permutation of 0..n_tokens-1.
    """
    device = torch.device(device)
    g = _generator(device, derive_seed(seed, _PERMUTATION, _label_key(label), batch_index))
    return torch.randperm(n_tokens, generator=g, device=device)


def rotate_comoments(comoments: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Cross co-moments with the rotated units: C[:, layer] R_layer^T for every layer.

    Args:
        comoments: `[neuron_a, layer*d_mlp]`, sums of (x - mean)(y - mean).
        rotations: `[layer, d_mlp, d_mlp]`.

    Returns:
        `[neuron_a, layer*d_mlp]`, the co-moments of x with (R y).

    Raises:
        IncompatibleInputsError: the rotations belong to a model of another width.
    """
    n_layers, d, _ = rotations.shape
    if comoments.shape[1] != n_layers * d:
        raise IncompatibleInputsError(
            f"co-moments have {comoments.shape[1]} columns but the rotations cover "
            f"{n_layers} x {d}; pass the rotations of the same model")
    c = comoments.reshape(comoments.shape[0], n_layers, d).transpose(0, 1)  # [layer, i, d]
    out = torch.bmm(c, rotations.to(comoments.dtype).transpose(1, 2))       # [layer, i, d]
    return out.transpose(0, 1).reshape(comoments.shape[0], n_layers * d)


def rotated_comoment_diag(sigma: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Second moments of the rotated units: diag(R Σ R^T) per layer.

    Args:
        sigma: `[layer, d_mlp, d_mlp]` within-layer co-moment matrices of m.
        rotations: `[layer, d_mlp, d_mlp]`.

    Returns:
        `[layer*d_mlp]`.
    """
    r = rotations.to(sigma.dtype)
    return (torch.bmm(r, sigma) * r).sum(-1).reshape(-1)
