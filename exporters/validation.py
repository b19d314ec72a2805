"""Export-time validation: the ONNX model against the torch model it came from, on real prompts, through
the same path an app takes (a left-padded batch prefilled with an empty cache, then decode steps that feed
the returned cache back). Records max logit differences and top-1 agreement; judges them by format.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from compress.errors import CompressError
from compress_exporters.decoder import cache_kwarg, returned_cache

# Prompts of different lengths, so the batch is left-padded and the mask path is exercised.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Quantization stores each weight in fewer bits, which",
)
DECODE_STEPS = 4


class ValidationFailedError(CompressError, RuntimeError):
    """The exported model does not reproduce the torch model within its format's tolerance."""


@dataclass(frozen=True)
class Tolerance:
    # max |onnx - torch| over all compared logits, divided by max |torch logit|; None = not judged (quantized
    # formats: one sensitive position, e.g. the first token of SmolLM2, dominates the maximum)
    max_rel_diff: float | None
    min_top1: float  # share of compared positions whose argmax token is the same


@dataclass(frozen=True)
class Comparison:
    prompts: int
    positions: int  # compared (prompt token or decode step) positions over the batch
    decode_steps: int
    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    prefill_max_abs_diff: float
    decode_max_abs_diff: float
    top1_agreement: float

    def within(self, tol: Tolerance) -> bool:
        return (tol.max_rel_diff is None or self.max_rel_diff <= tol.max_rel_diff) and self.top1_agreement >= tol.min_top1


def _onnx_dtype(type_str: str):
    return np.float16 if "float16" in type_str else np.float32


def compare_with_torch(session, model, prompt_ids: list[list[int]], *, decode_steps: int = DECODE_STEPS) -> Comparison:
    """Run `session` (onnxruntime) and `model` (torch, eval) on the same left-padded batch, teacher-forcing
    the torch model's greedy tokens for `decode_steps` steps, and compare logits where the mask is 1."""
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    kv_dtype = _onnx_dtype(inputs[past_names[0]].type)
    device = next(model.parameters()).device
    batch, length = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros((batch, length), np.int64)
    for row, prompt in enumerate(prompt_ids):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for name in past_names:
        _, heads, _, dim = inputs[name].shape
        feeds[name] = np.zeros((batch, heads, 0, dim), kv_dtype)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    with torch.no_grad():
        ref = model(input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions), use_cache=True)
    out = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, out))
    valid = mask.astype(bool)
    pairs = [(got["logits"][valid].astype(np.float32), ref.logits.float().cpu().numpy()[valid])]
    prefill_diff = float(np.abs(pairs[0][0] - pairs[0][1]).max())
    cache = returned_cache(ref)
    decode_diff = 0.0
    for _ in range(decode_steps):
        last = ref.logits[:, -1].float()
        token = last.argmax(-1, keepdim=True).cpu().numpy().astype(np.int64)  # (batch, 1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        position = positions[:, -1:] + 1
        positions = np.concatenate([positions, position], axis=1)
        feeds = {"input_ids": token, "attention_mask": mask, "position_ids": position}
        feeds.update({name: got[name.replace("past_key_values.", "present.")] for name in past_names})
        with torch.no_grad():
            ref = model(input_ids=t(token), attention_mask=t(mask), position_ids=t(position), use_cache=True, **{cache_kwarg(model): cache})
        cache = returned_cache(ref)
        got = dict(zip(names, session.run(None, feeds)))
        step = (got["logits"][:, -1].astype(np.float32), ref.logits[:, -1].float().cpu().numpy())
        decode_diff = max(decode_diff, float(np.abs(step[0] - step[1]).max()))
        pairs.append(step)
    onnx_logits = np.concatenate([p[0] for p in pairs])
    torch_logits = np.concatenate([p[1] for p in pairs])
    if not np.isfinite(onnx_logits).all():
        raise ValidationFailedError("the ONNX model produced non-finite logits (nan/inf) on the validation prompts")
    abs_diff = float(np.abs(onnx_logits - torch_logits).max())
    scale = float(np.abs(torch_logits).max()) or 1.0
    top1 = float((onnx_logits.argmax(-1) == torch_logits.argmax(-1)).mean())
    return Comparison(
        prompts=batch,
        positions=int(onnx_logits.shape[0]),
        decode_steps=decode_steps,
        max_abs_diff=abs_diff,
        max_rel_diff=abs_diff / scale,
        mean_abs_diff=float(np.abs(onnx_logits - torch_logits).mean()),
        prefill_max_abs_diff=prefill_diff,
        decode_max_abs_diff=decode_diff,
        top1_agreement=top1,
    )


def report(comparison: Comparison, tolerance: Tolerance, reference: str) -> dict:
    return {**asdict(comparison), "reference": reference, "tolerance": asdict(tolerance), "passed": comparison.within(tolerance)}
