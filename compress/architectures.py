"""Where a decoder-only causal LM keeps its transformer blocks, found structurally; one student builder.

`layer_layout(config)` finds the blocks of any family transformers builds (no per-family table);
`select_layers` and `student_from_teacher` use it so no code is copied per architecture.
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
    block_class: str  # class name of one block (e.g. LlamaDecoderLayer)


# Families run through the whole chain by the test suite (tests/test_families.py); any other decoder-only
# causal LM that transformers builds is found the same way, structurally, and is named as untested.
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt", "qwen3_moe")

# Per-layer config lists (length == number of layers) that must follow the kept layers.
_PER_LAYER_KEYS = ("layer_types",)

_LAYOUTS: dict[str, LayerLayout] = {}  # config JSON -> layout (a meta-device build per distinct config)


def _count_key(config) -> str:
    """The config's own name for the number of blocks (`n_layer` for GPT-2, through its attribute_map)."""
    return getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")


def layer_layout(config) -> LayerLayout:
    """Where a causal LM keeps its decoder blocks, found from its structure, not from a table: the
    `nn.ModuleList` whose length is the config's layer count, cross-checked with the model's
    `_no_split_modules` (the class transformers itself never splits across devices: the block).
    The model is built on the meta device (no memory, no weights) once per distinct config."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    what = f"{model_type!r} ({archs})"
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(f"unsupported architecture {what}: an encoder-decoder model; compress handles decoder-only causal LMs")
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {what}: a multimodal model around a {getattr(text, 'model_type', '?')!r} text decoder "
            f"(vision_config: {'yes' if getattr(config, 'vision_config', None) is not None else 'no'}); compress handles text-only "
            "causal LMs: save the text decoder on its own (its language-model weights with text_config as config.json) and compress that"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {what}: transformers has no causal-LM class for it (not a decoder-only text model); "
            f"decoder-only causal LMs are supported, tested: {', '.join(TESTED_FAMILIES)}"
        )
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise UnsupportedArchitectureError(f"unsupported architecture {what}: its config has no layer count (num_hidden_layers)")
    key = f"{type(config).__module__}.{type(config).__qualname__}:{config.to_json_string(use_diff=False)}"
    if key not in _LAYOUTS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
        _LAYOUTS[key] = _find_blocks(model, count, what)
    return _LAYOUTS[key]


def _find_blocks(model: nn.Module, count: int, what: str) -> LayerLayout:
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count and name]
    blocks = [(name, m) for name, m in lists if {type(b).__name__ for b in m} <= no_split] if no_split else lists
    blocks = [(name, m) for name, m in blocks if len({type(b) for b in m}) == 1]
    if len(blocks) > 1:  # nested lists of the same length: the outermost is the stack of blocks
        blocks = [min(blocks, key=lambda nm: nm[0].count("."))]
    if not blocks:
        found = ", ".join(f"{name} ({len(m)} x {type(m[0]).__name__})" for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)) or "none"
        raise UnsupportedArchitectureError(
            f"unsupported architecture {what}: no stack of {count} decoder blocks found "
            f"(module lists: {found}; blocks transformers keeps whole: {sorted(no_split) or 'not declared'})"
        )
    name, stack = blocks[0]
    if "encoder" in name.split("."):
        raise UnsupportedArchitectureError(
            f"unsupported architecture {what}: its blocks are an encoder stack ({name}, {type(stack[0]).__name__}) with a language-model head, "
            f"not a decoder-only causal LM; tested families: {', '.join(TESTED_FAMILIES)}"
        )
    return LayerLayout(blocks=name, count_key=_count_key(model.config), block_class=type(stack[0]).__name__)


def num_layers(config) -> int:
    return int(getattr(config, _count_key(config)))


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
    if types is not None and len(types) != num_layers(config) and "layer_types" not in overrides:
        period = next(p for p in range(1, len(types) + 1) if all(t == types[i % p] for i, t in enumerate(types)))
        if period == len(types):
            raise StudentSpecError(
                f"student.config: the teacher's layer_types {list(types)} follow no repeating pattern; "
                f"give student.config.layer_types ({num_layers(config)} entries) with the new layer count"
            )
        # The teacher's pattern (Gemma-2: sliding, global; Gemma-3: 5 sliding, 1 global) continued to the new count.
        config.layer_types = [types[i % period] for i in range(num_layers(config))]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
