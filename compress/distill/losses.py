"""Distillation losses: per-token divergences between teacher and student distributions, a
chunked fused-linear objective that never holds (N, V) logits, and chunked agreement statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Per-row divergence of (log p_S, log p_T, beta, alpha), each log-prob (N, V) -> (N,).
_DivergenceFn = Callable[[Tensor, Tensor, float, float], Tensor]


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row; the log-probs are clamped finite, so p = 0 rows add exactly 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w p + (1 - w) q) for 0 < w < 1, without leaving log-space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def _forward_kl(log_s: Tensor, log_t: Tensor, beta: float, alpha: float) -> Tensor:
    return _kl(log_t, log_s)


def _reverse_kl(log_s: Tensor, log_t: Tensor, beta: float, alpha: float) -> Tensor:
    return _kl(log_s, log_t)


def _jsd(log_s: Tensor, log_t: Tensor, beta: float, alpha: float) -> Tensor:
    # TRL's generalized_jsd_loss: the mixture degenerates at the ends, so beta 0/1 mean the plain KLs.
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = _log_mix(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _skew_forward_kl(log_s: Tensor, log_t: Tensor, beta: float, alpha: float) -> Tensor:
    if alpha == 0.0:
        return _kl(log_t, log_s)
    return _kl(log_t, _log_mix(log_t, log_s, alpha))


def _skew_reverse_kl(log_s: Tensor, log_t: Tensor, beta: float, alpha: float) -> Tensor:
    if alpha == 0.0:
        return _kl(log_s, log_t)
    return _kl(log_s, _log_mix(log_s, log_t, alpha))


def _tvd(log_s: Tensor, log_t: Tensor, beta: float, alpha: float) -> Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


_DIVERGENCE_FNS: dict[str, _DivergenceFn] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
}
DIVERGENCES: tuple[str, ...] = tuple(_DIVERGENCE_FNS)


@dataclass(frozen=True)
class _Objective:
    """The knobs of the distillation objective, validated once."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    ce_weight: float = 0.0
    softcap: Optional[float] = None  # the student's final-logit soft-cap: logits = c * tanh(z / c) (Gemma-2)
    teacher_softcap: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("softcap", "teacher_softcap"):
            cap = getattr(self, name)
            if cap is not None and not cap > 0:
                raise ValueError(f"{name} must be > 0 or None, got {cap}")
        if self.kind not in _DIVERGENCE_FNS:
            raise ValueError(f"unknown divergence kind {self.kind!r}; expected one of {DIVERGENCES}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight}")


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    # Clamping -inf to the most negative finite value keeps 0 * (-inf - -inf) from becoming NaN.
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_p.clamp(min=torch.finfo(log_p.dtype).min)


def _divergence(student_logits: Tensor, teacher_logits: Tensor, obj: _Objective) -> Tensor:
    log_s = _log_probs(student_logits, obj.temperature)  # (N, V)
    log_t = _log_probs(teacher_logits, obj.temperature)  # (N, V)
    return _DIVERGENCE_FNS[obj.kind](log_s, log_t, obj.beta, obj.alpha)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """(N, V), (N, V) -> (N,) per-token divergence, computed in fp32 on the distributions at
    temperature T (NOT multiplied by T^2).

    forward_kl KL(p_T||p_S); reverse_kl KL(p_S||p_T); jsd beta*KL(p_T||m) + (1-beta)*KL(p_S||m) with
    m = beta*p_T + (1-beta)*p_S (TRL's convention; beta 0/1 give forward/reverse KL exactly);
    skew_forward_kl KL(p_T || alpha*p_T + (1-alpha)*p_S) and skew_reverse_kl
    KL(p_S || alpha*p_S + (1-alpha)*p_T) (DistiLLM); tvd 0.5*sum|p_T - p_S|.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (N, V)"
        )
    obj = _Objective(kind, temperature, beta, alpha)
    return _divergence(student_logits, teacher_logits, obj)


def _combine(div: Tensor, student_logits: Tensor, labels: Tensor, obj: _Objective, tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token divergences (n,) and the student's (n, V) logits -> (this chunk's share of the loss,
    divergence sum, CE sum). Dividing by the total token count here makes chunk gradients add up to the
    full gradient."""
    ce = F.cross_entropy(student_logits.float(), labels, reduction="sum")
    scale = 1.0 / max(tokens, 1)
    loss = (1.0 - obj.ce_weight) * obj.temperature**2 * scale * div.sum()
    if obj.ce_weight > 0:
        loss = loss + obj.ce_weight * scale * ce
    return loss, div.sum().detach(), ce.detach()


def _chunk_objective(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, obj: _Objective, tokens: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(n, V) logits of n unmasked tokens -> (this chunk's share of the loss, divergence sum, CE sum)."""
    return _combine(_divergence(student_logits, teacher_logits, obj), student_logits, labels, obj, tokens)


@dataclass(frozen=True)
class DistillLossResult:
    loss: Tensor  # scalar, differentiable: the training objective
    divergence: Tensor  # scalar, detached: mean per-token divergence (no T^2)
    ce: Tensor  # scalar, detached: mean hard-label cross-entropy of the student at T=1
    tokens: int  # number of unmasked tokens

    @classmethod
    def of_sums(cls, loss: Tensor, div_sum: Tensor, ce_sum: Tensor, tokens: int) -> "DistillLossResult":
        scale = 1.0 / max(tokens, 1)
        return cls(loss=loss, divergence=div_sum * scale, ce=ce_sum * scale, tokens=tokens)


def naive_distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
) -> DistillLossResult:
    """Reference: the same objective on full (N, V) logits in one go (what fused_distill_loss must
    equal). Used by tests and the memory benchmark."""
    obj = _Objective(kind, temperature, beta, alpha, ce_weight)
    keep = labels != ignore_index  # (N,)
    tokens = int(keep.sum())
    loss, div_sum, ce_sum = _chunk_objective(
        student_logits[keep], teacher_logits[keep].detach(), labels[keep], obj, tokens
    )
    return DistillLossResult.of_sums(loss, div_sum, ce_sum, tokens)


def softcap_logits(logits: Tensor, cap: Optional[float]) -> Tensor:
    """cap * tanh(logits / cap): the final-logit soft-cap Gemma-2 applies after its lm_head (None: unchanged)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _project(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float] = None) -> Tensor:
    """(n, H) rows through an lm_head (V, H) -> (n, V) fp32 logits, soft-capped when the model caps them."""
    logits = (hidden.to(weight.dtype) @ weight.T).float()
    return softcap_logits(logits if bias is None else logits + bias.float(), softcap)


def _closed_form(obj: _Objective) -> bool:
    """Forward KL (the default) has a closed-form logit gradient, p_S - p_T, that needs no autograd graph;
    with soft-capped logits the chain through tanh goes through autograd instead."""
    return obj.kind == "forward_kl" and (obj.ce_weight == 0.0 or obj.temperature == 1.0) and obj.softcap is None and obj.teacher_softcap is None


def _project_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(n, H) @ (V, H).T written into a reused fp32 buffer: no fresh (n, V) allocation per chunk."""
    if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
        torch.matmul(hidden, weight.T, out=out)
    else:
        out.copy_(hidden.to(weight.dtype) @ weight.T)
    if bias is not None:
        out += bias.float()
    return out


def _forward_kl_chunk(z_s: Tensor, z_t: Tensor, p_t: Tensor, labels: Tensor, obj: _Objective, tokens: int, want_grad: bool):
    """Forward KL (+ CE at T=1) on one chunk, in place on three (c, V) fp32 buffers.

    z_s holds the student logits on entry and d(loss)/d(logits) on exit (if want_grad); z_t and p_t
    are scratch. d KL(p_T||p_S) / d s = (p_S - p_T) / T and d CE / d s = p_S - onehot(y) (T = 1)."""
    T, w, scale = obj.temperature, obj.ce_weight, 1.0 / max(tokens, 1)
    finite = torch.finfo(torch.float32).min
    ce = (torch.logsumexp(z_s, -1) - z_s.gather(1, labels[:, None]).squeeze(1)).sum()  # at T = 1, before scaling
    if T != 1.0:
        z_s.div_(T)
        z_t.div_(T)
    z_t.sub_(torch.logsumexp(z_t, -1, keepdim=True)).clamp_(min=finite)  # log p_T
    z_s.sub_(torch.logsumexp(z_s, -1, keepdim=True)).clamp_(min=finite)  # log p_S
    torch.exp(z_t, out=p_t)  # p_T
    z_t.sub_(z_s)  # log p_T - log p_S
    div = torch.einsum("cv,cv->c", p_t, z_t).sum()
    loss = ((1.0 - w) * T**2 * div + w * ce) * scale
    if want_grad:
        z_s.exp_()  # p_S (at T; with a CE mix T == 1, so it is also the CE's softmax)
        kl_coef = (1.0 - w) * T * scale
        z_s.mul_(kl_coef + w * scale).sub_(p_t, alpha=kl_coef)
        if w > 0:
            z_s.scatter_add_(1, labels[:, None], torch.full((labels.numel(), 1), -w * scale, device=z_s.device))
    return loss, div, ce


# One chunk of a fused loss: (row ids (c,), student hidden (c, H) in the head's dtype, want_grad) ->
# (this chunk's share of the loss, divergence sum, CE sum, d loss / d logits (c, V) fp32 or None).
ChunkLoss = Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor, Tensor, Optional[Tensor]]]


def _autograd_chunk(z_s: Tensor, objective: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], want_grad: bool):
    """Differentiate only logits -> loss with autograd; the lm_head matmuls are done by hand, so each
    chunk's (c, V) graph is freed before the next chunk starts."""
    if not want_grad:
        return (*objective(z_s), None)
    with torch.enable_grad():
        z_s.requires_grad_(True)
        loss, div_sum, ce_sum = objective(z_s)
        (g,) = torch.autograd.grad(loss, z_s)  # (c, V) fp32
    return loss, div_sum, ce_sum, g


def chunk_buffers(count: int, weight: Tensor, tokens: int, chunk_size: int) -> list[Tensor]:
    """`count` fp32 (chunk, V) buffers for a closed-form chunk loss, reused by every chunk."""
    c, v = min(chunk_size, max(tokens, 1)), weight.shape[0]
    return [torch.empty(c, v, dtype=torch.float32, device=weight.device) for _ in range(count)]


def _dense_chunk_loss(
    th: Tensor, tw: Tensor, tb: Optional[Tensor], sw: Tensor, sb: Optional[Tensor],
    labels: Tensor, obj: _Objective, tokens: int, chunk_size: int,
) -> ChunkLoss:
    """The full-vocabulary objective: both lm_heads applied to each chunk."""
    closed = _closed_form(obj)
    buffers = chunk_buffers(3, sw, tokens, chunk_size) if closed else None

    def chunk_loss(chunk: Tensor, h: Tensor, want_grad: bool):
        if closed:
            z_s, z_t, p_t = (b[: chunk.numel()] for b in buffers)
            with torch.no_grad():
                _project_into(z_t, th[chunk], tw, tb)
                _project_into(z_s, h, sw, sb)
                loss, div_sum, ce_sum = _forward_kl_chunk(z_s, z_t, p_t, labels[chunk], obj, tokens, want_grad)
            return loss, div_sum, ce_sum, z_s if want_grad else None  # z_s now holds d loss / d logits
        with torch.no_grad():
            z_t = _project(th[chunk], tw, tb, obj.teacher_softcap)  # (c, V)
            z_s = _project(h, sw, sb)  # (c, V) before the student's cap: the gradient is taken through it
        return _autograd_chunk(z_s, lambda z: _chunk_objective(softcap_logits(z, obj.softcap), z_t, labels[chunk], obj, tokens), want_grad)

    return chunk_loss


def _fused_chunks(
    sh: Tensor, sw: Tensor, sb: Optional[Tensor], rows: Tensor, chunk_size: int,
    needs: tuple[bool, bool, bool], chunk_loss: ChunkLoss,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Loss, divergence sum, CE sum over `rows`, and fp32 grads of the loss (None where not needed)."""
    need_h, need_w, need_b = needs
    grad_h = torch.zeros(sh.shape, dtype=torch.float32, device=sh.device) if need_h else None  # (N, H)
    grad_w = torch.zeros(sw.shape, dtype=torch.float32, device=sw.device) if need_w else None  # (V, H)
    grad_b = torch.zeros(sb.shape, dtype=torch.float32, device=sb.device) if need_b else None  # (V,)
    # Three separate scalars rather than views of one buffer: they become autograd outputs.
    loss_sum, div_total, ce_total = (torch.zeros((), device=sh.device) for _ in range(3))
    for chunk in rows.split(chunk_size):
        h = sh[chunk].to(sw.dtype)  # (c, H_s)
        loss, div_sum, ce_sum, g = chunk_loss(chunk, h, any(needs))
        if any(needs):
            if need_h:
                grad_h.index_copy_(0, chunk, (g.to(sw.dtype) @ sw).float())
            if need_w:
                grad_w.addmm_(g.T, h.float())
            if need_b:
                grad_b += g.sum(0)
        loss_sum += loss.detach()
        div_total += div_sum.detach()
        ce_total += ce_sum.detach()
    return loss_sum, div_total, ce_total, grad_h, grad_w, grad_b


class _FusedDistillFunction(torch.autograd.Function):
    """Gradients are computed during forward, chunk by chunk, so backward only rescales them."""

    @staticmethod
    def forward(ctx, sh, sw, sb, rows, chunk_size, chunk_loss):
        needs = tuple(ctx.needs_input_grad[:3])
        loss, div_sum, ce_sum, *grads = _fused_chunks(sh, sw, sb, rows, chunk_size, needs, chunk_loss)
        # Stored in the inputs' dtypes: for bf16 models that halves what is kept until backward.
        grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, (sh, sw, sb))]
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(div_sum, ce_sum)
        return loss, div_sum, ce_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_div, _grad_ce):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None)


def fused_loss(student: tuple[Tensor, Tensor, Optional[Tensor]], rows: Tensor, chunk_size: int, chunk_loss: ChunkLoss) -> DistillLossResult:
    """Run `chunk_loss` over `rows` of the student (hidden (N, H), lm_head weight (V, H), bias (V,)),
    with gradients formed inside each chunk when any student input requires grad. Shared by the dense
    objective here and the sparse (top-k) one in compress.distill.sparse."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in student):
        loss, div_sum, ce_sum = _FusedDistillFunction.apply(*student, rows, chunk_size, chunk_loss)
    else:
        loss, div_sum, ce_sum, *_ = _fused_chunks(*student, rows, chunk_size, (False, False, False), chunk_loss)
    return DistillLossResult.of_sums(loss, div_sum, ce_sum, rows.numel())


def fused_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Optional[Tensor],
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Optional[Tensor],
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
    teacher_softcap: Optional[float] = None,
) -> DistillLossResult:
    """loss = (1 - ce_weight) * T^2 * mean divergence + ce_weight * mean CE(T=1), over tokens whose
    label is not ignore_index, computed from hidden states (N, H) and lm_heads (V, H) in chunks of
    `chunk_size` rows, so peak memory grows with chunk_size * V rather than N * V. `softcap` /
    `teacher_softcap`: each model's final-logit soft-cap (Gemma-2), applied to its logits as the model does.

    The teacher side is detached. Gradients for the student hidden/weight/bias are computed in the
    forward pass (Liger-style fused linear loss) and returned in the inputs' dtypes.
    """
    obj = _Objective(kind, temperature, beta, alpha, ce_weight, softcap, teacher_softcap)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = labels.shape[0]
    if labels.dim() != 1 or student_hidden.shape[0] != n or teacher_hidden.shape[0] != n:
        raise ValueError(
            f"labels {tuple(labels.shape)}, student_hidden {tuple(student_hidden.shape)} and "
            f"teacher_hidden {tuple(teacher_hidden.shape)} must share the token dimension N"
        )
    rows = (labels != ignore_index).nonzero().squeeze(1)  # (tokens,)
    th, tw = teacher_hidden.detach(), teacher_weight.detach()
    tb = None if teacher_bias is None else teacher_bias.detach()
    chunk_loss = _dense_chunk_loss(th, tw, tb, student_weight.detach(), None if student_bias is None else student_bias.detach(),
                                   labels, obj, rows.numel(), chunk_size)
    return fused_loss((student_hidden, student_weight, student_bias), rows, chunk_size, chunk_loss)


def hidden_state_loss(
    student_hiddens: Sequence[Tensor],
    teacher_hiddens: Sequence[Tensor],
    pairs: Sequence[tuple[int, int]],
    mask: Tensor,
) -> Tensor:
    """Mean over pairs of the masked MSE between student layer s and teacher layer t hidden states,
    (B, T, H) each; mask (B, T) bool/0-1: masked positions contribute nothing. Hidden sizes must
    match: ValueError otherwise, naming the pair.

    Indices index the given sequences (HF `hidden_states`: index 0 is the embeddings output).
    The teacher side is detached.
    """
    if not pairs:
        raise ValueError("hidden_state_loss needs at least one (student_layer, teacher_layer) pair")
    weight = mask.float()  # (B, T)
    positions = weight.sum().clamp(min=1.0)
    total = 0.0
    for s, t in pairs:
        if not (-len(student_hiddens) <= s < len(student_hiddens)
                and -len(teacher_hiddens) <= t < len(teacher_hiddens)):
            raise ValueError(
                f"pair ({s}, {t}) is out of range: {len(student_hiddens)} student and "
                f"{len(teacher_hiddens)} teacher hidden states"
            )
        hs, ht = student_hiddens[s], teacher_hiddens[t]  # (B, T, H) each
        if hs.shape != ht.shape:
            raise ValueError(
                f"pair ({s}, {t}): student hidden {tuple(hs.shape)} and teacher hidden "
                f"{tuple(ht.shape)} differ; project the student or pick layers of equal width"
            )
        sq = (hs.float() - ht.detach().float()).pow(2).mean(-1)  # (B, T)
        total = total + (sq * weight).sum() / positions
    return total / len(pairs)


@dataclass(frozen=True)
class AgreementSums:
    tokens: int
    student_nll: float  # sum over unmasked tokens of -log p_S(label) at T=1
    teacher_nll: float  # same for the teacher
    kl: float  # sum of KL(p_T || p_S) at T=1
    top1_agree: int  # count where argmax student == argmax teacher

    def __add__(self, other: "AgreementSums") -> "AgreementSums":
        if not isinstance(other, AgreementSums):
            return NotImplemented
        return AgreementSums(
            tokens=self.tokens + other.tokens,
            student_nll=self.student_nll + other.student_nll,
            teacher_nll=self.teacher_nll + other.teacher_nll,
            kl=self.kl + other.kl,
            top1_agree=self.top1_agree + other.top1_agree,
        )

    def __radd__(self, other: object) -> "AgreementSums":
        # Lets the builtin sum() start from 0.
        if other == 0:
            return self
        return NotImplemented


@torch.no_grad()
def agreement_sums(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Optional[Tensor],
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Optional[Tensor],
    labels: Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
) -> AgreementSums:
    """Chunked evaluation statistics (no (N,V) tensors held at once), on each model's soft-capped logits."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = (labels != ignore_index).nonzero().squeeze(1)  # (tokens,)
    # float64 accumulators: the sums run over whole evaluation sets.
    sums = torch.zeros(4, dtype=torch.float64, device=student_hidden.device)
    for chunk in rows.split(chunk_size):
        z_s = _project(student_hidden[chunk], student_weight, student_bias, softcap)  # (c, V)
        z_t = _project(teacher_hidden[chunk], teacher_weight, teacher_bias, teacher_softcap)  # (c, V)
        sums += _agreement_terms(z_s, z_t, labels[chunk])
    student_nll, teacher_nll, kl, agree = sums.tolist()
    return AgreementSums(rows.numel(), student_nll, teacher_nll, kl, int(agree))


def _agreement_terms(z_s: Tensor, z_t: Tensor, y: Tensor) -> Tensor:
    """(student NLL sum, teacher NLL sum, KL(p_T || p_S) sum, top-1 matches) for logits (c, V), labels (c,)."""
    return torch.stack([
        F.cross_entropy(z_s, y, reduction="sum"),
        F.cross_entropy(z_t, y, reduction="sum"),
        _kl(_log_probs(z_t, 1.0), _log_probs(z_s, 1.0)).sum(),
        (z_s.argmax(-1) == z_t.argmax(-1)).sum().float(),
    ]).double()


@torch.no_grad()
def agreement_from_logits(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, chunk_size: int = 1024) -> AgreementSums:
    """`agreement_sums` for models whose logits are all one has (an ONNX model, a quantized one):
    student_logits and teacher_logits (N, V), labels (N,); every row counts."""
    if student_logits.shape != teacher_logits.shape or student_logits.shape[0] != labels.shape[0]:
        raise ValueError(f"shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}, labels {tuple(labels.shape)}")
    sums = torch.zeros(4, dtype=torch.float64, device=student_logits.device)
    for z_s, z_t, y in zip(student_logits.split(chunk_size), teacher_logits.split(chunk_size), labels.split(chunk_size)):
        sums += _agreement_terms(z_s.float(), z_t.float(), y)
    student_nll, teacher_nll, kl, agree = sums.tolist()
    return AgreementSums(labels.numel(), student_nll, teacher_nll, kl, int(agree))


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean NLL); inf where that overflows a float."""
    if tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got tokens={tokens}")
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:
        return float("inf")
