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
    live = ckpts / staging_name(ckpts / "step-00000008")  # another process's checkpoint being written: not ours to remove
    dead = ckpts / live.name.replace(f"-{os.getpid()}@", f"-{dead_pid()}@")
    for folder in (live, dead):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")

    assert main(["distill", str(recipe), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from step 4: {ckpts / 'step-00000004'}" in out
    assert "step-00000006" in out and "optimizer.pt" in out  # says why the newer one was not used
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


def test_ctrl_c_in_quantize_and_export_names_what_continues_and_leaves_nothing(tmp_path, tokenizer_dir, text_files, capsys, monkeypatch):
    """A real Ctrl-C inside the stage (while its staging folder exists), not just in the command function."""
    import compress.artifacts as artifacts

    model = _tiny_model(tmp_path / "m", tokenizer_dir)
    real = artifacts.write_json_atomic

    def interrupted(path, data):  # the record is the last file written into the staging folder
        if path.name == artifacts.RECORD_FILE and ".tmp-" in path.parent.name:
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(artifacts, "write_json_atomic", interrupted)
    data = ["--set", f"data.eval={text_files['eval']}", "--set", "data.seq_len=32", "--set", "data.max_eval_tokens=128", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    commands = {
        "quantize": ["quantize", str(model), "--method", "rtn", "--bits", "8", "--group-size", "32", "--output", str(tmp_path / "q"), "--no-progress", *data],
        "export": ["export", str(model), "--output", str(tmp_path / "onnx"), "--exporter", "legacy"],
    }
    for name, argv in commands.items():
        assert main(argv) == 130
        err = capsys.readouterr().err
        assert f"compress {name}: interrupted; nothing was written" in err and "rerun the same command" in err
        assert "--resume" not in err and "Traceback" not in err
        assert not (tmp_path / argv[argv.index("--output") + 1]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m"]  # no staging folder left either


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
