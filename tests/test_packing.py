"""GPTQ checkpoint packing: exact round trips, the int32 layout, the v1 zero - 1 convention and v2 true zeros."""
from __future__ import annotations

import pytest
import torch

from compress.quantize.gptq import QuantResult, accumulate_hessian, gptq
from compress.quantize.grid import QuantGrid, rtn
from compress.quantize.packing import dequantize_packed, pack, unpack


def act_order_result(bits: int, sym: bool, group_size: int, cols: int, rows: int = 32) -> QuantResult:
    g = torch.Generator().manual_seed(bits * 1000 + cols + group_size)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(256, cols, generator=g) * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    H = accumulate_hessian(None, 0, X)[0]
    return gptq(W, H, QuantGrid(bits, sym), group_size=group_size, act_order=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size, cols", [(-1, 64), (32, 128), (128, 576)])
def test_round_trip_is_bit_exact(bits, sym, group_size, cols):
    r = act_order_result(bits, sym, group_size, cols)
    if group_size != -1:
        assert not torch.equal(r.g_idx, torch.arange(cols, dtype=torch.int32) // group_size)
    p = pack(r)
    n_groups = r.scales.shape[0]
    assert p.qweight.dtype == p.qzeros.dtype == p.g_idx.dtype == torch.int32 and p.scales.dtype == torch.float16
    assert p.qweight.shape == (cols * bits // 32, 32) and p.qzeros.shape == (n_groups, 32 * bits // 32)
    assert p.scales.shape == (n_groups, 32) and p.bits == bits
    codes, zeros = unpack(p)
    assert torch.equal(codes, r.codes) and torch.equal(zeros, r.zeros)
    assert torch.equal(p.g_idx, r.g_idx) and torch.equal(p.scales.float(), r.scales)
    assert torch.equal(dequantize_packed(p), r.Q)


def test_v2_stores_true_zeros_and_round_trips_a_zero_of_zero():
    """gptq_v2 (what asymmetric grids are written as): each field holds the zero itself, including 0, which v1
    can only store as maxq (read back as 2**bits by kernels that add one without masking)."""
    codes = torch.randint(0, 16, (8, 8), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    zeros = torch.tensor([[0, 1, 4, 15, 5, 9, 0, 6]])
    v2, v1 = pack(hand_result(codes, zeros, 4), v2=True), pack(hand_result(codes, zeros, 4))
    assert v2.v2 and not v1.v2 and torch.equal(v2.qweight, v1.qweight)
    assert v2.qzeros.tolist() == [[0x6095F410]]  # 0,1,4,15,5,9,0,6 from the lowest nibble up
    assert torch.equal(unpack(v2)[1], zeros.to(torch.int32)) and torch.equal(dequantize_packed(v2), dequantize_packed(v1))
    # read as v1, the same words give other zeros: the format flag is what makes them right
    assert not torch.equal(unpack(type(v2)(v2.qweight, v2.qzeros, v2.scales, v2.g_idx, 4))[1], zeros.to(torch.int32))


def test_round_trip_in_bf16():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    r = rtn(W, QuantGrid(4, sym=False), 32)
    out = dequantize_packed(pack(r), dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, r.Q)


def hand_result(codes: torch.Tensor, zeros: torch.Tensor, bits: int) -> QuantResult:
    rows, cols = codes.shape
    scales = torch.ones(1, rows)
    g_idx = torch.zeros(cols, dtype=torch.int32)
    Q = scales[0][:, None] * (codes - zeros[0][:, None]).float()
    return QuantResult(Q, codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx, QuantGrid(bits, sym=False), -1, 0.0)


def test_four_bit_layout_by_hand():
    # Input column c goes to nibble c of the word, lowest bits first; output row r is qweight column r.
    codes = torch.zeros(8, 8, dtype=torch.int32)
    codes[0] = torch.arange(8)  # 0..7   -> 0x76543210
    codes[1] = torch.arange(8, 16)  # 8..15 -> 0xFEDCBA98, negative as int32
    codes[2, 1] = 15  # -> 0x000000F0
    zeros = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    p = pack(hand_result(codes, zeros, 4))
    assert p.qweight.shape == (1, 8) and p.qzeros.shape == (1, 1)
    assert p.qweight[0, :3].tolist() == [0x76543210, 0xFEDCBA98 - 2**32, 0xF0]
    assert p.qweight[0, 3:].tolist() == [0] * 5
    # v1 stores zero - 1 per field: 2,0,3,0,4,8,1,5 from the lowest nibble up.
    assert p.qzeros.tolist() == [[0x51840302]]
    codes_back, zeros_back = unpack(p)
    assert torch.equal(codes_back, codes) and torch.equal(zeros_back, zeros.to(torch.int32))


def test_sym_zeros_are_the_classic_constants():
    r = rtn(torch.randn(32, 64), QuantGrid(4, sym=True), 32)
    assert torch.all(pack(r).qzeros == 0x77777777)  # zero 8, stored 7 in every nibble
    r8 = rtn(torch.randn(32, 64), QuantGrid(8, sym=True), 32)
    assert torch.all(pack(r8).qzeros == 0x7F7F7F7F)  # zero 128, stored 127 in every byte


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_zeros_match_gptqmodel_word_subtraction(bits):
    # GPTQModel's convert_gptq_v2_to_v1_format_module subtracts one per field as a word constant
    # from the packed true zeros; for zeros >= 1 no field borrows and the two agree.
    per_word = 32 // bits
    one_per_field = sum(1 << (bits * j) for j in range(per_word))
    zeros = torch.randint(1, 2**bits, (3, 32), generator=torch.Generator().manual_seed(bits))
    packed = pack(hand_result(torch.zeros(32, 32 // per_word * per_word, dtype=torch.int32), zeros, bits))
    v2 = [[sum(int(zeros[g, c * per_word + j]) << (bits * j) for j in range(per_word)) for c in range(32 // per_word)] for g in range(3)]
    v1 = [[(w - one_per_field) % 2**32 for w in row] for row in v2]
    v1 = [[w - 2**32 if w >= 2**31 else w for w in row] for row in v1]
    assert packed.qzeros.tolist() == v1


def test_asym_zero_of_zero_round_trips():
    zeros = torch.tensor([[0, 15, 1, 0, 7, 0, 2, 3]])
    p = pack(hand_result(torch.zeros(8, 8, dtype=torch.int32), zeros, 4))
    # stored (zero - 1) mod 16 from the lowest nibble up: F,E,0,F,6,F,1,2 (a zero of 0 wraps to 15)
    assert p.qzeros.tolist() == [[0x21F6F0EF]]
    assert torch.equal(unpack(p)[1], zeros.to(torch.int32))


def gptqmodel_pack_3bit(int_weight: list[list[int]]) -> list[list[int]]:
    """GPTQModel's 3-bit qweight loop (PackableQuantLinear.pack_original, gptqmodel/nn_modules/qlinear/
    __init__.py @ f4c327a), transcribed with Python ints: int_weight is (in, out), the result (in*3/32, out)."""
    n, m = len(int_weight), len(int_weight[0])
    qweight = [[0] * m for _ in range(n * 3 // 32)]
    i = row = 0
    while row < len(qweight):
        for o in range(m):
            for j in range(i, i + 10):
                qweight[row][o] |= int_weight[j][o] << (3 * (j - i))
            qweight[row][o] |= int_weight[i + 10][o] << 30
            qweight[row + 1][o] |= (int_weight[i + 10][o] >> 2) & 1
            for j in range(i + 11, i + 21):
                qweight[row + 1][o] |= int_weight[j][o] << (3 * (j - i - 11) + 1)
            qweight[row + 1][o] |= int_weight[i + 21][o] << 31
            qweight[row + 2][o] |= (int_weight[i + 21][o] >> 1) & 0x3
            for j in range(i + 22, i + 32):
                qweight[row + 2][o] |= int_weight[j][o] << (3 * (j - i - 22) + 2)
        i += 32
        row += 3
    return [[(w & 0xFFFFFFFF) - 2**32 if w & 0x80000000 else w & 0xFFFFFFFF for w in r] for r in qweight]


def test_three_bit_layout_matches_gptqmodel():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (32, 64), generator=g, dtype=torch.int32)  # (rows, cols)
    zeros = torch.randint(1, 8, (2, 32), generator=g)
    r = hand_result(codes, zeros[:1], 3)
    p = pack(r)
    assert p.qweight.tolist() == gptqmodel_pack_3bit(codes.T.tolist())
    # qzeros use the same stream along the output dim (the numpy loop in pack_original), of zero - 1.
    assert p.qzeros.tolist() == [list(col) for col in zip(*gptqmodel_pack_3bit([[int(z) - 1] for z in zeros[0]]))]
    assert torch.equal(unpack(p)[0], codes)
    ones = pack(hand_result(torch.full((32, 32), 7, dtype=torch.int32), torch.full((1, 32), 7), 3))
    assert ones.qweight.tolist() == [[-1] * 32] * 3  # 32 sevens fill three words exactly


@pytest.mark.parametrize("bits, rows, cols, what", [(4, 12, 64, "rows"), (3, 16, 64, "rows"), (3, 32, 48, "cols"), (2, 32, 24, "cols")])
def test_unpackable_shapes_raise(bits, rows, cols, what):
    r = rtn(torch.randn(rows, cols), QuantGrid(bits), -1)
    with pytest.raises(ValueError, match=f"needs {what}"):
        pack(r)
