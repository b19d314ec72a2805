"""Quality on held-out text, the same windows for every model: perplexity, and against a teacher the KL
divergence per token and top-1 agreement. The teacher's logits are computed once per batch and shared by
every model of that batch (models are compared on identical inputs; nothing of one model is reused for another).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from compress.distill.losses import AgreementSums, agreement_from_logits, perplexity


def _next_token(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions for positions 0..T-2 and their labels 1..T-1, flattened: (N, V), (N,)."""
    return logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)


@torch.no_grad()
def measure_quality(
    subjects: dict[str, object],
    windows: torch.Tensor,
    *,
    teacher: object | None = None,
    teacher_label: str | None = None,
    batch_size: int = 2,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, dict]:
    """`subjects` {label: subject with .logits(ids)}; `windows` (n, T) token ids. A subject whose label is
    `teacher_label` is the teacher itself (KL 0 by definition; its logits are the teacher's, computed once)."""
    sums: dict[str, AgreementSums | float] = {label: 0 for label in subjects}
    tokens = 0
    n_batches = math.ceil(len(windows) / batch_size)
    for b, start in enumerate(range(0, len(windows), batch_size)):
        ids = windows[start : start + batch_size]
        reference = teacher.logits(ids) if teacher is not None else None
        for label, subject in subjects.items():
            logits = reference if label == teacher_label and reference is not None else subject.logits(ids)
            z, y = _next_token(logits, ids)
            if reference is not None:
                sums[label] = sums[label] + agreement_from_logits(z, _next_token(reference, ids)[0], y)
            else:
                sums[label] = sums[label] + F.cross_entropy(z.float(), y, reduction="sum").item()
        tokens += ids[:, 1:].numel()
        if on_batch:
            on_batch(b + 1, n_batches)
    results = {}
    for label, s in sums.items():
        if isinstance(s, AgreementSums):
            results[label] = {
                "ppl": perplexity(s.student_nll, s.tokens),
                "nll_per_token": s.student_nll / s.tokens,
                "kl_per_token": s.kl / s.tokens,
                "top1_agreement": s.top1_agree / s.tokens,
                "teacher_ppl": perplexity(s.teacher_nll, s.tokens),
                "tokens": s.tokens,
            }
        else:
            results[label] = {"ppl": perplexity(s, tokens), "nll_per_token": s / tokens, "tokens": tokens}
    return results
