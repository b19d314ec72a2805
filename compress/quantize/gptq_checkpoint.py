"""GPTQ checkpoints on disk: write the standard format (qweight/qzeros/scales/g_idx + quantization_config)
and load it back on any device with a plain-torch layer, including group sizes that do not divide the width.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.moe import unfuse_experts
from compress.quantize.calibrate import _conv1d_type
from compress.quantize.grid import QuantResult
from compress.quantize.packing import PackedGPTQ, dequantize_packed, pack

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def quantization_config(*, bits: int, group_size: int, sym: bool, act_order: bool, damp: float | None, static_groups: bool, modules: list[str]) -> dict:
    """The `quantization_config` block of config.json as transformers/optimum, GPTQModel and vLLM read it.

    Checked against their loaders: vLLM reads `checkpoint_format` (only "gptq_v2" changes anything: zeros stored
    without the v1 minus one) and GPTQModel/transformers `format`, so both are written: "gptq" (v1) for a
    symmetric grid, "gptq_v2" for an asymmetric one (GPTQModel refuses asym v1 from other quantizers, and v1
    cannot store a zero of 0; see packing.py). transformers' and GPTQModel's configs refuse a `damp_percent` outside (0, 1), so
    round-to-nearest (`damp=None`, no Hessian) writes none. `act_group_aware: false` says the groups are the
    plain GPTQ ones (GPTQModel and transformers warn about act-order checkpoints without it).
    """
    fmt = checkpoint_format(sym)
    config = {
        "quant_method": "gptq",
        "checkpoint_format": fmt,
        "format": fmt,
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": sym,
        "damp_percent": damp,
        "static_groups": static_groups,
        "true_sequential": False,
        "act_group_aware": False,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["compress"], "quantized_modules": len(modules)},
    }
    if damp is None:
        del config["damp_percent"]
    return config


def checkpoint_format(sym: bool) -> str:
    return "gptq" if sym else "gptq_v2"


FORMATS = ("gptq", "gptq_v2")


def write_gptq(directory: Path, model: nn.Module, results: dict[str, QuantResult], qconfig: dict, tokenizer=None) -> None:
    """Model files in `directory`: float tensors of unquantized modules + packed tensors of quantized ones."""
    tied = _head_key(model) if getattr(model.config, "tie_word_embeddings", False) else None
    state = gptq_tensors(model.state_dict(), results, v2=qconfig.get("checkpoint_format") == "gptq_v2", drop=tied)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_gptq_config(directory, model, qconfig, tokenizer)


def gptq_tensors(state: Mapping[str, torch.Tensor], results: Mapping[str, "QuantResult | PackedGPTQ"], *, v2: bool, drop: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of (part of) a model: its float tensors `state` minus the quantized weights and `drop`
    (a tied head: safetensors refuses shared storage and loaders re-tie it), plus each result packed (or already so)."""
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if (module in results and leaf == "weight") or key == drop:
            continue
        out[key] = value.detach().contiguous()
    for name, result in results.items():
        packed = result if isinstance(result, PackedGPTQ) else pack(result, v2=v2)
        out[f"{name}.qweight"] = packed.qweight
        out[f"{name}.qzeros"] = packed.qzeros
        out[f"{name}.scales"] = packed.scales
        out[f"{name}.g_idx"] = packed.g_idx
    return out


def write_gptq_config(directory: Path, model: nn.Module, qconfig: dict, tokenizer=None) -> None:
    """config.json with its quantization_config, generation_config.json, the tokenizer files."""
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def check_groups(directory: str | Path, qconfig: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose qweight/scales/g_idx contradict its quantization_config (bits, group_size),
    naming the layer: loading would work and every later record (an export's compress.json) would be wrong."""
    from compress.models import QuantizationConfigError

    config_file = Path(directory) / "config.json"
    bits, group = int(qconfig.get("bits") or 0), int(qconfig.get("group_size") or -1)
    for name in sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}):
        absent = [s for s in SUFFIXES if f"{name}.{s}" not in tensors]
        if absent:
            raise QuantizationConfigError(f"{directory}: GPTQ layer {name} has no {', '.join(absent)}; re-create the GPTQ folder")
        rows, g_idx, n_groups = tensors[f"{name}.qweight"].shape[0], tensors[f"{name}.g_idx"].long(), tensors[f"{name}.scales"].shape[0]
        in_features = g_idx.numel()
        if rows * 32 != in_features * bits:
            raise QuantizationConfigError(
                f"{directory}: layer {name} packs {in_features} input features into {rows} int32 rows ({rows * 32 / in_features:g} bits), "
                f"but {config_file} has quantization_config.bits {bits}; fix bits in config.json or re-quantize the float model"
            )
        if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise QuantizationConfigError(f"{directory}: layer {name}: g_idx names groups outside its {n_groups} rows of scales; the folder is corrupt, re-create it")
        implied = -1 if n_groups == 1 else int(torch.bincount(g_idx, minlength=n_groups).max())
        expected = 1 if group == -1 else -(-in_features // group)
        if expected != n_groups or (n_groups > 1 and implied != group):
            raise QuantizationConfigError(
                f"{directory}: layer {name} has {n_groups} group{'s' if n_groups > 1 else ''} of scales over {in_features} input features: "
                f"its scales and g_idx imply group size {implied}, but {config_file} has quantization_config.group_size {group}. "
                f"Set group_size to {implied} in config.json if the weights are right, or re-quantize the float model"
            )


class GPTQLinear(nn.Module):
    """A Linear whose weight lives packed (int32 + fp16 scales); dequantized in torch on demand.

    `cache=True` keeps the dequantized weight after the first forward (fast on CPU, float memory);
    `cache=False` dequantizes at every call (int4 memory, slower)."""

    def __init__(self, in_features: int, out_features: int, bits: int, n_groups: int, bias: bool, *, transposed: bool = False, cache: bool = True, v2: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.v2 = v2  # qzeros hold the true zeros (checkpoint_format gptq_v2), not zero - 1
        self.transposed = transposed  # GPT-2 Conv1D semantics are kept: y = x W + b with W (in, out)
        self.cache = cache
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._weight: torch.Tensor | None = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) float weight."""
        return dequantize_packed(self.packed(), dtype=dtype)

    def packed(self) -> PackedGPTQ:
        return PackedGPTQ(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.v2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self._weight
        if W is None or W.dtype != x.dtype or W.device != x.device:
            W = self.dequantized_weight(torch.float32).to(device=x.device, dtype=x.dtype)
            if self.cache:
                self._weight = W
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, W, bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, groups={self.scales.shape[0]}"


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def load_gptq(directory: str | Path, *, dtype: torch.dtype = torch.float32, cache: bool = True) -> nn.Module:
    """Our loader for GPTQ checkpoints (ours, or GPTQModel's v1 and v2 formats): plain torch, CPU or CUDA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    qconfig = config.quantization_config
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    if qconfig.get("quant_method") != "gptq":
        raise ValueError(f"{directory}: not a GPTQ checkpoint (quant_method={qconfig.get('quant_method')!r})")
    fmt = qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq"
    if fmt not in FORMATS:
        raise ValueError(f"{directory}: checkpoint_format {fmt!r} is not supported; expected 'gptq' (v1) or 'gptq_v2'")
    del config.quantization_config
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    check_groups(directory, qconfig, tensors)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if any(".experts." in k and k.endswith(".qweight") for k in tensors):
        unfuse_experts(model)  # quantized experts are stored one Linear per projection (experts.3.gate_proj)
    bits = int(qconfig["bits"])
    conv1d = _conv1d_type()
    for name in sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}):
        old = model.get_submodule(name)
        transposed = isinstance(old, conv1d)
        in_f, out_f = (old.weight.shape if transposed else old.weight.shape[::-1])
        layer = GPTQLinear(in_f, out_f, bits, tensors[f"{name}.scales"].shape[0], bias=f"{name}.bias" in tensors, transposed=transposed, cache=cache, v2=fmt == "gptq_v2")
        _set_module(model, name, layer)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {k for k in missing if k.endswith("weight") and getattr(config, "tie_word_embeddings", False) and k == _head_key(model)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{directory}: weights do not match the config: missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    return model.eval()


def _head_key(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(n for n, m in model.named_modules() if m is head) + ".weight"
