"""Text in, packed token blocks out: read .txt/.jsonl(.gz)/folders/HF datasets, tokenize once, cache.

`load_blocks(spec, tokenizer)` returns train and eval blocks of `seq_len` tokens; the cache key is
the content hash of the source, the tokenizer's vocabulary and the packing settings. Documents are tokenized
as they stream past and their blocks written to a memory-mapped file, so no corpus is ever held whole.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from compress.artifacts import hash_path
from compress.corpus import builtin_path
from compress.errors import CompressError
from compress.models import cache_root

BUILTIN_PREFIX = "builtin:"
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".txt.gz")


class DataSourceError(CompressError, ValueError):
    pass


@dataclass(frozen=True)
class Blocks:
    train: torch.Tensor  # (n_train, seq_len) int64
    eval: torch.Tensor  # (n_eval, seq_len) int64
    sources: dict[str, str]  # split -> resolved source path

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def resolve_data_path(source: str) -> Path:
    if source.startswith(BUILTIN_PREFIX):
        return builtin_path(source[len(BUILTIN_PREFIX):])
    path = Path(source).expanduser()
    if not path.exists():
        raise DataSourceError(f"data path not found: {source}")
    return path


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataSourceError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict) or text_field not in row:
                    raise DataSourceError(f"{path}:{lineno}: no {text_field!r} field (set data.text_field)")
                yield str(row[text_field])
    elif name.endswith((".txt", ".txt.gz")):
        with _open_text(path) as fh:
            yield fh.read()
    else:
        raise DataSourceError(f"{path}: unsupported file type; use {', '.join(TEXT_SUFFIXES)}, a folder of those, or a saved HF dataset")


def read_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents from a file, a folder of text files (sorted, recursive), or a `save_to_disk` dataset."""
    if _is_hf_dataset(path):
        try:
            import datasets
        except ImportError:
            raise DataSourceError(f"{path} is a Hugging Face dataset: pip install datasets") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        if text_field not in ds.column_names:
            raise DataSourceError(f"{path}: no column {text_field!r} (columns: {ds.column_names}); set data.text_field")
        yield from (str(t) for t in ds[text_field])
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataSourceError(f"{path}: folder holds no {', '.join(TEXT_SUFFIXES)} files")
        for file in files:
            yield from _read_file(file, text_field)
    else:
        yield from _read_file(path, text_field)


def bos_prefix(tokenizer) -> list[int]:
    """`[bos_token_id]` when the tokenizer puts a BOS token in front of what it encodes (Gemma, Llama-2/3,
    Mistral), `[]` when it adds nothing (GPT-2, SmolLM2, Qwen): what every window must start with to be
    in distribution for the model (a Gemma-3 measured without it has 2.5x the perplexity)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [int(bos)] if with_special[:1] == [bos] and plain[:1] != [bos] else []


TOKEN_CHUNK = 1 << 20  # tokens held in memory between writes when packing a corpus to disk


def _packed_rows(texts: Iterator[str], tokenizer, seq_len: int, max_tokens: int | None) -> Iterator[np.ndarray]:
    """The blocks of `pack`, a few at a time: at most about TOKEN_CHUNK tokens are held in memory, so a corpus of
    any size streams to disk (never whole in Python lists)."""
    eos = tokenizer.eos_token_id
    prefix = bos_prefix(tokenizer)
    if len(prefix) >= seq_len:
        raise DataSourceError(f"seq_len={seq_len} leaves no room after the BOS token")
    body = seq_len - len(prefix)
    cap = None if max_tokens is None else max(max_tokens // seq_len, 1)
    parts: list[np.ndarray] = []
    pending = rows = 0
    flush = max(body, TOKEN_CHUNK)

    def emit(final: bool):
        nonlocal parts, pending, rows
        stream = np.concatenate(parts) if len(parts) != 1 else parts[0]
        k = len(stream) // body if cap is None else min(len(stream) // body, cap - rows)
        out = stream[: k * body].reshape(k, body)
        if prefix:
            out = np.concatenate([np.full((k, len(prefix)), prefix, dtype=np.int64), out], axis=1)
        rest = stream[k * body:]
        parts, pending, rows = ([rest] if len(rest) and not final else []), len(rest), rows + k
        return out

    for text in texts:
        if not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        parts.append(np.asarray(ids, dtype=np.int64))
        pending += len(ids)
        if pending >= flush:
            out = emit(final=False)
            if len(out):
                yield out
            if cap is not None and rows >= cap:
                return
    if parts:
        out = emit(final=True)
        if len(out):
            yield out


def pack(texts: Iterator[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize documents, join them with EOS, cut into (n, seq_len) blocks; the tail is dropped.

    For a tokenizer that adds BOS (`bos_prefix`), every block is BOS + the next seq_len - 1 tokens of the
    stream, so training, calibration and evaluation windows all start the way the model was trained.
    In memory; `packed_blocks` streams the same blocks to a memory-mapped file instead."""
    chunks = list(_packed_rows(texts, tokenizer, seq_len, max_tokens))
    if not chunks:
        return torch.empty(0, seq_len, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(chunks))


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    # BOS-prefixed windows differ from plain ones; tokenizers without BOS keep their old fingerprint (and caches).
    bos = bos_prefix(tokenizer)
    return hashlib.sha256(json.dumps([vocab, tokenizer.eos_token_id, type(tokenizer).__name__, *([{"bos": bos}] if bos else [])]).encode()).hexdigest()[:16]


def packed_blocks(source: str, tokenizer, *, seq_len: int, text_field: str, max_tokens: int | None, cache_dir: Path | None) -> torch.Tensor:
    """Blocks for one source, from the cache when the same source was packed the same way before.

    The cache is content-addressed: `<key>.tokens` holds the (n, seq_len) int64 blocks, streamed to disk while
    tokenizing, and `<key>.json` their shape, written last. The blocks come back memory-mapped, so a corpus
    occupies the page cache, not the process: only the rows a batch indexes are read."""
    path = resolve_data_path(source)
    cache = _cache_file(path, tokenizer, seq_len, text_field, max_tokens, cache_dir)
    blocks = _mapped_blocks(cache)
    return blocks if blocks is not None else _pack_into(cache, path, source, tokenizer, seq_len, text_field, max_tokens)


def _pack_into(cache: Path, path: Path, source: str, tokenizer, seq_len: int, text_field: str, max_tokens: int | None) -> torch.Tensor:
    """Tokenize and pack `path` into the cache file `cache` (streamed, atomic), then map it."""
    key = cache.stem
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".tokens", dir=cache.parent)
    rows = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in _packed_rows(read_texts(path, text_field), tokenizer, seq_len, max_tokens):
                fh.write(chunk.tobytes())
                rows += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        if rows == 0:
            raise DataSourceError(f"{source}: fewer than seq_len={seq_len} tokens of text")
        os.replace(tmp, cache)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {"rows": rows, "seq_len": seq_len, "dtype": "int64", "source": str(path)}
    fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".json", dir=cache.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(meta, fh)
    os.replace(tmp, cache.with_suffix(".json"))
    return _mapped_blocks(cache)


def _cache_file(path: Path, tokenizer, seq_len: int, text_field: str, max_tokens: int | None, cache_dir: Path | None) -> Path:
    key = hashlib.sha256(
        json.dumps([hash_path(path), tokenizer_fingerprint(tokenizer), seq_len, text_field, max_tokens]).encode()
    ).hexdigest()[:24]
    return (cache_dir or cache_root() / "data") / f"{key}.tokens"


def sampled_blocks(source: str, tokenizer, *, seq_len: int, text_field: str, cache_dir: Path | None, max_chars: int, seed: int, need: int) -> tuple[torch.Tensor, dict]:
    """Blocks of `source` to draw `need` of, tokenizing no more than that takes: its whole packing when it is in the
    cache or has at most `max_chars` characters (packed and cached as `packed_blocks` does), else the packing of a
    seeded sample of its documents (`sample_documents`; the whole source after all if that gives fewer than `need`
    blocks). With how they were made, for the record."""
    path = resolve_data_path(source)
    cache = _cache_file(path, tokenizer, seq_len, text_field, None, cache_dir)
    blocks = _mapped_blocks(cache)
    if blocks is not None:
        return blocks, {"tokenized": "cached"}
    sampled, documents = sample_documents(source, text_field, max_chars=max_chars, seed=seed)
    facts: dict = {"tokenized": "whole source"}
    if sampled is not None:
        blocks = pack(iter(sampled), tokenizer, seq_len)
        facts = {"tokenized": "sampled documents", "documents": documents, "sampled_documents": len(sampled), "sampled_chars": sum(map(len, sampled)), "blocks": len(blocks)}
        if len(blocks) >= need:
            return blocks, facts
        facts.update(tokenized="whole source", why=f"the sampled documents made {len(blocks)} blocks, fewer than calib.samples={need}")
    return _pack_into(cache, path, source, tokenizer, seq_len, text_field, None), facts


def _document_key(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "big")


def sample_documents(source: str, text_field: str, *, max_chars: int, seed: int) -> tuple[list[str] | None, int]:
    """A seeded sample of whole documents of about `max_chars` characters in all, in the source's order, from one
    pass that reads the text and tokenizes nothing; and how many documents the source has. None instead of the
    sample when the whole source is at most `max_chars` (tokenize it all). Each document gets a seeded random key
    and the documents of the smallest keys are kept (a bottom-k sample by characters), so memory stays at about
    `max_chars` whatever the source's size."""
    import heapq

    heap: list[tuple[int, int, str]] = []  # (-key, index, text): the largest kept key on top
    kept = total = count = 0
    for index, text in enumerate(read_texts(resolve_data_path(source), text_field)):
        count, total = index + 1, total + len(text)
        key = _document_key(seed, index)
        if kept + len(text) <= max_chars or (heap and key < -heap[0][0]):
            heapq.heappush(heap, (-key, index, text))
            kept += len(text)
            while kept > max_chars and len(heap) > 1:
                kept -= len(heapq.heappop(heap)[2])
    if total <= max_chars:
        return None, count
    return [text for _, _, text in sorted(heap, key=lambda item: item[1])], count


def _mapped_blocks(cache: Path) -> torch.Tensor | None:
    """The cached blocks, memory-mapped; None when the cache is absent or incomplete (its shape record missing, or
    a file whose size does not match it)."""
    try:
        meta = json.loads(cache.with_suffix(".json").read_text())
        rows, width = int(meta["rows"]), int(meta["seq_len"])
        if meta.get("dtype") != "int64" or rows <= 0 or cache.stat().st_size != rows * width * 8:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return torch.from_file(str(cache), shared=False, size=rows * width, dtype=torch.int64).view(rows, width)


def load_blocks(spec, tokenizer) -> Blocks:
    """Train and eval blocks for a `DataSpec`."""
    cache_dir = Path(spec.cache_dir) if spec.cache_dir else None
    train = packed_blocks(spec.train, tokenizer, seq_len=spec.seq_len, text_field=spec.text_field, max_tokens=spec.max_train_tokens, cache_dir=cache_dir)
    sources = {"train": str(resolve_data_path(spec.train))}
    if spec.eval is not None:
        held_out = packed_blocks(spec.eval, tokenizer, seq_len=spec.seq_len, text_field=spec.text_field, max_tokens=spec.max_eval_tokens, cache_dir=cache_dir)
        sources["eval"] = str(resolve_data_path(spec.eval))
    else:
        n_eval = max(1, round(len(train) * spec.eval_fraction))
        if n_eval >= len(train):
            raise DataSourceError(f"{spec.train}: only {len(train)} blocks of {spec.seq_len} tokens, too few to hold out an eval set")
        train, held_out = train[:-n_eval], train[-n_eval:]
        if spec.max_eval_tokens is not None:
            held_out = held_out[: max(1, spec.max_eval_tokens // spec.seq_len)]
        sources["eval"] = sources["train"]  # its last eval_fraction of blocks
    return Blocks(train=train, eval=held_out, sources=sources)


def batch_indices(n_blocks: int, step: int, micro: int, batch_size: int, grad_accum: int, seed: int) -> torch.Tensor:
    """Block indices of micro-batch `micro` of optimizer step `step` (0-based): a pure function of the
    position, so a resumed run reads exactly the batches the uninterrupted run would have read."""
    start = (step * grad_accum + micro) * batch_size
    epoch, offset = divmod(start, n_blocks)
    out = []
    while len(out) < batch_size:
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = order[offset : offset + batch_size - len(out)]
        out.extend(take.tolist())
        epoch, offset = epoch + 1, 0
    return torch.tensor(out, dtype=torch.int64)
