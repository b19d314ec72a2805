"""Paused block forwards (true-sequential GPTQ in one forward per block) equal restarting the block."""
import copy
import os
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress.architectures import get_blocks
from compress.quantize.calibrate import capture_block_inputs, linear_groups, quantizable_linears, quantize_blocks
from compress.quantize.grid import QuantGrid
from compress.quantize.suspended import SuspendedForwards


def _block_and_inputs(batches=3):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    states = capture_block_inputs(model, torch.randint(0, 64, (2 * batches, 12)), batch_size=2)
    block = get_blocks(model)[0]
    mine = {n: m for n, m in quantizable_linears(model, ()).items()}
    with torch.no_grad():
        groups = linear_groups(block, {n: mine[n] for n in mine}, states)
    return block, [mine[g[0]] for g in groups], [[mine[n] for n in g] for g in groups], states


def _edit(modules):
    """Stand-in for quantizing a group: a change every later input depends on."""
    for m in modules:
        m.weight.data = torch.round(m.weight.data * 8) / 8


def _output(block, h, kw):
    out = block(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def _restarting(block, leaders, groups, states):
    """The reference: rerun every batch from the block's start for each group."""
    seen = []
    for leader, group in zip(leaders, groups):
        inputs = []
        handle = leader.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
        try:
            for h, kw in states:
                block(h, **kw)
        finally:
            handle.remove()
        seen.append(inputs)
        _edit(group)
    return seen, [_output(block, h, kw) for h, kw in states]


@torch.no_grad()
def test_paused_forwards_see_the_same_inputs_and_outputs_as_restarting():
    block, leaders, groups, states = _block_and_inputs()
    assert len(leaders) == 4  # q/k/v, o, gate/up, down
    unedited = [_output(block, h, kw) for h, kw in states]
    reference = copy.deepcopy(block)
    by_name = dict(reference.named_modules())
    names = {id(m): n for n, m in block.named_modules()}
    ref_seen, ref_outputs = _restarting(reference, [by_name[names[id(m)]] for m in leaders], [[by_name[names[id(m)]] for m in g] for g in groups], states)

    seen = []
    with SuspendedForwards(block, leaders, states) as forwards:
        for leader, group in zip(leaders, groups):
            seen.append([x.clone() for x in forwards.advance(leader)])
            _edit(group)
        outputs = forwards.finish()
    assert [len(s) for s in seen] == [len(states)] * 4
    for mine, ref in zip(seen, ref_seen):
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b, before in zip(outputs, ref_outputs, unedited):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, before)  # the edits reached the outputs: the comparison can fail


def test_an_error_in_the_caller_unwinds_paused_forwards():
    block, leaders, groups, states = _block_and_inputs()
    before = threading.active_count()
    with torch.no_grad(), pytest.raises(KeyError):
        with SuspendedForwards(block, leaders, states) as forwards:
            for x in forwards.advance(leaders[0]):
                pass
            raise KeyError("caller failed while every forward was paused")
    assert threading.active_count() == before
    assert not any(h for h in block._forward_pre_hooks.values()) and all(not m._forward_pre_hooks for m in leaders)


def test_an_error_inside_a_forward_reaches_the_caller():
    block, leaders, groups, states = _block_and_inputs()

    def broken(module, args):
        raise ValueError("broken sub-layer")

    handle = leaders[1].register_forward_pre_hook(broken, prepend=True)
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="broken sub-layer"):
            with SuspendedForwards(block, leaders, states) as forwards:
                for leader in leaders:
                    list(forwards.advance(leader))
    finally:
        handle.remove()


def test_stops_out_of_call_order_are_refused():
    block, leaders, groups, states = _block_and_inputs()
    with torch.no_grad(), pytest.raises(RuntimeError, match="different order"):
        with SuspendedForwards(block, leaders, states) as forwards:
            list(forwards.advance(leaders[1]))  # every batch first stops at q/k/v's input


def test_true_sequential_gptq_is_deterministic_and_differs_from_the_papers_order(wide_llama):
    calib = torch.randint(0, 300, (8, 24))

    def run(true_sequential):
        model = AutoModelForCausalLM.from_pretrained(wide_llama).eval()
        quantize_blocks(model, calib, QuantGrid(4, True), method="gptq", group_size=32, skip=("lm_head",), act_order=True, true_sequential=true_sequential, batch_size=2)
        return {n: p.clone() for n, p in model.named_parameters()}

    a, b, paper = run(True), run(True), run(False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # q/k/v see the same inputs either way; o_proj sees attention through quantized q/k/v only in true-sequential.
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(a[q], paper[q]) and not torch.equal(a[o], paper[o])


def test_ctrl_c_while_a_forward_runs_unwinds_every_forward():
    # The caller is interrupted while batch 0 is still running (not paused): on exit it must be told to
    # stop at its next pause, or waiting for it would hang.
    block, leaders, groups, states = _block_and_inputs()
    running = threading.Event()

    def slow(module, args):
        if threading.current_thread() is not threading.main_thread() and not running.is_set():
            running.set()
            time.sleep(0.3)

    def interrupt():
        running.wait(10)
        os.kill(os.getpid(), signal.SIGINT)

    handle = leaders[1].register_forward_pre_hook(slow, prepend=True)
    try:
        with torch.no_grad(), pytest.raises(KeyboardInterrupt):
            with SuspendedForwards(block, leaders, states) as forwards:
                list(forwards.advance(leaders[0]))
                threading.Thread(target=interrupt, daemon=True).start()
                list(forwards.advance(leaders[1]))
                time.sleep(5)  # not reached: the interrupt arrives while batch 0 runs
    finally:
        handle.remove()
    assert all(b.task.done() for b in forwards.batches if b.task is not None)
