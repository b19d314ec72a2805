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
    dequantize_grouped,
    find_params,
    find_params_mse,
    group_count,
)

__all__ = ["SCALE_SEARCHES", "QuantResult", "accumulate_hessian", "gptq", "gptq_shared"]

# How a group's scale is chosen: "minmax" spans the group's range; "mse" shrinks it to minimize
# sum |w - q|^2.4 over each row (IST-DASLab quant.py's search); "mse-hessian" minimizes the
# greedy GPTQ objective sum (w_j - q_j)^2 / d_j^2 with d_j = Hinv_jj of the column's Cholesky factor.
SCALE_SEARCHES = ("minmax", "mse", "mse-hessian")


def accumulate_hessian(H: Tensor | None, n: int, X: Tensor) -> tuple[Tensor, int]:
    """Running H = 2/n * sum x x^T over all rows of X (..., cols) seen so far (GPTQ's update rule);
    returns a new (H, n), leaving the given H untouched. fp32, as the reference: the dampening
    GPTQ adds dwarfs fp32 rounding in H, and fp64 matmuls are slow on GPUs. (A bf16 X^T X, rounded
    to bf16 once per batch, does not: on SmolLM2-135M's first o_proj its error pushed the smallest
    eigenvalue to -3.8e-4, far below the damping of 1.6e-5.)"""
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
    beta, alpha = n / (n + m), 2 / (n + m)
    # X^T X is symmetric: compute the upper band of each row band (diagonal block and right of it)
    # and mirror it. On 2 CPU cores (AMD EPYC) 2 bands are ~18% faster than one full product at
    # 576 columns; 4 bands ~30% at 1536 (more, smaller products lose to matmul overheads).
    bands = 1 if cols < 512 else 2 if cols < 1024 else 4
    if bands == 1:
        return torch.addmm(H.float(), X.T, X, beta=beta, alpha=alpha), n + m  # (cols, cols)
    H = H.float() * beta  # (cols, cols), a new tensor
    edges = [cols * i // bands for i in range(bands + 1)]
    for a, b in zip(edges, edges[1:]):
        H[a:b, a:].addmm_(X[:, a:b].T, X[:, a:], alpha=alpha)
        H[b:, a:b] = H[a:b, b:].T
    return H, n + m


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U: row i of it, divided by
    its diagonal, is the OBS update for the columns after i once columns < i are fixed.

    The references compute cholesky(cholesky_inverse(cholesky(H)), upper=True): three O(cols^3)
    steps. With J the reversal of the columns, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J)
    with J L^-1 J upper triangular with a positive diagonal, so by uniqueness it is U: one
    Cholesky and one triangular inverse. fp64: cheap at these sizes, and outlier features give H a
    dynamic range where fp32 factorizations can fail."""
    H = H.to(torch.float64, copy=True)  # (cols, cols)
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        raise ValueError(
            f"the dampened Hessian is not positive definite (Cholesky failed, damp={damp}); increase damp (e.g. 0.1) "
            "or calibrate on more tokens"
        )
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)  # (cols, cols) lower
    return Linv.flip(0, 1).float()


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
    scale_search: str = "minmax",
) -> QuantResult:
    """Quantize W (rows, cols) given the Hessian H (cols, cols) of its layer's inputs.

    Follows IST-DASLab/gptq `fasterquant` and GPTQModel `GPTQ.quantize`: dead columns (H_ii == 0)
    are zeroed, H is dampened, columns are visited in act order (descending H_ii) if asked, with
    lazy batch updates of block_size columns. Grid parameters of a group are found from the
    already-updated weights when its first column is reached; with static_groups they are found
    up front from the original weights of each consecutive group instead. `scale_search` picks
    how (SCALE_SEARCHES).
    One deliberate difference: a lazy block never crosses a group start, so a group's parameters
    see every earlier update. The references cut blocks at multiples of block_size only and so
    read stale weights for a group starting inside a block (group_size < block_size); here the
    result does not depend on block_size (up to float rounding).
    Runs in fp32 on W's device; W and H are not modified.
    """
    result, _ = _gptq(W, H, grid, group_size, damp, act_order, block_size, static_groups, scale_search)
    return result


def gptq_shared(Ws: list[Tensor], H: Tensor, grid: QuantGrid, **options) -> list[QuantResult]:
    """GPTQ for several weights (rows_k, cols) that read the same input, so share H (q/k/v; gate/up).

    GPTQ treats rows independently given H (each row's error feedback stays in that row, and
    grid parameters are per row), so one pass over the stacked rows gives each weight what
    `gptq(W_k, H, ...)` gives it, up to float rounding, with one Cholesky and one column loop.
    `options` are gptq's keyword arguments."""
    if not Ws:
        raise ValueError("gptq_shared needs at least one weight")
    for W in Ws:
        check_weight(W)
    if len({W.shape[1] for W in Ws}) != 1:
        raise ValueError(f"weights sharing a Hessian need the same number of columns, got {[tuple(W.shape) for W in Ws]}")
    sizes = [W.shape[0] for W in Ws]
    keys = ("group_size", "damp", "act_order", "block_size", "static_groups", "scale_search")
    unknown = set(options) - set(keys)
    if unknown:
        raise TypeError(f"unknown gptq options: {sorted(unknown)}")
    defaults = dict(group_size=128, damp=0.01, act_order=False, block_size=128, static_groups=False, scale_search="minmax")
    args = [options.get(k, defaults[k]) for k in keys]
    cols, total = Ws[0].shape[1], sum(sizes)
    device = Ws[0].device
    # The outputs, filled pass by pass. Copies, not views: checkpoints refuse tensors that share storage.
    n_groups = group_count(cols, args[0])
    Q = [torch.empty(n, cols, dtype=W.dtype, device=device) for n, W in zip(sizes, Ws)]
    codes = [torch.empty(n, cols, dtype=torch.int32, device=device) for n in sizes]
    scales = [torch.empty(n_groups, n, device=device) for n in sizes]
    zeros = [torch.empty(n_groups, n, dtype=torch.int32, device=device) for n in sizes]
    losses = [0.0] * len(Ws)
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    shared: dict = {}  # what only H decides (order, Cholesky factor), computed once for every pass
    g_idx = None
    for a in range(0, total, ROWS_PER_PASS):
        b = min(a + ROWS_PER_PASS, total)
        # Rows a:b of the stacked weights, taken part by part (only this pass's rows are stacked).
        W = torch.cat([Ws[k][max(a, s) - s : min(b, e) - s].detach().float() for k, (s, e) in enumerate(zip(starts, starts[1:])) if s < b and e > a])
        res, row_loss = _gptq(W, H, grid, *args, shared=shared)
        del W
        g_idx = res.g_idx
        for k, (s, e) in enumerate(zip(starts, starts[1:])):
            lo, hi = max(a, s), min(b, e)
            if lo >= hi:
                continue
            Q[k][lo - s : hi - s] = res.Q[lo - a : hi - a]
            codes[k][lo - s : hi - s] = res.codes[lo - a : hi - a]
            scales[k][:, lo - s : hi - s] = res.scales[:, lo - a : hi - a]
            zeros[k][:, lo - s : hi - s] = res.zeros[:, lo - a : hi - a]
            losses[k] += float(row_loss[lo - a : hi - a].sum())
        del res
    return [QuantResult(Q[k], codes[k], scales[k], zeros[k], g_idx.clone(), grid, args[0], losses[k]) for k in range(len(Ws))]


# Rows quantized in one pass of the column loop: rows are independent given H, so larger groups (a 70B model's
# gate/up are 57k x 8k) go in passes that share H's factorization, and the working copies stay bounded.
ROWS_PER_PASS = 4096


def _group_params(W: Tensor, grid: QuantGrid, scale_search: str, d: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero (rows,) for the group W (rows, size); d (size,) its columns' Hinv diagonal."""
    if scale_search == "minmax":
        return find_params(W, grid)
    if scale_search == "mse":
        return find_params_mse(W, grid)
    return find_params_mse(W, grid, weights=d.pow(-2), norm=2.0)


def _gptq(W, H, grid, group_size, damp, act_order, block_size, static_groups, scale_search, shared: dict | None = None) -> tuple[QuantResult, Tensor]:
    """gptq, also returning each row's share of the loss (rows,). `shared` keeps what H alone decides (dead
    columns, visiting order, the Cholesky factor) for the next call with the same H."""
    if not shared:
        _check_inputs(W, H, group_size, damp, block_size)
    else:
        check_weight(W)
    if scale_search not in SCALE_SEARCHES:
        raise ValueError(f"scale_search must be one of {SCALE_SEARCHES}, got {scale_search!r}")
    rows, cols = W.shape
    maxq = grid.maxq
    dtype = W.dtype
    W = W.detach().to(torch.float32, copy=True)  # (rows, cols)
    if not shared:
        H = H.detach().to(W.device, torch.float32, copy=True)  # (cols, cols)
        # A column no calibration input ever excites cannot change the output: zero it and give H a
        # unit diagonal there so it stays invertible.
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
        H = H[perm][:, perm]
        found = {"dead": dead, "perm": perm, "Hinv": _inverse_cholesky(H, damp)}  # (cols, cols) upper triangular
        del H
        if shared is not None:
            shared.update(found)
    else:
        found = shared
    dead, perm, Hinv = found["dead"], found["perm"], found["Hinv"]
    W[:, dead] = 0

    size = cols if group_size == -1 else group_size
    n_groups = group_count(cols, group_size)
    scales = torch.empty(n_groups, rows, device=W.device)
    zeros = torch.empty(n_groups, rows, device=W.device)
    static = static_groups and group_size != -1
    invperm = torch.argsort(perm)  # (cols,) each original column's place in the visiting order
    if static:
        # Each original column's weight in the greedy objective is its diagonal of the Cholesky factor in the
        # visiting order (what the column loop divides its error by), so "mse-hessian" applies here too.
        d_orig = Hinv.diagonal()[invperm]  # (cols,)
        for g in range(n_groups):
            scales[g], zeros[g] = _group_params(W[:, g * size : (g + 1) * size], grid, scale_search, d_orig[g * size : (g + 1) * size])

    # Transposed working copy: column j of W is the contiguous row Wt[j], so the column loop
    # below reads and updates contiguous memory.
    Wt = W[:, perm].T.contiguous()  # (cols, rows)
    del W
    # Group of each column in the visiting order: consecutive in that order, or for static groups
    # the group its original column belongs to.
    g_perm = (perm if static else torch.arange(cols, device=Wt.device)) // size  # (cols,)

    d_all = Hinv.diagonal()  # (cols,)
    codes_t = torch.empty(cols, rows, device=Wt.device)
    row_loss = torch.zeros(rows, device=Wt.device)
    g_list = g_perm.tolist()
    i1 = 0
    while i1 < cols:
        i2 = min(i1 + block_size, cols, (i1 // size + 1) * size)
        if not static and i1 % size == 0:
            # Every update from the columns before i1 has been applied to W[:, i1:] at this point.
            scales[g_list[i1]], zeros[g_list[i1]] = _group_params(Wt[i1 : i1 + size].T, grid, scale_search, d_all[i1 : i1 + size])
        W1 = Wt[i1:i2].clone()  # (count, rows)
        Err1 = torch.empty_like(W1)  # (count, rows)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (count, count)
        # A block lies inside one group (static groups aside). In the loop, t = q - zero: with an
        # integer zero, clamp(round(w/s) + z, 0, maxq) - z == clamp(round(w/s), -z, maxq - z), and
        # the dequantized value is s * t; zero is added back to the codes after the loop.
        g = g_list[i1]
        scale, lo, hi = scales[g], -zeros[g], maxq - zeros[g]  # (rows,)
        for i in range(i2 - i1):
            if static:
                g = g_list[i1 + i]
                scale, lo, hi = scales[g], -zeros[g], maxq - zeros[g]
            w = W1[i]  # (rows,) column i1 + i
            t = codes_t[i1 + i]
            torch.div(w, scale, out=t).round_().clamp_(lo, hi)
            err = Err1[i]
            torch.addcmul(w, t, scale, value=-1, out=err).div_(Hinv1[i, i])  # (rows,) (w - q) / d
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
        row_loss += Err1.square().sum(dim=0) / 2
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
        i1 = i2

    del Wt
    codes = codes_t.T + zeros[g_perm].T  # (rows, cols): t + zero
    del codes_t
    codes = codes[:, invperm].to(torch.int32)
    g_idx = g_perm[invperm].to(torch.int32)  # g_idx[perm[j]] = g_perm[j]
    Q = dequantize_grouped(codes, scales, zeros, g_idx)  # (rows, cols)
    loss = float(row_loss.sum())
    return QuantResult(Q.to(dtype), codes, scales, zeros.to(torch.int32), g_idx, grid, group_size, loss), row_loss
