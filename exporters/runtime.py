"""Run an exported ONNX folder with ONNX Runtime alone: no torch, no transformers (numpy, onnxruntime,
tokenizers, json). For apps that ship a model made by `compress export`:

    from compress_exporters.runtime import OnnxCausalLM
    lm = OnnxCausalLM.from_dir("runs/onnx-int4", threads=2)
    print(lm.generate("The capital of France is", max_new_tokens=20).text)
    for piece in lm.stream("Once upon a time", max_new_tokens=50): print(piece, end="", flush=True)

Generation prefills the prompt with an empty KV cache, then feeds one token per step. Inputs and outputs go
through an IO binding: the fused graph's KV cache is one preallocated buffer per layer that GroupQueryAttention
updates in place (past and present bound to the same memory); other graphs get their returned cache back as
OrtValues, never copied through numpy.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from compress.errors import CompressError

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
PREFILL_CHUNK = 128
KV_CACHE_KEY = "compress.kv_cache"  # model metadata written by compress_exporters.graph
KEEP_KEY = "compress.logits_to_keep_initializer"  # metadata naming the graph's last-N-logits initializer


class RuntimeLoadError(CompressError, ValueError):
    """The folder is not a loadable ONNX export."""


class ProviderUnavailableError(CompressError, RuntimeError):
    """An execution provider was asked for and ONNX Runtime did not give it."""


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeLoadError("onnxruntime is not installed: pip install 'compress-llm[onnx]' (CPU) or 'compress-llm[onnx-gpu]' (CUDA), not both") from None
    return onnxruntime


def session_options(threads: int | None = None, spin: bool = False):
    """Threads pinned when given, and no spin-waiting by default: a spinning pool starves other work on a small
    CPU. `spin=True` saves the thread wake-ups between ops (lower latency on a machine with nothing else to run)."""
    ort = _ort()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def _last_logits_model(path: Path):
    """The model at `path` as bytes with its logits-to-keep initializer (compress_exporters.graph) set to 1, so
    every run computes the last position's logits only; None when the graph has none or the onnx package is
    missing (then the file loads as it is)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)  # external weights stay on disk, read by ONNX Runtime
    except Exception:  # a damaged file: ONNX Runtime loads it as it is and names what is wrong
        return None
    name = next((p.value for p in model.metadata_props if p.key == KEEP_KEY), None)
    found = [t for t in model.graph.initializer if t.name == name] if name else []
    if len(found) != 1 or any(i.name == name for i in model.graph.input):
        return None
    found[0].CopyFrom(numpy_helper.from_array(np.asarray(1, np.int64), name))
    return model.SerializeToString()


def create_session(path: str | Path, providers: Sequence | None = None, threads: int | None = None, spin: bool = False, *, last_logits_only: bool = False):
    """An InferenceSession that really runs on `providers` (default CPU). ONNX Runtime quietly falls back to
    CPU when e.g. CUDA libraries are missing; here that is an error naming what was asked and what was got.
    `last_logits_only`: load a graph written by `compress export` so that each run returns the last position's
    logits only (`session.compress_last_logits_only` says whether that applied)."""
    ort = _ort()
    providers = list(providers or ["CPUExecutionProvider"])
    wanted = [p if isinstance(p, str) else p[0] for p in providers]
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise ProviderUnavailableError(
            f"ONNX Runtime here offers {available}, not {missing}; for CUDA install onnxruntime-gpu "
            "(pip install 'compress-llm[onnx-gpu]', after uninstalling onnxruntime) with its CUDA and cuDNN libraries"
        )
    options = session_options(threads, spin)
    try:
        source = _last_logits_model(Path(path)) if last_logits_only else None
        if source is not None:  # bytes: external data is found relative to the file's folder
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(path).parent))
        session = ort.InferenceSession(str(path) if source is None else source, sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) derive from Exception only
        raise RuntimeLoadError(
            f"ONNX Runtime cannot load {path}: {_reason(err)}. The file is damaged or not an ONNX model "
            "(a copy cut short, or overwritten): export it again with `compress export`"
        ) from None
    lost = [p for p in wanted if p not in session.get_providers()]
    if lost:
        raise ProviderUnavailableError(
            f"asked for {wanted} but the session runs on {session.get_providers()}: {lost} failed to initialise "
            "(for CUDA: check that the CUDA and cuDNN versions onnxruntime-gpu was built for are installed)"
        )
    session.compress_last_logits_only = source is not None
    return session


def _reason(err: BaseException) -> str:
    """ONNX Runtime's message on one line, without its "[ONNXRuntimeError] : 7 :" prefix."""
    lines = str(err).strip().splitlines()
    line = lines[0].strip() if lines else type(err).__name__
    return re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*", "", line)


@dataclass(frozen=True)
class Generation:
    text: str  # the generated text, special tokens left out
    token_ids: list[int]  # generated tokens, the stop token included when one ended generation
    prompt_ids: list[int]
    finish_reason: str  # "stop" (a stop token), "length" (max_new_tokens or the context length)


@dataclass
class _Sampler:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def __call__(self, logits: np.ndarray) -> int:
        if not self.do_sample:
            return int(np.argmax(logits))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < z.size:
            z[z < np.partition(z, -self.top_k)[-self.top_k]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < self.top_p  # the smallest head whose mass reaches top_p
            cut = np.zeros_like(p)
            cut[order[keep]] = p[order[keep]]
            p = cut / cut.sum()
        return int(self.rng.choice(p.size, p=p))


class OnnxCausalLM:
    """A decoder exported by `compress export` (inputs input_ids, attention_mask, position_ids,
    past_key_values.{i}.key/value; outputs logits, present.{i}.key/value) and its tokenizer."""

    def __init__(self, session, tokenizer, *, eos_ids: Iterable[int] = (), context_length: int | None = None, directory: Path | None = None, share_kv: bool | None = None):
        self.session = session
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.context_length = context_length
        self.directory = directory
        inputs = {i.name: i for i in session.get_inputs()}
        self._past = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_order)
        if not self._past or not {"input_ids", "attention_mask"} <= set(inputs):
            raise RuntimeLoadError(f"{directory or 'the model'} lacks the inputs of a KV-cache decoder (input_ids, attention_mask, past_key_values.*)")
        self._has_positions = "position_ids" in inputs
        # A fused graph loaded by create_session(last_logits_only=True): a prefill computes the last logits only.
        self._keeps_last = bool(getattr(session, "compress_last_logits_only", False))
        # Where the KV cache lives between steps: on the session's device (CUDA: never copied to the host). The
        # logits come to host memory, where the next token is picked (one row of vocab floats per step).
        self.kv_device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._outputs = ["logits"] + [n.replace("past_key_values.", "present.") for n in self._past]
        self._past_shape = {n: inputs[n].shape for n in self._past}
        self._past_dtype = {n: np.float16 if "float16" in inputs[n].type else np.float32 for n in self._past}
        # The fused graph (compress_exporters.graph) marks that past and present may share one buffer.
        # `share_kv=True` asserts it for another GroupQueryAttention graph (e.g. onnxruntime-genai's builder).
        marked = session.get_modelmeta().custom_metadata_map.get(KV_CACHE_KEY) == "gqa-shareable"
        self.kv_shareable = marked if share_kv is None else bool(share_kv)
        self.prefill_chunk = PREFILL_CHUNK  # prompt tokens per run before the last chunk (shared-cache graphs); 0 = one run
        self._load = None  # (path, providers, threads, spin) when loaded by from_dir: the every-position session is made on demand
        self._every_position = None

    @classmethod
    def from_dir(cls, path: str | Path, providers: Sequence | None = None, threads: int | None = None, share_kv: bool | None = None, spin: bool = False) -> "OnnxCausalLM":
        directory = Path(path)
        model = directory / MODEL_FILE
        if not model.is_file():
            raise RuntimeLoadError(f"{directory}: no {MODEL_FILE}; point at a folder written by `compress export`")
        if not (directory / TOKENIZER_FILE).is_file():
            raise RuntimeLoadError(f"{directory}: no {TOKENIZER_FILE} (a fast tokenizer); re-export from a model with a fast tokenizer")
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
            raise RuntimeLoadError(f"{directory / TOKENIZER_FILE} is not a readable tokenizer ({_reason(err)}); re-export the folder with `compress export`") from None
        for name in ("genai_config.json", "config.json", "generation_config.json"):  # read later, step by step
            path = directory / name
            if path.is_file():
                try:
                    json.loads(path.read_bytes().decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise RuntimeLoadError(f"{path} is not readable JSON ({err}); it is truncated or corrupt: re-export the folder with `compress export`") from None
        eos, context = _read_eos_and_context(directory)
        lm = cls(create_session(model, providers, threads, spin, last_logits_only=True), tokenizer, eos_ids=eos, context_length=context, directory=directory, share_kv=share_kv)
        lm._load = (model, providers, threads, spin)
        return lm

    def _kv_dims(self, name: str) -> tuple:
        """(batch, kv_heads, length, head_dim) of a past input; symbolic head counts or sizes (some graphs name
        them) are read from genai_config.json."""
        shape = list(self._past_shape[name])
        if not all(isinstance(d, int) for d in shape[1::2]):
            decoder = json.loads((Path(self.directory or ".") / "genai_config.json").read_text())["model"]["decoder"]
            shape[1], shape[3] = decoder["num_key_value_heads"], decoder["head_size"]
        return tuple(shape)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """An empty KV cache (length 0) for a first run of `batch` rows."""
        dims = {n: self._kv_dims(n) for n in self._past}
        return {n: np.zeros((batch, d[1], 0, d[3]), self._past_dtype[n]) for n, d in dims.items()}

    def forward(self, input_ids, attention_mask=None, past: dict | None = None, *, every_position: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One plain run (no IO binding, no shared buffer): `input_ids` (batch, new), `attention_mask` (batch,
        past + new; default all ones, 0 = a left pad), `past` a returned cache (default empty). Positions follow
        the mask, as transformers and optimum number them. Returns (logits, present): logits (batch, 1, vocab) for
        a graph loaded for the last logits only, else (batch, new, vocab); `every_position=True` always returns
        every position's, from the graph as written (a second session, made on first use)."""
        ids = np.asarray(input_ids, np.int64)
        batch, new = ids.shape
        past = self.empty_past(batch) if past is None else past
        past_len = next(iter(past.values())).shape[2]
        mask = np.ones((batch, past_len + new), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if mask.shape != (batch, past_len + new):
            raise ValueError(f"attention_mask has shape {mask.shape}; expected (batch, past + new) = {(batch, past_len + new)}")
        feeds = {"input_ids": ids, "attention_mask": mask, **past}
        if self._has_positions:
            feeds["position_ids"] = np.clip(mask.cumsum(-1) - 1, 0, None)[:, past_len:]
        session = self.session
        if every_position and self._keeps_last:
            session = self._every_position_session()
        logits, *present = session.run(self._outputs, feeds)
        return logits, dict(zip(self._past, present))

    def _every_position_session(self):
        if self._every_position is None:
            if self._load is None:
                raise RuntimeLoadError("this session was loaded for the last logits only; load the folder with OnnxCausalLM.from_dir for every position's logits")
            path, providers, threads, spin = self._load
            self._every_position = create_session(path, providers, threads, spin)
        return self._every_position

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_tokens: Iterable[int | str] | None = None) -> Generation:
        """Greedy by default (matches transformers' generate(do_sample=False)). `stop_tokens`: ids or token
        strings ending generation; None = the model's EOS tokens, [] = run to max_new_tokens."""
        prompt_ids = self._prompt_ids(prompt)
        tokens: list[int] = []
        reason = "length"
        stop = self._stop_set(stop_tokens)
        for token in self._token_stream(prompt_ids, max_new_tokens, _Sampler(do_sample, temperature, top_k, top_p, np.random.default_rng(seed))):
            tokens.append(token)
            if token in stop:
                reason = "stop"
                break
        return Generation(text=self.decode(tokens), token_ids=tokens, prompt_ids=prompt_ids, finish_reason=reason)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 64, **kwargs) -> Iterator[str]:
        """The text of `generate`, piece by piece as tokens arrive (a piece waits while a character's bytes
        are split across tokens)."""
        stop = self._stop_set(kwargs.pop("stop_tokens", None))
        sampler = _Sampler(kwargs.pop("do_sample", False), kwargs.pop("temperature", 1.0), kwargs.pop("top_k", 0), kwargs.pop("top_p", 1.0), np.random.default_rng(kwargs.pop("seed", None)))
        if kwargs:
            raise TypeError(f"stream() got unexpected arguments {sorted(kwargs)}")
        tokens: list[int] = []
        emitted = ""
        for token in self._token_stream(self._prompt_ids(prompt), max_new_tokens, sampler):
            tokens.append(token)
            text = self.decode(tokens)
            if not text.endswith("\ufffd") and text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
            if token in stop:
                break
        text = self.decode(tokens)
        if text.startswith(emitted) and len(text) > len(emitted):
            yield text[len(emitted):]  # a trailing piece that never completed a character

    def greedy_tokens(self, prompt_ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy next tokens one by one, never stopping early (what `compress bench` times: the first comes
        after the prefill, each later one after one decode step)."""
        return self._token_stream(self._prompt_ids(prompt_ids), max_new_tokens, lambda logits: int(np.argmax(logits)))

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        return ids

    def _stop_set(self, stop_tokens) -> frozenset[int]:
        if stop_tokens is None:
            return self.eos_ids
        ids = set()
        for token in stop_tokens:
            if isinstance(token, str):
                found = self.tokenizer.token_to_id(token)
                if found is None:
                    raise ValueError(f"stop token {token!r} is not in the vocabulary")
                ids.add(found)
            else:
                ids.add(int(token))
        return frozenset(ids)

    def _token_stream(self, prompt_ids: list[int], max_new_tokens: int, pick: Callable[[np.ndarray], int]) -> Iterator[int]:
        n = len(prompt_ids)
        budget = max_new_tokens if self.context_length is None else min(max_new_tokens, self.context_length - n)
        if budget <= 0:
            return
        ort = _ort()
        cache = _SharedKVCache(self, n + budget) if self.kv_shareable else _ReturnedKVCache(self)
        binding = self.session.io_binding()
        # Bindings persist between runs. A CPU OrtValue made from a numpy array reads and writes that array's
        # memory, so the decode inputs (one token, its position) are bound once and then only overwritten, the
        # mask is a view of one preallocated row of ones, and every run that yields one position's logits (a
        # decode step, or any run of a graph loaded for the last logits only) writes them into one bound (1, 1, vocab)
        # array. With a shared cache a decode step then crosses from Python to ONNX Runtime once, with nothing
        # allocated or copied around it. Outputs come back in the order of first binding: logits first.
        logits = _Logits(self, binding)
        cache.bind(binding)
        ones = np.ones((1, n + budget), np.int64)
        done = self._prefill_chunks(binding, prompt_ids, ones, logits) if self.kv_shareable else 0
        tokens = np.asarray([prompt_ids[done:]], np.int64)
        positions = np.arange(done, n, dtype=np.int64)[None]
        for step in range(budget):
            if step <= 1:  # the prompt's last chunk, then the one-token inputs that every later step overwrites
                binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(tokens))
                if self._has_positions:
                    binding.bind_ortvalue_input("position_ids", ort.OrtValue.ortvalue_from_numpy(positions))
            binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(ones[:, :n]))
            buffered = logits.bind(tokens.shape[1])
            self.session.run_with_iobinding(binding)
            outputs = None if (buffered and self.kv_shareable) else binding.get_outputs()  # logits first
            row = logits.buffer[0, -1] if buffered else outputs[0].numpy()[0, -1]
            token = pick(row.astype(np.float32, copy=False))
            yield token
            if outputs is not None:
                cache.advance(binding, outputs[1:])
            if step == 0:
                tokens, positions = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
            tokens[0, 0], positions[0, 0] = token, n
            n += 1

    def _prefill_chunks(self, binding, prompt_ids: list[int], ones: np.ndarray, logits: "_Logits") -> int:
        """Run all but the last `prefill_chunk` tokens of a long prompt in chunks, writing the shared cache; returns
        how many ran. GroupQueryAttention's prompt path computes every query against every key and masks the
        upper triangle; chunk by chunk, a query only meets the keys before its chunk's end (about half the work
        for long prompts, measured in exporters/README.md)."""
        chunk, done = self.prefill_chunk, 0
        while chunk and len(prompt_ids) - done > chunk:
            end = done + chunk
            binding.bind_cpu_input("input_ids", np.asarray([prompt_ids[done:end]], np.int64))
            binding.bind_cpu_input("attention_mask", ones[:, :end])
            if self._has_positions:
                binding.bind_cpu_input("position_ids", np.arange(done, end, dtype=np.int64)[None])
            logits.bind(end - done)
            self.session.run_with_iobinding(binding)
            done = end
        return done


class _Logits:
    """Where a run writes its logits: one preallocated (1, 1, vocab) array, bound once, for runs that return a
    single position (one input token, or a graph loaded for the last logits only); otherwise an output ONNX Runtime allocates."""

    def __init__(self, lm: "OnnxCausalLM", binding):
        output = lm.session.get_outputs()[0]
        vocab = output.shape[-1]
        self.buffer = np.zeros((1, 1, vocab), np.float16 if "float16" in output.type else np.float32) if isinstance(vocab, int) else None
        self._keeps_last = lm._keeps_last
        self._binding = binding
        self._bound: bool | None = None
        binding.bind_output("logits", "cpu")  # bound first, so always the first of get_outputs()

    def bind(self, positions: int) -> bool:
        """Bind for a run over `positions` input tokens; returns whether the logits land in `buffer`."""
        use = self.buffer is not None and (positions == 1 or self._keeps_last)
        if use and not self._bound:
            self._binding.bind_ortvalue_output("logits", _ort().OrtValue.ortvalue_from_numpy(self.buffer))
        elif not use:  # an output bound to a device keeps the last run's shape: bind again for a new one
            self._binding.bind_output("logits", "cpu")
        self._bound = use
        return use


class _SharedKVCache:
    """One preallocated buffer per past tensor, bound as both past_key_values.* and present.*: the fused graph's
    GroupQueryAttention writes each step's keys and values in place, so nothing is copied between steps."""

    def __init__(self, lm: "OnnxCausalLM", max_length: int):
        ort = _ort()
        self._pairs = []
        for name in lm._past:
            _, heads, _, dim = lm._kv_dims(name)
            buffer = ort.OrtValue.ortvalue_from_shape_and_type((1, heads, max_length, dim), lm._past_dtype[name], lm.kv_device, 0)
            self._pairs.append((name, name.replace("past_key_values.", "present."), buffer))

    def bind(self, binding) -> None:
        for past, present, buffer in self._pairs:
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)

    def advance(self, binding, present) -> None:
        pass  # written in place, bound once


class _ReturnedKVCache:
    """A graph whose present.* is a new tensor (past + this step): each step's present OrtValues are bound as
    the next step's past, without passing through numpy."""

    def __init__(self, lm: "OnnxCausalLM"):
        ort = _ort()
        self._names = [(name, name.replace("past_key_values.", "present.")) for name in lm._past]
        self._device = lm.kv_device
        self._past = [ort.OrtValue.ortvalue_from_numpy(empty, self._device, 0) for empty in lm.empty_past(1).values()]  # in lm._past order

    def bind(self, binding) -> None:
        for (past, present), value in zip(self._names, self._past):
            binding.bind_ortvalue_input(past, value)
            binding.bind_output(present, self._device)

    def advance(self, binding, present) -> None:
        for (past, name), value in zip(self._names, present):
            binding.bind_ortvalue_input(past, value)
            binding.bind_output(name, self._device)


def _layer_order(name: str) -> tuple[int, str]:
    _, index, kind = name.split(".")
    return int(index), kind


def _read_eos_and_context(directory: Path) -> tuple[list[int], int | None]:
    eos: list[int] = []
    context = None
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file() and not eos:
            value = json.loads(path.read_text()).get("eos_token_id")
            eos = [value] if isinstance(value, int) else list(value or [])
    genai = directory / "genai_config.json"
    if genai.is_file():
        context = json.loads(genai.read_text()).get("model", {}).get("context_length")
    return eos, context
