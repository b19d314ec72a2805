"""Calibration inputs: each block is calibrated on what the model itself passes it (item 2 of issue 16)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compress.architectures import get_blocks
from compress.quantize.calibrate import capture_calibration

# Hybrid attention: sliding-window and global layers alternate, each kind with its own mask and rotary base.
HYBRID = {
    "gemma3_text": dict(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2, rope_local_base_freq=10.0),
    "gemma2": dict(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2),
    "gpt2": dict(n_embd=32, n_head=4, n_positions=64),  # the mask is a positional argument
}


def _hybrid(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "gpt2":
        common = dict(vocab_size=96)
    config = AutoConfig.for_model(family, **common, num_hidden_layers=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, **HYBRID[family])
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _inside_forward(model, ids):
    """Each block's input and output during the model's own forward."""
    seen = []
    handles = [
        b.register_forward_hook(lambda m, args, kwargs, out, i=i: seen.append((i, args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out)), with_kwargs=True)
        for i, b in enumerate(get_blocks(model))
    ]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", list(HYBRID))
@torch.no_grad()
def test_every_block_is_calibrated_with_its_own_arguments(family):
    model = _hybrid(family)
    calib = torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(1))  # 32 tokens > the window of 8
    captured = capture_calibration(model, calib, batch_size=2)
    blocks = get_blocks(model)
    hidden = captured.hidden
    for b in range(2):
        inside = _inside_forward(model, calib[2 * b : 2 * b + 2])
        assert torch.equal(hidden[b], inside[0][1])
    # The calibration driver's chain: block i on block i-1's calibration output, with block i's arguments.
    for i, block in enumerate(blocks):
        outputs = []
        for b, (h, kw) in enumerate(captured.states(i, hidden)):
            out = block(h, **kw)
            outputs.append(out[0] if isinstance(out, tuple) else out)
            expected = _inside_forward(model, calib[2 * b : 2 * b + 2])[i][2]
            torch.testing.assert_close(outputs[-1], expected, rtol=0, atol=1e-6, msg=f"block {i} batch {b}")
        if family != "gpt2" and i % 2 == 1:
            # What the old driver did: block 0's arguments for every block. On a global layer it is wrong.
            h, kw0 = captured.states(0, hidden)[0]
            wrong = block(h, **kw0)
            assert not torch.allclose(wrong[0] if isinstance(wrong, tuple) else wrong, outputs[0], atol=1e-3), f"block {i}: block 0's arguments should not fit it"
        hidden = outputs
    assert captured.kwargs[1][0]["attention_mask"] is not captured.kwargs[0][0]["attention_mask"] or family == "gpt2"


@torch.no_grad()
def test_shared_arguments_are_cast_once():
    from compress.quantize.calibrate import _cast_floats

    model = _hybrid("gemma3_text")
    captured = capture_calibration(model, torch.randint(3, 96, (2, 16)), batch_size=2)
    memo: dict = {}
    cast = [_cast_floats(captured.kwargs[i][0], torch.bfloat16, memo) for i in range(4)]
    assert cast[0]["position_embeddings"][0].dtype == torch.bfloat16
    assert cast[0]["position_embeddings"][0] is cast[2]["position_embeddings"][0]  # two sliding layers, one table
    assert not torch.equal(cast[0]["position_embeddings"][0], cast[1]["position_embeddings"][0])  # the global layer's own base


@torch.no_grad()
def test_a_block_forward_wrapped_by_someone_else_is_restored():
    """accelerate's hooks replace a module's forward on the instance; capturing must put that one back."""
    model = _hybrid("gemma3_text")
    block = get_blocks(model)[1]
    calls = []
    original = block.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = wrapped
    capture_calibration(model, torch.randint(3, 96, (2, 16)), batch_size=2)
    assert block.forward is wrapped and "forward" not in get_blocks(model)[0].__dict__
    model(input_ids=torch.randint(3, 96, (1, 8)))
    assert calls == [1]
