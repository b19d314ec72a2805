"""The artifact: a model folder plus `compress.json`, the record every stage writes, and where it may go.

`check_output` is the one policy for output paths: every stage calls it before any compute, and
`staging_dir`/`write_artifact` enforce it again. An artifact is filled in a temporary sibling folder marked
with its owner's pid and renamed into place only when complete; an old one is moved aside and removed only
after that, so a crash never leaves a half-written artifact and never loses the old one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from compress.errors import CompressError

RECORD_FILE = "compress.json"
FORMAT_VERSION = 1


class ArtifactExistsError(CompressError, FileExistsError):
    pass


class OutputPathError(CompressError, ValueError):
    """An output that must not or cannot be written: the input, under a file, unwritable, a folder compress
    did not write, or too little free disk."""


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's (relative path, file hash) list; `compress.json` itself excluded."""
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != RECORD_FILE):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(hash_path(file).encode())
    return digest.hexdigest()


def settings_key(*parts: Any) -> str:
    """sha256 of JSON-able parts (settings, content hashes): the identity of a measurement or a stage's work."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def describe_input(role: str, source: str, local_path: str | Path | None = None) -> dict[str, Any]:
    """One lineage entry. Hub models are recorded by id; local ones by path and content hash."""
    entry: dict[str, Any] = {"role": role, "source": source}
    if local_path is not None and Path(local_path).exists():
        entry["path"] = str(Path(local_path).resolve())
        entry["sha256"] = hash_path(local_path)
        record = Path(local_path) / RECORD_FILE
        if record.is_file():
            entry["stage"] = json.loads(record.read_text()).get("stage")
    return entry


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("compress-llm", "torch", "transformers", "accelerate", "safetensors", "tokenizers"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"type": device, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(), "cpu_count": os.cpu_count()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@dataclass
class ArtifactRecord:
    stage: str
    recipe: dict[str, Any]
    inputs: list[dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "stage": self.stage,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "recipe": self.recipe,
            "inputs": self.inputs,
            "metrics": self.metrics,
            "versions": library_versions(),
            "device": self.device,
            "wall_time_s": round(self.wall_time_s, 3),
            **self.extra,
        }


def read_record(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a compress artifact (no {RECORD_FILE})")
    return json.loads(path.read_text())


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class OutputKind:
    """What a stage writes at its output path. `markers`: files that show compress wrote an existing folder
    (none: any folder will do). `replaced`: written whole in a staging folder and renamed into place (an
    artifact); otherwise the stage adds its own files to the folder in place (a run folder, a bench report)."""

    name: str
    markers: tuple[str, ...]
    replaced: bool


ARTIFACT = OutputKind("compress artifact", (RECORD_FILE,), replaced=True)
FOLDER = OutputKind("folder", (), replaced=False)
OVERWRITE_ANY_FLAG = "--overwrite-any"

# Staging folders `.NAME.tmp-PID@HOST-XXXXXXXX` and old artifacts moved aside `.NAME.old-PID@HOST-XXXXXXXX`:
# the owner is in the name, so a later run can tell a dead run's leftovers from a live one's.
_HOST = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname())[:64] or "host"


def _owner() -> str:
    return f"{os.getpid()}@{_HOST}"


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) is no probe on Windows: treat every owner as alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by another user
        return True
    return True


def size_on_disk(path: str | Path | None) -> int:
    """Bytes of a local file or folder (0 for a hub id, a builtin name or a missing path)."""
    if path is None or not os.path.exists(path):
        return 0
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_stale(target: str | Path) -> None:
    """Remove `target`'s staging folders whose owner (a process of this host) is dead; put back an old artifact
    that a process killed between its two renames left aside (or remove it when the new one is in place)."""
    target = Path(os.path.abspath(target))
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:  # missing or unreadable: nothing of ours to clear
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)@([^-]*)-[A-Za-z0-9_]+$")
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or match.group(3) != _HOST or pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not target.exists():
            os.replace(entry, target)
        else:
            _remove(entry)


def _empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def check_output(
    target: str | Path,
    *,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    overwrite_any: bool = False,
    expected_bytes: int = 0,
    kind: OutputKind = ARTIFACT,
) -> Path:
    """Refuse, before any compute, an output that must not or cannot be written; return it as an absolute path.

    Refused whatever the flags: an output that is one of the local `inputs` (paths that do not exist here, such
    as hub ids, are skipped), contains one or lies inside one; an output under a file, or a file; one whose
    nearest existing folder is not writable; less free disk there than `expected_bytes`. An existing artifact
    is replaced only with `overwrite`, and a non-empty folder compress did not write (none of `kind.markers`)
    only with `overwrite_any` (which implies `overwrite`). First, `target`'s leftovers from dead runs are
    cleared (`remove_stale`). `expected_bytes`: the caller's estimate, from its input's size (`size_on_disk`).
    """
    path = Path(os.path.abspath(Path(target).expanduser()))
    if path.parent == path:
        raise OutputPathError(f"the output {path} is the filesystem root; choose an output folder")
    real = path.resolve()
    for given in inputs:
        source = Path(str(given)).expanduser() if given is not None else None
        if source is None or not os.path.exists(source):
            continue
        source = source.resolve()
        if real == source:
            raise OutputPathError(f"the output {path} is the input {given}: writing it would destroy the input; choose another output folder")
        if source.is_relative_to(real):
            raise OutputPathError(f"the output {path} contains the input {given}: replacing it would delete the input; choose an output folder outside it")
        if real.is_relative_to(source):
            raise OutputPathError(f"the output {path} lies inside the input {given}: writing there would change the input; choose an output folder outside it")
    existing = next(p for p in (path, *path.parents) if os.path.exists(p))
    if existing != path and not existing.is_dir():
        raise OutputPathError(f"the output {path} lies under the file {existing}; choose another output folder")
    remove_stale(path)
    if os.path.exists(path):
        if not path.is_dir():
            raise OutputPathError(f"the output {path} is a file, not a folder; choose another output folder")
        foreign = bool(kind.markers) and not any(os.path.exists(path / m) for m in kind.markers) and not _empty(path)
        if foreign and not overwrite_any:
            what = f"{path} exists and is not a {kind.name} (it has no {' or '.join(kind.markers)})"
            if kind.replaced:
                raise OutputPathError(f"{what}: --overwrite replaces only folders compress wrote. Choose another output folder, or pass {OVERWRITE_ANY_FLAG} to replace it and everything in it")
            raise OutputPathError(f"{what}; choose another output folder")
        if kind.replaced and not (overwrite or overwrite_any):
            raise ArtifactExistsError(f"{path} already exists; pass --overwrite to replace it")
    written = path.parent if kind.replaced or not os.path.exists(path) else path
    writable = next(p for p in (written, *written.parents) if os.path.exists(p))
    if not os.access(writable, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write the output {path}: {writable} is not writable; choose another output folder or fix its permissions")
    if expected_bytes > 0:
        free = shutil.disk_usage(writable).free
        if free < expected_bytes:
            raise OutputPathError(
                f"not enough free disk for the output {path}: it needs about {expected_bytes:,} bytes (estimated from the input's size) "
                f"and {writable} has {free:,} free; free some space or choose an output folder on another disk"
            )
    return path


@contextlib.contextmanager
def staging_dir(target: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False, overwrite_any: bool = False, kind: OutputKind = ARTIFACT) -> Iterator[Path]:
    """A temporary sibling of `target` that becomes `target` when the block finishes without error (an artifact's
    config.json and tokenizer_config.json made portable first: compress.portable). `check_output`
    runs on entry and again before the rename (for what appeared meanwhile); an old `target` is moved aside and
    removed only once the new one is in place."""
    inputs = list(inputs)
    target = check_output(target, inputs=inputs, overwrite=overwrite, overwrite_any=overwrite_any, kind=kind)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot create the folder {target.parent} for the output {target}: {err.strerror}; choose another output folder") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner()}-", dir=target.parent))
    try:
        yield tmp
        if kind is ARTIFACT:
            from compress.portable import make_portable

            make_portable(tmp)  # every model folder we write loads the same in transformers 4.57+ and 5.x
        check_output(target, inputs=inputs, overwrite=overwrite, overwrite_any=overwrite_any, kind=kind)
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{_owner()}-{secrets.token_hex(4)}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_artifact(
    target: Path,
    record: ArtifactRecord,
    write_files: Callable[[Path], None],
    *,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    overwrite_any: bool = False,
) -> Path:
    """Write model files with `write_files(tmp_dir)`, then `compress.json`, then rename into place."""
    start = time.perf_counter()
    with staging_dir(target, inputs=inputs, overwrite=overwrite, overwrite_any=overwrite_any) as tmp:
        write_files(tmp)
        record.extra.setdefault("write_time_s", round(time.perf_counter() - start, 3))
        write_json_atomic(tmp / RECORD_FILE, record.to_json())
    return Path(target)
