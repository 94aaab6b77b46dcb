"""Stage: activations -> correlations (METHOD.md §4-5).

Exact streaming Pearson correlation between every neuron of a reference model
`a` and every neuron of each other model `m` (all layers), with a chance
baseline computed in the same pass.

Engine, per token batch (masked-in tokens only):
  1. each model's activations are centred by their batch mean (x once for all m);
  2. one GEMM  x_c[:, block]^T @ [y_c(b) | y_c(c) | ...]  gives every batch co-moment;
  3. the batch co-moments are merged into float64 running co-moments with Chan
     et al.'s pairwise update  C += C_b + n_a n_b / n * dmean_x dmean_y^T,
     so a neuron whose mean is 10^4 times its spread loses nothing.
When the accumulators of all pairs exceed `memory_budget`, the reference
neurons are split into blocks, one pass over the source per block.

The same steps are public for distributed runs (universal/distributed.py): one
`accumulate` per (token shard, reference block) gives a picklable
`CorrelationPartial`; `merge_partials` joins two of them with the very Chan merge
that `update` applies to each batch; `finalize` turns one merged partial per block
into the `CorrelationResult`. `correlate` is `finalize` over `accumulate`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.runtime import from_json, pick_device, progress, provenance_base, to_json

from . import baselines as _bl

__all__ = [
    "ModelLayout",
    "CorrelationConfig",
    "CorrelationResult",
    "correlate",
    "correlate_all_pairs",
    "preflight",
    "CorrelationPartial",
    "reference_blocks",
    "accumulate",
    "merge_partials",
    "finalize",
]

log = logging.getLogger("universal_neurons")

_PRECISIONS = ("fp32", "tf32", "bf16")
_FULL_DTYPES = ("float16", "float32")
_ROW_ALIGN = 64  # blocks are multiples of this, so a row's GEMM is the same call blocked or not


@dataclass(frozen=True)
class ModelLayout:
    """How one model's neurons are laid out: flat index = layer * d_mlp + neuron."""

    label: str     # e.g. "a", "b" or a model name; unique within a family
    n_layers: int
    d_mlp: int

    def __post_init__(self):
        if not isinstance(self.label, str) or not self.label:
            raise UniversalNeuronsError(f"model label {self.label!r} must be a non-empty string")
        for name in ("n_layers", "d_mlp"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise UniversalNeuronsError(f"ModelLayout {self.label!r}: {name}={v!r} must be a positive int")

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp


@dataclass(frozen=True)
class CorrelationConfig:
    """How `correlate` runs. Stored in every result's attributes."""

    baseline: str = "rotation"        # METHOD.md §5: "rotation" (paper), "gaussian", "permutation" or "none"
    seed: int = 0                     # seeds the baseline's rotations / noise / permutations
    precision: str = "fp32"           # "fp32" exact (max error ~1e-6); "bf16" ~2x faster on CPU (measured), error ~2e-3; "tf32" CUDA only
    absolute: bool = False            # rank partners by |rho| (max_corr, baseline, top_k are then >= 0)
    memory_budget: int = 2 * 2**30    # bytes for the accumulators; above it, blocks of reference neurons, one pass each
    block_size: int | None = None     # reference neurons per pass; None = as many as memory_budget allows
    top_k: int = 0                    # keep the k best partners per reference neuron (0 = off)
    hist_bins: int = 0                # per-neuron histogram of rho over j on [-1, 1] (0 = off; e.g. 40)
    device: str = "auto"              # "auto" = CUDA when present, else CPU
    dead_var: float = 0.0             # a neuron with variance <= this over the masked tokens is dead
    full_matrix_dtype: str = "float16"  # dtype of the optional full matrix file (float16 halves its size)

    def __post_init__(self):
        def bad(name, fix):
            raise UniversalNeuronsError(f"CorrelationConfig.{name}={getattr(self, name)!r} is invalid; {fix}")
        if self.baseline not in _bl.BASELINES:
            bad("baseline", f"unknown baseline kind; use one of {', '.join(_bl.BASELINES)}")
        if self.precision not in _PRECISIONS:
            bad("precision", f"use one of {', '.join(_PRECISIONS)} (fp16 has no fast CPU kernel)")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            bad("seed", "use a non-negative int")
        if not isinstance(self.memory_budget, (int, np.integer)) or self.memory_budget <= 0:
            bad("memory_budget", "use a positive number of bytes, e.g. 2 * 2**30")
        if self.block_size is not None and (not isinstance(self.block_size, (int, np.integer)) or self.block_size < 1):
            bad("block_size", "use a positive int or None (chosen from memory_budget)")
        for name in ("top_k", "hist_bins"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 0:
                bad(name, "use a non-negative int (0 = off)")
        if not (isinstance(self.dead_var, (int, float)) and self.dead_var >= 0):
            bad("dead_var", "use a non-negative float")
        if self.full_matrix_dtype not in _FULL_DTYPES:
            bad("full_matrix_dtype", f"use one of {', '.join(_FULL_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CorrelationConfig":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


# ----------------------------------------------------------------------------- planning

def _check_layouts(layouts: Sequence[ModelLayout]) -> tuple[ModelLayout, ...]:
    layouts = tuple(layouts)
    if len(layouts) < 2:
        raise UniversalNeuronsError(
            f"got {len(layouts)} model layout(s); pass the reference model first and at least one other")
    if not all(isinstance(l, ModelLayout) for l in layouts):
        raise UniversalNeuronsError("layouts must be ModelLayout(label, n_layers, d_mlp) objects")
    labels = [l.label for l in layouts]
    if len(set(labels)) != len(labels):
        raise UniversalNeuronsError(f"model labels {labels} repeat; give every model its own label")
    return layouts


def _n_cross(config: CorrelationConfig) -> int:
    """How many [block, N_m] float64 co-moment matrices each reference row needs."""
    return 1 + (config.baseline in ("gaussian", "permutation"))


def _bytes_per_row(layouts, config) -> int:
    n_other = sum(l.n_neurons for l in layouts[1:])
    widest = max(l.n_neurons for l in layouts[1:])
    # float64 co-moments per cross matrix, the batch GEMM's output (float32) and its float64
    # copy (shared by the cross matrices), and ~4 float64 [row, N_m] temporaries while one
    # model's correlations are summarised.
    return _n_cross(config) * n_other * 8 + n_other * (4 + 8) + 4 * 8 * widest


def _fixed_bytes(layouts, config) -> int:
    sq = sum(l.n_layers * l.d_mlp ** 2 for l in layouts[1:])
    n_all = sum(l.n_neurons for l in layouts)
    rot = 2 * 8 * sq if config.baseline == "rotation" else 0  # Σ_y and R, float64
    return rot + 4 * 8 * n_all


def _block_size(layouts, config) -> int:
    n_a = layouts[0].n_neurons
    if config.block_size is not None:
        return min(int(config.block_size), n_a)
    room = config.memory_budget - _fixed_bytes(layouts, config)
    rows = room // _bytes_per_row(layouts, config)
    if rows < 1:
        need = _fixed_bytes(layouts, config) + _bytes_per_row(layouts, config) * min(n_a, _ROW_ALIGN)
        raise UniversalNeuronsError(
            f"memory_budget={config.memory_budget} bytes cannot hold the accumulators "
            f"(at least {need} bytes for one block); raise memory_budget")
    if rows >= n_a:
        return n_a
    return max(_ROW_ALIGN, rows // _ROW_ALIGN * _ROW_ALIGN) if n_a > _ROW_ALIGN else int(rows)


def preflight(layouts: Sequence[ModelLayout], n_tokens: int,
              config: CorrelationConfig | None = None) -> dict[str, Any]:
    """What a `correlate` run will cost, before running it.

    **Arguments:** `layouts`: reference first; `n_tokens`: masked-in tokens; `config`.

    **Returns:** dict with `gemm_flops`, `accumulator_bytes`, `block_size`, `passes`,
    and `summary`, a one-line description (what the CLI prints).
    """
    config = config or CorrelationConfig()
    layouts = _check_layouts(layouts)
    n_a = layouts[0].n_neurons
    n_other = sum(l.n_neurons for l in layouts[1:])
    block = _block_size(layouts, config)
    passes = math.ceil(n_a / block)
    flops = 2.0 * n_tokens * n_a * n_other * _n_cross(config)
    if config.baseline == "rotation":
        sq = sum(l.n_layers * l.d_mlp ** 2 for l in layouts[1:])
        flops += 2.0 * n_tokens * sq  # Σ_y, first pass only
    acc = _fixed_bytes(layouts, config) + block * _bytes_per_row(layouts, config)
    summary = (f"correlate {layouts[0].label} ({n_a} neurons) vs {len(layouts) - 1} model(s) "
               f"({n_other} neurons) over {n_tokens} tokens: {flops / 1e12:.2f} TFLOP, "
               f"{acc / 2**30:.2f} GiB accumulators, {passes} pass(es) of {block} reference neurons, "
               f"baseline={config.baseline}, precision={config.precision}")
    return {"gemm_flops": flops, "accumulator_bytes": acc, "block_size": block,
            "passes": passes, "summary": summary}


# ----------------------------------------------------------------------------- the pass

@contextlib.contextmanager
def _matmul_precision(device: torch.device, precision: str):
    """TF32 only when asked for (opt-in), and restored afterwards."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision in ("tf32", "bf16")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


class _Moments:
    """Running count-free mean and M2 (sum of squared deviations) of a set of units, float64."""

    def __init__(self, n: int, device):
        self.mean = torch.zeros(n, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n, dtype=torch.float64, device=device)

    def to(self, device) -> "_Moments":
        self.mean, self.m2 = self.mean.to(device), self.m2.to(device)
        return self


class _Workspace:
    """Batch buffers reused from one batch to the next (`ws(name, shape, dtype)`).

    Two CPU facts shape the per-batch code. A fresh `[token, neuron]` tensor per batch is
    handed back to the OS when freed and page-faulted in again on the next batch, which took
    longer than the arithmetic on it. And elementwise ops that mix dtypes (fp16 with fp32,
    fp32 into float64) are not vectorised on CPU, while `copy_` between dtypes is; so a dtype
    change is a `copy_` into a buffer of the target dtype, then same-dtype ops.
    """

    def __init__(self, device):
        self.device, self.bufs = device, {}

    def __call__(self, name: str, shape, dtype, *, capacity: int = 0) -> torch.Tensor:
        """A tensor of `shape`, contents undefined: the first `shape[0]` rows of a kept buffer
        of at least `capacity` rows (pass the batch length, so masks that let through a few
        more tokens than the last batch reuse the buffer)."""
        shape = tuple(int(s) for s in shape)
        buf = self.bufs.get(name)
        if buf is None or buf.dtype != dtype or tuple(buf.shape[1:]) != shape[1:] or buf.shape[0] < shape[0]:
            self.bufs.pop(name, None)
            rows = max(shape[0], int(capacity))
            buf = self.bufs[name] = torch.empty((rows,) + shape[1:], dtype=dtype, device=self.device)
        return buf[:shape[0]]


def _gemm_dtype(config: "CorrelationConfig") -> torch.dtype:
    """The dtype the centred batches are written in for the GEMMs."""
    return torch.bfloat16 if config.precision == "bf16" else torch.float32


def _masked_rows(mask: torch.Tensor, device):
    """(mask on `device`, masked-in count, their row indices or None when every row counts)."""
    mask = mask.to(device)
    n_b = int(mask.sum())
    idx = None if n_b in (0, mask.shape[0]) else torch.nonzero(mask, as_tuple=True)[0]
    return mask, n_b, idx


def _stream(source: Iterable, layouts, config: "CorrelationConfig", device, desc: str, update, first_batch: int = 0):
    """Feed every checked batch of `source` to `update(batch_index, mask, acts, ws)`, with one
    `_Workspace` for the pass, gradients off, the configured matmul precision and a progress bar."""
    ws = _Workspace(device)
    with torch.no_grad(), _matmul_precision(device, config.precision), \
            progress(total=None, unit="tok", unit_scale=True, desc=desc) as bar:
        for b, item in enumerate(source):
            mask, acts = _check_batch(item, layouts, first_batch + b)
            bar.update(update(first_batch + b, mask, acts, ws))


_TILE_ROWS = 512  # elementwise work runs on [512, units] float32 tiles, which stay in cache


def _centre_into(t: torch.Tensor, idx, out: torch.Tensor, ws: _Workspace, *, want_m2: bool):
    """out <- t[idx] - shift (`idx` None = every row of `t`), tile by tile; float64 moments.

    `out` is float32, or bf16 (the GEMM operand: tiles are centred in float32, then cast).
    `shift` is the float32 mean of every 16th token of the batch (spread over all its
    sequences and positions), a guess of the batch mean that costs a sixteenth of a pass and
    depends on nothing but the batch (so token shards process each batch exactly as one
    pass does). Returns (mean_b, resid, m2_b): `resid` = the exact mean
    of the float32 centred values (float64), so sum(c c^T) - n resid resid^T is the exact
    co-moment about the batch mean whatever the guess; mean_b = shift + resid; m2_b = that
    co-moment's diagonal (None unless `want_m2`).

    Gathering, converting, centring, summing and casting a cache-sized tile at a time reads
    the source once and writes `out` once; whole-batch ops would stream every intermediate
    through main memory (about twice the time on CPU).
    """
    n, w = out.shape
    f32, f64 = torch.float32, torch.float64
    sample = torch.arange(0, n, 16, device=t.device) if idx is None else idx[::16]
    cap = t.shape[0] // 16 + 1
    picked = torch.index_select(t, 0, sample, out=ws(f"sample{w}", (sample.numel(), w), t.dtype, capacity=cap))
    shift = ws(f"sample32_{w}", picked.shape, f32, capacity=cap).copy_(picked).mean(0)
    direct = out.dtype == f32  # centre straight into `out`; else into a float32 tile, then cast
    rows = _TILE_ROWS if out.device.type == "cpu" else n  # a GPU streams whole batches well
    n_tiles = -(-n // rows)
    sums = ws(f"sums{w}", (n_tiles, w), f32)       # per-tile float32 sums, added in float64 at the end
    squares = ws(f"squares{w}", (n_tiles, w), f32) if want_m2 else None
    for i, a in enumerate(range(0, n, rows)):
        b = min(n, a + rows)
        tile = out[a:b] if direct else ws(f"tile{w}", (b - a, w), f32)
        if idx is None:
            tile.copy_(t[a:b])
        elif t.dtype == f32 and tile.is_contiguous():
            torch.index_select(t, 0, idx[a:b], out=tile)
        else:
            tile.copy_(torch.index_select(t, 0, idx[a:b], out=ws(f"gather{w}", (b - a, w), t.dtype)))
        tile.sub_(shift)
        torch.sum(tile, 0, out=sums[i])
        if want_m2:
            torch.sum(torch.mul(tile, tile, out=ws(f"square{w}", (b - a, w), f32)), 0, out=squares[i])
        if not direct:
            out[a:b].copy_(tile)
    resid = sums.sum(0, dtype=f64).div_(n)
    m2 = None if squares is None else (squares.sum(0, dtype=f64) - n * resid ** 2).clamp_min_(0.0)
    return shift.double() + resid, resid, m2


def _merge_mean(mom: "_Moments", n_old: int, n_b: int, mean_b) -> torch.Tensor:
    """Chan et al.'s merge of a batch mean; returns dmean = mean_b - mean_old."""
    delta = mean_b - mom.mean
    mom.mean += delta * (n_b / (n_old + n_b))
    return delta


def _merge_m2(mom: "_Moments", n_old: int, n_b: int, m2_b, delta) -> None:
    mom.m2 += m2_b + delta * delta * (n_old * n_b / (n_old + n_b))


def _merge_cross(C, C_b, coef, dx, dy, shift=None) -> None:
    """Chan et al.'s merge of cross co-moments: C += C_b + coef dx dy^T (in place).

    `C_b` is the other part's co-moment about its own mean (a partial's `C`), or, from
    `update`, a batch GEMM about a float32 estimate of the batch mean, with
    `shift=(rx, ry, n_b)` correcting it to the exact batch mean (-n_b rx ry^T) in the
    same rank-2 update.
    """
    C.add_(C_b)
    if shift is None:
        C.addr_(dx * coef, dy)
    else:
        rx, ry, n_b = shift
        C.addmm_(torch.stack([dx * coef, rx * -float(n_b)], 1), torch.stack([dy, ry], 0))


def _merge_sigma(S, S_b, coef, dl, shift=None) -> None:
    """`_merge_cross` for the within-layer co-moments Σ_y `[layer, d, d]`; `dl` is `[layer, d, 1]`."""
    S.add_(S_b)
    if shift is None:
        S.baddbmm_(dl * coef, dl.transpose(1, 2))
    else:
        rl, n_b = shift
        S.baddbmm_(torch.cat([dl * coef, rl * -float(n_b)], 2), torch.cat([dl, rl], 2).transpose(1, 2))


def _update_sigma(S, y: torch.Tensor, lay: ModelLayout, coef: float, dy, ry, n_b: int, ws: _Workspace, key: str):
    """Merge one batch into Σ_y `[layer, d, d]`, the within-layer co-moments of one model.

    `y` `[token, n_layers*d]` holds the model's centred batch (GEMM dtype); `dy`, `ry` its
    mean change and residual mean. Returns the batch's M2 of the model's neurons from the
    GEMM's diagonal (sum(c^2) comes free with Σ; exact in fp32, bf16-rounded in bf16).
    """
    d, L = lay.d_mlp, lay.n_layers
    g = ws(key, (L, d, d), y.dtype)
    for l in range(L):
        s = y[:, l * d:(l + 1) * d]
        torch.mm(s.T, s, out=g[l])
    g = ws(key + "_64", g.shape, torch.float64).copy_(g)
    _merge_sigma(S, g, coef, dy.reshape(L, d, 1), shift=(ry.reshape(L, d, 1), n_b))
    return (torch.diagonal(g, dim1=1, dim2=2).reshape(-1) - n_b * ry ** 2).clamp_min_(0.0)


class CorrelationPartial:
    """Float64 co-moments of the tokens seen so far, for reference rows [i0, i1): the state
    of one pass (`n_pass` = the reference block's index), or of one token shard of it.

    Picklable (move it to CPU with `.to("cpu")` before sending it anywhere); two partials
    of the same block over disjoint tokens join exactly with `merge_partials`.
    """

    def __init__(self, layouts, config, device, i0, i1, *, n_pass: int, want_sigma: bool):
        self.layouts, self.config, self.device, self.n_pass = layouts, config, device, n_pass
        self.i0, self.i1 = i0, i1
        self.widths = [l.n_neurons for l in layouts]
        self.offsets = np.cumsum([0] + self.widths[1:]).tolist()  # column offsets of each m
        n_other, rows = self.offsets[-1], i1 - i0
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.moments = [_Moments(w, device) for w in self.widths]
        self.C = torch.zeros(rows, n_other, **f64)
        kind = config.baseline
        self.Cb = torch.zeros(rows, n_other, **f64) if kind in ("gaussian", "permutation") else None
        self.z_moments = [_Moments(w, device) for w in self.widths[1:]] if kind == "gaussian" else None
        self.sigma = ([torch.zeros(l.n_layers, l.d_mlp, l.d_mlp, **f64) for l in layouts[1:]]
                      if want_sigma else None)

    def to(self, device) -> "CorrelationPartial":
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
        ts = [self.C, self.Cb] + (self.sigma or []) + [t for mo in self.moments + (self.z_moments or [])
                                                       for t in (mo.mean, mo.m2)]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # -- one batch ----------------------------------------------------------
    def update(self, batch_index: int, mask: torch.Tensor, acts: list[torch.Tensor],
               ws: _Workspace | None = None) -> int:
        """Merge one batch (`mask` [token], `acts` per model [token, neuron]); returns its masked-in count.

        `ws` keeps the batch buffers between calls (`accumulate` passes one per pass).
        """
        dev, cfg = self.device, self.config
        ws = _Workspace(dev) if ws is None else ws
        mask, n_b, idx = _masked_rows(mask, dev)
        if n_b == 0:
            return 0
        f32, f64 = torch.float32, torch.float64
        low = _gemm_dtype(cfg)
        n_old, n_other = self.n, self.offsets[-1]
        coef = n_old * n_b / (n_old + n_b)
        # second moments are the same on every pass: only the first pass computes them
        first = self.n_pass == 0
        m2_from_sigma = self.sigma is not None and low == f32

        def centre(k, out, want_m2):
            return _centre_into(acts[k].to(dev, non_blocking=True), idx, out, ws, want_m2=want_m2)

        def as64(name, t):
            return ws(name, t.shape, f64).copy_(t)

        # reference: centred once, reused for every m and every baseline
        cap = mask.shape[0]
        x = ws("x", (n_b, self.widths[0]), low, capacity=cap)
        mean_b, rx, m2x = centre(0, x, first)
        dx = _merge_mean(self.moments[0], n_old, n_b, mean_b)
        if first:
            _merge_m2(self.moments[0], n_old, n_b, m2x, dx)
        xb = x[:, self.i0:self.i1]
        dx, rx = dx[self.i0:self.i1], rx[self.i0:self.i1]

        Yg = ws("Y", (n_b, n_other), low, capacity=cap)  # [token, all m neurons], centred, GEMM operand
        dy, ry, m2y = [], [], []
        for k in range(1, len(self.layouts)):
            sl = slice(self.offsets[k - 1], self.offsets[k])
            mean_b, r, m2 = centre(k, Yg[:, sl], first and not m2_from_sigma)
            dy.append(_merge_mean(self.moments[k], n_old, n_b, mean_b))
            ry.append(r)
            m2y.append(m2)
        G = torch.mm(xb.T, Yg, out=ws("G", (xb.shape[1], n_other), low))
        _merge_cross(self.C, as64("G64", G), coef, dx, torch.cat(dy), shift=(rx, torch.cat(ry), n_b))

        for k, lay in enumerate(self.layouts[1:]):
            if self.sigma is not None:  # within-layer Σ_y of m, for the rotation identity
                m2 = _update_sigma(self.sigma[k], Yg[:, self.offsets[k]:self.offsets[k + 1]], lay, coef,
                                   dy[k], ry[k], n_b, ws, f"sigma{k}")
                if m2_from_sigma:
                    m2y[k] = m2
            if first:
                _merge_m2(self.moments[k + 1], n_old, n_b, m2y[k], dy[k])
        dy, ry = torch.cat(dy), torch.cat(ry)

        if cfg.baseline == "permutation":
            Yp = ws("Y_perm", Yg.shape, low, capacity=cap)
            for k, lay in enumerate(self.layouts[1:]):
                sl = slice(self.offsets[k], self.offsets[k + 1])
                perm = _bl.token_permutation(n_b, seed=cfg.seed, label=lay.label,
                                             batch_index=batch_index, device=dev)
                Yp[:, sl] = Yg[:, sl].index_select(0, perm)
            # permuted columns keep their batch means, so the same Chan terms apply
            G = torch.mm(xb.T, Yp, out=ws("G", (xb.shape[1], n_other), low))
            _merge_cross(self.Cb, as64("G64", G), coef, dx, dy, shift=(rx, ry, n_b))
        elif cfg.baseline == "gaussian":
            Z = ws("Z", (n_b, n_other), low, capacity=cap)
            dz, rz = [], []
            for k, lay in enumerate(self.layouts[1:]):
                sl = slice(self.offsets[k], self.offsets[k + 1])
                z = _bl.gaussian_units(n_b, lay.n_neurons, seed=cfg.seed, label=lay.label,
                                       batch_index=batch_index, device=dev)
                mean_b, r, m2 = _centre_into(z, None, Z[:, sl], ws, want_m2=first)
                del z
                dz.append(_merge_mean(self.z_moments[k], n_old, n_b, mean_b))
                if first:
                    _merge_m2(self.z_moments[k], n_old, n_b, m2, dz[-1])
                rz.append(r)
            G = torch.mm(xb.T, Z, out=ws("G", (xb.shape[1], n_other), low))
            _merge_cross(self.Cb, as64("G64", G), coef, dx, torch.cat(dz), shift=(rx, torch.cat(rz), n_b))
        self.n += n_b
        return n_b


# ----------------------------------------------------------------------------- results

@dataclass
class CorrelationResult:
    """Per reference neuron i and other model m: best partner, chance baseline, extras.

    Arrays indexed `[model, neuron]` have one row per model in `others` (in order) and
    one column per flat neuron of the reference (`layer * d_mlp + neuron`). Partners are
    flat indices into m (-1 = none); `partner_of(label)` splits them into (layer, neuron).
    Dead reference neurons have NaN values and partner -1. `var` is the population
    variance (divided by n_tokens) over the masked-in tokens.
    """

    reference: ModelLayout
    others: tuple[ModelLayout, ...]
    max_corr: np.ndarray                          # [model, neuron] max_j rho_ij (|rho| if config.absolute)
    partner: np.ndarray                           # [model, neuron] argmax j, flat index into m
    baseline: np.ndarray | None = None            # [model, neuron] max_j rho(x_i, u_j), u = chance units
    baseline_partner: np.ndarray | None = None    # [model, neuron]
    min_corr: np.ndarray | None = None            # [model, neuron] min_j rho_ij (always signed)
    top_k_corr: np.ndarray | None = None          # [model, neuron, k], best first, NaN padded
    top_k_partner: np.ndarray | None = None       # [model, neuron, k], -1 padded
    histogram: np.ndarray | None = None           # [model, neuron, bin] counts of rho_ij on hist_edges
    mean: dict[str, np.ndarray] = field(default_factory=dict)   # label -> [neuron]
    var: dict[str, np.ndarray] = field(default_factory=dict)    # label -> [neuron]
    dead: dict[str, np.ndarray] = field(default_factory=dict)   # label -> [neuron] bool
    n_tokens: int = 0
    config: CorrelationConfig = field(default_factory=CorrelationConfig)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.others = tuple(self.others)
        want = (len(self.others), self.reference.n_neurons)
        for name in ("max_corr", "partner", "baseline", "baseline_partner", "min_corr"):
            a = getattr(self, name)
            if a is not None:
                a = np.asarray(a)
                setattr(self, name, a)
                if a.shape != want:
                    raise UniversalNeuronsError(
                        f"CorrelationResult.{name} has shape {a.shape}; expected [model, neuron] = {want}")

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.others]

    def model_index(self, label: str) -> int:
        if label not in self.labels:
            raise UniversalNeuronsError(f"no model {label!r} in this result; models are {self.labels}")
        return self.labels.index(label)

    def partner_of(self, label: str, *, baseline: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(layer, neuron) of each reference neuron's partner in model `label`; -1 where none."""
        flat = (self.baseline_partner if baseline else self.partner)[self.model_index(label)]
        d = self.others[self.model_index(label)].d_mlp
        return np.where(flat >= 0, flat // d, -1), np.where(flat >= 0, flat % d, -1)

    @property
    def hist_edges(self) -> np.ndarray | None:
        if self.histogram is None:
            return None
        return np.linspace(-1.0, 1.0, self.histogram.shape[-1] + 1)

    @property
    def n_dead(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.dead.items()}

    # -- storage -------------------------------------------------------------
    _ARRAYS = ("max_corr", "partner", "baseline", "baseline_partner", "min_corr",
               "top_k_corr", "top_k_partner", "histogram")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write to one HDF5 file with provenance and config as JSON attributes."""
        import h5py

        _check_overwrite(path, overwrite)
        with h5py.File(path, "w") as f:
            f.attrs["provenance"] = to_json(self.provenance)
            f.attrs["config"] = to_json(self.config.to_dict())
            f.attrs["reference"] = to_json(dataclasses.asdict(self.reference))
            f.attrs["others"] = to_json([dataclasses.asdict(m) for m in self.others])
            f.attrs["n_tokens"] = int(self.n_tokens)
            for name in self._ARRAYS:
                a = getattr(self, name)
                if a is not None:
                    f.create_dataset(name, data=a, compression="gzip", compression_opts=1)
            for label in self.mean:
                g = f.create_group(f"models/{label}")
                g["mean"], g["var"], g["dead"] = self.mean[label], self.var[label], self.dead[label]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CorrelationResult":
        import h5py

        if not os.path.exists(path):
            raise UniversalNeuronsError(f"no correlation result at {os.fspath(path)!r}; run correlate(...).save(path) first")
        with h5py.File(path, "r") as f:
            prov = from_json(f.attrs["provenance"])
            if prov.get("artefact") not in (None, "correlation"):
                raise UniversalNeuronsError(f"{os.fspath(path)!r} holds a {prov.get('artefact')!r}, not a correlation result")
            kw = {n: f[n][()] for n in cls._ARRAYS if n in f}
            models = f.get("models", {})
            mean = {k: models[k]["mean"][()] for k in models}
            var = {k: models[k]["var"][()] for k in models}
            dead = {k: models[k]["dead"][()].astype(bool) for k in models}
            return cls(reference=ModelLayout(**from_json(f.attrs["reference"])),
                       others=tuple(ModelLayout(**d) for d in from_json(f.attrs["others"])),
                       mean=mean, var=var, dead=dead, n_tokens=int(f.attrs["n_tokens"]),
                       config=CorrelationConfig.from_dict(from_json(f.attrs["config"])),
                       provenance=prov, **kw)


def _check_overwrite(path, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise UniversalNeuronsError(
            f"{os.fspath(path)!r} already exists; pass overwrite=True to replace it or choose another path")


# ----------------------------------------------------------------------------- summaries

def _summarise(rho: torch.Tensor, config: CorrelationConfig, *, extras: bool) -> dict[str, np.ndarray]:
    """Row-wise max / argmax (+ min, top-k, histogram) of rho [row, j], NaN = no correlation.

    `rho` is scratch: it is overwritten (NaN -> +-inf in place), so a [row, j] float64
    matrix is never copied; correlations are clamped to [-1, 1], so an infinity here can
    only be a former NaN.
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


def _corr(C: torch.Tensor, m2x: torch.Tensor, m2y: torch.Tensor, dead_x, dead_y) -> torch.Tensor:
    """rho = C / sqrt(m2x m2y^T) clamped to [-1, 1], NaN in dead rows and columns (a new tensor)."""
    rho = C * m2x.rsqrt()[:, None]
    rho.mul_(m2y.rsqrt()[None, :]).clamp_(-1.0, 1.0)  # rounding can step past ±1; NaN stays NaN
    if bool(dead_x.any()):
        rho[dead_x] = torch.nan
    if bool(dead_y.any()):
        rho[:, dead_y] = torch.nan
    return rho


def _check_batch(item, layouts, b: int):
    try:
        mask, acts = item
    except (TypeError, ValueError):
        raise UniversalNeuronsError(f"batch {b} is not a (mask, acts) pair; the source must yield (mask, [acts per model])") from None
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or mask.ndim != 1:
        raise UniversalNeuronsError(f"batch {b}: mask must be a 1-D bool tensor [token], got {mask.dtype} of shape {tuple(mask.shape)}")
    if len(acts) != len(layouts):
        raise UniversalNeuronsError(f"batch {b} has activations for {len(acts)} model(s) but {len(layouts)} layouts were given; "
                                    "pass one tensor per model, the reference first")
    acts = [torch.as_tensor(t) for t in acts]
    for t, lay in zip(acts, layouts):
        if t.ndim != 2 or not t.is_floating_point():
            raise UniversalNeuronsError(f"batch {b}: model {lay.label!r} activations must be a float tensor [token, neuron], "
                                        f"got {t.dtype} of shape {tuple(t.shape)}")
        if t.shape[0] != mask.shape[0]:
            raise UniversalNeuronsError(f"batch {b}: model {lay.label!r} has {t.shape[0]} tokens but the mask has {mask.shape[0]}; "
                                        "every model must see the same tokens")
        if t.shape[1] != lay.n_neurons:
            raise UniversalNeuronsError(f"batch {b}: model {lay.label!r} activations have width {t.shape[1]} but its layout says "
                                        f"n_layers*d_mlp = {lay.n_layers}*{lay.d_mlp} = {lay.n_neurons}; fix the layout or the adapter")
    return mask, acts


# ----------------------------------------------------------------------------- API

def reference_blocks(layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None) -> list[tuple[int, int]]:
    """The reference rows `[(i0, i1), ...]` of each pass: one block when the accumulators fit
    `config.memory_budget` (or `config.block_size`), else several, each a pass over the tokens."""
    config = config or CorrelationConfig()
    layouts = _check_layouts(layouts)
    n_a, block = layouts[0].n_neurons, _block_size(layouts, config)
    return [(i, min(i + block, n_a)) for i in range(0, n_a, block)]


def accumulate(source: Iterable, layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None, *,
               block_index: int = 0, first_batch: int = 0, device=None,
               desc: str | None = None) -> CorrelationPartial:
    """One pass over `source` for reference block `block_index`: the float64 co-moments.

    **Arguments:**
    - `source`, `layouts`, `config`: as for `correlate`.
    - `block_index`: which of `reference_blocks(layouts, config)`; block 0 also gathers
      the per-model second moments (and Σ_y for the rotation baseline).
    - `first_batch`: global index of the source's first batch. The gaussian and permutation
      baselines seed each batch's noise by its global index, so a token shard that starts at
      batch 17 of the whole run passes 17 and draws the same noise as a single-process run.
    - `device`: where to accumulate (default `config.device`).

    **Returns:** `CorrelationPartial` over every masked-in token of `source` (may be empty, n=0).
    """
    config = config or CorrelationConfig()
    layouts = _check_layouts(layouts)
    blocks = reference_blocks(layouts, config)
    if not 0 <= block_index < len(blocks):
        raise UniversalNeuronsError(f"block_index={block_index} is out of range; this run has {len(blocks)} "
                                    "reference block(s) (see reference_blocks)")
    device = pick_device(config.device if device is None else device)
    if config.precision == "tf32" and device.type != "cuda":
        raise UniversalNeuronsError("precision='tf32' needs a CUDA device; use 'fp32' (exact) or 'bf16' (fast) on CPU")
    i0, i1 = blocks[block_index]
    acc = CorrelationPartial(layouts, config, device, i0, i1, n_pass=block_index,
                             want_sigma=config.baseline == "rotation" and block_index == 0)
    if desc is None:
        desc = f"correlate {layouts[0].label}" + (f" block {block_index + 1}/{len(blocks)}" if len(blocks) > 1 else "")
    _stream(source, layouts, config, device, desc, acc.update, first_batch)
    return acc


def merge_partials(a: CorrelationPartial, b: CorrelationPartial) -> CorrelationPartial:
    """Join the co-moments of two disjoint token sets, `a` then `b`, into `a` (in place; returns `a`).

    The same Chan et al. update (`_merge_mean`, `_merge_m2`, `_merge_cross`, `_merge_sigma`)
    that `CorrelationPartial.update` applies to each batch, so shards merged in token order
    equal one pass over all tokens up to floating-point association. `b` is left unchanged;
    on different devices it is brought to `a`'s.
    """
    same = (a.layouts == b.layouts and a.config == b.config and (a.i0, a.i1, a.n_pass) == (b.i0, b.i1, b.n_pass)
            and (a.sigma is None) == (b.sigma is None))
    if not same:
        raise UniversalNeuronsError(
            f"cannot merge partials of different runs or blocks (rows {a.i0}..{a.i1} pass {a.n_pass} vs "
            f"{b.i0}..{b.i1} pass {b.n_pass}); merge only the shards of one block of one correlate run")
    if b.n == 0:
        return a
    if b.device != a.device:
        b = copy.deepcopy(b).to(a.device)
    n_old, n_b = a.n, b.n
    coef = n_old * n_b / (n_old + n_b)
    first = a.n_pass == 0

    def means(mine, theirs):
        deltas = []
        for mo, other in zip(mine, theirs):
            deltas.append(_merge_mean(mo, n_old, n_b, other.mean))
            if first:
                _merge_m2(mo, n_old, n_b, other.m2, deltas[-1])
        return deltas

    with torch.no_grad():
        d = means(a.moments, b.moments)
        dx, dy = d[0][a.i0:a.i1], torch.cat(d[1:])
        _merge_cross(a.C, b.C, coef, dx, dy)
        if a.config.baseline == "permutation":  # permuted columns keep their means: the same terms as C
            _merge_cross(a.Cb, b.Cb, coef, dx, dy)
        elif a.config.baseline == "gaussian":
            _merge_cross(a.Cb, b.Cb, coef, dx, torch.cat(means(a.z_moments, b.z_moments)))
        if a.sigma is not None:
            for k, lay in enumerate(a.layouts[1:]):
                _merge_sigma(a.sigma[k], b.sigma[k], coef, d[k + 1].reshape(lay.n_layers, lay.d_mlp, 1))
    a.n += n_b
    return a


class _Assembler:
    """Turns one finished partial per reference block into the result arrays (and the optional
    full-matrix file); the first block's partial supplies the per-model facts."""

    def __init__(self, layouts, config, device, full_matrix_path, overwrite, provenance):
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
        if full_matrix_path is not None:
            import h5py
            _check_overwrite(full_matrix_path, overwrite)
            self.full = h5py.File(full_matrix_path, "w")
            for m in others:
                self.full.create_dataset(f"corr/{m.label}", shape=(n_a, m.n_neurons), dtype=config.full_matrix_dtype,
                                         chunks=(min(n_a, 64), min(m.n_neurons, 4096)), fillvalue=np.nan)
        self.rotations = ([_bl.rotation_matrices(m.label, m.n_layers, m.d_mlp, seed=config.seed).to(device)
                           for m in others] if kind == "rotation" else None)
        self.offsets = np.cumsum([0] + [m.n_neurons for m in others]).tolist()
        self.first = None
        self.n_added = 0

    def add(self, acc: CorrelationPartial) -> None:
        config, others, kind, out, first = self.config, self.layouts[1:], self.config.baseline, self.out, self.first
        p = self.n_added
        if acc.n_pass != p or (acc.i0, acc.i1) != self.blocks[p]:
            raise UniversalNeuronsError(f"finalize got the partial of block {acc.n_pass} (rows {acc.i0}..{acc.i1}) "
                                        f"where block {p} {self.blocks[p]} was due; pass one merged partial per block, "
                                        "in block order")
        acc.to(self.device)
        i0, i1 = acc.i0, acc.i1
        if p == 0:
            if acc.n < 2:
                raise UniversalNeuronsError(
                    f"the source gave {acc.n} masked-in token(s); correlation needs at least 2. "
                    "Check the mask policy (did it exclude every position?) and that the source is not empty")
            first = self.first = _first_pass_facts(acc, self.layouts, config, self.rotations)
        elif acc.n != first["n"]:
            raise UniversalNeuronsError(
                f"pass {p + 1} over the source saw {acc.n} tokens but pass 1 saw {first['n']}; blocked runs read the "
                "source once per block, so it must be re-iterable (a list, or an object whose __iter__ starts over), "
                "not a generator")
        m2x, dead_x = first["m2"][0][i0:i1], first["dead_t"][0][i0:i1]
        offsets = self.offsets
        for k, m in enumerate(others):
            sl = slice(offsets[k], offsets[k + 1])
            rho = _corr(acc.C[:, sl], m2x, first["m2"][k + 1], dead_x, first["dead_t"][k + 1])
            if self.full is not None:
                self.full[f"corr/{m.label}"][i0:i1] = rho.cpu().numpy().astype(config.full_matrix_dtype)
            s = _summarise(rho, config, extras=True)  # overwrites rho
            del rho
            out["max_corr"][k, i0:i1], out["partner"][k, i0:i1], out["min_corr"][k, i0:i1] = s["max"], s["arg"], s["min"]
            if config.top_k:
                out["top_k_corr"][k, i0:i1], out["top_k_partner"][k, i0:i1] = s["top_v"], s["top_i"]
            if config.hist_bins:
                out["histogram"][k, i0:i1] = s["hist"]
            if kind == "none":
                continue
            if kind == "rotation":
                cb, m2b = _bl.rotate_comoments(acc.C[:, sl], self.rotations[k]), first["m2_rot"][k]
            elif kind == "gaussian":
                cb, m2b = acc.Cb[:, sl], first["m2_z"][k]
            else:
                cb, m2b = acc.Cb[:, sl], first["m2"][k + 1]
            sb = _summarise(_corr(cb, m2x, m2b, dead_x, m2b <= 0), config, extras=False)
            out["baseline"][k, i0:i1], out["baseline_partner"][k, i0:i1] = sb["max"], sb["arg"]
        self.n_added += 1

    def close(self) -> None:
        if self.full is not None:
            self.full.attrs["provenance"] = to_json({**provenance_base("correlation_matrix"), **(self.provenance or {}),
                                                     "config": self.config.to_dict()})
            self.full.close()
            self.full = None

    def result(self, extra_provenance: dict[str, Any]) -> CorrelationResult:
        if self.n_added != len(self.blocks):
            raise UniversalNeuronsError(f"finalize got {self.n_added} block partial(s) but this run has "
                                        f"{len(self.blocks)} reference block(s); pass one per block")
        layouts, first = self.layouts, self.first
        prov = {**provenance_base("correlation"), **(self.provenance or {}), "config": self.config.to_dict(),
                "block_size": self.blocks[0][1] - self.blocks[0][0], "passes": len(self.blocks),
                "device": str(self.device), **extra_provenance}
        return CorrelationResult(reference=layouts[0], others=layouts[1:], n_tokens=first["n"], config=self.config,
                                 provenance=prov,
                                 mean={m.label: v for m, v in zip(layouts, first["mean"])},
                                 var={m.label: v for m, v in zip(layouts, first["var"])},
                                 dead={m.label: v for m, v in zip(layouts, first["dead"])}, **self.out)


def finalize(partials: Iterable[CorrelationPartial], layouts: Sequence[ModelLayout],
             config: CorrelationConfig | None = None, *, provenance: dict[str, Any] | None = None,
             full_matrix_path: str | os.PathLike | None = None, overwrite: bool = False, device=None,
             extra_provenance: dict[str, Any] | None = None) -> CorrelationResult:
    """Correlations, partners and baselines from one merged partial per reference block.

    **Arguments:**
    - `partials`: one `CorrelationPartial` per block of `reference_blocks(layouts, config)`,
      in block order, each over every token; an iterator is consumed one block at a time
      (only one block's accumulators are alive at once).
    - `layouts`, `config`, `provenance`, `full_matrix_path`, `overwrite`: as for `correlate`.
    - `device`: where the correlations are summarised (default `config.device`).
    - `extra_provenance`: more keys for the result's provenance (e.g. the cluster used).

    **Returns:** `CorrelationResult`.
    """
    config = config or CorrelationConfig()
    layouts = _check_layouts(layouts)
    device = pick_device(config.device if device is None else device)
    plan = preflight(layouts, 0, config)
    log.info("finishing correlate %s vs %d model(s): %d block(s) of %d reference neurons, baseline=%s",
             layouts[0].label, len(layouts) - 1, plan["passes"], plan["block_size"], config.baseline)
    asm = _Assembler(layouts, config, device, full_matrix_path, overwrite, provenance)
    try:
        for acc in partials:
            asm.add(acc)
            del acc
    finally:
        asm.close()
    return asm.result(extra_provenance or {})


def correlate(source: Iterable, layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None, *,
              provenance: dict[str, Any] | None = None, full_matrix_path: str | os.PathLike | None = None,
              overwrite: bool = False) -> CorrelationResult:
    """Correlate every neuron of the reference model with every neuron of each other model.

    **Arguments:**
    - `source`: re-iterable; each pass yields `(mask, acts)` with `mask` bool `[token]`
      (True = counts) and `acts` a list of float tensors `[token, n_layers*d_mlp]`,
      one per model in the order of `layouts` (reference first). A list works.
    - `layouts`: `ModelLayout` per model, the reference `a` first.
    - `config`: `CorrelationConfig` (baseline, precision, memory budget, ...).
    - `provenance`: models, checkpoints, token-set hash, mask policy; stored with the result.
    - `full_matrix_path`: if given, also write rho `[neuron_a, neuron_m]` per model to this
      HDF5 file (datasets `corr/<label>`, NaN for dead); `overwrite` allows replacing it.

    **Returns:** `CorrelationResult` with `[model, neuron]` arrays for every other model.
    """
    config = config or CorrelationConfig()
    layouts = _check_layouts(layouts)
    device = pick_device(config.device)
    if config.precision == "tf32" and device.type != "cuda":
        raise UniversalNeuronsError("precision='tf32' needs a CUDA device; use 'fp32' (exact) or 'bf16' (fast) on CPU")
    passes = (accumulate(source, layouts, config, block_index=p, device=device)
              for p in range(len(reference_blocks(layouts, config))))
    return finalize(passes, layouts, config, provenance=provenance, full_matrix_path=full_matrix_path,
                    overwrite=overwrite)


def _first_pass_facts(acc: CorrelationPartial, layouts, config, rotations) -> dict[str, Any]:
    """Per-model moments, dead neurons and baseline variances: the same on every pass."""
    n = acc.n
    m2 = [mo.m2 for mo in acc.moments]
    dead_t = [v / n <= config.dead_var for v in m2]
    facts = {"n": n, "m2": m2, "dead_t": dead_t,
             "mean": [mo.mean.cpu().numpy() for mo in acc.moments],
             "var": [(v / n).cpu().numpy() for v in m2],
             "dead": [d.cpu().numpy() for d in dead_t]}
    if rotations is not None:
        facts["m2_rot"] = [_bl.rotated_comoment_diag(s, r) for s, r in zip(acc.sigma, rotations)]
    if acc.z_moments is not None:
        facts["m2_z"] = [mo.m2 for mo in acc.z_moments]
    counts = {lay.label: int(d.sum()) for lay, d in zip(layouts, facts["dead"])}
    if any(counts.values()):
        log.warning("dead neurons (variance <= %g over %d masked-in tokens) have no correlation, reported as NaN: %s",
                    config.dead_var, n, ", ".join(f"{k}: {v} of {lay.n_neurons}"
                                                  for (k, v), lay in zip(counts.items(), layouts)))
    return facts


class _Reordered:
    """A view of a source with the models in another order (for all-pairs mode)."""

    def __init__(self, source, order):
        self.source, self.order = source, order

    def __iter__(self):
        for mask, acts in self.source:
            yield mask, [acts[i] for i in self.order]


def correlate_all_pairs(source: Iterable, layouts: Sequence[ModelLayout], config: CorrelationConfig | None = None,
                        **kwargs) -> dict[str, CorrelationResult]:
    """Every model as the reference in turn (beyond the paper): label -> `CorrelationResult`.

    Same arguments as `correlate` (without `full_matrix_path`). With the rotation baseline
    (or none) and accumulators that fit `memory_budget`, one pass over the source serves
    every reference (`universal_neurons.all_pairs`: C^{m,a} = (C^{a,m})^T, so half the GEMMs and
    one read of the source); otherwise `correlate` runs once per reference. Either way
    each result equals the single-reference `correlate` run with that model first.
    """
    from .all_pairs import correlate_all_pairs_one_pass, one_pass_fits

    config = config or CorrelationConfig()
    layouts = _check_layouts(layouts)
    if config.precision == "tf32" and pick_device(config.device).type != "cuda":
        raise UniversalNeuronsError("precision='tf32' needs a CUDA device; use 'fp32' (exact) or 'bf16' (fast) on CPU")
    if one_pass_fits(layouts, config) and set(kwargs) <= {"provenance"}:
        return correlate_all_pairs_one_pass(source, layouts, config, **kwargs)
    results = {}
    for r in range(len(layouts)):
        order = [r] + [i for i in range(len(layouts)) if i != r]
        res = correlate(_Reordered(source, order), [layouts[i] for i in order], config, **kwargs)
        res.provenance["all_pairs"] = "one correlate run per reference"
        results[layouts[r].label] = res
    return results
