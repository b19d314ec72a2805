"""The quantize stage: `run_quantize(recipe, source, output)` turns a float model folder into a low-bit artifact.

GPTQ and RTN write the standard GPTQ checkpoint (loadable by GPTQModel/transformers and by our own
torch loader); bitsandbytes writes transformers' bnb format. Either way the written folder is reloaded
and its held-out perplexity measured before the artifact is renamed into place.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compress import models, moe
from compress.architectures import get_blocks, layer_layout
from compress.artifacts import RECORD_FILE, ArtifactRecord, check_output, describe_input, device_info, size_on_disk, staging_dir, write_json_atomic
from compress.data import packed_blocks
from compress.errors import CompressError
from compress.evaluate import perplexity_on_blocks
from compress.quantize.calibrate import is_skipped, linear_weight, quantizable_linears, quantize_blocks
from compress.quantize.grid import QuantGrid
from compress.recipe import BnbSpec, GPTQSpec, Recipe, RTNSpec


class QuantizeError(CompressError, ValueError):
    pass


@dataclass(frozen=True)
class QuantizeResult:
    artifact: Path
    metrics: dict


def _device(spec) -> torch.device:
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise QuantizeError("quantize.device is cuda but no CUDA device is visible to torch")
    return torch.device("cuda" if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()) else "cpu")


def weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def check_quantizable_blocks(model, spec) -> list[str]:
    """Mixture-of-experts layers that keep every expert in one 3-D tensor (transformers 5's Qwen3MoeExperts,
    MixtralExperts) become one Linear per expert projection for GPTQ/RTN (`compress.moe`); returns their names.
    Refused before compute: bitsandbytes on them (it quantizes nn.Linear only, so the experts, most of the
    weights, would silently stay in float) and any other 3-D weight GPTQ/RTN would leave in float."""
    prefix = layer_layout(model.config).blocks + "."
    experts = [n for n in moe.expert_modules(model) if n.startswith(prefix)]
    if experts and isinstance(spec, BnbSpec):
        fused = model.get_submodule(experts[0])
        raise QuantizeError(
            f"{model.config.model_type}: {experts[0]} ({type(fused).__name__}) holds its {fused.num_experts} experts in 3-D tensors, which "
            f"{spec.method} leaves in float (bitsandbytes quantizes nn.Linear only); use --method gptq or rtn, which quantize every expert"
        )
    if isinstance(spec, BnbSpec):
        return []
    try:
        unfused = moe.unfuse_experts(model)
    except moe.UnsupportedExpertsError as err:
        raise QuantizeError(str(err)) from None
    stacked = [(n, tuple(p.shape)) for n, p in model.named_parameters() if n.startswith(prefix) and p.dim() >= 3]
    if stacked:
        name, shape = stacked[0]
        owner = type(model.get_submodule(name.rsplit(".", 1)[0])).__name__
        raise QuantizeError(
            f"{model.config.model_type}: {name} {shape} ({owner}, {len(stacked)} such tensors) is a 3-D weight that GPTQ/RTN "
            "would leave in float; compress quantizes Linear layers and experts stored as [gate; up] and down tensors"
        )
    return unfused


def expert_summary(reports) -> dict | None:
    """Calibration tokens per expert projection (min / median / max), and the experts rounded to nearest for
    want of tokens, for the quantize record; None for a model without experts."""
    routed = [r for r in reports if r.tokens is not None and ".experts." in r.name and r.name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj")]
    if not routed:
        return None
    tokens = sorted(r.tokens for r in routed if r.name.endswith(".gate_proj"))
    fallback = sorted({r.name.rsplit(".", 1)[0] for r in routed if r.fallback})
    return {
        "experts": len(tokens),
        "tokens_min": tokens[0],
        "tokens_median": tokens[len(tokens) // 2],
        "tokens_max": tokens[-1],
        "rtn_fallback": fallback,
        "policy": "an expert that fewer calibration tokens reached than quantize.min_expert_tokens (auto: its input width) is rounded to nearest",
    }


def check_packable(model, spec) -> dict:
    """Refuse, before any calibration, layers the chosen bits/group size cannot be stored for."""
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    if not is_skipped(head, tuple(spec.skip)):
        raise QuantizeError(f"quantizing the LM head ({head}) is not supported: keep it in quantize.skip (it stays in float)")
    linears = quantizable_linears(model, tuple(spec.skip))
    if not linears:
        raise QuantizeError(f"no Linear layers matched in {model.config.model_type} after skipping {spec.skip}")
    per_word = 32 // spec.bits if 32 % spec.bits == 0 else 32
    for name, module in linears.items():
        rows, cols = linear_weight(module).shape
        if rows % per_word or (cols * spec.bits) % 32:
            raise QuantizeError(f"{name} ({rows}x{cols}) cannot be packed at {spec.bits} bits: output features must be a multiple of {per_word} and input features x bits a multiple of 32")
        if spec.group_size != "auto" and spec.group_size > cols:
            raise QuantizeError(f"quantize.group_size={spec.group_size} exceeds the {cols} input features of {name}")
    return linears


AUTO_GROUP_SIZES = (128, 64, 32, 16)
# Where a group that does not divide a layer's input width is refused (read from their kernels' checks).
STRICT_LOADERS = ("GPTQModel and transformers with their default CPU kernel (torch int4pack: K divisible by the group size)", "vLLM's GPTQ/Marlin kernels")


def resolve_group_size(spec, linears: dict, log=print) -> int:
    """`group_size: auto`: the largest of AUTO_GROUP_SIZES that divides every quantized input width (-1 when
    none does). An explicit size is kept; one that leaves a partial last group is warned about, naming the
    layers and the loaders that refuse them."""
    widths = {name: linear_weight(m).shape[1] for name, m in linears.items()}
    fits = next((g for g in AUTO_GROUP_SIZES if all(w % g == 0 for w in widths.values())), -1)
    if spec.group_size == "auto":
        return fits
    if spec.group_size != -1:
        names = [n for n, w in widths.items() if w % spec.group_size]
        if names:
            partial = sorted({widths[n] for n in names})
            log(
                f"warning: quantize.group_size={spec.group_size} does not divide the input width of {len(names)} layers "
                f"({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}: widths {', '.join(map(str, partial))}); their last group is partial. "
                f"compress, its ONNX export and GPTQModel's torch backend (backend='gptq_torch', fp16/bf16) load them; "
                f"{'; '.join(STRICT_LOADERS)} refuse them. group_size {fits} (or auto) fits every layer"
            )
    return spec.group_size


def calibration_blocks(recipe: Recipe, spec: GPTQSpec, tokenizer, facts: dict | None = None) -> tuple[torch.Tensor, str]:
    """`samples` blocks of `seq_len` tokens drawn (seeded) from the calibration text, and their hash. A source
    larger than `calib.max_chars` is not tokenized whole: the blocks are drawn from a seeded sample of its
    documents (`data.sample_documents`), unless it is already packed in the cache. `facts` receives how."""
    from compress.data import sampled_blocks

    source, calib = spec.calib.source or recipe.data.train, spec.calib
    blocks, made = sampled_blocks(source, tokenizer, seq_len=calib.seq_len, text_field=recipe.data.text_field, cache_dir=_cache(recipe),
                                  max_chars=calib.resolved_max_chars(), seed=recipe.seed, need=calib.samples)
    if facts is not None:
        facts.update(made)
    if len(blocks) < spec.calib.samples:
        raise QuantizeError(
            f"calibration text {source} has {blocks.numel():,} tokens: fewer than quantize.calib.samples x seq_len = "
            f"{spec.calib.samples} x {spec.calib.seq_len}; lower them or give more text"
        )
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(recipe.seed))[: spec.calib.samples]
    chosen = blocks[pick.sort().values]
    return chosen, hashlib.sha256(chosen.numpy().tobytes()).hexdigest()


def _cache(recipe: Recipe):
    return Path(recipe.data.cache_dir) if recipe.data.cache_dir else None


def eval_blocks(recipe: Recipe, tokenizer) -> torch.Tensor:
    data = recipe.data
    return packed_blocks(data.eval or data.train, tokenizer, seq_len=data.seq_len, text_field=data.text_field, max_tokens=data.max_eval_tokens, cache_dir=_cache(recipe))


def load_mode(spec, source: str, device: torch.device):
    """("blocks", Onloader) where the model can be quantized block at a time (quantize.load auto/blocks), else
    ("whole", None); quantize.load: blocks on a model that cannot be read that way is refused, saying why."""
    if isinstance(spec, BnbSpec) or spec.load == "whole":
        return "whole", None
    from compress.quantize.sequential import Onloader, SequentialError

    try:
        onloader = Onloader(source, device=device)
        experts = moe.expert_modules(onloader.model)
        if experts:
            raise SequentialError(f"{source}: {experts[0]} keeps its experts in stacked tensors, which are split into Linears in memory; set quantize.load: whole")
    except SequentialError as err:
        if spec.load == "blocks":
            raise QuantizeError(f"quantize.load: blocks: {err}") from None
        return "whole", None
    return "blocks", onloader


def run_quantize(recipe: Recipe, source: str, output: str | Path, *, overwrite: bool = False, overwrite_any: bool = False, progress: bool = True, resume: bool = False, log=print) -> QuantizeResult:
    spec = recipe.quantize
    if spec is None:
        raise QuantizeError("the recipe has no quantize section (give --method or a recipe with quantize:)")
    start = time.perf_counter()
    output = Path(output)
    data = recipe.data
    read_paths = [models.on_disk(source), spec.calib.source if isinstance(spec, GPTQSpec) else None, data.train, data.eval]
    # The quantized folder is smaller than its float input: the input's size bounds it.
    check_output(output, inputs=read_paths, overwrite=overwrite, overwrite_any=overwrite_any, expected_bytes=size_on_disk(read_paths[0]))
    device = _device(spec)
    if (models.load_config(source).to_dict().get("quantization_config")) is not None:
        raise QuantizeError(f"{source} is already quantized; quantize a float model")
    mode, onloader = load_mode(spec, source, device)
    model = onloader.model if onloader is not None else models.load_model(source)
    check_quantizable_blocks(model, spec)  # unsupported architectures and expert stacks stop here, by name
    tokenizer = models.load_tokenizer(source)
    held_out = eval_blocks(recipe, tokenizer)
    inputs = [describe_input("model", source, models.local_path(source))]
    extra: dict = {}
    experts = None  # calibration tokens per expert, for mixture-of-experts models
    if isinstance(spec, (GPTQSpec, RTNSpec)):
        linears = check_packable(model, spec)
        spec = spec.model_copy(update={"group_size": resolve_group_size(spec, linears)})
        head_codes, why_not = head_codes_plan(model, spec)
        if why_not:
            extra["lm_head_codes"] = {"skipped": why_not}
        calib_facts: dict = {}
        calib, calib_hash = (calibration_blocks(recipe, spec, tokenizer, calib_facts) if isinstance(spec, GPTQSpec) else (None, None))
        if calib is not None:
            inputs.append({"role": "calibration", "source": spec.calib.source or recipe.data.train, "sha256": calib_hash, "samples": spec.calib.samples, "seq_len": spec.calib.seq_len,
                           **calib_facts})
    if mode == "whole":
        model.to(device)
        before = perplexity_on_blocks(model, held_out)
    extra["load"] = mode

    t0 = time.perf_counter()
    with staging_dir(output, inputs=read_paths, overwrite=overwrite, overwrite_any=overwrite_any) as tmp:
        if mode == "blocks":
            from compress.quantize.gptq_checkpoint import checkpoint_format, write_gptq_config
            from compress.quantize.sequential import finish, fingerprint, progress_dir, quantize_by_blocks

            v2 = checkpoint_format(spec.sym) == "gptq_v2"
            # Where the states between blocks are kept does not change the codes: a resume may change it.
            fp = fingerprint(inputs, spec.model_dump(mode="json", exclude={"activations"}), hashlib.sha256(held_out.numpy().tobytes()).hexdigest())
            bar = _progress_bar(model, spec, progress)
            driver = lambda m, c, **hooks: _quantize_int(m, spec, c, bar, **hooks)  # noqa: E731
            try:
                outcome = quantize_by_blocks(onloader, spec, calib, held_out, output=output, fp=fp, resume=resume, v2=v2, quantize=driver, log=log)
            finally:
                bar.close()
            head = _head_codes(model, spec, calib, outcome.final_hidden, outcome.template) if head_codes else None
            quantize_time = time.perf_counter() - t0
            finish(onloader, progress_dir(output), tmp, v2=v2)
            qconfig = _qconfig(spec, [r.name for r in outcome.reports])
            write_gptq_config(tmp, model, qconfig, tokenizer)
            _write_head(tmp, spec, head, qconfig, extra)
            reports, before, after = outcome.reports, outcome.before, outcome.after
            extra["layers"] = [asdict(r) for r in reports]
            extra["block_seconds"] = outcome.seconds
            extra["memory_plan"] = outcome.plan
            experts = expert_summary(reports)
            models.check_model_folder(tmp)  # the merged folder reads back: shapes, groups, finite values
        elif isinstance(spec, BnbSpec):
            from compress.quantize.bnb import quantize_bnb

            model.cpu()
            del model
            quantized = quantize_bnb(source, spec, device)
            quantize_time = time.perf_counter() - t0
            quantized.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            del quantized
            reloaded = models.load_quantized(tmp, device=device)
        else:
            from compress.quantize.gptq_checkpoint import write_gptq

            final: list[torch.Tensor] | None = [] if head_codes else None
            bar = _progress_bar(model, spec, progress)
            try:
                results, reports = _quantize_int(model, spec, calib if isinstance(spec, GPTQSpec) else None, bar, final_hidden=final)
            finally:
                bar.close()
            head = _head_codes(model, spec, calib, final) if final is not None else None
            quantize_time = time.perf_counter() - t0
            qconfig = _qconfig(spec, list(results))
            write_gptq(tmp, model.cpu(), results, qconfig, tokenizer)
            _write_head(tmp, spec, head, qconfig, extra)
            del model
            extra["layers"] = [asdict(r) for r in reports]
            experts = expert_summary(reports)
            reloaded = models.load_quantized(tmp, device=device)
        if mode == "whole":
            after = perplexity_on_blocks(reloaded, held_out)
        metrics = {
            "method": spec.method,
            "ppl_before": before["ppl"],
            "ppl_after": after["ppl"],
            "ppl_increase": after["ppl"] / before["ppl"] - 1,
            "eval_tokens": before["tokens"],
            "eval_data": recipe.data.eval or recipe.data.train,
            "size_before_bytes": weights_bytes(Path(models.resolve_source(source))),
            "size_after_bytes": weights_bytes(tmp),
            "quantize_time_s": round(quantize_time, 2),
        }
        metrics["compression"] = metrics["size_before_bytes"] / metrics["size_after_bytes"]
        if experts is not None:
            metrics["experts"] = experts
        record = ArtifactRecord(
            stage="quantize",
            recipe=recipe.model_dump(mode="json"),
            inputs=inputs,
            metrics=metrics,
            device=device_info(device.type),
            wall_time_s=time.perf_counter() - start,
            extra=extra,
        )
        write_json_atomic(tmp / RECORD_FILE, record.to_json())
    if mode == "blocks":
        from compress.quantize.sequential import progress_dir

        shutil.rmtree(progress_dir(output), ignore_errors=True)  # the artifact is complete: its pieces are not needed
    return QuantizeResult(artifact=output, metrics=metrics)


def _qconfig(spec, modules: list[str]) -> dict:
    from compress.quantize.gptq_checkpoint import quantization_config

    qconfig = quantization_config(
        bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
        act_order=getattr(spec, "act_order", False), damp=getattr(spec, "damp", None),
        static_groups=getattr(spec, "static_groups", False), modules=modules,
    )
    qconfig["true_sequential"] = getattr(spec, "true_sequential", False)
    if isinstance(spec, GPTQSpec):
        qconfig["meta"].update(scale_search=spec.scale_search, forward_dtype=spec.forward_dtype)
    qconfig["meta"]["method"] = spec.method
    return qconfig


def _write_head(tmp: Path, spec, head, qconfig: dict, extra: dict) -> None:
    if head is None:
        return
    from compress.quantize.head_codes import HEAD_CODES_FILE, write_head_codes

    result, report = head
    write_head_codes(tmp, report.name, result, group_size=spec.head_codes.group_size, act_order=spec.head_codes.act_order)
    extra["lm_head_codes"] = {"file": HEAD_CODES_FILE, "bits": 4, "group_size": spec.head_codes.group_size, "act_order": spec.head_codes.act_order, **asdict(report)}


def head_codes_plan(model, spec) -> tuple[bool, str | None]:
    """(whether the LM head gets GPTQ codes, why not). Only 4-bit GPTQ writes them (the int4 export reads them).
    A head whose shape the codes cannot store is refused before compute when head_codes was set in the recipe,
    skipped with a note when it is only the default."""
    if not isinstance(spec, GPTQSpec) or spec.head_codes is None:
        return False, None
    if spec.bits != 4:
        return False, f"quantize.head_codes applies to 4-bit GPTQ (int4 exports); a {spec.bits}-bit export keeps an 8-bit head"
    head = model.get_output_embeddings()
    vocab, hidden = linear_weight(head).shape
    group = spec.head_codes.group_size
    if vocab % 8 or hidden % group:
        why = f"the LM head ({vocab} x {hidden}) cannot be stored in 4-bit groups of {group} (vocabulary a multiple of 8, hidden size a multiple of the group size)"
        if "head_codes" in spec.model_fields_set:
            raise QuantizeError(f"quantize.head_codes: {why}; set quantize.head_codes.group_size to one that divides {hidden}, or head_codes: null")
        return False, why
    return True, None


def _head_codes(model, spec: GPTQSpec, calib, final, template=None):
    """GPTQ of the LM head on what it reads through the quantized blocks: (QuantResult, LayerReport)."""
    from compress.quantize.calibrate import head_inputs, quantize_head_packed

    inputs = head_inputs(model, calib, spec.batch_size, final, template)
    final.clear()
    grid = QuantGrid(bits=4, sym=spec.sym)
    from compress.quantize.gptq_checkpoint import checkpoint_format

    return quantize_head_packed(model, inputs, grid, v2=checkpoint_format(spec.sym) == "gptq_v2", group_size=spec.head_codes.group_size, act_order=spec.head_codes.act_order, damp=spec.damp, block_size=spec.block_size, scale_search=spec.scale_search)


def _progress_bar(model, spec, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=len(get_blocks(model)), desc=f"{spec.method} {spec.bits}-bit", unit="layer", disable=not progress, dynamic_ncols=True)


def _quantize_int(model, spec, calib, bar, **driver):
    """`calibrate.quantize_blocks` with the recipe's settings, reporting each finished block on `bar`;
    `driver`: final_hidden, and the block-at-a-time hooks (compress.quantize.sequential)."""
    grid = QuantGrid(bits=spec.bits, sym=spec.sym)

    def on_layer(i, total, reports):
        errors = [r.output_error if r.output_error is not None else r.weight_error for r in reports]
        bar.update(1)
        bar.set_postfix(layer=f"{i + 1}/{total}", rel_err=f"{max(errors):.4f}" if errors else "-")

    kwargs = {}
    if calib is not None:
        kwargs = dict(damp=spec.damp, act_order=spec.act_order, block_size=spec.block_size, static_groups=spec.static_groups, true_sequential=spec.true_sequential, scale_search=spec.scale_search, forward_dtype=spec.forward_dtype, batch_size=spec.batch_size, min_tokens=None if spec.min_expert_tokens == "auto" else spec.min_expert_tokens)
    if driver.get("start"):
        bar.update(driver["start"])
    return quantize_blocks(model, calib, grid, method=spec.method, group_size=spec.group_size, skip=tuple(spec.skip), on_layer=on_layer, **driver, **kwargs)


def describe(result: QuantizeResult) -> str:
    m = result.metrics
    return (
        f"quantized: {result.artifact}\n"
        f"  {m['method']}: eval ppl {m['ppl_before']:.2f} -> {m['ppl_after']:.2f} ({100 * m['ppl_increase']:+.1f}%), "
        f"weights {m['size_before_bytes'] / 2**20:.1f} MB -> {m['size_after_bytes'] / 2**20:.1f} MB ({m['compression']:.2f}x), "
        f"{m['quantize_time_s']:.0f} s"
    ) + (_describe_experts(m["experts"]) if m.get("experts") else "")


def _describe_experts(e: dict) -> str:
    rtn = e["rtn_fallback"]
    return (
        f"\n  {e['experts']} experts: calibration tokens per expert min {e['tokens_min']}, median {e['tokens_median']}, max {e['tokens_max']}; "
        + (f"{len(rtn)} rounded to nearest for want of tokens ({', '.join(rtn[:3])}{' ...' if len(rtn) > 3 else ''})" if rtn else "all GPTQ")
    )

