"""Shapes and weight surgery of a pruned student: what a shape costs, which shapes are valid, and how
the teacher's tensors are cut down to one.

Width pruning reads each tensor's role from its name (`q_proj.weight` is (heads*head_dim, hidden), ...),
so every family whose tensors all have a known role prunes with this one table; depth pruning works for
every family whose blocks `compress.architectures.layer_layout` finds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from compress.architectures import StudentSpecError, get_blocks, layer_layout, num_layers, student_config_from_teacher, student_from_teacher

# (module, parameter) -> the dimension roles of the tensor. V vocab, H hidden, Q query heads x head_dim,
# K key/value heads x head_dim, I MLP channels, D one head's width (kept whole).
ROLES: dict[tuple[str, str], tuple[str, ...]] = {
    ("embed_tokens", "weight"): ("V", "H"),
    ("lm_head", "weight"): ("V", "H"),
    ("norm", "weight"): ("H",),
    ("input_layernorm", "weight"): ("H",),
    ("post_attention_layernorm", "weight"): ("H",),
    ("q_proj", "weight"): ("Q", "H"),
    ("q_proj", "bias"): ("Q",),
    ("k_proj", "weight"): ("K", "H"),
    ("k_proj", "bias"): ("K",),
    ("v_proj", "weight"): ("K", "H"),
    ("v_proj", "bias"): ("K",),
    ("o_proj", "weight"): ("H", "Q"),
    ("o_proj", "bias"): ("H",),
    ("gate_proj", "weight"): ("I", "H"),
    ("gate_proj", "bias"): ("I",),
    ("up_proj", "weight"): ("I", "H"),
    ("up_proj", "bias"): ("I",),
    ("down_proj", "weight"): ("H", "I"),
    ("down_proj", "bias"): ("H",),
    ("q_norm", "weight"): ("D",),
    ("k_norm", "weight"): ("D",),
}
AXES = ("depth", "heads", "mlp", "hidden")
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class Shape:
    """A student's shape. head_dim is the teacher's: heads are pruned whole."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class WidthLayout:
    """The teacher's width dimensions and its tensors by role; None when width pruning cannot apply."""

    shape: Shape
    head_dim: int
    vocab: int
    per_layer: list[tuple[str, tuple[str, ...]]]  # (name inside a block, roles), from block 0
    shared: list[tuple[str, tuple[str, ...]]]  # (full name, roles) outside the blocks, tied weights once
    blocks_prefix: str


@dataclass
class Selection:
    """Teacher indices the student keeps: blocks, residual channels, and per kept block its heads and channels."""

    layers: list[int]
    hidden: list[int] | None = None
    q_heads: dict[int, list[int]] = field(default_factory=dict)  # teacher block -> kept query heads, grouped by kv group
    kv_heads: dict[int, list[int]] = field(default_factory=dict)  # teacher block -> kept key/value heads
    mlp: dict[int, list[int]] = field(default_factory=dict)  # teacher block -> kept MLP channels

    def as_json(self) -> dict:
        return {
            "layers": self.layers,
            "hidden": self.hidden,
            "q_heads": {str(k): v for k, v in self.q_heads.items()},
            "kv_heads": {str(k): v for k, v in self.kv_heads.items()},
            "mlp": {str(k): v for k, v in self.mlp.items()},
        }


def teacher_shape(config) -> Shape:
    heads = getattr(config, "num_attention_heads", None)
    return Shape(
        num_hidden_layers=num_layers(config),
        hidden_size=int(getattr(config, "hidden_size", 0) or 0),
        intermediate_size=int(getattr(config, "intermediate_size", 0) or 0),
        num_attention_heads=int(heads or 0),
        num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads or 0),
    )


def width_layout(model: nn.Module) -> tuple[WidthLayout | None, str]:
    """The teacher's tensors by role, or (None, why width pruning cannot apply to it)."""
    config = model.config
    shape = teacher_shape(config)
    if not (shape.hidden_size and shape.intermediate_size and shape.num_attention_heads):
        return None, f"{config.model_type} config has no hidden_size / intermediate_size / num_attention_heads"
    head_dim = int(getattr(config, "head_dim", None) or shape.hidden_size // shape.num_attention_heads)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    sizes = {"V": vocab, "H": shape.hidden_size, "Q": shape.num_attention_heads * head_dim, "K": shape.num_key_value_heads * head_dim, "I": shape.intermediate_size, "D": head_dim}
    prefix = layer_layout(config).blocks + "."
    per_layer, shared = [], []
    for name, param in model.named_parameters():  # tied weights appear once
        parts = name.split(".")
        roles = ROLES.get(tuple(parts[-2:]))
        if roles is None:
            return None, f"tensor {name} has no known pruning role"
        if tuple(param.shape) != tuple(sizes[r] for r in roles):
            return None, f"tensor {name} has shape {tuple(param.shape)}, expected {tuple(sizes[r] for r in roles)} for roles {roles}"
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            if index == "0":
                per_layer.append((rest, roles))
        else:
            shared.append((name, roles))
    return WidthLayout(shape, head_dim, vocab, per_layer, shared, prefix), ""


def _sizes(layout: WidthLayout, shape: Shape) -> dict[str, int]:
    d = layout.head_dim
    return {"V": layout.vocab, "H": shape.hidden_size, "Q": shape.num_attention_heads * d, "K": shape.num_key_value_heads * d, "I": shape.intermediate_size, "D": d}


def count_parameters(layout: WidthLayout, shape: Shape) -> int:
    """Parameters of a student of `shape` (tied weights once), as `sum(p.numel() for p in model.parameters())`."""
    sizes = _sizes(layout, shape)
    shared = sum(math.prod(sizes[r] for r in roles) for _, roles in layout.shared)
    per_layer = sum(math.prod(sizes[r] for r in roles) for _, roles in layout.per_layer)
    return shared + shape.num_hidden_layers * per_layer


def check_shape(layout: WidthLayout | None, teacher: Shape, shape: Shape, *, multiple_of: int, key: str = "student.prune.shape") -> None:
    """Refuse a shape later stages could not use, naming the key and what would work."""
    if not 1 <= shape.num_hidden_layers <= teacher.num_hidden_layers:
        raise StudentSpecError(f"{key}.num_hidden_layers: {shape.num_hidden_layers} is out of range; the teacher has {teacher.num_hidden_layers} layers (use 1..{teacher.num_hidden_layers})")
    width_changed = [k for k in SHAPE_KEYS[1:] if getattr(shape, k) != getattr(teacher, k)]
    if not width_changed:
        return
    if layout is None:
        raise StudentSpecError(f"{key}: {', '.join(width_changed)} cannot be pruned for this model; prune depth only (num_hidden_layers)")
    for name in ("hidden_size", "intermediate_size"):
        value, full = getattr(shape, name), getattr(teacher, name)
        if not 1 <= value <= full:
            raise StudentSpecError(f"{key}.{name}: {value} is out of range (the teacher has {full})")
        if value != full and value % multiple_of:
            lower = max(multiple_of, value // multiple_of * multiple_of)
            raise StudentSpecError(f"{key}.{name}: {value} is not a multiple of {multiple_of} (student.prune.multiple_of); use {lower} or {lower + multiple_of if lower + multiple_of <= full else full}")
    kv, heads = shape.num_key_value_heads, shape.num_attention_heads
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    if not 1 <= kv <= teacher.num_key_value_heads:
        raise StudentSpecError(f"{key}.num_key_value_heads: {kv} is out of range; the teacher has {teacher.num_key_value_heads} key/value heads")
    if shape.hidden_size % heads:
        valid = [k * r for k in range(1, teacher.num_key_value_heads + 1) for r in range(1, group + 1) if shape.hidden_size % (k * r) == 0]
        raise StudentSpecError(
            f"{key}: hidden_size {shape.hidden_size} is not a multiple of num_attention_heads {heads}, which transformers' config check requires "
            f"(head_dim stays {layout.head_dim}); with hidden_size {shape.hidden_size} use num_attention_heads in {sorted(set(valid))}"
        )
    if heads < 1 or heads % kv or heads // kv > group:
        valid = [kv * r for r in range(1, group + 1)]
        raise StudentSpecError(
            f"{key}.num_attention_heads: {heads} does not fit {kv} key/value heads (each keeps up to the teacher's {group} query heads, "
            f"and the count must divide evenly); with num_key_value_heads={kv} use one of {valid}"
        )


def shape_from_spec(teacher: Shape, given: dict) -> Shape:
    """An explicit shape: the given keys over the teacher's values; kv heads follow the query heads when unsaid."""
    values = teacher.as_dict()
    values.update({k: v for k, v in given.items() if v is not None})
    if given.get("num_attention_heads") is not None and given.get("num_key_value_heads") is None:
        group = teacher.num_attention_heads // teacher.num_key_value_heads
        values["num_key_value_heads"] = max(1, min(teacher.num_key_value_heads, math.ceil(values["num_attention_heads"] / group)))
    return Shape(**values)


def candidate_shapes(layout: WidthLayout | None, teacher: Shape, budget: int, axes: tuple[str, ...], *, multiple_of: int, tolerance: float, depth_only_count=None) -> list[tuple[Shape, int]]:
    """Every shape on the pruned axes whose parameters lie in [budget * (1 - tolerance), budget]; with
    `mlp` the MLP width is the largest multiple that fits. Sorted by parameters, largest first."""
    layers = range(1, teacher.num_hidden_layers + 1) if "depth" in axes else [teacher.num_hidden_layers]
    if layout is None:
        if set(axes) - {"depth"}:
            raise StudentSpecError(f"student.prune.axes: width axes {sorted(set(axes) - {'depth'})} cannot be pruned for this model; use axes: [depth]")
        out = [(Shape(n, teacher.hidden_size, teacher.intermediate_size, teacher.num_attention_heads, teacher.num_key_value_heads), depth_only_count(n)) for n in layers]
        return sorted([(s, p) for s, p in out if budget * (1 - tolerance) <= p <= budget], key=lambda sp: -sp[1])

    def widths(full: int) -> list[int]:
        return sorted({*range(multiple_of, full, multiple_of), full})

    hidden = widths(teacher.hidden_size) if "hidden" in axes else [teacher.hidden_size]
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    heads = [(g * r, g) for g in range(1, teacher.num_key_value_heads + 1) for r in range(1, group + 1)] if "heads" in axes else [(teacher.num_attention_heads, teacher.num_key_value_heads)]
    out = []
    for n in layers:
        for h in hidden:
            for q, kv in heads:
                if h % q:  # transformers' Llama-like configs require hidden_size % num_attention_heads == 0
                    continue
                base = Shape(n, h, teacher.intermediate_size, q, kv)
                if "mlp" in axes:
                    at0 = count_parameters(layout, Shape(n, h, 0, q, kv))
                    slope = count_parameters(layout, Shape(n, h, 1, q, kv)) - at0
                    fit = (budget - at0) // slope if slope else 0
                    width = min(teacher.intermediate_size, fit // multiple_of * multiple_of if fit < teacher.intermediate_size else teacher.intermediate_size)
                    if width < multiple_of:
                        continue
                    base = Shape(n, h, width, q, kv)
                params = count_parameters(layout, base)
                if budget * (1 - tolerance) <= params <= budget:
                    out.append((base, params))
    return sorted(out, key=lambda sp: -sp[1])


def select(shape: Shape, teacher: Shape, importance) -> Selection:
    """The highest-importance blocks, channels and heads for `shape` (kept in the teacher's order)."""

    def top(scores: torch.Tensor, k: int) -> list[int]:
        return sorted(scores.topk(k).indices.tolist()) if k < scores.numel() else list(range(scores.numel()))

    layers = top(importance.depth, shape.num_hidden_layers) if shape.num_hidden_layers < teacher.num_hidden_layers else list(range(teacher.num_hidden_layers))
    selection = Selection(layers=layers)
    if shape.hidden_size != teacher.hidden_size:
        selection.hidden = top(importance.hidden, shape.hidden_size)
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    for layer in layers:
        if (shape.num_attention_heads, shape.num_key_value_heads) != (teacher.num_attention_heads, teacher.num_key_value_heads):
            scores = importance.heads[layer].reshape(teacher.num_key_value_heads, group)  # (kv heads, query heads per kv head)
            groups = top(scores.sum(dim=1), shape.num_key_value_heads)
            selection.kv_heads[layer] = groups
            selection.q_heads[layer] = [g * group + j for g in groups for j in top(scores[g], per_group)]
        if shape.intermediate_size != teacher.intermediate_size:
            selection.mlp[layer] = top(importance.mlp[layer], shape.intermediate_size)
    return selection


def pruned_config(teacher_config, shape: Shape, selection: Selection, head_dim: int | None):
    config = student_config_from_teacher(teacher_config, selection.layers)
    if head_dim is not None:
        for key in SHAPE_KEYS[1:]:
            setattr(config, key, getattr(shape, key))
        config.head_dim = head_dim  # no longer hidden_size // heads once either is pruned
    return config


def build_pruned(teacher: nn.Module, shape: Shape, selection: Selection) -> nn.Module:
    """The student: the teacher's tensors cut to the kept blocks, heads and channels, in a plain HF model."""
    if selection.hidden is None and not selection.q_heads and not selection.kv_heads and not selection.mlp:
        student, _ = student_from_teacher(teacher, selection.layers)
        return student
    from transformers import AutoModelForCausalLM

    layout, why = width_layout(teacher)
    if layout is None:
        raise StudentSpecError(f"width pruning is not possible for this {teacher.config.model_type} model: {why}")
    d = layout.head_dim

    def rows(heads: list[int]) -> list[int]:
        return [h * d + i for h in heads for i in range(d)]

    def cut(tensor: torch.Tensor, roles: tuple[str, ...], block: int | None) -> torch.Tensor:
        index = {
            "H": selection.hidden,
            "Q": rows(selection.q_heads[block]) if block is not None and block in selection.q_heads else None,
            "K": rows(selection.kv_heads[block]) if block is not None and block in selection.kv_heads else None,
            "I": selection.mlp.get(block) if block is not None else None,
        }
        out = tensor.detach()
        for dim, role in enumerate(roles):
            if index.get(role) is not None:
                out = out.index_select(dim, torch.tensor(index[role], dtype=torch.long, device=out.device))
        return out.clone()

    params = dict(teacher.named_parameters())
    state = {name: cut(params[name], roles, None) for name, roles in layout.shared}
    for new, old in enumerate(selection.layers):
        for rest, roles in layout.per_layer:
            state[f"{layout.blocks_prefix}{new}.{rest}"] = cut(params[f"{layout.blocks_prefix}{old}.{rest}"], roles, old)
    from transformers.initialization import no_init_weights

    config = pruned_config(teacher.config, shape, selection, d)
    with no_init_weights():  # every parameter is overwritten below (the strict check proves it)
        student = AutoModelForCausalLM.from_config(config, dtype=next(teacher.parameters()).dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if tied:
        student.tie_weights()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"pruned student weight mismatch: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    return student.eval()


def depth_only_counter(teacher: nn.Module):
    """Parameters of a depth-pruned student with n blocks, for families without a width layout."""
    blocks = get_blocks(teacher)
    per_block = sum(p.numel() for p in blocks[0].parameters())
    total = sum(p.numel() for p in teacher.parameters())
    rest = total - sum(p.numel() for b in blocks for p in b.parameters())
    return lambda n: rest + n * per_block


def describe_shape(shape: Shape) -> str:
    return f"{shape.num_hidden_layers} layers, hidden {shape.hidden_size}, MLP {shape.intermediate_size}, {shape.num_attention_heads} heads / {shape.num_key_value_heads} kv"

