"""`export_onnx`: a model artifact (float, or GPTQ) -> an ONNX folder that ONNX Runtime, onnxruntime-genai and
`compress_exporters.runtime` load: model.onnx (+ model.onnx.data), tokenizer, config.json,
generation_config.json, genai_config.json and compress.json. The folder is validated against the torch model
before it is renamed into place; on any failure nothing is left behind.

    from compress_exporters.onnx import export_onnx
    result = export_onnx("runs/quickstart/student", "runs/quickstart/onnx-int4", weights="int4")
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from compress.errors import CompressError
from compress_exporters.decoder import EXPORTERS as TORCH_EXPORTERS
from compress_exporters.validation import DEFAULT_PROMPTS, ValidationFailedError, Tolerance

WEIGHTS = ("fp32", "fp16", "int8", "int4")
DEVICES = ("cpu", "cuda")
LM_HEAD = ("float", "int8", "int4", "auto")
INT8_METHODS = ("nbits", "dynamic")
NBITS_BLOCK_SIZE = 32  # float -> int4/int8: ONNX Runtime's MatMulNBits quantizer, symmetric, blocks of 32
# MatMulNBits accuracy_level: 0 = fp32 activations, 4 = int8 activations inside the kernel (what onnxruntime-genai's
# builder writes). Default 4 for every quantized layer: on the 2-core EPYC, 4-bit layers at 4 decode 1.3x faster
# than at 0 (the quickstart student and SmolLM2-135M, benchmarks/results/export_latency-head-levels.md) for +0.3% to
# +0.7% perplexity, and the builder, the peer we are measured against, ships 4. The price: int8 activations make a
# row's logits depend on its batch (up to 2.2 logits on the teacher, 3-4% of argmax tokens change,
# benchmarks/results/accuracy_level.md), so exports at 4 are also checked with their 4-bit layers at 0
# (build.graph_check): the graph is judged as sharply as before, the fast kernels by top-1. `accuracy_level=0`
# gives the same answer at any batch size. 8-bit layers have no fp32-compute kernel on CPU (ten times slower at 0).
DEFAULT_ACCURACY_LEVEL = {4: 4, 8: 4}
# The quantized LM head's default level, by its bits (an explicit accuracy_level applies to the head too;
# `lm_head_accuracy_level` overrides both): 4 (int8 activations) for both. A 4-bit head at 0 decoded 9-12% slower for the same perplexity within
# 0.2% (benchmarks/results/export_latency-head-levels.md).
LM_HEAD_ACCURACY_LEVEL = {4: 4, 8: 4}
# The 8-bit LM head (the largest single weight of a small model, read whole every decoded token): blocks of
# 128 carry a quarter of the scales of blocks of 32 (1.03 vs 1.125 bytes per weight); 8 bits leave the rounding
# error far below the 4-bit layers' either way.
LM_HEAD_BLOCK_SIZE = 128
FUSED_OPSET = 23  # compress_exporters.graph.OPSET, repeated so that importing this module stays light
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which they go to model.onnx.data (protobuf caps at 2 GB)
MODEL_FILE = "model.onnx"
# "fused": the graph written from the weights (compress_exporters.graph: GroupQueryAttention, fused norms and
# projections), the fast one; "auto" takes it for the families and formats it covers, else torch.onnx dynamo.
EXPORTERS = ("auto", "fused", *TORCH_EXPORTERS)

# Per-format bars for export-time validation (logits of the ONNX model vs its torch reference, and of the batch
# vs each prompt alone, see validation.py). What each export measured is in its compress.json
# (metrics.validation). The bars come from benchmarks/results/accuracy_level.md, which also checks every int4
# folder of the teacher against its torch model broken three ways (RoPE base 10000, a middle layer dropped, the
# embedding halved); logit scale there 41:
# - GPTQ int4, default levels (4-bit layers 0, 8-bit head 4): correct max relative difference 0.035 on the
#   teacher and 0.034 on the distilled quickstart student; RoPE base 10000 0.075, a dropped layer 0.30, halved
#   embedding 0.68: the bar of 0.06 refuses all three. Top-1 over the 67 compared positions does not separate
#   them: the correct student scores 0.896, the teacher with the wrong RoPE base also 0.896 (correct teacher
#   0.985), so its bar (0.8) only catches gross breakage. At level 4 (max difference 0.087 correct, 0.090 with
#   the RoPE error) only top-1 is judged: level 4 does not catch a wrong RoPE base.
# - int4/int8 from a float model are judged against torch fp32, whose distance from the quantized weights hides
#   graph errors: correct 0.67, wrong RoPE base 0.64, a dropped layer 0.67; only the halved embedding (0.30)
#   falls below the bar of 0.4. For a sharp check, quantize first (`compress quantize --method rtn`, or gptq)
#   and export that: the reference then holds the same weights.
# - Each prompt alone vs in the batch (max_batch_rel_diff): fp32 and 4-bit layers at level 0 measured 3e-6 of
#   the logit scale on the teacher, 3e-4 with the RTN export's 8-bit head at level 4; a graph that attends to
#   its left padding is off by whole logits (tests/test_export_fused.py). With 4-bit layers at level 4 a row
#   moves by up to 0.05 of the scale with its batch (recorded, not judged), as with quantize_dynamic's
#   per-tensor activation scale.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel_diff=1e-3, min_top1=0.95, max_batch_rel_diff=1e-4),
    "fp16": Tolerance(max_rel_diff=5e-2, min_top1=0.9),
    "int8": Tolerance(max_rel_diff=None, min_top1=0.8),
    "int8-dynamic": Tolerance(max_rel_diff=None, min_top1=0.4),
    "int4": Tolerance(max_rel_diff=None, min_top1=0.4, max_batch_rel_diff=5e-3),
    "int4-level4": Tolerance(max_rel_diff=None, min_top1=0.4),
    "int4-gptq": Tolerance(max_rel_diff=6e-2, min_top1=0.8, max_batch_rel_diff=5e-3),
    "int4-gptq-level4": Tolerance(max_rel_diff=None, min_top1=0.8),
    "int8-gptq": Tolerance(max_rel_diff=None, min_top1=0.9),
    # float LM head and embedding, 4-bit layers at level 0: the GPTQ model's numbers exactly
    "int4-gptq-exact": Tolerance(max_rel_diff=1e-3, min_top1=0.95, max_batch_rel_diff=1e-4),
}


class ExportError(CompressError, ValueError):
    """The export cannot be done as asked (wrong format for the input, unsupported input, missing package)."""


@dataclass(frozen=True)
class ExportResult:
    artifact: Path
    weights: str
    source_format: str  # "float" or "gptq"
    validation: dict[str, Any]
    sizes: dict[str, int]
    notes: tuple[str, ...]
    record: dict[str, Any]


def export_onnx(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    weights: str = "fp32",
    device: str = "cpu",
    opset: int | None = None,
    accuracy_level: int | None = None,
    overwrite: bool = False,
    overwrite_any: bool = False,
    validate_prompts: Sequence[str] | None = None,
    exporter: str = "auto",
    lm_head: str | None = None,
    embedding: str | None = None,
    int8_method: str = "nbits",
    threads: int | None = None,
    lm_head_accuracy_level: int | None = None,
) -> ExportResult:
    """Export `model_dir` to `output_dir` with `weights` fp32 | fp16 | int8 | int4.

    int4 from a float model: ONNX Runtime's MatMulNBits quantizer (symmetric, blocks of 32); from a GPTQ
    artifact: its own codes, scales and zeros, repacked exactly. int8: weight-only 8-bit MatMulNBits (blocks of
    32), or `int8_method="dynamic"` for ONNX Runtime's quantize_dynamic (per-channel weights, per-tensor
    activations: much less accurate on real models, see exporters/README.md). `accuracy_level` (MatMulNBits
    formats): 0 = fp32 activations (the same answer at any batch size), 4 = int8 activations inside the kernel
    (default: 1.3x faster decode; a folder at 4 is also validated with its 4-bit layers at 0, see build.graph_check). `lm_head`:
    "float", "int8", "int4" (a GPTQ artifact's head codes, `quantize.head_codes`; round-to-nearest from a float
    model) or "auto" (default: 4 bits for a GPTQ artifact with head codes whose 8-bit head would be at least
    AUTO_INT4_HEAD_SHARE of the bytes read per decoded token, else 8; float for fp32/fp16; the choice and its
    reason go into compress.json). `embedding`: "float", "int8", "int4" or "auto" (GatherBlockQuantized, sharing
    the quantized head's codes when the head is tied); default: as the LM head. `device="cuda"` validates on ONNX Runtime's CUDA
    provider and fails if it is not obtained. `validate_prompts`: texts for the validation (default: four).
    `overwrite` replaces an existing artifact at `output_dir`; `overwrite_any` also a folder compress did not
    write; never the input (compress.artifacts.check_output)."""
    start = time.perf_counter()
    _check_choice("weights", weights, WEIGHTS)
    _check_choice("device", device, DEVICES)
    _check_choice("int8_method", int8_method, INT8_METHODS)
    _check_choice("exporter", exporter, EXPORTERS)
    for key, value in (("lm_head", lm_head), ("embedding", embedding)):
        if value is not None:
            _check_choice(key, value, LM_HEAD)
            if weights in ("fp32", "fp16") and value not in ("float", "auto"):
                raise ExportError(f"{key}={value!r} needs weights int8 or int4; an {weights} export keeps every weight in {weights}")
            if weights == "int8" and value == "int4":
                raise ExportError(f"{key}='int4' needs weights int4; an int8 export keeps its head and embedding in 8 bits or float")
    ort = _require_onnx("fused")  # onnxscript is checked once the exporter is resolved
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ExportError(
            f"device='cuda' needs ONNX Runtime's CUDAExecutionProvider; this onnxruntime offers {ort.get_available_providers()}. "
            "Install onnxruntime-gpu instead of onnxruntime: pip uninstall onnxruntime && pip install 'compress-llm[onnx-gpu]'"
        )
    from compress import models
    from compress.artifacts import check_output, size_on_disk
    from compress_exporters import build

    output = Path(output_dir)
    local = models.on_disk(str(model_dir))
    # Estimate: the input's size (an fp32 export of a float model is about as large; quantized formats are smaller).
    check_output(output, inputs=[local], overwrite=overwrite, overwrite_any=overwrite_any, expected_bytes=size_on_disk(local))

    source = build.inspect_source(model_dir, weights)
    refusal = build.fused_refusal(source, weights, int8_method, device)
    if exporter == "fused" and refusal:
        raise ExportError(f"exporter='fused': {refusal}; use exporter='dynamo' or 'legacy'")
    if exporter == "fused" and opset is not None:
        raise ExportError(f"opset applies to the torch.onnx exporters; the fused graph is written at opset {FUSED_OPSET}")
    if exporter == "auto":
        exporter = "dynamo" if (refusal or opset is not None) else "fused"
    _require_onnx(exporter)
    dynamic = weights == "int8" and source.format == "float" and int8_method == "dynamic"
    nbits_format = weights == "int4" or (weights == "int8" and not dynamic)
    if accuracy_level is not None and (not nbits_format or accuracy_level not in (0, 1, 2, 3, 4)):
        raise ExportError(f"accuracy_level (0-4) applies to MatMulNBits exports (int4, int8 without int8_method='dynamic'); got {accuracy_level!r} with weights={weights}")
    head_codes = build.head_codes_of(source) if weights == "int4" else None
    if lm_head == "int4" and source.format == "gptq" and head_codes is None:
        raise ExportError(
            f"lm_head='int4' from a GPTQ artifact exports the head's own GPTQ codes, and {source.name} has none (extras/lm_head_gptq.safetensors); "
            "re-quantize the float model with quantize.head_codes (the default for 4-bit GPTQ), export the float model for a round-to-nearest 4-bit head, or use lm_head='int8'"
        )
    choice = build.auto_head(source, weights, head_codes) if lm_head in (None, "auto") else None
    lm_head = choice["lm_head"] if choice else lm_head
    if embedding in (None, "auto"):
        # As the head, except beside a 4-bit GPTQ head: its codes are fitted to the final hidden states, and as
        # the lookup table they cost 4-5% more far-domain perplexity than an 8-bit table of its own, which a
        # decoded token reads one row of (the same speed; +vocab x hidden bytes on disk).
        embedding = "int8" if lm_head == "int4" and source.format == "gptq" else lm_head
        if choice is not None:
            choice["embedding"] = embedding
            if lm_head == "int4" and source.format == "gptq":
                choice["embedding_reason"] = ("8-bit codes of its own: the head's 4-bit GPTQ codes as the table cost +4.4% / +5.2% perplexity on the Debian licences "
                                              "(SmolLM2-135M / its quickstart student, benchmarks/results/export_latency-head-levels.md) at the same decode speed; embedding='int4' shares them (vocab x hidden / 2 bytes less)")
    if embedding == "int4" and weights != "int4":
        embedding = "int8"  # as the head: auto never picks int4 outside int4 exports; explicit int4 was refused above
    bits = 4 if weights == "int4" else 8
    level = (DEFAULT_ACCURACY_LEVEL[bits] if accuracy_level is None else accuracy_level) if nbits_format else None
    head_bits = {"int8": 8, "int4": 4}.get(lm_head)
    if lm_head_accuracy_level is not None and (not (nbits_format and head_bits) or lm_head_accuracy_level not in (0, 1, 2, 3, 4)):
        raise ExportError(f"lm_head_accuracy_level (0-4) applies to a quantized LM head of a MatMulNBits export; got {lm_head_accuracy_level!r} with weights={weights}, lm_head={lm_head}")
    head_level = None
    if nbits_format and head_bits:
        head_level = lm_head_accuracy_level if lm_head_accuracy_level is not None else (LM_HEAD_ACCURACY_LEVEL[head_bits] if accuracy_level is None else accuracy_level)
    settings = {
        "weights": weights,
        "device": device,
        "exporter": exporter,
        "opset": opset,
        "accuracy_level": level,  # the quantized decoder layers
        "lm_head_accuracy_level": head_level,
        "block_size": NBITS_BLOCK_SIZE if nbits_format and source.format == "float" else None,
        "int8_method": ("dynamic" if dynamic else "nbits") if weights == "int8" else None,
        "lm_head": lm_head,
        "lm_head_choice": choice,  # why auto chose it (None: asked for explicitly)
        "lm_head_codes": "GPTQ (quantize.head_codes)" if lm_head == "int4" and source.format == "gptq" else ("round-to-nearest" if head_bits else None),
        "embedding": embedding,
        "validate_prompts": list(validate_prompts or DEFAULT_PROMPTS),
    }
    if source.format == "gptq":
        exact = weights == "int4" and level == 0 and lm_head == "float" and settings["embedding"] == "float"
        key = f"{weights}-gptq-exact" if exact else f"{weights}-gptq"
    else:
        key = "int8-dynamic" if dynamic else weights
    check = None
    if weights == "int4" and level and not key.endswith("exact"):
        # int8 activations: the shipped graph gets the bars of the fast kernels (top-1), and the same graph with its
        # 4-bit layers at level 0 the sharp bars of `key` (logit difference, batch invariance)
        check = TOLERANCES[key]
        key += "-level4"
    return build.build_artifact(source, output, settings=settings, head_codes=head_codes if lm_head == "int4" else None, tolerance=TOLERANCES[key], check_tolerance=check, providers=providers, threads=threads, overwrite=overwrite, overwrite_any=overwrite_any, start=start)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ExportError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _require_onnx(exporter: str):
    try:
        import onnx  # noqa: F401
        import onnxruntime

        if exporter == "dynamo":
            import onnxscript  # noqa: F401  (torch's dynamo exporter builds the graph with it)
    except ImportError as err:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({err.name} is missing): pip install 'compress-llm[onnx]'") from None
    return onnxruntime


def genai_config(config: dict, generation: dict, *, num_layers: int, num_kv_heads: int, head_dim: int, provider: str | None, share_buffer: bool = False) -> dict:
    """genai_config.json for onnxruntime-genai (the layout its model builder writes). `share_buffer`: the fused
    graph's GroupQueryAttention updates one max-length KV buffer in place (ORT GenAI binds past and present to
    it); otherwise ORT GenAI feeds each step's present.* back as past_key_values.*."""
    eos = _value(generation, "eos_token_id", config.get("eos_token_id"))
    pad = _value(generation, "pad_token_id", config.get("pad_token_id"))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    context = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": [{"cuda": {}}] if provider == "cuda" else []},
        "filename": MODEL_FILE,
        "head_size": head_dim,
        "hidden_size": config.get("hidden_size") or config.get("n_embd"),
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
        "num_attention_heads": config.get("num_attention_heads") or config.get("n_head"),
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
    }
    return {
        "model": {
            "bos_token_id": _value(generation, "bos_token_id", config.get("bos_token_id")) or 1,
            "context_length": context,
            "decoder": decoder,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": config.get("model_type"),
            "vocab_size": config.get("vocab_size"),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(_value(generation, "do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": float(_value(generation, "repetition_penalty", 1.0)),
            "temperature": float(_value(generation, "temperature", 1.0)),
            "top_k": int(_value(generation, "top_k", 50)),
            "top_p": float(_value(generation, "top_p", 1.0)),
        },
    }


def _value(mapping: dict, key: str, default):
    value = mapping.get(key)
    return default if value is None else value


def save_model(model, directory: Path) -> None:
    """model.onnx, with the weights in model.onnx.data when they are large (one file either way below 2 GB)."""
    import onnx

    size = sum(t.ByteSize() for t in model.graph.initializer)
    path = directory / MODEL_FILE
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=MODEL_FILE + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob(MODEL_FILE + "*"))


def remove_work(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["export_onnx", "ExportResult", "ExportError", "ValidationFailedError", "TOLERANCES", "WEIGHTS", "genai_config"]
