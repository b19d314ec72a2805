import json
import os
import subprocess
import sys

import pytest
from conftest import dead_pid, staging_name, tiny_recipe

from compress.cli import main


def test_help_documents_every_key(capsys):
    try:
        main(["distill", "--help"])
    except SystemExit as exit:
        assert exit.code == 0
    out = capsys.readouterr().out
    for key in ("distill.loss.kind", "distill.steps (int, default 300)", "data.seq_len", "student.from_teacher.layers", "teacher.trust_remote_code"):
        assert key in out


def test_malformed_recipe_exits_2_naming_file_and_key(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("distill:\n  steps: many\n  colour: red\n")
    assert main(["distill", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: distill.steps: Input should be a valid integer" in err
    assert f"{recipe}: distill.colour: unknown key" in err
    assert "Traceback" not in err


def test_dry_run_prints_resolved_recipe(capsys):
    assert main(["distill", "--dry-run", "--set", "distill.steps=70"]) == 0
    assert "steps: 70" in capsys.readouterr().out


def test_console_script_runs_a_tiny_distillation(tmp_path, teachers, text_files):
    import yaml

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, teachers["gpt2"], text_files)))
    cmd = [sys.executable, "-m", "compress.cli", "distill", str(recipe), "--set", "distill.steps=3", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eval ppl" in proc.stdout
    record = json.loads((tmp_path / "run" / "student" / "compress.json").read_text())
    assert record["recipe"]["distill"]["steps"] == 3
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr


def test_quantize_command(tmp_path, teachers, text_files, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(teachers["llama"]), "--method", "rtn", "--bits", "8", "--group-size", "32", "--output", str(out), "--no-progress",
            "--set", f"data.eval={text_files['eval']}", "--set", "data.seq_len=32", "--set", "data.max_eval_tokens=256", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 0
    assert "rtn: eval ppl" in capsys.readouterr().out
    record = json.loads((out / "compress.json").read_text())
    assert record["metrics"]["method"] == "rtn" and record["recipe"]["quantize"]["bits"] == 8
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "no" / "such" / "model"), "--method", "rtn", "--output", str(tmp_path / "x")]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert main(["quantize", str(teachers["llama"]), "--output", str(tmp_path / "y")]) == 2
    assert "no quantize section" in capsys.readouterr().err


def test_export_command_is_wired(tmp_path, capsys):
    try:
        main(["export", "--help"])
    except SystemExit as exit:
        assert exit.code == 0
    assert "--weights {fp32,fp16,int8,int4}" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "no" / "such" / "model"), "--output", str(tmp_path / "onnx")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


def _tiny_model(root, tokenizer_dir):
    from conftest import save_tiny

    return save_tiny(root, "llama", tokenizer_dir, layers=1)


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_overwrite_never_deletes_foreign_folders_or_the_input(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import compress_exporters.build as build

    monkeypatch.setattr(build, "load_reference", lambda *a, **k: pytest.fail("model loaded before the output check"))
    model = _tiny_model(tmp_path / "art" / "m", tokenizer_dir)
    before = _files(tmp_path / "art")
    mine = tmp_path / "some" / "folder"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    assert main(["export", str(model), "--output", str(mine), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"compress export: error: {mine} exists and is not a compress artifact" in err and "--overwrite-any" in err and "Traceback" not in err
    assert (mine / "thesis.tex").read_text() == "years of work"
    for output, message in ((model, "is the input"), (model / "onnx", "lies inside the input"), (tmp_path / "art", "contains the input")):
        assert main(["export", str(model), "--output", str(output), "--overwrite-any"]) == 2
        err = capsys.readouterr().err
        assert f"the output {output} {message} {model}" in err and "Traceback" not in err
    assert _files(tmp_path / "art") == before


def test_quantize_bad_output_fails_before_the_model_loads(tmp_path, tokenizer_dir, capsys, monkeypatch):
    from collections import namedtuple

    import compress.artifacts as artifacts
    import compress.models as models

    model = _tiny_model(tmp_path / "m", tokenizer_dir)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before the output check"))
    (tmp_path / "file").write_text("x")
    base = ["quantize", str(model), "--method", "rtn", "--bits", "8", "--no-progress"]
    assert main(base + ["--output", str(tmp_path / "file" / "q")]) == 2
    err = capsys.readouterr().err
    assert f"compress quantize: error: the output {tmp_path / 'file' / 'q'} lies under the file {tmp_path / 'file'}" in err and "Traceback" not in err

    real_access = artifacts.os.access
    monkeypatch.setattr(artifacts.os, "access", lambda p, mode: str(p) != str(tmp_path / "locked") and real_access(p, mode))
    (tmp_path / "locked").mkdir()
    assert main(base + ["--output", str(tmp_path / "locked" / "q")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'locked'} is not writable" in err and "Traceback" not in err

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 1000, 1000))
    needed = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    assert main(base + ["--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert f"not enough free disk for the output {tmp_path / 'q'}: it needs about {needed:,} bytes" in err and "has 1,000 free" in err


def test_bad_output_is_refused_before_a_builtin_model_is_converted(tmp_path, capsys, monkeypatch):
    import compress.models as models

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "builtin_model_dir", lambda name: pytest.fail("builtin model converted before the output check"))
    (tmp_path / "file").write_text("x")
    for argv in (["quantize", "builtin:smollm2-135m", "--method", "rtn"], ["export", "builtin:smollm2-135m"]):
        assert main([*argv, "--output", str(tmp_path / "file" / "out")]) == 2
        err = capsys.readouterr().err
        assert f"lies under the file {tmp_path / 'file'}" in err and "Traceback" not in err


def test_quantize_clears_a_dead_runs_staging_folder(tmp_path, tokenizer_dir, text_files, capsys):
    model = _tiny_model(tmp_path / "m", tokenizer_dir)
    out = tmp_path / "q"
    live = tmp_path / staging_name(out)  # as if another run into the same folder were under way
    stale = tmp_path / live.name.replace(f"-{os.getpid()}@", f"-{dead_pid()}@")
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_text("half-written by a killed run")
    argv = ["quantize", str(model), "--method", "rtn", "--bits", "8", "--group-size", "32", "--output", str(out), "--no-progress",
            "--set", f"data.eval={text_files['eval']}", "--set", "data.seq_len=32", "--set", "data.max_eval_tokens=128", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "compress.json").is_file()
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")) == [live.name]


def test_empty_recipe_file_is_an_error(tmp_path, capsys):
    for text in ("", "# nothing here yet\n\n"):
        recipe = tmp_path / "empty.yaml"
        recipe.write_text(text)
        for command in ("distill", "run"):
            assert main([command, str(recipe), "--dry-run"]) == 2
            err = capsys.readouterr().err
            assert f"compress {command}: error: recipe file is empty: {recipe}" in err and "Traceback" not in err


def test_distill_refuses_a_run_folder_inside_the_teacher(tmp_path, teachers, text_files, capsys):
    import shutil

    import yaml

    teacher = shutil.copytree(teachers["gpt2"], tmp_path / "teacher")
    before = _files(teacher)
    data = tiny_recipe(tmp_path, teacher, text_files, steps=2, eval_every=2, save_every=2)
    data["output_dir"] = str(teacher / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["distill", str(recipe), "--no-progress", "--overwrite-any"]) == 2
    err = capsys.readouterr().err
    assert f"the output {teacher / 'run'} lies inside the input {teacher}" in err and "Traceback" not in err
    assert _files(teacher) == before


@pytest.mark.parametrize("command,expected", [(["quantize", "m", "--output", "o"], "rerun with --resume to continue from the last finished block"), (["distill"], "--resume"), (["export", "m", "--output", "o"], "rerun the same command")])
def test_ctrl_c_says_what_actually_continues(monkeypatch, capsys, command, expected):
    from compress import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command[0], interrupted)
    assert cli.main(command) == 130
    err = capsys.readouterr().err
    assert expected in err
    if command[0] == "export":
        assert "--resume" not in err  # export has no --resume
