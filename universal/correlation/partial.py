"""The state of a correlation pass: float64 co-moments of the tokens seen so far for a block of
reference neurons (`CorrelationPartial`), one pass over a source (`accumulate`), and the exact
join of two token shards' states (`merge_partials`)."""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch

from universal_neurons.errors import ConfigError, IncompatibleInputsError
from universal_neurons.moments import Moments
from universal_neurons.runtime import pick_device

from .. import baselines
from .config import CorrelationConfig, ModelLayout, check_layouts, check_precision, reference_blocks
from .kernels import Workspace, centre_into, gemm_dtype, masked_rows, merge_cross, merge_sigma, stream, update_sigma

__all__ = ["CorrelationPartial", "accumulate", "merge_partials"]


class CorrelationPartial:
    """Float64 co-moments of the tokens seen so far, for reference rows `[i0, i1)`: the state
    of one pass (`n_pass` = the reference block's index), or of one token shard of it.

    Picklable (move it to CPU with `.to("cpu")` before sending it anywhere); two partials
    of the same block over disjoint tokens join exactly with `merge_partials`.

    Attributes:
        moments: per model, `Moments` of its neurons (mean, and M2 on the first pass, whose
            second moments serve every pass).
        C: `[i1 - i0, N_other]` co-moments of the reference rows with every other model's
            neurons, side by side in layout order.
        Cb: the same against the gaussian or permuted units, else None.
        z_moments: per other model, `Moments` of its gaussian units (gaussian baseline only).
        sigma: per other model, `[layer, d_mlp, d_mlp]` within-layer co-moments Σ_y
            (rotation baseline, first pass only), else None.

    Args:
        layouts: the reference first.
        config: the run's configuration.
        device: where the accumulators live.
        i0, i1: the block's reference rows.
        n_pass: the block's index.
        want_sigma: accumulate Σ_y of every other model.
    """

    def __init__(self, layouts: Sequence[ModelLayout], config: CorrelationConfig, device: torch.device,
                 i0: int, i1: int, *, n_pass: int, want_sigma: bool) -> None:
        self.layouts, self.config, self.device, self.n_pass = layouts, config, device, n_pass
        self.i0, self.i1 = i0, i1
        self.widths = [lay.n_neurons for lay in layouts]
        self.offsets = np.cumsum([0] + self.widths[1:]).tolist()  # column offsets of each m
        n_other, rows = self.offsets[-1], i1 - i0
        f64 = torch.float64
        order = 2 if n_pass == 0 else 1  # second moments are the same on every pass: the first has them
        self.moments = [Moments(w, order=order, device=device) for w in self.widths]
        self.C = torch.zeros(rows, n_other, dtype=f64, device=device)
        kind = config.baseline
        self.Cb = (torch.zeros(rows, n_other, dtype=f64, device=device)
                   if kind in ("gaussian", "permutation") else None)
        self.z_moments = ([Moments(w, order=order, device=device) for w in self.widths[1:]]
                          if kind == "gaussian" else None)
        self.sigma = ([torch.zeros(lay.n_layers, lay.d_mlp, lay.d_mlp, dtype=f64, device=device)
                       for lay in layouts[1:]] if want_sigma else None)

    @property
    def n(self) -> int:
        """Masked-in tokens merged so far."""
        return self.moments[0].n

    def to(self, device: torch.device | str) -> "CorrelationPartial":
        """Move every accumulator to `device` (in place; returns self)."""
        device = torch.device(device)
        for mo in self.moments + (self.z_moments or []):
            mo.to(device)
        self.C = self.C.to(device)
        self.Cb = None if self.Cb is None else self.Cb.to(device)
        self.sigma = None if self.sigma is None else [s.to(device) for s in self.sigma]
        self.device = device
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators."""
        ts = [self.C, self.Cb] + (self.sigma or [])
        return (sum(t.numel() * t.element_size() for t in ts if t is not None)
                + sum(mo.nbytes for mo in self.moments + (self.z_moments or [])))

    def update(self, batch_index: int, mask: torch.Tensor, acts: list[torch.Tensor],
               ws: Workspace | None = None) -> int:
        """Merge one batch.

        Args:
            batch_index: the batch's global index (seeds the gaussian / permutation noise).
            mask: `[token]` bool, True = counts.
            acts: per model, `[token, layer*d_mlp]` activations, the reference first.
            ws: keeps the batch buffers between calls (`accumulate` passes one per pass).

        Returns:
            The batch's masked-in count.
        """
        dev, cfg = self.device, self.config
        ws = Workspace(dev) if ws is None else ws
        mask, n_b, idx = masked_rows(mask, dev)
        if n_b == 0:
            return 0
        f32, f64 = torch.float32, torch.float64
        low = gemm_dtype(cfg)
        n_old, n_other = self.n, self.offsets[-1]
        coef = n_old * n_b / (n_old + n_b)
        first = self.n_pass == 0
        m2_from_sigma = self.sigma is not None and low == f32
        batch: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # per model: (mean_b, m2_b), merged last

        def centre(k, out, want_m2):
            return centre_into(acts[k].to(dev, non_blocking=True), idx, out, ws, want_m2=want_m2)

        def as64(name, t):
            return ws(name, t.shape, f64).copy_(t)

        # reference: centred once, reused for every m and every baseline
        cap = mask.shape[0]
        x = ws("x", (n_b, self.widths[0]), low, capacity=cap)
        mean_b, rx, m2x = centre(0, x, first)
        batch.append((mean_b, m2x))
        dx = mean_b - self.moments[0].mean
        xb = x[:, self.i0:self.i1]
        dx, rx = dx[self.i0:self.i1], rx[self.i0:self.i1]

        Yg = ws("Y", (n_b, n_other), low, capacity=cap)  # [token, all m neurons], centred, GEMM operand
        dys, rys = [], []
        for k in range(1, len(self.layouts)):
            sl = slice(self.offsets[k - 1], self.offsets[k])
            mean_b, r, m2 = centre(k, Yg[:, sl], first and not m2_from_sigma)
            batch.append((mean_b, m2))
            dys.append(mean_b - self.moments[k].mean)
            rys.append(r)
        dy, ry = torch.cat(dys), torch.cat(rys)
        G = torch.mm(xb.T, Yg, out=ws("G", (xb.shape[1], n_other), low))
        merge_cross(self.C, as64("G64", G), coef, dx, dy, shift=(rx, ry, n_b))

        if self.sigma is not None:  # within-layer Σ_y of m, for the rotation identity
            for k, lay in enumerate(self.layouts[1:]):
                m2 = update_sigma(self.sigma[k], Yg[:, self.offsets[k]:self.offsets[k + 1]], lay, coef,
                                  dys[k], rys[k], n_b, ws, f"sigma{k}")
                if m2_from_sigma:
                    batch[k + 1] = (batch[k + 1][0], m2)

        if cfg.baseline == "permutation":
            assert self.Cb is not None
            Yp = ws("Y_perm", Yg.shape, low, capacity=cap)
            for k, lay in enumerate(self.layouts[1:]):
                sl = slice(self.offsets[k], self.offsets[k + 1])
                perm = baselines.token_permutation(n_b, seed=cfg.seed, label=lay.label,
                                                   batch_index=batch_index, device=dev)
                Yp[:, sl] = Yg[:, sl].index_select(0, perm)
            # permuted columns keep their batch means, so the same Chan terms apply
            G = torch.mm(xb.T, Yp, out=ws("G", (xb.shape[1], n_other), low))
            merge_cross(self.Cb, as64("G64", G), coef, dx, dy, shift=(rx, ry, n_b))
        elif cfg.baseline == "gaussian":
            assert self.Cb is not None and self.z_moments is not None
            Z = ws("Z", (n_b, n_other), low, capacity=cap)
            dz, rz = [], []
            for k, lay in enumerate(self.layouts[1:]):
                sl = slice(self.offsets[k], self.offsets[k + 1])
                z = baselines.gaussian_units(n_b, lay.n_neurons, seed=cfg.seed, label=lay.label,
                                             batch_index=batch_index, device=dev)
                mean_b, r, m2 = centre_into(z, None, Z[:, sl], ws, want_m2=first)
                del z
                dz.append(mean_b - self.z_moments[k].mean)
                self.z_moments[k].merge(Moments.from_sums(n_b, mean_b, m2))
                rz.append(r)
            G = torch.mm(xb.T, Z, out=ws("G", (xb.shape[1], n_other), low))
            merge_cross(self.Cb, as64("G64", G), coef, dx, torch.cat(dz), shift=(rx, torch.cat(rz), n_b))
        for mo, (mean_b, m2) in zip(self.moments, batch):
            mo.merge(Moments.from_sums(n_b, mean_b, m2))
        return n_b


def accumulate(source: Iterable, layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None, *,
               block_index: int = 0, first_batch: int = 0, device: torch.device | str | None = None,
               desc: str | None = None) -> CorrelationPartial:
    """One pass over `source` for reference block `block_index`: the float64 co-moments.

    Args:
        source: as for `correlate`.
        layouts: as for `correlate`.
        config: as for `correlate`.
        block_index: which of `reference_blocks(layouts, config)`; block 0 also gathers the
            per-model second moments (and Σ_y for the rotation baseline).
        first_batch: global index of the source's first batch. The gaussian and permutation
            baselines seed each batch's noise by its global index, so a token shard that starts
            at batch 17 of the whole run passes 17 and draws the same noise as a single-process run.
        device: where to accumulate (default `config.device`).
        desc: the progress bar's label.

    Returns:
        `CorrelationPartial` over every masked-in token of `source` (may be empty, n = 0).

    Raises:
        ConfigError: `block_index` out of range, or TF32 asked for off CUDA.
    """
    config = config or CorrelationConfig()
    layouts = check_layouts(layouts)
    blocks = reference_blocks(layouts, config)
    if not 0 <= block_index < len(blocks):
        raise ConfigError(f"block_index={block_index} is out of range; this run has {len(blocks)} "
                          "reference block(s) (see reference_blocks)")
    where: torch.device = pick_device(config.device if device is None else str(device))
    check_precision(config, where)
    i0, i1 = blocks[block_index]
    acc = CorrelationPartial(layouts, config, where, i0, i1, n_pass=block_index,
                             want_sigma=config.baseline == "rotation" and block_index == 0)
    if desc is None:
        desc = f"correlate {layouts[0].label}" + (f" block {block_index + 1}/{len(blocks)}" if len(blocks) > 1 else "")
    stream(source, layouts, config, where, desc, acc.update, first_batch)
    return acc


def merge_partials(a: CorrelationPartial, b: CorrelationPartial) -> CorrelationPartial:
    """Join the co-moments of two disjoint token sets, `a` then `b`, into `a` (in place).

    The same Chan et al. update (`Moments.merge`, `merge_cross`, `merge_sigma`) that
    `CorrelationPartial.update` applies to each batch, so shards merged in token order equal
    one pass over all tokens up to floating-point association. `b` is left unchanged; on
    different devices it is brought to `a`'s.

    Args:
        a, b: partials of the same block of the same run.

    Returns:
        `a`.

    Raises:
        IncompatibleInputsError: the partials belong to different runs or blocks.
    """
    same = (a.layouts == b.layouts and a.config == b.config and (a.i0, a.i1, a.n_pass) == (b.i0, b.i1, b.n_pass)
            and (a.sigma is None) == (b.sigma is None))
    if not same:
        raise IncompatibleInputsError(
            f"cannot merge partials of different runs or blocks (rows {a.i0}..{a.i1} pass {a.n_pass} vs "
            f"{b.i0}..{b.i1} pass {b.n_pass}); merge only the shards of one block of one correlate run")
    if b.n == 0:
        return a
    if b.device != a.device:
        b = copy.deepcopy(b).to(a.device)
    n_old, n_b = a.n, b.n
    coef = n_old * n_b / (n_old + n_b)

    def shifts(mine, theirs):
        return [other.mean - mo.mean for mo, other in zip(mine, theirs)]

    with torch.no_grad():
        d = shifts(a.moments, b.moments)
        dx, dy = d[0][a.i0:a.i1], torch.cat(d[1:])
        merge_cross(a.C, b.C, coef, dx, dy)
        if a.config.baseline == "permutation":  # permuted columns keep their means: the same terms as C
            assert a.Cb is not None and b.Cb is not None
            merge_cross(a.Cb, b.Cb, coef, dx, dy)
        elif a.config.baseline == "gaussian":
            assert a.Cb is not None and b.Cb is not None and a.z_moments is not None and b.z_moments is not None
            merge_cross(a.Cb, b.Cb, coef, dx, torch.cat(shifts(a.z_moments, b.z_moments)))
            for mo, other in zip(a.z_moments, b.z_moments):
                mo.merge(other)
        if a.sigma is not None and b.sigma is not None:
            for k, lay in enumerate(a.layouts[1:]):
                merge_sigma(a.sigma[k], b.sigma[k], coef, d[k + 1].reshape(lay.n_layers, lay.d_mlp, 1))
        for mo, other in zip(a.moments, b.moments):
            mo.merge(other)
    return a
