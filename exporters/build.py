"""The pipeline behind `export_onnx`: inspect the source artifact, load its torch model (GPTQ layers become
float Linears holding exactly their dequantized weights, which also makes them the validation reference),
convert to fp32 ONNX, apply the weight format, save, check, validate against torch, write the folder.
"""
from __future__ import annotations

import json
import time

import numpy as np
from dataclasses import dataclass
from pathlib import Path

from compress_exporters.onnx import LM_HEAD_BLOCK_SIZE, MODEL_FILE, ExportError, ExportResult, genai_config, model_bytes, remove_work, save_model
from compress_exporters.validation import DECODE_STEPS, Tolerance, ValidationFailedError


@dataclass(frozen=True)
class Source:
    name: str  # as given
    path: str  # local folder or hub id
    local: Path | None
    format: str  # "float" or "gptq"
    quantization: dict  # config.json quantization_config ({} for float)
    model_type: str
    head_dim: int
    rope_type: str | None = None  # "longrope" (Phi-3 128k) switches rotary factors with the length: not in the fused graph


def rope_type(config) -> str | None:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type") or rope.get("type")


def inspect_source(model_dir, weights: str) -> Source:
    """Everything that can be refused is refused here, before any weights load."""
    from transformers import AutoConfig

    from compress import models
    from compress.architectures import layer_layout

    path = models.resolve_source(str(model_dir))
    local = models.local_path(str(model_dir))
    if local is not None:
        models.check_model_folder(local)  # remote code, unreadable weights, shapes, GPTQ groups, NaN/Inf: by name
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ExportError(f"could not read the config of {model_dir}: {err}") from None
    layer_layout(config)  # an unsupported architecture stops here, by name
    quant = getattr(config, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = quant.get("quant_method")
    if method == "bitsandbytes":
        raise ExportError(
            f"{model_dir} is a bitsandbytes artifact; bitsandbytes layers do not export to ONNX. Export the float model "
            "it came from instead (compress export FLOAT_DIR --weights int4 or int8), or quantize that with GPTQ "
            "(compress quantize FLOAT_DIR --method gptq --bits 4) and export the GPTQ folder with --weights int4"
        )
    if method not in (None, "gptq"):
        raise ExportError(f"{model_dir}: quantization {method!r} cannot be exported; export the float model instead")
    if method == "gptq":
        if local is None:
            raise ExportError(f"{model_dir}: GPTQ models export from a local folder; download it first")
        bits = int(quant.get("bits", 0))
        if bits not in (4, 8):
            raise ExportError(f"{model_dir} is a {bits}-bit GPTQ artifact; ONNX export carries 4- or 8-bit GPTQ weights (MatMulNBits). Export the float model instead")
        if weights != f"int{bits}":
            raise ExportError(
                f"{model_dir} is a {bits}-bit GPTQ artifact: export it with --weights int{bits} (its weights are carried over exactly). "
                f"For {weights}, export the float model it was quantized from"
            )
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)) // heads
    return Source(name=str(model_dir), path=path, local=local, format="gptq" if method == "gptq" else "float", quantization=quant, model_type=config.model_type, head_dim=int(head_dim), rope_type=rope_type(config))


def head_codes_of(source: Source):
    """The LM head's GPTQ codes beside a GPTQ artifact (compress.quantize.head_codes), or None."""
    if source.format != "gptq" or source.local is None:
        return None
    from compress.quantize.head_codes import HeadCodesError, read_head_codes

    try:
        return read_head_codes(source.local)
    except HeadCodesError as err:
        raise ExportError(str(err)) from None


def decode_bytes(source: Source) -> tuple[int, int]:
    """(bytes of an 8-bit LM head, bytes of everything else a decoded token reads) of a GPTQ artifact, from the
    tensor shapes in its safetensors headers (nothing is loaded). Tensors with a dimension of the vocabulary size
    are the head and the embedding: the head is read whole every token, an embedding one row. The head's scales
    cost 2 bytes per block of 32; the body is counted as stored (int32 codes, fp16 scales and the rest)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    vocab = int(getattr(AutoConfig.from_pretrained(source.path), "vocab_size", 0) or 0)
    heads, body = [], 0
    for file in sorted(source.local.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as fh:
            for key in fh.keys():
                shape = fh.get_slice(key).get_shape()
                numel = int(np.prod(shape))
                if len(shape) == 2 and vocab in shape:
                    heads.append(numel)
                else:
                    body += numel * (4 if key.endswith((".qweight", ".qzeros")) else 2)
    head = max(heads, default=0)
    return head + head // 16, body  # 1 byte a weight + 2-byte scales per block of 32


# `export.lm_head: auto` (int4 exports), from benchmarks/results/head_int4-*.md and export_latency.md: a 4-bit head
# pays where it is a large share of the bytes a decoded token reads. AUTO_INT4_HEAD_SHARE is the 8-bit head's
# share above which auto takes 4 bits.
AUTO_INT4_HEAD_SHARE = 0.25


def auto_head(source: Source, weights: str, head_codes) -> dict:
    """`lm_head: auto`: the head's precision for this model and why ({lm_head, reason, head_share_8bit})."""
    if weights in ("fp32", "fp16"):
        return {"lm_head": "float", "reason": f"a {weights} export keeps every weight in {weights}"}
    if weights == "int8":
        return {"lm_head": "int8", "reason": "an int8 export keeps its head in 8 bits"}
    if source.format != "gptq":
        return {"lm_head": "int8", "reason": "a float model's head would be rounded to nearest, which costs several % of perplexity in 4 bits (+6% / +7% on SmolLM2-135M, "
                "benchmarks/results/head_int4-teacher.md); 8 bits cost 0.1%. Quantize with GPTQ first for a 4-bit head that keeps quality, or ask for lm_head='int4'"}
    if head_codes is None:
        return {"lm_head": "int8", "reason": "the GPTQ artifact has no head codes (quantize.head_codes); an 8-bit round-to-nearest head keeps its quality"}
    head, body = decode_bytes(source)
    share = head / (head + body) if head + body else 0.0
    if share >= AUTO_INT4_HEAD_SHARE:
        return {"lm_head": "int4", "head_share_8bit": round(share, 3), "reason": f"the 8-bit head would be {share:.0%} of the bytes read per decoded token (>= {AUTO_INT4_HEAD_SHARE:.0%}): 4 bits, its GPTQ codes"}
    return {"lm_head": "int8", "head_share_8bit": round(share, 3), "reason": f"the 8-bit head is {share:.0%} of the bytes read per decoded token (< {AUTO_INT4_HEAD_SHARE:.0%}): 4 bits would save little"}


def fused_refusal(source: Source, weights: str, int8_method: str, device: str = "cpu") -> str | None:
    """Why the fused graph (compress_exporters.graph) cannot export this, or None when it can."""
    from compress_exporters.graph import FUSED_FAMILIES

    if device == "cuda":
        return ("the fused graph computes in fp32 and ONNX Runtime's CUDA GroupQueryAttention has fp16/bf16 kernels only; "
                "on CUDA export weights=fp16 (torch.onnx)")
    if source.model_type not in FUSED_FAMILIES:
        return f"the fused graph covers {', '.join(FUSED_FAMILIES)}, not {source.model_type}"
    if weights == "fp16" or (weights == "int8" and int8_method == "dynamic"):
        return f"the fused graph exports fp32, int8 (MatMulNBits) and int4, not {weights if weights == 'fp16' else 'int8 dynamic'}"
    if source.head_dim % 16:
        return f"ONNX Runtime's GroupQueryAttention needs a head size that is a multiple of 16 (this model's is {source.head_dim})"
    if getattr(source, "rope_type", None) in ("longrope", "dynamic"):
        return f"{source.rope_type} rotary scaling changes its factors with the sequence length; the fused graph's cos/sin caches are fixed"
    return None


def _batch_judged(tolerance: Tolerance, config, prompts) -> Tolerance:
    """The tolerance without its batch-vs-alone bar where the torch model itself is not batch-invariant: rotary
    scaling that switches on the sequence length (Phi-3's longrope, dynamic NTK) once the padded batch crosses the
    original context and a prompt alone does not."""
    import dataclasses

    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope_type(config)
    original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if kind in ("longrope", "dynamic") and original and max(map(len, prompts)) + DECODE_STEPS > int(original):
        return dataclasses.replace(tolerance, max_batch_rel_diff=None)
    return tolerance


def load_reference(source: Source, head_codes=None, *, tie_embedding: bool = False):
    """(torch model in fp32 eval mode, {weight_key: (layer name, NBitsWeight)} for GPTQ layers, the same for the
    LM head when `head_codes` are given). The head then holds its GPTQ codes dequantized, so the reference is the
    model the folder computes; a tied embedding keeps reading the head (`tie_embedding`, the 4-bit embedding that
    shares its codes) or is untied and keeps its float values."""
    from compress import models

    if source.format == "float":
        from compress.moe import unfuse_experts

        model = models.load_model(source.path)
        unfuse_experts(model)  # 3-D expert tensors: grouped_mm does not export; one MatMul per expert projection does
        return model, {}, {}
    import torch
    from torch import nn

    from compress.quantize.gptq_checkpoint import GPTQLinear
    from compress_exporters.weights import weight_key

    model = models.load_quantized(source.local, device="cpu")
    nbits = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, GPTQLinear):
            continue
        W = module.dequantized_weight(torch.float32)  # (out, in)
        packed = _repacked(module.packed(), W, f"{source.name}: layer {name}")
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.data = W
        if module.bias is not None:
            linear.bias.data = module.bias.data.float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        nbits[weight_key(W.T.numpy())] = (name, packed)
    return model.eval(), nbits, (_head_from_codes(model, head_codes, tie_embedding, source) if head_codes is not None else {})


def _embedding_as_exported(model) -> None:
    """The reference's embedding rounded as the export rounds an embedding that gets 4-bit codes of its own
    (ONNX Runtime's symmetric quantizer, blocks of 32), so a GPTQ folder stays checked against the model it
    computes: quantizing these values again gives the same codes (each block's extreme is a code of -8 times its
    scale, which the quantizer maps back to that scale exactly). A head tied to it keeps the float values."""
    import torch
    from torch import nn

    from compress_exporters.matmulnbits import dequantize
    from compress_exporters.onnx import NBITS_BLOCK_SIZE
    from compress_exporters.weights import nbits_rtn

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is embedding.weight:
        _untie_head(model, head.weight.detach().clone())
    table = embedding.weight.detach().float().numpy()
    rounded = dequantize(nbits_rtn(table.T, bits=4, block_size=NBITS_BLOCK_SIZE)).T
    embedding.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(rounded)), requires_grad=False)


def _head_from_codes(model, codes, tie_embedding: bool, source: Source) -> dict:
    """Put the head's dequantized GPTQ codes into `model`; {weight_key: ("lm_head", NBitsWeight)}."""
    import torch

    from compress_exporters.weights import weight_key

    head = model.get_output_embeddings()
    vocab, hidden = head.weight.shape
    W = codes.dequantized(torch.float32)
    if tuple(W.shape) != (vocab, hidden):
        raise ExportError(f"{source.name}: the head codes ({codes.module}, {tuple(W.shape)}) do not fit the model's head ({vocab} x {hidden}); re-quantize, or export with lm_head='int8'")
    packed = _repacked(codes.packed, W, f"{source.name}: LM head codes")
    if model.get_input_embeddings().weight is head.weight and not tie_embedding:
        _untie_head(model, W)  # the head gets the codes, the embedding stays float
    else:
        head.weight.data = W
    return {weight_key(W.T.numpy()): ("lm_head", packed)}


def _repacked(gptq, W, where: str):
    """A GPTQ weight (`PackedGPTQ`) as MatMulNBits stores it, checked to dequantize to exactly `W` (out, in)."""
    from compress.quantize.packing import unpack
    from compress_exporters.matmulnbits import UnmappableGroupsError, dequantize, from_gptq

    codes, zeros = unpack(gptq)
    try:
        packed = from_gptq(codes.numpy(), gptq.scales.float().numpy(), zeros.numpy(), gptq.g_idx.numpy(), gptq.bits)
    except UnmappableGroupsError as err:
        raise ExportError(f"{where}: {err}") from None
    if not np.array_equal(dequantize(packed), W.T.numpy()):
        raise RuntimeError(f"{where}: MatMulNBits repacking does not reproduce the GPTQ weight exactly (a bug)")
    return packed


def _untie_head(model, weight) -> None:
    """Give the model a head of its own holding `weight` (vocab, hidden), leaving the embedding as it is."""
    from torch import nn

    head = model.get_output_embeddings()
    untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    untied.weight = nn.Parameter(weight, requires_grad=False)
    if head.bias is not None:
        untied.bias = head.bias
    model.set_output_embeddings(untied)


def apply_weights(proto, source: Source, settings: dict, nbits: dict, work: Path, *, carried: set[str] | None = None, head_nbits: dict | None = None):
    """(model in the requested format, its quantization details for compress.json). `carried`: the GPTQ layers
    the fused graph already wrote as MatMulNBits (None: the traced graph, whose MatMuls are matched here)."""
    from compress_exporters import weights as fmt

    weights, lm_head, level = settings["weights"], settings["lm_head"], settings["accuracy_level"]
    fmt.strip_metadata(proto)
    if weights == "fp32":
        return proto, {}
    if weights == "fp16":
        return fmt.to_fp16(proto), {}
    if lm_head in ("int8", "int4"):
        fmt.untie_lm_head(proto)  # a tied head reads Transpose(embedding): give it a constant to quantize
    head = fmt.find_lm_head(proto)
    head_names = [head.name] if head is not None else []
    details: dict = {"lm_head": lm_head}
    if settings["int8_method"] == "dynamic":
        details["method"] = "onnxruntime quantize_dynamic: int8 weights per channel, activations per tensor"
        proto = fmt.quantize_int8(proto, work, exclude=[] if lm_head == "int8" else head_names)
    elif source.format == "gptq":
        if carried is None:
            found = fmt.replace_with_nbits(proto, nbits, accuracy_level=level)
            missing = sorted(layer for key, (layer, _) in nbits.items() if key not in found)
        else:
            missing = sorted(layer for layer, _ in nbits.values() if layer not in carried)
        if missing:
            raise ExportError(f"GPTQ layers {missing[:4]} were not found as MatMuls of the exported graph; cannot carry their weights over")
        nodes = sum(n.domain == fmt.MS_DOMAIN and n.op_type == "MatMulNBits" for n in proto.graph.node)
        act_order = sum(w.perm is not None for _, w in nbits.values())
        details.update(method="GPTQ codes repacked into MatMulNBits", layers=len(nbits), matmulnbits_nodes=nodes, act_order_layers=act_order, block_sizes=sorted({w.block_size for _, w in nbits.values()}))
        if head_nbits:
            if not fmt.replace_with_nbits(proto, head_nbits, accuracy_level=settings["lm_head_accuracy_level"]):
                raise ExportError("the LM head was not found as a MatMul of the exported graph; cannot carry its GPTQ codes over (export with lm_head='int8')")
            (_, w), = head_nbits.values()
            details.update(lm_head_method="GPTQ codes (quantize.head_codes) repacked into MatMulNBits", lm_head_block_size=w.block_size, lm_head_act_order=w.perm is not None)
    else:
        from compress_exporters.onnx import NBITS_BLOCK_SIZE

        bits = 4 if weights == "int4" else 8
        proto = fmt.quantize_nbits(proto, bits=bits, block_size=NBITS_BLOCK_SIZE, accuracy_level=level, exclude=head_names)
        details.update(method=f"onnxruntime MatMulNBitsQuantizer, {bits}-bit symmetric round-to-nearest, block {NBITS_BLOCK_SIZE}")
        if lm_head == "int4" and head is not None:
            proto = fmt.quantize_nbits(proto, bits=4, block_size=NBITS_BLOCK_SIZE, accuracy_level=settings["lm_head_accuracy_level"], include=head_names)
            details.update(lm_head_method=f"4-bit round-to-nearest, block {NBITS_BLOCK_SIZE}", lm_head_block_size=NBITS_BLOCK_SIZE)
    if lm_head == "int8" and head is not None and settings["int8_method"] != "dynamic" and any(n.name == head.name and n.op_type == "MatMul" for n in proto.graph.node):
        proto = fmt.quantize_nbits(proto, bits=8, block_size=LM_HEAD_BLOCK_SIZE, accuracy_level=settings["lm_head_accuracy_level"], include=head_names)
    if settings["embedding"] in ("int8", "int4"):
        from compress_exporters.onnx import NBITS_BLOCK_SIZE

        bits = 8 if settings["embedding"] == "int8" else 4
        try:
            details.update(fmt.quantize_embedding(proto, fmt.find_lm_head(proto), bits=bits, block_size=LM_HEAD_BLOCK_SIZE if bits == 8 else NBITS_BLOCK_SIZE))
        except ValueError as err:
            raise ExportError(f"embedding={settings['embedding']!r}: {err}; export with embedding='float'") from None
    return proto, details


def build_artifact(source: Source, output: Path, *, settings: dict, head_codes=None, tolerance: Tolerance, providers: list[str], threads: int | None, overwrite: bool, start: float, overwrite_any: bool = False, check_tolerance: Tolerance | None = None) -> ExportResult:
    import onnx
    import torch

    from compress import models
    from compress.artifacts import RECORD_FILE, ArtifactRecord, describe_input, device_info, staging_dir, write_json_atomic
    from compress_exporters.decoder import cache_layout, export_decoder
    from compress_exporters.runtime import create_session
    from compress_exporters.validation import compare_with_torch, report, torch_reference
    from compress_exporters.weights import op_counts

    # A tied embedding shares the 4-bit head's codes unless act-order permuted them (quantize_embedding then gives
    # it its own): only a shared one keeps reading the head in the reference.
    tie = settings["embedding"] == "int4" and head_codes is not None and not head_codes.act_order
    model, nbits, head_nbits = load_reference(source, head_codes, tie_embedding=tie)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    shared = settings["lm_head"] == "int4" and head is not None and embedding.weight is head.weight  # the graph's lookup will read the head's codes
    if source.format == "gptq" and settings["embedding"] == "int4" and not shared:
        _embedding_as_exported(model)
    tokenizer = models.load_tokenizer(source.path)
    prompt_ids = [list(tokenizer(p)["input_ids"]) for p in settings["validate_prompts"]]
    if not prompt_ids or not all(prompt_ids):
        raise ExportError("validate_prompts must be non-empty texts that tokenize to at least one token")
    layout = cache_layout(model)
    notes = []
    if settings["weights"] == "fp16" and settings["device"] == "cpu":
        notes.append("fp16 is meant for CUDA (--device cuda): ONNX Runtime's CPU provider has few fp16 kernels and runs it slower than fp32; on CPU prefer fp32, int8 or int4")
    with staging_dir(output, inputs=[source.local], overwrite=overwrite, overwrite_any=overwrite_any) as tmp:
        work = tmp / ".work"
        work.mkdir()
        t0 = time.perf_counter()
        fused = None
        if settings["exporter"] == "fused":
            proto, fused, carried = _fused_graph(model, source, settings, nbits)
            opset = proto.opset_import[0].version
        else:
            opset = export_decoder(model, work / "decoder.onnx", layout, exporter=settings["exporter"], opset=settings["opset"])
            proto, carried = onnx.load(str(work / "decoder.onnx")), None
        export_s = time.perf_counter() - t0
        proto, quant_details = apply_weights(proto, source, settings, nbits, work, carried=carried, head_nbits=head_nbits)
        if quant_details.get("act_order_layers"):
            notes.append(f"{quant_details['act_order_layers']} layers carry act-order's scattered groups: their inputs are permuted by a Gather each decoded token, "
                         "which cost 5-12% of decode speed on the quickstart models (benchmarks/results/export_latency-static-groups.md); "
                         "quantize with quantize.static_groups: true for a folder without them")
        ops = op_counts(proto)
        save_model(proto, tmp)
        del proto
        remove_work(work)
        onnx.checker.check_model(str(tmp / MODEL_FILE))  # by path: models over 2 GB only check this way
        session = create_session(tmp / MODEL_FILE, providers, threads)
        if settings["device"] == "cuda" and torch.cuda.is_available():
            model.to("cuda")
        reference_rows = torch_reference(model, prompt_ids)  # one torch run for the folder and its graph check
        comparison = compare_with_torch(session, model, prompt_ids, reference=reference_rows)
        tolerance = _batch_judged(tolerance, model.config, prompt_ids)
        reference = "torch fp32, GPTQ weights dequantized (compress.models.load_quantized)" if source.format == "gptq" else "torch fp32"
        validation = report(comparison, tolerance, reference)
        used_providers = session.get_providers()
        del session
        if check_tolerance is not None:
            check = graph_check(tmp / MODEL_FILE, reference_rows, prompt_ids, providers, threads)
            validation["graph_check"] = report(check, _batch_judged(check_tolerance, model.config, prompt_ids), reference + "; the folder's graph with its 4-bit layers at accuracy_level 0")
            if not validation["graph_check"]["passed"]:
                raise ValidationFailedError(
                    f"the ONNX graph ({settings['weights']} from a {source.format} model) does not match {reference} with its 4-bit layers at accuracy_level 0 "
                    f"(fp32 activations, which leave only the graph's own errors): {_misses(check, check_tolerance)}. Nothing was written to {output}. "
                    "Try weights=fp32 to tell a format problem from an export problem"
                )
        if not validation["passed"]:
            raise ValidationFailedError(
                f"the ONNX export ({settings['weights']} from a {source.format} model) does not match {reference}: {_misses(comparison, tolerance)}. "
                f"Nothing was written to {output}. Try weights=fp32 to tell a format problem from an export problem"
            )
        tokenizer.save_pretrained(tmp)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = model.generation_config.to_dict() if getattr(model, "generation_config", None) is not None else {}
        if generation:
            model.generation_config.save_pretrained(tmp)
        provider = "cuda" if settings["device"] == "cuda" else None
        write_json_atomic(tmp / "genai_config.json", genai_config(config, generation, num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, provider=provider, share_buffer=settings["exporter"] == "fused"))
        from compress_exporters.folder_readme import folder_readme
        from compress_exporters.graph import KEEP_INPUT

        fused_graph = settings["exporter"] == "fused"
        (tmp / "README.md").write_text(folder_readme(tmp / MODEL_FILE, config=config, kv=vars(layout), settings=settings, share_buffer=fused_graph, keep_input=KEEP_INPUT if fused_graph else None))
        sizes = {"model_bytes": model_bytes(tmp), "source_weight_bytes": sum(p.stat().st_size for p in source.local.glob("*.safetensors")) if source.local else 0}
        record = ArtifactRecord(
            stage="export",
            recipe={"export": settings},
            inputs=[describe_input("model", source.name, source.local)],
            metrics={"validation": validation, "sizes": sizes, "export_time_s": round(export_s, 3)},
            device={**device_info(settings["device"] if torch.cuda.is_available() else "cpu"), "onnxruntime_providers": used_providers},
            wall_time_s=time.perf_counter() - start,
            extra={
                "onnx": {"opset": opset, "exporter": settings["exporter"], "source_format": source.format, "source_quantization": source.quantization or None, "weights": quant_details, "ops": ops, "kv_cache": vars(layout), "fused_projections": fused, "versions": _onnx_versions()},
                "notes": notes,
            },
        ).to_json()
        write_json_atomic(tmp / RECORD_FILE, record)
    return ExportResult(artifact=output, weights=settings["weights"], source_format=source.format, validation=validation, sizes=sizes, notes=tuple(notes), record=record)


def graph_check(path: Path, reference_rows, prompt_ids, providers: list[str], threads: int | None):
    """The folder's graph compared with torch (`reference_rows`: validation.torch_reference) with its 4-bit decoder
    layers at accuracy_level 0, the LM head as written: int8 activations blur a wrong graph into the noise of the
    fast kernels (a wrong RoPE base moved the teacher's max logit difference from 0.087 to 0.090 at level 4, from
    0.035 to 0.075 at 0, accuracy_level.md), so the structure is judged where only it can differ. A copy of the
    graph beside the model (its external data, if any, is found by the same relative path) is loaded, compared
    and removed."""
    import onnx
    from onnx import helper

    from compress_exporters.runtime import create_session
    from compress_exporters.validation import compare_with_torch
    from compress_exporters.weights import find_lm_head

    proto = onnx.load(str(path), load_external_data=False)
    head = find_lm_head(proto)
    for node in proto.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMulNBits" and attrs["bits"].i == 4 and (head is None or node.name != head.name) and "accuracy_level" in attrs:
            node.attribute.remove(attrs["accuracy_level"])
            node.attribute.append(helper.make_attribute("accuracy_level", 0))
    copy = path.with_name(".graph-check.onnx")
    onnx.save_model(proto, str(copy))
    del proto
    try:
        return compare_with_torch(create_session(copy, providers, threads), None, prompt_ids, reference=reference_rows)
    finally:
        copy.unlink(missing_ok=True)


def _misses(comparison, tolerance: Tolerance) -> str:
    """What a validation measured against what its tolerance allows, for the refusal."""
    return (f"max relative logit difference {comparison.max_rel_diff:.3g} (allowed {_bar(tolerance.max_rel_diff)}), "
            f"top-1 agreement {comparison.top1_agreement:.3f} (required {tolerance.min_top1:g}) over {comparison.positions} positions "
            f"of {comparison.prompts} prompts and {comparison.decode_steps} decode steps; each prompt alone vs in the batch: max relative "
            f"difference {comparison.batch_max_rel_diff:.3g} (allowed {_bar(tolerance.max_batch_rel_diff)})")


def _bar(value: float | None) -> str:
    return "not judged" if value is None else f"{value:g}"


def _fused_graph(model, source: Source, settings: dict, nbits: dict):
    """(fused fp32/GPTQ graph, {fused projection: torch layers}, GPTQ layers carried or None for a float source)."""
    from compress_exporters.graph import FloatProjector, build_fused_decoder
    from compress_exporters.weights import NBitsProjector

    if source.format != "gptq":
        proto, fused = build_fused_decoder(model, projector=FloatProjector())
        return proto, fused, None
    projector = NBitsProjector({layer: packed for layer, packed in nbits.values()}, accuracy_level=settings["accuracy_level"])
    proto, fused = build_fused_decoder(model, projector=projector)
    return proto, fused, projector.used


def _onnx_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found

