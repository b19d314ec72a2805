"""Layer-by-layer GPTQ over calibration activations: the driver around the pure `gptq` core.

Block i is calibrated on the outputs of blocks 0..i-1 *after* they were quantized, as in the paper,
with the arguments the model itself passes block i (its own mask and rotary table in hybrid models);
`compress.architectures` says where the blocks are, for every supported family.
"""
from __future__ import annotations

import contextlib
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
from compress.quantize.offload import DEVICE as DEVICE_STORE
from compress.quantize.offload import ActivationStore, LazyStates
from compress.quantize.suspended import SuspendedForwards, Workers


class _StopForward(Exception):
    """Raised once the Linears being calibrated have seen their inputs: the rest of the block is not needed."""


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    weight_error: float  # ||W - Q||_F / ||W||_F
    output_error: float | None  # ||X (W - Q)^T||_F / ||X W^T||_F on the calibration inputs (GPTQ only)
    tokens: int | None = None  # calibration tokens that reached the layer (GPTQ only; fewer than all for experts)
    fallback: str | None = None  # why the layer was rounded to nearest instead (GPTQ only)


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


@dataclass
class BlockInputs:
    """What the model itself passes each block, captured from its own forward over the calibration batches.

    `hidden[b]` is block 0's input for batch b; `kwargs[i][b]` block i's other arguments (attention mask,
    rotary cos/sin, positions, ...) by name, positional ones (GPT-2's mask) included. They differ per
    block in hybrid models (Gemma-2/3: sliding-window and global layers, each with its own mask and
    rotary table), so each block is calibrated with its own, never block 0's."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]
    template: object = None  # one real block output (a tensor, or a tuple whose tail a pass-through repeats)

    def states(self, index: int, hidden: list[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, dict]]:
        """(hidden states, keyword arguments) per batch for block `index`; `hidden` defaults to block 0's inputs."""
        return list(zip(self.hidden if hidden is None else hidden, self.kwargs[index]))


def _named_arguments(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(hidden states, every other argument by name) of one call of a block, named by its class's forward (an
    instance-level wrapper, e.g. accelerate's, takes *args and **kwargs and would name nothing)."""
    import inspect

    bound = inspect.signature(type(block).forward).bind(block, *args, **kwargs)
    named: dict = {}
    for name, value in list(bound.arguments.items())[1:]:  # without self
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(block).__name__}.forward takes *{name}; its extra positional inputs cannot be replayed by name")
        else:
            named[name] = value
    first = next(iter(named))
    return named.pop(first), named


@contextlib.contextmanager
def _forwards_replaced(blocks, make: Callable[[int, nn.Module], Callable]):
    """Every block's forward replaced by `make(index, block)` for the duration. A block may already carry an
    instance-level forward (accelerate's offload hooks wrap it that way): it is restored afterwards, not deleted."""
    own = [block.__dict__.get("forward") for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = make(index, block)
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward  # back to the class's forward
            else:
                block.forward = forward


@torch.no_grad()
def capture_calibration(model: nn.Module, calib: torch.Tensor, batch_size: int, keep: Callable[[torch.Tensor], object] | None = None) -> BlockInputs:
    """Block 0's hidden states and every block's own arguments for each calibration batch, from one pass of
    the model's forward in which each block is replaced by a pass-through that records its arguments (no
    block computes; the head never runs). `keep(hidden)` gives what `hidden[b]` holds (default: the tensor;
    an offload store's handle: compress.quantize.offload)."""
    blocks = get_blocks(model)
    captured = BlockInputs(hidden=[], kwargs=[[] for _ in blocks])
    template: dict = {}  # the structure of a real block's output (a tensor in transformers 5, a tuple before)

    def recorder(index: int, block: nn.Module, forward):
        def record(*args, **kwargs):
            hidden, named = _named_arguments(block, args, kwargs)
            if index == 0:
                captured.hidden.append(hidden if keep is None else keep(hidden))
            captured.kwargs[index].append(named)
            if "out" not in template:
                template["out"] = forward(*args, **kwargs)
            out = template["out"]
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        return record

    device = model.get_input_embeddings().weight.device
    with _forwards_replaced(blocks, lambda index, block: recorder(index, block, block.forward)):
        for start in range(0, len(calib), batch_size):
            model.base_model(input_ids=calib[start : start + batch_size].to(device), use_cache=False)
    missing = [i for i, kw in enumerate(captured.kwargs) if len(kw) != len(captured.hidden)]
    if missing:
        raise RuntimeError(f"{model.config.model_type}: the model's forward did not call blocks {missing} once per batch; they cannot be calibrated")
    captured.template = template.get("out")
    return captured


def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) that block 0 receives for each calibration batch."""
    return capture_calibration(model, calib, batch_size).states(0)


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
    min_tokens: int | None = None,
    on_layer: Callable[[int, int, list[LayerReport]], None] | None = None,
    final_hidden: list[torch.Tensor] | None = None,
    hooks: "BlockHooks | None" = None,
    calibration: BlockInputs | None = None,
    start: int = 0,
    start_hidden: list[torch.Tensor] | None = None,
    results: dict | None = None,
    store: ActivationStore | None = None,
) -> tuple[dict[str, QuantResult], list[LayerReport]]:
    """Quantize every selected Linear in place (weights replaced by their dequantized values) and
    return the per-module results that the checkpoint format packs.

    forward_dtype="bfloat16" runs the calibration forwards on a bf16 copy of each block, with the
    hidden states between blocks in bf16 too (as GPTQModel does on CPU by default); the weights
    GPTQ reads, the Hessians and the GPTQ math stay fp32 either way.

    A layer that fewer than `min_tokens` calibration tokens reached (None: fewer than its input width, where its
    Hessian is singular) is rounded to nearest on the same grid instead, and its report says so: only experts
    of mixture-of-experts layers are reached by fewer than all tokens (by none when the router never picks them
    on the calibration text), and GPTQ on a handful of tokens fits those tokens, not the data.

    `final_hidden` (GPTQ): a list that receives the last block's outputs per calibration batch, through the
    quantized blocks (what `quantize_head` calibrates the LM head on).

    Block-at-a-time (`compress.quantize.sequential`): `hooks.before(i, block)` onloads block i before it is
    touched and `hooks.after(i, block, outputs, reports, results)` writes and frees it; `calibration` is a capture
    made beforehand; `start` / `start_hidden` continue an interrupted run at block `start` from its inputs;
    `results` receives each finished layer (a mapping that packs on insert keeps a block's results small);
    `store` (compress.quantize.offload) holds the states between blocks, and `calibration.hidden` /
    `start_hidden` are its handles: each batch is on the device only for its forwards."""
    if forward_dtype not in _FORWARD_DTYPES:
        raise ValueError(f"forward_dtype must be one of {list(_FORWARD_DTYPES)}, got {forward_dtype!r}")
    dtype = _FORWARD_DTYPES[forward_dtype]
    linears = quantizable_linears(model, skip)
    if not linears:
        raise ValueError(f"no Linear layers to quantize in {model.config.model_type} after skipping {list(skip)}")
    results = {} if results is None else results
    reports: list[LayerReport] = []
    blocks = get_blocks(model)
    prefix = layer_layout(model.config).blocks
    store = DEVICE_STORE if store is None else store
    if calibration is not None:
        captured = calibration
    else:
        captured = capture_calibration(model, calib, batch_size, keep=store.keep) if method == "gptq" else BlockInputs([], [])
    hidden = [h if store.dtype(h) == dtype else store.keep(store.load(h).to(dtype)) for h in (captured.hidden if start_hidden is None else start_hidden)]
    captured.hidden = []  # block 0's inputs as captured (fp32 when the forwards run in bf16) are not held through the blocks: `hidden` has them
    cast: dict = {}  # tensors the blocks share (one rotary table, one mask) are cast once
    options = dict(group_size=group_size, damp=damp, act_order=act_order, block_size=block_size, static_groups=static_groups, scale_search=scale_search)
    with Workers(len(hidden) if true_sequential else 0) as workers:  # threads kept for every block
        run = _BlockGPTQ(grid, options, dtype, true_sequential, workers, results, min_tokens, store=store)
        for i, block in enumerate(blocks):
            if i < start:  # finished by the run this one continues
                if method == "gptq":
                    captured.kwargs[i] = []
                continue
            if hooks is not None:
                hooks.before(i, block)
            mine = {n: m for n, m in linears.items() if n.startswith(f"{prefix}.{i}.")}
            if method == "gptq":
                states = LazyStates(store, hidden, [_cast_floats(kw, dtype, cast) for kw in captured.kwargs[i]])
                captured.kwargs[i] = []  # this block's own arguments are not needed again
                hidden, block_reports = run(block, mine, f"{prefix}.{i}.", states)
            else:
                block_reports = []
                for name, module in mine.items():
                    W = linear_weight(module).float()
                    res = rtn(W, grid, group_size)
                    block_reports.append(_report(name, W, res.Q, None))
                    set_linear_weight(module, res.Q)
                    results[name] = on_cpu(res)
            reports.extend(block_reports)
            if hooks is not None:
                hooks.after(i, block, hidden, block_reports, results)
            if on_layer is not None:
                on_layer(i, len(blocks), block_reports)
    if final_hidden is not None and method == "gptq":
        final_hidden.extend(store.load(h) for h in hidden)
    return results, reports


def _model_inputs(model: nn.Module, ids: torch.Tensor) -> dict:
    """input_ids, or, while the input embedding is offloaded (block-at-a-time quantization), zero embeddings of the
    same shape: a replay's blocks return stored outputs, so what enters them does not matter."""
    weight = model.get_input_embeddings().weight
    if not weight.is_meta:
        return {"input_ids": ids}
    head = model.get_output_embeddings().weight
    return {"inputs_embeds": torch.zeros(*ids.shape, weight.shape[1], dtype=head.dtype, device=head.device)}


class BlockHooks:
    """What the block driver calls around each block (no-ops here): see `compress.quantize.sequential`."""

    def before(self, index: int, block: nn.Module) -> None:
        pass

    def after(self, index: int, block: nn.Module, outputs: list[torch.Tensor], reports: list[LayerReport], results: dict[str, QuantResult]) -> None:
        pass


@torch.no_grad()
def head_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int, final_hidden: list[torch.Tensor], template=None) -> list[torch.Tensor]:
    """What the LM head reads for each calibration batch when the last block outputs `final_hidden[b]`: the
    model's own forward with every block replaced by a pass-through that returns the stored output, stopped at
    the head's input. Whatever the family puts between the blocks and the head (final norm, OPT's project_out)
    runs as the model runs it; no block computes (`template`, a block output from `capture_calibration`, spares
    the one real block call that otherwise gives the output's structure: blocks offloaded to meta cannot run)."""
    return _replayed(model, calib, batch_size, final_hidden, template, head=True)


@torch.no_grad()
def logits_from_final(model: nn.Module, ids: torch.Tensor, batch_size: int, final_hidden: list[torch.Tensor], template=None) -> list[torch.Tensor]:
    """The model's logits per batch of `ids` when its last block outputs `final_hidden[b]` (as `head_inputs`)."""
    return _replayed(model, ids, batch_size, final_hidden, template, head=False)


def _replayed(model: nn.Module, calib: torch.Tensor, batch_size: int, final_hidden: list[torch.Tensor], given, *, head: bool) -> list[torch.Tensor]:
    blocks = get_blocks(model)
    batch = {"b": 0}
    template: dict = {} if given is None else {"out": given}
    seen: list[torch.Tensor] = []

    def stored(forward):
        def run(*args, **kwargs):
            if "out" not in template:
                template["out"] = forward(*args, **kwargs)
            out, h = template["out"], final_hidden[batch["b"]]
            h = h.to(args[0].dtype if args and isinstance(args[0], torch.Tensor) else h.dtype)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return run

    def grab(module, args):
        seen.append(args[0].detach().float())
        raise _StopForward

    handle = model.get_output_embeddings().register_forward_pre_hook(grab) if head else None
    device = model.get_output_embeddings().weight.device
    try:
        with _forwards_replaced(blocks, lambda index, block: stored(block.forward)):
            for b, start in enumerate(range(0, len(calib), batch_size)):
                batch["b"] = b
                ids = calib[start : start + batch_size].to(device)
                try:
                    out = model(**_model_inputs(model, ids), use_cache=False)
                    seen.append(out.logits)
                except _StopForward:
                    pass
    finally:
        if handle is not None:
            handle.remove()
    if len(seen) != len(final_hidden):
        raise RuntimeError(f"{model.config.model_type}: the LM head was reached {len(seen)} times for {len(final_hidden)} batches")
    return seen


HEAD_ROWS = 8192  # vocabulary rows GPTQ'd at once: rows are independent, so chunks bound the working memory


@torch.no_grad()
def quantize_head(model: nn.Module, inputs: list[torch.Tensor], grid: QuantGrid, *, group_size: int, act_order: bool, damp: float = 0.01, block_size: int = 128, scale_search: str = "minmax") -> tuple[QuantResult, LayerReport]:
    """GPTQ of the LM head on what it reads (`head_inputs`): the vocabulary rows are the output channels, the
    Hessian is that of the final hidden states. The model is left unchanged (a tied head is the embedding too)."""
    chunks, report = [], None
    for res, report in _head_chunks(model, inputs, grid, group_size=group_size, act_order=act_order, damp=damp, block_size=block_size, scale_search=scale_search):
        chunks.append(res)
    first = chunks[0]
    res = dataclasses.replace(
        first, Q=torch.cat([c.Q for c in chunks]), codes=torch.cat([c.codes for c in chunks]),
        scales=torch.cat([c.scales for c in chunks], dim=1), zeros=torch.cat([c.zeros for c in chunks], dim=1),
    )
    return res, report


@torch.no_grad()
def quantize_head_packed(model: nn.Module, inputs: list[torch.Tensor], grid: QuantGrid, *, v2: bool, **options):
    """`quantize_head`, each chunk of HEAD_ROWS rows packed as soon as it is done (a 128k x 4k head's fp32 Q
    and int32 codes would be 4 GB): (PackedGPTQ, LayerReport)."""
    from compress.quantize.packing import PackedGPTQ, pack

    parts, report = [], None
    for res, report in _head_chunks(model, inputs, grid, **options):
        parts.append(pack(res, v2=v2))
    cat = lambda name, dim: torch.cat([getattr(p, name) for p in parts], dim=dim)  # noqa: E731
    return PackedGPTQ(cat("qweight", 1), cat("qzeros", 1), cat("scales", 1), parts[0].g_idx, parts[0].bits, v2), report


def _head_chunks(model: nn.Module, inputs: list[torch.Tensor], grid: QuantGrid, *, group_size: int, act_order: bool, damp: float = 0.01, block_size: int = 128, scale_search: str = "minmax"):
    """(QuantResult of rows r:r+HEAD_ROWS, LayerReport of the rows so far) per chunk of the head's rows."""
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    H, n = None, 0
    for x in inputs:
        H, n = accumulate_hessian(H, n, x.to(head.weight.device))
    weight = linear_weight(head).detach()
    sums = torch.zeros(4, dtype=torch.float64)  # ||D||², ||W||², tr(D H Dᵀ), tr(W H Wᵀ)
    for r in range(0, weight.shape[0], HEAD_ROWS):
        W = weight[r : r + HEAD_ROWS].float()
        try:
            (res,) = gptq_shared([W], H, grid, group_size=group_size, damp=damp, act_order=act_order, block_size=block_size, static_groups=False, scale_search=scale_search)
        except ValueError as err:
            raise ValueError(f"GPTQ of the LM head {name}: {err}") from err
        D = W - res.Q.float()
        sums += torch.stack([(D * D).sum(), (W * W).sum(), (D @ H * D).sum(), (W @ H * W).sum()]).double().cpu()
        report = LayerReport(
            name, tuple(weight.shape), (sums[0].sqrt() / sums[1].sqrt().clamp_min(1e-12)).item(),
            (sums[2].clamp_min(0) / sums[3].clamp_min(1e-12)).sqrt().item(), tokens=n,
        )
        yield on_cpu(res), report


@dataclass
class _BlockGPTQ:
    """GPTQ of one block at a time, with what all blocks share: settings, worker threads, results."""

    grid: QuantGrid
    options: dict
    dtype: torch.dtype
    true_sequential: bool
    workers: Workers
    results: dict[str, QuantResult]
    min_tokens: int | None = None  # below it (None: the input width) a group is rounded to nearest
    shape: list[list[str]] | None = None  # the Linear groups, by name inside a block
    store: ActivationStore = DEVICE_STORE  # where the block's outputs are kept (compress.quantize.offload)

    def __call__(self, block: nn.Module, mine: dict[str, nn.Module], prefix: str, states) -> tuple[list[torch.Tensor], list[LayerReport]]:
        """Quantize the Linears `mine` (full name -> module) of `block` on its inputs `states`;
        returns the quantized block's outputs (the next block's hidden states) and the layer reports."""
        reports: list[LayerReport] = []
        # The copy that runs the forwards (the block itself in fp32), with its Linears by the same names.
        runner = block if self.dtype == torch.float32 else copy.deepcopy(block).to(self.dtype)
        ours = {n: runner.get_submodule(n[len(prefix) :]) for n in mine}
        # Linears reading the same input (q/k/v; gate/up) share one Hessian. Blocks of one model
        # share their structure: the groups (one extra forward) are found once.
        if self.shape is None or {prefix + n for g in self.shape for n in g} != set(mine):
            self.shape = [[n[len(prefix) :] for n in g] for g in linear_groups(runner, ours, states)]
        groups = [[prefix + n for n in g] for g in self.shape]

        def quantize_group(group: list[str], H: torch.Tensor, tokens: int) -> None:
            # One GPTQ pass over the stacked rows of the Linears sharing this input.
            Ws = [linear_weight(mine[name]).float() for name in group]
            floor = Ws[0].shape[1] if self.min_tokens is None else self.min_tokens
            fallback = None
            if tokens == 0 or tokens < floor:
                fallback = f"{tokens} calibration tokens reached it (fewer than {max(floor, 1)}): rounded to nearest"
                shared = [rtn(W, self.grid, self.options["group_size"]) for W in Ws]
            else:
                try:
                    shared = gptq_shared(Ws, H, self.grid, **self.options)
                except ValueError as err:
                    raise ValueError(f"GPTQ of {', '.join(group)}: {err}") from err
            for name, W, res in zip(group, Ws, shared):
                reports.append(dataclasses.replace(_report(name, W, res.Q, H if tokens else None), tokens=tokens, fallback=fallback))
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
                    quantize_group(group, H, n)
                outputs = [self.store.keep(out) for out in forwards.finish()]
        else:
            # The paper's order: every group's Hessian from the float block (a forward that stops
            # once the last group has its input, skipping down_proj), then all groups quantized.
            hessians = _block_hessians(runner, ours, groups, states, stop=True)
            for group in groups:
                quantize_group(group, *hessians[group[0]])
            outputs = [self.store.keep(_block_output(runner(h, **kw))) for h, kw in states]
        # The next block sees what this block produces *now that it is quantized*.
        return outputs, reports


_FORWARD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def on_cpu(res: QuantResult) -> QuantResult:
    """A finished layer's result moved to host memory: on CUDA, the codes and the dequantized weight of every
    layer would otherwise stay on the device until the whole model is done (the weights are written from CPU)."""
    if res.Q.device.type == "cpu":
        return res
    return dataclasses.replace(res, Q=res.Q.cpu(), codes=res.codes.cpu(), scales=res.scales.cpu(), zeros=res.zeros.cpu(), g_idx=res.g_idx.cpu())


def _cast_floats(value, dtype: torch.dtype, memo: dict | None = None):
    """Floating tensors in a block's keyword arguments (rotary cos/sin, masks) cast to dtype; with `memo`,
    a tensor shared by many blocks' arguments is cast once and stays shared."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dtype == dtype:
            return value
        if memo is None:
            return value.to(dtype)
        if id(value) not in memo:
            memo[id(value)] = (value, value.to(dtype))  # the source is kept so its id is not reused
        return memo[id(value)][1]
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype, memo) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype, memo) for k, v in value.items()}
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


def _block_hessians(block: nn.Module, linears: dict[str, nn.Module], groups: list[list[str]], states, *, stop: bool = False) -> dict[str, tuple[torch.Tensor, int]]:
    """Run the block over every calibration batch, accumulating H = 2/n Σ x xᵀ at the input of each
    group's first Linear (the others read the same tensor); (H, tokens) by Linear name. With `stop`, each
    forward ends once the last group has seen its input."""
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
    return {name: sums[g[0]] for g in groups for name in g}


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
