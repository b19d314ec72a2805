"""Two CPU processes (gloo, launched by torchrun through accelerate) train the same model as one process."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(tmp_path: Path, recipe: dict, nproc: int, *, env: dict | None = None, timeout: int = 600) -> list[dict]:
    out = tmp_path / f"out{nproc}"
    out.mkdir()
    recipe_json = out / "recipe.json"
    recipe_json.write_text(json.dumps(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1]), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), str(recipe_json), str(out)]
    # Own process group: a run that hangs is killed with its workers, not only torchrun (orphans kept the cores busy).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{nproc}-process run did not finish in {timeout} s (a rank waits in a collective the others skipped?)\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.skipif(shutil.which("true") is None or not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_processes_train_the_same_model_as_one(tmp_path, teachers, text_files):
    recipes = {}
    for nproc in (1, 2):
        recipe = tiny_recipe(tmp_path / f"run{nproc}", teachers["llama"], text_files, steps=4, batch_size=4, eval_every=4, save_every=2)
        recipe["student"] = {"from_teacher": {"layers": 2}}
        recipes[nproc] = recipe
    single = launch(tmp_path, recipes[1], 1)
    ranks = launch(tmp_path, recipes[2], 2)
    assert [r["processes"] for r in ranks] == [2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"], "the two ranks ended with different weights"
    # Each rank sees half of every global batch; DDP's gradient average equals the one-process gradient.
    assert ranks[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-4)
    a = load_file(Path(recipes[1]["output_dir"]) / "student" / "model.safetensors")
    b = load_file(Path(recipes[2]["output_dir"]) / "student" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_processes_distil_from_a_cache_rank_zero_builds(tmp_path, teachers, text_files):
    recipes = {}
    for nproc in (1, 2):
        recipe = tiny_recipe(tmp_path / f"run{nproc}", teachers["llama"], text_files, steps=3, batch_size=4, eval_every=3, save_every=3)
        recipe["data"]["max_train_tokens"] = 32 * 24
        # Separate cache folders: the two-process run builds its own (rank 0 builds, rank 1 waits at the barrier).
        recipe["teacher"]["logits_cache"] = {"enabled": True, "top_k": 16, "shard_blocks": 8, "dir": str(tmp_path / f"logits{nproc}")}
        recipes[nproc] = recipe
    single = launch(tmp_path, recipes[1], 1)
    # Rank 1 arrives only after rank 0 has built the cache: both still pass the same barriers.
    ranks = launch(tmp_path, recipes[2], 2, env={"LATE_RANK_WAITS_FOR_CACHE": "1"}, timeout=240)
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert ranks[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-4)
    assert len(list((tmp_path / "logits2").glob("*/train-*.safetensors"))) == 3
