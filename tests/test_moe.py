"""Mixture-of-experts models (issue 16): experts in 3-D tensors seen as one Linear per expert projection, GPTQ per
expert on exactly the tokens routed to it, with the token counts recorded and a fallback for experts too few tokens
reached, the GPTQ checkpoint in the hub's per-expert layout, and the generic ONNX export."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, VOCAB
from safetensors import safe_open

MOE = {
    "qwen3_moe": dict(TINY["qwen3_moe"]),
    "qwen2_moe": dict(TINY["qwen3_moe"], shared_expert_intermediate_size=32),
    "olmoe": dict(TINY["qwen3_moe"]),
    "mixtral": dict(TINY["llama"], num_local_experts=4, num_experts_per_tok=2),
}


def _model(family: str, layers: int = 2, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = {k: v for k, v in {**MOE[family], **overrides}.items() if k != "moe_intermediate_size" or family != "mixtral"}
    config = AutoConfig.for_model(family, vocab_size=VOCAB, num_hidden_layers=layers, **kw)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", list(MOE))
def test_unfused_experts_compute_what_the_fused_ones_do_and_carry_the_hub_names(tmp_path, family):
    from compress.moe import ExpertLinears, unfuse_experts

    model = _model(family)
    x = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).logits
        model.save_pretrained(tmp_path)
        assert unfuse_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        got = model(x).logits
    assert isinstance(model.model.layers[0].mlp.experts, ExpertLinears)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    if family != "mixtral":  # Mixtral's hub checkpoints call them w1/w3/w2; ours are gate/up/down_proj
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
            saved = set(fh.keys())
        # transformers 5 writes 3-D experts back in the hub's per-expert layout: the unfused names are those keys.
        ours = set(model.state_dict()) - {"lm_head.weight"} if model.config.tie_word_embeddings else set(model.state_dict())
        assert ours == saved


def test_expert_layouts_it_cannot_reproduce_are_refused_by_name():
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.moe import UnsupportedExpertsError, unfuse_experts

    config = AutoConfig.for_model("gpt_oss", vocab_size=64, num_hidden_layers=1, hidden_size=32, intermediate_size=32, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(UnsupportedExpertsError, match=r"model.layers.0.mlp.experts \(GptOssExperts\) stores its experts with biases, transposed"):
        unfuse_experts(AutoModelForCausalLM.from_config(config))


def _routed_inputs(model, calib):
    """What each expert of layer 0 reads in the float model: {expert: (its tokens' hidden states, its intermediate activations)}."""
    experts = model.model.layers[0].mlp.experts
    seen = {}

    def hook(module, args):
        hidden, index = args[0], args[1]
        inter = module.gate_up_proj.shape[1] // 2
        for e in range(module.num_experts):
            x = hidden[(index == e).any(-1)]  # tokens in order, as torch.where gives them
            gate, up = (x @ module.gate_up_proj[e].T).split(inter, dim=-1)
            seen[e] = (x, module.act_fn(gate) * up)

    handle = experts.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(calib)
    handle.remove()
    return seen


def test_gptq_calibrates_each_expert_on_the_tokens_routed_to_it(monkeypatch):
    """Paper order (every Hessian from the float block): expert e's gate/up and down are exactly GPTQ on the Hessians
    of the tokens the router sent to e, and its report counts those tokens; one calibration batch, so the driver sums
    H in the same order as this test."""
    import copy

    from compress.moe import unfuse_experts
    from compress.quantize.calibrate import quantize_blocks
    from compress.quantize.gptq import accumulate_hessian, gptq_shared
    from compress.quantize.grid import QuantGrid

    model = _model("qwen3_moe", layers=1)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    seen = _routed_inputs(model, calib)
    reference = copy.deepcopy(model)
    unfuse_experts(model)
    grid = QuantGrid(bits=4, sym=True)
    options = dict(group_size=16, damp=0.01, act_order=True)
    results, reports = quantize_blocks(model, calib, grid, method="gptq", skip=("lm_head",), true_sequential=False, batch_size=4, min_tokens=0, **options)
    by_name = {r.name: r for r in reports}
    counts = {e: seen[e][0].shape[0] for e in seen}
    assert sum(counts.values()) == 2 * calib.numel()  # two experts per token
    assert len(set(counts.values())) > 1  # the routing is uneven, so a per-layer count would not pass
    for e, (x, inter) in seen.items():
        name = f"model.layers.0.mlp.experts.{e}"
        assert by_name[f"{name}.gate_proj"].tokens == by_name[f"{name}.down_proj"].tokens == counts[e]
        fused = reference.model.layers[0].mlp.experts
        half = fused.gate_up_proj.shape[1] // 2
        gate, up = gptq_shared([fused.gate_up_proj[e, :half], fused.gate_up_proj[e, half:]], accumulate_hessian(None, 0, x)[0], grid, **options)
        (down,) = gptq_shared([fused.down_proj[e]], accumulate_hessian(None, 0, inter)[0], grid, **options)
        for suffix, want in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            assert torch.equal(results[f"{name}.{suffix}"].codes, want.codes), f"{name}.{suffix}"
    # The attention projections see every token.
    assert by_name["model.layers.0.self_attn.q_proj"].tokens == calib.numel()


def test_experts_few_or_no_tokens_reached_are_rounded_to_nearest_and_say_so():
    """The router of layer 0 never picks expert 3 (its logit is -inf: an expert this calibration text never reaches).
    GPTQ on its all-zero Hessian would zero every column; the driver rounds it to nearest instead, as it does an
    expert below min_tokens."""
    import copy

    from compress.moe import unfuse_experts
    from compress.quantize.calibrate import quantize_blocks
    from compress.quantize.grid import QuantGrid, rtn

    model = _model("qwen3_moe", layers=1)
    router = model.model.layers[0].mlp.gate

    def never_three(module, args, out):
        logits = out[0].clone()
        logits[:, 3] = float("-inf")
        probs = logits.softmax(-1)
        top, index = probs.topk(module.top_k, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(out[1].dtype), index

    router.register_forward_hook(never_three)
    unfuse_experts(model)
    original = model.model.layers[0].mlp.experts[3].gate_proj.weight.detach().clone()
    floored = copy.deepcopy(model)  # (the hook comes along)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    grid = QuantGrid(bits=4, sym=True)
    results, reports = quantize_blocks(model, calib, grid, method="gptq", skip=("lm_head",), group_size=16, batch_size=2, min_tokens=0)
    by_name = {r.name: r for r in reports}
    counts = {e: by_name[f"model.layers.0.mlp.experts.{e}.gate_proj"].tokens for e in range(4)}
    assert counts[3] == 0 and sum(counts.values()) == 2 * calib.numel()
    dead = by_name["model.layers.0.mlp.experts.3.gate_proj"]
    assert dead.fallback.startswith("0 calibration tokens reached it") and dead.output_error is None
    torch.testing.assert_close(results["model.layers.0.mlp.experts.3.gate_proj"].Q, rtn(original, grid, 16).Q)
    assert results["model.layers.0.mlp.experts.3.gate_proj"].Q.abs().sum() > 0
    assert all(by_name[f"model.layers.0.mlp.experts.{e}.gate_proj"].fallback is None for e in range(3))
    # A floor above the least-used live expert's count rounds that one too, and no other.
    least = min(range(3), key=counts.get)
    _, reports = quantize_blocks(floored, calib, grid, method="gptq", skip=("lm_head",), group_size=16, batch_size=2, min_tokens=counts[least] + 1)
    fallen = {r.name.rsplit(".", 1)[0] for r in reports if r.fallback}
    assert fallen == {f"model.layers.0.mlp.experts.{e}" for e in range(4) if counts[e] <= counts[least]}


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory, tokenizer_dir):
    from conftest import save_tiny

    return save_tiny(tmp_path_factory.mktemp("moe") / "qwen3_moe", "qwen3_moe", tokenizer_dir, layers=2, train_steps=30)


def test_quantize_writes_experts_per_projection_and_records_their_tokens(tmp_path, moe_teacher, text_files):
    from test_quantize import make_recipe

    from compress.models import load_quantized
    from compress.quantize.stage import describe, run_quantize

    result = run_quantize(make_recipe(tmp_path, text_files, group_size=16), str(moe_teacher), tmp_path / "q", progress=False)
    with safe_open(str(result.artifact / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert not [k for k in keys if fh.get_slice(k).get_shape().__len__() == 3]
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{proj}.qweight" in keys
    record = json.loads((result.artifact / "compress.json").read_text())
    layers = {r["name"]: r for r in record["layers"]}
    for layer in range(2):
        routed = sum(layers[f"model.layers.{layer}.mlp.experts.{e}.gate_proj"]["tokens"] for e in range(4))
        assert routed == 2 * 16 * 32  # samples x seq_len tokens, two experts each
    experts = result.metrics["experts"]
    assert experts["experts"] == 8 and experts["tokens_min"] <= experts["tokens_median"] <= experts["tokens_max"]
    assert "calibration tokens per expert" in describe(result)
    assert result.metrics["ppl_increase"] < 0.1
    model = load_quantized(result.artifact)
    assert type(model.model.layers[0].mlp.experts).__name__ == "ExpertLinears"


def test_bitsandbytes_refuses_fused_experts_before_compute(tmp_path, moe_teacher, text_files, monkeypatch):
    from test_quantize import make_recipe

    import compress.quantize.stage as stage
    from compress.quantize.stage import QuantizeError, run_quantize

    monkeypatch.setattr(stage, "eval_blocks", lambda *a, **k: pytest.fail("data read before the refusal"))
    with pytest.raises(QuantizeError, match=r"model.layers.0.mlp.experts \(Qwen3MoeExperts\) holds its 4 experts in 3-D tensors, which bnb-nf4 leaves in float"):
        run_quantize(make_recipe(tmp_path, text_files, method="bnb-nf4"), str(moe_teacher), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_float_moe_exports_and_generates_as_transformers(tmp_path, moe_teacher):
    pytest.importorskip("onnxruntime")
    from transformers import AutoModelForCausalLM

    from compress_exporters.onnx import export_onnx
    from compress_exporters.runtime import OnnxCausalLM

    result = export_onnx(moe_teacher, tmp_path / "onnx", weights="fp32")
    assert result.validation["passed"] and result.validation["max_rel_diff"] < 1e-5
    model = AutoModelForCausalLM.from_pretrained(moe_teacher).eval()
    lm = OnnxCausalLM.from_dir(result.artifact)
    prompt = torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 12:].tolist()
    assert list(lm.greedy_tokens(prompt, 16)) == ref
