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


def launch(tmp_path: Path, recipe: dict, nproc: int, *, env: dict | None = None, timeout: int = 600, accelerate: bool = False, name: str | None = None) -> list[dict]:
    """Run the worker in `nproc` processes: torchrun, or (`accelerate`) the command users type,
    `accelerate launch --multi_gpu --num_processes N` (torchrun underneath; gloo on CPU)."""
    out = tmp_path / (name or f"out{nproc}")
    out.mkdir()
    recipe_json = out / "recipe.json"
    recipe_json.write_text(json.dumps(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1]), **(env or {})}
    if accelerate:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
               str(WORKER), str(recipe_json), str(out)]
    else:
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
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_distil_from_a_cache_rank_zero_builds(tmp_path, teachers, text_files, parallel):
    """The largest teachers' path: rank 0 builds the teacher-logits cache, then both processes train from it
    (the student replicated, or sharded with FSDP2)."""
    recipes = {}
    for nproc in (1, 2):
        recipe = tiny_recipe(tmp_path / f"run{nproc}", teachers["llama"], text_files, steps=3, batch_size=4, eval_every=3, save_every=3, parallel=parallel)
        recipe["data"]["max_train_tokens"] = 32 * 24
        # Separate cache folders: the two-process run builds its own (rank 0 builds, rank 1 waits at the barrier).
        recipe["teacher"]["logits_cache"] = {"enabled": True, "top_k": 16, "shard_blocks": 8, "dir": str(tmp_path / f"logits{nproc}")}
        recipes[nproc] = recipe
    single = launch(tmp_path, recipes[1], 1)
    # Rank 1 arrives only after rank 0 has built the cache: both still pass the same barriers.
    ranks = launch(tmp_path, recipes[2], 2, env={"LATE_RANK_WAITS_FOR_CACHE": "1"}, timeout=240)
    assert [r["parameter_types"]["student"] for r in ranks] == [["DTensor" if parallel == "fsdp" else "Parameter"]] * 2
    assert "teacher" not in ranks[1]["parameter_types"]  # only rank 0 loaded the teacher, to build the cache
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert ranks[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-4)
    assert len(list((tmp_path / "logits2").glob("*/train-*.safetensors"))) == 3


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_fsdp2_two_processes_train_the_same_model_as_one_and_resume_exactly(tmp_path, teachers, text_files):
    """distill.parallel: fsdp under `accelerate launch --num_processes 2` (gloo): the student and the live
    teacher sharded over the two processes (FSDP2), gradient accumulation and clipping on, a distributed
    checkpoint at step 2. Ends with the weights of one process; a run resumed from that checkpoint ends with
    the same weights as the uninterrupted one."""
    recipes = {}
    for nproc in (1, 2):
        recipe = tiny_recipe(tmp_path / f"run{nproc}", teachers["llama"], text_files, steps=4, batch_size=4, eval_every=2, save_every=2)
        recipe["student"] = {"from_teacher": {"layers": 2}}
        recipe["distill"].update(grad_accum=2, max_grad_norm=0.5, parallel="fsdp", keep_last=3)
        recipes[nproc] = recipe
    single = launch(tmp_path, recipes[1], 1)  # one process: parallel is ignored, a plain run
    ranks = launch(tmp_path, recipes[2], 2, accelerate=True)
    assert [r["processes"] for r in ranks] == [2, 2]
    # Sharded: every parameter of the student is a DTensor, and the teacher's too but its (untied) head.
    assert ranks[0]["parameter_types"]["student"] == ["DTensor"] and single[0]["parameter_types"]["student"] == ["Parameter"]
    assert ranks[0]["parameter_types"]["teacher"] == ["DTensor", "Parameter"]
    assert ranks[0]["sha256"] == ranks[1]["sha256"], "the two ranks gathered different weights"
    assert ranks[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-4)
    run2 = Path(recipes[2]["output_dir"])
    a = load_file(Path(recipes[1]["output_dir"]) / "student" / "model.safetensors")
    b = load_file(run2 / "student" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)

    # The step-2 checkpoint is distributed: each process wrote its shards.
    ckpt = run2 / "checkpoints" / "step-00000002"
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert json.loads((ckpt / "state.json").read_text())["parallel"] == "fsdp"
    # Interrupted after step 2: what a kill during step 3 leaves (the step-2 checkpoint, no student).
    shutil.rmtree(run2 / "student")
    finished = run2 / "checkpoints" / "step-00000004"
    assert not finished.exists()  # no checkpoint is written at the last step
    resumed = launch(tmp_path, recipes[2], 2, accelerate=True, env={"RESUME": "1"}, name="resumed")
    assert resumed[0]["sha256"] == ranks[0]["sha256"], "the resumed run ended with other weights than the uninterrupted one"
    c = load_file(run2 / "student" / "model.safetensors")
    for key in b:
        assert torch.equal(b[key], c[key]), key
    log = [json.loads(line) for line in (run2 / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices (FSDP2 over NCCL); the CPU test above covers gloo")
def test_fsdp2_on_two_gpus_trains_the_same_model_as_one(tmp_path, teachers, text_files):
    recipes = {}
    for nproc in (1, 2):
        recipe = tiny_recipe(tmp_path / f"run{nproc}", teachers["llama"], text_files, steps=4, batch_size=4, eval_every=4, save_every=2)
        recipe["distill"].update(parallel="fsdp", device="cuda", precision="fp32")
        recipes[nproc] = recipe
    single = launch(tmp_path, recipes[1], 1)
    ranks = launch(tmp_path, recipes[2], 2, accelerate=True)
    assert ranks[0]["parameter_types"]["student"] == ["DTensor"]
    assert ranks[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-3)
    a = load_file(Path(recipes[1]["output_dir"]) / "student" / "model.safetensors")
    b = load_file(Path(recipes[2]["output_dir"]) / "student" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
