"""Mixture-of-experts layers whose experts live in one 3-D tensor (transformers 5's `Qwen3MoeExperts`,
`MixtralExperts`, ...) seen as one `nn.Linear` per expert projection, so that every stage that works on Linears
(GPTQ, RTN, the GPTQ checkpoint, the ONNX export's MatMulNBits) works on experts unchanged.

`unfuse_experts(model)` swaps each such module, in place, for `ExpertLinears`: a list of experts named as the
hub checkpoints store them (`mlp.experts.3.gate_proj`, `up_proj`, `down_proj`), with the same forward
(hidden_states, top_k_index, top_k_weights) -> hidden_states.
"""
from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError

__all__ = ["Expert", "ExpertLinears", "UnsupportedExpertsError", "expert_modules", "is_fused_experts", "unfuse_experts"]


class UnsupportedExpertsError(CompressError, ValueError):
    pass


class Expert(nn.Module):
    """One expert as transformers 4 and the hub checkpoints lay it out: act(gate_proj(x)) * up_proj(x) -> down_proj."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.ModuleList):
    """The experts of one MoE layer as separate Linears; a drop-in for the fused module it replaces.

    Each expert runs on the tokens routed to it only, and every expert is called, in order, even when no token
    reached it (on zero rows): a calibration pass visits the same Linears in the same order for every batch.
    torch.onnx (dynamo) exports this loop as it is (NonZero, GatherND, ScatterND-add per expert, each expert's
    MatMuls on 2-D weights), so the ONNX graph also computes routed tokens only."""

    def __init__(self, experts: list[Expert], fused_class: str):
        super().__init__(experts)
        self.fused_class = fused_class

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (tokens, hidden); top_k_index, top_k_weights (tokens, top_k)
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)  # a token picks an expert at most once: no repeated index
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]  # (routed, hidden)
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"from={self.fused_class}"


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: every expert's weights in one 3-D parameter."""
    weight = getattr(module, "gate_up_proj", None)
    if weight is None:
        weight = getattr(module, "up_proj", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 3 and hasattr(module, "num_experts")


def _check_layout(name: str, module: nn.Module) -> None:
    """Only the layout `Expert` reproduces exactly: concatenated [gate; up] rows, (out, in) weights, no biases,
    the default gate act(gate) * up, no norm after the expert."""
    from transformers.integrations.moe import _default_apply_gate

    problems = []
    if not getattr(module, "has_gate", True) or not hasattr(module, "gate_up_proj"):
        problems.append("no gate projection")
    if getattr(module, "has_bias", False):
        problems.append("biases")
    if getattr(module, "is_transposed", False):
        problems.append("transposed (in, out) weights")
    if not getattr(module, "is_concatenated", True):
        problems.append("interleaved gate/up rows")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("a norm after each expert")
    gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if gate is not _default_apply_gate:
        problems.append(f"its own gating ({type(module).__name__}._apply_gate)")
    if not hasattr(module, "act_fn"):
        problems.append("no act_fn")
    if problems:
        raise UnsupportedExpertsError(
            f"{name} ({type(module).__name__}) stores its experts with {', '.join(problems)}; compress handles experts laid out as "
            "act(gate) * up -> down with [gate; up] rows and no biases (Qwen2/3-MoE, Mixtral, OLMoE). Use a dense model or open an issue"
        )


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The fused experts modules of `model`, by name."""
    return {n: m for n, m in model.named_modules() if is_fused_experts(m)}


def _unfused(name: str, module: nn.Module) -> ExpertLinears:
    _check_layout(name, module)
    gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()  # (E, 2I, H), (E, H, I)
    count, rows, hidden = gate_up.shape
    inter = rows // 2
    if down.shape != (count, hidden, inter):
        raise UnsupportedExpertsError(f"{name}: down_proj is {tuple(down.shape)}, expected ({count}, {hidden}, {inter}) next to gate_up_proj {tuple(gate_up.shape)}")
    experts = []
    for e in range(count):
        expert = Expert(hidden, inter, module.act_fn, dtype=gate_up.dtype, device=gate_up.device)
        if gate_up.device.type != "meta":
            expert.gate_proj.weight.data.copy_(gate_up[e, :inter])
            expert.up_proj.weight.data.copy_(gate_up[e, inter:])
            expert.down_proj.weight.data.copy_(down[e])
        experts.append(expert)
    return ExpertLinears(experts, type(module).__name__)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of `model` by `ExpertLinears` (in place; weights copied); returns
    their names. Refuses, naming the module, a layout it cannot reproduce exactly."""
    names = []
    for name, module in list(model.named_modules()):
        if is_fused_experts(module):
            _set(model, name, _unfused(name, module))
            names.append(name)
    return names
