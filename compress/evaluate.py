"""Held-out perplexity of any causal LM on packed token blocks: the quality number every stage reports."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity_on_blocks(model, blocks: torch.Tensor, *, batch_size: int = 4) -> dict:
    """exp(mean next-token NLL) over all positions of `blocks` (n, T); the same blocks give comparable numbers."""
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        tokens += ids[:, 1:].numel()
    return {"ppl": math.exp(nll / tokens) if tokens else float("nan"), "tokens": tokens}
