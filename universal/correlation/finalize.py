"""From co-moments to the result: correlations, partners, baselines and summaries, one
reference block at a time (`finalize`), and the optional full-matrix file."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from universal_neurons.artifacts import atomic_path
from universal_neurons.errors import InputError
from universal_neurons.runtime import pick_device, provenance_base, to_json

from .. import baselines
from .config import CorrelationConfig, ModelLayout, check_layouts, preflight, reference_blocks
from .partial import CorrelationPartial
from .result import CorrelationResult

__all__ = ["finalize", "summarise", "correlations", "first_pass_facts", "Assembler"]

log = logging.getLogger(__name__)


def summarise(rho: torch.Tensor, config: CorrelationConfig, *, extras: bool) -> dict[str, np.ndarray]:
    """Row-wise max / argmax (+ min, top-k, histogram) of correlations, NaN = no correlation.

    `rho` is scratch: it is overwritten (NaN -> +-inf in place), so a `[row, j]` float64
    matrix is never copied; correlations are clamped to [-1, 1], so an infinity here can
    only be a former NaN.

    Args:
        rho: `[row, j]` correlations of reference rows with one model's units.
        config: `absolute`, `top_k` and `hist_bins` are used.
        extras: also the min, top-k and histogram (not for baselines).

    Returns:
        `{max, arg}` and with `extras` `{min, top_v, top_i, hist}` as configured, each `[row, ...]`.
    """
    inf = math.inf
    out = {}
    if extras:
        if config.hist_bins:
            nb = config.hist_bins
            b = ((rho + 1.0) * (nb / 2.0)).floor_().clamp_(0, nb - 1).nan_to_num_(nan=nb).long()
            counts = torch.zeros(rho.shape[0], nb + 1, dtype=torch.int64, device=rho.device)
            counts.scatter_add_(1, b, torch.ones_like(b))
            out["hist"] = counts[:, :nb]
            del b
        lo = rho.nan_to_num_(nan=inf).min(1).values                 # min is always signed
        out["min"] = torch.where(torch.isinf(lo), torch.nan, lo)
    if config.absolute:
        rho.abs_()
    ranked = rho.nan_to_num_(nan=-inf, posinf=-inf, neginf=-inf)   # no correlation ranks last
    best, arg = ranked.max(1)
    none = torch.isinf(best)
    out["max"], out["arg"] = torch.where(none, torch.nan, best), torch.where(none, -1, arg)
    if extras and config.top_k:
        k = min(config.top_k, rho.shape[1])
        v, i = ranked.topk(k, dim=1)
        pad = torch.isinf(v)
        out["top_v"] = torch.nn.functional.pad(torch.where(pad, torch.nan, v), (0, config.top_k - k), value=math.nan)
        out["top_i"] = torch.nn.functional.pad(torch.where(pad, -1, i), (0, config.top_k - k), value=-1)
    return {k: v.cpu().numpy() for k, v in out.items()}


def correlations(C: torch.Tensor, m2x: torch.Tensor, m2y: torch.Tensor, dead_x: torch.Tensor,
                 dead_y: torch.Tensor) -> torch.Tensor:
    """`rho = C / sqrt(m2x m2y^T)` clamped to [-1, 1], NaN in dead rows and columns.

    Args:
        C: `[row, j]` co-moments.
        m2x, dead_x: `[row]` second moments and dead flags of the reference rows.
        m2y, dead_y: `[j]` the same of the other units.

    Returns:
        `[row, j]` a new tensor.
    """
    rho = C * m2x.rsqrt()[:, None]
    rho.mul_(m2y.rsqrt()[None, :]).clamp_(-1.0, 1.0)  # rounding can step past ±1; NaN stays NaN
    if bool(dead_x.any()):
        rho[dead_x] = torch.nan
    if bool(dead_y.any()):
        rho[:, dead_y] = torch.nan
    return rho


def first_pass_facts(acc: CorrelationPartial, layouts: Sequence[ModelLayout], config: CorrelationConfig,
                     rotations: list[torch.Tensor] | None) -> dict[str, Any]:
    """Per-model moments, dead neurons and baseline variances: the same on every pass.

    Args:
        acc: the first block's merged partial.
        layouts: the reference first.
        config: `dead_var` is used.
        rotations: per other model `[layer, d_mlp, d_mlp]` (rotation baseline), else None.

    Returns:
        `{n, m2, dead_t, mean, var, dead}` (+ `m2_rot`, `m2_z`), lists in layout order.
    """
    n = acc.n
    m2 = [mo.m2 for mo in acc.moments]
    dead_t = [v / n <= config.dead_var for v in m2]
    facts: dict[str, Any] = {"n": n, "m2": m2, "dead_t": dead_t,
             "mean": [mo.mean.cpu().numpy() for mo in acc.moments],
             "var": [(v / n).cpu().numpy() for v in m2],
             "dead": [d.cpu().numpy() for d in dead_t]}
    if rotations is not None and acc.sigma is not None:
        facts["m2_rot"] = [baselines.rotated_comoment_diag(s, r) for s, r in zip(acc.sigma, rotations)]
    if acc.z_moments is not None:
        facts["m2_z"] = [mo.m2 for mo in acc.z_moments]
    counts = {lay.label: int(d.sum()) for lay, d in zip(layouts, facts["dead"])}
    if any(counts.values()):
        log.warning("dead neurons (variance <= %g over %d masked-in tokens) have no correlation, reported as NaN: %s",
                    config.dead_var, n, ", ".join(f"{k}: {v} of {lay.n_neurons}"
                                                  for (k, v), lay in zip(counts.items(), layouts)))
    return facts


class Assembler:
    """Turns one finished partial per reference block into the result arrays (and the optional
    full-matrix file); the first block's partial supplies the per-model facts.

    Args:
        layouts: the reference first.
        config: the run's configuration.
        device: where the correlations are summarised.
        full_path: an open-for-writing path for the full matrices, or None.
        provenance: the caller's provenance for the result.
    """

    def __init__(self, layouts: Sequence[ModelLayout], config: CorrelationConfig, device: torch.device,
                 full_path: str | os.PathLike | None, provenance: dict[str, Any] | None) -> None:
        self.layouts, self.config, self.device, self.provenance = layouts, config, device, provenance
        self.blocks = reference_blocks(layouts, config)
        ref, others = layouts[0], layouts[1:]
        n_a, M, kind = ref.n_neurons, len(others), config.baseline
        f64 = lambda *s: np.full(s, np.nan)  # noqa: E731
        i64 = lambda *s: np.full(s, -1, dtype=np.int64)  # noqa: E731
        out = dict(max_corr=f64(M, n_a), partner=i64(M, n_a), min_corr=f64(M, n_a))
        if kind != "none":
            out.update(baseline=f64(M, n_a), baseline_partner=i64(M, n_a))
        if config.top_k:
            out.update(top_k_corr=f64(M, n_a, config.top_k), top_k_partner=i64(M, n_a, config.top_k))
        if config.hist_bins:
            out["histogram"] = np.zeros((M, n_a, config.hist_bins), dtype=np.int64)
        self.out = out
        self.full = None
        if full_path is not None:
            import h5py
            self.full = h5py.File(full_path, "w")
            for m in others:
                self.full.create_dataset(f"corr/{m.label}", shape=(n_a, m.n_neurons), dtype=config.full_matrix_dtype,
                                         chunks=(min(n_a, 64), min(m.n_neurons, 4096)), fillvalue=np.nan)
        self.rotations = ([baselines.rotation_matrices(m.label, m.n_layers, m.d_mlp, seed=config.seed).to(device)
                           for m in others] if kind == "rotation" else None)
        self.offsets = np.cumsum([0] + [m.n_neurons for m in others]).tolist()
        self.first: dict[str, Any] | None = None
        self.n_added = 0

    def add(self, acc: CorrelationPartial) -> None:
        """Summarise the next block's merged partial into the result arrays.

        Raises:
            InputError: out of block order, too few tokens, or a pass that saw other tokens.
        """
        config, others, kind, out = self.config, self.layouts[1:], self.config.baseline, self.out
        p = self.n_added
        if acc.n_pass != p or (acc.i0, acc.i1) != self.blocks[p]:
            raise InputError(f"finalize got the partial of block {acc.n_pass} (rows {acc.i0}..{acc.i1}) "
                             f"where block {p} {self.blocks[p]} was due; pass one merged partial per block, "
                             "in block order")
        acc.to(self.device)
        i0, i1 = acc.i0, acc.i1
        if p == 0:
            if acc.n < 2:
                raise InputError(
                    f"the source gave {acc.n} masked-in token(s); correlation needs at least 2. "
                    "Check the mask policy (did it exclude every position?) and that the source is not empty")
            self.first = first_pass_facts(acc, self.layouts, config, self.rotations)
        first = self.first
        assert first is not None  # block 0 came first
        if acc.n != first["n"]:
            raise InputError(
                f"pass {p + 1} over the source saw {acc.n} tokens but pass 1 saw {first['n']}; blocked runs read the "
                "source once per block, so it must be re-iterable (a list, or an object whose __iter__ starts over), "
                "not a generator")
        m2x, dead_x = first["m2"][0][i0:i1], first["dead_t"][0][i0:i1]
        offsets = self.offsets
        for k, m in enumerate(others):
            sl = slice(offsets[k], offsets[k + 1])
            rho = correlations(acc.C[:, sl], m2x, first["m2"][k + 1], dead_x, first["dead_t"][k + 1])
            if self.full is not None:
                self.full[f"corr/{m.label}"][i0:i1] = rho.cpu().numpy().astype(config.full_matrix_dtype)
            s = summarise(rho, config, extras=True)  # overwrites rho
            del rho
            out["max_corr"][k, i0:i1], out["partner"][k, i0:i1] = s["max"], s["arg"]
            out["min_corr"][k, i0:i1] = s["min"]
            if config.top_k:
                out["top_k_corr"][k, i0:i1], out["top_k_partner"][k, i0:i1] = s["top_v"], s["top_i"]
            if config.hist_bins:
                out["histogram"][k, i0:i1] = s["hist"]
            if kind == "none":
                continue
            if kind == "rotation":
                assert self.rotations is not None
                cb, m2b = baselines.rotate_comoments(acc.C[:, sl], self.rotations[k]), first["m2_rot"][k]
            else:
                assert acc.Cb is not None
                cb, m2b = acc.Cb[:, sl], first["m2_z"][k] if kind == "gaussian" else first["m2"][k + 1]
            sb = summarise(correlations(cb, m2x, m2b, dead_x, m2b <= 0), config, extras=False)
            out["baseline"][k, i0:i1], out["baseline_partner"][k, i0:i1] = sb["max"], sb["arg"]
        self.n_added += 1

    def close(self) -> None:
        """Finish and close the full-matrix file (its provenance goes in last)."""
        if self.full is not None:
            self.full.attrs["provenance"] = to_json({**provenance_base("correlation_matrix"), **(self.provenance or {}),
                                                     "config": self.config.to_dict()})
            self.full.close()
            self.full = None

    def result(self, extra_provenance: dict[str, Any]) -> CorrelationResult:
        """The `CorrelationResult`, once every block was added."""
        if self.n_added != len(self.blocks):
            raise InputError(f"finalize got {self.n_added} block partial(s) but this run has "
                             f"{len(self.blocks)} reference block(s); pass one per block")
        layouts, first = self.layouts, self.first
        assert first is not None
        prov = {**provenance_base("correlation"), **(self.provenance or {}), "config": self.config.to_dict(),
                "block_size": self.blocks[0][1] - self.blocks[0][0], "passes": len(self.blocks),
                "device": str(self.device), **extra_provenance}
        return CorrelationResult(reference=layouts[0], others=tuple(layouts[1:]), n_tokens=first["n"],
                                 config=self.config, provenance=prov,
                                 mean={m.label: v for m, v in zip(layouts, first["mean"])},
                                 var={m.label: v for m, v in zip(layouts, first["var"])},
                                 dead={m.label: v for m, v in zip(layouts, first["dead"])}, **self.out)


def finalize(partials: Iterable[CorrelationPartial], layouts: Sequence[ModelLayout],
             config: CorrelationConfig | None = None, *, provenance: dict[str, Any] | None = None,
             full_matrix_path: str | os.PathLike | None = None, overwrite: bool = False,
             device: torch.device | str | None = None,
             extra_provenance: dict[str, Any] | None = None) -> CorrelationResult:
    """Correlations, partners and baselines from one merged partial per reference block.

    Args:
        partials: one `CorrelationPartial` per block of `reference_blocks(layouts, config)`,
            in block order, each over every token; an iterator is consumed one block at a time
            (only one block's accumulators are alive at once).
        layouts: as for `correlate`.
        config: as for `correlate`.
        provenance: as for `correlate`.
        full_matrix_path: as for `correlate`; refused before any partial is drawn when it
            exists and `overwrite` is False, and written atomically.
        overwrite: replace an existing full-matrix file.
        device: where the correlations are summarised (default `config.device`).
        extra_provenance: more keys for the result's provenance (e.g. the cluster used).

    Returns:
        `CorrelationResult`.
    """
    config = config or CorrelationConfig()
    layouts = check_layouts(layouts)
    where: torch.device = pick_device(config.device if device is None else str(device))
    plan = preflight(layouts, 0, config)
    log.info("finishing correlate %s vs %d model(s): %d block(s) of %d reference neurons, baseline=%s",
             layouts[0].label, len(layouts) - 1, plan["passes"], plan["block_size"], config.baseline)
    with contextlib.ExitStack() as files:
        full: Path | None = None
        if full_matrix_path is not None:
            full = files.enter_context(atomic_path(full_matrix_path, overwrite=overwrite))
        asm = Assembler(layouts, config, where, full, provenance)
        try:
            for acc in partials:
                asm.add(acc)
                del acc
        finally:
            asm.close()
        return asm.result(extra_provenance or {})  # inside: a run missing a block leaves no matrix file
