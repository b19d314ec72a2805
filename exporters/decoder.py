"""The decoder as ONNX sees it: a transformers causal LM behind flat KV-cache inputs and outputs, and the
torch -> ONNX conversion with dynamic batch, sequence and past length (one graph for prefill and decode).

Inputs `input_ids`, `attention_mask` (batch, past + sequence), `position_ids`, `past_key_values.{i}.key/value`
(batch, kv_heads, past, head_dim); outputs `logits`, `present.{i}.key/value`. These are the names
onnxruntime-genai expects (see `genai_config` in `compress_exporters.onnx`).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError

EXPORTERS = ("dynamo", "legacy")
# dynamo: the maintained torch.onnx path (default since torch 2.9); legacy: TorchScript, deprecated upstream,
# 15-25x faster to export here. Both matched torch to ~1e-7 on every family in compress.architectures.
DEFAULT_OPSET = {"dynamo": 20, "legacy": 17}


class ExportFailedError(CompressError, RuntimeError):
    """torch could not convert the model to ONNX."""


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids", *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *present_names(num_layers)]


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int


def cache_kwarg(model: nn.Module) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name still works, with a warning).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_layout(model: nn.Module) -> CacheLayout:
    """Read the KV shapes off one real forward: no per-family config arithmetic (GQA, head_dim overrides)."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        cache = returned_cache(model(input_ids=ids, use_cache=True))
    shapes = {(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers}
    if len(shapes) != 1:
        raise ExportFailedError(f"{model.config.model_type}: layers have different KV-cache shapes {sorted(shapes)}; only uniform caches export")
    (key_shape, value_shape), = shapes
    if key_shape != value_shape:
        raise ExportFailedError(f"{model.config.model_type}: key and value caches differ in shape ({key_shape} vs {value_shape})")
    return CacheLayout(num_layers=len(cache.layers), num_kv_heads=key_shape[1], head_dim=key_shape[3])


class CachedDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), past/present flat
    as (key_0, value_0, key_1, ...). A fresh DynamicCache is rebuilt from the flat tensors every call."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self._cache_kwarg = cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # No config: every layer a full (non-sliding) layer. Sliding-window attention still comes from the
        # mask the model builds; a sliding cache layer would crop with data-dependent shapes.
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **{self._cache_kwarg: cache})
        present = []
        for layer in returned_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _example_inputs(layout: CacheLayout, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    # Distinct sizes (batch 2, sequence 3, past 5) so no dimension is specialised to another or to 0/1.
    batch, seq, past = 2, 3, 5
    ids = torch.randint(0, 2, (batch, seq), device=device)
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
    positions = torch.arange(past, past + seq, device=device).expand(batch, seq)
    kv = [torch.randn(batch, layout.num_kv_heads, past, layout.head_dim, dtype=dtype, device=device) for _ in range(2 * layout.num_layers)]
    return (ids, mask, positions, *kv)


def export_decoder(model: nn.Module, path: Path, layout: CacheLayout, *, exporter: str = "dynamo", opset: int | None = None) -> int:
    """Write `path` (and `path`.data) from the torch model; returns the opset used."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    opset = opset or DEFAULT_OPSET[exporter]
    wrapper = CachedDecoder(model, layout.num_layers).eval()
    dtype = next(model.parameters()).dtype
    args = _example_inputs(layout, dtype, next(model.parameters()).device)
    names_in, names_out = input_names(layout.num_layers), output_names(layout.num_layers)
    captured = io.StringIO()
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    try:
        # The exporters narrate to stdout and warn about unrelated registries (torchvision): keep it for errors.
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            torch_onnx_log.setLevel(logging.ERROR)
            if exporter == "dynamo":
                _export_dynamo(wrapper, args, path, names_in, names_out, layout, opset)
            else:
                _export_legacy(wrapper, args, path, names_in, names_out, layout, opset)
    except Exception as err:  # noqa: BLE001 - any exporter failure becomes one clear error
        tail = captured.getvalue()[-2000:]
        other = "legacy" if exporter == "dynamo" else "dynamo"
        raise ExportFailedError(
            f"torch.onnx ({exporter}, opset {opset}) could not export {model.config.model_type}: {type(err).__name__}: {err}\n"
            f"try exporter={other!r}{chr(10) + tail if tail else ''}"
        ) from err
    finally:
        torch_onnx_log.setLevel(level)
    return opset


def _export_dynamo(wrapper, args, path, names_in, names_out, layout, opset) -> None:
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("sequence_length")
    # The mask length gets its own Dim: arithmetic on past + sequence Dims raises in torch.export.
    past, total = Dim("past_sequence_length"), Dim("total_sequence_length")
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * layout.num_layers)),  # a tuple: a list is refused
    }
    torch.onnx.export(wrapper, args, str(path), input_names=names_in, output_names=names_out, dynamic_shapes=shapes, dynamo=True, opset_version=opset, external_data=True)


def _export_legacy(wrapper, args, path, names_in, names_out, layout, opset) -> None:
    axes = {"input_ids": {0: "batch", 1: "sequence_length"}, "attention_mask": {0: "batch", 1: "total_sequence_length"}, "position_ids": {0: "batch", 1: "sequence_length"}, "logits": {0: "batch", 1: "sequence_length"}}
    axes.update({name: {0: "batch", 2: "past_sequence_length"} for name in past_names(layout.num_layers)})
    axes.update({name: {0: "batch", 2: "total_sequence_length"} for name in present_names(layout.num_layers)})
    torch.onnx.export(wrapper, args, str(path), input_names=names_in, output_names=names_out, dynamic_axes=axes, dynamo=False, opset_version=opset)
