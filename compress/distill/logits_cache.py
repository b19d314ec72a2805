"""The offline teacher-logits cache: the teacher's top-k log-probabilities on every training block, in
shards, plus what evaluation needs, in a folder named by everything its contents depend on.

`cache_key(...)` names a cache; `open_cache(root, key)` returns a complete one (None if there is none, an
error if the folder holds another key's cache); `build_cache(...)` writes one, resuming a killed build
after its last complete shard. Layout of `<root>/<digest>/`:

    manifest.json            the key's parts, shapes, dtypes, shard size, teacher facts; written last
    train-00000.safetensors  blocks [0, shard_blocks): logprobs (b, T-1, k) float16|float32, indices
                             (b, T-1, k) uint16 (vocab <= 65536) | int32, tail (b, T-1) float32, where
                             position t holds the teacher's distribution over token t+1 (as the loss uses it)
    train-00001.safetensors  ...
    eval.safetensors         hidden (n_eval, T, H) float32: the teacher's final hidden states on the eval blocks
    head.safetensors         weight (V, H) [, bias (V,)]: the teacher's lm_head, so eval metrics stay exact

A build in progress lives in `<root>/.<digest>.partial/` (the same files plus build.json) and is renamed
into place when complete. Every file is written to a temporary name and renamed, and a shard is taken as
done only if its header names this key and its block range and covers the whole file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from compress.artifacts import settings_key, write_json_atomic
from compress.distill.sparse import TopKTargets
from compress.errors import CompressError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD = "build.json"
EVAL_FILE = "eval.safetensors"
HEAD_FILE = "head.safetensors"
_STORAGE = {"float16": torch.float16, "float32": torch.float32}


class LogitsCacheError(CompressError, ValueError):
    pass


@dataclass(frozen=True)
class CacheKey:
    parts: dict[str, Any]  # JSON-able: what the cache's contents depend on
    digest: str  # its folder name

    @classmethod
    def of(cls, parts: dict[str, Any]) -> "CacheKey":
        return cls(parts, settings_key("logits-cache", parts)[:24])


def blocks_digest(blocks: torch.Tensor) -> str:
    """The identity of packed token blocks (n, seq_len): sha256 of their shape and int64 values."""
    digest = hashlib.sha256(json.dumps(list(blocks.shape)).encode())
    digest.update(blocks.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(*, teacher: dict[str, Any], tokenizer: str, train_blocks: torch.Tensor, eval_blocks: torch.Tensor, temperature: float, top_k: int, logprob_dtype: str) -> CacheKey:
    """`teacher` is {"sha256": content hash of its folder} or {"hub": id, "revision": rev}, plus its dtype."""
    return CacheKey.of({
        "format": FORMAT_VERSION,
        "teacher": teacher,
        "tokenizer": tokenizer,
        "train_blocks": blocks_digest(train_blocks),
        "eval_blocks": blocks_digest(eval_blocks),
        "seq_len": int(train_blocks.shape[1]),
        "temperature": float(temperature),
        "top_k": int(top_k),
        "logprob_dtype": logprob_dtype,
    })


def index_dtype(vocab: int) -> torch.dtype:
    return torch.uint16 if vocab <= 65536 else torch.int32


def bytes_per_position(top_k: int, vocab: int, logprob_dtype: str) -> int:
    """Bytes stored per predicted position of a training block: top_k x (logprob + index) + the tail."""
    return top_k * (_STORAGE[logprob_dtype].itemsize + index_dtype(vocab).itemsize) + 4


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Written under a temporary name, flushed and renamed: a file with the final name is always complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _shard_name(index: int) -> str:
    return f"train-{index:05d}.safetensors"


def _shard_metadata(digest: str, index: int, first: int, count: int) -> dict[str, str]:
    return {"key": digest, "shard": str(index), "first_block": str(first), "blocks": str(count)}


def _shard_complete(path: Path, metadata: dict[str, str]) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() == metadata and set(fh.keys()) == {"logprobs", "indices", "tail"}
    except (SafetensorError, OSError):  # truncated or not a safetensors file: build it again
        return False


def _diff(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache {a!r}, wanted {b!r}")
    return out


class LogitsCache:
    """A complete cache, read block by block (memory-mapped safetensors): nothing is loaded up front."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path, self.manifest = Path(path), manifest
        self._shards: dict[int, Any] = {}
        self._eval: Optional[torch.Tensor] = None

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def _shard(self, index: int):
        if index not in self._shards:
            self._shards[index] = safe_open(str(self.path / _shard_name(index)), framework="pt")
        return self._shards[index]

    def train_targets(self, index: torch.Tensor) -> TopKTargets:
        """Top-k targets of training blocks `index` (b,): (b, T-1, k) fp32 log-probs, int64 ids, (b, T-1) tail."""
        per_shard = int(self.manifest["shard_blocks"])
        parts = {"logprobs": [], "indices": [], "tail": []}
        for block in index.tolist():
            if not 0 <= block < int(self.manifest["train_blocks"]):
                raise IndexError(f"training block {block} is not in the cache ({self.manifest['train_blocks']} blocks)")
            shard, row = divmod(block, per_shard)
            fh = self._shard(shard)
            for name, rows in parts.items():
                # Widened per row: torch.cat of uint16 fails under CPU autocast (distill.precision bf16).
                piece = fh.get_slice(name)[row : row + 1]
                rows.append(piece.to(torch.int64) if name == "indices" else piece.float())
        return TopKTargets(torch.cat(parts["logprobs"]), torch.cat(parts["indices"]), torch.cat(parts["tail"]))

    def eval_hidden(self, index: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states (b, T, H) fp32 on eval blocks `index`."""
        if self._eval is None:
            self._eval = load_file(str(self.path / EVAL_FILE))["hidden"]
        return self._eval[index]

    def head(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        tensors = load_file(str(self.path / HEAD_FILE))
        return tensors["weight"], tensors.get("bias")

    def nbytes(self) -> dict[str, int]:
        train = sum((self.path / _shard_name(i)).stat().st_size for i in range(int(self.manifest["shards"])))
        return {"train": train, "eval": (self.path / EVAL_FILE).stat().st_size, "head": (self.path / HEAD_FILE).stat().st_size}


def cache_root(directory: str | None) -> Path:
    from compress.models import cache_root as compress_cache

    return Path(directory).expanduser() if directory else compress_cache() / "logits"


def open_cache(root: Path, key: CacheKey) -> LogitsCache | None:
    """The complete cache for `key` under `root`, or None. A folder of that name holding a cache made for
    something else (copied or edited by hand) is refused, naming what differs."""
    path = Path(root) / key.digest
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    differs = _diff(manifest.get("key", {}), key.parts)
    if differs:
        raise LogitsCacheError(
            f"{path} holds a teacher-logits cache made for something else ({'; '.join(differs)}); it is not used. "
            "Delete that folder (it is rebuilt) or point teacher.logits_cache.dir elsewhere"
        )
    missing = [n for n in [_shard_name(i) for i in range(int(manifest["shards"]))] + [EVAL_FILE, HEAD_FILE] if not (path / n).is_file()]
    if missing:
        raise LogitsCacheError(f"{path} is incomplete (missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); delete the folder and it is rebuilt")
    return LogitsCache(path, manifest)


def build_cache(
    root: Path,
    key: CacheKey,
    *,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    topk: Callable[[torch.Tensor], TopKTargets],
    eval_hidden: Callable[[torch.Tensor], torch.Tensor],
    head: tuple[torch.Tensor, Optional[torch.Tensor]],
    shard_blocks: int,
    batch_size: int,
    facts: dict[str, Any],
    progress: bool = False,
) -> LogitsCache:
    """Run `topk(ids (b, T)) -> targets (b, T-1, k)` over every training block, shard by shard, and
    `eval_hidden(ids) -> (b, T, H)` over the eval blocks; write them with `head` and `facts` (teacher name,
    parameters, precision) under `root/key.digest`. Shards already complete in a partial build are kept."""
    root = Path(root)
    final, partial = root / key.digest, root / f".{key.digest}.partial"
    if (final / MANIFEST).is_file():
        return open_cache(root, key)
    partial.mkdir(parents=True, exist_ok=True)
    build_path = partial / BUILD
    if build_path.is_file():
        build = json.loads(build_path.read_text())
        if build.get("key") != key.parts:
            raise LogitsCacheError(f"{partial} is a partial build for another key; delete it")
    else:
        build = {"key": key.parts, "shard_blocks": shard_blocks}
        write_json_atomic(build_path, build)
    for leftover in partial.glob(".*.tmp-*"):
        leftover.unlink(missing_ok=True)  # half-written files of a killed build
    per_shard = int(build["shard_blocks"])
    n = len(train_blocks)
    shards = -(-n // per_shard)
    vocab, k = int(head[0].shape[0]), int(key.parts["top_k"])
    if k > vocab:
        raise LogitsCacheError(f"teacher.logits_cache.top_k={k} exceeds the teacher's vocabulary ({vocab} tokens)")
    storage, idx_dtype = _STORAGE[key.parts["logprob_dtype"]], index_dtype(vocab)

    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc="teacher logits", unit="block", disable=not progress, dynamic_ncols=True)
    for shard in range(shards):
        first, count = shard * per_shard, min(per_shard, n - shard * per_shard)
        path, metadata = partial / _shard_name(shard), _shard_metadata(key.digest, shard, first, count)
        if not _shard_complete(path, metadata):
            parts = [topk(train_blocks[i : i + batch_size]) for i in range(first, first + count, batch_size)]
            _write_safetensors(path, {
                "logprobs": torch.cat([p.logprobs.float().cpu() for p in parts]).clamp(min=torch.finfo(storage).min).to(storage),
                "indices": torch.cat([p.indices.cpu() for p in parts]).to(idx_dtype),
                "tail": torch.cat([p.tail.float().cpu() for p in parts]),
            }, metadata)
        bar.update(count)
    bar.close()
    if not (partial / EVAL_FILE).is_file():
        hidden = torch.cat([eval_hidden(eval_blocks[i : i + batch_size]).float().cpu() for i in range(0, len(eval_blocks), batch_size)])
        _write_safetensors(partial / EVAL_FILE, {"hidden": hidden}, {"key": key.digest})
    weight, bias = head
    _write_safetensors(partial / HEAD_FILE, {"weight": weight.detach().cpu().clone(), **({} if bias is None else {"bias": bias.detach().cpu().clone()})}, {"key": key.digest})
    manifest = {
        "format": FORMAT_VERSION,
        "key": key.parts,
        "digest": key.digest,
        "top_k": k,
        "vocab_size": vocab,
        "hidden_size": int(weight.shape[1]),
        "logprob_dtype": key.parts["logprob_dtype"],
        "index_dtype": str(idx_dtype).removeprefix("torch."),
        "seq_len": int(train_blocks.shape[1]),
        "positions_per_block": int(train_blocks.shape[1]) - 1,
        "train_blocks": n,
        "eval_blocks": len(eval_blocks),
        "shard_blocks": per_shard,
        "shards": shards,
        "bytes_per_position": bytes_per_position(k, vocab, key.parts["logprob_dtype"]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **facts,
    }
    write_json_atomic(partial / MANIFEST, manifest)
    (partial / BUILD).unlink()
    try:
        os.replace(partial, final)
    except OSError:
        if not (final / MANIFEST).is_file():  # not a concurrent build that finished first
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return open_cache(root, key)
