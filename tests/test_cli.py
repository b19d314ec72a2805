import json
import subprocess
import sys

from conftest import tiny_recipe

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
