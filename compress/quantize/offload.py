"""Where block-at-a-time quantization keeps the states that pass between blocks (`quantize.activations`).

The calibration hidden states entering and leaving a block, and the evaluation states (float and quantized),
are the one part of the run that grows with the data rather than with a block. `ActivationStore.keep` puts one
batch's tensor where the recipe says and returns a handle; `load` gives it back on the compute device for that
batch's forward, so the device holds one batch at a time instead of all of them:
- `device`: left on the compute device (the handle is the tensor);
- `cpu`: host memory, copied to the device for each forward (on a CPU device the same as `device`);
- `disk`: one raw file per tensor in a scratch folder beside the output, memory-mapped back for each forward
  (`torch.from_file`); a file is removed when its handle is dropped, the folder when the store closes.
The round trip is exact (bytes in, bytes out), so the codes do not depend on the setting (tests/test_sequential.py).
With `quantize.true_sequential: true` every batch's forward is alive at once (paused at each group's input), so
a block's inputs are all on the device while it is calibrated; only the states between blocks move out.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

PLACES = ("device", "cpu", "disk")


class _OnDisk:
    """One tensor in a raw file; the file goes when the handle does."""

    __slots__ = ("path", "shape", "dtype")

    def __init__(self, path: Path, tensor: torch.Tensor):
        self.path, self.shape, self.dtype = path, tuple(tensor.shape), tensor.dtype
        flat = tensor.detach().contiguous().cpu().reshape(-1)
        with open(path, "wb") as fh:
            fh.write(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")

    def read(self) -> torch.Tensor:
        count = math.prod(self.shape)
        if count == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.from_file(str(self.path), shared=False, size=count, dtype=self.dtype).view(self.shape)

    def __del__(self):
        try:
            os.unlink(self.path)
        except (OSError, TypeError):
            pass


def moves_off(where: str, device: torch.device) -> bool:
    """Whether states kept `where` leave the compute `device` (host memory on a CPU device is the device)."""
    return where == "disk" or (where == "cpu" and device.type != "cpu")


class ActivationStore:
    def __init__(self, where: str, device: torch.device, folder: Path | None = None):
        if where not in PLACES:
            raise ValueError(f"activations must be one of {list(PLACES)}, got {where!r}")
        if where == "disk" and folder is None:
            raise ValueError("activations on disk need a folder")
        self.where, self.device, self.folder = where, torch.device(device), folder
        self._names = itertools.count()
        if folder is not None and where == "disk":
            folder.mkdir(parents=True, exist_ok=True)

    def keep(self, tensor: torch.Tensor):
        if self.where == "disk":
            return _OnDisk(self.folder / f"{next(self._names):08d}.bin", tensor)
        if self.where == "cpu":
            return tensor.to("cpu")
        return tensor

    def load(self, handle) -> torch.Tensor:
        """On the compute device."""
        if self.where == "device":
            return handle
        if isinstance(handle, _OnDisk):
            return handle.read().to(self.device)
        return handle.to(self.device)

    @staticmethod
    def dtype(handle) -> torch.dtype:
        """The kept tensor's dtype, without reading it."""
        return handle.dtype

    def to_cpu(self, handle) -> torch.Tensor:
        return handle.read() if isinstance(handle, _OnDisk) else handle.cpu()

    def close(self) -> None:
        if self.where == "disk" and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


DEVICE = ActivationStore("device", torch.device("cpu"))  # keeps every tensor where it is: keep and load are the identity


class Loaded(Sequence):
    """A list of handles read as tensors on the device, one at a time, when indexed."""

    def __init__(self, store: ActivationStore, handles: list):
        self.store, self.handles = store, handles

    def __len__(self) -> int:
        return len(self.handles)

    def __getitem__(self, b: int) -> torch.Tensor:
        return self.store.load(self.handles[b])


class LazyStates(Sequence):
    """(hidden states, keyword arguments) per batch, as `BlockInputs.states` gives them, the hidden states read
    from the store only when their batch is indexed."""

    def __init__(self, store: ActivationStore, handles: list, kwargs: list[dict]):
        if len(handles) != len(kwargs):
            raise ValueError(f"{len(handles)} hidden states for {len(kwargs)} batches of block arguments")
        self.store, self.handles, self.kwargs = store, handles, kwargs

    def __len__(self) -> int:
        return len(self.handles)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, dict]:
        return self.store.load(self.handles[b]), self.kwargs[b]
