"""The student's training objective as one module, so DDP sees the whole loss inside `forward`.

Both models run without their lm_head; the fused loss applies the heads chunk by chunk.
"""
from __future__ import annotations

import torch
from torch import nn

from compress import models
from compress.architectures import UnsupportedArchitectureError
from compress.distill.losses import AgreementSums, agreement_sums, fused_distill_loss, hidden_state_loss
from compress.distill.sparse import TopKTargets, fused_sparse_distill_loss
from compress.distill.teacher import TeacherOutput

_head = models.lm_head


def check_plain_head(config) -> None:
    """The fused loss computes logits = hidden @ W.T (+ b), soft-capped where the model caps them (Gemma-2's
    final_logit_softcapping); refuse models (by config) that post-process logits in any other way."""
    for key in ("logit_scale", "logits_scaling"):
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise UnsupportedArchitectureError(f"{config.model_type}: logits are post-processed ({key}={value}); the fused distillation loss does not support it")


class DistillObjective(nn.Module):
    def __init__(self, student, teacher_head: tuple[torch.Tensor, torch.Tensor | None], loss_spec, hidden_weight: float, hidden_pairs: list[tuple[int, int]]):
        super().__init__()
        self.student = student
        self.loss_spec = loss_spec
        self.hidden_weight = hidden_weight
        self.hidden_pairs = hidden_pairs
        # Held outside the module's parameters: the teacher is not trained and not synchronised.
        self._teacher_head = teacher_head

    def forward(self, input_ids: torch.Tensor, teacher: TeacherOutput | TopKTargets | None = None, *, eval_hidden: torch.Tensor | None = None):
        """`teacher`: a live teacher's hidden states (dense loss through its lm_head) or top-k targets
        (b, T-1, k) from a logits cache (the sparse loss of compress.distill.sparse); returns the loss and its
        terms. `eval_hidden` instead: the teacher's final hidden states (b, T, H_t) on held-out blocks; returns
        their AgreementSums. Evaluation goes through forward too: under FSDP2 the student's head and embedding
        are whole only inside it (compress.distill.sharding)."""
        if eval_hidden is not None:
            return self._agreement(input_ids, eval_hidden)
        spec = self.loss_spec
        need_states = self.hidden_weight > 0
        out = self.student.base_model(input_ids=input_ids, output_hidden_states=need_states, use_cache=False)
        h = out.last_hidden_state[:, :-1]  # (B, T-1, H): position t predicts token t+1
        labels = input_ids[:, 1:].reshape(-1)
        head = _head(self.student)
        weight, bias = head
        knobs = dict(kind=spec.kind, temperature=spec.temperature, beta=spec.beta, alpha=spec.alpha, ce_weight=spec.ce_weight, chunk_size=spec.chunk_size, softcap=head.softcap)
        if isinstance(teacher, TopKTargets):
            if need_states:
                raise ValueError("the hidden-state loss needs a live teacher's hidden states, not top-k targets")
            result = fused_sparse_distill_loss(h.reshape(-1, h.shape[-1]), weight, bias, teacher.rows(), labels, **knobs)
        else:
            t_weight, t_bias = self._teacher_head
            th = teacher.hidden[:, :-1].reshape(-1, teacher.hidden.shape[-1])
            result = fused_distill_loss(h.reshape(-1, h.shape[-1]), weight, bias, th, t_weight, t_bias, labels,
                                        teacher_softcap=getattr(self._teacher_head, "softcap", None), **knobs)
        loss = result.loss
        stats = {"divergence": result.divergence, "ce": result.ce}
        if need_states:
            mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            hidden = hidden_state_loss(out.hidden_states, teacher.hidden_states, self.hidden_pairs, mask)
            loss = loss + self.hidden_weight * hidden
            stats["hidden_mse"] = hidden.detach()
        stats["loss"] = loss
        return stats


    def _agreement(self, ids: torch.Tensor, teacher_hidden: torch.Tensor) -> AgreementSums:
        head = _head(self.student)
        weight, bias = head
        h = self.student.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        th = teacher_hidden.to(weight.device)[:, :-1]
        return agreement_sums(
            h.reshape(-1, h.shape[-1]), weight, bias, th.reshape(-1, th.shape[-1]), *self._teacher_head,
            ids[:, 1:].reshape(-1), chunk_size=self.loss_spec.chunk_size, softcap=head.softcap,
            teacher_softcap=getattr(self._teacher_head, "softcap", None),
        )


@torch.no_grad()
def evaluate(objective: DistillObjective, eval_ids: torch.Tensor, teacher_hidden: torch.Tensor, *, batch_size: int, device, real: int | None = None) -> AgreementSums:
    """Sums over held-out blocks; `teacher_hidden` (n, T, H_t) is computed once per run, not per evaluation.
    `objective` is the module itself (sharded or not), never a DDP wrapper. Only the first `real` blocks count:
    the rest pad this process's share to the length every process has, so that all make the same number of
    forward calls (each one all-gathers a sharded model); a batch of padding alone is run and discarded."""
    real = len(eval_ids) if real is None else real
    student = objective.student
    was_training = student.training
    student.eval()
    total = AgreementSums(tokens=0, student_nll=0.0, teacher_nll=0.0, kl=0.0, top1_agree=0)
    for start in range(0, len(eval_ids), batch_size):
        stop = min(start + batch_size, real) if start < real else start + batch_size
        sums = objective(eval_ids[start:stop].to(device), eval_hidden=teacher_hidden[start:stop])
        if start < real:
            total = total + sums
    student.train(was_training)
    return total
