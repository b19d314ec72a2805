"""The bench stage: `run_bench(spec, artifacts, output)` measures every artifact on the same windows and
prompts and writes results.json, report.md and plots into `output`.

Each finished measurement (one artifact's quality, one artifact's speed) is stored at once in
`output/.measurements.json` under a key made of the artifact's content hash and the settings that affect it,
so an interrupted or extended run redoes only what is missing or changed (`fresh=True` redoes everything).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from compress.artifacts import OutputKind, check_output, cpu_name, library_versions, settings_key, write_json_atomic
from compress.bench import report as report_md
from compress.bench.quality import measure_quality
from compress.bench.speed import measure_in_subprocess
from compress.bench.subjects import BenchInputError, count_parameters, inspect_artifact, load_tokenizer, open_subject, teacher_from_lineage, vocab_bytes, weight_bytes
from compress.data import packed_blocks
from compress.recipe import BenchSpec

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
MEASUREMENTS_FILE = ".measurements.json"
FORMAT_VERSION = 1
# The report folder is added to in place (finished measurements are reused), never replaced.
BENCH_FOLDER = OutputKind("compress bench folder", (RESULTS_FILE, MEASUREMENTS_FILE), replaced=False)
SPEED_KEYS = ("prompt_lengths", "new_tokens", "decode_prompt", "batch_sizes", "repeats", "warmup", "threads")


@dataclass(frozen=True)
class BenchReport:
    output: Path
    results: dict
    markdown: str
    measured: tuple[str, ...]  # "quality:LABEL" / "speed:LABEL" done in this call (the rest came from earlier runs)
    non_finite: dict[str, list[str]] = field(default_factory=dict)  # label -> metrics that were NaN/inf (null in results.json)



def _device(spec: BenchSpec) -> torch.device:
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("bench.device is cuda but torch sees no CUDA device")
    return torch.device("cuda" if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()) else "cpu")


NON_FINITE = "non_finite"


def finite_only(value, prefix: str = "") -> tuple:
    """`value` (JSON-able) with every NaN/inf number replaced by None, and the dotted paths of those numbers.
    (json writes them as bare NaN/Infinity, which is not JSON.)"""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [prefix]
    if isinstance(value, dict):
        out, bad = {}, []
        for key, item in value.items():
            out[key], found = finite_only(item, f"{prefix}.{key}" if prefix else str(key))
            bad += found
        return out, bad
    if isinstance(value, list):
        out, bad = [], []
        for i, item in enumerate(value):
            clean, found = finite_only(item, f"{prefix}.{i}" if prefix else str(i))
            out.append(clean)
            bad += found
        return out, bad
    return value, []


def _measurement(stored: dict | None) -> tuple[dict | None, list[str]]:
    """A stored measurement for results.json, and its non-finite metrics (flagged when it was stored, or found now
    in a store an older version wrote)."""
    if stored is None:
        return None, []
    value = dict(stored)
    flagged = list(value.pop(NON_FINITE, []))
    value, found = finite_only(value)
    return value, flagged + [f for f in found if f not in flagged]


def _check_labels(labels: list[str]) -> None:
    seen = {label for label in labels if labels.count(label) > 1}
    if seen:
        raise BenchInputError(f"two artifacts share the label(s) {sorted(seen)}; give distinct --label values")


def _check_vocab(infos, tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    for info in infos[1:]:
        if load_tokenizer(info).get_vocab() != vocab:
            raise BenchInputError(f"{info.label} ({info.name}) has a different vocabulary from {infos[0].label}: quality numbers would not be comparable")


def machine_info(device: torch.device, threads: int | None) -> dict:
    info = {"device": device.type, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads or torch.get_num_threads()}
    with contextlib.suppress(OSError):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def check_loadable(info) -> None:
    """Refuse, before the report folder is touched, an ONNX model that ONNX Runtime refuses (its session is created
    once here, on the CPU). Model folders were checked when they were inspected (compress.models.check_model_folder:
    damaged or cut-short safetensors files, config/weight mismatches, non-finite weights)."""
    if info.path is None or info.kind != "onnx":
        return
    from compress_exporters.runtime import OnnxCausalLM

    OnnxCausalLM.from_dir(info.path, threads=1)  # RuntimeLoadError names the file and ONNX Runtime's reason


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = library_versions()
    for name in ("onnxruntime", "onnxruntime-gpu", "bitsandbytes"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def run_bench(
    spec: BenchSpec,
    artifacts: list[str],
    output: str | Path,
    *,
    labels: list[str] | None = None,
    teacher: str | None = None,
    eval_default: str = "builtin:pydocs/eval",
    text_field: str = "text",
    cache_dir: Path | None = None,
    fresh: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BenchReport:
    """Measure `artifacts` (names or folders, any kind) and write the report into `output`. The teacher for
    KL/top-1 is `teacher`, else the one in the first artifact's lineage that has one, else none."""
    from tqdm.auto import tqdm

    if not artifacts:
        raise BenchInputError("give at least one artifact to benchmark")
    if labels is not None and len(labels) != len(artifacts):
        raise BenchInputError(f"{len(labels)} labels for {len(artifacts)} artifacts")
    output = Path(output)
    check_output(output, inputs=[*artifacts, teacher, spec.eval or eval_default], kind=BENCH_FOLDER)
    if spec.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchInputError("plots need matplotlib: pip install 'compress-llm[plots]' (or set bench.plots=false)") from None
    infos = [inspect_artifact(name, label) for name, label in zip(artifacts, labels or [None] * len(artifacts))]
    _check_labels([i.label for i in infos])
    if any(i.kind == "onnx" for i in infos):
        from compress_exporters.runtime import _ort

        _ort()  # a clear "install onnxruntime" before any measurement
    for info in infos:
        check_loadable(info)
    teacher_name = teacher or next((t for t in map(teacher_from_lineage, infos) if t), None)
    teacher_info = None
    if teacher_name and spec.quality:  # an artifact given by the same name is not inspected (hashed) twice
        teacher_info = next((i for i in infos if i.name == teacher_name), None)
        if teacher_info is None:
            teacher_info = inspect_artifact(teacher_name, "teacher")
            check_loadable(teacher_info)
    teacher_label = next((i.label for i in infos if teacher_info and i.sha256 == teacher_info.sha256), None)
    device = _device(spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    tokenizer = load_tokenizer(infos[0])
    _check_vocab(infos + ([teacher_info] if teacher_info else []), tokenizer)

    eval_source = spec.eval or eval_default
    windows = packed_blocks(eval_source, tokenizer, seq_len=spec.seq_len, text_field=text_field, max_tokens=spec.max_eval_tokens, cache_dir=cache_dir)
    windows_hash = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    # The folder appears with the first finished measurement (write_json_atomic creates it): a run that fails
    # before that leaves no empty report folder behind, and an existing one untouched.
    store_path = output / MEASUREMENTS_FILE
    store: dict = {} if fresh or not store_path.is_file() else json.loads(store_path.read_text())
    measured: list[str] = []

    def save(key: str, value: dict, label: str, what: str) -> None:
        value, bad = finite_only(value)
        if bad:  # stored as null with the flag, so that a rerun that reuses it reports it again
            value[NON_FINITE] = bad
            log(f"warning: {label}: non-finite {', '.join(f'{what}.{b}' for b in bad)} (NaN or inf: written as null in {RESULTS_FILE} and flagged; "
                "the model's outputs are not numbers, e.g. a NaN or inf weight)")
        store[key] = value
        write_json_atomic(store_path, store)

    quality_keys = {i.label: settings_key("quality", i.sha256, teacher_info and teacher_info.sha256, windows_hash, spec.seq_len) for i in infos}
    if spec.quality:
        pending = [i for i in infos if quality_keys[i.label] not in store]
        if pending:
            log(f"quality: {', '.join(i.label for i in pending)} on {windows.numel():,} tokens of {eval_source}" + (f", against {teacher_name}" if teacher_info else ""))
            # One model at a time (compress/bench/quality.py): the teacher's head inputs wait in a scratch folder
            # beside the report, removed when the pass ends.
            openers = {i.label: (lambda i=i: open_subject(i, device=device, threads=spec.threads)) for i in pending}
            open_teacher = (lambda: open_subject(teacher_info, device=device, threads=spec.threads)) if teacher_info else None
            bar = tqdm(total=None, desc="quality", unit="batch", disable=not progress, dynamic_ncols=True)

            def on_batch(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            output.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.teacher-") as scratch:
                quality = measure_quality(openers, windows, open_teacher=open_teacher, teacher_label=teacher_label, scratch=Path(scratch), on_batch=on_batch, log=log)
            bar.close()
            for label, value in quality.items():
                save(quality_keys[label], value, label, "quality")
                measured.append(f"quality:{label}")

    prompts = {
        "prefill": {n: windows[0, :n].tolist() for n in spec.prompt_lengths},
        "decode": [windows[i % len(windows), : spec.decode_prompt].tolist() for i in range(max(spec.batch_sizes))],
    }
    speed_settings = {k: getattr(spec, k) for k in SPEED_KEYS}
    speed_keys = {i.label: settings_key("speed", i.sha256, speed_settings, device.type, prompts) for i in infos}
    if spec.speed:
        pending = [i for i in infos if speed_keys[i.label] not in store]
        for n, info in enumerate(pending, 1):
            log(f"speed {n}/{len(pending)}: {info.label} ({info.kind}) in a fresh process: prefill {spec.prompt_lengths}, decode {spec.new_tokens} tokens at batch {spec.batch_sizes}, {spec.repeats} runs")
            start = time.perf_counter()
            value = measure_in_subprocess(info, prompts, spec.model_dump(mode="json"), device.type, on_line=(lambda line: log(f"  {info.label}: {line}")) if progress else (lambda _: None))
            value["wall_s"] = time.perf_counter() - start
            save(speed_keys[info.label], value, info.label, "speed")
            measured.append(f"speed:{info.label}")

    rows, non_finite = [], {}
    for i in infos:
        quality, bad_quality = _measurement(store.get(quality_keys[i.label])) if spec.quality else (None, [])
        speed, bad_speed = _measurement(store.get(speed_keys[i.label])) if spec.speed else (None, [])
        bad = [f"quality.{b}" for b in bad_quality] + [f"speed.{b}" for b in bad_speed]
        if bad:
            non_finite[i.label] = bad
        rows.append({
            "label": i.label,
            "name": i.name,
            "path": str(i.path) if i.path else None,
            "kind": i.kind,
            "sha256": i.sha256,
            "parameters": count_parameters(i.config),
            "size_bytes": weight_bytes(i.path),
            "vocab_bytes": vocab_bytes(i.path, (i.config or {}).get("vocab_size")),
            "quality": quality,
            "speed": speed,
            NON_FINITE: bad,
        })
    results = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(device, spec.threads),
        "versions": _versions(),
        "settings": {
            **spec.model_dump(mode="json"),
            "eval_data": eval_source,
            "eval_windows": len(windows),
            "eval_tokens": windows.numel(),
            "teacher": teacher_name if teacher_info else None,
        },
        "artifacts": rows,
    }
    output.mkdir(parents=True, exist_ok=True)
    results["plots"] = report_md.write_plots(results, output) if spec.plots else []
    write_json_atomic(output / RESULTS_FILE, results)
    markdown = report_md.render_markdown(results)
    tmp = output / f".{REPORT_FILE}.tmp"
    tmp.write_text(markdown)
    os.replace(tmp, output / REPORT_FILE)
    return BenchReport(output=output, results=results, markdown=markdown, measured=tuple(measured), non_finite=non_finite)
