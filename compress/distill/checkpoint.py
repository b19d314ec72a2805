"""Training checkpoints: model (safetensors), optimizer and scheduler state, RNG, step.

Each checkpoint is written into a temporary folder and renamed when complete; the last
`keep_last` are kept. Optimizer state is read back with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

_NAME = re.compile(r"^step-(\d{8})$")


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
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.tmp-", dir=root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


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
