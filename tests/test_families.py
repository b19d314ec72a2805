"""Every tested family through the whole chain (issue 16): distil, GPTQ 4-bit, int4 ONNX export with validation,
the torch-free runtime's greedy tokens equal to transformers', and bench. The README support table is generated
from these tests' parametrizations (`support_table`), so a family in it without its end-to-end test fails."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, TINY, tiny_recipe

from compress.architectures import TESTED_FAMILIES
from compress.pipeline import run_recipe
from compress.recipe import validate_recipe

pytest.importorskip("onnxruntime")

BENCH = {"seq_len": 32, "max_eval_tokens": 128, "prompt_lengths": [16], "new_tokens": 3, "decode_prompt": 8, "batch_sizes": [1], "repeats": 1, "warmup": 1, "threads": 1, "teacher_baseline": False}


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_chain(tmp_path, teachers, text_files, family):
    from compress.models import load_quantized
    from compress_exporters.runtime import OnnxCausalLM

    data = tiny_recipe(tmp_path, teachers[family], text_files, steps=4, eval_every=4, save_every=4)
    data["quantize"] = {"method": "gptq", "bits": 4, "group_size": 16, "calib": {"samples": 8, "seq_len": 32}}
    data["export"] = {"weights": "int4", "lm_head": "float"}  # 4-bit blocks at fp32 compute: the runtime can match torch to float noise
    data["bench"] = dict(BENCH)
    result = run_recipe(validate_recipe(data), progress=False, log=lambda _: None)
    run = tmp_path / "run"
    assert [o.stage for o in result.outcomes] == ["distill", "quantize", "export", "bench"]
    distilled = json.loads((run / "student" / "compress.json").read_text())["metrics"]
    # (Whether distillation closes the gap is test_distill's; a kept-layers student starts close, 4 steps only must not break it.)
    assert distilled["eval"]["kl_per_token"] < 1.5 * distilled["initial_eval"]["kl_per_token"], f"{family}: {distilled}"
    validation = json.loads((run / "onnx-int4" / "compress.json").read_text())["metrics"]["validation"]
    assert validation["passed"] and validation["top1_agreement"] >= 0.8
    # Each of the runtime's greedy tokens is transformers' argmax on the same (dequantized GPTQ) weights at that
    # position, past the sliding window; a different pick is allowed only at a float tie (tiny models repeat tokens).
    model = load_quantized(run / "gptq-4bit").eval()
    lm = OnnxCausalLM.from_dir(run / "onnx-int4")
    prompt = torch.randint(3, 300, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = list(lm.greedy_tokens(prompt, 24))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1 : -1]
    best = logits.argmax(-1)
    picked = logits.gather(1, torch.tensor(ours)[:, None]).squeeze(1)
    gap = logits.max(-1).values - picked
    assert (gap <= 1e-4 * logits.abs().max()).all() and int((best != torch.tensor(ours)).sum()) <= 2, f"{family}: runtime and transformers disagree: gaps {gap.tolist()}"
    bench = json.loads((run / "bench" / "results.json").read_text())
    rows = {a["label"]: a for a in bench["artifacts"]}
    assert set(rows) == {"teacher", "student", "gptq-4bit", "onnx-int4"}
    for label, row in rows.items():
        assert 1 < row["quality"]["ppl"] < 1e4, f"{family} {label}: {row['quality']}"
    assert rows["onnx-int4"]["quality"]["kl_per_token"] < 1.0


def test_every_tested_family_has_a_tiny_config_and_a_chain_test():
    assert set(TESTED_FAMILIES) == set(FAMILIES) == set(TINY)


def test_refused_architectures_name_what_was_found(tmp_path):
    from transformers import AutoConfig, T5Config

    from compress.architectures import UnsupportedArchitectureError, layer_layout

    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        layer_layout(T5Config(num_layers=1))
    with pytest.raises(UnsupportedArchitectureError, match="multimodal model around a 'gemma3_text' text decoder"):
        layer_layout(AutoConfig.for_model("gemma3"))
    with pytest.raises(UnsupportedArchitectureError, match=r"encoder stack \(bert.encoder.layer, BertLayer\)"):
        layer_layout(AutoConfig.for_model("bert", num_hidden_layers=1, is_decoder=True))


def test_families_outside_the_tested_ones_are_found_structurally():
    from transformers import AutoConfig

    from compress.architectures import layer_layout

    for family, path, block in [("olmo2", "model.layers", "Olmo2DecoderLayer"), ("falcon", "transformer.h", "FalconDecoderLayer"), ("starcoder2", "model.layers", "Starcoder2DecoderLayer")]:
        config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=3)
        layout = layer_layout(config)
        assert (layout.blocks, layout.block_class) == (path, block)


MOE_FAMILIES = ("qwen3_moe",)  # experts in 3-D tensors: GPTQ/RTN per expert, bitsandbytes refused (test_moe)
WIDTH_PRUNED = ("llama", "mistral", "qwen2", "qwen3")  # tensors with known width-pruning roles (test_prune.WIDTH_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_pruning_every_family(teachers, family):
    from transformers import AutoModelForCausalLM

    from compress.architectures import StudentSpecError, student_from_teacher
    from compress.prune.stage import plan_prune, prune_model
    from compress.recipe import PruneSpec

    teacher = AutoModelForCausalLM.from_pretrained(teachers[family]).eval()
    x = torch.randint(3, 300, (6, 32), generator=torch.Generator().manual_seed(2))
    result = prune_model(teacher, x, PruneSpec(shape={"num_hidden_layers": 2}, calib_samples=3, proxy_samples=2), progress=False, log=lambda s: None)
    kept = result.report["kept"]["layers"]
    assert len(kept) == 2
    # The pruned model is exactly the teacher with only the two chosen blocks (their own layer types included).
    reference, _ = student_from_teacher(teacher, kept)
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(x[:2]).logits, reference.eval()(x[:2]).logits, rtol=0, atol=1e-5)
    types = getattr(teacher.config, "layer_types", None)
    if types is not None:
        assert result.model.config.layer_types == [types[i] for i in kept]
    if family not in WIDTH_PRUNED:
        with pytest.raises(StudentSpecError, match=r"use axes: \[depth\]"):
            plan_prune(teacher, PruneSpec(target_params=0.6, axes=["mlp"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_and_bitsandbytes_every_family(tmp_path, teachers, text_files, family):
    import importlib.util

    from test_quantize import make_recipe
    from transformers import AutoModelForCausalLM

    from compress.models import load_quantized
    from compress.quantize.stage import run_quantize

    float_model = AutoModelForCausalLM.from_pretrained(teachers[family]).eval()
    x = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = float_model(x).logits
    rtn = run_quantize(make_recipe(tmp_path, text_files, method="rtn", group_size=16), str(teachers[family]), tmp_path / "rtn", progress=False)
    with torch.no_grad():
        got = load_quantized(rtn.artifact).eval()(x).logits
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 0.2, f"{family} RTN 4-bit: relative logit error {rel}"
    if family in MOE_FAMILIES:  # bitsandbytes quantizes nn.Linear only: the 3-D experts would stay float (test_moe)
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed (pip install 'compress-llm[bnb]')")
    # LLM.int8 (bitsandbytes' 4-bit kernels need widths of at least their block of 64; the tiny models are 32 wide:
    # test_bnb runs nf4/fp4 on a wider Llama).
    bnb = run_quantize(make_recipe(tmp_path, text_files, method="bnb-int8"), str(teachers[family]), tmp_path / "int8", progress=False)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(bnb.artifact, device_map={"": "cpu"}).eval()(x).logits.float()
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 0.1, f"{family} bnb-int8: relative logit error {rel}"


def _params(test) -> tuple[str, ...]:
    """The families a parametrized test runs for, read from its own marker."""
    return tuple(next(m.args[1] for m in test.pytestmark if m.name == "parametrize" and m.args[0] == "family"))


def support_table() -> str:
    """README's family x stage table, generated from what the tests above (and test_distill, test_prune,
    test_export_fused) actually run: a cell says yes only where a test covers that family and stage."""
    from test_distill import test_distill_every_family
    from test_prune import WIDTH_FAMILIES

    from test_export_fused import test_fused_fp32_matches_torch_on_a_padded_batch

    from compress.architectures import layer_layout
    from conftest import tiny_config

    chain, depth, quant = _params(test_whole_chain), _params(test_depth_pruning_every_family), _params(test_rtn_and_bitsandbytes_every_family)
    distilled, fused = _params(test_distill_every_family), _params(test_fused_fp32_matches_torch_on_a_padded_batch)
    head = "| family | blocks found | distill | prune | GPTQ | RTN | bnb | ONNX export | runtime greedy = transformers | bench |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for family in FAMILIES:
        layout = layer_layout(tiny_config(family))
        yes = lambda ok: "yes" if ok else "no"  # noqa: E731
        prune = ("depth + width" if family in WIDTH_FAMILIES else "depth") if family in depth else "no"
        # The chain's tiny models have 8-wide heads, which GroupQueryAttention refuses: they take the generic path.
        export = ("fused GQA graph + generic torch.onnx" if family in fused else "generic torch.onnx") if family in chain else "no"
        rows.append(
            f"| {family} | `{layout.blocks}` ({layout.block_class}) | {yes(family in chain and family in distilled)} | {prune} | {yes(family in chain)} "
            f"| {yes(family in quant)} | {'refused (experts would stay float)' if family in MOE_FAMILIES else yes(family in quant)} | {export} | {yes(family in chain)} | {yes(family in chain)} |"
        )
    return "\n".join(rows) + "\n"


def test_readme_support_table_is_generated_from_the_tests():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert support_table() in readme, "README's model-family table is stale: paste the output of tests/test_families.py::support_table()"


def test_phi3_long_context_rotary_exports_and_generates_as_transformers(tmp_path, tokenizer_dir):
    """Phi-3's longrope switches from the short to the long factors past the original context (16 here), so the
    runtime's greedy tokens are checked on both sides of it. The export's batch-vs-alone bar is lifted for such
    models: torch itself gives a short prompt different numbers alone (short factors) and in a long batch."""
    from conftest import save_tiny
    from transformers import AutoModelForCausalLM

    from compress_exporters.onnx import export_onnx
    from compress_exporters.runtime import OnnxCausalLM

    rope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0, 2.0, 4.0, 8.0]}
    folder = save_tiny(tmp_path / "phi3", "phi3", tokenizer_dir, train_steps=20, max_position_embeddings=128, original_max_position_embeddings=16, rope_scaling=rope)
    from types import SimpleNamespace

    from compress_exporters.build import fused_refusal

    # Fixed cos/sin caches cannot follow the factor switch: the fused graph refuses it, auto takes torch.onnx.
    assert "longrope" in fused_refusal(SimpleNamespace(model_type="phi3", head_dim=16, rope_type="longrope"), "int4", "matmulnbits")
    result = export_onnx(folder, tmp_path / "onnx")  # dynamo (the legacy tracer cannot write longrope's factor switch)
    assert result.validation["passed"] and result.validation["max_rel_diff"] < 1e-5
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    lm = OnnxCausalLM.from_dir(result.artifact)
    for length in (8, 30):  # a prefill inside the original context, and one past it
        prompt = torch.randint(3, 300, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        ours = list(lm.greedy_tokens(prompt, 20))
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, length:].tolist()
        assert ours == ref, f"prompt of {length}: {ours} vs {ref}"


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_distill_and_prune_refuse_what_is_not_a_causal_lm_before_loading_it(tmp_path, tokenizer_dir, text_files, monkeypatch, kind):
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, T5Config, T5ForConditionalGeneration

    from compress import cli, models
    from compress.architectures import UnsupportedArchitectureError
    from compress.distill.loop import run_distill

    folder = tmp_path / kind
    if kind == "bert":
        BertLMHeadModel(BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, is_decoder=True)).save_pretrained(folder)
    else:
        T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights loaded before the architecture check"))
    match = "encoder stack" if kind == "bert" else "encoder-decoder"
    for student in ({"from_teacher": {"layers": 1}}, {"config": {"num_hidden_layers": 1}}):
        recipe = validate_recipe(dict(tiny_recipe(tmp_path, folder, text_files), student=student))
        with pytest.raises(UnsupportedArchitectureError, match=match):
            run_distill(recipe, progress=False)
    assert cli.main(["prune", str(folder), "--target-params", "0.5", "--output", str(tmp_path / "pruned")]) != 0
    assert not (tmp_path / "pruned").exists()
