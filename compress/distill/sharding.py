"""FSDP2 for distillation (`distill.parallel: fsdp` under `accelerate launch` / `torchrun`).

The student's weights, gradients and AdamW states, and a live teacher's weights, are split over the processes
with `torch.distributed.fsdp.fully_shard` (one group per decoder block, the embedding, final norm and head in the
root group); each process all-gathers one block at a time while it runs it. This is the layout of torchtitan and
TRL's FSDP2 path, applied by hand rather than through accelerate's FSDP plugin because the training module is
our `DistillObjective` (student plus fused loss), not a transformers model, and because the teacher is frozen
and sharded separately.

What that changes for the loop, and why each function here exists:
- the root group's parameters (the student's head among them) are whole only inside the root's forward, so
  training *and* evaluation run through `DistillObjective.forward`, never `student.base_model` directly;
- gradients are reduce-scattered after every micro-batch, not only the last (unsynced, FSDP2 accumulates them
  unsharded: the whole model's gradients on every process); the sum is the same up to float rounding;
- the teacher's head is taken before the teacher is sharded: the loss multiplies by it outside the teacher's
  forward, so each process keeps that one matrix whole (its embedding and blocks are sharded);
- checkpoints are distributed (`torch.distributed.checkpoint`, each process writes its shards; `save` /
  `load` below), and resume needs no all-gather of the model into one process;
- the finished student is gathered once, to the main process's CPU, to be written as a plain HF folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compress.architectures import get_blocks


def available() -> str | None:
    """Why FSDP2 cannot run here (None when it can)."""
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this torch build"
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "fully_shard"):  # public from torch 2.6
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2 needs torch >= 2.6)"
    return None


def mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))


def shard_student(objective: nn.Module, device_mesh) -> None:
    """`fully_shard` each decoder block of `objective.student`, then the objective itself (the root: embedding,
    final norm, head; tied weights stay one parameter). In place: `objective` becomes an FSDPModule."""
    from torch.distributed.fsdp import fully_shard

    for block in get_blocks(objective.student):
        fully_shard(block, mesh=device_mesh)
    fully_shard(objective, mesh=device_mesh)


def shard_teacher(teacher: nn.Module, device_mesh) -> None:
    """Shard a frozen live teacher's blocks and its base model (embedding, final norm) over the processes. Its
    forward runs through `teacher.base_model` (compress.distill.teacher.run_teacher), the root here; the lm_head
    is left out of every group (take it, with models.lm_head, before calling this)."""
    from torch.distributed.fsdp import fully_shard

    for block in get_blocks(teacher):
        fully_shard(block, mesh=device_mesh)
    fully_shard(teacher.base_model, mesh=device_mesh)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """The global gradient norm (over every process's shards), after clipping to `max_norm`."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _state(objective, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(objective, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save(path: Path, objective, optimizer) -> None:
    """Every process writes its shards of the model and optimizer into `path` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(objective, optimizer), checkpoint_id=str(path))


def load(path: Path, objective, optimizer) -> None:
    """Read a `save`d checkpoint into the sharded model and optimizer (collective; any process count)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(objective, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(objective, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def gathered_student(objective) -> nn.Module | None:
    """The trained student as a plain (unsharded) model on the CPU, on the main process; None on the others.
    Collective: every process takes part in the all-gather."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    student = objective.student
    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = type(student)(student.config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    for name, buffer in student.named_buffers():  # not sharded, and non-persistent ones (RoPE's inv_freq) are in no state dict
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer.detach().to("cpu", copy=True)
    left = [name for name, p in list(plain.named_parameters()) + list(plain.named_buffers()) if p.is_meta]
    if unexpected or left:
        raise RuntimeError(f"the gathered student does not fit its own class: unexpected {unexpected}, not loaded {left or missing}")
    return plain
