"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): one linear layer's weight quantized column by column with second-order error feedback."""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import (
    QuantGrid,
    QuantResult,
    check_group_size,
    check_weight,
    dequantize,
    dequantize_grouped,
    find_params,
    group_count,
    quantize,
)

__all__ = ["QuantResult", "accumulate_hessian", "gptq"]


def accumulate_hessian(H: Tensor | None, n: int, X: Tensor) -> tuple[Tensor, int]:
    """Running H = 2/n * sum x x^T over all rows of X (..., cols) seen so far (GPTQ's update rule);
    returns a new (H, n), leaving the given H untouched. fp32, as the reference: the dampening
    GPTQ adds dwarfs fp32 rounding in H, and fp64 matmuls are slow on GPUs."""
    X = X.detach().reshape(-1, X.shape[-1]).float()  # (tokens, cols)
    cols = X.shape[1]
    if H is None:
        H = torch.zeros(cols, cols, device=X.device)
    elif H.shape != (cols, cols):
        raise ValueError(f"H is {tuple(H.shape)} but X has {cols} features; expected H of shape ({cols}, {cols})")
    m = X.shape[0]
    if m == 0:
        return H, n
    # Rescaling the old mean instead of summing then dividing keeps H at the data's scale throughout.
    H = torch.addmm(H.float(), X.T, X, beta=n / (n + m), alpha=2 / (n + m))  # (cols, cols)
    return H, n + m


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1: row i of it, divided by its
    diagonal, is the OBS update for the columns after i once columns < i are fixed."""
    H = H.clone()  # (cols, cols)
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise ValueError(
            f"the dampened Hessian is not positive definite (Cholesky failed, damp={damp}); increase damp (e.g. 0.1) "
            "or calibrate on more tokens"
        )
    return Hinv


def _check_inputs(W: Tensor, H: Tensor, group_size: int, damp: float, block_size: int) -> None:
    check_weight(W)
    check_group_size(group_size)
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H has non-finite values (nan or inf); check the calibration activations")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0 (a fraction of the mean Hessian diagonal), got {damp!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")


def gptq(
    W: Tensor,
    H: Tensor,
    grid: QuantGrid,
    *,
    group_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    static_groups: bool = False,
) -> QuantResult:
    """Quantize W (rows, cols) given the Hessian H (cols, cols) of its layer's inputs.

    Follows IST-DASLab/gptq `fasterquant` and GPTQModel `GPTQ.quantize`: dead columns (H_ii == 0)
    are zeroed, H is dampened, columns are visited in act order (descending H_ii) if asked, with
    lazy batch updates of block_size columns. Grid parameters of a group are found from the
    already-updated weights when its first column is reached; with static_groups they are found
    up front from the original weights of each consecutive group instead.
    One deliberate difference: a lazy block never crosses a group start, so a group's parameters
    see every earlier update. The references cut blocks at multiples of block_size only and so
    read stale weights for a group starting inside a block (group_size < block_size); here the
    result does not depend on block_size (up to float rounding).
    Runs in fp32 on W's device; W and H are not modified.
    """
    _check_inputs(W, H, group_size, damp, block_size)
    rows, cols = W.shape
    maxq = grid.maxq
    W_orig = W
    W = W.detach().to(torch.float32, copy=True)  # (rows, cols)
    H = H.detach().to(W.device, torch.float32, copy=True)  # (cols, cols)

    # A column no calibration input ever excites cannot change the output: zero it and give H a
    # unit diagonal there so it stays invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    size = cols if group_size == -1 else group_size
    n_groups = group_count(cols, group_size)
    scales = torch.empty(n_groups, rows, device=W.device)
    zeros = torch.empty(n_groups, rows, device=W.device)
    static = static_groups and group_size != -1
    if static:
        for g in range(n_groups):
            scales[g], zeros[g] = find_params(W[:, g * size : (g + 1) * size], grid)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    # Group of each column in the visiting order: consecutive in that order, or for static groups
    # the group its original column belongs to.
    g_perm = (perm if static else torch.arange(cols, device=W.device)) // size  # (cols,)

    Hinv = _inverse_cholesky(H, damp)  # (cols, cols) upper triangular
    codes = torch.empty(rows, cols, device=W.device)
    loss = torch.zeros((), device=W.device)
    g_list = g_perm.tolist()
    i1 = 0
    while i1 < cols:
        i2 = min(i1 + block_size, cols, (i1 // size + 1) * size)
        if not static and i1 % size == 0:
            # Every update from the columns before i1 has been applied to W[:, i1:] at this point.
            scales[g_list[i1]], zeros[g_list[i1]] = find_params(W[:, i1 : i1 + size], grid)
        W1 = W[:, i1:i2].clone()  # (rows, count)
        Err1 = torch.empty_like(W1)  # (rows, count)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (count, count)
        for i in range(i2 - i1):
            g = g_list[i1 + i]
            w = W1[:, i]  # (rows,)
            d = Hinv1[i, i]
            q = quantize(w, scales[g], zeros[g], maxq)
            codes[:, i1 + i] = q
            err = (w - dequantize(q, scales[g], zeros[g])) / d  # (rows,)
            loss += (err**2).sum() / 2
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
        i1 = i2

    invperm = torch.argsort(perm)
    codes = codes[:, invperm].to(torch.int32)
    g_idx = g_perm[invperm].to(torch.int32)  # g_idx[perm[j]] = g_perm[j]
    Q = dequantize_grouped(codes, scales, zeros, g_idx)  # (rows, cols)
    return QuantResult(Q.to(W_orig.dtype), codes, scales, zeros.to(torch.int32), g_idx, grid, group_size, float(loss))
