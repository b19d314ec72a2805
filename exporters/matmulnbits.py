"""GPTQ weights -> ONNX Runtime `com.microsoft.MatMulNBits`, exactly: the checkpoint's integer codes, its fp16
scales (widened to fp32, exact) and zero points are repacked, never re-rounded.

MatMulNBits (onnxruntime docs/ContribOperators.md) computes Y = A @ dequant(B) with B (N, k_blocks, blob)
uint8: column n of the (K, N) weight is cut into blocks of `block_size` along K, each block's codes packed
low bits first (4-bit: element 2j in the low nibble of byte j, 2j+1 in the high nibble); scales (N, k_blocks);
zero_points uint8 (N, ceil(k_blocks * bits / 8)) packed the same way along the blocks, default 2**(bits-1)
when absent. The last block may be partial (K need not divide). block_size is a power of two >= 16.

A GPTQ group becomes blocks: any power-of-two block size (<= 128) that divides the group size maps each block
into one group, its scale and zero repeated per block. Act-order (`desc_act`) scatters a group's columns over
K; sorting the columns by group makes them contiguous, so the activations are permuted instead
(`A[..., perm] @ W[perm, :]`, a Gather in front of the MatMulNBits). The op's own g_idx input is deprecated
and forces ONNX Runtime's unpacked (dequantize-every-call) path, so it is not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_SIZES = (128, 64, 32, 16)  # tried largest first: fewer scales, the kernels' common sizes
SUPPORTED_BITS = (2, 4, 8)  # what ONNX Runtime's MatMulNBits CPU kernel accepts


class UnmappableGroupsError(ValueError):
    pass


@dataclass(frozen=True)
class NBitsWeight:
    B: np.ndarray  # uint8 (N, k_blocks, block_size * bits // 8)
    scales: np.ndarray  # float32 (N, k_blocks)
    zero_points: np.ndarray | None  # uint8 (N, ceil(k_blocks * bits / 8)); None = all 2**(bits-1)
    perm: np.ndarray | None  # int64 (K,): activation columns in block order; None = identity
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def k_blocks(self) -> int:
        return self.B.shape[1]


def choose_block_size(group_of_sorted_col: np.ndarray) -> int | None:
    """The largest supported block size such that every block (of the sorted columns) lies in one group."""
    K = len(group_of_sorted_col)
    for size in BLOCK_SIZES:
        pad = (-K) % size
        g = np.concatenate([group_of_sorted_col, np.repeat(group_of_sorted_col[-1:], pad)]).reshape(-1, size)
        if (g == g[:, :1]).all():
            return size
    return None


def pack_along_last(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values (..., n) in [0, 2**bits) -> (..., ceil(n * bits / 8)), element i at bits
    (i % per_byte) * bits of byte i // per_byte: low bits first."""
    per_byte = 8 // bits
    n = values.shape[-1]
    pad = (-n) % per_byte
    v = np.concatenate([values, np.zeros(values.shape[:-1] + (pad,), np.uint8)], axis=-1).astype(np.uint8)
    v = v.reshape(values.shape[:-1] + (-1, per_byte))
    out = np.zeros(v.shape[:-1], np.uint8)
    for j in range(per_byte):
        out |= (v[..., j] << (j * bits)).astype(np.uint8)
    return out


def unpack_along_last(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    fields = [(packed >> (j * bits)) & mask for j in range(per_byte)]
    return np.stack(fields, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :n].astype(np.uint8)


def from_gptq(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray, bits: int) -> NBitsWeight:
    """codes (N, K) and the true zeros (n_groups, N) as `compress.quantize.packing.unpack` returns them,
    scales (n_groups, N), g_idx (K,). W[n, k] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])."""
    if bits not in SUPPORTED_BITS:
        raise UnmappableGroupsError(f"{bits}-bit weights: ONNX Runtime's MatMulNBits takes {', '.join(map(str, SUPPORTED_BITS))} bits")
    N, K = codes.shape
    g_idx = np.asarray(g_idx, dtype=np.int64)
    perm = np.argsort(g_idx, kind="stable")
    g_sorted = g_idx[perm]
    size = choose_block_size(g_sorted)
    if size is None:
        raise UnmappableGroupsError(
            f"GPTQ groups (sizes {np.unique(np.bincount(g_idx)).tolist()}) cannot be cut into blocks of 16, 32, 64 or 128 "
            "columns that each lie in one group; MatMulNBits needs such blocks (re-quantize with group_size 16/32/64/128)"
        )
    identity = bool((perm == np.arange(K)).all())
    k_blocks = -(-K // size)
    block_group = g_sorted[np.arange(k_blocks) * size]  # (k_blocks,) the group of each block
    block_zero = zeros[block_group].T.astype(np.uint8)  # (N, k_blocks)
    sorted_codes = codes[:, perm].astype(np.uint8)  # (N, K)
    # Padding columns take their block's zero point, so they dequantize to exactly 0.
    pad = np.repeat(block_zero[:, -1:], k_blocks * size - K, axis=1)
    blocks = np.concatenate([sorted_codes, pad], axis=1).reshape(N, k_blocks, size)
    default_zero = 1 << (bits - 1)
    return NBitsWeight(
        B=pack_along_last(blocks, bits),
        scales=np.ascontiguousarray(scales[block_group].T.astype(np.float32)),
        zero_points=None if (block_zero == default_zero).all() else pack_along_last(block_zero, bits),
        perm=None if identity else perm,
        K=K,
        N=N,
        bits=bits,
        block_size=size,
    )


def dequantize(weight: NBitsWeight) -> np.ndarray:
    """(K, N) float32 weight in the ORIGINAL column order, as MatMulNBits (after the permutation) applies it."""
    size, k_blocks = weight.block_size, weight.k_blocks
    codes = unpack_along_last(weight.B, weight.bits, size).astype(np.float32)  # (N, k_blocks, size)
    if weight.zero_points is None:
        zeros = np.full((weight.N, k_blocks), 1 << (weight.bits - 1), np.float32)
    else:
        zeros = unpack_along_last(weight.zero_points, weight.bits, k_blocks).astype(np.float32)
    W = ((codes - zeros[..., None]) * weight.scales[..., None]).reshape(weight.N, -1)[:, : weight.K]  # (N, K) sorted
    out = np.empty_like(W)
    out[:, weight.perm if weight.perm is not None else np.arange(weight.K)] = W
    return out.T.copy()
