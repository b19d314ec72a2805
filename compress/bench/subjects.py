"""What `compress bench` measures: any artifact, opened the same way whatever its kind.

`inspect_artifact(name)` says what a folder (or `builtin:`/hub name) is without loading its weights;
`open_subject(info, device=..., threads=...)` loads it and offers the three calls every measurement needs:
`logits(ids)` for quality, `prefill(ids)` and `step(state)` for speed (greedy, with the KV cache).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import models
from compress.artifacts import RECORD_FILE, hash_path, read_record
from compress.errors import CompressError

KINDS = ("float", "gptq", "bnb", "onnx")
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".bin", ".data")


class BenchInputError(CompressError, ValueError):
    """An artifact `compress bench` cannot measure (missing, unknown kind, different vocabulary)."""


@dataclass(frozen=True)
class ArtifactInfo:
    name: str  # as the user gave it
    label: str  # the row name in the report
    kind: str  # one of KINDS
    path: Path | None  # the local folder (None for a hub id not downloaded)
    sha256: str  # content hash of the folder (hub ids: the id)
    config: dict[str, Any] = field(repr=False)  # config.json
    record: dict[str, Any] | None = field(default=None, repr=False)  # compress.json, when it is an artifact


def inspect_artifact(name: str, label: str | None = None) -> ArtifactInfo:
    """Kind, folder, content hash and config of `name`, loading no weights."""
    folder = models.local_path(name)  # a missing path or a folder without config.json fails here, by name
    if folder is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name).to_dict()
    else:
        config = models.read_config_json(folder)
    if folder is not None and (folder / "model.onnx").is_file():
        kind = "onnx"
    else:
        method = (config.get("quantization_config") or {}).get("quant_method")
        kind = {None: "float", "gptq": "gptq", "bitsandbytes": "bnb"}.get(method)
        if kind is None:
            raise BenchInputError(f"{name}: quantization {method!r} is not one compress bench can load (float, gptq, bitsandbytes, onnx)")
    if folder is not None and kind != "onnx":
        models.check_model_folder(folder)  # before any artifact is measured: bad weights are named, not measured
    record = read_record(folder) if folder is not None and (folder / RECORD_FILE).is_file() else None
    sha = hash_path(folder) if folder is not None else f"hub:{name}"
    return ArtifactInfo(name=name, label=label or _default_label(name, folder), kind=kind, path=folder, sha256=sha, config=config, record=record)


def _default_label(name: str, folder: Path | None) -> str:
    if name.startswith("builtin:") or folder is None:
        return name
    return folder.name


def teacher_from_lineage(info: ArtifactInfo, depth: int = 8) -> str | None:
    """The teacher recorded in the artifact's lineage (compress.json inputs, followed upstream)."""
    record = info.record
    for _ in range(depth):
        if not record:
            return None
        inputs = record.get("inputs", [])
        teacher = next((i for i in inputs if i.get("role") == "teacher"), None)
        if teacher:
            source, path = teacher.get("source", ""), teacher.get("path")
            # builtin names read better than their cache folder; a local teacher by its absolute path (the
            # recorded source may be relative to another working directory)
            return path if path and not source.startswith("builtin:") and Path(path).exists() else source
        upstream = next((i for i in inputs if i.get("role") == "model" and i.get("path")), None)
        if upstream is None or not (Path(upstream["path"]) / RECORD_FILE).is_file():
            return None
        record = read_record(upstream["path"])
    return None


def weight_bytes(folder: Path | None) -> int | None:
    if folder is None:
        return None
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def vocab_bytes(folder: Path | None, vocab: int | None) -> int | None:
    """Bytes of the stored tensors with a vocabulary-sized dimension: the token embedding and the LM head (their
    codes too, once quantized; a tied pair counts once). On small models and large vocabularies (Gemma-3: 262k)
    they are most of the artifact."""
    if folder is None or not vocab:
        return None
    total = 0
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    shape = piece.get_shape()
                    if vocab in shape:
                        total += math.prod(shape) * _SAFETENSORS_ITEMSIZE.get(piece.get_dtype(), 4)
        elif path.suffix == ".onnx":
            import numpy as np
            import onnx

            for init in onnx.load(str(path), load_external_data=False).graph.initializer:
                if vocab in init.dims:
                    total += math.prod(init.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return total


def count_parameters(config: dict) -> int:
    """Parameters of the model the config describes (the float architecture; tied weights counted once),
    so a 4-bit or ONNX copy reports the same count as its float original."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def load_tokenizer(info: ArtifactInfo):
    return models.load_tokenizer(str(info.path) if info.path is not None else info.name)


class TorchSubject:
    """A float, GPTQ (our torch loader) or bitsandbytes model."""

    def __init__(self, info: ArtifactInfo, device: torch.device):
        self.device = device
        self.model = models.load_quantized(info.path, device=device) if info.path is not None else models.load_model(info.name).to(device)
        self.model.eval()

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V) float32 on CPU
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits.float().cpu()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor):
        out = self.model(input_ids=ids.to(self.device), use_cache=True, logits_to_keep=1)  # as generate() does
        return out.past_key_values, out.logits[:, -1:].argmax(-1)  # next tokens (B, 1)

    @torch.inference_mode()
    def step(self, state):
        cache, tokens = state
        out = self.model(input_ids=tokens, past_key_values=cache, use_cache=True)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_prefill(self, ids: torch.Tensor) -> float:
        return _time_prefill(self, ids)

    def time_decode(self, ids: torch.Tensor, new_tokens: int) -> list[float]:
        return _time_steps(self, ids, new_tokens)


def _time_prefill(subject, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    subject.prefill(ids)
    subject.sync()
    return time.perf_counter() - start


def _time_steps(subject, ids: torch.Tensor, new_tokens: int) -> list[float]:
    """Seconds of each of `new_tokens` greedy steps after a (untimed) prefill of `ids` (B, T)."""
    state = subject.prefill(ids)
    subject.sync()
    steps = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        state = subject.step(state)
        subject.sync()
        steps.append(time.perf_counter() - start)
    return steps


class OnnxSubject:
    """An ONNX folder from `compress export`, run with ONNX Runtime through its conventional inputs."""

    def __init__(self, info: ArtifactInfo, device: torch.device, threads: int | None):
        from compress_exporters.runtime import OnnxCausalLM, _ort

        # on a CUDA bench the ONNX model runs on CUDA when onnxruntime-gpu is installed, else on the CPU;
        # the provider is recorded next to its numbers either way
        cuda = device.type == "cuda" and "CUDAExecutionProvider" in _ort().get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        # batch 1 runs through the runtime apps use (IO binding, shared KV cache, chunked prefill); larger
        # batches and full-sequence logits through plain runs of the same session, with the inputs it found
        self.lm = OnnxCausalLM.from_dir(info.path, providers=providers, threads=threads)
        self.provider = providers[0]

    def _run(self, ids: np.ndarray, past: dict, past_len: int):
        """One run; the runtime's session returns the last position's logits only (a fused graph)."""
        return self.lm.forward(ids, np.ones((len(ids), past_len + ids.shape[1]), np.int64), past)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.lm.forward(ids.numpy().astype(np.int64), every_position=True)
        return torch.from_numpy(logits.astype(np.float32))

    def time_prefill(self, ids: torch.Tensor) -> float:
        if len(ids) > 1:
            return _time_prefill(self, ids)
        start = time.perf_counter()
        next(iter(self.lm.greedy_tokens(ids[0].tolist(), 1)))
        return time.perf_counter() - start

    def time_decode(self, ids: torch.Tensor, new_tokens: int) -> list[float]:
        if len(ids) > 1:
            return _time_steps(self, ids, new_tokens)
        stream = iter(self.lm.greedy_tokens(ids[0].tolist(), new_tokens + 1))
        next(stream)  # the prefill
        steps, start = [], time.perf_counter()
        for _ in stream:
            now = time.perf_counter()
            steps.append(now - start)
            start = now
        return steps

    def prefill(self, ids: torch.Tensor):
        array = ids.numpy().astype(np.int64)
        logits, past = self._run(array, self.lm.empty_past(len(array)), 0)
        return past, array.shape[1], logits[:, -1:].argmax(-1).astype(np.int64)

    def step(self, state):
        past, length, tokens = state
        logits, past = self._run(tokens, past, length)
        return past, length + 1, logits[:, -1:].argmax(-1).astype(np.int64)

    def sync(self) -> None:
        pass  # session.run returns host arrays: the work is done when it returns


def open_subject(info: ArtifactInfo, *, device: torch.device, threads: int | None = None):
    if info.kind == "onnx":
        return OnnxSubject(info, device, threads)
    if info.kind == "bnb" and device.type == "cpu":
        from compress.quantize.bnb import require_bnb

        require_bnb()
    return TorchSubject(info, device)

