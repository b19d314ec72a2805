"""GPTQ codes of the LM head, kept beside a GPTQ checkpoint for the export's 4-bit head.

The checkpoint itself keeps the head in float (transformers, GPTQModel and vLLM load the same model as
before); `extras/lm_head_gptq.safetensors` holds the head's GPTQ codes in the checkpoint's own layout
(qweight / qzeros / scales / g_idx) for `compress export --lm-head int4`, which turns them into a 4-bit
MatMulNBits head and, for a tied head, the 4-bit embedding that reads the same codes. It lives in a
subfolder so that loaders globbing `*.safetensors` never read it as model weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.quantize.packing import PackedGPTQ, dequantize_packed

HEAD_CODES_FILE = "extras/lm_head_gptq.safetensors"


class HeadCodesError(ValueError):
    pass


@dataclass(frozen=True)
class HeadCodes:
    packed: PackedGPTQ
    group_size: int
    act_order: bool
    module: str  # the head's module name (lm_head)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(vocab, hidden) weight."""
        return dequantize_packed(self.packed, dtype=dtype)


def write_head_codes(directory: Path, module: str, packed: PackedGPTQ, *, group_size: int, act_order: bool) -> Path:
    path = Path(directory) / HEAD_CODES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales, "g_idx": packed.g_idx}
    meta = {"module": module, "bits": str(packed.bits), "group_size": str(group_size), "act_order": str(act_order).lower(), "checkpoint_format": "gptq_v2" if packed.v2 else "gptq"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def read_head_codes(directory: str | Path) -> HeadCodes | None:
    """The head codes beside a GPTQ checkpoint, or None when it has none. A file that contradicts itself is
    refused by name (the export checks them against the model's head)."""
    path = Path(directory) / HEAD_CODES_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise HeadCodesError(f"{path}: not a readable safetensors file ({err}); re-quantize, or delete it to export the head in 8 bits") from None
    missing = [k for k in ("qweight", "qzeros", "scales", "g_idx") if k not in tensors] + [k for k in ("bits", "group_size", "module") if k not in meta]
    if missing:
        raise HeadCodesError(f"{path}: has no {', '.join(missing)}; re-quantize the float model (quantize.head_codes)")
    bits = int(meta["bits"])
    packed = PackedGPTQ(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits, meta.get("checkpoint_format") == "gptq_v2")
    cols, rows = packed.g_idx.numel(), packed.scales.shape[1]
    if packed.qweight.shape != (cols * bits // 32, rows):
        raise HeadCodesError(f"{path}: qweight {tuple(packed.qweight.shape)} does not hold {rows} x {cols} weights at {bits} bits; the file is corrupt, re-quantize")
    return HeadCodes(packed=packed, group_size=int(meta["group_size"]), act_order=meta.get("act_order") == "true", module=meta["module"])
