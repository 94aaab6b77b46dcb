"""All-pairs mode: every model the reference in turn (beyond the paper), in one pass when it can.

Correlation is symmetric, C^{m,a} = (C^{a,m})^T, so one pass that centres every model once per
batch and runs one GEMM per model against every later model, `x_i^T [x_{i+1} | ... | x_last]`,
holds the co-moments of every ordered pair. With the rotation baseline it also accumulates Σ
of every model, which each reference needs for the other models. For M models that is
M(M-1)/2 cross blocks and M Σ instead of M(M-1) and M(M-1) when `correlate` runs once per
reference, and one read of the source (one forward pass per model for a live source) instead
of M.

Each reference's result then comes from the same `finalize` as `correlate`: its float64
co-moments are assembled from the triangle (transposing the blocks where the reference comes
later) into a `CorrelationPartial`.

`correlate_all_pairs` uses the triangle when the baseline is "rotation" or "none" and the
triangle's accumulators fit `memory_budget`; the gaussian and permutation baselines draw noise
per (other model, batch), which has no such symmetry, and larger families need blocked
passes: both run `correlate` once per reference instead.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from universal_neurons.moments import Moments
from universal_neurons.runtime import pick_device

from .config import (
    CorrelationConfig,
    ModelLayout,
    bytes_per_row,
    check_layouts,
    check_precision,
    preflight,
    reference_blocks,
)
from .finalize import finalize
from .kernels import Workspace, centre_into, gemm_dtype, masked_rows, merge_cross, stream, update_sigma
from .partial import CorrelationPartial
from .result import CorrelationResult
from .run import correlate

__all__ = [
    "correlate_all_pairs",
    "one_pass_fits",
    "preflight_all_pairs",
    "correlate_all_pairs_one_pass",
    "Reordered",
]


def reference_order(r: int, n_models: int) -> list[int]:
    """Model indices with `r` first, then the others in their original order."""
    return [r] + [i for i in range(n_models) if i != r]


class Reordered:
    """A view of a source with the models in another order.

    Args:
        source: yields `(mask, acts)` as for `correlate`.
        order: model indices, the new reference first.
    """

    def __init__(self, source: Iterable, order: Sequence[int]) -> None:
        self.source, self.order = source, order

    def __iter__(self) -> Iterator[tuple[Any, list[Any]]]:
        for mask, acts in self.source:
            yield mask, [acts[i] for i in self.order]


def triangle_bytes(layouts: Sequence[ModelLayout], config: CorrelationConfig) -> int:
    """Accumulator bytes of the one-pass triangle (cross blocks, Σ, one GEMM output, moments)."""
    widths = [lay.n_neurons for lay in layouts]
    after = np.cumsum(widths[::-1])[::-1].tolist()[1:] + [0]   # neurons in the models after each
    cross = sum(w * a for w, a in zip(widths, after))
    sigma = sum(lay.n_layers * lay.d_mlp ** 2 for lay in layouts) if config.baseline == "rotation" else 0
    gemm = max(w * a for w, a in zip(widths, after)) * (4 + 8)   # one block's output and its float64 copy
    return cross * 8 + sigma * 8 * 2 + gemm + 4 * 8 * sum(widths)


def one_pass_fits(layouts: Sequence[ModelLayout], config: CorrelationConfig) -> bool:
    """True when `correlate_all_pairs` can use the one-pass triangle for this family and config."""
    if config.baseline not in ("rotation", "none"):
        return False
    finish = 0  # the largest reference's co-moments and summary temporaries, while the triangle is alive
    for r in range(len(layouts)):
        lays = [layouts[i] for i in reference_order(r, len(layouts))]
        if len(reference_blocks(lays, config)) != 1:  # each reference's finish must be one block
            return False
        finish = max(finish, lays[0].n_neurons * bytes_per_row(lays, config))
    return triangle_bytes(layouts, config) + finish <= config.memory_budget


def preflight_all_pairs(layouts: Sequence[ModelLayout], n_tokens: int, config: CorrelationConfig) -> dict[str, Any]:
    """What `correlate_all_pairs` will cost, before running it.

    Args:
        layouts: every model of the family.
        n_tokens: masked-in tokens.
        config: the run's configuration.

    Returns:
        `{gemm_flops, accumulator_bytes, passes, summary}`.
    """
    M = len(layouts)
    if one_pass_fits(layouts, config):
        widths = [lay.n_neurons for lay in layouts]
        pairs = sum(widths[i] * widths[j] for i in range(M) for j in range(i + 1, M))
        flops = 2.0 * n_tokens * pairs
        if config.baseline == "rotation":
            flops += 2.0 * n_tokens * sum(lay.n_layers * lay.d_mlp ** 2 for lay in layouts)
        acc, passes, how = triangle_bytes(layouts, config), 1, "one pass (C^{m,a} = (C^{a,m})^T)"
    else:
        plans = [preflight([layouts[i] for i in reference_order(r, M)], n_tokens, config) for r in range(M)]
        flops = sum(p["gemm_flops"] for p in plans)
        acc, passes = max(p["accumulator_bytes"] for p in plans), sum(p["passes"] for p in plans)
        how = "one correlate per reference"
    summary = (f"correlate all pairs of {M} models over {n_tokens} tokens, {how}: {flops / 1e12:.2f} TFLOP, "
               f"{acc / 2**30:.2f} GiB accumulators, {passes} pass(es), baseline={config.baseline}, "
               f"precision={config.precision}")
    return {"gemm_flops": flops, "accumulator_bytes": acc, "passes": passes, "summary": summary}


class Triangle:
    """Float64 co-moments of model i against every later model, for every i, and Σ of every model.

    Args:
        layouts: every model of the family.
        config: the run's configuration.
        device: where the accumulators live.
    """

    def __init__(self, layouts: Sequence[ModelLayout], config: CorrelationConfig, device: torch.device) -> None:
        self.layouts, self.config, self.device = layouts, config, device
        self.widths = [lay.n_neurons for lay in layouts]
        self.offsets = np.cumsum([0] + self.widths).tolist()
        f64 = torch.float64
        total = self.offsets[-1]
        self.C = [torch.zeros(w, total - self.offsets[i + 1], dtype=f64, device=device)
                  for i, w in enumerate(self.widths[:-1])]
        self.moments = [Moments(w, order=2, device=device) for w in self.widths]
        self.sigma = ([torch.zeros(lay.n_layers, lay.d_mlp, lay.d_mlp, dtype=f64, device=device) for lay in layouts]
                      if config.baseline == "rotation" else None)

    @property
    def n(self) -> int:
        """Masked-in tokens merged so far."""
        return self.moments[0].n

    def update(self, batch_index: int, mask: torch.Tensor, acts: list[torch.Tensor], ws: Workspace) -> int:
        """The per-batch steps of `CorrelationPartial.update`, for the whole triangle."""
        dev, off = self.device, self.offsets
        mask, n_b, idx = masked_rows(mask, dev)
        if n_b == 0:
            return 0
        f64 = torch.float64
        low = gemm_dtype(self.config)
        n_old = self.n
        coef = n_old * n_b / (n_old + n_b)
        m2_from_sigma = self.sigma is not None and low == torch.float32

        A = ws("A", (n_b, off[-1]), low, capacity=mask.shape[0])  # every model, centred, side by side
        mean, d, r, m2 = [], [], [], []
        for k in range(len(self.layouts)):
            mean_b, rk, m2k = centre_into(acts[k].to(dev, non_blocking=True), idx, A[:, off[k]:off[k + 1]], ws,
                                          want_m2=not m2_from_sigma)
            mean.append(mean_b)
            d.append(mean_b - self.moments[k].mean)
            r.append(rk)
            m2.append(m2k)
        biggest = max(c.numel() for c in self.C)  # one GEMM output buffer (and its float64 copy) serves every block
        for i in range(len(self.layouts) - 1):
            x, y = A[:, off[i]:off[i + 1]], A[:, off[i + 1]:]
            G = torch.mm(x.T, y, out=ws("G", (biggest,), low)[:self.C[i].numel()].view(self.C[i].shape))
            G64 = ws("G64", (biggest,), f64)[:G.numel()].view(G.shape).copy_(G)
            merge_cross(self.C[i], G64, coef, d[i], torch.cat(d[i + 1:]), shift=(r[i], torch.cat(r[i + 1:]), n_b))
        for k, lay in enumerate(self.layouts):
            if self.sigma is not None:
                m2_sigma = update_sigma(self.sigma[k], A[:, off[k]:off[k + 1]], lay, coef, d[k], r[k], n_b, ws,
                                        f"sigma{k}")
                if m2_from_sigma:
                    m2[k] = m2_sigma
        for k, mo in enumerate(self.moments):
            mo.merge(Moments.from_sums(n_b, mean[k], m2[k]))
        return n_b

    def partial_for(self, r: int) -> tuple[list[ModelLayout], CorrelationPartial]:
        """Reference `r`'s layouts (it first) and its co-moments as a one-block `CorrelationPartial`."""
        order = reference_order(r, len(self.layouts))
        lays = [self.layouts[i] for i in order]
        acc = CorrelationPartial(lays, self.config, self.device, 0, self.widths[r], n_pass=0, want_sigma=False)
        acc.moments = [self.moments[i] for i in order]
        col, off = 0, self.offsets
        for m in order[1:]:
            if m > r:   # stored as r's block against the later model m
                block = self.C[r][:, off[m] - off[r + 1]:off[m + 1] - off[r + 1]]
            else:       # stored as m's block against the later model r: transpose
                block = self.C[m][:, off[r] - off[m + 1]:off[r + 1] - off[m + 1]].T
            acc.C[:, col:col + self.widths[m]] = block
            col += self.widths[m]
        acc.sigma = None if self.sigma is None else [self.sigma[i] for i in order[1:]]
        return lays, acc


def correlate_all_pairs_one_pass(source: Iterable, layouts: Sequence[ModelLayout], config: CorrelationConfig, *,
                                 provenance: dict[str, Any] | None = None) -> dict[str, CorrelationResult]:
    """label -> `CorrelationResult` with every model as the reference, from one pass over `source`.

    Callers check `one_pass_fits(layouts, config)` first (`correlate_all_pairs` does).
    """
    layouts = list(layouts)
    device = pick_device(config.device)
    tri = Triangle(layouts, config, device)
    stream(source, layouts, config, device, "correlate all pairs", tri.update)
    results = {}
    for r, lay in enumerate(layouts):
        lays, acc = tri.partial_for(r)
        results[lay.label] = finalize([acc], lays, config, provenance=provenance,
                                      extra_provenance={"all_pairs": "one pass, C^{m,a} = (C^{a,m})^T"})
    return results


def correlate_all_pairs(source: Iterable, layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None,
                        **kwargs: Any) -> dict[str, CorrelationResult]:
    """Every model as the reference in turn (beyond the paper).

    With the rotation baseline (or none) and accumulators that fit `memory_budget`, one pass
    over the source serves every reference (C^{m,a} = (C^{a,m})^T, so half the GEMMs and one
    read of the source); otherwise `correlate` runs once per reference. Either way each
    result equals the single-reference `correlate` run with that model first.

    Args:
        source: as for `correlate`.
        layouts: every model of the family.
        config: as for `correlate`.
        **kwargs: `correlate`'s keyword arguments (`full_matrix_path` forces one run per reference).

    Returns:
        label -> `CorrelationResult`, in the order of `layouts`.
    """
    config = config or CorrelationConfig()
    layouts = check_layouts(layouts)
    check_precision(config, pick_device(config.device))
    if one_pass_fits(layouts, config) and set(kwargs) <= {"provenance"}:
        return correlate_all_pairs_one_pass(source, layouts, config, **kwargs)
    results = {}
    for r in range(len(layouts)):
        order = reference_order(r, len(layouts))
        res = correlate(Reordered(source, order), [layouts[i] for i in order], config, **kwargs)
        res.provenance["all_pairs"] = "one correlate run per reference"
        results[layouts[r].label] = res
    return results
