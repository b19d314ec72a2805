"""`compress run`: one recipe from teacher to a benchmarked model. `run_recipe(recipe)` checks the whole chain
before any compute, then runs distill -> quantize -> export -> bench (the sections the recipe has), each
writing its artifact under the run folder, and composes the same stage functions the single commands call.

`<run_dir>/run.json` records, per stage, a key over what the stage depends on (its recipe sections and the
content hash of its input artifact) and the hash of what it wrote. On `--resume` a stage whose artifact is
complete, unmodified and whose key is unchanged is skipped; an interrupted distillation continues from its
last checkpoint; a stage whose inputs changed is redone, and so is everything after it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from compress.artifacts import ARTIFACT, FOLDER, RECORD_FILE, check_output, hash_path, settings_key, size_on_disk, write_json_atomic
from compress.errors import CompressError
from compress.recipe import BnbSpec, GPTQSpec, Recipe

RUN_FILE = "run.json"
STAGES = ("distill", "quantize", "export", "teacher-quantize", "teacher-export", "bench")
# The teacher's own quantized (and exported) copy, benched beside the student: does distillation pay?
_TEACHER_STAGES = {"teacher-quantize": "quantize", "teacher-export": "export"}


class RunPlanError(CompressError, ValueError):
    """The recipe's chain cannot finish; the message names the conflict and what to change."""


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    artifact: Path
    skipped: bool
    seconds: float


@dataclass
class RunResult:
    run_dir: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    report: str | None = None


def stage_outputs(recipe: Recipe) -> dict[str, Path]:
    """Where each of the recipe's stages writes, under the run folder."""
    run = recipe.run_dir
    outputs = {"distill": run / "student"}
    q = recipe.quantize
    if q is not None:
        outputs["quantize"] = run / (q.method if isinstance(q, BnbSpec) else f"{q.method}-{q.bits}bit")
    if recipe.export is not None:
        outputs["export"] = run / f"onnx-{recipe.export.weights}"
    if recipe.bench is not None and recipe.bench.teacher_baseline and q is not None:
        outputs["teacher-quantize"] = run / f"teacher-{outputs['quantize'].name}"
        if recipe.export is not None:
            outputs["teacher-export"] = run / f"teacher-{outputs['export'].name}"
    if recipe.bench is not None:
        outputs["bench"] = run / "bench"
    return outputs


def check_chain(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, overwrite_any: bool = False, source: str = "the recipe") -> None:
    """Refuse, before any compute, a recipe whose stages cannot all finish or whose outputs may not be written."""
    problems = []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        recipe_arg = source if source != "the recipe" else "RECIPE"
        problems.append(
            f"compress run is single-process, and this is a {world}-process launch. Run the two parts instead: "
            f"`accelerate launch --num_processes {world} -m compress.cli distill {recipe_arg}` (distill.parallel: fsdp shards the student and the teacher over the processes), "
            f"then `compress run {recipe_arg} --resume` (with the same --set overrides, if any), which finds the distillation finished and runs the stages after it in one process")
    q, e = recipe.quantize, recipe.export
    if q is not None and e is not None:
        if isinstance(q, BnbSpec):
            problems.append(
                f"quantize.method {q.method} is followed by export: bitsandbytes layers do not export to ONNX. "
                "Use quantize.method gptq (exported as int4/int8 MatMulNBits with its own weights), or drop quantize: "
                "and export the float student with export.weights int4/int8, or drop export:"
            )
        else:
            wanted = {4: "int4", 8: "int8"}.get(q.bits)
            if wanted is None:
                problems.append(f"quantize.bits {q.bits} cannot be exported: ONNX MatMulNBits carries 4- and 8-bit {q.method} weights; use bits 4 or 8, or drop export:")
            elif e.weights != wanted:
                problems.append(f"export.weights {e.weights} does not match quantize.bits {q.bits}: a {q.bits}-bit {q.method} model exports as {wanted} (its own codes, no re-rounding); set export.weights: {wanted}")
            if q.group_size not in (-1, "auto") and q.group_size % 16:
                problems.append(f"quantize.group_size {q.group_size} cannot be carried by MatMulNBits (blocks of 16/32/64/128 columns); use -1 or a multiple of 16")
    if recipe.student.config and "vocab_size" in recipe.student.config:
        problems.append("student.config.vocab_size: the student must keep the teacher's vocabulary (distillation compares distributions token by token)")
    problems += _check_packages(recipe)
    problems += _check_models(recipe)
    if problems:
        raise RunPlanError(f"{source} cannot run:\n  - " + "\n  - ".join(problems))
    run = recipe.run_dir
    if run.exists() and any(run.iterdir()) and not (resume or overwrite):
        raise RunPlanError(f"{run} already exists; pass --resume to continue it (finished stages with unchanged inputs are skipped) or --overwrite to start over")
    problems = _check_outputs(recipe, overwrite_any=overwrite_any)
    if problems:
        raise RunPlanError(f"{source} cannot run:\n  - " + "\n  - ".join(problems))


def _check_outputs(recipe: Recipe, *, overwrite_any: bool) -> list[str]:
    """The run folder and each stage's output, as the stage itself will check it (compress.artifacts.check_output).
    The run replaces its own stage artifacts on --resume and --overwrite alike; a folder compress did not
    write in a stage's place needs --overwrite-any. Nothing may be, contain or lie inside an input."""
    from compress.bench.stage import BENCH_FOLDER
    from compress.distill.loop import distill_inputs

    model_inputs, reads = distill_inputs(recipe)
    reads += [recipe.quantize.calib.source if isinstance(recipe.quantize, GPTQSpec) else None, recipe.bench and recipe.bench.eval]
    # Estimate: the student is at most the teacher's size; each later stage checks its own input's size.
    checks = [(recipe.run_dir, dict(inputs=model_inputs, expected_bytes=size_on_disk(model_inputs[0]), kind=FOLDER))]
    for stage, output in stage_outputs(recipe).items():
        checks.append((output, dict(inputs=reads, overwrite=True, overwrite_any=overwrite_any, kind=BENCH_FOLDER if stage == "bench" else ARTIFACT)))
    problems = []
    for output, kwargs in checks:
        try:
            check_output(output, **kwargs)
        except CompressError as err:
            problems.append(str(err))
    return problems


def _check_packages(recipe: Recipe) -> list[str]:
    import torch

    problems = []
    devices = {"distill": recipe.distill.device, "quantize": recipe.quantize and recipe.quantize.device, "bench": recipe.bench and recipe.bench.device}
    for stage, device in devices.items():
        if device == "cuda" and not torch.cuda.is_available():
            problems.append(f"{stage}.device is cuda but torch sees no CUDA device")
    if isinstance(recipe.quantize, BnbSpec):
        try:
            from compress.quantize.bnb import require_bnb

            require_bnb()
        except CompressError as err:
            problems.append(f"quantize.method {recipe.quantize.method}: {err}")
    if recipe.export is not None:
        try:
            import onnxruntime
        except ImportError:
            problems.append("export: needs onnx and onnxruntime: pip install 'compress-llm[onnx]'")
        else:
            if recipe.export.device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                problems.append(f"export.device cuda needs onnxruntime-gpu; this onnxruntime offers {onnxruntime.get_available_providers()}")
    if recipe.bench is not None and recipe.bench.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            problems.append("bench.plots needs matplotlib: pip install 'compress-llm[plots]' (or set bench.plots: false)")
    return problems


def _check_models(recipe: Recipe) -> list[str]:
    """Architecture and vocabulary, from configs and tokenizers only (no weights loaded)."""
    from compress import models
    from compress.architectures import layer_layout

    t = recipe.teacher
    try:
        config = models.load_config(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
        layer_layout(config)
    except CompressError as err:
        return [f"teacher.model: {err}"]
    except OSError as err:
        return [f"teacher.model {t.model!r}: {err}"]
    e = recipe.export
    if e is not None and e.exporter == "fused":
        from types import SimpleNamespace

        from compress_exporters.build import fused_refusal, rope_type

        heads = getattr(config, "num_attention_heads", 1)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        why = fused_refusal(SimpleNamespace(model_type=config.model_type, head_dim=int(head_dim), rope_type=rope_type(config)), e.weights, e.int8_method, e.device)
        if why:
            return [f"export.exporter fused: {why}; use export.exporter auto (it falls back to torch.onnx)"]
    try:
        from compress.distill.loop import check_student

        check_student(recipe)
    except CompressError as err:
        return [str(err)]
    if recipe.student.model:
        try:
            teacher_vocab = models.load_tokenizer(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code).get_vocab()
            if models.load_tokenizer(recipe.student.model, trust_remote_code=recipe.student.trust_remote_code).get_vocab() != teacher_vocab:
                return [f"student.model {recipe.student.model} and teacher.model {t.model} have different vocabularies: distillation needs the same tokenizer"]
        except CompressError as err:
            return [f"student.model: {err}"]
    return []



def stage_key(recipe: Recipe, stage: str, input_sha: str | None) -> str:
    """What a stage's output depends on: its recipe sections and its input artifact's content."""
    r = recipe.model_dump(mode="json")
    sections = {
        "distill": ("seed", "teacher", "student", "data", "distill"),
        "quantize": ("seed", "data", "quantize"),
        "export": ("export",),
    }[stage]
    return settings_key(stage, {s: r[s] for s in sections}, input_sha)


class _RunState:
    """`run.json`: per stage its key, status and the hash of what it wrote."""

    def __init__(self, run_dir: Path, fresh: bool):
        self.path = run_dir / RUN_FILE
        self.data = {"stages": {}} if fresh or not self.path.is_file() else json.loads(self.path.read_text())

    def finished_hash(self, stage: str, key: str, output: Path) -> str | None:
        """The content hash of `output` when the stage finished with this key and the folder is as it wrote it."""
        entry = self.data["stages"].get(stage, {})
        if entry.get("status") != "done" or entry.get("key") != key or not (output / RECORD_FILE).is_file():
            return None
        sha = hash_path(output)
        return sha if sha == entry.get("sha256") else None

    def started_with(self, stage: str) -> str | None:
        return self.data["stages"].get(stage, {}).get("key")

    def mark(self, stage: str, key: str, status: str, output: Path, sha: str | None = None) -> None:
        self.data["stages"][stage] = {"key": key, "status": status, "output": str(output), "sha256": sha, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json_atomic(self.path, self.data)


def run_recipe(
    recipe: Recipe, *, resume: bool = False, overwrite: bool = False, overwrite_any: bool = False, progress: bool = True,
    recipe_file: str | None = None, log: Callable[[str], None] = print,
) -> RunResult:
    """Check the chain, then run or skip each stage in order; returns what was done and the bench report."""
    overwrite = overwrite or overwrite_any
    check_chain(recipe, resume=resume, overwrite=overwrite, overwrite_any=overwrite_any, source=recipe_file or "the recipe")
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    outputs = stage_outputs(recipe)
    state = _RunState(run_dir, fresh=overwrite)
    result = RunResult(run_dir)
    artifacts: list[tuple[str, str]] = [("teacher", recipe.teacher.model)]
    # Two chains: teacher -> distill -> quantize -> export, and teacher -> teacher-quantize -> teacher-export.
    chains = {"student": [recipe.teacher.model, None, overwrite], "teacher": [recipe.teacher.model, None, overwrite]}  # previous path, its sha, upstream changed
    for stage in STAGES:
        if stage not in outputs:
            continue
        output = outputs[stage]
        start = time.perf_counter()
        if stage == "bench":
            report = _bench(recipe, artifacts, output, fresh=overwrite, progress=progress, log=log)
            result.report = report.markdown
            result.outcomes.append(StageOutcome(stage, output, skipped=not report.measured, seconds=time.perf_counter() - start))
            continue
        chain = chains["teacher" if stage in _TEACHER_STAGES else "student"]
        kind = _TEACHER_STAGES.get(stage, stage)
        previous, input_sha, upstream_changed = chain
        key = stage_key(recipe, kind, input_sha) if stage == kind else settings_key(stage, stage_key(recipe, kind, input_sha), recipe.teacher.model_dump(mode="json"))
        finished = None if upstream_changed else state.finished_hash(stage, key, output)
        if finished:
            log(f"{stage}: {output} is up to date (same recipe sections and inputs): skipped")
            input_sha = finished
        else:
            interrupted = state.started_with(stage) == key and not (output / RECORD_FILE).is_file()
            redo = output.exists() or (state.started_with(stage) not in (None, key))
            if redo and not upstream_changed:
                log(f"{stage}: the recipe or the input changed since {output} was written: redoing it")
            state.mark(stage, key, "running", output)
            _run_stage(kind, recipe, previous, output, resume=interrupted and not overwrite, overwrite_any=overwrite_any, progress=progress, recipe_file=recipe_file, log=log)
            upstream_changed = True
            input_sha = hash_path(output)
            state.mark(stage, key, "done", output, input_sha)
        chain[:] = [str(output), input_sha, upstream_changed]
        if not (stage == "teacher-quantize" and "teacher-export" in outputs):  # of the teacher's copies, only the last is benched
            artifacts.append((output.name, str(output)))  # the report labels rows by folder: student, gptq-4bit, onnx-int4, teacher-onnx-int4
        result.outcomes.append(StageOutcome(stage, output, finished is not None, time.perf_counter() - start))
    return result


def _run_stage(stage: str, recipe: Recipe, previous: str, output: Path, *, resume: bool, overwrite_any: bool, progress: bool, recipe_file, log) -> None:
    if stage == "distill":
        from compress.distill.loop import run_distill

        if resume:
            log("distill: continuing from the last checkpoint of the interrupted run")
        r = run_distill(recipe, resume=resume, overwrite=not resume, overwrite_any=overwrite_any, progress=progress, recipe_file=recipe_file)
        ev = r.metrics["eval"]
        log(f"distill: {r.artifact}: eval ppl {ev['student_ppl']:.2f} (teacher {ev['teacher_ppl']:.2f}), top-1 agreement {ev['top1_agreement']:.1%}")
    elif stage == "quantize":
        from compress.quantize.stage import describe, run_quantize

        log(describe(run_quantize(recipe, previous, output, overwrite=True, overwrite_any=overwrite_any, progress=progress)))
    elif stage == "export":
        from compress_exporters.cli import describe
        from compress_exporters.onnx import export_onnx

        e = recipe.export
        log(describe(export_onnx(previous, output, weights=e.weights, device=e.device, accuracy_level=e.accuracy_level, overwrite=True, overwrite_any=overwrite_any,
                                 exporter=e.exporter, lm_head=e.lm_head, embedding=e.embedding, int8_method=e.int8_method, threads=e.threads, lm_head_accuracy_level=e.lm_head_accuracy_level)))


def _bench(recipe: Recipe, artifacts, output: Path, *, fresh: bool, progress: bool, log):
    from compress.bench.stage import run_bench

    cache = Path(recipe.data.cache_dir) if recipe.data.cache_dir else None
    return run_bench(
        recipe.bench, [a for _, a in artifacts], output, labels=[label for label, _ in artifacts], teacher=recipe.teacher.model,
        eval_default=recipe.data.eval or recipe.data.train, text_field=recipe.data.text_field, cache_dir=cache, fresh=fresh, progress=progress, log=log,
    )
