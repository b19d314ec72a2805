"""The variants `export_latency.py` times, one class per runtime: torch eager, our ONNX runtime loop
(compress_exporters.runtime), onnxruntime-genai. Each has prefill(ids) -> seconds, decode(ids, n) -> tokens per
second and (torch, ONNX) logits(ids) -> every position's logits, for the perplexity check."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


class TorchVariant:
    def __init__(self, name: str, path: str, threads: int):
        import torch

        from compress import models

        torch.set_num_threads(threads)
        self.torch = torch
        self.name, self.model = name, models.load_model(path).eval()

    def prefill(self, ids: list[int]) -> float:
        with self.torch.no_grad():
            t = time.perf_counter()
            # logits_to_keep=1: the last position only, as generate() does (the fused ONNX graph does the same)
            self.model(input_ids=self.torch.tensor([ids]), use_cache=True, logits_to_keep=1).logits[0, -1].argmax()
            return time.perf_counter() - t

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(input_ids=self.torch.tensor([ids])).logits[0].float().numpy()

    def decode(self, ids: list[int], n: int) -> float:
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            cache = getattr(out, "cache", None) or out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(n):
                out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
                cache = getattr(out, "cache", None) or out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
            return n / (time.perf_counter() - t)


class OnnxVariant:
    """compress_exporters.runtime's loop (IO binding; the shared KV buffer where the graph allows it)."""

    def __init__(self, name: str, path: Path, threads: int, spin: bool, share_kv: bool | None = None):
        from compress_exporters.runtime import OnnxCausalLM

        self.name, self.path = name, Path(path)
        self.lm = OnnxCausalLM.from_dir(path, threads=threads, share_kv=share_kv, spin=spin)

    def prefill(self, ids: list[int]) -> float:
        t = time.perf_counter()
        next(self.lm._token_stream(ids, 1, _argmax))
        return time.perf_counter() - t

    def logits(self, ids: list[int]) -> np.ndarray:
        """Every position's logits of one prefill (an empty past, no shared buffer)."""
        return self.lm.forward([ids], every_position=True)[0][0]

    def decode(self, ids: list[int], n: int) -> float:
        stream = self.lm._token_stream(ids, n + 1, _argmax)
        next(stream)  # the prefill, not timed
        t = time.perf_counter()
        count = sum(1 for _ in stream)
        return count / (time.perf_counter() - t)


class GenaiVariant:
    """onnxruntime-genai's own runtime on the builder's folder."""

    def __init__(self, name: str, path: Path, threads: int):
        import onnxruntime_genai as og

        self.og, self.name = og, name
        config = og.Config(str(path))
        # Its session options take thread counts but no config entries: spin-waiting is ORT GenAI's own choice.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def _generator(self, ids: list[int], new: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: list[int]) -> float:
        generator = self._generator(ids, 1)
        t = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        return time.perf_counter() - t

    def decode(self, ids: list[int], n: int) -> float:
        generator = self._generator(ids, n + 1)
        generator.append_tokens(ids)
        generator.generate_next_token()  # the token from the prefill, not timed
        t = time.perf_counter()
        count = 0
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        return count / (time.perf_counter() - t)


def _argmax(logits: np.ndarray) -> int:
    return int(logits.argmax())


def make_variant(kind: str, name: str, path, args):
    if kind == "torch":
        return TorchVariant(name, str(path), args.threads)
    if kind == "genai-runtime":
        return GenaiVariant(name, Path(path), args.threads)
    return OnnxVariant(name, Path(path), args.threads, args.spin, share_kv=True if kind == "builder" else None)
