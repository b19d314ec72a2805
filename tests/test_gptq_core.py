"""The GPTQ core on CPU: the grid, GPTQ against round-to-nearest, act-order groups, bad input."""
from __future__ import annotations

import pytest
import torch

from compress.quantize.gptq import accumulate_hessian, gptq, gptq_shared
from compress.quantize.grid import QuantGrid, dequantize, find_params, find_params_mse, quantize, rtn


def correlated_inputs(tokens: int = 2048, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """X = Z A: a random mixing makes the features correlate, the case GPTQ's feedback exploits."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, cols, generator=g)
    A = torch.randn(cols, cols, generator=g) / cols**0.5
    return Z @ A


def weight(rows: int = 64, cols: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def hessian(X: torch.Tensor) -> torch.Tensor:
    return accumulate_hessian(None, 0, X)[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_find_params_grid(bits, sym):
    grid = QuantGrid(bits, sym)
    W = weight(16, 64) * torch.linspace(0.01, 3, 16)[:, None]
    W[3] = 0
    W[5] = W[5].abs()  # all nonnegative: the symmetric grid must still cover it
    scale, zero = find_params(W, grid)
    assert scale.shape == zero.shape == (16,)
    assert torch.equal(scale.half().float(), scale), "scales must be exact in fp16 (the checkpoint dtype)"
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= grid.maxq
    if sym:
        assert torch.all(zero == 2 ** (bits - 1))
    assert scale[3] == 1
    q = quantize(W, scale[:, None], zero[:, None], grid.maxq)
    assert q.min() >= 0 and q.max() <= grid.maxq and torch.equal(q, q.round())
    Q = dequantize(q, scale[:, None], zero[:, None])
    assert torch.all(Q[3] == 0)
    lo, hi = (scale * (0 - zero))[:, None], (scale * (grid.maxq - zero))[:, None]
    in_range = (W >= lo) & (W <= hi)
    err = (Q - W).abs()
    assert torch.all(err[in_range] <= (scale[:, None] / 2).expand_as(W)[in_range] * (1 + 1e-6))
    # Out of range only by the half step a rounded zero point leaves (and the top half step of the
    # sym grid), widened by the fp16 rounding of the scale (relative 2**-11 over maxq steps).
    assert torch.all(err <= scale[:, None] * (0.5 + grid.maxq * 2**-11))


@pytest.mark.parametrize("group_size, cols", [(-1, 256), (32, 256), (48, 256), (128, 200)])
@pytest.mark.parametrize("bits, sym", [(4, True), (3, False)])
def test_identity_hessian_equals_rtn(group_size, cols, bits, sym):
    W = weight(32, cols)
    grid = QuantGrid(bits, sym)
    a = gptq(W, torch.eye(cols), grid, group_size=group_size, block_size=64)
    b = rtn(W, grid, group_size)
    n_groups = 1 if group_size == -1 else -(-cols // group_size)
    assert a.scales.shape == (n_groups, 32) and a.zeros.shape == (n_groups, 32)
    for name in ("codes", "scales", "zeros", "g_idx", "Q"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.codes.dtype == a.zeros.dtype == a.g_idx.dtype == torch.int32


def output_error(X, W, Q):
    return float((X @ (W - Q).T).norm())


@pytest.mark.parametrize("bits, group_size", [(4, 128), (3, 128), (3, -1)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, act_order):
    X, W = correlated_inputs(), weight()
    grid = QuantGrid(bits)
    a = gptq(W, hessian(X), grid, group_size=group_size, act_order=act_order)
    b = rtn(W, grid, group_size)
    ratio = output_error(X, W, a.Q) / output_error(X, W, b.Q)
    assert ratio < 0.9, f"GPTQ output error is {ratio:.3f} of RTN's"


@pytest.mark.parametrize("act_order", [False, True])
def test_loss_is_the_dampened_objective(act_order):
    # The sum of GPTQ's per-column OBS errors is exactly 1/2 tr(D H D^T) for D = W - Q, H dampened.
    X, W = correlated_inputs(512, 128), weight(32, 128)
    H = hessian(X)
    r = gptq(W, H, QuantGrid(4), group_size=32, damp=0.05, act_order=act_order)
    Hd = H + 0.05 * H.diag().mean() * torch.eye(128)
    D = (W - r.Q).double()
    assert r.loss == pytest.approx(float(0.5 * ((D @ Hd.double()) * D).sum()), rel=1e-4)


def test_result_does_not_depend_on_block_size():
    # Lazy blocks never cross a group start, so every group's grid sees all earlier updates.
    X, W = correlated_inputs(512, 128), weight(32, 128)
    H = hessian(X)
    ref = gptq(W, H, QuantGrid(4), group_size=32, act_order=True, block_size=128)
    for block_size in (1, 7, 48):
        r = gptq(W, H, QuantGrid(4), group_size=32, act_order=True, block_size=block_size)
        assert torch.equal(r.codes, ref.codes) and torch.equal(r.scales, ref.scales)
        assert r.loss == pytest.approx(ref.loss, rel=1e-5)


def skewed_hessian(cols: int) -> torch.Tensor:
    # Feature scales spread over two decades so act order is a thorough shuffle.
    g = torch.Generator().manual_seed(2)
    X = torch.randn(1024, cols, generator=g) * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    return hessian(X)


@pytest.mark.parametrize("group_size, cols", [(128, 576), (32, 96)])
def test_act_order_groups(group_size, cols):
    W, H = weight(32, cols), skewed_hessian(cols)
    r = gptq(W, H, QuantGrid(4), group_size=group_size, act_order=True)
    n_groups = -(-cols // group_size)
    perm = torch.argsort(torch.diag(H), descending=True)
    assert not torch.equal(perm, torch.arange(cols))
    invperm = torch.argsort(perm)
    assert torch.equal(r.g_idx, (torch.arange(cols) // group_size)[invperm].to(torch.int32))
    expected = torch.empty(cols, dtype=torch.int32)
    expected[perm] = (torch.arange(cols) // group_size).to(torch.int32)  # g_idx[perm[i]] = i // group_size
    assert torch.equal(r.g_idx, expected)
    assert r.g_idx.min() == 0 and r.g_idx.max() == n_groups - 1
    sizes = torch.bincount(r.g_idx.long(), minlength=n_groups).tolist()
    assert sizes == [group_size] * (cols // group_size) + ([cols % group_size] if cols % group_size else [])
    assert r.scales.shape == r.zeros.shape == (n_groups, 32)
    for c in range(cols):
        g = r.g_idx[c]
        assert torch.equal(r.Q[:, c], r.scales[g] * (r.codes[:, c] - r.zeros[g]).float())
    assert r.codes.min() >= 0 and r.codes.max() <= 15

    plain = gptq(W, H, QuantGrid(4), group_size=group_size)
    assert torch.equal(plain.g_idx, (torch.arange(cols) // group_size).to(torch.int32))
    static = gptq(W, H, QuantGrid(4), group_size=group_size, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx, plain.g_idx)
    first = find_params(W[:, :group_size], QuantGrid(4))
    assert torch.equal(static.scales[0], first[0]) and torch.equal(static.zeros[0], first[1].to(torch.int32))


def test_dead_columns_and_inputs_untouched():
    X, W = correlated_inputs(512, 64), weight(32, 64)
    X[:, [3, 40]] = 0
    H = hessian(X)
    W_before, H_before = W.clone(), H.clone()
    r = gptq(W, H, QuantGrid(4), group_size=32, act_order=True)
    assert torch.equal(W, W_before) and torch.equal(H, H_before)
    assert torch.isfinite(r.Q).all() and torch.isfinite(torch.tensor(r.loss))
    assert torch.all(r.Q[:, [3, 40]] == 0)


def test_dtype_follows_w():
    # A bf16 weight is quantized in fp32: the same codes and grid as its fp32 copy gets, and Q is that
    # copy's dequantized weight rounded to bf16 (not a bf16 computation, not a float32 tensor).
    X, W = correlated_inputs(512, 64), weight(32, 64).to(torch.bfloat16)
    H = hessian(X)
    r = gptq(W, H, QuantGrid(4), group_size=32, act_order=True)
    ref = gptq(W.float(), H, QuantGrid(4), group_size=32, act_order=True)
    assert r.Q.dtype == torch.bfloat16 and r.scales.dtype == torch.float32
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(r, name), getattr(ref, name)), name
    assert torch.equal(r.Q, ref.Q.to(torch.bfloat16))
    g = r.g_idx.long()
    dequantized = r.scales[g].T * (r.codes - r.zeros[g].T).float()  # (rows, cols) from the codes and the grid
    assert torch.equal(r.Q, dequantized.to(torch.bfloat16))
    assert r.loss == pytest.approx(ref.loss, rel=1e-6)


def test_bad_inputs():
    W, H = weight(8, 32), torch.eye(32)
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8"):
        gptq(W, H, QuantGrid(5))
    with pytest.raises(ValueError, match=r"H must be \(32, 32\)"):
        gptq(W, torch.eye(31), QuantGrid(4))
    for bad in (0, -2):
        with pytest.raises(ValueError, match="group_size must be"):
            gptq(W, H, QuantGrid(4), group_size=bad)
        with pytest.raises(ValueError, match="group_size must be"):
            rtn(W, QuantGrid(4), bad)
    W_nan = W.clone()
    W_nan[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gptq(W_nan, H, QuantGrid(4))
    with pytest.raises(ValueError, match="increase damp"):
        gptq(W, -torch.eye(32), QuantGrid(4))
    with pytest.raises(ValueError, match="damp"):
        gptq(W, H, QuantGrid(4), damp=-0.1)


def test_accumulate_hessian_in_batches():
    X = correlated_inputs(300, 24)
    H, n = None, 0
    for batch in (X[:7], X[7:107].reshape(4, 25, 24), X[107:107], X[107:]):
        before = None if H is None else H.clone()
        H_new, n = accumulate_hessian(H, n, batch)
        if before is not None:
            assert torch.equal(H, before), "the given H must not be modified"
        H = H_new
    assert n == 300
    torch.testing.assert_close(H, 2 / 300 * X.T @ X, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        accumulate_hessian(H, n, torch.randn(4, 23))


@pytest.mark.parametrize("cols", [300, 600, 1030])  # 1, 2 and 4 row bands
def test_accumulate_hessian_is_symmetric_and_exact_for_every_band_count(cols):
    # From 512 columns on only the upper band of each row band is computed and mirrored.
    X = correlated_inputs(700, cols)
    H, n = accumulate_hessian(None, 0, X[:250])
    H, n = accumulate_hessian(H, n, X[250:])
    assert n == 700
    if cols >= 512:  # the part below the first band is a mirror, exactly
        assert torch.equal(H[cols // 2 :, : cols // 4], H[: cols // 4, cols // 2 :].T)
    want = 2 / 700 * (X.double().T @ X.double())
    torch.testing.assert_close(H.double(), want, rtol=1e-4, atol=1e-5 * float(want.diagonal().mean()))


def group_error(W, scale, zero, grid, norm=2.0, weights=None):
    Q = dequantize(quantize(W, scale[:, None], zero[:, None], grid.maxq), scale[:, None], zero[:, None])
    err = (Q - W).abs().pow(norm)
    return (err if weights is None else err * weights).sum(dim=1)  # (rows,)


@pytest.mark.parametrize("bits, sym", [(4, True), (3, False), (2, True), (8, False)])
def test_mse_search_never_worse_than_min_max(bits, sym):
    grid = QuantGrid(bits, sym)
    W = weight(64, 128)
    W[:, 7] *= 8  # an outlier column: clipping it pays off for most rows
    W[3] = 0
    W[5] = W[5].abs()
    w = torch.rand(128, generator=torch.Generator().manual_seed(3)) + 0.1
    for norm, weights in [(2.4, None), (2.0, w)]:
        base = group_error(W, *find_params(W, grid), grid, norm, weights)
        scale, zero = find_params_mse(W, grid, weights=weights, norm=norm)
        assert torch.equal(scale.half().float(), scale) and torch.equal(zero, zero.round())
        if sym:
            assert torch.all(zero == 2 ** (bits - 1))
        err = group_error(W, scale, zero, grid, norm, weights)
        assert torch.all(err <= base * (1 + 1e-6)), "MSE search increased a row's error"
        if bits <= 4:
            assert err.sum() < 0.97 * base.sum(), "MSE search found nothing better than min-max on outlier rows"
        assert scale[3] == 1


def test_mse_search_bad_input():
    with pytest.raises(ValueError, match="maxshrink"):
        find_params_mse(weight(4, 8), QuantGrid(4), maxshrink=1.0)
    with pytest.raises(ValueError, match="scale_search"):
        gptq(weight(4, 8), torch.eye(8), QuantGrid(4), group_size=8, scale_search="best")


@pytest.mark.parametrize("scale_search", ["mse", "mse-hessian"])
def test_identity_hessian_mse_equals_rtn_with_mse_params(scale_search):
    # With H = I there is no error feedback and d = 1 for every column, so each group gets the
    # plain MSE-searched grid (norm 2.4 for "mse", unweighted norm 2 for "mse-hessian").
    W, grid, size = weight(32, 256), QuantGrid(4), 64
    r = gptq(W, torch.eye(256), grid, group_size=size, damp=0.0, scale_search=scale_search)
    norm = 2.4 if scale_search == "mse" else 2.0
    for g in range(256 // size):
        scale, zero = find_params_mse(W[:, g * size : (g + 1) * size], grid, norm=norm)
        assert torch.equal(r.scales[g], scale) and torch.equal(r.zeros[g], zero.to(torch.int32))


def test_static_groups_weigh_each_column_by_its_own_hessian_diagonal():
    # Static groups with "mse-hessian": each natural-order group's grid is searched up front, every column
    # weighted by its diagonal of the Cholesky factor in the act-order visiting order. With a diagonal H that
    # factor is diag(1 / sqrt(H_jj + damp)): a group whose columns carry very different weights gets the
    # weighted search's grid, not the unweighted one.
    W, grid, size = weight(16, 64), QuantGrid(3), 32
    h = torch.ones(64)
    h[::2] = 100.0  # even columns matter 100x more
    H = torch.diag(h)
    r = gptq(W, H, grid, group_size=size, damp=0.0, act_order=True, static_groups=True, scale_search="mse-hessian")
    assert torch.equal(r.g_idx, (torch.arange(64) // size).to(torch.int32))  # sequential: no permutation to export
    for g in range(64 // size):
        cols = slice(g * size, (g + 1) * size)
        scale, zero = find_params_mse(W[:, cols], grid, weights=h[cols], norm=2.0)  # weights = d^-2 = H_jj
        assert torch.allclose(r.scales[g], scale) and torch.equal(r.zeros[g], zero.to(torch.int32))
        plain, _ = find_params_mse(W[:, cols], grid, norm=2.0)
        assert not torch.equal(plain, scale)  # the weighting changed the grid: the test can tell them apart


@pytest.mark.parametrize("scale_search", ["mse", "mse-hessian"])
def test_mse_scale_search_lowers_gptq_output_error(scale_search):
    # Heavy-tailed weights (a few large entries per row) are where clipping the range pays.
    X = correlated_inputs()
    g = torch.Generator().manual_seed(4)
    W = torch.randn(64, 256, generator=g) * (1 + 6 * (torch.rand(64, 256, generator=g) > 0.98))
    H = hessian(X)
    a = gptq(W, H, QuantGrid(3), group_size=64, act_order=True)
    b = gptq(W, H, QuantGrid(3), group_size=64, act_order=True, scale_search=scale_search)
    assert output_error(X, W, b.Q) < 0.97 * output_error(X, W, a.Q)


@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (True, True)])
def test_shared_hessian_matches_separate_gptq(act_order, static_groups):
    X, H = correlated_inputs(512, 128), None
    H = hessian(X)
    Ws = [weight(32, 128, seed=s) for s in (1, 2, 3)]
    Ws[1] = Ws[1][:16]
    opts = dict(group_size=32, act_order=act_order, static_groups=static_groups, scale_search="mse")
    shared = gptq_shared(Ws, H, QuantGrid(4), **opts)
    for W, got in zip(Ws, shared):
        want = gptq(W, H, QuantGrid(4), **opts)
        assert got.Q.shape == W.shape and got.scales.shape == want.scales.shape
        assert torch.equal(got.g_idx, want.g_idx)
        # Stacking changes only float rounding in the updates: codes agree almost everywhere.
        assert (got.codes == want.codes).float().mean() > 0.995
        torch.testing.assert_close(got.Q, want.Q, atol=float(want.scales.max()) * 1.01, rtol=0)
        assert got.loss == pytest.approx(want.loss, rel=1e-2)
    with pytest.raises(ValueError, match="same number of columns"):
        gptq_shared([weight(8, 128), weight(8, 64)], H, QuantGrid(4))


@pytest.mark.parametrize("act_order", [False, True])
def test_rows_in_passes_give_the_one_pass_result(monkeypatch, act_order):
    """Large groups are quantized ROWS_PER_PASS rows at a time with H factorized once; passes that cut through the
    parts (q/k/v here) must give what one pass gives, part by part."""
    import compress.quantize.gptq as core

    H = hessian(correlated_inputs(512, 128))
    Ws = [weight(24, 128, seed=1), weight(8, 128, seed=2), weight(40, 128, seed=3)]
    opts = dict(group_size=32, act_order=act_order, scale_search="mse-hessian")
    one = gptq_shared(Ws, H, QuantGrid(4), **opts)
    monkeypatch.setattr(core, "ROWS_PER_PASS", 13)  # 72 rows in 6 passes, boundaries inside every part
    passes = gptq_shared(Ws, H, QuantGrid(4), **opts)
    for a, b in zip(one, passes):
        assert torch.equal(a.g_idx, b.g_idx) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
        assert (a.codes == b.codes).float().mean() > 0.999
        torch.testing.assert_close(a.Q, b.Q, atol=float(a.scales.max()) * 1.01, rtol=0)
        assert a.loss == pytest.approx(b.loss, rel=1e-4)

