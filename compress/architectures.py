"""Where each decoder-only family keeps its transformer blocks: one table, one student builder.

`layer_layout(config)` finds the blocks of any supported family; `select_layers` and
`student_from_teacher` use it so no code is copied per architecture.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError


class UnsupportedArchitectureError(CompressError, ValueError):
    pass


class StudentSpecError(CompressError, ValueError):
    """A student section that does not fit the teacher."""


@dataclass(frozen=True)
class LayerLayout:
    blocks: str  # attribute path of the nn.ModuleList of blocks, from the *ForCausalLM module
    count_key: str  # config attribute holding the number of blocks


_LLAMA_LIKE = LayerLayout("model.layers", "num_hidden_layers")

# model_type -> layout. Add a family here and a tiny config in tests/conftest.py (a test fails until you do).
LAYOUTS: dict[str, LayerLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": LayerLayout("transformer.h", "n_layer"),
    "gpt_neox": LayerLayout("gpt_neox.layers", "num_hidden_layers"),
    "opt": LayerLayout("model.decoder.layers", "num_hidden_layers"),
}

# Per-layer config lists (length == number of layers) that must follow the kept layers.
_PER_LAYER_KEYS = ("layer_types",)


def layer_layout(config) -> LayerLayout:
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}); "
            f"supported decoder-only families: {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[model_type]


def num_layers(config) -> int:
    return int(getattr(config, layer_layout(config).count_key))


def get_blocks(model: nn.Module) -> nn.ModuleList:
    module = model
    for part in layer_layout(model.config).blocks.split("."):
        module = getattr(module, part)
    return module


def select_layers(total: int, layers: int | list[int]) -> list[int]:
    """Teacher layer indices to keep: an explicit list (checked) or a count spread evenly, ends included."""
    if isinstance(layers, int):
        if not 1 <= layers <= total:
            raise StudentSpecError(f"student.from_teacher.layers: cannot keep {layers} of the teacher's {total} layers")
        if layers == 1:
            return [total - 1]
        return sorted({round(i * (total - 1) / (layers - 1)) for i in range(layers)})
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise StudentSpecError(f"student.from_teacher.layers: indices {bad} out of range for a teacher with {total} layers")
    return sorted(layers)


def student_config_from_teacher(teacher_config, keep: list[int]):
    config = copy.deepcopy(teacher_config)
    total = num_layers(teacher_config)
    setattr(config, layer_layout(config).count_key, len(keep))
    for key in _PER_LAYER_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == total:
            setattr(config, key, [values[i] for i in keep])
    return config


class WeightLayoutError(RuntimeError):
    """The teacher's tensor names do not fit the student built from its config."""


def student_from_teacher(teacher: nn.Module, layers: int | list[int]) -> tuple[nn.Module, list[int]]:
    """A student with the teacher's embeddings, norms and head, and the chosen subset of its blocks."""
    return student_from_state(teacher.config, teacher.state_dict(), layers, next(teacher.parameters()).dtype)


def student_from_state(teacher_config, state: Mapping[str, torch.Tensor], layers: int | list[int], dtype: torch.dtype) -> tuple[nn.Module, list[int]]:
    """`student_from_teacher` from the teacher's config and tensors by name (its state dict, or its
    checkpoint read lazily: only the tensors the student keeps are read)."""
    from transformers import AutoModelForCausalLM

    keep = select_layers(num_layers(teacher_config), layers)
    config = student_config_from_teacher(teacher_config, keep)
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix = layer_layout(config).blocks + "."
    renumber = {str(old): str(new) for new, old in enumerate(keep)}
    kept = {}
    for key in state:
        name = key
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if index not in renumber:
                continue
            name = f"{prefix}{renumber[index]}.{rest}"
        kept[name] = state[key].detach().clone()
    missing, unexpected = student.load_state_dict(kept, strict=False)
    # Tied heads appear once in the state dict; anything else missing means a layout bug.
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise WeightLayoutError(f"student/teacher weight mismatch: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    return student, keep


def student_from_config(teacher_config, overrides: dict, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher_config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise StudentSpecError(f"student.config.{key}: the teacher's {config.model_type} config has no such key")
        setattr(config, key, value)
    types = getattr(config, "layer_types", None)
    if types is not None and len(types) != num_layers(config):
        if len(set(types)) != 1:
            raise StudentSpecError("student.config: changing the layer count of a model with mixed layer_types needs an explicit layer_types list")
        config.layer_types = [types[0]] * num_layers(config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
