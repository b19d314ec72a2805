"""Layer-by-layer GPTQ over calibration activations: the driver around the pure `gptq` core.

Block i is calibrated on the outputs of blocks 0..i-1 *after* they were quantized, as in the paper;
one table (`compress.architectures`) says where the blocks are, for every supported family.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from compress.architectures import get_blocks, layer_layout
from compress.quantize.gptq import accumulate_hessian, gptq_shared
from compress.quantize.grid import QuantGrid, QuantResult, rtn
from compress.quantize.suspended import SuspendedForwards, Workers


class _Captured(Exception):
    """Raised by the hook on block 0 once its inputs are recorded: nothing after it needs to run."""


class _StopForward(Exception):
    """Raised once the Linears being calibrated have seen their inputs: the rest of the block is not needed."""


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    weight_error: float  # ||W - Q||_F / ||W||_F
    output_error: float | None  # ||X (W - Q)^T||_F / ||X W^T||_F on the calibration inputs (GPTQ only)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return ()
    return (Conv1D,)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) view of a Linear's or GPT-2 Conv1D's weight (Conv1D stores (in, out))."""
    return module.weight.T if isinstance(module, _conv1d_type()) else module.weight


def set_linear_weight(module: nn.Module, W: torch.Tensor) -> None:
    value = W.T if isinstance(module, _conv1d_type()) else W
    module.weight.data.copy_(value.to(module.weight.dtype))


def is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    """`skip` entries are module names, last-name components (`down_proj`) or globs (`*.mlp.*`)."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in skip)


def quantizable_linears(model: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Module]:
    """The Linear / Conv1D modules inside the transformer blocks, by full name, minus `skip`."""
    prefix = layer_layout(model.config).blocks
    kinds = (nn.Linear, *_conv1d_type())
    found = {n: m for n, m in model.named_modules() if isinstance(m, kinds) and n.startswith(prefix + ".")}
    return {n: m for n, m in found.items() if not is_skipped(n, skip)}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) that block 0 receives for each calibration batch."""
    block0 = get_blocks(model)[0]
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hidden, rest))
        raise _Captured

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, len(calib), batch_size):
            try:
                model(input_ids=calib[start : start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    calib: torch.Tensor,
    grid: QuantGrid,
    *,
    method: str,
    group_size: int,
    skip: tuple[str, ...],
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    static_groups: bool = False,
    true_sequential: bool = False,
    scale_search: str = "minmax",
    forward_dtype: str = "float32",
    batch_size: int = 8,
    on_layer: Callable[[int, int, list[LayerReport]], None] | None = None,
) -> tuple[dict[str, QuantResult], list[LayerReport]]:
    """Quantize every selected Linear in place (weights replaced by their dequantized values) and
    return the per-module results that the checkpoint format packs.

    forward_dtype="bfloat16" runs the calibration forwards on a bf16 copy of each block, with the
    hidden states between blocks in bf16 too (as GPTQModel does on CPU by default); the weights
    GPTQ reads, the Hessians and the GPTQ math stay fp32 either way."""
    if forward_dtype not in _FORWARD_DTYPES:
        raise ValueError(f"forward_dtype must be one of {list(_FORWARD_DTYPES)}, got {forward_dtype!r}")
    dtype = _FORWARD_DTYPES[forward_dtype]
    linears = quantizable_linears(model, skip)
    if not linears:
        raise ValueError(f"no Linear layers to quantize in {model.config.model_type} after skipping {list(skip)}")
    results: dict[str, QuantResult] = {}
    reports: list[LayerReport] = []
    blocks = get_blocks(model)
    prefix = layer_layout(model.config).blocks
    states = [(h.to(dtype), _cast_floats(kw, dtype)) for h, kw in capture_block_inputs(model, calib, batch_size)] if method == "gptq" else []
    options = dict(group_size=group_size, damp=damp, act_order=act_order, block_size=block_size, static_groups=static_groups, scale_search=scale_search)
    with Workers(len(states) if true_sequential else 0) as workers:  # threads kept for every block
        run = _BlockGPTQ(grid, options, dtype, true_sequential, workers, results)
        for i, block in enumerate(blocks):
            mine = {n: m for n, m in linears.items() if n.startswith(f"{prefix}.{i}.")}
            if method == "gptq":
                states, block_reports = run(block, mine, f"{prefix}.{i}.", states)
            else:
                block_reports = []
                for name, module in mine.items():
                    W = linear_weight(module).float()
                    res = rtn(W, grid, group_size)
                    block_reports.append(_report(name, W, res.Q, None))
                    set_linear_weight(module, res.Q)
                    results[name] = on_cpu(res)
            reports.extend(block_reports)
            if on_layer is not None:
                on_layer(i, len(blocks), block_reports)
    return results, reports


@dataclass
class _BlockGPTQ:
    """GPTQ of one block at a time, with what all blocks share: settings, worker threads, results."""

    grid: QuantGrid
    options: dict
    dtype: torch.dtype
    true_sequential: bool
    workers: Workers
    results: dict[str, QuantResult]
    shape: list[list[str]] | None = None  # the Linear groups, by name inside a block

    def __call__(self, block: nn.Module, mine: dict[str, nn.Module], prefix: str, states) -> tuple[list, list[LayerReport]]:
        """Quantize the Linears `mine` (full name -> module) of `block` on its inputs `states`;
        returns the quantized block's outputs (the next block's states) and the layer reports."""
        reports: list[LayerReport] = []
        # The copy that runs the forwards (the block itself in fp32), with its Linears by the same names.
        runner = block if self.dtype == torch.float32 else copy.deepcopy(block).to(self.dtype)
        ours = {n: runner.get_submodule(n[len(prefix) :]) for n in mine}
        # Linears reading the same input (q/k/v; gate/up) share one Hessian. Blocks of one model
        # share their structure: the groups (one extra forward) are found once.
        if self.shape is None or {prefix + n for g in self.shape for n in g} != set(mine):
            self.shape = [[n[len(prefix) :] for n in g] for g in linear_groups(runner, ours, states)]
        groups = [[prefix + n for n in g] for g in self.shape]

        def quantize_group(group: list[str], H: torch.Tensor) -> None:
            # One GPTQ pass over the stacked rows of the Linears sharing this input.
            Ws = [linear_weight(mine[name]).float() for name in group]
            try:
                shared = gptq_shared(Ws, H, self.grid, **self.options)
            except ValueError as err:
                raise ValueError(f"GPTQ of {', '.join(group)}: {err}") from err
            for name, W, res in zip(group, Ws, shared):
                reports.append(_report(name, W, res.Q, H))
                set_linear_weight(mine[name], res.Q)
                if runner is not block:
                    set_linear_weight(ours[name], res.Q)
                self.results[name] = on_cpu(res)

        if self.true_sequential:
            # Each group calibrated on inputs through the groups quantized before it, in one forward
            # per batch: the forwards pause at each group's input (see `suspended`).
            with SuspendedForwards(runner, [ours[g[0]] for g in groups], states, self.workers) as forwards:
                for group in groups:
                    H, n = None, 0
                    for x in forwards.advance(ours[group[0]]):
                        H, n = accumulate_hessian(H, n, x)  # (..., cols) -> (cols, cols)
                    quantize_group(group, H)
                outputs = forwards.finish()
        else:
            # The paper's order: every group's Hessian from the float block (a forward that stops
            # once the last group has its input, skipping down_proj), then all groups quantized.
            hessians = _block_hessians(runner, ours, groups, states, stop=True)
            for group in groups:
                quantize_group(group, hessians[group[0]])
            outputs = [_block_output(runner(h, **kw)) for h, kw in states]
        # The next block sees what this block produces *now that it is quantized*.
        return [(out, kw) for out, (_, kw) in zip(outputs, states)], reports


_FORWARD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def on_cpu(res: QuantResult) -> QuantResult:
    """A finished layer's result moved to host memory: on CUDA, the codes and the dequantized weight of every
    layer would otherwise stay on the device until the whole model is done (the weights are written from CPU)."""
    if res.Q.device.type == "cpu":
        return res
    return dataclasses.replace(res, Q=res.Q.cpu(), codes=res.codes.cpu(), scales=res.scales.cpu(), zeros=res.zeros.cpu(), g_idx=res.g_idx.cpu())


def _cast_floats(value, dtype: torch.dtype):
    """Floating tensors in a block's keyword arguments (rotary cos/sin, masks) cast to dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def linear_groups(block: nn.Module, linears: dict[str, nn.Module], states) -> list[list[str]]:
    """The block's Linears in call order, grouped by shared input (q/k/v; gate/up), from one forward."""
    groups: list[list[str]] = []
    last: dict = {"x": None}

    def make_hook(name):
        def hook(module, args):
            if args[0] is last["x"]:
                groups[-1].append(name)
            else:
                groups.append([name])
                last["x"] = args[0]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()]
    try:
        hidden, kwargs = states[0]
        block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = set(linears) - {n for g in groups for n in g}
    return groups + ([sorted(missing)] if missing else [])


def _block_hessians(block: nn.Module, linears: dict[str, nn.Module], groups: list[list[str]], states, *, stop: bool = False) -> dict[str, torch.Tensor]:
    """Run the block over every calibration batch, accumulating H = 2/n Σ x xᵀ at the input of each
    group's first Linear (the others read the same tensor); with `stop`, each forward ends once the
    last group has seen its input."""
    sums: dict[str, tuple[torch.Tensor | None, int]] = {g[0]: (None, 0) for g in groups}

    def make_hook(leader):
        def hook(module, args):
            x = args[0]
            sums[leader] = accumulate_hessian(*sums[leader], x)
            if stop and leader == groups[-1][0]:
                raise _StopForward

        return hook

    handles = [linears[g[0]].register_forward_pre_hook(make_hook(g[0])) for g in groups]
    try:
        for h, kw in states:
            try:
                block(h, **kw)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[g[0]][0] for g in groups for name in g}


def _report(name: str, W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor | None) -> LayerReport:
    D = W - Q.float()
    weight_error = (D.norm() / W.norm().clamp_min(1e-12)).item()
    output_error = None
    if H is not None:
        # ||X Dᵀ||² = tr(D XᵀX Dᵀ) ∝ tr(D H Dᵀ): the output error without keeping X around.
        num = (D @ H * D).sum().clamp_min(0)
        den = (W @ H * W).sum().clamp_min(1e-12)
        output_error = (num / den).sqrt().item()
    return LayerReport(name, tuple(W.shape), weight_error, output_error)
