"""The integer grid of GPTQ-style weight quantization: per-row (or per-group) affine scale and zero
point, round-to-nearest, and the result type that GPTQ and RTN both return."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Checkpoints store scales in float16 (PackedGPTQ.scales); the smallest positive subnormal keeps
# a tiny group's scale from rounding to 0, the largest finite value keeps it from becoming inf.
_FP16_TINY = 2.0**-24
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantGrid:
    bits: int  # 2, 3, 4, 8
    sym: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8 (the widths the GPTQ checkpoint format packs), got {self.bits!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


@dataclass(frozen=True)
class QuantResult:
    """A quantized weight: Q[r, c] == scales[g_idx[c], r] * (codes[r, c] - zeros[g_idx[c], r])
    exactly (in fp32, then cast to W's dtype), with the scales already fp16-representable."""

    Q: Tensor  # (rows, cols) dequantized weight, dtype of W
    codes: Tensor  # (rows, cols) int32 in [0, maxq]
    scales: Tensor  # (n_groups, rows) fp32, every value exact in fp16
    zeros: Tensor  # (n_groups, rows) int32 in [0, maxq]
    g_idx: Tensor  # (cols,) int32: group of each input column, in the original column order
    grid: QuantGrid
    group_size: int  # -1 = one group per row
    # gptq: sum of (w - q)^2 / (2 d^2), the paper's objective 1/2 tr(D H D^T) with D = W - Q and H
    # dampened, i.e. for H = 2/n X^T X the mean over tokens of ||(W - Q) x||^2.
    # rtn: 1/2 ||W - Q||_F^2, the same objective with H = I.
    loss: float


def find_params(W: Tensor, grid: QuantGrid) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero for W (rows, cols) from its min/max, GPTQ's convention:
    the range always includes 0 (xmin <= 0 <= xmax) so that 0 is exactly representable;
    asym: scale=(xmax-xmin)/maxq, zero=round(-xmin/scale); sym: xmax=max(|xmin|,xmax),
    scale=2*xmax/maxq, zero=(maxq+1)/2 (so the zero point is 2**(bits-1)).
    Rows of zeros get scale 1 (no division by 0). The scale is rounded to float16, the dtype the
    checkpoint stores, so that the packed form reproduces Q bit-exactly; asym zeros are derived
    from the rounded scale. Returns scale (rows,) fp32, zero (rows,) fp32 integer-valued."""
    return _range_params(*_min_max(W, grid), grid)


def _min_max(W: Tensor, grid: QuantGrid) -> tuple[Tensor, Tensor]:
    W = W.float()  # (rows, cols)
    xmin = W.amin(dim=1).clamp(max=0.0)  # (rows,)
    xmax = W.amax(dim=1).clamp(min=0.0)  # (rows,)
    if grid.sym:
        # Both references (IST-DASLab quant.py, GPTQModel quantizer.py) keep xmin = 0 for an
        # all-nonnegative row, giving scale xmax/maxq and clipping its upper half at zero point
        # 2**(bits-1); the symmetric range [-xmax, xmax] used here for every row avoids that.
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    return xmin, xmax


def _range_params(xmin: Tensor, xmax: Tensor, grid: QuantGrid) -> tuple[Tensor, Tensor]:
    """Scale and zero of the grid spanning [xmin, xmax] (..., rows), scale fp16-representable."""
    maxq = grid.maxq
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(_FP16_TINY, _FP16_MAX).half().float()
    if grid.sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def find_params_mse(
    W: Tensor, grid: QuantGrid, *, weights: Tensor | None = None, steps: int = 100, maxshrink: float = 0.8, norm: float = 2.4, strides: tuple[int, ...] = (9, 3, 1)
) -> tuple[Tensor, Tensor]:
    """Like find_params, but each row's range [xmin, xmax] is shrunk by the factor p among
    1, 1 - 1/steps, ..., 1 - maxshrink that minimizes sum_j weights_j * |w_j - q_j|^norm over the
    row (clipping a few outliers buys a finer grid for the rest): IST-DASLab quant.py's `mse`
    search (grid 100, maxshrink 0.8, norm 2.4), with optional per-column weights (cols,).
    The search is coarse to fine: shrink steps k that are multiples of strides[0] first, then
    around each row's best the steps strides[1] apart, and so on (strides=(1,) is the exhaustive
    search; the default evaluates 17 of the 81 factors). p = 1 is always a candidate and ties keep
    the earlier candidate, so no row's error is above find_params'."""
    if not 0 <= maxshrink < 1:
        raise ValueError(f"maxshrink must be in [0, 1), got {maxshrink!r}")
    if steps < 1 or norm <= 0 or not strides or strides[-1] != 1 or any(a % b for a, b in zip(strides, strides[1:])):
        raise ValueError(f"steps must be >= 1, norm > 0 and strides decreasing multiples ending in 1, got steps={steps!r}, norm={norm!r}, strides={strides!r}")
    W = W.float()  # (rows, cols)
    w = None if weights is None else weights.float().to(W.device)  # (cols,)
    xmin, xmax = _min_max(W, grid)  # (rows,)
    last = int(maxshrink * steps)  # candidates are p = 1 - k/steps for k = 0..last

    def error(k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Row errors and grid parameters for shrink steps k (rows,)."""
        p = 1 - k / steps
        scale, zero = _range_params(p * xmin, p * xmax, grid)
        # q - zero = clamp(round(w / scale), -zero, maxq - zero) for an integer zero (as in quantize).
        D = torch.div(W, scale[:, None]).round_().clamp_(-zero[:, None], grid.maxq - zero[:, None])
        D = D.mul_(scale[:, None]).sub_(W)  # (rows, cols) q - w
        D = D.square_() if norm == 2 else D.abs_().pow_(norm)
        return (D.sum(dim=1) if w is None else D @ w), scale, zero

    best_k = torch.zeros_like(xmax)
    best_err, best_scale, best_zero = error(best_k)

    def consider(k: Tensor) -> None:
        nonlocal best_k, best_err, best_scale, best_zero
        k = k.clamp(0, last)
        err, scale, zero = error(k)
        better = err < best_err  # strict: on a tie the earlier candidate stays
        best_k = torch.where(better, k, best_k)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)

    for k in range(strides[0], last + 1, strides[0]):
        consider(torch.full_like(xmax, k))
    for coarse, fine in zip(strides, strides[1:]):
        center = best_k.clone()
        for offset in range(fine, coarse, fine):
            consider(center - offset)
            consider(center + offset)
    return best_scale, best_zero


def quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes clamp(round(x/scale) + zero, 0, maxq) as float; scale and zero broadcast to x."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (q - zero)


def dequantize_grouped(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """W (rows, cols) fp32 from codes (rows, cols), scales/zeros (n_groups, rows) and g_idx (cols,);
    the one formula behind QuantResult.Q and the packed dequantization, so the two agree bitwise."""
    g = g_idx.long()
    return dequantize(codes.float(), scales.float()[g].T, zeros.float()[g].T)


def group_count(cols: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(cols / group_size)


def check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise ValueError(f"group_size must be a positive number of columns or -1 (one group per row), got {group_size!r}")


def check_weight(W: Tensor) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D (rows, cols) weight, got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError("W has non-finite values (nan or inf); quantize a finite weight")


def rtn(W: Tensor, grid: QuantGrid, group_size: int = -1) -> QuantResult:
    """Round-to-nearest on the same grid and groups as gptq (consecutive groups of group_size
    columns, the last one the remainder; -1 = one group per row)."""
    check_weight(W)
    check_group_size(group_size)
    rows, cols = W.shape
    Wf = W.detach().float()  # (rows, cols)
    size = cols if group_size == -1 else group_size
    n_groups = group_count(cols, group_size)
    scales = torch.empty(n_groups, rows, device=W.device)
    zeros = torch.empty(n_groups, rows, device=W.device)
    for g in range(n_groups):
        scales[g], zeros[g] = find_params(Wf[:, g * size : (g + 1) * size], grid)
    g_idx = (torch.arange(cols, device=W.device) // size).to(torch.int32)
    codes = quantize(Wf, scales[g_idx.long()].T, zeros[g_idx.long()].T, grid.maxq).to(torch.int32)
    Q = dequantize_grouped(codes, scales, zeros, g_idx)  # (rows, cols)
    loss = 0.5 * float(((Wf - Q) ** 2).sum())
    return QuantResult(Q.to(W.dtype), codes, scales, zeros.to(torch.int32), g_idx, grid, group_size, loss)
