"""Training checkpoints: model (safetensors), optimizer and scheduler state, RNG, step.

Under FSDP2 (`distill.parallel: fsdp`) a checkpoint is distributed instead: `dcp/` holds every process's shards
of the model and AdamW states (torch.distributed.checkpoint, written by all processes at once, readable with any
process count), beside the scheduler state, the main process's RNG and state.json.

Each checkpoint is written into a staging folder (compress.artifacts.staging_dir) and renamed when complete;
the last `keep_last` are kept. Optimizer state is read back with `torch.load(weights_only=True)`.

A run killed while writing one leaves its pid-marked staging folder `.step-N.tmp-PID@HOST-*`; `prepare_resume`
removes those of dead processes (never a live run's), removes checkpoint folders that lack a file, and names the
last complete checkpoint.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from compress.artifacts import OutputKind, remove_stale, staging_dir
from compress.errors import CompressError

_NAME = re.compile(r"^step-(\d{8})$")
_STAGED = re.compile(r"^\.(step-\d{8})\.(tmp|old)-")
CHECKPOINT = OutputKind("checkpoint", ("state.json",), replaced=True)
FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json")  # state.json is written last
SHARDED = "dcp"
SHARDED_FILES = (f"{SHARDED}/.metadata", "scheduler.pt", "rng.safetensors", "state.json")


class CheckpointError(CompressError, RuntimeError):
    """A checkpoint that does not fit the run being resumed."""


def checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def incomplete(path: Path) -> str | None:
    """Why the checkpoint folder `path` is not a complete checkpoint (None when it is one)."""
    missing = [name for name in (SHARDED_FILES if (path / SHARDED).is_dir() else FILES) if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        step = json.loads((path / "state.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return "state.json is not readable JSON"
    match = _NAME.match(path.name)
    if match and step != int(match.group(1)):
        return f"state.json says step {step}"
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders in `root`, oldest first."""
    return [p for p in checkpoint_dirs(root) if incomplete(p) is None]


def latest_checkpoint(root: Path) -> Path | None:
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def clear_staging(root: Path) -> list[Path]:
    """Remove the staging folders that dead runs left in `root` (a live run's are kept) and put back an old
    checkpoint a killed run had moved aside; returns what was removed."""
    if not root.is_dir():
        return []
    before = {p for p in root.iterdir() if _STAGED.match(p.name)}
    for name in sorted({m.group(1) for p in before if (m := _STAGED.match(p.name))}):
        remove_stale(root / name)
    return sorted(p for p in before if not p.exists())


def prepare_resume(root: Path) -> tuple[Path | None, list[str]]:
    """Before a resume: clear dead runs' staging folders and remove checkpoint folders that are not complete
    (a kill or a lost file); return the last complete checkpoint and one line per thing removed."""
    notes = [f"cleared {p}, left by a run that was killed while writing a checkpoint" for p in clear_staging(root)]
    for path in checkpoint_dirs(root):
        reason = incomplete(path)
        if reason is not None:
            shutil.rmtree(path)
            notes.append(f"removed the incomplete checkpoint {path} ({reason})")
    return latest_checkpoint(root), notes


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict, *, keep_last: int, rank: int = 0, sharded=None) -> Path:
    """Call on every rank; rank 0 writes the checkpoint (under FSDP2, `sharded` = the sharded root module: every
    rank writes its shards into rank 0's staging folder). Returns the checkpoint folder."""
    target = root / f"step-{step:08d}"
    if sharded is not None:
        return _save_sharded(target, step, sharded, optimizer, scheduler, state, keep_last=keep_last, rank=rank)
    if rank != 0:
        # Ranks > 0 only contribute their RNG stream; rank 0 renames the folder after a barrier.
        return target
    with staging_dir(target, overwrite=True, kind=CHECKPOINT) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _save_sharded(target: Path, step: int, objective, optimizer, scheduler, state: dict, *, keep_last: int, rank: int) -> Path:
    import torch.distributed as dist

    from compress.distill import sharding

    if rank != 0:
        place = [None]
        dist.broadcast_object_list(place, src=0)
        sharding.save(Path(place[0]) / SHARDED, objective, optimizer)  # collective: returns once every shard is written
        return target
    with staging_dir(target, overwrite=True, kind=CHECKPOINT) as tmp:
        dist.broadcast_object_list([str(tmp)], src=0)
        sharding.save(tmp / SHARDED, objective, optimizer)
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "parallel": "fsdp", "processes": dist.get_world_size(), **state}, indent=2))
    for old in checkpoint_dirs(target.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_checkpoints(root: Path) -> None:
    """Start over: remove the checkpoints and the dead runs' staging folders in `root`, nothing else (the
    folder itself only when that leaves it empty)."""
    if not root.is_dir():
        return
    for path in checkpoint_dirs(root):
        shutil.rmtree(path)
    for name in sorted({m.group(1) for p in root.iterdir() if (m := _STAGED.match(p.name))}):
        remove_stale(root / name)
        if (root / name).is_dir():  # an old checkpoint a killed run had moved aside, just put back
            shutil.rmtree(root / name)
    if not any(root.iterdir()):
        root.rmdir()


def load_checkpoint(path: Path, model, optimizer, scheduler, *, sharded=None) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the saved state (with `step`). `sharded`: the FSDP2
    root module of a `distill.parallel: fsdp` run (call on every rank)."""
    distributed = (path / SHARDED).is_dir()
    if distributed and sharded is None:
        raise CheckpointError(f"checkpoint {path} is distributed (written with distill.parallel: fsdp by several processes); continue it "
                              "under a multi-process launch with distill.parallel: fsdp, or pass --overwrite to start over")
    if not distributed and sharded is not None:
        raise CheckpointError(f"checkpoint {path} holds the whole model (written by one process or with distill.parallel: ddp); continue it "
                              "with distill.parallel: ddp, or pass --overwrite to start over")
    if sharded is not None:
        from compress.distill import sharding

        sharding.load(path / SHARDED, sharded, optimizer)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)["scheduler"])
        _set_rng_state(load_file(str(path / "rng.safetensors")))
        return json.loads((path / "state.json").read_text())
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected or missing:
        raise CheckpointError(f"checkpoint {path} does not fit the student: missing {missing}, unexpected {unexpected}; use --overwrite to start over")
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(load_file(str(path / "rng.safetensors")))
    return json.loads((path / "state.json").read_text())
