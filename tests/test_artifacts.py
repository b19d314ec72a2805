"""Output paths (compress.artifacts.check_output, staging_dir): never the input, --overwrite only over what
compress wrote, bad paths refused before any compute, the old artifact kept until the new one is in place,
and dead runs' staging folders cleared without touching a live run's."""
from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import dead_pid, staging_name

import compress.artifacts as artifacts
from compress.artifacts import ARTIFACT, FOLDER, RECORD_FILE, ArtifactExistsError, OutputPathError, check_output, remove_stale, staging_dir


def make_artifact(folder: Path, text: str = "old") -> Path:
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_text(text)
    (folder / RECORD_FILE).write_text(json.dumps({"stage": "test"}))
    return folder


@pytest.mark.parametrize("where", ["same", "contains", "inside"])
def test_the_input_is_refused_whatever_the_flags(tmp_path, where):
    model = make_artifact(tmp_path / "art" / "m")
    target = {"same": model, "contains": tmp_path / "art", "inside": model / "onnx"}[where]
    message = {"same": "is the input", "contains": "contains the input", "inside": "lies inside the input"}[where]
    with pytest.raises(OutputPathError, match=message) as err:
        check_output(target, inputs=[model], overwrite=True, overwrite_any=True)
    assert str(target) in str(err.value) and str(model) in str(err.value)
    with pytest.raises(OutputPathError, match=message):
        with staging_dir(target, inputs=[model], overwrite_any=True):
            pytest.fail("staged into the input")
    assert (model / "weights.bin").read_text() == "old" and not (model / "onnx").exists()
    # the same through a symlink to the input
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(OutputPathError, match="is the input"):
        check_output(tmp_path / "link", inputs=[model], overwrite_any=True)


def test_overwrite_replaces_only_folders_compress_wrote(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputPathError, match="not a compress artifact .*--overwrite-any") as err:
        check_output(mine, overwrite=True)
    assert str(mine) in str(err.value)
    with pytest.raises(OutputPathError, match="--overwrite-any"):
        with staging_dir(mine, overwrite=True) as tmp:
            (tmp / "model").write_text("new")
    assert (mine / "thesis.tex").read_text() == "years of work"
    with staging_dir(mine, overwrite_any=True) as tmp:  # the explicit flag replaces it
        (tmp / "model").write_text("new")
    assert sorted(p.name for p in mine.iterdir()) == ["model"]

    art = make_artifact(tmp_path / "art")
    with pytest.raises(ArtifactExistsError, match="already exists; pass --overwrite"):
        check_output(art)
    with staging_dir(art, overwrite=True) as tmp:
        (tmp / "weights.bin").write_text("new")
    assert (art / "weights.bin").read_text() == "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output(empty, overwrite=True) == empty  # nothing to lose


def test_a_crash_before_the_rename_keeps_the_old_artifact(tmp_path):
    art = make_artifact(tmp_path / "art")
    with pytest.raises(RuntimeError):
        with staging_dir(art, overwrite=True) as tmp:
            (tmp / "weights.bin").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (art / "weights.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_old_artifact_left_aside_by_a_killed_run_is_put_back(tmp_path):
    art = make_artifact(tmp_path / "art")
    name = staging_name(art)
    # killed between moving the old artifact aside and renaming the new one into place
    aside = tmp_path / name.replace(".tmp-", ".old-").replace(f"-{os.getpid()}@", f"-{dead_pid()}@")
    os.replace(art, aside)
    check_output(art, overwrite=True)
    assert (art / "weights.bin").read_text() == "old" and not aside.exists()


def test_stale_staging_folders_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    name = staging_name(target)
    assert f"-{os.getpid()}@" in name and name.startswith(".out.tmp-")
    live = tmp_path / name
    stale = tmp_path / name.replace(f"-{os.getpid()}@", f"-{dead_pid()}@")
    other = tmp_path / name.replace(".out.", ".other.").replace(f"-{os.getpid()}@", f"-{dead_pid()}@")
    for folder in (live, stale, other):
        folder.mkdir()
        (folder / "model.safetensors").write_text("partial")
    with staging_dir(target) as tmp:
        (tmp / "model").write_text("done")
    assert not stale.exists(), "a dead run's staging folder was left behind"
    assert live.exists(), "a live run's staging folder was removed"
    assert other.exists(), "another target's staging folder was removed"
    assert (target / "model").read_text() == "done"
    remove_stale(target)
    assert live.exists()


def test_bad_output_paths_are_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError) as err:
        check_output(tmp_path / "file" / "sub" / "out")
    assert f"{tmp_path / 'file' / 'sub' / 'out'} lies under the file {tmp_path / 'file'}" in str(err.value)
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output(tmp_path / "file", overwrite_any=True)
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output(tmp_path / "file", kind=FOLDER)

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(artifacts.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    with pytest.raises(OutputPathError) as err:
        check_output(locked / "a" / "out")
    assert f"cannot write the output {locked / 'a' / 'out'}: {locked} is not writable" in str(err.value)
    assert not (locked / "a").exists()

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda p: Usage(100, 90, 10))
    with pytest.raises(OutputPathError, match=r"needs about 1,000,000 bytes .* has 10 free") as err:
        check_output(tmp_path / "out", expected_bytes=1_000_000)
    assert str(tmp_path / "out") in str(err.value)
    assert check_output(tmp_path / "new" / "parents" / "out", expected_bytes=5) == tmp_path / "new" / "parents" / "out"


def test_in_place_folders_refuse_only_foreign_ones(tmp_path):
    kind = artifacts.OutputKind("compress bench folder", ("results.json",), replaced=False)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "results.json").write_text("{}")
    assert check_output(tmp_path / "report", kind=kind) == tmp_path / "report"  # reused, no --overwrite needed
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(OutputPathError, match="is not a compress bench folder"):
        check_output(tmp_path / "notes", kind=kind)
    assert check_output(tmp_path / "notes", kind=FOLDER) == tmp_path / "notes"
    shutil.rmtree(tmp_path / "notes")
    assert ARTIFACT.replaced and not FOLDER.replaced
