"""The distillation stage: `run_distill(recipe, ...)` trains the student and writes its artifact.

An explicit loop (AdamW, warm-up + cosine, clipping, accumulation, checkpoints, resume, eval) on
top of accelerate, which supplies device placement, bf16 autocast and DDP for multi-process runs
(`accelerate launch` / `torchrun`); `distill.parallel: fsdp` shards the student and a live teacher over those
processes instead (FSDP2, compress.distill.sharding). The teacher's outputs come from a TeacherSource: the live model, or
a top-k logits cache (`teacher.logits_cache`) that the first such run builds.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from compress import models
from compress.architectures import WeightLayoutError, student_from_config, student_from_state, student_from_teacher
from compress.artifacts import FOLDER, ArtifactExistsError, ArtifactRecord, check_output, describe_input, device_info, hash_path, size_on_disk, write_artifact
from compress.data import batch_indices, load_blocks, tokenizer_fingerprint
from compress.distill import logits_cache, sharding
from compress.distill.checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint, load_checkpoint, prepare_resume, remove_checkpoints, save_checkpoint
from compress.distill.losses import perplexity
from compress.errors import CompressError
from compress.distill.objective import DistillObjective, check_plain_head, evaluate
from compress.distill.teacher import CachedTeacher, LiveTeacher, TeacherSource
from compress.recipe import Recipe

STUDENT_DIR = "student"
CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"


class DistillError(CompressError, RuntimeError):
    pass


@dataclass(frozen=True)
class DistillResult:
    artifact: Path
    metrics: dict
    steps: int


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, spec) -> torch.optim.Optimizer:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)


def build_student(recipe: Recipe, teacher_config, teacher_vocab: int, teacher_tokenizer, teacher_layers, *, teacher_model=None, train_ids=None, progress: bool = True):
    """The student and a description of how it was made; vocabularies are checked here.
    `teacher_layers(layers)` makes a student of the teacher's layers (only called for student.from_teacher);
    `teacher_model()` gives the teacher model, which `student.prune` measures (only called when it prunes)."""
    spec = recipe.student
    if spec.prune is not None:
        from compress.prune.stage import pruned_student

        return pruned_student(recipe, teacher_model, teacher_tokenizer, train_ids, progress=progress)
    if spec.from_teacher is not None:
        student, keep = teacher_layers(spec.from_teacher.layers)
        return student, {"from_teacher_layers": keep}
    if spec.config is not None:
        student = student_from_config(teacher_config, spec.config, recipe.seed)
        models.check_same_vocab(teacher_vocab, teacher_tokenizer, student, None)
        return student, {"config_overrides": spec.config}
    student = models.load_model(spec.model, trust_remote_code=spec.trust_remote_code)
    tokenizer = models.load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    models.check_same_vocab(teacher_vocab, teacher_tokenizer, student, tokenizer)
    return student, {"model": spec.model}


def check_student(recipe: Recipe) -> None:
    """Refuse, from the teacher's config alone, a student section that cannot fit the teacher
    (layer indices out of range, a prune budget no valid shape meets, a shape that breaks head groups)."""
    from compress.architectures import layer_layout
    from compress.prune.stage import meta_model, plan_prune

    t = recipe.teacher
    layer_layout(models.load_config(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code))  # not a decoder-only causal LM: stops here, by name
    spec = recipe.student
    if spec.from_teacher is None and spec.prune is None:
        return
    structure = meta_model(t.model, trust_remote_code=t.trust_remote_code)
    if spec.from_teacher is not None:
        from compress.architectures import num_layers, select_layers

        select_layers(num_layers(structure.config), spec.from_teacher.layers)
    else:
        plan_prune(structure, spec.prune)


def student_from_checkpoint(recipe: Recipe, teacher_config, layers):
    """`student.from_teacher` without building the teacher: the kept tensors are read from its safetensors
    files. A checkpoint that cannot be read that way (no safetensors, tensors transformers fuses or splits on
    load, names that do not fit) falls back to loading the teacher model to copy its layers."""
    t = recipe.teacher
    state = models.checkpoint_tensors(t.model, teacher_config, dtype=t.dtype, revision=t.revision, trust_remote_code=t.trust_remote_code)
    if state is not None:
        try:
            return student_from_state(teacher_config, state, layers, models.torch_dtype(t.dtype))
        except WeightLayoutError:
            pass
    teacher = models.load_model(t.model, dtype=t.dtype, revision=t.revision, trust_remote_code=t.trust_remote_code)
    return student_from_teacher(teacher, layers)


def teacher_identity(spec) -> dict:
    """What a teacher's outputs depend on: a local folder's content hash, or a hub id and revision; and its dtype."""
    path = models.local_path(spec.model)
    if path is not None:
        return {"sha256": hash_path(path), "dtype": spec.dtype}
    return {"hub": spec.model, "revision": spec.revision, "dtype": spec.dtype}


def logits_cache_key(recipe: Recipe, tokenizer, blocks) -> logits_cache.CacheKey:
    spec = recipe.teacher.logits_cache
    return logits_cache.cache_key(
        teacher=teacher_identity(recipe.teacher), tokenizer=tokenizer_fingerprint(tokenizer),
        train_blocks=blocks.train, eval_blocks=blocks.eval, temperature=recipe.distill.loss.temperature,
        top_k=spec.top_k, logprob_dtype=spec.logprob_dtype,
    )


def load_teacher(recipe: Recipe, device):
    t = recipe.teacher
    teacher = models.load_model(t.model, dtype=t.dtype, revision=t.revision, trust_remote_code=t.trust_remote_code)
    check_plain_head(teacher.config)
    return teacher.to(device).eval().requires_grad_(False)


def cached_teacher(recipe: Recipe, tokenizer, blocks, accelerator, *, progress: bool) -> tuple[CachedTeacher, dict]:
    """The recipe's logits cache, built first (by the main process, loading the teacher for that only) when
    no complete one exists; and facts about it for the metrics."""
    spec, loss = recipe.teacher.logits_cache, recipe.distill.loss
    root, key = logits_cache.cache_root(spec.dir), logits_cache_key(recipe, tokenizer, blocks)
    built_s = None
    # Every rank passes the same barrier whatever it finds on disk: the main process builds a missing cache
    # first, the others open it after. (Deciding per rank whether to wait raced: a slow rank that found the
    # cache the main process had just finished skipped the barrier the main process then waited in forever.)
    with accelerator.main_process_first():
        cache = logits_cache.open_cache(root, key)
        if cache is None and not accelerator.is_main_process:
            raise logits_cache.LogitsCacheError(f"the main process did not build the teacher-logits cache under {root}")
        if cache is None:
            start = time.perf_counter()
            live = LiveTeacher(load_teacher(recipe, accelerator.device))
            with accelerator.autocast():
                cache = logits_cache.build_cache(
                    root, key, train_blocks=blocks.train, eval_blocks=blocks.eval,
                    topk=lambda ids: live.topk(ids.to(accelerator.device), spec.top_k, temperature=loss.temperature, chunk_size=loss.chunk_size),
                    eval_hidden=lambda ids: live.eval_hidden(None, ids, batch_size=len(ids)),
                    head=live.head, shard_blocks=spec.shard_blocks, batch_size=recipe.distill.batch_size,
                    facts={"teacher": {"model": recipe.teacher.model, "parameters": live.parameters}, "precision": accelerator.mixed_precision},
                    progress=progress,
                )
            del live
            built_s = round(time.perf_counter() - start, 1)
    facts = {"path": str(cache.path), "key": key.digest, "top_k": cache.top_k, "bytes_per_position": cache.manifest["bytes_per_position"], "bytes": cache.nbytes(), "build_s": built_s}
    return CachedTeacher(cache, accelerator.device), facts


def default_hidden_pairs(made: dict, student_layers: int) -> list[tuple[int, int]]:
    keep = made.get("from_teacher_layers")
    if keep is None:
        raise DistillError("distill.hidden.pairs must be given when the student is not built from the teacher's layers")
    return [(j + 1, t + 1) for j, t in enumerate(keep)][:student_layers]


def distill_inputs(recipe: Recipe) -> tuple[list[str | None], list[str | None]]:
    """(the models the run reads, those and its data files): what its run folder and its student may not be,
    contain, or lie inside (what is not on disk, such as a hub id, is skipped)."""
    model_inputs = [models.on_disk(recipe.teacher.model), models.on_disk(recipe.student.model)]
    return model_inputs, model_inputs + [recipe.data.train, recipe.data.eval]


def _prepare_run_dir(recipe: Recipe, *, resume: bool, overwrite: bool, overwrite_any: bool = False) -> list[str]:
    """Check the run folder and the student's place before any model loads; on a fresh start, remove the earlier
    run's checkpoints (only those: other files in the folder are left alone). Otherwise clear what a killed run
    left among them (dead runs' staging folders, incomplete checkpoint folders) and return one line per removal."""
    run_dir = recipe.run_dir
    artifact, ckpts = run_dir / STUDENT_DIR, run_dir / CHECKPOINT_DIR
    overwrite = overwrite or overwrite_any
    model_inputs, all_inputs = distill_inputs(recipe)
    # The student is at most the teacher's size; checkpoints add a few student-sized files.
    expected = size_on_disk(model_inputs[0])
    check_output(run_dir, inputs=model_inputs, expected_bytes=expected, kind=FOLDER)
    check_output(artifact, inputs=all_inputs, overwrite=overwrite, overwrite_any=overwrite_any)
    check_output(ckpts, inputs=all_inputs, kind=FOLDER)
    if ckpts.exists() and latest_checkpoint(ckpts) and not (resume or overwrite):
        raise ArtifactExistsError(f"{ckpts} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite to start over")
    if overwrite and not resume:
        remove_checkpoints(ckpts)
        return []
    return prepare_resume(ckpts)[1]


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of `train_log.jsonl` for steps 1..`step` (for a step logged twice, the later line) in step
    order, and drop the rest: lines of steps a resumed run will redo, and a line torn by a kill. The file is
    replaced atomically (a kill now leaves the old one or the new one)."""
    if not path.is_file():
        return
    text = path.read_text()
    kept: dict[int, str] = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        logged = entry.get("step") if isinstance(entry, dict) else None
        if isinstance(logged, int) and 0 < logged <= step:
            kept[logged] = line
    new = "".join(kept[s] + "\n" for s in sorted(kept))
    if new == text:
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(new)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _accelerator(spec):
    from accelerate import Accelerator

    cpu = spec.device == "cpu" or (spec.device == "auto" and not torch.cuda.is_available())
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise DistillError("distill.device is cuda but no CUDA device is visible to torch")
    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and not cpu)
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no")


def run_distill(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, overwrite_any: bool = False, progress: bool = True, recipe_file: str | None = None,
                log: Callable[[str], None] = print) -> DistillResult:
    """`resume`: continue from the last complete checkpoint (named through `log`), after clearing what a killed
    run left; train_log.jsonl is cut back to the steps up to it."""
    start_time = time.perf_counter()
    spec = recipe.distill
    run_dir = recipe.run_dir
    done = _finished(recipe) if resume and not (overwrite or overwrite_any) else None
    if done is not None:  # --resume on a run that already finished: nothing to do, nothing replaced
        log(f"{done.artifact} is already complete ({done.steps} steps of this recipe); nothing to resume")
        return done
    accelerator = _accelerator(spec)
    notes: list[str] = []
    if accelerator.is_main_process:
        notes = _prepare_run_dir(recipe, resume=resume, overwrite=overwrite, overwrite_any=overwrite_any)
    accelerator.wait_for_everyone()
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    world, rank = accelerator.num_processes, accelerator.process_index
    if spec.batch_size % world:
        raise DistillError(f"distill.batch_size={spec.batch_size} is not divisible by the {world} processes")
    device = accelerator.device
    sharded = spec.parallel == "fsdp" and world > 1
    if sharded:
        why = sharding.available()
        if why is not None:
            raise DistillError(f"distill.parallel is fsdp but {why}; use distill.parallel: ddp")

    check_student(recipe)
    if device.type == "cuda":  # refused before any model loads; on CPU the plan is only printed by --dry-run
        from compress.plans import check_plans, distill_plan

        check_plans([distill_plan(recipe, processes=world)])
    t = recipe.teacher
    tokenizer = models.load_tokenizer(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
    cache_facts = None
    if t.logits_cache.enabled:
        # The teacher model is loaded only to build a missing cache; its config and files stay in use.
        config = models.load_config(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
        check_plain_head(config)
        blocks = load_blocks(recipe.data, tokenizer)
        source, cache_facts = cached_teacher(recipe, tokenizer, blocks, accelerator, progress=progress)
        teacher_layers = lambda layers: student_from_checkpoint(recipe, config, layers)  # noqa: E731
        teacher_model = lambda: load_teacher(recipe, device)  # noqa: E731  (pruning measures the model itself)
    else:
        teacher = load_teacher(recipe, device)
        config, source = teacher.config, LiveTeacher(teacher)
        teacher_layers = lambda layers: student_from_teacher(teacher, layers)  # noqa: E731
        teacher_model = lambda: teacher  # noqa: E731
        blocks = load_blocks(recipe.data, tokenizer)
    torch.manual_seed(recipe.seed)
    with accelerator.main_process_first():  # a pruned student is written by the main process, then reused by the others
        student, made = build_student(recipe, config, source.vocab_size, tokenizer, teacher_layers, teacher_model=teacher_model,
                                      train_ids=blocks.train, progress=progress and accelerator.is_main_process)
    student = student.to(torch.float32)
    student.config.use_cache = False

    # Taken before a live teacher is sharded: the loss multiplies by the head outside the teacher's forward.
    teacher_head = models.Head(*source.head, models.logit_softcap(config))  # the cache stores no config: the cap comes from the teacher's
    student.to(device).train()
    pairs = list(spec.hidden.pairs) or (default_hidden_pairs(made, student.config.num_hidden_layers) if spec.hidden.weight > 0 else [])
    objective = DistillObjective(student, teacher_head, spec.loss, spec.hidden.weight, pairs)
    if sharded:
        mesh = sharding.mesh(device)
        if isinstance(source, LiveTeacher):
            sharding.shard_teacher(source.model, mesh)
        sharding.shard_student(objective, mesh)  # before the optimizer, which then holds the shards
    optimizer = make_optimizer(student, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.warmup_steps, spec.steps, spec.min_lr_ratio))

    ckpt_root = run_dir / CHECKPOINT_DIR
    step, history, last = 0, [], None
    for candidate in reversed(complete_checkpoints(ckpt_root) if resume else []):
        saved = json.loads((candidate / "state.json").read_text())
        if saved.get("recipe_hash") not in (None, _train_hash(recipe)):
            raise DistillError(f"{candidate} was written by a different recipe (model, data or training settings changed); use --overwrite")
        try:
            state = load_checkpoint(candidate, student, optimizer, scheduler, sharded=objective if sharded else None)
        except CheckpointError:
            raise
        except Exception as err:  # a file a crash or the disk left unreadable: the one before is complete
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            notes.append(f"cannot read the checkpoint {candidate} ({reason}); skipped it")
            continue
        step, history, last = state["step"], state.get("history", []), candidate
        break
    log_path = run_dir / LOG_FILE
    if accelerator.is_main_process:
        for note in notes:
            log(f"resume: {note}")
        if resume:
            log(f"resuming from step {step}: {last}" if last is not None else f"no complete checkpoint in {ckpt_root}: starting from step 0")
        truncate_log(log_path, step)  # the steps from here on are logged again
    model = objective if sharded else accelerator.prepare(objective)

    # Each process evaluates its own share of the held-out blocks, padded (with block 0) to the length of the
    # largest share so that every process runs the same forwards; the teacher's side is fixed: computed once.
    eval_index = torch.arange(len(blocks.eval))[rank::world]
    eval_real, share = len(eval_index), -(-len(blocks.eval) // world)
    eval_index = torch.cat([eval_index, eval_index.new_zeros(share - eval_real)])
    eval_ids = blocks.eval[eval_index]
    with accelerator.autocast():
        teacher_eval = source.eval_hidden(eval_index, eval_ids, batch_size=spec.batch_size)
    evaluation = (objective, eval_ids, teacher_eval, eval_real)
    initial_eval = state.get("initial_eval") if last is not None else None
    if initial_eval is None:
        initial_eval = _eval_metrics(*evaluation, spec, accelerator)
    per_rank = spec.batch_size // world
    tokens_per_step = spec.batch_size * spec.grad_accum * blocks.seq_len
    from tqdm.auto import tqdm

    bar = tqdm(total=spec.steps, initial=step, desc="distill", unit="step", disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    train_time, train_steps = 0.0, 0
    while step < spec.steps:
        t0 = time.perf_counter()
        stats = _train_step(model, objective, source, blocks.train, step, spec, recipe.seed, rank, per_rank, device, accelerator, optimizer, scheduler, sharded)
        step += 1
        train_time += time.perf_counter() - t0
        train_steps += 1
        if not math.isfinite(stats["loss"]):
            good = latest_checkpoint(ckpt_root)
            raise DistillError(
                f"loss became {stats['loss']} at step {step}; stopped. Last good checkpoint: {good or 'none'}. "
                "Lower distill.lr, raise distill.warmup_steps or check the data."
            )
        stats.update(step=step, lr=scheduler.get_last_lr()[0], tokens_per_s=tokens_per_step * train_steps / train_time)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{stats['tokens_per_s']:.0f}", lr=f"{stats['lr']:.2e}")
        if step % spec.eval_every == 0 or step == spec.steps:
            stats["eval"] = _eval_metrics(*evaluation, spec, accelerator)
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats["eval"].items() if isinstance(v, float)))
        history.append(stats)
        if accelerator.is_main_process:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as fh:
                fh.write(json.dumps(stats) + "\n")
        if step % spec.save_every == 0 and step < spec.steps:
            accelerator.wait_for_everyone()
            save_checkpoint(ckpt_root, step, student, optimizer, scheduler, {"history": _brief(history), "initial_eval": initial_eval, "recipe_hash": _train_hash(recipe)},
                            keep_last=spec.keep_last, rank=rank, sharded=objective if sharded else None)
            accelerator.wait_for_everyone()
    bar.close()

    final = next((h["eval"] for h in reversed(history) if "eval" in h), None)
    if final is None:
        final = _eval_metrics(*evaluation, spec, accelerator)
    metrics = {
        "eval": final,
        "initial_eval": initial_eval,
        "eval_history": [{"step": h["step"], **h["eval"]} for h in history if "eval" in h],
        "final_train_loss": history[-1]["loss"] if history else None,
        "steps": step,
        "train_tokens": step * tokens_per_step,
        "tokens_per_s": tokens_per_step * train_steps / train_time if train_time else None,
        "processes": world,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": source.parameters,
        **made,
    }
    if cache_facts is not None:
        metrics["teacher_logits_cache"] = cache_facts
    artifact = run_dir / STUDENT_DIR
    # The student to write: under FSDP gathered to the main process's CPU (every process takes part).
    final_student = sharding.gathered_student(objective) if sharded else accelerator.unwrap_model(model).student
    if accelerator.is_main_process:
        record = ArtifactRecord(
            stage="distill",
            recipe=recipe.model_dump(mode="json"),
            inputs=[
                describe_input("teacher", t.model, models.local_path(t.model)),
                describe_input("train_data", recipe.data.train, blocks.sources["train"]),
                describe_input("eval_data", recipe.data.eval or recipe.data.train, blocks.sources["eval"]),
            ]
            + ([describe_input("student_init", recipe.student.model, models.local_path(recipe.student.model))] if recipe.student.model else [])
            + ([{"role": "teacher_logits", "source": cache_facts["path"], "key": cache_facts["key"]}] if cache_facts else []),
            metrics=metrics,
            device=device_info(device.type),
            wall_time_s=time.perf_counter() - start_time,
            extra={"recipe_file": recipe_file},
        )
        final_student.config.use_cache = True  # off only for training; a saved model generates with its KV cache
        write_artifact(artifact, record, lambda d: models.save_model(final_student, tokenizer, d), inputs=distill_inputs(recipe)[1], overwrite=overwrite, overwrite_any=overwrite_any)
    accelerator.wait_for_everyone()
    return DistillResult(artifact=artifact, metrics=metrics, steps=step)


def _finished(recipe: Recipe) -> DistillResult | None:
    """The run's student when it was written by a finished distillation of this same training recipe."""
    from compress.artifacts import read_record

    artifact = recipe.run_dir / STUDENT_DIR
    if not (artifact / "compress.json").is_file():
        return None
    try:
        record = read_record(artifact)
        same = record.get("stage") == "distill" and _train_hash(Recipe.model_validate(record["recipe"])) == _train_hash(recipe)
    except Exception:  # an unreadable or older record: not provably this run; the usual checks decide
        return None
    metrics = record.get("metrics", {})
    return DistillResult(artifact=artifact, metrics=metrics, steps=int(metrics.get("steps", 0))) if same and metrics.get("steps") == recipe.distill.steps else None


def _train_hash(recipe: Recipe) -> str:
    import hashlib

    keep = recipe.model_dump(mode="json", include={"teacher", "student", "data", "distill", "seed"})
    for key in ("eval_every", "save_every", "keep_last", "num_threads", "parallel"):  # parallel: the same training
        keep["distill"].pop(key, None)
    for key in ("dir", "shard_blocks"):  # where and how the cache is stored, not what it holds
        keep["teacher"]["logits_cache"].pop(key, None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _brief(history: list[dict]) -> list[dict]:
    return [h for h in history if "eval" in h] + history[-1:]


def _train_step(model, objective, source: TeacherSource, train_ids, step, spec, seed, rank, per_rank, device, accelerator, optimizer, scheduler, sharded: bool) -> dict:
    totals: dict[str, float] = {}
    for micro in range(spec.grad_accum):
        idx = batch_indices(len(train_ids), step, micro, spec.batch_size, spec.grad_accum, seed)[rank * per_rank : (rank + 1) * per_rank]
        ids = train_ids[idx].to(device)
        sync = micro == spec.grad_accum - 1
        # FSDP2 reduce-scatters every micro-batch's gradients (kept unsynced, they would accumulate unsharded: the
        # whole model's gradients on every process); DDP all-reduces only on the last.
        with accelerator.autocast(), (accelerator.no_sync(model) if not (sync or sharded) else contextlib.nullcontext()):
            t_out = source.train_outputs(idx, ids, with_hidden_states=objective.hidden_weight > 0)
            out = model(ids, t_out)
            accelerator.backward(out["loss"] / spec.grad_accum)
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach()) / spec.grad_accum
    if accelerator.num_processes > 1:
        # Report the loss of the global batch, not of this process's share.
        keys = sorted(totals)
        vec = accelerator.reduce(torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device), reduction="mean")
        totals = dict(zip(keys, vec.tolist()))
    if spec.max_grad_norm is not None and sharded:
        totals["grad_norm"] = sharding.clip_grad_norm(objective.student.parameters(), spec.max_grad_norm)
    elif spec.max_grad_norm is not None:
        totals["grad_norm"] = float(accelerator.clip_grad_norm_(objective.student.parameters(), spec.max_grad_norm))
    if math.isfinite(totals["loss"]):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def _eval_metrics(objective, eval_ids, teacher_hidden, real: int, spec, accelerator) -> dict:
    with accelerator.autocast():
        sums = evaluate(objective, eval_ids, teacher_hidden, batch_size=spec.batch_size, device=accelerator.device, real=real)
    vec = torch.tensor([sums.tokens, sums.student_nll, sums.teacher_nll, sums.kl, sums.top1_agree], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec, reduction="sum")
    tokens, s_nll, t_nll, kl, agree = vec.tolist()
    return {
        "tokens": int(tokens),
        "student_ppl": perplexity(s_nll, int(tokens)),
        "teacher_ppl": perplexity(t_nll, int(tokens)),
        "kl_per_token": kl / tokens,
        "top1_agreement": agree / tokens,
    }
