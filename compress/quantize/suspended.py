"""Forwards through one block, one per calibration batch, that stop at the input of chosen
sub-modules and wait there: true-sequential GPTQ in a single forward per block.

True-sequential GPTQ calibrates q/k/v, then o, then gate/up, then down, each on inputs that pass
through the sub-layers already quantized. Restarting the block for each group costs up to four
forwards per block; here every batch's forward runs in its own thread, pauses at the next group's
input (a forward pre-hook), and resumes once that group is quantized, so each batch goes through
the block once. Only one thread runs at a time (the others wait on a queue), so this is sequential
code with saved stacks, not parallelism: results are deterministic and identical to restarting.

    with Workers(len(inputs)) as workers:  # threads kept for every block of the model
        with SuspendedForwards(block, [q_proj, o_proj, gate_proj, down_proj], inputs, workers) as forwards:
            for module in stops:
                for x in forwards.advance(module):  # every batch's input to `module`, in batch order
                    H = accumulate(H, x)
                quantize(module, H)  # the paused forwards read the new weights when they resume
            outputs = forwards.finish()  # every batch's block output
"""
from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Iterator

import torch
from torch import nn


class _Abort(BaseException):
    """Raised inside a paused forward to unwind it when the caller gives up (error, Ctrl-C)."""


class _Batch:
    """One batch's forward through the block, run as a task on a worker thread."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict, grad: bool):
        self.block, self.hidden, self.kwargs, self.grad = block, hidden, kwargs, grad
        self.to_caller: queue.SimpleQueue = queue.SimpleQueue()  # ("stop", module, x) | ("done", out) | ("error", exc)
        self.to_batch: queue.SimpleQueue = queue.SimpleQueue()  # "go" | "abort"
        self.task: Future | None = None

    def run(self) -> None:
        _current.batch = self
        try:
            # Grad mode and the current CUDA device are per thread: carry the caller's.
            device = torch.cuda.device(self.hidden.device) if self.hidden.is_cuda else contextlib.nullcontext()
            with device, torch.set_grad_enabled(self.grad):
                out = self.block(self.hidden, **self.kwargs)
            self.to_caller.put(("done", out[0] if isinstance(out, tuple) else out))
        except _Abort:
            pass
        except BaseException as err:  # handed to the caller, which raises it
            self.to_caller.put(("error", err))
        finally:
            _current.batch = None

    def pause(self, module: nn.Module, x: torch.Tensor) -> None:
        """Called from the pre-hook on the worker: hand x over, then wait for "go"."""
        self.to_caller.put(("stop", module, x))
        command = self.to_batch.get()
        if command == "abort":
            raise _Abort

    def resume(self, pool: ThreadPoolExecutor) -> tuple:
        """Start or continue this forward; returns what it reported at its next stop or end."""
        if self.task is None:
            self.task = pool.submit(self.run)
        else:
            self.to_batch.put("go")
        event = self.to_caller.get()
        if event[0] == "error":
            raise event[1]
        return event


_current = threading.local()  # the _Batch a worker thread is running


class Workers:
    """Threads that paused forwards run on, one per batch; reuse one set for all blocks of a model:
    a fresh thread's first forward costs ~10 ms more (its OpenMP team and oneDNN state start cold),
    ~15% of a 135M model's block forward on 2 cores."""

    def __init__(self, size: int):
        self.size = size
        self.pool = ThreadPoolExecutor(max(1, size), thread_name_prefix="compress-forward")

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()


class SuspendedForwards:
    """`block(hidden, **kwargs)` for each input, pausing at the input of every module in `stops`.

    The forwards run on `workers` (by default a set of threads of its own, ended on exit)."""

    def __init__(self, block: nn.Module, stops: list[nn.Module], inputs: list[tuple[torch.Tensor, dict]], workers: Workers | None = None):
        if workers is not None and workers.size < len(inputs):
            # Fewer threads than forwards would leave a forward unstarted behind the paused ones: a hang.
            raise ValueError(f"{len(inputs)} paused forwards need at least {len(inputs)} worker threads, got {workers.size}")
        self.block, self.stops = block, list(stops)
        self.batches = [_Batch(block, h, kw, torch.is_grad_enabled()) for h, kw in inputs]
        self._own = workers is None
        self.workers = Workers(len(inputs)) if workers is None else workers
        self._handles: list = []

    def __enter__(self) -> "SuspendedForwards":
        mine = set(map(id, self.batches))

        def hook(module, args):
            batch = getattr(_current, "batch", None)
            if batch is not None and id(batch) in mine:
                batch.pause(module, args[0])

        self._handles = [m.register_forward_pre_hook(hook) for m in dict.fromkeys(self.stops)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        # Unwind forwards not yet finished (an error or Ctrl-C in the caller): a paused one reads "abort"
        # now, one still running (Ctrl-C arrived while the caller waited on it) at its next stop.
        for batch in self.batches:
            if batch.task is not None and not batch.task.done():
                batch.to_batch.put("abort")
        wait([b.task for b in self.batches if b.task is not None])
        if self._own:
            self.workers.pool.shutdown()

    def advance(self, module: nn.Module) -> Iterator[torch.Tensor]:
        """Resume each batch in turn until it reaches `module`; yield its input there."""
        for i, batch in enumerate(self.batches):
            event = batch.resume(self.workers.pool)
            if event[0] != "stop" or event[1] is not module:
                where = "finished the block" if event[0] == "done" else f"stopped at {type(event[1]).__name__}"
                raise RuntimeError(
                    f"calibration batch {i} {where} before reaching {type(module).__name__}: the block calls its "
                    "Linears in a different order for different inputs; set quantize.true_sequential: false"
                )
            yield event[2]

    def finish(self) -> list[torch.Tensor]:
        """Run every batch to the end of the block; their outputs, in batch order."""
        outputs = []
        for i, batch in enumerate(self.batches):
            event = batch.resume(self.workers.pool)
            if event[0] != "done":
                raise RuntimeError(f"calibration batch {i} stopped at {type(event[1]).__name__} after the last group")
            outputs.append(event[1])
        return outputs
