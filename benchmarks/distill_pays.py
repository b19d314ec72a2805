"""Benchmarks 2 and 3: does distillation beat plain training, and how fast does `compress distill` train?

Trains the same student (same init, data order, steps, tokens, optimizer and schedule) twice from one
recipe: with the recipe's distillation loss, and with plain next-token cross-entropy
(`distill.loss.ce_weight=1`). Reports held-out perplexity of both and of the teacher, KL to the
teacher, top-1 agreement, and the distillation run's training throughput.

    python benchmarks/distill_pays.py                          # recipes/quickstart.yaml, CPU
    python benchmarks/distill_pays.py --recipe R.yaml --set distill.steps=500

Writes benchmarks/results/distill_pays.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-distill-pays"))
    parser.add_argument("--fresh", action="store_true", help="retrain even if a finished run of the same recipe is there")
    args = parser.parse_args()

    import torch

    from compress.artifacts import device_info
    from compress.distill.loop import run_distill
    from compress.recipe import load_recipe

    work = Path(args.work_dir)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    runs = {}
    for label, extra in (("distilled", []), ("cross-entropy only", ["distill.loss.ce_weight=1.0"])):
        recipe = load_recipe(args.recipe, [*args.overrides, *extra, f"output_dir={work / label.split()[0]}"])
        record = recipe.run_dir / "student" / "compress.json"
        keys = ("seed", "teacher", "student", "data", "distill")
        same = lambda a, b: all(a.get(k) == b.get(k) for k in keys)  # noqa: E731
        if record.is_file() and same(json.loads(record.read_text())["recipe"], recipe.model_dump(mode="json")):
            # A finished run of exactly this recipe: reuse its measurements instead of training again.
            done = json.loads(record.read_text())
            runs[label] = {"metrics": done["metrics"], "wall_s": done["wall_time_s"], "loss": recipe.distill.loss.model_dump(), "reused": True}
            continue
        shutil.rmtree(recipe.run_dir, ignore_errors=True)
        t0, load_before = time.perf_counter(), os.getloadavg()
        result = run_distill(recipe, progress=True)
        # Load average before/after: another busy process on 2 cores can halve the throughput.
        runs[label] = {"metrics": result.metrics, "wall_s": round(time.perf_counter() - t0, 1), "loss": recipe.distill.loss.model_dump(), "loadavg": [load_before, os.getloadavg()]}
        print(label, json.dumps(result.metrics["eval"]), flush=True)

    kd, ce = runs["distilled"]["metrics"], runs["cross-entropy only"]["metrics"]
    recipe = load_recipe(args.recipe, args.overrides)
    result = {
        "benchmark": "distill_pays",
        "command": "python benchmarks/distill_pays.py " + " ".join(sys.argv[1:]),
        "recipe": recipe.model_dump(mode="json"),
        "machine": {**device_info("cuda" if torch.cuda.is_available() and recipe.distill.device != "cpu" else "cpu"), "python": platform.python_version(), "torch": torch.__version__},
        "runs": runs,
        "ppl_reduction_vs_ce": round(1 - kd["eval"]["student_ppl"] / ce["eval"]["student_ppl"], 4),
        "distillation_wins": kd["eval"]["student_ppl"] < ce["eval"]["student_ppl"],
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_pays.json").write_text(json.dumps(result, indent=2) + "\n")

    d = recipe.distill
    tokens = kd["train_tokens"]
    lines = [
        "# Distillation pays: distilled student vs the same student trained with cross-entropy",
        "",
        f"Teacher `{recipe.teacher.model}` ({kd['teacher_parameters'] / 1e6:.1f}M params) -> student keeping teacher layers "
        f"{kd.get('from_teacher_layers', 'n/a')} ({kd['student_parameters'] / 1e6:.1f}M params); "
        f"{d.steps} steps x {d.batch_size * d.grad_accum} x {recipe.data.seq_len} tokens = {tokens:,} training tokens each; "
        f"held-out eval on `{recipe.data.eval}` ({kd['eval']['tokens']:,} tokens). Machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} torch threads.",
        "",
        "| model | eval ppl | KL(teacher‖model) /token | top-1 agreement with teacher |",
        "|---|---|---|---|",
        f"| teacher | {kd['eval']['teacher_ppl']:.2f} | 0 | 100% |",
        f"| student at init (layers copied) | {kd['initial_eval']['student_ppl']:.2f} | {kd['initial_eval']['kl_per_token']:.3f} | {kd['initial_eval']['top1_agreement']:.1%} |",
        f"| student, cross-entropy only | {ce['eval']['student_ppl']:.2f} | {ce['eval']['kl_per_token']:.3f} | {ce['eval']['top1_agreement']:.1%} |",
        f"| student, distilled ({d.loss.kind}) | {kd['eval']['student_ppl']:.2f} | {kd['eval']['kl_per_token']:.3f} | {kd['eval']['top1_agreement']:.1%} |",
        "",
        f"Distillation {'wins' if result['distillation_wins'] else 'LOSES'}: eval perplexity {100 * result['ppl_reduction_vs_ce']:.1f}% lower than cross-entropy training "
        f"({kd['eval']['student_ppl']:.2f} vs {ce['eval']['student_ppl']:.2f}; teacher {kd['eval']['teacher_ppl']:.2f}).",
        "",
        f"Throughput of `compress distill` (teacher forward + student forward/backward + fused loss): **{kd['tokens_per_s']:.0f} training tokens/s**, "
        f"wall time {runs['distilled']['wall_s']:.0f} s for the whole run including loading and evaluation.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    (RESULTS / "distill_pays.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
