"""Quality on held-out text, the same windows for every model: perplexity, and against a teacher the KL
divergence per token and top-1 agreement.

One model at a time: the teacher runs first, over every window, and what its LM head reads (the final hidden
states, after the final norm) goes to a memory-mapped file; the teacher is then freed but for its head, which
turns those states back into its logits, batch by batch, while each other model is loaded, measured and freed
in turn. Benchmarking four 8B artifacts thus needs one 8B model's memory (plus the head and the file). The
recomputed logits are checked to equal the teacher's own on the first batch; a teacher whose logits are not its
head's output (an ONNX folder, a model that rescales them) is kept loaded instead, beside one model at a time.
"""
from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from compress.distill.losses import AgreementSums, agreement_from_logits, perplexity

HEAD_INPUTS_FILE = "teacher-head-inputs.bin"


def _next_token(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions for positions 0..T-2 and their labels 1..T-1, flattened: (N, V), (N,)."""
    return logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)


def release() -> None:
    """Give a freed model's memory back (the CUDA cache, glibc's heap)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    from compress.heap import trim

    trim()


class TeacherOnDisk:
    """The teacher's logits on every window without the teacher: its head inputs (memory-mapped) through its head."""

    def __init__(self, head: torch.nn.Module, softcap: float | None, inputs: torch.Tensor, batch_size: int):
        self.head, self.softcap, self.inputs, self.batch_size = head, softcap, inputs, batch_size

    @torch.inference_mode()
    def logits(self, batch: int) -> torch.Tensor:
        rows = self.inputs[batch * self.batch_size : (batch + 1) * self.batch_size]
        return _through_head(self.head, self.softcap, rows.to(self.head.weight.device))


def _through_head(head, softcap: float | None, x: torch.Tensor) -> torch.Tensor:
    logits = head(x)
    if softcap is not None:  # as the model's forward does it (Gemma-2's final_logit_softcapping)
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float().cpu()


@torch.inference_mode()
def record_teacher(teacher, windows: torch.Tensor, batch_size: int, folder: Path, on_batch: Callable[[], None] | None = None) -> TeacherOnDisk | None:
    """Run the teacher over every window once, keeping what its head reads in `folder`; None (nothing kept) when
    its logits are not exactly its head's output on the first batch, or it has no torch head."""
    model = getattr(teacher, "model", None)
    head = model.get_output_embeddings() if model is not None else None
    if head is None or getattr(head, "weight", None) is None:
        return None
    softcap = getattr(model.config, "final_logit_softcapping", None)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    path = Path(folder) / HEAD_INPUTS_FILE
    try:
        with path.open("wb") as fh:
            for b, start in enumerate(range(0, len(windows), batch_size)):
                logits = teacher.logits(windows[start : start + batch_size])
                (x,) = captured
                captured.clear()
                if b == 0:
                    same = x.shape[:2] == logits.shape[:2] and torch.equal(_through_head(head, softcap, x), logits)
                    captured.clear()  # the check's own call of the head
                    if not same:
                        return None
                    dtype, width = x.dtype, x.shape[-1]
                fh.write(x.contiguous().cpu().view(torch.uint8).numpy().tobytes())
                if on_batch:
                    on_batch()
    finally:
        handle.remove()
    n, t = windows.shape
    inputs = torch.from_file(str(path), shared=False, size=n * t * width, dtype=dtype).view(n, t, width)
    return TeacherOnDisk(head, softcap, inputs, batch_size)


@torch.no_grad()
def measure_quality(
    openers: dict[str, Callable[[], object]],
    windows: torch.Tensor,
    *,
    open_teacher: Callable[[], object] | None = None,
    teacher_label: str | None = None,
    batch_size: int = 2,
    scratch: Path | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, dict]:
    """`openers` {label: () -> subject with .logits(ids)}, each opened only for its own pass and freed after it;
    `windows` (n, T) token ids. A subject whose label is `teacher_label` is the teacher itself (KL 0 by
    definition, its logits the teacher's). `scratch`: a folder for the teacher's head inputs (without one, the
    teacher stays loaded beside each subject)."""
    n_batches = math.ceil(len(windows) / batch_size)
    progress = {"done": 0, "passes": len(openers) + (open_teacher is not None)}

    def tick():
        progress["done"] += 1
        if on_batch:
            on_batch(progress["done"], progress["passes"] * n_batches)

    teacher = record = None
    if open_teacher is not None:
        teacher = open_teacher()
        if scratch is not None:
            record = record_teacher(teacher, windows, batch_size, scratch, on_batch=tick)
        if record is not None:
            teacher = None  # only its head stays
            release()
        else:
            log("the teacher stays loaded beside each model: its logits are not its torch head's output")
            progress["passes"] -= 1
    results = {}
    for label, opener in openers.items():
        own = label == teacher_label and open_teacher is not None
        subject = None if own else opener()
        sums: AgreementSums | float = 0
        tokens = 0
        for b, start in enumerate(range(0, len(windows), batch_size)):
            ids = windows[start : start + batch_size]
            reference = record.logits(b) if record is not None else (teacher.logits(ids) if teacher is not None else None)
            logits = reference if own else subject.logits(ids)
            z, y = _next_token(logits, ids)
            if reference is not None:
                sums = sums + agreement_from_logits(z, _next_token(reference, ids)[0], y)
            else:
                sums = sums + F.cross_entropy(z.float(), y, reduction="sum").item()
            tokens += ids[:, 1:].numel()
            tick()
        del subject
        release()
        results[label] = _result(sums, tokens)
    return results


def _result(s: AgreementSums | float, tokens: int) -> dict:
    if isinstance(s, AgreementSums):
        return {
            "ppl": perplexity(s.student_nll, s.tokens),
            "nll_per_token": s.student_nll / s.tokens,
            "kl_per_token": s.kl / s.tokens,
            "top1_agreement": s.top1_agree / s.tokens,
            "teacher_ppl": perplexity(s.teacher_nll, s.tokens),
            "tokens": s.tokens,
        }
    return {"ppl": perplexity(s, tokens), "nll_per_token": s / tokens, "tokens": tokens}
