"""Sparse teacher distributions for offline distillation: the teacher's top-k log-probabilities plus one
tail bucket for the rest of its mass, and the divergences and chunked fused loss against them. Pure torch.

The estimator. Both distributions are coarse-grained onto the same k + 1 bins: the teacher's k most likely
tokens K, one bin each, and one tail bin for every other token. The teacher side is what a logits cache
stores: log p_T(i) for i in K and log p_T(tail) = log(1 - sum_K p_T(i)) (renormalized over the k + 1 bins
here, since fp16 storage leaves them summing to 1 only within ~1e-3). The student side is exact at every
step: log-softmax over the full vocabulary, gathered at K, and log p_S(tail) = log sum_{j not in K} p_S(j),
summed over the complement itself rather than as 1 - sum (which cancels when the tail is tiny). Each
divergence of DIVERGENCES is then evaluated on the two (k + 1)-bin distributions.

Its bias against the full-vocabulary divergence: every divergence here is an f-divergence, and merging bins
never increases an f-divergence (data processing), so the sparse value is <= the full one, equal at k = V
or wherever teacher and student spread their tail mass alike. For forward KL the gap is exact (chain rule):

    KL(p_T || p_S) - KL_sparse = p_T(tail) * KL(p_T(. | tail) || p_S(. | tail)),

the teacher's tail mass times the divergence of the two distributions within the tail. The estimator still
charges the student for putting too much or too little mass in the tail, but not for how it spreads it
there. Its gradient (forward KL, per logit, at temperature T) is (p_S - r) / T with r = p_T on K and
r_j = p_T(tail) * p_S(j) / p_S(tail) on the tail: the student's own tail shape, scaled to the teacher's mass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from compress.distill.losses import (
    _DIVERGENCE_FNS,
    ChunkLoss,
    DistillLossResult,
    _autograd_chunk,
    chunk_buffers,
    _closed_form,
    softcap_logits,
    _combine,
    _log_probs,
    _Objective,
    _project,
    _project_into,
    fused_loss,
)

_FINITE = torch.finfo(torch.float32).min  # stands for log 0, so that 0 * (log 0 - log 0) is 0, not NaN


@dataclass(frozen=True)
class TopKTargets:
    """A teacher distribution kept as its top-k tokens plus a tail bucket, for any leading shape (...)."""

    logprobs: Tensor  # (..., k) teacher log-probs at the loss temperature, largest first
    indices: Tensor  # (..., k) int64 token ids of those log-probs
    tail: Tensor  # (...,) log of the teacher's mass outside them, log(1 - sum exp(logprobs)); _FINITE when none is left

    def __post_init__(self) -> None:
        if self.logprobs.shape != self.indices.shape or self.tail.shape != self.logprobs.shape[:-1]:
            raise ValueError(
                f"top-k targets need logprobs and indices of one shape (..., k) and tail (...): got "
                f"{tuple(self.logprobs.shape)}, {tuple(self.indices.shape)}, {tuple(self.tail.shape)}"
            )

    @property
    def k(self) -> int:
        return int(self.logprobs.shape[-1])

    def rows(self) -> "TopKTargets":
        """Leading dimensions flattened: (N, k), (N, k), (N,)."""
        return TopKTargets(self.logprobs.reshape(-1, self.k), self.indices.reshape(-1, self.k), self.tail.reshape(-1))

    def select(self, rows: Tensor) -> "TopKTargets":
        return TopKTargets(self.logprobs[rows], self.indices[rows], self.tail[rows])

    def to(self, device) -> "TopKTargets":
        return TopKTargets(self.logprobs.to(device), self.indices.to(device), self.tail.to(device))


def tail_log_mass(log_p: Tensor, indices: Tensor) -> Tensor:
    """(N, V) log-probs, (N, k) distinct token ids -> (N,) log of the mass on every other token, summed
    over those tokens themselves (no 1 - sum cancellation); _FINITE when the ids cover the vocabulary."""
    return log_p.scatter(-1, indices, _FINITE).logsumexp(-1).clamp(min=_FINITE)


def coarse_log_probs(log_p: Tensor, indices: Tensor) -> Tensor:
    """(N, V) log-probs -> (N, k + 1): the log-probs at `indices` (N, k), then the tail bucket's."""
    return torch.cat([log_p.gather(-1, indices), tail_log_mass(log_p, indices)[:, None]], -1)


def topk_targets(logits: Tensor, k: int, *, temperature: float = 1.0) -> TopKTargets:
    """(N, V) teacher logits -> its top-k log-probabilities at temperature T, their ids and the tail."""
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}] (the vocabulary), got {k}")
    log_p = _log_probs(logits, temperature)  # (N, V)
    values, indices = log_p.topk(k, dim=-1)  # (N, k) each, largest first
    return TopKTargets(values, indices, tail_log_mass(log_p, indices))


@torch.no_grad()
def topk_targets_from_hidden(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, *, temperature: float = 1.0, chunk_size: int = 1024, softcap: Optional[float] = None
) -> TopKTargets:
    """`topk_targets` of hidden (N, H) through an lm_head (V, H) (and the model's final-logit `softcap`),
    chunk by chunk: never (N, V) at once."""
    parts = [topk_targets(_project(h, weight, bias, softcap), k, temperature=temperature) for h in hidden.split(chunk_size)]
    if not parts:
        empty = torch.zeros(0, k, device=hidden.device)
        return TopKTargets(empty, empty.long(), empty[:, 0])
    return TopKTargets(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logprobs", "indices", "tail")))


def _teacher_bins(targets: TopKTargets) -> Tensor:
    """(n, k + 1) teacher log-probs over the top-k bins and the tail bin, renormalized."""
    log_t = torch.cat([targets.logprobs.float(), targets.tail.float()[:, None]], -1).clamp(min=_FINITE)
    return (log_t - log_t.logsumexp(-1, keepdim=True)).clamp(min=_FINITE)


def _sparse_divergence(student_logits: Tensor, targets: TopKTargets, obj: _Objective) -> Tensor:
    log_s = coarse_log_probs(_log_probs(student_logits, obj.temperature), targets.indices)  # (n, k + 1)
    return _DIVERGENCE_FNS[obj.kind](log_s, _teacher_bins(targets), obj.beta, obj.alpha)


def sparse_token_divergence(
    student_logits: Tensor, targets: TopKTargets, kind: str, *, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1
) -> Tensor:
    """(N, V) student logits and (N, k) targets -> (N,) divergence on the (k + 1)-bin distributions at
    temperature T (targets built at the same T; not multiplied by T^2). Same kinds and conventions as
    losses.token_divergence."""
    _check(student_logits.shape[0], student_logits.shape[-1], targets)
    return _sparse_divergence(student_logits, targets, _Objective(kind, temperature, beta, alpha))


def _check(n: int, vocab: int, targets: TopKTargets) -> None:
    if targets.logprobs.dim() != 2 or targets.logprobs.shape[0] != n:
        raise ValueError(f"top-k targets {tuple(targets.logprobs.shape)} must be (N, k) with N = {n} rows")
    if targets.k > vocab:
        raise ValueError(f"top-k targets hold k = {targets.k} tokens, more than the student's vocabulary {vocab}")


def naive_sparse_distill_loss(
    student_logits: Tensor,
    targets: TopKTargets,
    labels: Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
) -> DistillLossResult:
    """Reference: the sparse objective on full (N, V) student logits in one go (what
    fused_sparse_distill_loss must equal)."""
    obj = _Objective(kind, temperature, beta, alpha, ce_weight)
    _check(labels.shape[0], student_logits.shape[-1], targets)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    z = student_logits[rows]
    loss, div_sum, ce_sum = _combine(_sparse_divergence(z, targets.select(rows), obj), z, labels[rows], obj, rows.numel())
    return DistillLossResult.of_sums(loss, div_sum, ce_sum, rows.numel())


def _sparse_forward_kl_chunk(z_s: Tensor, scratch: Tensor, targets: TopKTargets, labels: Tensor, obj: _Objective, tokens: int, want_grad: bool):
    """Sparse forward KL (+ CE at T=1) on one chunk, in place on two (c, V) fp32 buffers: z_s holds the
    student logits on entry and d(loss)/d(logits) on exit (if want_grad); scratch is scratch.

    d KL_sparse / d s = (p_S - r) / T (module docstring) and d CE / d s = p_S - onehot(y) (T = 1)."""
    T, w, scale = obj.temperature, obj.ce_weight, 1.0 / max(tokens, 1)
    idx = targets.indices  # (c, k)
    ce = (torch.logsumexp(z_s, -1) - z_s.gather(1, labels[:, None]).squeeze(1)).sum()  # at T = 1, before scaling
    if T != 1.0:
        z_s.div_(T)
    z_s.sub_(torch.logsumexp(z_s, -1, keepdim=True)).clamp_(min=_FINITE)  # log p_S
    b = z_s.gather(1, idx)  # (c, k) log p_S on the teacher's top-k
    b_tail = torch.logsumexp(scratch.copy_(z_s).scatter_(1, idx, _FINITE), -1).clamp(min=_FINITE)  # (c,)
    log_t = _teacher_bins(targets)  # (c, k + 1)
    a, a_tail = log_t[:, :-1], log_t[:, -1]
    p = a.exp()
    div = (p * (a - b)).sum() + (a_tail.exp() * (a_tail - b_tail)).sum()
    loss = ((1.0 - w) * T**2 * div + w * ce) * scale
    if want_grad:
        # r on the tail = exp(a_tail + log p_S(j) - b_tail); the exponent is <= a_tail there, so no overflow.
        scratch.copy_(z_s).sub_(b_tail[:, None]).add_(a_tail[:, None]).scatter_(1, idx, _FINITE).exp_()
        kl_coef = (1.0 - w) * T * scale
        z_s.exp_().mul_(kl_coef + w * scale).sub_(scratch, alpha=kl_coef)  # p_S (at T; with a CE mix T == 1)
        z_s.scatter_add_(1, idx, -kl_coef * p)  # r = p_T on the top-k
        if w > 0:
            z_s.scatter_add_(1, labels[:, None], torch.full((labels.numel(), 1), -w * scale, device=z_s.device))
    return loss, div, ce


def _sparse_chunk_loss(targets: TopKTargets, sw: Tensor, sb: Optional[Tensor], labels: Tensor, obj: _Objective, tokens: int, chunk_size: int) -> ChunkLoss:
    closed = _closed_form(obj)
    buffers = chunk_buffers(2, sw, tokens, chunk_size) if closed else None

    def chunk_loss(chunk: Tensor, h: Tensor, want_grad: bool):
        t = targets.select(chunk)
        if closed:
            z_s, scratch = (buf[: chunk.numel()] for buf in buffers)
            with torch.no_grad():
                _project_into(z_s, h, sw, sb)
                loss, div_sum, ce_sum = _sparse_forward_kl_chunk(z_s, scratch, t, labels[chunk], obj, tokens, want_grad)
            return loss, div_sum, ce_sum, z_s if want_grad else None
        with torch.no_grad():
            z_s = _project(h, sw, sb)  # (c, V) before the student's cap: the gradient is taken through it

        def objective(z):
            z = softcap_logits(z, obj.softcap)
            return _combine(_sparse_divergence(z, t, obj), z, labels[chunk], obj, tokens)

        return _autograd_chunk(z_s, objective, want_grad)

    return chunk_loss


def fused_sparse_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Optional[Tensor],
    targets: TopKTargets,
    labels: Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    softcap: Optional[float] = None,
) -> DistillLossResult:
    """losses.fused_distill_loss with the teacher given as top-k targets (N, k) instead of hidden states
    and an lm_head: loss = (1 - ce_weight) * T^2 * mean sparse divergence + ce_weight * mean CE(T=1),
    student hidden (N, H) through its lm_head (V, H) in chunks of `chunk_size` rows, gradients formed in
    the forward pass. The targets must have been built at the same temperature T (and with the teacher's
    soft-cap, as `topk_targets_from_hidden` does); `softcap` is the student's."""
    obj = _Objective(kind, temperature, beta, alpha, ce_weight, softcap)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = labels.shape[0]
    if labels.dim() != 1 or student_hidden.shape[0] != n:
        raise ValueError(f"labels {tuple(labels.shape)} and student_hidden {tuple(student_hidden.shape)} must share the token dimension N")
    _check(n, student_weight.shape[0], targets)
    rows = (labels != ignore_index).nonzero().squeeze(1)  # (tokens,)
    sb = None if student_bias is None else student_bias.detach()
    chunk_loss = _sparse_chunk_loss(targets, student_weight.detach(), sb, labels, obj, rows.numel(), chunk_size)
    return fused_loss((student_hidden, student_weight, student_bias), rows, chunk_size, chunk_loss)
