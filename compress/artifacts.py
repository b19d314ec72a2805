"""The artifact: a model folder plus `compress.json`, the record every stage writes.

`write_artifact` fills a temporary sibling folder and renames it into place only when complete,
so a crash never leaves a half-written artifact and an existing one is never silently replaced.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from compress.errors import CompressError

RECORD_FILE = "compress.json"
FORMAT_VERSION = 1


class ArtifactExistsError(CompressError, FileExistsError):
    pass


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


@contextlib.contextmanager
def staging_dir(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of `target` that becomes `target` when the block finishes without error."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise ArtifactExistsError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_artifact(target: Path, record: ArtifactRecord, write_files: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Write model files with `write_files(tmp_dir)`, then `compress.json`, then rename into place."""
    start = time.perf_counter()
    with staging_dir(target, overwrite=overwrite) as tmp:
        write_files(tmp)
        record.extra.setdefault("write_time_s", round(time.perf_counter() - start, 3))
        write_json_atomic(tmp / RECORD_FILE, record.to_json())
    return Path(target)
