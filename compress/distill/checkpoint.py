"""Training checkpoints: model (safetensors), optimizer and scheduler state, RNG, step.

Each checkpoint is written into a staging folder (compress.artifacts.staging_dir) and renamed when complete;
the last `keep_last` are kept. Optimizer state is read back with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from compress.artifacts import OutputKind, remove_stale, staging_dir

_NAME = re.compile(r"^step-(\d{8})$")
_STAGED = re.compile(r"^\.(step-\d{8})\.(tmp|old)-")
CHECKPOINT = OutputKind("checkpoint", ("state.json",), replaced=True)


def checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    complete = [p for p in checkpoint_dirs(root) if (p / "state.json").is_file()]
    return complete[-1] if complete else None


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


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict, *, keep_last: int, rank: int = 0) -> Path:
    """Call on every rank (each saves its RNG); rank 0 writes the rest. Returns the checkpoint folder."""
    target = root / f"step-{step:08d}"
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


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the saved state (with `step`)."""
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected or missing:
        raise RuntimeError(f"checkpoint {path} does not fit the student: missing {missing}, unexpected {unexpected}")
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(load_file(str(path / "rng.safetensors")))
    return json.loads((path / "state.json").read_text())
