"""Benchmark: distilling from an offline top-k teacher-logits cache against the live teacher.

Trains the same student (same init, data order, steps and tokens) once with the live teacher and the
full-vocabulary loss, and once per `--top-k` from a logits cache (`teacher.logits_cache`) with the sparse
top-k + tail loss. Reports (1) training tokens/s of each (the training steps only; the one-off cache build
is timed apart), (2) bytes per token of the cache on disk, measured and by formula, (3) held-out student
perplexity, KL(teacher||student) and top-1 agreement at equal steps (full-vocabulary metrics in every run).

Unless the recipe or --set caps data.max_train_tokens, it is set to steps x batch x grad_accum x seq_len, so
the cache holds exactly the blocks the run trains on (one epoch) and both runs read the same blocks.

    python benchmarks/logits_cache.py                                   # recipes/quickstart.yaml, top-k 64
    python benchmarks/logits_cache.py --top-k 8 64 256 --set distill.steps=300

Writes benchmarks/results/logits_cache.json and a markdown table generated from it (logits_cache.md);
--results puts both elsewhere.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "logits_cache.json"


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_once(label: str, recipe, *, top_k: int | None) -> dict:
    import torch

    from compress.artifacts import cpu_name
    from compress.distill.loop import run_distill

    shutil.rmtree(recipe.run_dir, ignore_errors=True)
    t0, load_before = time.perf_counter(), os.getloadavg()
    result = run_distill(recipe, progress=True)
    m = result.metrics
    row = {
        "label": label,
        "top_k": top_k,
        "loss": recipe.distill.loss.kind + (" (full vocabulary)" if top_k is None else f" (top-{top_k} + tail)"),
        "tokens_per_s": m["tokens_per_s"],
        "train_tokens": m["train_tokens"],
        "steps": m["steps"],
        "eval": m["eval"],
        "initial_eval": m["initial_eval"],
        "final_train_loss": m["final_train_loss"],
        "wall_s": round(time.perf_counter() - t0, 1),
        # Each row names where and under what load it ran: another busy process on 2 cores halves throughput.
        "commit": git_commit(),
        "machine": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": [list(load_before), list(os.getloadavg())],
    }
    if top_k is not None:
        cache = m["teacher_logits_cache"]
        manifest = json.loads((Path(cache["path"]) / "manifest.json").read_text())
        positions = manifest["train_blocks"] * manifest["positions_per_block"]
        row["cache"] = {
            **cache,
            "positions": positions,
            "vocab_size": manifest["vocab_size"],
            "bytes_per_position_measured": cache["bytes"]["train"] / positions,
            "bytes_per_position_formula": manifest["bytes_per_position"],
            "formula": f"top_k x ({2 if manifest['logprob_dtype'] == 'float16' else 4} + {2 if manifest['index_dtype'] == 'uint16' else 4}) + 4",
            "full_fp16_logits_bytes_per_position": 2 * manifest["vocab_size"],
        }
    print(label, json.dumps(row["eval"]), f"{row['tokens_per_s']:.0f} tokens/s", flush=True)
    return row


def markdown(result: dict) -> str:
    """The report, generated from the JSON result alone."""
    rows, live = result["runs"], result["runs"][0]
    r = result["recipe"]
    d = r["distill"]
    lines = [
        "# Offline teacher logits: distilling from a top-k cache vs the live teacher",
        "",
        f"Teacher `{r['teacher']['model']}`, student {json.dumps(r['student'])}, {d['steps']} steps x {d['batch_size'] * d['grad_accum']} x "
        f"{r['data']['seq_len']} tokens = {live['train_tokens']:,} training tokens per run (data.max_train_tokens = {r['data']['max_train_tokens']}), "
        f"held-out eval on `{r['data']['eval']}` ({live['eval']['tokens']:,} tokens). Same student init, data order and steps in every row; "
        "eval metrics are full-vocabulary in every row (the cache stores the teacher's eval hidden states and lm_head).",
        "",
        "| run | loss | train tokens/s | vs live | cache build s | bytes/position on disk (formula) | cache MB (train + eval + head) | eval student ppl | vs live | KL(teacher‖student)/token | top-1 agreement | commit | machine | torch threads | load avg before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cache = row.get("cache")
        ev = row["eval"]
        speed = f"{row['tokens_per_s'] / live['tokens_per_s']:.2f}x" if row is not live else "1.00x"
        ppl = f"{100 * (ev['student_ppl'] / live['eval']['student_ppl'] - 1):+.1f}%" if row is not live else "—"
        build = f"{cache['build_s']:.0f}" if cache and cache["build_s"] is not None else ("—" if not cache else "reused")
        size = f"{cache['bytes_per_position_measured']:.1f} ({cache['bytes_per_position_formula']} = {cache['formula']})" if cache else "—"
        mb = f"{sum(cache['bytes'].values()) / 1e6:.1f} ({cache['bytes']['train'] / 1e6:.1f} + {cache['bytes']['eval'] / 1e6:.1f} + {cache['bytes']['head'] / 1e6:.1f})" if cache else "—"
        load = f"{row['loadavg'][0][0]:.2f} → {row['loadavg'][1][0]:.2f}"
        lines.append(
            f"| {row['label']} | {row['loss']} | {row['tokens_per_s']:.0f} | {speed} | {build} | {size} | {mb} | {ev['student_ppl']:.2f} | {ppl} | "
            f"{ev['kl_per_token']:.4f} | {ev['top1_agreement']:.1%} | `{row['commit'][:12]}` | {row['machine']} | {row['torch_threads']} | {load} |"
        )
    lines += ["", f"Teacher eval ppl {live['eval']['teacher_ppl']:.2f}; student at init: ppl {live['initial_eval']['student_ppl']:.2f}, KL {live['initial_eval']['kl_per_token']:.4f}/token.", ""]
    for row in rows[1:]:
        cache = row["cache"]
        saved = 1 / live["tokens_per_s"] - 1 / row["tokens_per_s"]  # seconds saved per training token
        if cache["build_s"] is not None and saved > 0:
            lines.append(
                f"- {row['label']}: the build ({cache['build_s']:.0f} s for {cache['positions']:,} positions) is repaid after "
                f"{cache['build_s'] / saved:,.0f} training tokens ({cache['build_s'] / saved / row['train_tokens']:.2f} runs like this one); "
                f"full fp16 logits would take {cache['full_fp16_logits_bytes_per_position']:,} bytes per position."
            )
    lines += ["", f"Command: `{result['command']}` ({result['date']}, python {result['python']}, torch {result['torch']})", ""]
    return "\n".join(lines)


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY.PATH=VALUE (both runs)")
    parser.add_argument("--top-k", type=int, nargs="+", default=[64], help="one cached run per value")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-logits-cache"), help="runs and caches; emptied first")
    parser.add_argument("--results", default=str(RESULTS), help="the JSON result; the markdown goes next to it (.md)")
    args = parser.parse_args()

    import torch

    from compress.recipe import load_recipe

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)  # the cache build is part of the measurement
    overrides = list(args.overrides)
    base = load_recipe(args.recipe, overrides)
    if base.data.max_train_tokens is None:
        d = base.distill
        overrides.append(f"data.max_train_tokens={d.steps * d.batch_size * d.grad_accum * base.data.seq_len}")
    live = load_recipe(args.recipe, [*overrides, "teacher.logits_cache.enabled=false", f"output_dir={work / 'live'}"])
    runs = [run_once("live teacher", live, top_k=None)]
    for k in args.top_k:
        recipe = load_recipe(args.recipe, [
            *overrides, "teacher.logits_cache.enabled=true", f"teacher.logits_cache.top_k={k}",
            f"teacher.logits_cache.dir={work / 'logits'}", f"output_dir={work / f'cache-k{k}'}",
        ])
        runs.append(run_once(f"cache, k={k}", recipe, top_k=k))

    result = {
        "benchmark": "logits_cache",
        "command": "python benchmarks/logits_cache.py " + " ".join(sys.argv[1:]),
        "recipe": live.model_dump(mode="json"),
        "runs": runs,
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(json.loads(out.read_text()))
    out.with_suffix(".md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
