"""`compress export`: the argparse glue. compress/cli.py adds it with `add_export_parser(sub)` and dispatches
`args.command == "export"` to `run_export_cli(args)`; all logic lives in `compress_exporters.onnx`."""
from __future__ import annotations

import argparse

WEIGHTS = ("fp32", "fp16", "int8", "int4")  # compress_exporters.onnx.WEIGHTS, repeated so --help imports no torch


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a model artifact to ONNX (KV cache, fp32/fp16/int8/int4), validated against torch",
        description="Export a float or GPTQ artifact to an ONNX folder (model.onnx, tokenizer, genai_config.json, "
        "compress.json) that ONNX Runtime, onnxruntime-genai and compress_exporters.runtime load. The ONNX model is "
        "compared with the torch model on a few prompts (prefill + decode with the cache) before the folder is written.",
        epilog="examples:\n"
        "  compress export runs/quickstart/student --output runs/quickstart/onnx\n"
        "  compress export runs/quickstart/student --output runs/quickstart/onnx-int4 --weights int4\n"
        "  compress export runs/quickstart/gptq4 --output runs/quickstart/onnx-gptq4 --weights int4   # GPTQ weights carried over exactly\n"
        "  compress export runs/quickstart/student --output runs/onnx-fp16 --weights fp16 --device cuda  # needs onnxruntime-gpu",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("artifact", help="model folder (float or GPTQ), hub id or builtin:NAME")
    parser.add_argument("--output", required=True, help="ONNX folder to create")
    parser.add_argument("--weights", choices=WEIGHTS, default="fp32", help="weight format (default fp32; a GPTQ artifact exports as int4/int8 by its bits)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where validation runs and the model is meant to run (cuda: onnxruntime-gpu)")
    parser.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], help="int4/int8 MatMulNBits compute: 0 = fp32 activations, 4 = int8 activations (faster, but logits depend on the batch). Default: 0 for 4-bit layers, 4 for 8-bit layers and the LM head")
    parser.add_argument("--int8-method", choices=["nbits", "dynamic"], default="nbits", help="int8: weight-only 8-bit MatMulNBits (default) or onnxruntime quantize_dynamic (int8 activations per tensor: less accurate)")
    parser.add_argument("--lm-head-accuracy-level", type=int, choices=[0, 1, 2, 3, 4], help="MatMulNBits compute of a quantized LM head (overrides --accuracy-level for the head); default 4")
    parser.add_argument("--lm-head", choices=["float", "int8", "int4", "auto"], help="LM head precision for int8/int4 exports: int4 = the head's GPTQ codes from a GPTQ artifact (quantize.head_codes), round-to-nearest from a float model; auto (default) = 4 bits where the head is a large share of the bytes a decoded token reads, else 8 (the choice and its reason go into compress.json)")
    parser.add_argument("--embedding", choices=["float", "int8", "int4", "auto"], help="token embedding precision for int8/int4 exports (default: as the LM head; a tied embedding reads the quantized head's own codes)")
    parser.add_argument("--exporter", choices=["auto", "fused", "dynamo", "legacy"], default="auto",
                        help="auto (default): the fused graph (GroupQueryAttention, fused norms and projections; fast) for Llama/Mistral/Qwen2/Qwen3 "
                        "in fp32/int8/int4, else torch.onnx dynamo; legacy: torch's older exporter (faster to export, deprecated upstream)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default 20 with dynamo, 17 with legacy)")
    parser.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT", help="validation prompt (repeatable; default: four built-in prompts)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads during validation")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing ONNX artifact (a folder compress wrote) at --output")
    parser.add_argument("--overwrite-any", action="store_true", help="like --overwrite, and also replace a folder compress did not write (never the input)")
    return parser


def run_export_cli(args) -> int:
    from compress_exporters.onnx import export_onnx

    result = export_onnx(
        args.artifact,
        args.output,
        weights=args.weights,
        device=args.device,
        opset=args.opset,
        accuracy_level=args.accuracy_level,
        lm_head_accuracy_level=args.lm_head_accuracy_level,
        overwrite=args.overwrite,
        overwrite_any=args.overwrite_any,
        validate_prompts=args.prompts,
        exporter=args.exporter,
        lm_head=args.lm_head,
        embedding=args.embedding,
        int8_method=args.int8_method,
        threads=args.threads,
    )
    print(describe(result))
    return 0


def describe(result) -> str:
    v = result.validation
    lines = [
        f"wrote {result.artifact} ({result.weights} from a {result.source_format} model, {result.sizes['model_bytes'] / 1e6:.1f} MB)",
        f"validation vs {v['reference']}: max |logit diff| {v['max_abs_diff']:.3g} (relative {v['max_rel_diff']:.3g}), "
        f"top-1 agreement {v['top1_agreement']:.3f} over {v['positions']} positions ({v['prompts']} prompts, {v['decode_steps']} decode steps)",
    ]
    if "graph_check" in v:
        c = v["graph_check"]
        lines.append(f"graph check, 4-bit layers at accuracy_level 0: relative logit diff {c['max_rel_diff']:.3g}, top-1 {c['top1_agreement']:.3f}, "
                     f"each prompt alone vs in the batch {c['batch_max_rel_diff']:.3g}")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
