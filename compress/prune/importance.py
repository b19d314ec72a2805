"""PURE: the importance statistics of structured pruning, on tensors.

- Block Influence (ShortGPT, Men et al. 2024): BI_l = 1 - E_t[cos(x_in_t, x_out_t)], the expected
  cosine distance between a block's input and output hidden state over all tokens t.
- Minitron (Muralidharan et al. 2024) activation importance, aggregated the way the paper found best:
  mean over the sequence, then L2 over the batch. For a channel c and a batch of sequences s,
  F_c = sqrt(sum_s (mean_t |a_{s,t,c}|)^2). Heads use the per-token L2 norm of each head's output
  (the input of o_proj), neurons the MLP activation (the input of down_proj), hidden channels the
  outputs of the RMSNorms. Accumulating `sum_s (...)^2` lets batches be added; take sqrt at the end.
"""
from __future__ import annotations

import torch
from torch import Tensor


def block_influence_sums(x_in: Tensor, x_out: Tensor) -> tuple[float, int]:
    """(sum over tokens of 1 - cos(x_in, x_out), number of tokens) for (..., H) hidden states."""
    x_in = x_in.reshape(-1, x_in.shape[-1]).float()
    x_out = x_out.reshape(-1, x_out.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1, eps=1e-8)  # (N,)
    return float((1.0 - cos).sum()), int(cos.numel())


def channel_square_sums(activations: Tensor) -> Tensor:
    """(C,) sum over the batch of (mean over the sequence of |a|)^2, for (B, T, C) activations."""
    per_sequence = activations.float().abs().mean(dim=1)  # (B, C)
    return per_sequence.pow(2).sum(dim=0)


def head_square_sums(attn_out: Tensor, num_heads: int) -> Tensor:
    """(num_heads,) the same statistic over per-token head norms, for (B, T, num_heads * head_dim)."""
    b, t, width = attn_out.shape
    norms = attn_out.float().reshape(b, t, num_heads, width // num_heads).norm(dim=-1)  # (B, T, heads)
    return channel_square_sums(norms)


def finish(square_sums: Tensor) -> Tensor:
    """Importance from accumulated square sums (the L2 over the batch)."""
    return square_sums.sqrt()


def retained_fraction(scores: Tensor, keep: int) -> float:
    """Share of the total importance kept by the `keep` highest scores (1.0 when all are kept)."""
    total = float(scores.sum())
    if total <= 0:
        return keep / max(1, scores.numel())
    return float(scores.topk(keep).values.sum()) / total
