"""`compress run`: the chain is checked before any compute; stages run in order, are skipped when up to date,
redone (with everything after them) when their inputs change, and an interrupted distillation resumes."""
from __future__ import annotations

import json

import pytest

from compress.cli import main
from compress.pipeline import RUN_FILE, RunPlanError, check_chain, run_recipe
from compress.recipe import validate_recipe
from conftest import save_tiny, tiny_recipe

BENCH = {"seq_len": 32, "max_eval_tokens": 128, "prompt_lengths": [16], "new_tokens": 3, "decode_prompt": 8, "batch_sizes": [1], "repeats": 1, "warmup": 1, "threads": 1}


def full_recipe(tmp_path, teacher, text_files, **sections) -> dict:
    data = tiny_recipe(tmp_path, teacher, text_files)
    data["quantize"] = {"method": "gptq", "bits": 4, "group_size": 32, "calib": {"samples": 8, "seq_len": 32}}
    data["export"] = {"weights": "int4"}  # auto: the fused graph for a Llama
    data["bench"] = dict(BENCH)
    data.update(sections)
    return data


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quantize": {"method": "bnb-nf4"}}, "bitsandbytes layers do not export"),
        ({"quantize": {"method": "gptq", "bits": 3}}, "quantize.bits 3 cannot be exported"),
        ({"export": {"weights": "int8", "exporter": "legacy"}}, "export.weights int8 does not match quantize.bits 4"),
        ({"quantize": {"method": "rtn", "bits": 4, "group_size": 24}}, "quantize.group_size 24 cannot be carried"),
        ({"student": {"config": {"vocab_size": 500}}}, "student.config.vocab_size"),
        ({"quantize": None, "export": {"weights": "fp16", "exporter": "fused"}}, "export.exporter fused: the fused graph exports fp32"),
    ],
)
def test_chain_conflicts_are_refused_before_compute(tmp_path, teachers, text_files, change, message):
    recipe = validate_recipe(full_recipe(tmp_path, teachers["llama"], text_files, **change))
    with pytest.raises(RunPlanError, match=message):
        run_recipe(recipe, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_multi_process_launch_is_refused(tmp_path, teachers, text_files, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunPlanError, match="single-process") as err:
        check_chain(validate_recipe(full_recipe(tmp_path, teachers["llama"], text_files)), source="recipes/mine.yaml")
    # The exact two commands, with this launch's process count and the recipe's path.
    assert "`accelerate launch --num_processes 2 -m compress.cli distill recipes/mine.yaml`" in str(err.value)
    assert "`compress run recipes/mine.yaml --resume`" in str(err.value)


def test_vocabulary_mismatch_and_existing_run_dir(tmp_path, teachers, text_files, tokenizer_dir):
    from transformers import AutoTokenizer

    other = save_tiny(tmp_path / "other", "llama", tokenizer_dir, layers=1)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<new>"])
    tok.save_pretrained(other)
    data = full_recipe(tmp_path, teachers["llama"], text_files, student={"model": str(other)})
    with pytest.raises(RunPlanError, match="different vocabularies"):
        check_chain(validate_recipe(data))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    with pytest.raises(RunPlanError, match="already exists; pass --resume"):
        check_chain(validate_recipe(full_recipe(tmp_path, teachers["llama"], text_files)))


def test_run_skip_and_redo(tmp_path, teachers, text_files, capsys):
    lines: list[str] = []
    recipe = validate_recipe(full_recipe(tmp_path, teachers["llama"], text_files))
    first = run_recipe(recipe, progress=False, log=lines.append)
    run = tmp_path / "run"
    assert [(o.stage, o.skipped) for o in first.outcomes] == [(s, False) for s in ("distill", "quantize", "export", "teacher-quantize", "teacher-export", "bench")]
    assert [o.artifact.name for o in first.outcomes] == ["student", "gptq-4bit", "onnx-int4", "teacher-gptq-4bit", "teacher-onnx-int4", "bench"]
    results = json.loads((run / "bench" / "results.json").read_text())
    assert [a["label"] for a in results["artifacts"]] == ["teacher", "student", "gptq-4bit", "onnx-int4", "teacher-onnx-int4"]
    assert [a["kind"] for a in results["artifacts"]] == ["float", "float", "gptq", "onnx", "onnx"]
    q = {a["label"]: a["quality"] for a in results["artifacts"]}
    assert q["teacher"]["kl_per_token"] == 0
    # the teacher's own int4 copy is quantized from the teacher, not from the student: it stays far closer to the teacher
    assert q["teacher-onnx-int4"]["kl_per_token"] < q["onnx-int4"]["kl_per_token"]
    assert json.loads((run / "teacher-gptq-4bit" / "compress.json").read_text())["inputs"][0]["source"] == str(teachers["llama"])
    # the int4 ONNX model carries the GPTQ weights: it matches the GPTQ model far better than the student matches the teacher
    assert abs(q["onnx-int4"]["ppl"] / q["gptq-4bit"]["ppl"] - 1) < 0.05
    assert "| `onnx-int4` | onnx |" in first.report
    state = json.loads((run / RUN_FILE).read_text())["stages"]
    assert {s: v["status"] for s, v in state.items()} == {s: "done" for s in ("distill", "quantize", "export", "teacher-quantize", "teacher-export")}

    lines.clear()
    again = run_recipe(recipe, resume=True, progress=False, log=lines.append)
    assert [o.skipped for o in again.outcomes] == [True] * 6
    assert sum("up to date" in line for line in lines) == 5

    # a changed quantize section redoes quantize and export, not distill; bench measures only the new artifacts
    changed = validate_recipe(full_recipe(tmp_path, teachers["llama"], text_files, quantize={"method": "gptq", "bits": 4, "group_size": 16, "calib": {"samples": 8, "seq_len": 32}}))
    student_sha = state["distill"]["sha256"]
    third = run_recipe(changed, resume=True, progress=False, log=lines.append)
    assert [(o.stage, o.skipped) for o in third.outcomes] == [("distill", True), ("quantize", False), ("export", False), ("teacher-quantize", False), ("teacher-export", False), ("bench", False)]
    assert json.loads((run / "gptq-4bit" / "config.json").read_text())["quantization_config"]["group_size"] == 16
    assert json.loads((run / RUN_FILE).read_text())["stages"]["distill"]["sha256"] == student_sha
    # `compress bench` finds the teacher through the lineage: onnx -> gptq -> student -> teacher
    from compress.bench.subjects import inspect_artifact, teacher_from_lineage

    assert teacher_from_lineage(inspect_artifact(str(run / "onnx-int4"))) == str(teachers["llama"].resolve())


def test_interrupted_distillation_resumes(tmp_path, teachers, text_files, monkeypatch, capsys):
    """A real distillation stopped by Ctrl-C right after its step-3 checkpoint: `run --resume` continues it from
    step 3 (not from 0), and its training log holds each step once."""
    import json

    import compress.distill.loop as loop

    data = full_recipe(tmp_path, teachers["llama"], text_files)  # 6 steps, a checkpoint every 3
    for key in ("quantize", "export", "bench"):
        data.pop(key)
    recipe = validate_recipe(data)
    real = loop.save_checkpoint

    def save_then_stop(root, step, *args, **kwargs):
        real(root, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, progress=False, log=lambda _: None)
    assert not (recipe.run_dir / "student").exists()
    monkeypatch.setattr(loop, "save_checkpoint", real)
    capsys.readouterr()
    result = run_recipe(recipe, resume=True, progress=False, log=lambda _: None)
    assert "resuming from step 3" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (recipe.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (result.outcomes[0].artifact / "compress.json").is_file()


def test_cli_run_dry_run_and_errors(tmp_path, teachers, text_files, capsys):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(full_recipe(tmp_path, teachers["llama"], text_files)))
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# stages: distill ->" in out and "onnx-int4" in out
    assert main(["run", str(path), "--set", "quantize.bits=3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "quantize.bits 3 cannot be exported" in err


def test_stage_folders_compress_did_not_write_are_refused_before_compute(tmp_path, teachers, text_files):
    recipe = validate_recipe(full_recipe(tmp_path, teachers["llama"], text_files))
    mine = tmp_path / "run" / "gptq-4bit"
    mine.mkdir(parents=True)
    (mine / "notes.md").write_text("mine")
    for flags in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(RunPlanError, match="not a compress artifact .*--overwrite-any") as err:
            run_recipe(recipe, progress=False, log=lambda _: None, **flags)
        assert str(mine) in str(err.value)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["gptq-4bit"]
    assert (mine / "notes.md").read_text() == "mine"
    check_chain(recipe, overwrite=True, overwrite_any=True)  # the explicit flag lets it be replaced


def test_run_folder_inside_the_teacher_is_refused(tmp_path, teachers, text_files, capsys):
    import shutil

    import yaml

    teacher = shutil.copytree(teachers["llama"], tmp_path / "teacher")
    data = full_recipe(tmp_path, teacher, text_files)
    data["output_dir"] = str(teacher / "runs" / "x")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    for extra in (["--dry-run"], ["--overwrite-any", "--no-progress"]):
        assert main(["run", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert f"the output {teacher / 'runs' / 'x'} lies inside the input {teacher}" in err and "Traceback" not in err
    assert not (teacher / "runs").exists()
