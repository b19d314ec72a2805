"""The GPTQ checkpoint tensors that auto-gptq, GPTQModel, transformers/optimum and vLLM load: qweight, qzeros,
scales, g_idx, and their exact inverse. checkpoint_format "gptq" (v1, zeros stored minus one) for symmetric
grids, "gptq_v2" (true zeros) for asymmetric ones, whose zero of 0 v1 cannot hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .grid import QuantResult, dequantize_grouped

_MASK32 = (1 << 32) - 1

# Bit layout. Codes are a little-endian bit stream along the packed dimension: code k occupies bits
# [k*bits, (k+1)*bits) of the stream, and int32 word j holds stream bits [32j, 32j+32), low bit first.
# For 2/4/8 bits this is GPTQModel's `qweight[row] |= intweight[row * pack_factor + j] << (bits * j)`;
# for 3 bits it is GPTQModel's 10|1|10|1|10 scheme (pack_original / pack_block `_pack_rows_3`,
# gptqmodel/nn_modules/qlinear/__init__.py @ f4c327a): 32 codes fill 3 words, code 10 puts its low
# 2 bits at bits 30-31 of word 0 and its high bit at bit 0 of word 1, code 21 its low bit at bit 31
# of word 1 and its high 2 bits at bits 0-1 of word 2, exactly where a 96-bit stream puts them.
#
# Zero points. v1 stores zero - 1 in each field (auto-gptq's historic off-by-one). GPTQModel packs the
# true zeros and converts at save/load (gptqmodel/utils/model.py @ f4c327a):
# `convert_gptq_v2_to_v1_format_module` subtracts 0b00010001...0001 from the packed 4-bit words (one
# per field; 0b0101... for 2 bits, 0b00000001... for 8) and `convert_gptq_v1_to_v2_format_module`
# adds it back; for 3 bits both shift per field through `_shift_gptq_qzeros`
# (gptqmodel/utils/model_dequant.py: "GPTQ v1 stores qzeros with a per-field -1 offset ... Decode the
# fields, shift them in logical space, then repack", `(zeros + delta) & ((1 << bits) - 1)`).
# We store (zero - 1) mod 2**bits per field, which equals GPTQModel's word subtraction whenever
# zero >= 1: always for sym (zero 2**(bits-1): 4-bit qzeros are 0x77777777) and for most asym groups.
# An asym zero of 0 is not representable in v1: it is stored as maxq, which legacy kernels that add 1
# without masking read as 2**bits, and GPTQModel 7.6 refuses asym v1 checkpoints not written by itself
# ("Loading of a sym=False model with format=FORMAT.GPTQ is only supported if produced by gptqmodel
# version >= 0.9.0"). So asym grids are written as v2 (`pack(v2=True)`):
# the true zeros, which GPTQModel and vLLM (checkpoint_format "gptq_v2") read as they are.


@dataclass(frozen=True)
class PackedGPTQ:
    qweight: Tensor  # int32 (cols * bits // 32, rows), packed along the input dim
    qzeros: Tensor  # int32 (n_groups, rows * bits // 32), v1: each field holds zero - 1; v2: the zero
    scales: Tensor  # float16 (n_groups, rows)
    g_idx: Tensor  # int32 (cols,)
    bits: int
    v2: bool = False  # checkpoint_format "gptq_v2"


def _to_int32(words: Tensor) -> Tensor:
    """Unsigned 32-bit words held in int64 -> the int32 with the same bits."""
    words = words & _MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _stream_positions(n: int, bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    pos = torch.arange(n, device=device, dtype=torch.int64) * bits
    return pos // 32, pos % 32  # word of each code, bit offset inside it


def _pack_dim0(values: Tensor, bits: int) -> Tensor:
    """values (n, m) in [0, 2**bits) -> int32 words (n * bits // 32, m), the bit stream along dim 0."""
    n, m = values.shape
    v = values.to(torch.int64)  # (n, m)
    word, shift = _stream_positions(n, bits, v.device)
    out = torch.zeros(n * bits // 32, m, dtype=torch.int64, device=v.device)
    # Fields are disjoint, so adding them is OR; bits pushed past 32 are the spill handled below.
    out.index_add_(0, word, v << shift[:, None])
    spill = shift + bits > 32
    if spill.any():
        out.index_add_(0, word[spill] + 1, v[spill] >> (32 - shift[spill])[:, None])
    return _to_int32(out)


def _unpack_dim0(words: Tensor, bits: int) -> Tensor:
    """Inverse of _pack_dim0: int32 words (n * bits // 32, m) -> int32 values (n, m)."""
    w = words.to(torch.int64) & _MASK32  # (n_words, m)
    n = w.shape[0] * 32 // bits
    word, shift = _stream_positions(n, bits, w.device)
    v = w[word] >> shift[:, None]  # (n, m)
    spill = shift + bits > 32
    if spill.any():
        v[spill] |= w[word[spill] + 1] << (32 - shift[spill])[:, None]
    return (v & (2**bits - 1)).to(torch.int32)


def _check_packable(result: QuantResult) -> None:
    bits = result.grid.bits
    rows, cols = result.codes.shape
    # 32 codes are the smallest whole number of words for 3 bits; 32 // bits codes for 2/4/8.
    per_word = 32 if bits == 3 else 32 // bits
    for name, dim, what in (("cols", cols, "qweight"), ("rows", rows, "qzeros")):
        if dim % per_word:
            raise ValueError(
                f"{bits}-bit GPTQ packing needs {name} (here {dim}) to be a multiple of {per_word} "
                f"({what} packs {name} into int32 words); keep this layer unquantized or pad it"
            )
    n_groups = result.scales.shape[0]
    if result.g_idx.shape != (cols,) or int(result.g_idx.min()) < 0 or int(result.g_idx.max()) >= n_groups:
        raise ValueError(f"g_idx must hold {cols} group indices in [0, {n_groups})")
    for name, t in (("codes", result.codes), ("zeros", result.zeros)):
        if int(t.min()) < 0 or int(t.max()) > result.grid.maxq:
            raise ValueError(f"{name} must lie in [0, {result.grid.maxq}] for {bits}-bit packing")


def pack(result: QuantResult, *, v2: bool = False) -> PackedGPTQ:
    """The checkpoint tensors of a quantized weight (moved to CPU), v1 or (`v2`) gptq_v2. Scales are stored in
    float16; gptq/rtn already round them to fp16, so dequantize_packed reproduces result.Q bit-exactly."""
    _check_packable(result)
    bits, maxq = result.grid.bits, result.grid.maxq
    codes = result.codes.detach().cpu()  # (rows, cols)
    zeros = result.zeros.detach().cpu().to(torch.int64)  # (n_groups, rows)
    qweight = _pack_dim0(codes.T, bits)  # (cols * bits // 32, rows)
    stored = zeros if v2 else (zeros - 1) & maxq
    qzeros = _pack_dim0(stored.T, bits).T.contiguous()  # (n_groups, rows * bits // 32)
    scales = result.scales.detach().cpu().to(torch.float16)  # (n_groups, rows)
    g_idx = result.g_idx.detach().cpu().to(torch.int32)
    return PackedGPTQ(qweight, qzeros, scales, g_idx, bits, v2)


def unpack(packed: PackedGPTQ) -> tuple[Tensor, Tensor]:
    """codes (rows, cols) int32 and the true (v1 offset removed) zeros (n_groups, rows) int32."""
    bits, maxq = packed.bits, 2**packed.bits - 1
    codes = _unpack_dim0(packed.qweight, bits).T.contiguous()  # (rows, cols)
    zeros = _unpack_dim0(packed.qzeros.T, bits).T  # (n_groups, rows)
    if not packed.v2:
        zeros = (zeros + 1) & maxq
    return codes, zeros.contiguous()


def dequantize_packed(packed: PackedGPTQ, dtype: torch.dtype = torch.float32) -> Tensor:
    """W (rows, cols) = scales[g_idx] * (codes - zeros[g_idx]), computed in fp32 then cast to dtype."""
    codes, zeros = unpack(packed)
    return dequantize_grouped(codes, packed.scales, zeros, packed.g_idx).to(dtype)
