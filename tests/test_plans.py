"""Memory plans from configs alone: exact parameter counts of real model sizes, the block plan the quantize stage
itself computes, and refusals that name what to change."""
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from compress import plans
from compress.architectures import student_from_teacher
from compress.cli import main
from compress.models import load_config
from compress.quantize.stage import run_quantize
from compress.recipe import validate_recipe

# Llama-3.1-8B's published config (meta-llama/Llama-3.1-8B config.json); its model card gives 8.03 B parameters.
LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001,
)


def _recipe(model, text_files, tmp_path, **sections):
    data = {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 256, "cache_dir": str(tmp_path / "cache")}
    base = {"output_dir": str(tmp_path / "run"), "teacher": {"model": str(model)}, "student": {"from_teacher": {"layers": 2}}, "data": data,
            "distill": {"steps": 2, "warmup_steps": 0, "batch_size": 2, "device": "cpu"}}
    base.update(sections)
    return validate_recipe(base)


def test_8b_teacher_and_minitron_width_student_are_counted_exactly(tmp_path, text_files):
    folder = tmp_path / "llama-3.1-8b"
    LlamaConfig(**LLAMA_31_8B).save_pretrained(folder)
    recipe = _recipe(folder, text_files, tmp_path, teacher={"model": str(folder), "dtype": "bfloat16"},
                     student={"prune": {"shape": {"hidden_size": 3072, "intermediate_size": 9216}}},
                     distill={"steps": 2, "warmup_steps": 0, "batch_size": 2, "device": "cuda", "precision": "bf16", "loss": {"chunk_size": 2048}},
                     data={"train": str(text_files["train"]), "seq_len": 2048})
    plan = plans.distill_plan(recipe, processes=1)
    parts = dict(plan.parts)
    assert parts["teacher weights"] == 8_030_261_248 * 2
    # Llama-3.1-Minitron-4B-Width: embedding and head 2 x 128256 x 3072, 32 blocks of 116,398,080, the final norm
    student = 2 * 128256 * 3072 + 32 * (2 * 3072 * 4096 + 2 * 3072 * 1024 + 3 * 3072 * 9216 + 2 * 3072) + 3072
    assert student == 4_512_746_496
    assert parts["student weights (fp32)"] == 4 * student and parts["AdamW states"] == 8 * student
    assert parts["activations"] == 2 * 2048 * 32 * (10 * 3072 + 4 * 9216) * 2
    assert parts["loss chunk"] == 4 * 2048 * 128256 * 4
    # DDP holds everything again on every process, plus its gradient buckets; only the micro-batch shrinks.
    two = dict(plans.distill_plan(recipe, processes=2).parts)
    assert two["DDP buckets"] == 4 * student and two["activations"] == parts["activations"] // 2
    # FSDP2 over 8 processes: 1/8 of the student's training state and of the teacher's embedding and blocks each;
    # whole, the teacher's (untied) head, two teacher blocks gathered, and the student's root group (embedding, head,
    # norm) and two blocks gathered with their gradients.
    fsdp = validate_recipe({**recipe.model_dump(mode="json"), "distill": {**recipe.distill.model_dump(mode="json"), "parallel": "fsdp", "batch_size": 16}})
    eight = dict(plans.distill_plan(fsdp, processes=8).parts)
    head, t_block = 128256 * 4096, 218_112_000  # Llama-3.1-8B: q, o 4096^2; k, v 4096 x 1024; 3 x 4096 x 14336; 2 norms
    assert 2 * head + 32 * t_block + 4096 == 8_030_261_248
    assert eight["teacher weights (1/N)"] == (8_030_261_248 - head) * 2 // 8 and eight["teacher head (whole)"] == head * 2
    assert eight["teacher blocks gathered"] == 2 * t_block * 2
    assert eight["student weights (fp32, 1/N)"] == 4 * student // 8 and eight["AdamW states (1/N)"] == 8 * student // 8
    assert eight["student gathered (root + 2 blocks, with gradients)"] == 8 * (2 * 128256 * 3072 + 3072 + 2 * 116_398_080)
    assert "DDP buckets" not in eight and eight["activations"] == parts["activations"]  # 16 sequences: 2 per process, as in one
    # With the teacher's outputs cached, the teacher is not in memory while the student trains.
    cached = validate_recipe({**recipe.model_dump(mode="json"), "teacher": {"model": str(folder), "dtype": "bfloat16", "logits_cache": {"enabled": True}}})
    assert dict(plans.distill_plan(cached, processes=1).parts)["teacher weights"] == 0


def test_a_student_of_teacher_layers_is_counted_as_built(tmp_path, teachers, text_files):
    recipe = _recipe(teachers["llama"], text_files, tmp_path, student={"from_teacher": {"layers": 3}})
    counted = plans.student_shape(recipe, load_config(str(teachers["llama"])))
    built, _ = student_from_teacher(AutoModelForCausalLM.from_pretrained(teachers["llama"]), 3)
    assert counted.parameters == sum(p.numel() for p in built.parameters())
    assert counted.config.num_hidden_layers == 3


def test_quantize_plan_from_the_config_is_the_plan_the_stage_computes(tmp_path, wide_llama, text_files):
    q = {"method": "gptq", "bits": 4, "group_size": 32, "load": "blocks", "device": "cpu", "calib": {"source": str(text_files["train"]), "samples": 8, "seq_len": 32}}
    recipe = _recipe(wide_llama, text_files, tmp_path, quantize=q)
    result = run_quantize(recipe, str(wide_llama), tmp_path / "q", progress=False)
    recorded = json.loads((result.artifact / "compress.json").read_text())["memory_plan"]
    plan = plans.quantize_plan(recipe, load_config(str(wide_llama)))
    parts = dict(plan.parts)
    assert (parts["float block"], parts["forward copy"], parts["Hessians"], parts["GPTQ"], parts["activations"]) == (
        recorded["block"], recorded["runner"], recorded["hessians"], recorded["gptq"], recorded["activations"])
    assert plan.peak == recorded["peak"]


def test_a_plan_that_does_not_fit_is_refused_with_what_to_change(tmp_path, teachers, text_files):
    plan = plans.distill_plan(_recipe(teachers["llama"], text_files, tmp_path), processes=1)
    plans.check_plans([dataclasses.replace(plan, available=plan.peak)])
    with pytest.raises(plans.PlanError, match=r"does not fit; change one of: lower distill.batch_size.*teacher.logits_cache.enabled: true"):
        plans.check_plans([dataclasses.replace(plan, available=plan.peak - 1)])
    plans.check_plans([dataclasses.replace(plan, available=None)])  # a device not visible here is not judged
    # Several DDP processes: sharding is what to change; sharded already: more processes.
    ddp = plans.distill_plan(_recipe(teachers["llama"], text_files, tmp_path, distill={"steps": 2, "warmup_steps": 0, "batch_size": 2, "device": "cpu"}), processes=2)
    with pytest.raises(plans.PlanError, match=r"distill.parallel: fsdp \(splits the student's weights, gradients and AdamW states and a live teacher over the 2 processes\)"):
        plans.check_plans([dataclasses.replace(ddp, available=1)])
    fsdp = plans.distill_plan(_recipe(teachers["llama"], text_files, tmp_path, distill={"steps": 2, "warmup_steps": 0, "batch_size": 2, "device": "cpu", "parallel": "fsdp"}), processes=2)
    assert fsdp.peak < ddp.peak
    with pytest.raises(plans.PlanError, match=r"more processes \(each holds 1/N"):
        plans.check_plans([dataclasses.replace(fsdp, available=1)])


def test_plan_command_prints_every_stage_and_refuses_what_cannot_fit(tmp_path, teachers, text_files, capsys):
    q = {"method": "gptq", "bits": 4, "device": "cpu", "calib": {"samples": 8, "seq_len": 32}}
    recipe = tmp_path / "r.yaml"
    import yaml

    data = {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 256}
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "teacher": {"model": str(teachers["llama"])}, "student": {"from_teacher": {"layers": 2}},
                                      "data": data, "distill": {"batch_size": 2, "device": "cpu"}, "quantize": q}))
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "distill (cpu)" in out and "quantize (cpu)" in out and "free" in out
    # 2^20 sequences of 32 tokens per micro-batch: terabytes of activations, more than this machine has free
    assert main(["plan", str(recipe), "--set", "distill.batch_size=1048576"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "distill.batch_size" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: distill refuses a plan that does not fit its free GPU memory")
def test_distill_refuses_a_plan_larger_than_the_gpu(tmp_path, teachers, text_files):
    from compress.distill.loop import run_distill

    recipe = _recipe(teachers["llama"], text_files, tmp_path, distill={"steps": 2, "warmup_steps": 0, "batch_size": 1 << 24, "device": "cuda"})
    with pytest.raises(plans.PlanError, match="does not fit"):
        run_distill(recipe, progress=False)


def test_distill_dry_run_still_validates_a_recipe_whose_teacher_is_not_reachable(tmp_path, text_files, capsys, monkeypatch):
    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"teacher": {"model": "no-such-org/no-such-model"}, "data": {"train": str(text_files["train"]), "seq_len": 32}, "distill": {"steps": 2, "warmup_steps": 0}}))
    assert main(["distill", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# memory plan not computed: " in out and "no-such-org/no-such-model" in out
    yaml.safe_load(out)  # still the resolved recipe, comments and all
    assert main(["plan", str(recipe)]) == 2  # the plan command itself needs the config
