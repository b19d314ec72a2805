"""MatMulNBits accuracy_level 0 vs 4 on the teacher's int4 ONNX exports (issue 14): what the default costs or buys.

accuracy_level 0 computes the int4 (and the 8-bit LM head's) matmuls with fp32 activations; 4 quantizes the
activations to int8 inside the kernel (ONNX Runtime's fast CPU path, what onnxruntime-genai's builder uses).
For int4 exports of the teacher, from its GPTQ artifact (--gptq: the codes repacked exactly) and from the float
model (ONNX Runtime's round-to-nearest quantizer), at each level:

- export-time validation, as compress.json records it (4 prompts, left-padded batch + 4 decode steps);
- top-1 agreement with the torch model the folder came from (GPTQ dequantized, or fp32) and with torch fp32,
  at every position of held-out windows, and perplexity there (builtin:pydocs/eval, builtin:licenses/eval);
- batch invariance: prompts of unequal lengths run as one left-padded batch (2 and 4 rows) and each alone,
  then --steps decode steps feeding the returned cache back; max |logit difference| and the share of positions
  whose argmax differs;
- speed at batch 1 through compress_exporters.runtime (shared KV buffer): decode tok/s and a 512-token prefill,
  median over --repeats rounds, variants alternating.

    python benchmarks/accuracy_level.py --gptq runs/teacher-gptq4

Writes benchmarks/results/accuracy_level.json and accuracy_level.md (generated from the JSON by render()).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from export_latency import load_average, prompt_ids, report_header, summarize  # noqa: E402
from latency_variants import OnnxVariant  # noqa: E402

from compress_exporters.validation import DEFAULT_PROMPTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
DOMAINS = {"pydocs": "builtin:pydocs/eval", "licenses": "builtin:licenses/eval"}
# name -> (source: "gptq" or "float", accuracy_level passed to export_onnx; None = the default)
VARIANTS = {
    "gptq-int4-default": ("gptq", None),
    "gptq-int4-L4": ("gptq", 4),
    "gptq-int4-L0": ("gptq", 0),
    "rtn-int4-default": ("float", None),
    "rtn-int4-L4": ("float", 4),
}
BATCH_LENGTHS = (96, 57, 128, 20)  # prompt lengths of the batch-invariance rows (unequal: left padding)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="builtin:smollm2-135m")
    p.add_argument("--gptq", type=Path, required=True, help="GPTQ 4-bit artifact of the teacher (compress quantize builtin:smollm2-135m --method gptq --bits 4 --output DIR)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "accuracy_level", help="where the exports are written (kept, reused)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=8, help="windows per domain for perplexity and top-1")
    p.add_argument("--length", type=int, default=512, help="tokens per window")
    p.add_argument("--steps", type=int, default=16, help="decode steps of the batch-invariance check")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=RESULTS / "accuracy_level")
    return p.parse_args(argv)


def variants(args) -> dict[str, tuple[str, int | None]]:
    """name -> (source folder, accuracy_level); all with the default 8-bit LM head and embedding."""
    return {name: (str(args.gptq) if kind == "gptq" else args.teacher, level) for name, (kind, level) in VARIANTS.items()}


def ensure_export(name: str, source: str, level: int | None, args) -> Path:
    from compress_exporters.onnx import export_onnx

    folder = args.work / name
    if not (folder / "compress.json").is_file():
        print(f"exporting {source} -> {folder} (int4, accuracy_level {'default' if level is None else level})", flush=True)
        t = time.perf_counter()
        export_onnx(source, folder, weights="int4", accuracy_level=level, overwrite=True, threads=args.threads)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    return folder


def windows(tokenizer_source: str, count: int, length: int) -> dict[str, np.ndarray]:
    from compress import models
    from compress.data import packed_blocks

    tokenizer = models.load_tokenizer(tokenizer_source)
    return {d: packed_blocks(s, tokenizer, seq_len=length, text_field="text", max_tokens=count * length, cache_dir=None)[:count].numpy() for d, s in DOMAINS.items()}


def torch_logits(model, data: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    import torch

    with torch.no_grad():
        return {d: [model(input_ids=torch.tensor(w[None])).logits[0].float().numpy() for w in ws] for d, ws in data.items()}


def nll_and_top1(logits: list[np.ndarray], data: np.ndarray, references: dict[str, list[np.ndarray]]) -> dict:
    nll, count = 0.0, 0
    agree = {r: 0 for r in references}
    for i, (lg, ids) in enumerate(zip(logits, data)):
        x = lg[:-1].astype(np.float64)
        top = x.max(-1, keepdims=True)
        logz = np.log(np.exp(x - top).sum(-1)) + top[:, 0]
        nll += float((logz - x[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
        for r, ref in references.items():
            agree[r] += int((lg.argmax(-1) == ref[i].argmax(-1)).sum())
    positions = sum(len(ids) for ids in data)
    return {"perplexity": round(float(np.exp(nll / count)), 4), **{f"top1_vs_{r}": round(agree[r] / positions, 4) for r in references}}


def batch_invariance(session, text: np.ndarray, steps: int) -> dict:
    """Rows of BATCH_LENGTHS prompt tokens (from different windows), then `steps` forced next tokens of each text."""
    from compress_exporters.validation import onnx_rows

    prompts = [text[i % len(text)][:n].tolist() for i, n in enumerate(BATCH_LENGTHS)]
    forced = np.stack([text[i % len(text)][n:n + steps] for i, n in enumerate(BATCH_LENGTHS)]).astype(np.int64)
    alone = [onnx_rows(session, [p], forced[r:r + 1])[0] for r, p in enumerate(prompts)]
    out = {}
    for batch in (2, 4):
        rows = onnx_rows(session, prompts[:batch], forced[:batch])
        prefill = [np.abs(rows[r][:len(p)] - alone[r][:len(p)]).max() for r, p in enumerate(prompts[:batch])]
        decode = [np.abs(rows[r][len(p):] - alone[r][len(p):]).max() for r, p in enumerate(prompts[:batch])]
        top1 = np.concatenate([rows[r].argmax(-1) == alone[r].argmax(-1) for r in range(batch)])
        out[str(batch)] = {"prefill_max_abs_diff": round(float(max(prefill)), 5), "decode_max_abs_diff": round(float(max(decode)), 5), "top1_equal": round(float(top1.mean()), 4), "positions": int(top1.size)}
    return out


def broken_references(folder: Path, source: str, prompt_ids: list[list[int]]) -> dict:
    """The export-time check (validation.compare_with_torch, the prompts compress export uses) of this folder
    against its own torch model and against that model broken the ways an export goes wrong: the RoPE base
    transformers 4.x read from our old configs (10000 for 100000), one middle layer left out, and the
    embedding scaled by 0.5. A bar between "correct" and the broken ones tells them apart."""
    import torch

    from compress import models
    from compress_exporters.runtime import create_session
    from compress_exporters.validation import compare_with_torch

    session = create_session(folder / "model.onnx")
    base = models.load_quantized(source) if Path(source).is_dir() else models.load_model(source)
    out = {}
    for how in ("correct", "rope-base-10000", "middle-layer-dropped", "embedding-x0.5"):
        model = copy.deepcopy(base)  # each breakage on a fresh copy of the one loaded model
        if how == "rope-base-10000":
            rotary = model.model.rotary_emb
            dim = rotary.inv_freq.numel() * 2
            inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            rotary.inv_freq.copy_(inv)
            if hasattr(rotary, "original_inv_freq"):
                rotary.original_inv_freq = inv.clone()
        elif how == "middle-layer-dropped":
            layers = model.model.layers
            del layers[len(layers) // 2]
            for i, layer in enumerate(layers):
                layer.self_attn.layer_idx = i
            model.config.num_hidden_layers = len(layers)
        elif how == "embedding-x0.5":
            with torch.no_grad():
                model.model.embed_tokens.weight.mul_(0.5)  # tied: the head too
        c = compare_with_torch(session, model, prompt_ids)
        out[how] = {"top1_agreement": round(c.top1_agreement, 4), "max_abs_diff": round(c.max_abs_diff, 4)}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from compress import models

    report = {**report_header(args, ("threads", "windows", "length", "steps", "repeats", "new_tokens")), "batch_prompt_lengths": list(BATCH_LENGTHS)}
    specs = variants(args)
    folders = {name: ensure_export(name, source, level, args) for name, (source, level) in specs.items()}
    data = windows(args.teacher, args.windows, args.length)
    import torch

    torch.set_num_threads(args.threads)
    tokenizer = models.load_tokenizer(args.teacher)
    prompts_ids = [list(tokenizer(t)["input_ids"]) for t in DEFAULT_PROMPTS]
    refs = {"fp32": torch_logits(models.load_model(args.teacher), data), "gptq": torch_logits(models.load_quantized(args.gptq), data)}
    rows = {}
    for name, (source, level) in specs.items():
        record = json.loads((folders[name] / "compress.json").read_text())
        v = record["metrics"]["validation"]
        lm = OnnxVariant(name, folders[name], args.threads, spin=False)
        own = "gptq" if name.startswith("gptq") else "fp32"
        quality = {}
        for d, ws in data.items():
            logits = [lm.logits(w.tolist()) for w in ws]
            quality[d] = nll_and_top1(logits, ws, {r: refs[r][d] for r in dict.fromkeys([own, "fp32"])})
        rows[name] = {
            "source": "gptq" if own == "gptq" else "float (round-to-nearest, blocks of 32)",
            "reference": own,
            "accuracy_level": record["recipe"]["export"]["accuracy_level"],  # the 4-bit layers
            "lm_head_accuracy_level": record["recipe"]["export"].get("lm_head_accuracy_level", record["recipe"]["export"]["accuracy_level"]),
            "default": level is None,
            "validation": {k: v.get(k) for k in ("top1_agreement", "max_abs_diff", "batch_max_abs_diff", "batch_top1_agreement", "positions")},
            "quality": quality,
            "batch_invariance": batch_invariance(lm.lm._every_position_session(), data["pydocs"], args.steps),
            "model_bytes": record["metrics"]["sizes"]["model_bytes"],
            "broken_references": broken_references(folders[name], source, prompts_ids),
        }
        print(name, json.dumps({k: rows[name][k] for k in ("validation", "quality", "batch_invariance")}), flush=True)
        del lm
    for ref_name in refs:  # the torch models' own perplexity, for scale
        report.setdefault("torch_perplexity", {})[ref_name] = {d: nll_and_top1(refs[ref_name][d], data[d], {})["perplexity"] for d in data}
    # speed: batch 1 through the runtime, variants alternating round by round
    prompts = {n: prompt_ids(args.teacher, n) for n in (32, 512)}
    loaded = {name: OnnxVariant(name, folders[name], args.threads, spin=False) for name in specs}
    speed = {name: {"decode_tok_s": [], "prefill_512_s": [], "load_average": []} for name in specs}
    for variant in loaded.values():  # warm-up
        variant.prefill(prompts[512])
        variant.decode(prompts[32], 8)
    for round_ in range(args.repeats):
        for name, variant in (list(loaded.items()) if round_ % 2 == 0 else list(loaded.items())[::-1]):
            s = speed[name]
            s["prefill_512_s"].append(variant.prefill(prompts[512]))
            s["decode_tok_s"].append(variant.decode(prompts[32], args.new_tokens))
            s["load_average"].append(load_average())
            print(f"round {round_ + 1}/{args.repeats} {name}: decode {s['decode_tok_s'][-1]:.1f} tok/s, prefill 512 {s['prefill_512_s'][-1]:.3f} s (load {s['load_average'][-1]})", flush=True)
    for name, s in speed.items():
        rows[name]["speed"] = {"decode_tok_s": summarize(s["decode_tok_s"], rate=True), "prefill_512_s": summarize(s["prefill_512_s"]), "load_average": s["load_average"]}
    report["rows"] = rows
    report["load_average_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0


def render(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        "# MatMulNBits accuracy_level 0 vs 4: int4 exports of the teacher",
        "",
        f"Command: `{report['command']}` (at commit {report['git']}). Machine: {m['cpu']}, {m['threads']} threads of {m['cores']} cores; "
        f"load average at start {report['load_average_start'][0]:.2f}, end {report['load_average_end'][0]:.2f}. Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        f"Quality: {s['windows']} windows of {s['length']} tokens per domain, every position's logits. Top-1: the share of positions whose argmax "
        "equals the torch model's (own: the model the folder was exported from, GPTQ dequantized or fp32). Torch perplexity: "
        + "; ".join(f"{r} " + ", ".join(f"{d} {v:.3f}" for d, v in ppl.items()) for r, ppl in report["torch_perplexity"].items()) + ".",
        "",
        f"Batch invariance: prompts of {', '.join(map(str, report['batch_prompt_lengths']))} tokens, left-padded into batches of 2 and 4, then {s['steps']} decode "
        "steps, each row against the same prompt run alone: max |logit difference| at prompt positions / decode steps, and the share of positions "
        "with the same argmax. Speed: batch 1 through compress_exporters.runtime, "
        f"{s['new_tokens']} tokens after a 32-token prompt and a 512-token prefill, median over {s['repeats']} rounds (variants alternating).",
        "",
        "| variant | level: 4-bit layers / 8-bit head | export check: top-1 / batch max diff | top-1 vs own torch (pydocs / licenses) | top-1 vs fp32 (pydocs / licenses) "
        "| ppl pydocs | ppl licenses | batch 2: max diff prefill / decode, argmax equal | batch 4: max diff prefill / decode, argmax equal | decode tok/s | prefill 512 (s) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["rows"].items():
        q, v, b = r["quality"], r["validation"], r["batch_invariance"]
        own, domains = r["reference"], list(q)
        loads = r["speed"]["load_average"]
        cell = lambda k: " / ".join(f"{q[d][k]:.3f}" for d in domains)  # noqa: E731
        bcell = lambda n: f"{b[n]['prefill_max_abs_diff']:.3g} / {b[n]['decode_max_abs_diff']:.3g}, {b[n]['top1_equal']:.3f}"  # noqa: E731
        lines.append(
            f"| {name} | {r['accuracy_level']} / {r['lm_head_accuracy_level']}{' (default)' if r.get('default') else ''} | {v['top1_agreement']:.3f} / {v['batch_max_abs_diff']:.3g} | {cell(f'top1_vs_{own}')} | {cell('top1_vs_fp32')} "
            f"| {q['pydocs']['perplexity']:.3f} | {q['licenses']['perplexity']:.3f} | {bcell('2')} | {bcell('4')} "
            f"| {r['speed']['decode_tok_s']['median']:.1f} | {r['speed']['prefill_512_s']['median']:.3f} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
