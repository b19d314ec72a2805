"""Importance of a teacher's blocks, heads and channels, measured with hooks on calibration blocks.

`measure_importance` runs the teacher over the blocks once (plus one forward per block for the
skip-KL depth metric) and returns the scores; `kl_to_teacher` is the cheap proxy that ranks candidate
shapes right after pruning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compress.architectures import get_blocks
from compress.models import lm_head
from compress.distill.losses import AgreementSums, agreement_sums
from compress.prune import importance as imp

_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class Importance:
    depth: Tensor  # (layers,) Block Influence or the KL increase when the block is skipped
    depth_metric: str
    block_influence: Tensor  # (layers,) always measured
    skip_kl: Tensor | None  # (layers,) when asked for
    heads: Tensor | None  # (layers, query heads)
    mlp: Tensor | None  # (layers, intermediate)
    hidden: Tensor | None  # (hidden,)

    def as_json(self) -> dict:
        def lst(t):
            return None if t is None else [round(float(x), 6) for x in t.flatten()] if t.ndim == 1 else [[round(float(x), 6) for x in row] for row in t]

        return {
            "depth_metric": self.depth_metric,
            "block_influence": lst(self.block_influence),
            "skip_kl": lst(self.skip_kl),
            "heads": lst(self.heads),
            "mlp": lst(self.mlp),
            "hidden": lst(self.hidden),
        }


@torch.no_grad()
def final_hidden(model, ids: Tensor, batch_size: int) -> Tensor:
    """(n, T, H) final normed hidden states, on CPU."""
    device = next(model.parameters()).device
    outs = [model.base_model(input_ids=ids[i : i + batch_size].to(device), use_cache=False).last_hidden_state.float().cpu() for i in range(0, len(ids), batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def kl_to_teacher(model, ids: Tensor, teacher_hidden: Tensor, teacher_head, *, batch_size: int, chunk_size: int = 1024) -> AgreementSums:
    """Sums of KL(teacher || model), NLLs and top-1 agreement over `ids`; `teacher_hidden` from `final_hidden`."""
    device = next(model.parameters()).device
    head = lm_head(model)
    weight, bias = head
    total = AgreementSums(tokens=0, student_nll=0.0, teacher_nll=0.0, kl=0.0, top1_agree=0)
    for i in range(0, len(ids), batch_size):
        batch = ids[i : i + batch_size].to(device)
        h = model.base_model(input_ids=batch, use_cache=False).last_hidden_state[:, :-1].float()
        th = teacher_hidden[i : i + batch_size, :-1].to(device)
        total = total + agreement_sums(
            h.reshape(-1, h.shape[-1]), weight.float(), None if bias is None else bias.float(),
            th.reshape(-1, th.shape[-1]), teacher_head[0].float(), None if teacher_head[1] is None else teacher_head[1].float(),
            batch[:, 1:].reshape(-1), chunk_size=chunk_size, softcap=head.softcap, teacher_softcap=getattr(teacher_head, "softcap", None),
        )
    return total


def _block_input(args, kwargs) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_output(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def measure_importance(model: nn.Module, ids: Tensor, *, batch_size: int, width: bool, depth_metric: str = "block_influence", progress=None) -> Importance:
    """Scores from one pass over `ids` (n, T): Block Influence per block and, with `width`, Minitron's
    head, MLP-channel and hidden-channel importance; `skip_kl` adds one pass per block."""
    blocks = get_blocks(model)
    n_layers = len(blocks)
    config = model.config
    bi_sum = torch.zeros(n_layers, dtype=torch.float64)
    bi_count = torch.zeros(n_layers, dtype=torch.float64)
    heads_sq: list[Tensor | None] = [None] * n_layers
    mlp_sq: list[Tensor | None] = [None] * n_layers
    hidden_sq: list[Tensor] = []
    handles = []
    inputs: dict[int, Tensor] = {}

    def pre_block(index):
        def hook(module, args, kwargs):
            inputs[index] = _block_input(args, kwargs)

        return hook

    def post_block(index):
        def hook(module, args, kwargs, output):
            s, c = imp.block_influence_sums(inputs.pop(index), _block_output(output))
            bi_sum[index] += s
            bi_count[index] += c

        return hook

    def accumulate(store: list, index: int, value: Tensor) -> None:
        store[index] = value.cpu() if store[index] is None else store[index] + value.cpu()

    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_block(index), with_kwargs=True))
        handles.append(block.register_forward_hook(post_block(index), with_kwargs=True))
        if width:
            attn, mlp = block.self_attn, block.mlp
            heads = config.num_attention_heads
            handles.append(attn.o_proj.register_forward_pre_hook(lambda m, a, i=index: accumulate(heads_sq, i, imp.head_square_sums(a[0], heads))))
            handles.append(mlp.down_proj.register_forward_pre_hook(lambda m, a, i=index: accumulate(mlp_sq, i, imp.channel_square_sums(a[0]))))
            for name in _NORMS:
                handles.append(getattr(block, name).register_forward_hook(lambda m, a, out: hidden_sq.append(imp.channel_square_sums(out).cpu())))
    if width:
        handles.append(model.base_model.norm.register_forward_hook(lambda m, a, out: hidden_sq.append(imp.channel_square_sums(out).cpu())))
    device = next(model.parameters()).device
    try:
        for i in range(0, len(ids), batch_size):
            model.base_model(input_ids=ids[i : i + batch_size].to(device), use_cache=False)
            if progress is not None:
                progress(1)
    finally:
        for h in handles:
            h.remove()
    block_influence = (bi_sum / bi_count.clamp(min=1)).float()
    skip = skip_kl(model, ids, batch_size=batch_size, progress=progress) if depth_metric == "skip_kl" else None
    hidden = None
    if width:
        # Sum the squared statistics over every norm output, then take the L2 over the batch.
        hidden = imp.finish(torch.stack(hidden_sq).sum(dim=0))
    return Importance(
        depth=block_influence if skip is None else skip,
        depth_metric=depth_metric,
        block_influence=block_influence,
        skip_kl=skip,
        heads=imp.finish(torch.stack(heads_sq)) if width else None,
        mlp=imp.finish(torch.stack(mlp_sq)) if width else None,
        hidden=hidden,
    )


@torch.no_grad()
def skip_kl(model: nn.Module, ids: Tensor, *, batch_size: int, progress=None) -> Tensor:
    """(layers,) KL(full model || model with block l replaced by the identity) per token, for each l."""
    blocks = get_blocks(model)
    reference = final_hidden(model, ids, batch_size)
    head = lm_head(model)
    out = torch.zeros(len(blocks))
    for index, block in enumerate(blocks):
        handle = block.register_forward_hook(lambda m, args, kwargs, output: _skip(args, kwargs, output), with_kwargs=True)
        try:
            sums = kl_to_teacher(model, ids, reference, head, batch_size=batch_size)
        finally:
            handle.remove()
        out[index] = sums.kl / max(1, sums.tokens)
        if progress is not None:
            progress(1)
    return out


def _skip(args, kwargs, output):
    x = _block_input(args, kwargs)
    if isinstance(output, (tuple, list)):
        return (x, *output[1:])
    return x
