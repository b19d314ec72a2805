"""Block-at-a-time quantization: the same artifact as in memory, resumable per block, bounded, refusing what cannot fit."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from compress.artifacts import read_record
from compress.quantize import sequential
from compress.quantize.stage import run_quantize
from compress.shards import INDEX_FILE, merge_pieces, write_piece
from tests.test_quantize import make_recipe


def tensors_of(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def assert_same_artifact(a, b):
    ta, tb = tensors_of(a), tensors_of(b)
    assert set(ta) == set(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ha, hb = tensors_of(a / "extras"), tensors_of(b / "extras")
    assert set(ha) == set(hb) and all(torch.equal(ha[k], hb[k]) for k in ha)


@pytest.mark.parametrize("settings", [
    {"true_sequential": True},
    {"true_sequential": False, "forward_dtype": "float32", "act_order": True, "sym": False},
    {"method": "rtn"},
    {"true_sequential": True, "activations": "disk"},
    {"true_sequential": False, "forward_dtype": "float32", "activations": "disk"},
    {"method": "rtn", "activations": "disk"},
], ids=["gptq-trueseq-bf16", "gptq-paper-fp32-asym", "rtn", "gptq-trueseq-bf16-disk", "gptq-paper-fp32-disk", "rtn-disk"])
def test_blocks_write_the_same_artifact_as_whole(tmp_path, wide_llama, text_files, settings):
    whole_settings = {k: v for k, v in settings.items() if k != "activations"}
    whole = run_quantize(make_recipe(tmp_path, text_files, load="whole", **whole_settings), str(wide_llama), tmp_path / "whole", progress=False)
    log = []
    blocks = run_quantize(make_recipe(tmp_path, text_files, load="blocks", **settings), str(wide_llama), tmp_path / "blocks", progress=False, log=log.append)
    # With activations on disk the states between blocks went through files: the same codes, bit for bit.
    assert any("states between blocks on disk" in line for line in log) == (settings.get("activations") == "disk")
    assert_same_artifact(whole.artifact, blocks.artifact)
    rw, rb = read_record(whole.artifact), read_record(blocks.artifact)
    assert (rw["load"], rb["load"]) == ("whole", "blocks")
    assert rw["layers"] == rb["layers"]
    # perplexity through the blocks as written equals the reloaded folder's
    for key in ("ppl_before", "ppl_after"):
        assert rb["metrics"][key] == pytest.approx(rw["metrics"][key], rel=1e-5)
    assert not sequential.progress_dir(tmp_path / "blocks").exists()


def test_auto_quantizes_by_blocks(tmp_path, wide_llama, text_files):
    result = run_quantize(make_recipe(tmp_path, text_files), str(wide_llama), tmp_path / "q", progress=False)
    assert read_record(result.artifact)["load"] == "blocks"


class Killed(Exception):
    pass


def test_killed_at_block_k_resumes_there_with_identical_codes(tmp_path, wide_llama, text_files, monkeypatch):
    recipe = make_recipe(tmp_path, text_files, load="blocks")
    straight = run_quantize(recipe, str(wide_llama), tmp_path / "straight", progress=False)

    done = []
    real_after = sequential.BlockWriter.after

    def dying_after(self, index, *args):
        real_after(self, index, *args)
        done.append(index)
        if index == 1:
            raise Killed  # after block 1 (of 4) was written: the run dies there
    monkeypatch.setattr(sequential.BlockWriter, "after", dying_after)
    with pytest.raises(Killed):
        run_quantize(recipe, str(wide_llama), tmp_path / "resumed", progress=False)
    folder = sequential.progress_dir(tmp_path / "resumed")
    assert json.loads((folder / sequential.PROGRESS_FILE).read_text())["done"] == 2
    assert not (tmp_path / "resumed").exists()  # no half artifact that looks complete

    done.clear()
    monkeypatch.setattr(sequential.BlockWriter, "after", lambda self, index, *args: (real_after(self, index, *args), done.append(index)))
    log = []
    resumed = run_quantize(recipe, str(wide_llama), tmp_path / "resumed", progress=False, resume=True, log=log.append)
    assert done == [2, 3]  # blocks 0 and 1 were not quantized again
    assert any("resuming" in line and "block 2" in line for line in log)
    assert_same_artifact(straight.artifact, resumed.artifact)
    assert read_record(straight.artifact)["layers"] == read_record(resumed.artifact)["layers"]
    assert read_record(resumed.artifact)["metrics"]["ppl_after"] == pytest.approx(read_record(straight.artifact)["metrics"]["ppl_after"], rel=1e-6)


def test_states_on_disk_hold_one_batch_on_the_device_and_resume_across_settings(tmp_path, wide_llama, text_files, monkeypatch):
    """`activations: disk`: each batch's state is a file while the block runs (read back for its forward, removed
    once the next block has its own); a run killed at block 1 resumes with the states on the device, and `auto`
    moves them to disk by itself when the device plan does not fit: the codes of one uninterrupted run every time."""
    from compress.quantize import offload

    straight = run_quantize(make_recipe(tmp_path, text_files, load="blocks", activations="device"), str(wide_llama), tmp_path / "straight", progress=False)
    peak_on_device = read_record(straight.artifact)["memory_plan"]["peak"]

    files_seen, reads = [], []
    real_after, real_read = sequential.BlockWriter.after, offload._OnDisk.read

    def dying_after(self, index, *args):
        files_seen.append(sorted(p.name for p in (self.folder / "activations").iterdir()))
        real_after(self, index, *args)
        if index == 1:
            raise Killed
    monkeypatch.setattr(sequential.BlockWriter, "after", dying_after)
    monkeypatch.setattr(offload._OnDisk, "read", lambda self: (reads.append(self.path.name), real_read(self))[1])
    with pytest.raises(Killed):
        run_quantize(make_recipe(tmp_path, text_files, load="blocks", activations="disk"), str(wide_llama), tmp_path / "q", progress=False)
    assert files_seen[0] and len(reads) >= len(files_seen[0])  # the states were read back from their files
    # No file outlives its use: a block's inputs go once the next block has its own, so the count stays flat.
    assert len(files_seen[1]) == len(files_seen[0]) and files_seen[1] != files_seen[0]
    monkeypatch.setattr(sequential.BlockWriter, "after", real_after)
    resumed = run_quantize(make_recipe(tmp_path, text_files, load="blocks", activations="device"), str(wide_llama), tmp_path / "q", progress=False, resume=True)
    assert_same_artifact(straight.artifact, resumed.artifact)

    monkeypatch.setattr(sequential, "available_bytes", lambda device: peak_on_device - 1)
    log = []
    auto = run_quantize(make_recipe(tmp_path, text_files, load="blocks"), str(wide_llama), tmp_path / "auto", progress=False, log=log.append)
    assert any("states between blocks on disk" in line for line in log)
    assert read_record(auto.artifact)["memory_plan"]["where"] == "disk"
    assert read_record(auto.artifact)["memory_plan"]["peak"] < peak_on_device
    assert_same_artifact(straight.artifact, auto.artifact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: on CPU, activations: cpu is the device itself")
def test_states_in_host_memory_on_cuda_give_the_same_codes(tmp_path, wide_llama, text_files):
    on_device = run_quantize(make_recipe(tmp_path, text_files, load="blocks", device="cuda", activations="device"), str(wide_llama), tmp_path / "device", progress=False)
    log = []
    on_host = run_quantize(make_recipe(tmp_path, text_files, load="blocks", device="cuda", activations="cpu"), str(wide_llama), tmp_path / "host", progress=False, log=log.append)
    assert any("states between blocks in host memory" in line for line in log)
    assert_same_artifact(on_device.artifact, on_host.artifact)


def test_resume_with_other_settings_starts_again(tmp_path, wide_llama, text_files, monkeypatch):
    real_after = sequential.BlockWriter.after

    def dying_after(self, index, *args):
        real_after(self, index, *args)
        if index == 1:
            raise Killed
    monkeypatch.setattr(sequential.BlockWriter, "after", dying_after)
    with pytest.raises(Killed):
        run_quantize(make_recipe(tmp_path, text_files, load="blocks"), str(wide_llama), tmp_path / "q", progress=False)
    monkeypatch.setattr(sequential.BlockWriter, "after", real_after)
    log = []
    result = run_quantize(make_recipe(tmp_path, text_files, load="blocks", damp=0.05), str(wide_llama), tmp_path / "q", progress=False, resume=True, log=log.append)
    assert any("not resuming" in line and "other inputs or settings" in line for line in log)
    assert read_record(result.artifact)["recipe"]["quantize"]["damp"] == 0.05


def test_sigkill_mid_run_resumes(tmp_path, wide_llama, text_files):
    """A real kill -9 of `compress quantize` after some blocks, then --resume: the same artifact as one run."""
    import os
    import signal
    import time

    recipe = make_recipe(tmp_path, text_files, load="blocks", true_sequential=False)
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    straight = run_quantize(recipe, str(wide_llama), tmp_path / "straight", progress=False)
    args = ["quantize", str(wide_llama), "--recipe", str(path), "--output", str(tmp_path / "k"), "--no-progress"]
    # The CLI in a child process whose blocks each take 0.5 s longer, so the kill lands mid-run.
    slow = (
        "import sys, time; from compress.quantize import sequential as s; after = s.BlockWriter.after; "
        "s.BlockWriter.after = lambda self, *a: (after(self, *a), time.sleep(0.5)); "
        f"from compress.cli import main; sys.exit(main({args!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    folder = sequential.progress_dir(tmp_path / "k")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads((folder / sequential.PROGRESS_FILE).read_text())["done"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((folder / sequential.PROGRESS_FILE).read_text())["done"]
    assert 1 <= done < 4 and not (tmp_path / "k").exists()
    out = subprocess.run([sys.executable, "-m", "compress.cli", *args, "--resume"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"resuming block-at-a-time quantization at block {done}" in out.stdout + out.stderr
    assert_same_artifact(straight.artifact, tmp_path / "k")


def test_plan_that_cannot_fit_is_refused_before_compute(tmp_path, wide_llama, text_files, monkeypatch):
    monkeypatch.setattr(sequential, "available_bytes", lambda device: 10_000)
    with pytest.raises(sequential.SequentialError, match=r"memory plan .* peak about .* of 9.8 KiB available: it does not fit the cpu device"):
        run_quantize(make_recipe(tmp_path, text_files, load="blocks"), str(wide_llama), tmp_path / "q", progress=False)
    assert not sequential.progress_dir(tmp_path / "q").exists() and not (tmp_path / "q").exists()


def test_missing_shard_named(tmp_path, wide_llama, text_files):
    import shutil

    from compress.models import ModelSourceError

    model = tmp_path / "sharded"
    shutil.copytree(wide_llama, model)
    tensors = tensors_of(model)
    (model / "model.safetensors").unlink()
    keys = sorted(tensors)
    write_piece(tmp_path / "a.safetensors", {k: tensors[k] for k in keys[: len(keys) // 2]})
    write_piece(tmp_path / "b.safetensors", {k: tensors[k] for k in keys[len(keys) // 2 :]})
    files = merge_pieces([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], model, max_shard_bytes=1)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert tensors_of(model).keys() == tensors.keys() and all(torch.equal(tensors_of(model)[k], tensors[k]) for k in keys)
    files[1].unlink()
    with pytest.raises(ModelSourceError, match=r"model-00002-of-00002.safetensors.*named in .*model.safetensors.index.json.*is missing"):
        run_quantize(make_recipe(tmp_path, text_files), str(model), tmp_path / "q", progress=False)


def test_merge_keeps_every_tensor_exact_and_aligned(tmp_path):
    g = torch.Generator().manual_seed(0)
    first = {"a.odd": torch.randn(3, generator=g).to(torch.bfloat16), "a.codes": torch.randint(-9, 9, (5, 3), dtype=torch.int32, generator=g)}
    second = {"b.scale": torch.randn(7, generator=g).half(), "b.w": torch.randn(2, 5, generator=g), "b.flag": torch.tensor([True, False, True])}
    write_piece(tmp_path / "1.safetensors", first)
    write_piece(tmp_path / "2.safetensors", second)
    out = tmp_path / "out"
    out.mkdir()
    (file,) = merge_pieces([tmp_path / "1.safetensors", tmp_path / "2.safetensors"], out)
    assert file.name == "model.safetensors" and not (out / INDEX_FILE).exists()
    merged = tensors_of(out)
    for key, value in {**first, **second}.items():
        assert merged[key].dtype == value.dtype and torch.equal(merged[key], value), key
    from compress.shards import read_header

    header, start = read_header(file)
    assert start % 8 == 0
    widths = {"F32": 4, "I32": 4, "F16": 2, "BF16": 2, "BOOL": 1}
    assert all(e["data_offsets"][0] % widths[e["dtype"]] == 0 for e in header.values())
