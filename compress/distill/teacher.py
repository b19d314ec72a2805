"""The teacher as a source of outputs: training and evaluation ask one interface, `TeacherSource`,
whether a live model answers (`LiveTeacher`) or a top-k logits cache (`CachedTeacher`).

Training asks for the outputs on blocks (`train_outputs`): a live model gives its final hidden states
(the dense loss applies its lm_head chunk by chunk), the cache gives top-k targets (the sparse loss).
Evaluation asks for the final hidden states on the eval blocks and the lm_head, so teacher perplexity, KL
and top-1 agreement are computed the same, exact way from either source.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from compress import models
from compress.distill.logits_cache import LogitsCache
from compress.distill.sparse import TopKTargets, topk_targets_from_hidden


@dataclass(frozen=True)
class TeacherOutput:
    hidden: torch.Tensor  # (B, T, H_t) final (normed) hidden states
    hidden_states: tuple[torch.Tensor, ...] | None  # per layer, only for the hidden-state loss


@torch.no_grad()
def run_teacher(teacher, input_ids: torch.Tensor, *, with_hidden_states: bool) -> TeacherOutput:
    out = teacher.base_model(input_ids=input_ids, output_hidden_states=with_hidden_states, use_cache=False)
    return TeacherOutput(out.last_hidden_state, out.hidden_states if with_hidden_states else None)


class TeacherSource(ABC):
    """What distillation needs from a teacher; `vocab_size` and `parameters` describe it."""

    vocab_size: int
    parameters: int

    @property
    @abstractmethod
    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's lm_head weight (V, H) and bias, on the training device."""

    @abstractmethod
    def train_outputs(self, index: torch.Tensor, input_ids: torch.Tensor, *, with_hidden_states: bool) -> TeacherOutput | TopKTargets:
        """Outputs on training blocks `index` (b,) of the packed data, whose tokens `input_ids` (b, T) are on
        the device: TeacherOutput (hidden states) or TopKTargets (b, T-1, k) for positions 0..T-2."""

    @abstractmethod
    def eval_hidden(self, index: torch.Tensor, input_ids: torch.Tensor, *, batch_size: int) -> torch.Tensor:
        """Final hidden states (b, T, H) fp32 on the CPU for eval blocks `index` with tokens `input_ids`."""


class LiveTeacher(TeacherSource):
    """A loaded model, already on the device and frozen; run on every batch."""

    def __init__(self, model):
        self.model = model
        self.vocab_size = models.vocab_size(model)
        self.parameters = sum(p.numel() for p in model.parameters())

    @property
    def head(self):
        return models.lm_head(self.model)

    def train_outputs(self, index, input_ids, *, with_hidden_states):
        return run_teacher(self.model, input_ids, with_hidden_states=with_hidden_states)

    @torch.no_grad()
    def topk(self, input_ids: torch.Tensor, k: int, *, temperature: float, chunk_size: int) -> TopKTargets:
        """Top-k targets (b, T-1, k) of this teacher on `input_ids` (b, T): what a cache stores."""
        hidden = run_teacher(self.model, input_ids, with_hidden_states=False).hidden[:, :-1]  # (b, T-1, H)
        b, positions = hidden.shape[:2]
        flat = topk_targets_from_hidden(hidden.reshape(-1, hidden.shape[-1]), *self.head, k, temperature=temperature, chunk_size=chunk_size, softcap=self.head.softcap)
        return TopKTargets(flat.logprobs.view(b, positions, k), flat.indices.view(b, positions, k), flat.tail.view(b, positions))

    @torch.no_grad()
    def eval_hidden(self, index, input_ids, *, batch_size):
        device = next(self.model.parameters()).device
        outs = [
            run_teacher(self.model, input_ids[i : i + batch_size].to(device), with_hidden_states=False).hidden.float().cpu()
            for i in range(0, len(input_ids), batch_size)
        ]
        return torch.cat(outs)


class CachedTeacher(TeacherSource):
    """A complete logits cache: top-k targets for training, stored hidden states and head for evaluation.
    No model is loaded."""

    def __init__(self, cache: LogitsCache, device):
        self.cache, self.device = cache, torch.device(device)
        self.vocab_size = cache.vocab_size
        self.parameters = int(cache.manifest.get("teacher", {}).get("parameters", 0))
        weight, bias = cache.head()
        self._head = (weight.to(self.device), None if bias is None else bias.to(self.device))

    @property
    def head(self):
        return self._head

    def train_outputs(self, index, input_ids, *, with_hidden_states):
        if with_hidden_states:
            raise ValueError("a teacher-logits cache holds no per-layer hidden states; the hidden-state loss needs a live teacher")
        return self.cache.train_targets(index.cpu()).to(input_ids.device)

    def eval_hidden(self, index, input_ids, *, batch_size):
        return self.cache.eval_hidden(index.cpu())
