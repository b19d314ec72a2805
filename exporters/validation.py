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
    # max |batched - alone| over max |torch logit|; None = not judged (int8-activation kernels depend on the batch)
    max_batch_rel_diff: float | None = None


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
    # the batched run against each prompt run alone (batch 1): max |logit difference|, share of equal argmax
    batch_max_abs_diff: float
    batch_max_rel_diff: float
    batch_top1_agreement: float

    def within(self, tol: Tolerance) -> bool:
        return (
            (tol.max_rel_diff is None or self.max_rel_diff <= tol.max_rel_diff)
            and self.top1_agreement >= tol.min_top1
            and (tol.max_batch_rel_diff is None or self.batch_max_rel_diff <= tol.max_batch_rel_diff)
        )


def _onnx_dtype(type_str: str):
    return np.float16 if "float16" in type_str else np.float32


def _left_padded(prompt_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    batch, length = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros((batch, length), np.int64)
    for row, prompt in enumerate(prompt_ids):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    return ids, mask


def _torch_rows(model, prompt_ids: list[list[int]], decode_steps: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The torch model on the left-padded batch: per row, the logits of its prompt positions and of
    `decode_steps` greedy steps fed back through the cache; and the greedy tokens (batch, decode_steps)."""
    device = next(model.parameters()).device
    ids, mask = _left_padded(prompt_ids)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    with torch.no_grad():
        ref = model(input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions), use_cache=True)
    logits = ref.logits.float().cpu().numpy()
    rows = [[logits[r][mask[r].astype(bool)]] for r in range(len(ids))]
    forced = []
    for _ in range(decode_steps):
        token = ref.logits[:, -1].float().argmax(-1, keepdim=True).cpu().numpy().astype(np.int64)  # (batch, 1)
        forced.append(token)
        mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
        position = positions[:, -1:] + 1
        positions = np.concatenate([positions, position], axis=1)
        with torch.no_grad():
            ref = model(input_ids=t(token), attention_mask=t(mask), position_ids=t(position), use_cache=True, **{cache_kwarg(model): returned_cache(ref)})
        for r, step in enumerate(ref.logits[:, -1].float().cpu().numpy()):
            rows[r].append(step[None])
    return [np.concatenate(r) for r in rows], np.concatenate(forced, axis=1) if forced else np.zeros((len(ids), 0), np.int64)


def onnx_rows(session, prompt_ids: list[list[int]], forced: np.ndarray) -> list[np.ndarray]:
    """`session` (onnxruntime, the graph as written) on the left-padded batch of `prompt_ids` with an empty
    cache, then one step per column of `forced` (batch, steps), each feeding the returned cache back, as an app
    does. Per row: the logits (float32) of its prompt positions, then of each step."""
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    kv_dtype = _onnx_dtype(inputs[past_names[0]].type)
    ids, mask = _left_padded(prompt_ids)
    batch = len(ids)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for name in past_names:
        _, heads, _, dim = inputs[name].shape
        feeds[name] = np.zeros((batch, heads, 0, dim), kv_dtype)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, feeds)))
    logits = got["logits"].astype(np.float32)
    rows = [[logits[r][mask[r].astype(bool)]] for r in range(batch)]
    for step in range(forced.shape[1]):
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        position = positions[:, -1:] + 1
        positions = np.concatenate([positions, position], axis=1)
        feeds = {"input_ids": forced[:, step:step + 1], "attention_mask": mask, "position_ids": position}
        feeds.update({name: got[name.replace("past_key_values.", "present.")] for name in past_names})
        got = dict(zip(names, session.run(None, feeds)))
        for r, last in enumerate(got["logits"][:, -1].astype(np.float32)):
            rows[r].append(last[None])
    return [np.concatenate(r) for r in rows]


def torch_reference(model, prompt_ids: list[list[int]], *, decode_steps: int = DECODE_STEPS) -> tuple[list[np.ndarray], np.ndarray]:
    """What `compare_with_torch` compares against: per row the torch logits, and the greedy tokens (batch, steps).
    Computed once, it serves several sessions of the same model (build.graph_check)."""
    return _torch_rows(model, prompt_ids, decode_steps)


def compare_with_torch(session, model, prompt_ids: list[list[int]], *, decode_steps: int = DECODE_STEPS, reference: tuple | None = None) -> Comparison:
    """Run `model` (torch, eval) on the left-padded batch, then `session` (onnxruntime) on the same batch,
    teacher-forced with the torch model's greedy tokens for `decode_steps` steps, and compare logits where the
    mask is 1. Then run `session` on each prompt alone (batch 1, the same forced tokens) and compare it with the
    batched run: an app gets the same answer at any batch size only if these agree. `reference`: the model's
    `torch_reference` for these prompts, when already computed (`model` is then not run)."""
    torch_rows, forced = reference if reference is not None else _torch_rows(model, prompt_ids, decode_steps)
    decode_steps = forced.shape[1]
    batched = onnx_rows(session, prompt_ids, forced)
    alone = [onnx_rows(session, [prompt], forced[r:r + 1])[0] for r, prompt in enumerate(prompt_ids)]
    onnx_logits, torch_logits = np.concatenate(batched), np.concatenate(torch_rows)
    if not np.isfinite(onnx_logits).all() or not all(np.isfinite(a).all() for a in alone):
        raise ValidationFailedError("the ONNX model produced non-finite logits (nan/inf) on the validation prompts")
    prompt_len = [len(p) for p in prompt_ids]
    diff = [np.abs(b - t).max(-1) for b, t in zip(batched, torch_rows)]  # per row, per position
    abs_diff = float(np.abs(onnx_logits - torch_logits).max())
    scale = float(np.abs(torch_logits).max()) or 1.0
    batch_diff = float(np.abs(onnx_logits - np.concatenate(alone)).max())
    return Comparison(
        prompts=len(prompt_ids),
        positions=int(onnx_logits.shape[0]),
        decode_steps=decode_steps,
        max_abs_diff=abs_diff,
        max_rel_diff=abs_diff / scale,
        mean_abs_diff=float(np.abs(onnx_logits - torch_logits).mean()),
        prefill_max_abs_diff=float(max(d[:n].max() for d, n in zip(diff, prompt_len))),
        decode_max_abs_diff=float(max((d[n:].max() for d, n in zip(diff, prompt_len) if len(d) > n), default=0.0)),
        top1_agreement=float((onnx_logits.argmax(-1) == torch_logits.argmax(-1)).mean()),
        batch_max_abs_diff=batch_diff,
        batch_max_rel_diff=batch_diff / scale,
        batch_top1_agreement=float((onnx_logits.argmax(-1) == np.concatenate(alone).argmax(-1)).mean()),
    )


def report(comparison: Comparison, tolerance: Tolerance, reference: str) -> dict:
    return {**asdict(comparison), "reference": reference, "tolerance": asdict(tolerance), "passed": comparison.within(tolerance)}
