"""The LM head in 4 bits: GPTQ against round-to-nearest, measured on the head alone.

The body (every block) is GPTQ'd 4-bit as the quickstart recipe does it (`quantize:` of recipes/quickstart.yaml,
the same 128 x 512 calibration tokens of pydocs train), and the final hidden states it produces are kept: on
the calibration text (the head's GPTQ Hessian) and on held-out windows of two domains (pydocs eval, the GPTQ
domain; the Debian licence texts, far from it). Each head variant then gives logits = hidden @ W_head^T on the
same hidden states, so the rows differ in the head only:

- float: the head as trained (what `export.lm_head: float` keeps);
- int8 RTN, blocks of 128 (today's default 8-bit head: ONNX Runtime's MatMulNBits quantizer, as exported);
- int4 RTN, blocks of 32/64/128 (the same quantizer at 4 bits; onnxruntime-genai's builder uses 32);
- int4 GPTQ, groups of 32/64/128, with and without act-order (`compress.quantize.calibrate.quantize_head`).

Per variant: perplexity on both domains, KL(float head || variant) and top-1 agreement with the float head
over every held-out position, the head's bytes (codes + scales), and the head's share of the bytes a decoded
token reads (the body's 4-bit codes + this head; a tied embedding reads one row per token, nothing).

    python benchmarks/head_int4.py --model builtin:smollm2-135m --label teacher
    python benchmarks/head_int4.py --model runs/quickstart/student --label student
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from export_latency import quality_windows, report_header, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m", help="float model folder or builtin id")
    p.add_argument("--label", default="teacher")
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml", help="its quantize: section GPTQs the body")
    p.add_argument("--windows", type=int, default=8, help="held-out windows per domain")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "head_int4")
    p.add_argument("--out", type=Path, default=None, help="results path without suffix (default results/head_int4-LABEL)")
    return p.parse_args(argv)


@torch.no_grad()
def final_hidden_states(model, windows: list[list[int]]) -> list[torch.Tensor]:
    """What the LM head reads at every position of each window (after the final norm)."""
    head = model.get_output_embeddings()
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].detach().float()))
    try:
        for ids in windows:
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    if len(seen) != len(windows):
        raise RuntimeError("the head's input was not captured once per window")
    return seen


def nbits_dequantized(W: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, int]:
    """(out, in) weight through ONNX Runtime's MatMulNBits quantizer and back, and its bytes (codes + scales)."""
    from compress_exporters.matmulnbits import dequantize
    from compress_exporters.weights import nbits_rtn

    packed = nbits_rtn(np.ascontiguousarray(W.T), bits=bits, block_size=block)
    return dequantize(packed).T, packed.B.nbytes + packed.scales.size * 2  # fp16 scales once stored


def gptq_bytes(rows: int, cols: int, bits: int, group: int) -> int:
    return rows * cols * bits // 8 + rows * (-(-cols // group)) * 2


@torch.no_grad()
def score(name: str, W: torch.Tensor, hidden: dict[str, list[torch.Tensor]], windows: dict[str, list[list[int]]], reference: dict) -> dict:
    """Perplexity per domain, and KL / top-1 against the float head (`reference`: its log-probs per window)."""
    out: dict = {"perplexity": {}, "kl_to_float": {}, "top1_vs_float": {}}
    for domain, states in hidden.items():
        nll = kl = agree = count = 0.0
        for i, (x, ids) in enumerate(zip(states, windows[domain])):
            logp = torch.log_softmax(x @ W.T, -1)[:-1]
            target = torch.tensor(ids[1:])
            nll += float(-logp[torch.arange(len(target)), target].sum())
            ref = reference[domain][i]
            kl += float((ref.exp() * (ref - logp)).sum())
            agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
            count += len(target)
        out["perplexity"][domain] = round(float(np.exp(nll / count)), 3)
        out["kl_to_float"][domain] = round(kl / count, 5)
        out["top1_vs_float"][domain] = round(agree / count, 4)
    print(f"{name}: {out}", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    from compress import models
    from compress.architectures import get_blocks
    from compress.quantize.calibrate import head_inputs, quantize_blocks, quantize_head
    from compress.quantize.grid import QuantGrid
    from compress.quantize.stage import calibration_blocks, check_packable, resolve_group_size
    from compress.recipe import load_recipe

    report = report_header(args, ("model", "label", "recipe", "windows", "length", "threads"))
    recipe = load_recipe(args.recipe)
    spec = recipe.quantize
    model = models.load_model(args.model).eval()
    tokenizer = models.load_tokenizer(args.model)
    spec = spec.model_copy(update={"group_size": resolve_group_size(spec, check_packable(model, spec))})
    windows = quality_windows(args.model, args.work, args.windows, args.length)
    float_hidden = {d: final_hidden_states(model, w) for d, w in windows.items()}
    calib, calib_hash = calibration_blocks(recipe, spec, tokenizer)
    grid = QuantGrid(bits=spec.bits, sym=spec.sym)
    t0 = time.perf_counter()
    final: list[torch.Tensor] = []
    quantize_blocks(model, calib, grid, method="gptq", group_size=spec.group_size, skip=tuple(spec.skip), damp=spec.damp, act_order=spec.act_order,
                    block_size=spec.block_size, true_sequential=spec.true_sequential, scale_search=spec.scale_search, forward_dtype=spec.forward_dtype,
                    batch_size=spec.batch_size, final_hidden=final)
    body_s = time.perf_counter() - t0
    calib_x = head_inputs(model, calib, spec.batch_size, final)
    hidden = {d: final_hidden_states(model, w) for d, w in windows.items()}
    W = model.get_output_embeddings().weight.detach().float()
    vocab, width = W.shape
    body_codes = sum(m.weight.numel() for b in get_blocks(model) for m in b.modules() if isinstance(m, torch.nn.Linear)) * spec.bits // 8
    report.update(calibration_sha256=calib_hash, body={"group_size": spec.group_size, "act_order": spec.act_order, "scale_search": spec.scale_search, "gptq_s": round(body_s, 1), "code_bytes": body_codes},
                  head={"vocab": vocab, "hidden": width, "tied": bool(getattr(model.config, "tie_word_embeddings", False))}, tokens={d: sum(len(w) - 1 for w in ws) for d, ws in windows.items()})
    reference = {d: [torch.log_softmax(x @ W.T, -1)[:-1] for x in xs] for d, xs in hidden.items()}
    rows: dict[str, dict] = {}
    # The whole float model (float body, float head) on the same windows: what the GPTQ body costs by itself.
    rows["float model"] = {"head": "float", "body": "float", "bytes": W.numel() * 4, **score("float model", W, float_hidden, windows, reference)}
    rows["float head"] = {"head": "float", "bytes": W.numel() * 4, **score("float head", W, hidden, windows, reference)}
    for bits, block in ((8, 128), (4, 32), (4, 64), (4, 128)):
        Q, size = nbits_dequantized(W.numpy(), bits, block)
        name = f"int{bits} RTN b{block}"
        rows[name] = {"head": f"int{bits}", "method": "rtn", "block": block, "bytes": size, **score(name, torch.from_numpy(Q), hidden, windows, reference)}
    head_grid = QuantGrid(bits=4, sym=spec.sym)
    for group in (32, 64, 128):
        for act_order in (False, True):
            t0 = time.perf_counter()
            res, layer = quantize_head(model, calib_x, head_grid, group_size=group, act_order=act_order, damp=spec.damp, block_size=spec.block_size, scale_search=spec.scale_search)
            name = f"int4 GPTQ g{group}{' act-order' if act_order else ''}"
            rows[name] = {"head": "int4", "method": "gptq", "block": group, "act_order": act_order, "bytes": gptq_bytes(vocab, width, 4, group), "gptq_s": round(time.perf_counter() - t0, 1),
                          "output_error": layer.output_error, **score(name, res.Q.float(), hidden, windows, reference)}
    for row in rows.values():
        row["head_share_of_decode_bytes"] = round(row["bytes"] / (row["bytes"] + body_codes), 3)
    report["rows"] = rows
    report["load_average_end"] = list(os.getloadavg())
    write_report(report, args.out or RESULTS / f"head_int4-{args.label}", render)
    return 0


def render(report: dict) -> str:
    rows = report["rows"]
    domains = list(next(iter(rows.values()))["perplexity"])
    base = rows["float head"]["perplexity"]
    rtn4 = rows.get("int4 RTN b32", {}).get("perplexity", {})
    m = report["machine"]
    lines = [
        f"# The LM head in 4 bits ({report['settings']['label']}: {report['settings']['model']})",
        "",
        f"Command: `{report['command']}` (at commit {report['git']}); {m['cpu']}, {m['threads']} threads; load average {report['load_average_start']} -> {report['load_average_end']}.",
        "",
        f"Body: every block GPTQ 4-bit (groups of {report['body']['group_size']}, act-order {report['body']['act_order']}, scale search {report['body']['scale_search']}) "
        f"on the quickstart recipe's calibration set (sha256 {report['calibration_sha256'][:12]}); the head ({report['head']['vocab']} x {report['head']['hidden']}, "
        f"tied {report['head']['tied']}) varies, on the same final hidden states. {report['settings']['windows']} windows of {report['settings']['length']} tokens "
        "per domain (pydocs: held-out Python docs, the calibration domain; licences: Debian licence texts). KL and top-1 against the float head on the GPTQ body; "
        "'share' is the head's part of the weight bytes a decoded token reads (4-bit body codes + head). "
        "Cost: the perplexity increase over the float head; for GPTQ rows also as a fraction of round-to-nearest 4-bit b32's increase (the builder's head).",
        "",
        "| head | bytes (MB) | share | " + " | ".join(f"ppl {d} | cost {d}" for d in domains) + " | " + " | ".join(f"KL {d}" for d in domains) + " | " + " | ".join(f"top-1 {d}" for d in domains) + " |",
        "|---|---|---|" + "---|---|" * len(domains) + "---|" * (2 * len(domains)),
    ]
    for name, row in rows.items():
        cells = []
        for d in domains:
            ppl = row["perplexity"][d]
            cost = f"{100 * (ppl / base[d] - 1):+.2f}%"
            if row.get("method") == "gptq" and rtn4.get(d) and rtn4[d] > base[d]:
                cost += f" ({(ppl - base[d]) / (rtn4[d] - base[d]):.2f} of RTN)"
            cells += [f"{ppl:.3f}", cost]
        lines.append(f"| {name} | {row['bytes'] / 1e6:.1f} | {row['head_share_of_decode_bytes']:.2f} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{row['kl_to_float'][d]:.4f}" for d in domains) + " | " + " | ".join(f"{row['top1_vs_float'][d]:.3f}" for d in domains) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
