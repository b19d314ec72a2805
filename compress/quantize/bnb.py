"""bitsandbytes quantization (LLM.int8, 4-bit NF4/FP4) through transformers' BitsAndBytesConfig.

Runs where bitsandbytes runs (its CPU backend or CUDA); anywhere else it fails with the reason, never
falling back to float silently.
"""
from __future__ import annotations

import torch

from compress import models
from compress.errors import CompressError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BnbUnavailableError(CompressError, RuntimeError):
    pass


def bnb_config(spec):
    from transformers import BitsAndBytesConfig

    if spec.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.int8_threshold, llm_int8_skip_modules=list(spec.skip))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.method.removeprefix("bnb-"),
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[spec.compute_dtype],
        llm_int8_skip_modules=list(spec.skip),
    )


def require_bnb() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise BnbUnavailableError(f"bitsandbytes is not importable ({err}); install it with: pip install 'compress-llm[bnb]'") from None


def quantize_bnb(source: str, spec, device: torch.device):
    """The model at `source` loaded with bitsandbytes layers on `device`."""
    require_bnb()
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            models.resolve_source(source), quantization_config=bnb_config(spec), device_map={"": str(device)}, use_safetensors=True, dtype=torch.float32
        )
    except (RuntimeError, ImportError, ValueError) as err:
        raise BnbUnavailableError(f"bitsandbytes {spec.method} failed on {device}: {err}") from None
    return model.eval()
