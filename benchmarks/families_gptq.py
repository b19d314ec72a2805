"""GPTQ time and peak memory per family on equal-size synthetic configs, and the structural path against the
old table path on Llama (issue 16).

Each measurement runs in its own process (peak RSS is per process): a random-weight model of one family with
the same widths, GPTQ 4-bit (groups of 64) of every block on random calibration tokens, timed around
`compress.quantize.calibrate.quantize_blocks`. With `--baseline COMMIT`, Llama is also measured with that
commit's code (a git worktree put on PYTHONPATH), in the same run, so the two paths are compared side by side.

    python benchmarks/families_gptq.py --baseline 564e481 [--repeats 2]

Writes benchmarks/results/families_gptq.json and the markdown table generated from it (`render`).

    python benchmarks/families_gptq.py --compare-artifacts OLD_GPTQ_DIR NEW_GPTQ_DIR

compares two `compress quantize` outputs of the same model (before and after a change): perplexity, quantize
time and whether every stored tensor is bit-identical; writes families_gptq_teacher.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from export_latency import report_header, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "families_gptq"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt")


def family_config(family: str, hidden: int, layers: int, vocab: int):
    """The same widths in each family's own config keys: hidden, 3x hidden MLP, hidden/64 heads (GQA 2:1 where it exists)."""
    from transformers import AutoConfig

    heads = hidden // 64
    llama = dict(hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=heads, num_key_value_heads=heads // 2, num_hidden_layers=layers, max_position_embeddings=2048)
    keys = {
        "llama": llama, "mistral": llama, "qwen2": llama, "qwen3": dict(llama, head_dim=64),
        "gemma2": dict(llama, head_dim=64, sliding_window=128), "gemma3_text": dict(llama, head_dim=64, sliding_window=128, sliding_window_pattern=2),
        "phi3": dict(llama, pad_token_id=0, bos_token_id=0, eos_token_id=0),
        "gpt2": dict(n_embd=hidden, n_head=heads, n_inner=3 * hidden, n_layer=layers, n_positions=2048),
        "gpt_neox": dict(hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=heads, num_hidden_layers=layers, max_position_embeddings=2048),
        "opt": dict(hidden_size=hidden, ffn_dim=3 * hidden, num_attention_heads=heads, num_hidden_layers=layers, word_embed_proj_dim=hidden, max_position_embeddings=2048),
        # 8 experts of MLP 1.5x hidden, 2 per token: the same active MLP width as the dense configs, 4x its weights.
        "qwen3_moe": dict(llama, head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=3 * hidden // 2),
    }
    return AutoConfig.for_model(family, vocab_size=vocab, **keys[family])


def child(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from compress.quantize.calibrate import quantize_blocks
    from compress.quantize.grid import QuantGrid

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(args.child, args.hidden, args.layers, args.vocab)).eval()
    if args.child == "qwen3_moe":
        from compress.moe import unfuse_experts  # what `compress quantize` does to 3-D experts first

        unfuse_experts(model)
    calib = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    results, reports = quantize_blocks(model, calib, QuantGrid(4), method="gptq", group_size=64, skip=("lm_head",), batch_size=8)
    seconds = time.perf_counter() - t0
    block = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-2:] != ["embed_tokens", "weight"] and any(f".{i}." in n for i in range(args.layers)))
    print(json.dumps({
        "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss_before / 1024,
        "layers_quantized": len(results), "block_parameters": block, "parameters": sum(p.numel() for p in model.parameters()),
        "rounded_to_nearest": sum(r.fallback is not None for r in reports),
    }))


def measure(family: str, code: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{code}{os.pathsep}{code / 'exporters'}", OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--child", family, "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    runs = []
    for _ in range(args.repeats):
        load = os.getloadavg()[0]
        out = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"{family} at {code}: {out.stderr[-2000:]}")
        runs.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), load_average=round(load, 2)))
    return {"seconds": [round(r["seconds"], 2) for r in runs], "median_s": round(statistics.median(r["seconds"] for r in runs), 2),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1), "layers_quantized": runs[0]["layers_quantized"],
            "parameters": runs[0]["parameters"], "load_average": [r["load_average"] for r in runs], "rounded_to_nearest": runs[0].get("rounded_to_nearest", 0)}


def render(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"GPTQ 4-bit (groups of 64) of {s['layers']} blocks of width {s['hidden']} (MLP {3 * s['hidden']}), {s['samples']} x {s['seq_len']} random calibration "
        f"tokens, vocab {s['vocab']}; median of {s['repeats']} runs, each in its own process. Command: `{report['command']}`, commit {report['git']}, "
        f"{report['machine']['cpu']}, {report['machine']['threads']} threads.",
        "",
        "| family | code | Linears quantized | parameters (M) | GPTQ time (s) | runs (s) | peak RSS (MB) | load average |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['family']} | {row['code']} | {row['layers_quantized']} | {row['parameters'] / 1e6:.1f} | {row['median_s']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in row['seconds'])} | {row['peak_rss_mb']:.0f} | {', '.join(f'{x:.2f}' for x in row['load_average'])} |")
    if any(r["family"] == "qwen3_moe" for r in report["rows"]):
        lines += ["", f"qwen3_moe: 8 experts of MLP {3 * s['hidden'] // 2} per layer, 2 per token (the dense rows' active MLP width, 4x its weights), each expert GPTQ'd on the tokens routed to it."]
    for row in report["rows"]:
        if row.get("rounded_to_nearest"):
            lines += ["", f"{row['family']}: {row['rounded_to_nearest']} expert projections fewer calibration tokens reached than their input width were rounded to nearest."]
    base = [r for r in report["rows"] if r["code"] != "this commit"]
    if base:
        new = next(r for r in report["rows"] if r["family"] == base[0]["family"] and r["code"] == "this commit")
        lines += ["", f"{base[0]['family']}: structural path {new['median_s']:.2f} s vs the table path at {base[0]['code']} {base[0]['median_s']:.2f} s "
                      f"({new['median_s'] / base[0]['median_s']:.3f}x), peak RSS {new['peak_rss_mb']:.0f} vs {base[0]['peak_rss_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def compare_artifacts(old: Path, new: Path) -> dict:
    import torch
    from safetensors import safe_open

    rows = []
    for folder in (old, new):
        record = json.loads((folder / "compress.json").read_text())
        m = record["metrics"]
        rows.append({"folder": str(folder), "commit": record.get("versions", {}).get("git") or record.get("git"), "ppl_before": m["ppl_before"], "ppl_after": m["ppl_after"],
                     "quantize_time_s": m["quantize_time_s"], "created": record.get("created")})
    same, different = 0, []
    for a in sorted(old.glob("*.safetensors")):
        with safe_open(str(a), "pt") as A, safe_open(str(new / a.name), "pt") as B:
            for key in A.keys():
                if torch.equal(A.get_tensor(key), B.get_tensor(key)):
                    same += 1
                else:
                    different.append(key)
    return {"rows": rows, "identical_tensors": same, "different_tensors": different}


def render_compare(report: dict) -> str:
    c = report["compare"]
    lines = [f"`compress quantize` of the same model before and after the change. Command: `{report['command']}`, {report['machine']['cpu']}.", "",
             "| folder | created | ppl before | ppl after | quantize time (s) |", "|---|---|---|---|---|"]
    for r in c["rows"]:
        lines.append(f"| `{r['folder']}` | {r['created']} | {r['ppl_before']:.4f} | {r['ppl_after']:.4f} | {r['quantize_time_s']:.1f} |")
    lines += ["", f"Stored tensors bit-identical: {c['identical_tensors']}, different: {len(c['different_tensors'])}"
              + (f" ({', '.join(c['different_tensors'][:5])})" if c["different_tensors"] else "") + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--baseline", help="a commit whose code is measured on Llama beside this one (a git worktree)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--compare-artifacts", nargs=2, type=Path, metavar=("OLD", "NEW"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.compare_artifacts:
        report = report_header(args, ())
        report["compare"] = compare_artifacts(*args.compare_artifacts)
        write_report(report, args.out.with_name(args.out.name + "_teacher"), render_compare)
        return 0
    report = report_header(args, ("hidden", "layers", "vocab", "samples", "seq_len", "repeats", "threads"))
    rows = []
    if args.baseline:
        worktree = Path("/tmp") / f"compress-baseline-{args.baseline}"
        if not worktree.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.baseline], cwd=ROOT, check=True, capture_output=True)
        rows.append({"family": "llama", "code": f"table path ({args.baseline})", **measure("llama", worktree, args)})
        print(rows[-1], flush=True)
    for family in args.families:
        rows.append({"family": family, "code": "this commit", **measure(family, ROOT, args)})
        print(rows[-1], flush=True)
    report["rows"] = rows
    report["load_average_end"] = list(os.getloadavg())
    write_report(report, args.out, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
