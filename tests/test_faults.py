"""Faults a user meets (issue 13): a distillation killed mid-checkpoint, Ctrl-C messages, an ONNX folder ONNX Runtime
refuses, non-finite bench results, calibration flags given to a method that needs none. Each names what went wrong
and what to do, without a traceback, and leaves nothing half-written behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import dead_pid, save_tiny, staging_name, tiny_recipe

from compress.cli import main

# --- 1. a distillation killed while writing a checkpoint --------------------------------------------------------


def _log_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _log_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())}


def _write_recipe(tmp_path: Path, teacher: Path, text_files, **distill) -> Path:
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, teacher, text_files, **distill)))
    return recipe


# Runs `compress distill` in this process's interpreter, with rng.safetensors' writer (the third file of a
# checkpoint) replaced by one that announces the checkpoint's staging folder and then hangs: the parent kills
# the process there with SIGKILL, mid-checkpoint, every time.
_HANG_IN_CHECKPOINT = """
import sys, time
from pathlib import Path
import compress.distill.checkpoint as checkpoint
from compress.cli import main

hang_at, marker = sys.argv[1], Path(sys.argv[2])
real = checkpoint.save_file

def save_file(tensors, filename, *args, **kwargs):
    if Path(filename).parent.name.startswith("." + hang_at + ".tmp-"):
        marker.write_text(str(Path(filename).parent))
        time.sleep(600)
    return real(tensors, filename, *args, **kwargs)

checkpoint.save_file = save_file
sys.exit(main(sys.argv[3:]))
"""


def test_sigkill_mid_checkpoint_then_resume_continues_from_the_last_complete_one(tmp_path, teachers, text_files, capsys):
    recipe = _write_recipe(tmp_path, teachers["llama"], text_files, steps=9, save_every=3, eval_every=100, keep_last=3)
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    marker = tmp_path / "hanging"
    script = tmp_path / "hang.py"
    script.write_text(_HANG_IN_CHECKPOINT)
    proc = subprocess.Popen([sys.executable, str(script), "step-00000006", str(marker), "distill", str(recipe), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the run never reached the checkpoint of step 6"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    staged = Path(marker.read_text())
    assert staged.is_dir() and (staged / "model.safetensors").is_file()  # what the kill left: a partial staging folder
    assert str(proc.pid) in staged.name
    assert _log_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # and log lines past the last checkpoint (step 3)

    assert main(["distill", str(recipe), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from step 3: {ckpts / 'step-00000003'}" in out
    assert _log_steps(run_dir) == list(range(1, 10))  # once each, strictly increasing: no duplicates of 4..6
    assert not staged.exists()  # the dead run's staging folder is gone
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003", "step-00000006"]

    straight = _write_recipe(tmp_path / "straight", teachers["llama"], text_files, steps=9, save_every=3, eval_every=100, keep_last=3)
    assert main(["distill", str(straight), "--no-progress"]) == 0
    want, got = _log_losses(tmp_path / "straight" / "run"), _log_losses(run_dir)
    assert got.keys() == want.keys() and all(got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-7) for s in want)


def test_resume_skips_an_incomplete_checkpoint_and_clears_what_a_kill_left(tmp_path, teachers, text_files, capsys):
    recipe = _write_recipe(tmp_path, teachers["llama"], text_files, steps=8, save_every=2, eval_every=100, keep_last=3)
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert main(["distill", str(recipe), "--no-progress"]) == 0
    shutil.rmtree(run_dir / "student")  # as if it had been killed after step 7
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    (run_dir / "train_log.jsonl").write_text("\n".join(lines[:7]) + "\n" + lines[7][:20])  # and mid-way through step 8's line
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]
    (ckpts / "step-00000006" / "optimizer.pt").unlink()  # a checkpoint folder missing a file
    weights = (ckpts / "step-00000004" / "model.safetensors").read_bytes()
    (ckpts / "step-00000004" / "model.safetensors").write_bytes(weights[:-100])  # and one whose weights a disk cut short
    live = ckpts / staging_name(ckpts / "step-00000008")  # another process's checkpoint being written: not ours to remove
    dead = ckpts / live.name.replace(f"-{os.getpid()}@", f"-{dead_pid()}@")
    for folder in (live, dead):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")

    assert main(["distill", str(recipe), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from step 2: {ckpts / 'step-00000002'}" in out
    assert f"removed the incomplete checkpoint {ckpts / 'step-00000006'} (missing optimizer.pt)" in out  # says why the newer ones were not used
    assert f"cannot read the checkpoint {ckpts / 'step-00000004'} (" in out
    assert _log_steps(run_dir) == list(range(1, 9))
    assert not dead.exists() and live.is_dir()
    assert (ckpts / "step-00000006" / "optimizer.pt").is_file()  # written again, complete
    assert (run_dir / "student" / "compress.json").is_file()


def test_resume_without_a_complete_checkpoint_says_it_starts_over(tmp_path, teachers, text_files, capsys):
    recipe = _write_recipe(tmp_path, teachers["llama"], text_files, steps=4, save_every=2, eval_every=100)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir()
    (ckpts / "step-00000002").mkdir()  # killed before its state.json: never complete
    (ckpts / "step-00000002" / "model.safetensors").write_bytes(b"half")
    assert main(["distill", str(recipe), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"no complete checkpoint in {ckpts}" in out and "step 0" in out
    assert _log_steps(run_dir) == [1, 2, 3, 4]


# --- 2. Ctrl-C in a command that has no --resume ----------------------------------------------------------------


def _tiny_model(directory: Path, tokenizer_dir: Path) -> Path:
    return save_tiny(directory, "llama", tokenizer_dir, layers=1)


def test_ctrl_c_in_quantize_and_export_names_what_continues_and_leaves_nothing_else(tmp_path, tokenizer_dir, text_files, capsys, monkeypatch):
    """A real Ctrl-C inside the stage (while its staging folder exists), not just in the command function."""
    import compress.artifacts as artifacts

    model = _tiny_model(tmp_path / "m", tokenizer_dir)
    real = artifacts.write_json_atomic

    def interrupted(path, data):  # the record is the last file written into the staging folder
        if path.name == artifacts.RECORD_FILE and ".tmp-" in path.parent.name:
            raise KeyboardInterrupt
        return real(path, data)

    import compress.quantize.stage as quantize_stage

    monkeypatch.setattr(artifacts, "write_json_atomic", interrupted)  # export imports it when it runs
    monkeypatch.setattr(quantize_stage, "write_json_atomic", interrupted)
    data = ["--set", f"data.eval={text_files['eval']}", "--set", "data.seq_len=32", "--set", "data.max_eval_tokens=128", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    commands = {
        "quantize": ["quantize", str(model), "--method", "rtn", "--bits", "8", "--group-size", "32", "--output", str(tmp_path / "q"), "--no-progress", *data],
        "export": ["export", str(model), "--output", str(tmp_path / "onnx"), "--exporter", "legacy"],
    }
    for name, argv in commands.items():
        assert main(argv) == 130
        err = capsys.readouterr().err
        if name == "quantize":  # block at a time: the finished blocks wait for --resume
            assert "compress quantize: interrupted; the output appears only when complete; rerun with --resume to continue from the last finished block" in err
        else:
            assert f"compress {name}: interrupted; nothing was written" in err and "rerun the same command" in err and "--resume" not in err
        assert "Traceback" not in err
        assert not (tmp_path / argv[argv.index("--output") + 1]).exists()
    # no staging folder left, only quantize's progress folder, which --resume finishes from
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.blocks", "cache", "m"]
    argv = commands["quantize"]
    monkeypatch.setattr(quantize_stage, "write_json_atomic", real)
    assert main([*argv, "--resume"]) == 0
    assert "resuming block-at-a-time quantization at block 1" in capsys.readouterr().out  # its one block was done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m", "q"]


# --- 5. calibration flags with a method that needs none ---------------------------------------------------------


@pytest.mark.parametrize("method,flags,named", [
    ("rtn", ["--samples", "4"], "--samples"),
    ("rtn", ["--calib", "some.txt"], "--calib"),
    ("rtn", ["--act-order"], "--act-order"),
    ("bnb-nf4", ["--samples", "4"], "--samples"),
    ("bnb-int8", ["--bits", "4"], "--bits"),
    ("bnb-fp4", ["--group-size", "64"], "--group-size"),
])
def test_a_flag_the_method_does_not_take_is_named_before_anything_loads(tmp_path, capsys, monkeypatch, method, flags, named):
    import compress.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before the flags were checked"))
    monkeypatch.setattr(models, "local_path", lambda *a, **k: pytest.fail("model looked up before the flags were checked"))
    assert main(["quantize", "MODEL", "--method", method, *flags, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"compress quantize: error: {named} does not apply to --method {method}" in err and "Traceback" not in err
    assert "unknown key" not in err and "<defaults>" not in err
    if named in ("--samples", "--calib"):
        assert "needs no calibration" in err
    assert not (tmp_path / "x").exists()


def test_the_recipes_method_decides_which_flags_apply(tmp_path, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"quantize": {"method": "rtn", "bits": 4}}))
    assert main(["quantize", "MODEL", "--recipe", str(recipe), "--samples", "4", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--samples does not apply to --method rtn: it needs no calibration samples" in err and "Traceback" not in err
    # --set picks the method last: gptq takes --samples (the run then fails later, on the missing model, by name)
    assert main(["quantize", str(tmp_path / "no-model"), "--recipe", str(recipe), "--set", "quantize.method=gptq", "--samples", "4", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not apply" not in err and "no-model" in err


# --- 3. an ONNX folder ONNX Runtime refuses ---------------------------------------------------------------------

BENCH_SETS = ["--set", "bench.seq_len=32", "--set", "bench.max_eval_tokens=128", "--set", "bench.prompt_lengths=[8]", "--set", "bench.new_tokens=2",
              "--set", "bench.decode_prompt=8", "--set", "bench.batch_sizes=[1]", "--set", "bench.repeats=1", "--set", "bench.threads=1", "--no-progress"]


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, tokenizer_dir):
    from compress_exporters.onnx import export_onnx

    root = tmp_path_factory.mktemp("faults-onnx")
    model = save_tiny(root / "float", "llama", tokenizer_dir, layers=1)
    return {"float": model, "onnx": export_onnx(model, root / "onnx", exporter="legacy").artifact}


def _damaged(onnx_dir: Path, where: Path, how: str) -> Path:
    broken = shutil.copytree(onnx_dir, where)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(b"these are not the bytes of a model" if how == "garbage" else data[: len(data) // 2])
    return broken


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_runtime_names_the_file_onnx_runtime_refuses(tmp_path, onnx_export, how):
    from compress_exporters.runtime import OnnxCausalLM, RuntimeLoadError

    broken = _damaged(onnx_export["onnx"], tmp_path / "broken", how)
    with pytest.raises(RuntimeLoadError) as caught:
        OnnxCausalLM.from_dir(broken)
    message = str(caught.value)
    assert str(broken / "model.onnx") in message and "Protobuf parsing failed" in message
    assert "[ONNXRuntimeError]" not in message and "\n" not in message and "compress export" in message


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("quality", [True, False])
def test_bench_on_a_damaged_onnx_folder_exits_non_zero_and_writes_nothing(tmp_path, onnx_export, text_files, capsys, quality):
    broken = _damaged(onnx_export["onnx"], tmp_path / "broken", "truncated")
    argv = ["bench", str(onnx_export["float"]), str(broken), "--data", str(text_files["eval"]), *BENCH_SETS, "--set", f"bench.quality={json.dumps(quality)}", "--set", "bench.plots=false"]
    assert main([*argv, "--output", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert f"compress bench: error: ONNX Runtime cannot load {broken / 'model.onnx'}: INVALID_PROTOBUF" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # no empty report folder

    old = tmp_path / "old"  # an earlier report: left as it was
    old.mkdir()
    (old / "results.json").write_text('{"format_version": 1}\n')
    (old / ".measurements.json").write_text("{}\n")
    before = _snapshot(old)
    assert main([*argv, "--output", str(old)]) == 2
    assert "ONNX Runtime cannot load" in capsys.readouterr().err
    assert _snapshot(old) == before


def test_bench_names_a_damaged_safetensors_file_before_writing(tmp_path, onnx_export, text_files, capsys):
    broken = shutil.copytree(onnx_export["float"], tmp_path / "cut")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 1000])
    assert main(["bench", str(broken), "--data", str(text_files["eval"]), *BENCH_SETS, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{broken / 'model.safetensors'} is unreadable: the safetensors file is truncated or corrupt" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# --- 4. non-finite bench results --------------------------------------------------------------------------------


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_results_are_valid_json_flagged_and_fail_the_command(tmp_path, tokenizer_dir, text_files, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    good = save_tiny(tmp_path / "good", "llama", tokenizer_dir, layers=1, train_steps=5)
    nan = shutil.copytree(good, tmp_path / "nan")
    weights = load_file(nan / "model.safetensors")
    # finite weights (a NaN weight is refused at load, by name) whose logits overflow: the results are non-finite
    weights["model.norm.weight"][:] = 3e38
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "bench"
    argv = ["bench", str(good), str(nan), "--teacher", str(good), "--data", str(text_files["eval"]), *BENCH_SETS, "--set", "bench.speed=false", "--output", str(out)]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "Traceback" not in captured.err
    assert "warning: nan: non-finite quality.ppl" in captured.out  # said as it is found
    assert "compress bench: error: non-finite results for nan (quality.ppl, " in captured.err and str(out / "results.json") in captured.err

    results = _strict_json((out / "results.json").read_text())
    _strict_json((out / ".measurements.json").read_text())
    rows = {a["label"]: a for a in results["artifacts"]}
    assert rows["nan"]["quality"]["ppl"] is None and rows["nan"]["quality"]["kl_per_token"] is None
    assert {"quality.ppl", "quality.nll_per_token", "quality.kl_per_token"} <= set(rows["nan"]["non_finite"])
    assert rows["good"]["non_finite"] == [] and rows["good"]["quality"]["ppl"] > 1
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| artifact |")).split("|")
    assert "| `nan` (non-finite) |" in report and "non-finite" in report.split("| `nan`")[1].splitlines()[0].split("|")[header.index(" ppl ") - 1]
    assert "Non-finite" in report

    # rerun: the stored measurement is reused, still flagged, still an error
    assert main(argv) == 3
    assert "non-finite results for nan" in capsys.readouterr().err


def test_a_speed_child_that_meets_a_damaged_artifact_reports_one_line(tmp_path, onnx_export):
    from compress.bench.speed import SpeedMeasurementError, measure_in_subprocess
    from compress.bench.subjects import inspect_artifact

    info = inspect_artifact(str(onnx_export["onnx"]), "onnx")
    _damaged(onnx_export["onnx"], tmp_path / "broken", "garbage")
    info = type(info)(**{**info.__dict__, "path": tmp_path / "broken"})  # damaged after the check before measuring
    prompts = {"prefill": {8: list(range(8))}, "decode": [list(range(8))]}
    spec = {"warmup": 0, "repeats": 1, "new_tokens": 2, "batch_sizes": [1], "threads": 1}
    with pytest.raises(SpeedMeasurementError) as caught:
        measure_in_subprocess(info, prompts, spec, "cpu")
    message = str(caught.value)
    assert message.startswith("speed measurement of onnx") and f"ONNX Runtime cannot load {tmp_path / 'broken' / 'model.onnx'}" in message
    assert "Traceback" not in message and "\n" not in message


def test_compress_run_fails_when_its_bench_has_non_finite_results(tmp_path, capsys, monkeypatch):
    import compress.pipeline as pipeline

    bench = tmp_path / "run" / "bench"
    bench.mkdir(parents=True)
    (bench / "results.json").write_text(json.dumps({"artifacts": [{"label": "student", "non_finite": []}, {"label": "gptq-4bit", "non_finite": ["quality.ppl"]}]}))
    done = pipeline.RunResult(run_dir=tmp_path / "run", outcomes=[pipeline.StageOutcome("bench", bench, skipped=False, seconds=1.0)], report="| table |")
    monkeypatch.setattr(pipeline, "run_recipe", lambda *a, **k: done)
    assert main(["run", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "compress run: error: non-finite results for gptq-4bit (quality.ppl)" in err and str(bench / "results.json") in err
    (bench / "results.json").write_text(json.dumps({"artifacts": [{"label": "student", "non_finite": []}]}))
    assert main(["run", "--no-progress"]) == 0


@pytest.mark.parametrize("name", ["genai_config.json", "config.json", "generation_config.json"])
@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_damaged_json_file_of_an_onnx_folder_is_named(tmp_path, onnx_export, name, how, capsys):
    """Found by benchmarks/fuzz.py: a damaged genai_config.json reached bench as a UnicodeDecodeError/JSONDecodeError traceback."""
    broken = shutil.copytree(onnx_export["onnx"], tmp_path / "broken")
    path = broken / name
    data = bytearray(path.read_bytes())
    if how == "flipped":
        data[len(data) // 3] = 0x8B  # not UTF-8
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    out = tmp_path / "bench"
    code = main(["bench", str(broken), "--output", str(out), *BENCH_SETS])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{path} is not readable JSON" in err and not out.exists()


def test_resume_on_a_finished_distillation_says_so_and_keeps_the_student(tmp_path, teachers, text_files, capsys):
    """Found by benchmarks/fuzz.py: `distill --resume` after the run had finished answered 'already exists; pass --overwrite'."""
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, teachers["llama"], text_files, steps=2, eval_every=2, save_every=2)))
    assert main(["distill", str(recipe), "--no-progress"]) == 0
    student = tmp_path / "run" / "student" / "model.safetensors"
    before = student.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["distill", str(recipe), "--no-progress", "--resume"]) == 0
    assert "is already complete (2 steps of this recipe); nothing to resume" in capsys.readouterr().out
    assert student.stat().st_mtime_ns == before
    # another recipe in the same folder is not "finished": the usual refusal stands
    other = yaml.safe_load(recipe.read_text())
    other["distill"]["lr"] = 1e-4
    recipe.write_text(yaml.safe_dump(other))
    assert main(["distill", str(recipe), "--no-progress", "--resume"]) == 2
