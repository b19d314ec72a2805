"""Block-at-a-time quantization ("sequential onloading", as llm-compressor and GPTQModel do it): the model is never whole.

The model is built on the meta device. The embedding, final norm and head are onloaded from the memory-mapped
safetensors only while the calibration is captured and at the end; block i only when its turn comes. Each block
is calibrated and quantized by the same driver as in memory (`calibrate.quantize_blocks`, through its hooks),
its tensors packed and written at once to a piece file of a progress folder beside the output, and freed. After
every block the progress folder also holds the calibration and evaluation states that enter the next one, so a
run killed at block k continues there (`--resume`) with bit-identical codes. At the end the pieces are merged into
the artifact's `model.safetensors` (or shards with their index).

Peak memory is about one float block, its bf16 copy for the forwards, one block's Hessians and the activations:
`memory_plan` prints it before any compute and refuses a plan that cannot fit. The activations (the states between
blocks) stay on the device, or move to host memory or disk (`quantize.activations`, compress.quantize.offload)
when they do not fit: then the device holds one batch of them at a time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress import models
from compress.architectures import get_blocks, layer_layout
from compress.errors import CompressError
from compress.quantize.calibrate import BlockHooks, BlockInputs, LayerReport, _block_output, capture_calibration, linear_weight
from compress.quantize.gptq_checkpoint import gptq_tensors
from compress.quantize.offload import ActivationStore, Loaded, moves_off
from compress.shards import merge_pieces, write_piece, write_streamed

PROGRESS_FILE = "progress.json"
STATE_FILE = "state.safetensors"
_KIND = "compress block-at-a-time quantization progress"


class SequentialError(CompressError, ValueError):
    pass


def progress_dir(output: Path) -> Path:
    """Where a block-at-a-time run keeps its finished blocks until the artifact is complete (beside the output)."""
    output = Path(output)
    return output.parent / f".{output.name}.blocks"


class Onloader:
    """A model whose parameters live on the meta device until asked for, read from its safetensors files by name
    (memory-mapped: only the tensors asked for are read). Buffers (rotary tables) are built for real, as small."""

    def __init__(self, source: str, *, device: torch.device):
        from transformers import GenerationConfig

        self.source, self.device = source, device
        config = models.load_config(source)
        self.tensors = models.checkpoint_tensors(source, config, dtype="float32")
        if self.tensors is None:
            raise SequentialError(f"{source}: its safetensors names are converted on load (fused or split tensors), so its blocks cannot be read one at a time; set quantize.load: whole")
        self._structure(config)
        try:
            self.model.generation_config = GenerationConfig.from_pretrained(models.resolve_source(source))
        except OSError:
            pass  # no generation_config.json: keep the one derived from the config

    @classmethod
    def skeleton(cls, config, *, device: torch.device) -> "Onloader":
        """The structure alone, from a config (memory plans): it has no tensors to onload."""
        self = cls.__new__(cls)
        self.source, self.device, self.tensors = None, device, {}
        self._structure(config, check=False)
        return self

    def _structure(self, config, check: bool = True) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        source = self.source
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model.eval()
        self.prefix = layer_layout(config).blocks
        names = [n for n, _ in self.model.named_parameters()]
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        head, embedding = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        self.head_name = next(n for n, m in self.model.named_modules() if m is head) + ".weight"
        self.embedding_name = next(n for n, m in self.model.named_modules() if m is embedding) + ".weight"
        if self.tied:  # the head is the embedding: read once, tied after onloading
            names.remove(self.head_name) if self.head_name in names else None
        absent = [n for n in names if n not in self.tensors] if check else []
        if absent:
            raise SequentialError(f"{source}: the checkpoint has no tensor {absent[0]} ({len(absent)} of the model's tensors are missing); re-create or re-download the model")
        # Persistent buffers the checkpoint stores are read from it, as from_pretrained does.
        self.buffers = {n for n, _ in self.model.named_buffers()}
        names += [n for n in self.model.state_dict() if n in self.buffers and n in self.tensors]
        self.block_names = [[n for n in names if n.startswith(f"{self.prefix}.{i}.")] for i in range(len(get_blocks(self.model)))]
        inside = {n for block in self.block_names for n in block}
        self.rest_names = [n for n in names if n not in inside]

    def onload(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(self.model, name, self.device, value=self.tensors[name])
        if self.tied:
            self.model.tie_weights()  # the head is the embedding again

    def offload(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            if name not in self.buffers:
                set_module_tensor_to_device(self.model, name, "meta")
        if self.tied:
            self.model.tie_weights()

    def for_capture(self) -> list[str]:
        """What the calibration captures read: everything outside the blocks but an untied head."""
        return [n for n in self.rest_names if self.tied or n != self.head_name]

    def for_head(self) -> list[str]:
        """What the head's replays read: everything outside the blocks but an untied input embedding."""
        return [n for n in self.rest_names if self.tied or n != self.embedding_name]

    def nbytes(self, names: list[str], element: int = 4) -> int:
        return sum(math.prod(self.model.get_parameter(n).shape) * element for n in names if n not in self.buffers)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes block-at-a-time quantization needs at once, from shapes alone (printed before compute)."""

    block: int  # the largest block's weights in fp32, as onloaded
    runner: int  # its copy for the calibration forwards (forward_dtype bfloat16; 0 at float32)
    hessians: int  # its Hessians at once (one group's with true_sequential)
    gptq: int  # GPTQ's working copies of the largest group of Linears (W, Q, errors)
    activations: int  # calibration states entering and leaving a block, and the evaluation states, on the device
    rest: int  # embedding, final norm and head in fp32: resident only while capturing and at the end
    available: int | None  # what the device has free now (None: unknown)
    where: str = "device"  # where the states between blocks are kept (quantize.activations)
    offloaded: int = 0  # ... and their bytes there, when that is not the device

    @property
    def peak(self) -> int:
        return max(self.block + self.runner + self.hessians + self.gptq, self.rest) + self.activations

    def describe(self) -> str:
        gib = _size
        parts = f"block {gib(self.block)} + forward copy {gib(self.runner)} + Hessians {gib(self.hessians)} + GPTQ {gib(self.gptq)}"
        where = f" (states between blocks {'in host memory' if self.where == 'cpu' else 'on disk'}: {gib(self.offloaded)}, one batch at a time on the device)" if self.offloaded else ""
        return (
            f"memory plan (block at a time): max({parts}; embedding/head {gib(self.rest)}) + activations {gib(self.activations)}{where} "
            f"= peak about {gib(self.peak)}" + (f" of {gib(self.available)} available" if self.available is not None else "")
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None  # None: not visible here (a plan for another machine)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_plan(onloader: Onloader, linears: dict[str, nn.Module], spec, calib: torch.Tensor | None, eval_ids: torch.Tensor | None, *, device: torch.device, where: str = "device") -> MemoryPlan:
    """`where`: the resolved `quantize.activations` (device, cpu or disk)."""
    model, prefix = onloader.model, onloader.prefix
    config = model.config
    hidden = int(config.hidden_size)
    largest = max(range(len(onloader.block_names)), key=lambda i: onloader.nbytes(onloader.block_names[i]))
    block = onloader.nbytes(onloader.block_names[largest])
    gptq = getattr(spec, "method", "") == "gptq"
    runner = block // 2 if gptq and spec.forward_dtype == "bfloat16" else 0
    mine = [linear_weight(m).shape for n, m in linears.items() if n.startswith(f"{prefix}.{largest}.")]
    cols = sorted({int(c) for _, c in mine})
    hessians = (max(cols) ** 2 * 4 if spec.true_sequential else sum(c * c * 4 for c in cols)) if gptq and cols else 0
    by_width: dict[int, int] = {}
    for rows, c in mine:
        by_width[int(c)] = by_width.get(int(c), 0) + int(rows) * int(c)
    work = 3 * 4 * max(by_width.values(), default=0)
    tokens = calib.numel() if gptq and calib is not None else 0
    element = 2 if gptq and spec.forward_dtype == "bfloat16" else 4
    eval_tokens = eval_ids.numel() if eval_ids is not None else 0
    activations = 2 * tokens * hidden * element + 3 * eval_tokens * hidden * 4
    rest = max(onloader.nbytes(onloader.for_capture()), onloader.nbytes(onloader.for_head()))
    offloaded = 0
    if moves_off(where, device):
        # On the device: one batch in and out (with true_sequential every batch's input: the paused forwards hold them).
        seq = calib.shape[-1] if gptq and calib is not None else 0
        batch = min(spec.batch_size, calib.shape[0]) * seq if gptq and calib is not None else 0
        calib_inputs = tokens if getattr(spec, "true_sequential", False) else batch
        eval_batch = min(EVAL_BATCH, eval_ids.shape[0]) * eval_ids.shape[-1] if eval_ids is not None else 0
        offloaded, activations = activations, (calib_inputs + batch) * hidden * element + 3 * eval_batch * hidden * 4
    return MemoryPlan(block, runner, hessians, work, activations, rest, available_bytes(device), where, offloaded)


def resolve_activations(onloader: Onloader, linears, spec, calib, eval_ids, *, device: torch.device) -> MemoryPlan:
    """The plan for `quantize.activations`; `auto`: on the device when that plan fits (or the device's memory is
    not known), else in host memory (a CUDA device, when the host has it free), else on disk."""
    wanted = getattr(spec, "activations", "device")
    plan = memory_plan(onloader, linears, spec, calib, eval_ids, device=device, where="device" if wanted == "auto" else wanted)
    if wanted != "auto" or plan.available is None or plan.peak <= plan.available:
        return plan
    if device.type != "cpu":
        host = memory_plan(onloader, linears, spec, calib, eval_ids, device=device, where="cpu")
        free = available_bytes(torch.device("cpu"))
        if free is None or host.offloaded <= free:
            return host
    return memory_plan(onloader, linears, spec, calib, eval_ids, device=device, where="disk")


def check_plan(plan: MemoryPlan, device: torch.device, spec) -> None:
    """A plan larger than the device's free memory is refused before compute, with the numbers and what to change."""
    if plan.where == "cpu" and plan.offloaded and device.type != "cpu":
        free = available_bytes(torch.device("cpu"))
        if free is not None and plan.offloaded > free:
            raise SequentialError(f"{plan.describe()}: the states between blocks do not fit the host's {_size(free)} of free memory; set quantize.activations: disk, "
                                  "or lower quantize.calib.samples / data.max_eval_tokens")
    if plan.available is None or plan.peak <= plan.available:
        return
    changes = ["lower quantize.calib.samples or seq_len (activations)", "lower data.max_eval_tokens (evaluation states)"]
    if plan.where == "device":
        changes.insert(0, "set quantize.activations: cpu or disk (the states between blocks off the device, one batch at a time on it)")
    if getattr(spec, "method", "") == "gptq" and not spec.true_sequential:
        changes.append("set quantize.true_sequential: true (one group's Hessian at a time)")
    if getattr(spec, "method", "") == "gptq" and spec.forward_dtype != "bfloat16":
        changes.append("set quantize.forward_dtype: bfloat16 (half the activations)")
    raise SequentialError(f"{plan.describe()}: it does not fit the {device.type} device; " + ", ".join(changes) + ", or run on a device with more memory")


class BlockWriter(BlockHooks):
    """The hooks of block-at-a-time quantization: onload block i, carry the evaluation states through it before
    (float) and after (quantized) its quantization, write its packed tensors, save where the run stands, free it."""

    def __init__(self, onloader: Onloader, folder: Path, *, v2: bool, fingerprint: str, eval_inputs: BlockInputs | None, evaluation: dict[str, list] | None, progress: dict,
                 store: ActivationStore):
        self.onloader, self.folder, self.v2, self.fingerprint, self.store = onloader, folder, v2, fingerprint, store
        self.eval_inputs, self.evaluation = eval_inputs, evaluation
        self.progress = progress
        self.resident: int | None = None  # the block already onloaded (block 0, for the capture)

    def before(self, index: int, block: nn.Module) -> None:
        self.started = time.perf_counter()
        if self.resident != index:
            self.onloader.onload(self.onloader.block_names[index])
        self.resident = None
        if self.evaluation is not None:
            self.evaluation["float"] = _through(block, self.eval_inputs, index, self.evaluation["float"], last=False, store=self.store)

    def after(self, index: int, block: nn.Module, outputs, reports: list[LayerReport], results) -> None:
        if self.evaluation is not None:
            self.evaluation["quantized"] = _through(block, self.eval_inputs, index, self.evaluation["quantized"], last=True, store=self.store)
        prefix = f"{self.onloader.prefix}.{index}."
        state = {prefix + k: v for k, v in block.state_dict().items()}
        mine = {n: results.pop(n) for n in [n for n in results if n.startswith(prefix)]}
        write_piece(self.folder / piece_name(index), gptq_tensors(state, mine, v2=self.v2))
        self.onloader.offload(self.onloader.block_names[index])
        release_memory(self.onloader.device)
        save_state(self.folder, outputs, self.evaluation, self.store)
        self.progress["done"] = index + 1
        self.progress["reports"].extend(dataclasses.asdict(r) for r in reports)
        self.progress["seconds"].append(round(time.perf_counter() - self.started, 3))
        write_progress(self.folder, self.progress)


def release_memory(device: torch.device) -> None:
    """Hand a freed block back to the system: CUDA's cache, and glibc's heap (compress.heap)."""
    import gc

    from compress.heap import trim

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim()


class PackedResults(dict):
    """Layer results packed as they arrive: a block's fp32 Q and int32 codes (8 bytes a weight) are not kept
    until the block is written, only its codes (half a byte a weight at 4 bits)."""

    def __init__(self, v2: bool):
        super().__init__()
        self.v2 = v2

    def __setitem__(self, name, result) -> None:
        from compress.quantize.packing import pack

        super().__setitem__(name, pack(result, v2=self.v2))


def _through(block: nn.Module, inputs: BlockInputs, index: int, hidden: list, *, last: bool, store: ActivationStore) -> list:
    with torch.no_grad():
        out = [store.keep(_block_output(block(store.load(h), **kw))) for h, kw in zip(hidden, inputs.kwargs[index], strict=True)]
    if last:
        inputs.kwargs[index] = []  # this block's own arguments are not needed again
    return out


def piece_name(index: int | None) -> str:
    return "rest.safetensors" if index is None else f"block-{index:05d}.safetensors"


def fingerprint(*parts) -> str:
    """What a progress folder was made from (inputs' hashes, the quantize spec, versions): a resume must match it."""
    import compress

    blob = json.dumps([parts, torch.__version__, getattr(compress, "__version__", None)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_progress(folder: Path, progress: dict) -> None:
    tmp = folder / f".{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps(progress, indent=1))
    os.replace(tmp, folder / PROGRESS_FILE)


def save_state(folder: Path, hidden: list, evaluation: dict | None, store: ActivationStore) -> None:
    """The states entering the next block (calibration; float and quantized evaluation), exactly as they are,
    read from the store one at a time (compress.shards.write_streamed)."""
    handles = {f"calib.{b}": h for b, h in enumerate(hidden)}
    for kind, states in (evaluation or {}).items():
        handles.update({f"{kind}.{b}": h for b, h in enumerate(states)})
    write_streamed(folder / STATE_FILE, {name: (lambda h=h: store.to_cpu(h)) for name, h in handles.items()})


def load_state(folder: Path, store: ActivationStore) -> tuple[list, dict[str, list]]:
    """What `save_state` wrote, each tensor read and handed to the store in turn."""
    from safetensors import safe_open

    found: dict[str, dict[int, object]] = {}
    with safe_open(str(folder / STATE_FILE), framework="pt", device="cpu") as fh:
        for key in fh.keys():
            kind, b = key.rsplit(".", 1)
            found.setdefault(kind, {})[int(b)] = store.keep(fh.get_tensor(key).to(store.device))
    ordered = {kind: [v[b] for b in sorted(v)] for kind, v in found.items()}
    return ordered.pop("calib", []), ordered


def open_progress(folder: Path, fp: str, *, resume: bool, log=print) -> dict:
    """The progress of an earlier run to continue (with `resume` and a matching fingerprint), else a fresh folder.
    A folder that is not ours is never removed."""
    record = folder / PROGRESS_FILE
    if folder.exists():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("kind") != _KIND:
            raise SequentialError(f"{folder} exists and is not a compress progress folder (no readable {PROGRESS_FILE}); move it away or choose another --output")
        if resume and old.get("fingerprint") == fp and (folder / STATE_FILE).is_file():
            missing = [piece_name(i) for i in range(old["done"]) if not (folder / piece_name(i)).is_file()]
            if missing:
                raise SequentialError(f"{folder}: finished block file {missing[0]} is missing; rerun without --resume to start again")
            log(f"resuming block-at-a-time quantization at block {old['done']} ({folder})")
            return old
        if resume:
            why = "it was made from other inputs or settings" if old.get("fingerprint") != fp else "it holds no finished block"
            log(f"not resuming from {folder}: {why}; starting again")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    progress = {"kind": _KIND, "fingerprint": fp, "done": 0, "reports": [], "seconds": []}
    write_progress(folder, progress)
    return progress


def finish(onloader: Onloader, folder: Path, directory: Path, *, v2: bool) -> list[Path]:
    """The tensors outside the blocks written one piece each, read from the checkpoint (nothing is onloaded), then
    every piece merged into `directory`'s weights."""
    model = onloader.model
    prefix = onloader.prefix + "."
    rest = [k for k in model.state_dict(keep_vars=True) if not k.startswith(prefix) and not (onloader.tied and k == onloader.head_name)]
    pieces = [folder / piece_name(i) for i in range(len(onloader.block_names))]
    buffers = dict(model.named_buffers())
    for k, key in enumerate(rest):
        value = onloader.tensors[key] if key in onloader.tensors else buffers[key]
        pieces.append(folder / f"rest-{k:05d}.safetensors")
        write_piece(pieces[-1], gptq_tensors({key: value}, {}, v2=v2))
    return merge_pieces(pieces, directory)


EVAL_BATCH = 4  # as evaluate.perplexity_on_blocks batches the held-out blocks


def perplexity_from_final(model: nn.Module, ids: torch.Tensor, final, template) -> dict:
    """Held-out perplexity from the last block's outputs per batch of EVAL_BATCH, summed as
    `evaluate.perplexity_on_blocks` sums it, through the model's own head one sequence at a time (a batch's
    logits over a large vocabulary would be the largest tensor of the run)."""
    from compress.quantize.calibrate import logits_from_final

    nll, tokens = 0.0, 0
    for b, start in enumerate(range(0, len(ids), EVAL_BATCH)):
        hidden = final[b]
        for s in range(min(EVAL_BATCH, len(ids) - start)):
            target = ids[start + s : start + s + 1]
            (logits,) = logits_from_final(model, target, 1, [hidden[s : s + 1]], template)
            x = logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(x.reshape(-1, x.shape[-1]), target[:, 1:].reshape(-1).to(x.device), reduction="sum").item()
            tokens += target[:, 1:].numel()
    return {"ppl": math.exp(nll / tokens) if tokens else float("nan"), "tokens": tokens}


@dataclass
class BlocksOutcome:
    reports: list[LayerReport]
    final_hidden: list[torch.Tensor]  # the last block's calibration outputs (for the head's codes)
    template: object
    before: dict  # held-out perplexity of the float model
    after: dict  # ... and of the quantized one, through the blocks as written
    seconds: list[float]  # per block: onload, evaluation, quantization, write
    plan: dict  # the memory plan, bytes


def quantize_by_blocks(onloader: Onloader, spec, calib: torch.Tensor | None, eval_ids: torch.Tensor, *, output: Path, fp: str, resume: bool, v2: bool, quantize, log=print) -> BlocksOutcome:
    """Every block onloaded, quantized (`quantize(model, calib, **driver)`: the stage's call of
    `calibrate.quantize_blocks`), written to the progress folder and freed, in turn; resumable per block."""
    from compress.quantize.calibrate import quantizable_linears

    model, device = onloader.model, onloader.device
    plan = resolve_activations(onloader, quantizable_linears(model, tuple(spec.skip)), spec, calib, eval_ids, device=device)
    log(plan.describe())
    check_plan(plan, device, spec)
    folder = progress_dir(output)
    progress = open_progress(folder, fp, resume=resume, log=log)
    scratch = folder / "activations"
    shutil.rmtree(scratch, ignore_errors=True)  # a killed run's: the states to resume from are in the state file
    store = ActivationStore(plan.where, device, scratch)
    try:
        return _quantize_by_blocks(onloader, spec, calib, eval_ids, folder=folder, fp=fp, v2=v2, quantize=quantize, plan=plan, progress=progress, store=store)
    finally:
        store.close()


def _quantize_by_blocks(onloader: Onloader, spec, calib, eval_ids, *, folder: Path, fp: str, v2: bool, quantize, plan: MemoryPlan, progress: dict, store: ActivationStore) -> BlocksOutcome:
    model, device = onloader.model, onloader.device
    start = progress["done"]
    gptq = spec.method == "gptq"
    # The captures run the model's own forward up to block 0 (which gives the structure of a block's output).
    onloader.onload(onloader.for_capture())
    onloader.onload(onloader.block_names[0])
    calibration = capture_calibration(model, calib, spec.batch_size, keep=store.keep) if gptq else BlockInputs([], [])
    eval_inputs = capture_calibration(model, eval_ids, EVAL_BATCH, keep=store.keep)
    template = eval_inputs.template
    if start:
        calibration.hidden, eval_inputs.hidden = [], []  # the run continues from the states it saved
        hidden, evaluation = load_state(folder, store)
        onloader.offload(onloader.block_names[0])
    else:
        hidden, evaluation = None, {"float": eval_inputs.hidden, "quantized": list(eval_inputs.hidden)}
    eval_inputs.hidden = []  # held by `evaluation` from here on (and dropped block by block)
    onloader.offload(onloader.for_capture())  # not needed again until the end
    release_memory(device)
    writer = BlockWriter(onloader, folder, v2=v2, fingerprint=fp, eval_inputs=eval_inputs, evaluation=evaluation, progress=progress, store=store)
    writer.resident = 0 if start == 0 else None
    final: list[torch.Tensor] = []
    quantize(model, calib, hooks=writer, calibration=calibration, start=start, start_hidden=hidden, final_hidden=final, results=PackedResults(v2), store=store)
    if not gptq:
        final = []
    onloader.onload(onloader.for_head())
    before = perplexity_from_final(model, eval_ids, Loaded(store, evaluation["float"]), template)
    after = perplexity_from_final(model, eval_ids, Loaded(store, evaluation["quantized"]), template)
    reports = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in progress["reports"]]
    return BlocksOutcome(reports, final, template, before, after, progress["seconds"], {**dataclasses.asdict(plan), "peak": plan.peak})
