"""Memory plans from configs alone: what each stage of a recipe holds at once on one device, before any weight loads.

`recipe_plans(recipe)` gives one `DevicePlan` per stage it can plan (distill, quantize): `--dry-run` prints them,
and `check_plans` refuses one that does not fit the memory its device has free, with what to change.

Distillation under DDP (`accelerate launch`) holds everything on every process; only the micro-batch is split,
so more processes do not make the models fit. Under FSDP2 (`distill.parallel: fsdp`) the student's weights,
gradients and AdamW states and a live teacher's weights are split over the processes; each holds its shares, the
teacher's head whole, and the blocks it has gathered to run. A plan is per process. The numbers are estimates from shapes:
weights and optimizer states are exact counts, activations a per-token rule (below) that ignores allocator slack.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch

from compress import models
from compress.errors import CompressError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Saved for backward per token and layer of a Llama-like block, in elements: the block input and its norm, q/k/v,
# the attention output and o_proj's input (SDPA keeps no (seq x seq) scores), the residual, the MLP norm, gate, up,
# their activation and product (4 x intermediate). Written 10 h + 4 i; a model with a 4h GELU MLP gives ~26 h.
ACTIVATION_PER_TOKEN = (10, 4)


class PlanError(CompressError, ValueError):
    pass


@dataclass(frozen=True)
class DevicePlan:
    stage: str
    device: str
    parts: list[tuple[str, int]]  # (what, bytes), summed into the peak
    available: int | None  # free on that device now (None: not visible here)
    processes: int = 1
    notes: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # what lowers it, for a refusal

    @property
    def peak(self) -> int:
        return sum(b for _, b in self.parts)

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.peak <= self.available

    def describe(self) -> str:
        where = f"{self.device}" + (f", per process of {self.processes}" if self.processes > 1 else "")
        parts = " + ".join(f"{what} {_size(b)}" for what, b in self.parts if b)
        free = f" of {_size(self.available)} free" if self.available is not None else f" ({self.device} not visible here: not checked)"
        return f"{self.stage} ({where}): {parts} = about {_size(self.peak)}{free}" + "".join(f"\n    {n}" for n in self.notes)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _free(device: str) -> int | None:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    from compress.quantize.sequential import available_bytes

    return available_bytes(torch.device("cpu"))


def _meta(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # tied weights stay tied (accelerate's init_empty_weights unties them)
        return AutoModelForCausalLM.from_config(config)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


def _dims(config) -> tuple[int, int, int]:
    from compress.architectures import num_layers

    hidden = int(config.hidden_size)
    inner = int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden)
    return num_layers(config), hidden, inner


@dataclass(frozen=True)
class Student:
    config: object  # its config (for a pruning budget: the teacher's, an upper bound on widths)
    parameters: int
    how: str


def student_shape(recipe, teacher_config) -> Student:
    """The student's config and parameter count as the recipe will make it, from the teacher's config alone."""
    from compress.architectures import num_layers, select_layers, student_config_from_teacher

    spec = recipe.student
    if spec.from_teacher is not None:
        keep = select_layers(num_layers(teacher_config), spec.from_teacher.layers)
        config = student_config_from_teacher(teacher_config, keep)
        return Student(config, _params(_meta(config)), f"{len(keep)} of the teacher's layers")
    if spec.prune is not None:
        from compress.prune.structure import count_parameters, shape_from_spec, teacher_shape, width_layout

        teacher = _meta(teacher_config)
        if spec.prune.shape is not None:
            shape = shape_from_spec(teacher_shape(teacher_config), spec.prune.shape.model_dump())
            layout, _ = width_layout(teacher)
            config = copy.deepcopy(teacher_config)
            for key, value in shape.as_dict().items():
                setattr(config, key, value)
            if layout is not None:
                config.head_dim = layout.head_dim
                return Student(config, count_parameters(layout, shape), "the pruned shape")
            return Student(config, _params(_meta(config)), "the pruned shape")
        budget = spec.prune.target_params
        total = _params(teacher)
        count = int(budget * total) if budget < 1 else int(budget)
        return Student(teacher_config, count, "the pruning budget (widths bounded by the teacher's)")
    if spec.config is not None:
        config = copy.deepcopy(teacher_config)
        for key, value in spec.config.items():
            setattr(config, key, value)
        return Student(config, _params(_meta(config)), "student.config")
    config = models.load_config(spec.model, trust_remote_code=spec.trust_remote_code)
    return Student(config, _params(_meta(config)), spec.model)


def distill_plan(recipe, *, processes: int | None = None) -> DevicePlan:
    """One process's memory during distillation: teacher, student weights, gradients, AdamW states, DDP buckets,
    the activations of its share of the micro-batch, and the chunked loss's logits."""
    t, spec = recipe.teacher, recipe.distill
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    teacher_config = models.load_config(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
    student = student_shape(recipe, teacher_config)
    device = spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device == "cuda")
    element = 2 if bf16 else 4
    teacher_params = _params(_meta(teacher_config))
    layers, hidden, inner = _dims(student.config)
    t_layers, t_hidden, t_inner = _dims(teacher_config)
    vocab = int(teacher_config.vocab_size)
    per_process = max(spec.batch_size // processes, 1)
    tokens = per_process * recipe.data.seq_len
    a, b = ACTIVATION_PER_TOKEN
    offline = t.logits_cache.enabled
    sharded = processes > 1 and spec.parallel == "fsdp"
    if sharded:
        parts = _fsdp_parts(student, teacher_config, teacher_params, 0 if offline else BYTES[t.dtype], processes)
    else:
        parts = [
            ("teacher weights", 0 if offline else teacher_params * BYTES[t.dtype]),
            ("student weights (fp32)", 4 * student.parameters),
            ("gradients", 4 * student.parameters),
            ("AdamW states", 8 * student.parameters),
            ("DDP buckets", 4 * student.parameters if processes > 1 else 0),
        ]
    parts += [
        ("activations", tokens * layers * (a * hidden + b * inner) * element),
        ("teacher forward", 0 if offline else tokens * (2 * t_hidden + 2 * t_inner) * element),
        ("loss chunk", 4 * min(spec.loss.chunk_size, tokens) * vocab * 4),
    ]
    if spec.hidden.weight > 0:
        pairs = len(spec.hidden.pairs) or layers + 1
        parts.append(("teacher hidden states", tokens * pairs * t_hidden * 4))
    notes = [f"student: {student.parameters / 1e9:.2f} B parameters ({student.how}); teacher {teacher_params / 1e9:.2f} B in {t.dtype}"
             + (" (teacher.logits_cache: not in memory while training)" if offline else "")
             + f"; micro-batch {per_process} x {recipe.data.seq_len} tokens per process, {'bf16 autocast' if bf16 else 'fp32'}"
             + (f"; FSDP2 over {processes} processes" if sharded else f"; DDP over {processes} processes" if processes > 1 else "")]
    changes = ["lower distill.batch_size (raise distill.grad_accum to keep the tokens per step)", "a shorter data.seq_len",
               "a smaller distill.loss.chunk_size"]
    if not offline:
        changes.append("teacher.logits_cache.enabled: true (the teacher runs once, before training, and is not held while the student trains)")
        if t.dtype == "float32":
            changes.append("teacher.dtype: bfloat16")
    if sharded:
        changes.append("more processes (each holds 1/N of the student's training state and of the teacher)")
    elif processes > 1:
        changes.append(f"distill.parallel: fsdp (splits the student's weights, gradients and AdamW states and a live teacher over the {processes} processes)")
    else:
        changes.append("several processes with distill.parallel: fsdp (`accelerate launch --num_processes N -m compress.cli distill RECIPE`: each holds 1/N of the student's training state and of the teacher)")
    changes.append("a device with more memory" + ("" if sharded else " (DDP processes each hold the models whole)"))
    return DevicePlan("distill", device, parts, _free(device), processes, notes, changes)


def _root_and_block(config, parameters: int) -> tuple[int, int]:
    """(the parameters outside the decoder blocks: embedding, head when untied, final norm; one block's)."""
    layers, hidden, _ = _dims(config)
    root = int(config.vocab_size) * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2) + hidden
    return root, max(parameters - root, 0) // max(layers, 1)


def _fsdp_parts(student: Student, teacher_config, teacher_params: int, teacher_bytes: int, processes: int) -> list[tuple[str, int]]:
    """One FSDP2 process (compress.distill.sharding): 1/N of every sharded tensor; whole, the teacher's head (the loss
    multiplies by it outside the teacher's forward) and what is gathered at once: the student's root group (embedding,
    head, norm: unsharded through its forward and backward) with its gradients, and two blocks of each model (the one
    running and the one prefetched). Gradients are reduce-scattered after every micro-batch, so they stay sharded."""
    n = processes
    s_root, s_block = _root_and_block(student.config, student.parameters)
    _, t_block = _root_and_block(teacher_config, teacher_params)
    t_head = int(teacher_config.vocab_size) * int(teacher_config.hidden_size)
    # A tied head is the embedding, sharded, and the head kept whole besides; an untied one is in no group.
    t_sharded = teacher_params if getattr(teacher_config, "tie_word_embeddings", False) else teacher_params - t_head
    return [
        ("teacher weights (1/N)", -(-t_sharded * teacher_bytes // n)),
        ("teacher head (whole)", t_head * teacher_bytes),
        ("teacher blocks gathered", 2 * t_block * teacher_bytes),
        ("student weights (fp32, 1/N)", -(-4 * student.parameters // n)),
        ("gradients (1/N)", -(-4 * student.parameters // n)),
        ("AdamW states (1/N)", -(-8 * student.parameters // n)),
        ("student gathered (root + 2 blocks, with gradients)", 8 * (s_root + 2 * s_block)),
    ]


def quantize_plan(recipe, source_config) -> DevicePlan | None:
    """Block-at-a-time GPTQ/RTN of a model of `source_config`: `quantize.sequential.memory_plan` on its meta skeleton."""
    from compress.quantize.calibrate import quantizable_linears
    from compress.quantize.sequential import Onloader, resolve_activations

    spec = recipe.quantize
    if spec is None or spec.method not in ("gptq", "rtn") or spec.load == "whole":
        return None
    device = spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    onloader = Onloader.skeleton(source_config, device=torch.device("cpu"))
    calib = torch.empty((spec.calib.samples, spec.calib.seq_len), device="meta") if spec.method == "gptq" else None
    data = recipe.data
    eval_ids = torch.empty((max(data.max_eval_tokens // data.seq_len, 1), data.seq_len), device="meta") if data.max_eval_tokens else None
    plan = resolve_activations(onloader, quantizable_linears(onloader.model, tuple(spec.skip)), spec, calib, eval_ids, device=torch.device(device))
    parts = [("float block", plan.block), ("forward copy", plan.runner), ("Hessians", plan.hessians), ("GPTQ", plan.gptq), ("activations", plan.activations)]
    notes = [f"block at a time; the embedding/head ({_size(plan.rest)}) replace the block while they are onloaded"]
    if plan.offloaded:
        notes.append(f"quantize.activations: {plan.where}: {_size(plan.offloaded)} of states between blocks {'in host memory' if plan.where == 'cpu' else 'on disk'}, one batch at a time on the device")
    if plan.rest > plan.block + plan.runner + plan.hessians + plan.gptq:
        parts = [("embedding/head", plan.rest), ("activations", plan.activations)]
    return DevicePlan("quantize", device, parts, _free(device), 1, notes, (["quantize.activations: cpu or disk (the states between blocks off the device)"] if not plan.offloaded else [])
                      + ["lower quantize.calib.samples or seq_len", "lower data.max_eval_tokens"])


def recipe_plans(recipe, *, processes: int | None = None) -> list[DevicePlan]:
    plans = [distill_plan(recipe, processes=processes)]
    t = recipe.teacher
    student = student_shape(recipe, models.load_config(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code))
    q = quantize_plan(recipe, student.config)
    if q is not None:
        plans.append(q)
    return plans


def check_plans(plans: list[DevicePlan]) -> None:
    """Refuse the first plan that does not fit its device's free memory, with the numbers and what to change."""
    for plan in plans:
        if plan.fits is False:
            raise PlanError(f"memory plan: {plan.describe()}\n  it does not fit; change one of: " + "; ".join(plan.changes))
