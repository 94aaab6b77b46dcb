"""The per-batch arithmetic of the correlation engine: the batch preamble (mask, GEMM dtype,
input checks), tiled centring straight into the GEMM operand, the Chan merges of cross and
within-layer co-moments, the reusable workspace, and the streaming loop over a source.

Per-neuron means and second moments are merged by `universal_neurons.moments`; what is here
is the engine's own: the co-moment matrices and the hot path that feeds the GEMMs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from universal_neurons.errors import InputError
from universal_neurons.runtime import progress

from .config import CorrelationConfig, ModelLayout

__all__ = [
    "TILE_ROWS",
    "Workspace",
    "matmul_precision",
    "gemm_dtype",
    "masked_rows",
    "check_batch",
    "stream",
    "centre_into",
    "merge_cross",
    "merge_sigma",
    "update_sigma",
]

TILE_ROWS = 512  # elementwise work runs on [512, units] float32 tiles, which stay in cache


@contextlib.contextmanager
def matmul_precision(device: torch.device, precision: str) -> Iterator[None]:
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


class Workspace:
    """Batch buffers reused from one batch to the next (`ws(name, shape, dtype)`).

    Two CPU facts shape the per-batch code. A fresh `[token, neuron]` tensor per batch is
    handed back to the OS when freed and page-faulted in again on the next batch, which took
    longer than the arithmetic on it. And elementwise ops that mix dtypes (fp16 with fp32,
    fp32 into float64) are not vectorised on CPU, while `copy_` between dtypes is; so a dtype
    change is a `copy_` into a buffer of the target dtype, then same-dtype ops.

    Args:
        device: where the buffers live.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bufs: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: Sequence[int], dtype: torch.dtype, *, capacity: int = 0) -> torch.Tensor:
        """A tensor of `shape`, contents undefined.

        Args:
            name: the buffer's key.
            shape: the view wanted.
            dtype: its dtype.
            capacity: rows to allocate at least (pass the batch length, so masks that let
                through a few more tokens than the last batch reuse the buffer).

        Returns:
            The first `shape[0]` rows of a kept buffer.
        """
        shape = tuple(int(s) for s in shape)
        buf = self.bufs.get(name)
        if buf is None or buf.dtype != dtype or tuple(buf.shape[1:]) != shape[1:] or buf.shape[0] < shape[0]:
            self.bufs.pop(name, None)
            rows = max(shape[0], int(capacity))
            buf = self.bufs[name] = torch.empty((rows,) + shape[1:], dtype=dtype, device=self.device)
        return buf[:shape[0]]


def gemm_dtype(config: CorrelationConfig) -> torch.dtype:
    """The dtype the centred batches are written in for the GEMMs."""
    return torch.bfloat16 if config.precision == "bf16" else torch.float32


def masked_rows(mask: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The batch preamble: which rows count.

    Args:
        mask: `[token]` bool, True = counts.
        device: where the batch is processed.

    Returns:
        (mask on `device`, masked-in count, their row indices or None when every row counts).
    """
    mask = mask.to(device)
    n_b = int(mask.sum())
    idx = None if n_b in (0, mask.shape[0]) else torch.nonzero(mask, as_tuple=True)[0]
    return mask, n_b, idx


def check_batch(item: Any, layouts: Sequence[ModelLayout], b: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One batch of a source, checked against the layouts.

    Args:
        item: what the source yielded: `(mask [token], [acts [token, neuron] per model])`.
        layouts: the reference first.
        b: the batch's index (for the messages).

    Returns:
        (mask, acts) as tensors.

    Raises:
        InputError: the batch is not a (mask, acts) pair of matching shapes.
    """
    try:
        mask, acts = item
    except (TypeError, ValueError):
        raise InputError(f"batch {b} is not a (mask, acts) pair; the source must yield "
                         "(mask, [acts per model])") from None
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or mask.ndim != 1:
        raise InputError(f"batch {b}: mask must be a 1-D bool tensor [token], got {mask.dtype} "
                         f"of shape {tuple(mask.shape)}")
    if len(acts) != len(layouts):
        raise InputError(f"batch {b} has activations for {len(acts)} model(s) but {len(layouts)} layouts were given; "
                         "pass one tensor per model, the reference first")
    acts = [torch.as_tensor(t) for t in acts]
    for t, lay in zip(acts, layouts):
        if t.ndim != 2 or not t.is_floating_point():
            raise InputError(f"batch {b}: model {lay.label!r} activations must be a float tensor [token, neuron], "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
        if t.shape[0] != mask.shape[0]:
            raise InputError(f"batch {b}: model {lay.label!r} has {t.shape[0]} tokens but the mask has "
                             f"{mask.shape[0]}; every model must see the same tokens")
        if t.shape[1] != lay.n_neurons:
            raise InputError(f"batch {b}: model {lay.label!r} activations have width {t.shape[1]} but its "
                             f"layout says n_layers*d_mlp = {lay.n_layers}*{lay.d_mlp} = {lay.n_neurons}; "
                             "fix the layout or the adapter")
    return mask, acts


def stream(source: Iterable, layouts: Sequence[ModelLayout], config: CorrelationConfig, device: torch.device,
           desc: str, update: Callable[[int, torch.Tensor, list[torch.Tensor], Workspace], int],
           first_batch: int = 0) -> None:
    """Feed every checked batch of `source` to `update(batch_index, mask, acts, ws)`.

    One `Workspace` for the pass, gradients off, the configured matmul precision and a
    progress bar (`update` returns the masked-in count it used).
    """
    ws = Workspace(device)
    with torch.no_grad(), matmul_precision(device, config.precision), \
            progress(total=None, unit="tok", unit_scale=True, desc=desc) as bar:
        for b, item in enumerate(source):
            mask, acts = check_batch(item, layouts, first_batch + b)
            bar.update(update(first_batch + b, mask, acts, ws))


def centre_into(t: torch.Tensor, idx: torch.Tensor | None, out: torch.Tensor, ws: Workspace, *,
                want_m2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`out <- t[idx] - shift`, tile by tile, with the batch's float64 moments.

    `shift` is the float32 mean of every 16th token of the batch (spread over all its
    sequences and positions), a guess of the batch mean that costs a sixteenth of a pass and
    depends on nothing but the batch (so token shards process each batch exactly as one
    pass does). `resid`, the exact mean of the float32 centred values, makes
    `sum(c c^T) - n resid resid^T` the exact co-moment about the batch mean whatever the guess.

    Gathering, converting, centring, summing and casting a cache-sized tile at a time reads
    the source once and writes `out` once; whole-batch ops would stream every intermediate
    through main memory (about twice the time on CPU).

    Args:
        t: `[token, neuron]` one model's batch, any float dtype.
        idx: `[token]` masked-in row indices, None = every row of `t`.
        out: `[masked token, neuron]` float32, or bf16 (the GEMM operand: tiles are centred in
            float32, then cast).
        ws: the pass's workspace.
        want_m2: also sum the squares (for the batch's M2).

    Returns:
        (mean_b, resid, m2_b), each `[neuron]` float64: mean_b = shift + resid; m2_b the
        co-moment's diagonal, None unless `want_m2`.
    """
    n, w = out.shape
    f32, f64 = torch.float32, torch.float64
    sample = torch.arange(0, n, 16, device=t.device) if idx is None else idx[::16]
    cap = t.shape[0] // 16 + 1
    picked = torch.index_select(t, 0, sample, out=ws(f"sample{w}", (sample.numel(), w), t.dtype, capacity=cap))
    shift = ws(f"sample32_{w}", picked.shape, f32, capacity=cap).copy_(picked).mean(0)
    direct = out.dtype == f32  # centre straight into `out`; else into a float32 tile, then cast
    rows = TILE_ROWS if out.device.type == "cpu" else n  # a GPU streams whole batches well
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
        if squares is not None:
            torch.sum(torch.mul(tile, tile, out=ws(f"square{w}", (b - a, w), f32)), 0, out=squares[i])
        if not direct:
            out[a:b].copy_(tile)
    resid = sums.sum(0, dtype=f64).div_(n)
    m2 = None if squares is None else (squares.sum(0, dtype=f64) - n * resid ** 2).clamp_min_(0.0)
    return shift.double() + resid, resid, m2


def merge_cross(C: torch.Tensor, C_b: torch.Tensor, coef: float, dx: torch.Tensor, dy: torch.Tensor,
                shift: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> None:
    """Chan et al.'s merge of cross co-moments: `C += C_b + coef dx dy^T` (in place).

    Args:
        C: `[row, column]` float64 running co-moments.
        C_b: the other part's co-moments about its own mean (a partial's `C`), or a batch GEMM
            about a float32 estimate of the batch mean, which `shift` corrects.
        coef: `n_old n_b / (n_old + n_b)`.
        dx, dy: `[row]`, `[column]` mean changes (the part's mean minus the running one).
        shift: `(rx, ry, n_b)` from `centre_into`: the `-n_b rx ry^T` that moves a batch GEMM
            to the exact batch mean, folded into the same rank-2 update.
    """
    C.add_(C_b)
    if shift is None:
        C.addr_(dx * coef, dy)
    else:
        rx, ry, n_b = shift
        C.addmm_(torch.stack([dx * coef, rx * -float(n_b)], 1), torch.stack([dy, ry], 0))


def merge_sigma(S: torch.Tensor, S_b: torch.Tensor, coef: float, dl: torch.Tensor,
                shift: tuple[torch.Tensor, int] | None = None) -> None:
    """`merge_cross` for the within-layer co-moments Σ_y `[layer, d_mlp, d_mlp]`.

    Args:
        S, S_b: `[layer, d_mlp, d_mlp]` running and part co-moments.
        coef: `n_old n_b / (n_old + n_b)`.
        dl: `[layer, d_mlp, 1]` mean changes.
        shift: `(rl [layer, d_mlp, 1], n_b)`, as in `merge_cross`.
    """
    S.add_(S_b)
    if shift is None:
        S.baddbmm_(dl * coef, dl.transpose(1, 2))
    else:
        rl, n_b = shift
        S.baddbmm_(torch.cat([dl * coef, rl * -float(n_b)], 2), torch.cat([dl, rl], 2).transpose(1, 2))


def update_sigma(S: torch.Tensor, y: torch.Tensor, lay: ModelLayout, coef: float, dy: torch.Tensor,
                 ry: torch.Tensor, n_b: int, ws: Workspace, key: str) -> torch.Tensor:
    """Merge one batch into Σ_y, the within-layer co-moments of one model.

    Args:
        S: `[layer, d_mlp, d_mlp]` float64 running Σ_y.
        y: `[token, layer*d_mlp]` the model's centred batch (GEMM dtype).
        lay: the model's layout.
        coef: `n_old n_b / (n_old + n_b)`.
        dy, ry: `[layer*d_mlp]` mean change and residual mean (`centre_into`'s).
        n_b: masked-in tokens of the batch.
        ws: the pass's workspace; `key` names its buffers.

    Returns:
        `[layer*d_mlp]` the batch's M2 of the model's neurons from the GEMM's diagonal
        (sum(c^2) comes free with Σ; exact in fp32, bf16-rounded in bf16).
    """
    d, L = lay.d_mlp, lay.n_layers
    g = ws(key, (L, d, d), y.dtype)
    for layer in range(L):
        s = y[:, layer * d:(layer + 1) * d]
        torch.mm(s.T, s, out=g[layer])
    g = ws(key + "_64", g.shape, torch.float64).copy_(g)
    merge_sigma(S, g, coef, dy.reshape(L, d, 1), shift=(ry.reshape(L, d, 1), n_b))
    return (torch.diagonal(g, dim1=1, dim2=2).reshape(-1) - n_b * ry ** 2).clamp_min_(0.0)
