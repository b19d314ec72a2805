"""Safetensors written piece by piece: one file per finished block while a model is processed, merged at the end
into Hugging Face's layout (`model.safetensors`, or `model-0000k-of-0000n.safetensors` + the index) without
holding more than one tensor in memory. Used by the block-at-a-time quantizer (`compress.quantize.sequential`).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
# Shards of at most this many bytes, as save_pretrained writes them (5 GB: under the Hub's per-file limits).
MAX_SHARD_BYTES = 5 * 10**9
_COPY_CHUNK = 64 * 2**20


def write_piece(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """`tensors` to the safetensors file `path`, atomically: a killed write leaves no file at `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
              torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_streamed(path: Path, tensors: dict[str, Callable[[], torch.Tensor]]) -> None:
    """A safetensors file of the tensors the callables give, each called twice (once for its shape, once for its
    bytes) and dropped before the next: memory stays at one tensor, whatever the file's size. Atomic as `write_piece`."""
    entries, offset = {}, 0
    for name, get in tensors.items():
        t = get()
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        del t
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for get in tensors.values():
            t = get().detach().contiguous().cpu().reshape(-1)
            if t.numel():
                fh.write(t.view(torch.uint8).numpy().tobytes())
            del t
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries of a safetensors file, where its data starts)."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def merge_pieces(pieces: list[Path], directory: Path, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """The tensors of `pieces` (safetensors files, disjoint names) rewritten into `directory` as `model.safetensors`,
    or as shards of at most `max_shard_bytes` with `model.safetensors.index.json` (a piece is never split), by
    copying byte ranges: memory stays at one copy buffer. Within a shard the tensors are ordered by element size,
    widest first, so every tensor starts aligned to its element size (as safetensors itself writes them)."""
    entries: list[tuple[Path, int, str, dict]] = []  # (piece, data start, name, entry), per piece
    groups: list[list[tuple[Path, int, str, dict]]] = [[]]
    size = 0
    for piece in pieces:
        header, start = read_header(piece)
        mine = [(piece, start, name, entry) for name, entry in header.items()]
        nbytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for *_, e in mine)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].extend(mine)
        size += nbytes
        entries.extend(mine)
    names = [name for _, _, name, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"tensor names repeat across the pieces {[p.name for p in pieces]}")
    if len(groups) == 1:
        files = [directory / "model.safetensors"]
    else:
        files = [directory / f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    weight_map, total = {}, 0
    for file, group in zip(files, groups):
        total += _write_shard(file, group)
        weight_map.update(dict.fromkeys((name for _, _, name, _ in group), file.name))
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


def _write_shard(file: Path, group: list[tuple[Path, int, str, dict]]) -> int:
    group = sorted(group, key=lambda item: (-_DTYPE_BYTES.get(item[3]["dtype"], 1), item[2]))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, _, name, entry in group:
        begin, end = entry["data_offsets"]
        header[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned (the format allows trailing spaces)
    sources: dict[Path, object] = {}
    try:
        with open(file, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for piece, start, _, entry in group:
                fh = sources.get(piece) or sources.setdefault(piece, open(piece, "rb"))  # noqa: SIM115 - closed below
                begin, end = entry["data_offsets"]
                fh.seek(start + begin)
                left = end - begin
                while left:
                    chunk = fh.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise OSError(f"{piece} ends before tensor data it declares")
                    out.write(chunk)
                    left -= len(chunk)
            out.flush()
            os.fsync(out.fileno())
    finally:
        for fh in sources.values():
            fh.close()
    return offset
