"""The pruning stage: `run_prune(spec, teacher, data, output)` (`compress prune`) and `pruned_student`
(`student.prune` in a distillation recipe) measure importance on calibration blocks, pick a shape and
write an ordinary Hugging Face model with `compress.json` recording scores, kept indices and the choice.

`plan_prune` checks the spec against the teacher's structure (a meta-device model is enough), so a
budget no shape meets or a shape later stages cannot use fails before any compute.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress import models
from compress.architectures import StudentSpecError, get_blocks
from compress.artifacts import ArtifactRecord, check_output, describe_input, device_info, read_record, settings_key, size_on_disk, write_artifact
from compress.distill.losses import perplexity
from compress.prune import importance as imp
from compress.prune.measure import Importance, final_hidden, kl_to_teacher, measure_importance
from compress.prune.structure import (
    Shape, WidthLayout, build_pruned, candidate_shapes, check_shape, count_parameters, depth_only_counter,
    describe_shape, select, shape_from_spec, teacher_shape, width_layout,
)

PRUNED_DIR = "pruned"


@dataclass(frozen=True)
class PrunePlan:
    teacher: Shape
    teacher_parameters: int
    budget: int | None
    candidates: list[tuple[Shape, int]]  # (shape, parameters), all valid; one when the shape is explicit
    width: bool  # whether any width axis is pruned (needs the head/channel scores)


@dataclass
class PruneResult:
    model: nn.Module
    shape: Shape
    parameters: int
    report: dict = field(default_factory=dict)
    artifact: Path | None = None


def _parameter_count(model: nn.Module, layout: WidthLayout | None):
    if layout is not None:
        return lambda shape: count_parameters(layout, shape)
    per_depth = depth_only_counter(model)
    return lambda shape: per_depth(shape.num_hidden_layers)


def plan_prune(model: nn.Module, spec) -> PrunePlan:
    """Every candidate shape for `spec` on this teacher (real or on the meta device); raises before compute."""
    tshape = teacher_shape(model.config)
    layout, why = width_layout(model)
    count = _parameter_count(model, layout)
    total = sum(p.numel() for p in model.parameters())
    if spec.shape is not None:
        shape = shape_from_spec(tshape, spec.shape.model_dump())
        if layout is None and shape.as_dict() | {"num_hidden_layers": 0} != tshape.as_dict() | {"num_hidden_layers": 0}:
            raise StudentSpecError(f"student.prune.shape: only num_hidden_layers can be pruned for this {model.config.model_type} model ({why})")
        check_shape(layout, tshape, shape, multiple_of=spec.multiple_of)
        return PrunePlan(tshape, total, None, [(shape, count(shape))], width=shape.hidden_size != tshape.hidden_size or shape.intermediate_size != tshape.intermediate_size or shape.num_attention_heads != tshape.num_attention_heads)
    budget = int(spec.target_params * total) if spec.target_params < 1 else int(spec.target_params)
    axes = tuple(spec.axes)
    if layout is None and set(axes) - {"depth"}:
        raise StudentSpecError(f"student.prune.axes: {sorted(set(axes) - {'depth'})} cannot be pruned for this {model.config.model_type} model ({why}); use axes: [depth]")
    if budget >= total:
        raise StudentSpecError(f"student.prune.target_params: a budget of {budget:,} parameters is not below the teacher's {total:,}; give a fraction below 1 or a smaller count")
    depth_count = lambda n: count(Shape(n, tshape.hidden_size, tshape.intermediate_size, tshape.num_attention_heads, tshape.num_key_value_heads))  # noqa: E731
    candidates = candidate_shapes(layout, tshape, budget, axes, multiple_of=spec.multiple_of, tolerance=spec.tolerance, depth_only_count=depth_count)
    if not candidates:
        smallest = candidate_shapes(layout, tshape, total - 1, axes, multiple_of=spec.multiple_of, tolerance=1 - 1e-9, depth_only_count=depth_count)
        low = min((p for _, p in smallest), default=None)
        reach = f"the smallest shape these axes reach has {low:,} parameters ({low / total:.3f} of the teacher)" if low else "no shape on these axes is smaller than the teacher"
        raise StudentSpecError(
            f"student.prune.target_params: no valid shape with axes {list(axes)} has between {int(budget * (1 - spec.tolerance)):,} and {budget:,} parameters; "
            f"{reach}. Raise target_params, add axes, or widen student.prune.tolerance"
        )
    return PrunePlan(tshape, total, budget, candidates, width=bool(set(axes) - {"depth"}))


def _prior(shape: Shape, teacher: Shape, scores: Importance) -> float:
    """Share of the measured importance a shape keeps, axis by axis (multiplied): ranks which shapes
    are worth the KL proxy."""
    share = imp.retained_fraction(scores.depth.clamp(min=0), shape.num_hidden_layers)
    layers = scores.depth.topk(shape.num_hidden_layers).indices.tolist()
    if scores.hidden is not None:
        share *= imp.retained_fraction(scores.hidden, shape.hidden_size)
    if scores.mlp is not None:
        share *= sum(imp.retained_fraction(scores.mlp[i], shape.intermediate_size) for i in layers) / len(layers)
    if scores.heads is not None:
        group = teacher.num_attention_heads // teacher.num_key_value_heads
        per_group = shape.num_attention_heads // shape.num_key_value_heads
        kept = 0.0
        for i in layers:
            grid = scores.heads[i].reshape(teacher.num_key_value_heads, group)
            groups = grid.sum(dim=1).topk(shape.num_key_value_heads).indices
            kept += float(grid[groups].topk(per_group, dim=1).values.sum()) / max(float(grid.sum()), 1e-12)
        share *= kept / len(layers)
    return share


def _shortlist(plan: PrunePlan, scores: Importance, n: int) -> list[tuple[Shape, int, float]]:
    """The shapes the KL proxy scores: the best by prior for each (layers, heads) layout; of those, the best
    for layer counts spread evenly over the range (both ends included, half the slots), then the best by
    prior. The prior alone favours shallow shapes (a few blocks hold most of the Block Influence), while
    the proxy may prefer keeping every block and pruning width: the spread puts both before it."""
    best: dict[tuple[int, int, int], tuple[Shape, int, float]] = {}
    for shape, params in plan.candidates:
        prior = _prior(shape, plan.teacher, scores)
        key = (shape.num_hidden_layers, shape.num_attention_heads, shape.num_key_value_heads)
        if key not in best or prior > best[key][2]:
            best[key] = (shape, params, prior)
    ranked = sorted(best.values(), key=lambda c: -c[2])
    by_depth: dict[int, tuple[Shape, int, float]] = {}
    for c in ranked:
        by_depth.setdefault(c[0].num_hidden_layers, c)
    depths = sorted(by_depth)
    spread = max(1, min(len(depths), n // 2))
    picks = [by_depth[depths[round(i * (len(depths) - 1) / max(1, spread - 1))]] for i in range(spread)] if len(depths) > 1 else []
    chosen = list(dict.fromkeys(c[0] for c in picks))
    for c in ranked:
        if len(chosen) >= n:
            break
        if c[0] not in chosen:
            chosen.append(c[0])
    entry = {c[0]: c for c in ranked}
    return sorted((entry[s] for s in chosen[:n]), key=lambda c: -c[2])


def _split_blocks(train_ids: torch.Tensor, calib: int, proxy: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if len(train_ids) < 2:
        raise StudentSpecError(f"student.prune: data.train gives {len(train_ids)} blocks; pruning needs calibration and proxy blocks (at least 2)")
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(seed))
    calib = min(calib, len(train_ids) - 1)
    proxy = min(proxy, len(train_ids) - calib)
    return train_ids[order[:calib]], train_ids[order[calib : calib + proxy]]


@torch.no_grad()
def prune_model(teacher: nn.Module, train_ids: torch.Tensor, spec, *, seed: int = 0, progress: bool = True, log=print) -> PruneResult:
    """Measure importance, build each shortlisted shape, keep the one closest to the teacher (KL)."""
    plan = plan_prune(teacher, spec)
    device = next(teacher.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.forward_dtype == "bfloat16"):
        return _prune(teacher, train_ids, spec, plan, seed=seed, progress=progress, log=log)


def _prune(teacher, train_ids, spec, plan: PrunePlan, *, seed, progress, log) -> PruneResult:
    from tqdm.auto import tqdm

    calib, proxy = _split_blocks(train_ids, spec.calib_samples, spec.proxy_samples, seed)
    depth_pruned = any(s.num_hidden_layers < plan.teacher.num_hidden_layers for s, _ in plan.candidates)
    passes = -(-len(calib) // spec.batch_size) + (len(get_blocks(teacher)) if spec.depth_metric == "skip_kl" and depth_pruned else 0)
    bar = tqdm(total=passes, desc="prune: importance", unit="pass", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    scores = measure_importance(teacher, calib, batch_size=spec.batch_size, width=plan.width, depth_metric=spec.depth_metric if depth_pruned else "block_influence", progress=bar.update)
    bar.close()
    measure_s = time.perf_counter() - t0
    shortlist = _shortlist(plan, scores, spec.candidates) if plan.budget is not None else [(plan.candidates[0][0], plan.candidates[0][1], _prior(plan.candidates[0][0], plan.teacher, scores))]
    teacher_hidden = final_hidden(teacher, proxy, spec.batch_size)
    teacher_head = models.lm_head(teacher)
    rows, best = [], None
    bar = tqdm(shortlist, desc="prune: candidates", unit="shape", disable=not progress or len(shortlist) < 2, dynamic_ncols=True)
    for shape, params, prior in bar:
        selection = select(shape, plan.teacher, scores)
        student = build_pruned(teacher, shape, selection)
        sums = kl_to_teacher(student, proxy, teacher_hidden, teacher_head, batch_size=spec.batch_size)
        row = {"shape": shape.as_dict(), "parameters": params, "fraction": params / plan.teacher_parameters, "importance_kept": prior,
               "proxy_kl_per_token": sums.kl / sums.tokens, "proxy_ppl": perplexity(sums.student_nll, sums.tokens), "proxy_top1": sums.top1_agree / sums.tokens}
        rows.append(row)
        if best is None or row["proxy_kl_per_token"] < best[0]["proxy_kl_per_token"]:
            best = (row, shape, selection, student)
        else:
            del student
    row, shape, selection, student = best
    real = sum(p.numel() for p in student.parameters())
    if real != row["parameters"]:
        raise RuntimeError(f"pruned student has {real} parameters, the shape arithmetic said {row['parameters']}")
    log(f"prune: {describe_shape(shape)}: {real / 1e6:.1f}M parameters ({real / plan.teacher_parameters:.3f} of the teacher), "
        f"KL to the teacher {row['proxy_kl_per_token']:.3f}/token on {len(proxy)} proxy blocks; {len(rows)} of {len(plan.candidates)} candidate shapes scored")
    report = {
        "shape": shape.as_dict(),
        "teacher_shape": plan.teacher.as_dict(),
        "parameters": real,
        "teacher_parameters": plan.teacher_parameters,
        "fraction": real / plan.teacher_parameters,
        "budget": plan.budget,
        "spec": spec.model_dump(mode="json"),
        "chosen": row,
        "candidates_in_budget": len(plan.candidates),
        "scored": sorted(rows, key=lambda r: r["proxy_kl_per_token"]),
        "kept": selection.as_json(),
        "importance": scores.as_json(),
        "calib_blocks": len(calib),
        "proxy_blocks": len(proxy),
        "measure_s": round(measure_s, 2),
    }
    return PruneResult(model=student, shape=shape, parameters=real, report=report)


def meta_model(source: str, *, trust_remote_code: bool = False) -> nn.Module:
    """The model's structure on the meta device: enough to plan a prune without loading weights."""
    from transformers import AutoModelForCausalLM

    from compress.architectures import layer_layout

    config = models.load_config(source, trust_remote_code=trust_remote_code)
    layer_layout(config)  # not a decoder-only causal LM: refused here, by name
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _identity(recipe, teacher_hash: str | None) -> str:
    keep = recipe.model_dump(mode="json", include={"seed", "teacher", "data"})
    keep["data"].pop("eval", None)
    keep["data"].pop("max_eval_tokens", None)
    return settings_key(keep, recipe.student.prune.model_dump(mode="json"), teacher_hash)


def run_prune(recipe, teacher_source: str, output: str | Path, *, overwrite: bool = False, overwrite_any: bool = False, progress: bool = True, log=print) -> PruneResult:
    """`compress prune`: the recipe's `student.prune` applied to `teacher_source`, written to `output`."""
    from compress.data import load_blocks

    start = time.perf_counter()
    output = Path(output)
    inputs = [models.on_disk(teacher_source), recipe.data.train]
    check_output(output, inputs=inputs, overwrite=overwrite, overwrite_any=overwrite_any, expected_bytes=size_on_disk(inputs[0]))
    spec = recipe.student.prune
    t = recipe.teacher
    plan_prune(meta_model(teacher_source, trust_remote_code=t.trust_remote_code), spec)  # bad budgets and shapes fail here, before loading
    teacher = models.load_model(teacher_source, dtype="float32", revision=t.revision, trust_remote_code=t.trust_remote_code)
    tokenizer = models.load_tokenizer(teacher_source, revision=t.revision, trust_remote_code=t.trust_remote_code)
    blocks = load_blocks(recipe.data, tokenizer)
    result = prune_model(teacher, blocks.train, spec, seed=recipe.seed, progress=progress, log=log)
    local = models.local_path(teacher_source)
    record = ArtifactRecord(
        stage="prune",
        recipe=recipe.model_dump(mode="json", include={"seed", "teacher", "student", "data"}) | {"teacher": {**recipe.teacher.model_dump(mode="json"), "model": teacher_source}},
        inputs=[describe_input("teacher", teacher_source, local), describe_input("train_data", recipe.data.train, blocks.sources["train"])],
        metrics={"prune": result.report},
        device=device_info("cpu"),
        wall_time_s=time.perf_counter() - start,
        extra={"identity": _identity(recipe, describe_input("teacher", teacher_source, local).get("sha256"))},
    )
    result.model.config.use_cache = True
    write_artifact(output, record, lambda d: models.save_model(result.model, tokenizer, d), inputs=inputs, overwrite=overwrite, overwrite_any=overwrite_any)
    result.artifact = output
    return result


def pruned_student(recipe, teacher_model, tokenizer, train_ids: torch.Tensor, *, progress: bool = True, log=print) -> tuple[nn.Module, dict]:
    """`student.prune` inside distillation: reuse <run_dir>/pruned when it was made from the same teacher,
    data, seed and prune settings; otherwise prune the teacher (`teacher_model`: the model, or a function that
    loads it, so a run from a logits cache loads it only when it must prune) and write it there."""
    target = recipe.run_dir / PRUNED_DIR
    local = models.local_path(recipe.teacher.model)
    identity = _identity(recipe, describe_input("teacher", recipe.teacher.model, local).get("sha256"))
    if (target / "compress.json").is_file():
        record = read_record(target)
        if record.get("identity") == identity:
            log(f"prune: reusing {target} (same teacher, data, seed and prune settings)")
            student = models.load_model(str(target))
            return student, _made(record["metrics"]["prune"], target)
    teacher = teacher_model if isinstance(teacher_model, nn.Module) else teacher_model()
    result = prune_model(teacher, train_ids, recipe.student.prune, seed=recipe.seed, progress=progress, log=log)
    record = ArtifactRecord(
        stage="prune",
        recipe=recipe.model_dump(mode="json", include={"seed", "teacher", "student", "data"}),
        inputs=[describe_input("teacher", recipe.teacher.model, local), describe_input("train_data", recipe.data.train, None)],
        metrics={"prune": result.report},
        device=device_info("cpu"),
        extra={"identity": identity},
    )
    result.model.config.use_cache = True
    write_artifact(target, record, lambda d: models.save_model(result.model, tokenizer, d), inputs=[models.on_disk(recipe.teacher.model)], overwrite=True)
    return result.model, _made(result.report, target)


def _made(report: dict, path: Path) -> dict:
    made = {"pruned": {"path": str(path), "shape": report["shape"], "parameters": report["parameters"], "fraction": report["fraction"], "proxy_kl_per_token": report["chosen"]["proxy_kl_per_token"]}}
    if report["shape"]["hidden_size"] == report["teacher_shape"]["hidden_size"]:
        made["from_teacher_layers"] = report["kept"]["layers"]  # hidden-state pairs stay meaningful
    return made


def describe(result: PruneResult) -> str:
    r = result.report
    return (f"pruned: {result.artifact}\n  {describe_shape(result.shape)}: {result.parameters / 1e6:.1f}M parameters ({r['fraction']:.3f} of the teacher); "
            f"KL to the teacher right after pruning {r['chosen']['proxy_kl_per_token']:.3f}/token, top-1 agreement {r['chosen']['proxy_top1']:.1%}")

