"""Benchmark (issue 12): the size/quality frontier of student constructions against the teacher's own low-bit GPTQ.

At one distillation budget (the quickstart's: same steps, tokens, data, schedule for every student) it builds
students at about 0.5x and 0.7x of the teacher's parameters four ways: evenly spaced layers (the old default),
importance depth (Block Influence), Minitron width (heads, MLP, hidden channels) and depth plus width. Each goes
through GPTQ 4-bit and int4 ONNX. Beside them: the teacher at GPTQ 4-bit (int4 ONNX), 3-bit and 2-bit (torch).
Every deployable row is measured by `compress bench` on two held-out domains (builtin:pydocs/eval and
builtin:licenses/eval): bytes on disk, perplexity, KL and top-1 agreement to the teacher, and decode tokens/s.
The learning curve of each student (eval perplexity against training tokens) comes from its distillation.

    python benchmarks/frontier.py                                  # everything (resumable: finished stages are kept)
    python benchmarks/frontier.py --rows depth-0.5 width-0.5       # build some rows only
    python benchmarks/frontier.py --measure-only                   # bench what is built, write the tables

Writes benchmarks/results/frontier.json, frontier.md (generated from the JSON) and frontier.png / frontier_curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
TEACHER = "builtin:smollm2-135m"
DOMAINS = {"pydocs": "builtin:pydocs/eval", "licenses": "builtin:licenses/eval"}

# Each row replaces the recipe's student section entirely ("student=null" first).
_DEPTH = ["student=null", "student.prune.axes=[depth]"]
_WIDTH = ["student=null", "student.prune.axes=[heads,mlp,hidden]"]
_BOTH = ["student=null", "student.prune.axes=[depth,heads,mlp,hidden]"]
STUDENTS = {
    "even-0.5": ("evenly spaced layers", ["student=null", "student.from_teacher.layers=10"]),
    "depth-0.5": ("importance depth (Block Influence)", _DEPTH + ["student.prune.target_params=0.5"]),
    "width-0.5": ("Minitron width", _WIDTH + ["student.prune.target_params=0.5"]),
    "both-0.5": ("depth + width", _BOTH + ["student.prune.target_params=0.5"]),
    "even-0.7": ("evenly spaced layers", ["student=null", "student.from_teacher.layers=18"]),
    "depth-0.7": ("importance depth (Block Influence)", _DEPTH + ["student.prune.target_params=0.7"]),
    "width-0.7": ("Minitron width", _WIDTH + ["student.prune.target_params=0.7"]),
    "both-0.7": ("depth + width", _BOTH + ["student.prune.target_params=0.7"]),
}
TEACHER_GPTQ = {"teacher-gptq4": 4, "teacher-gptq3": 3, "teacher-gptq2": 2}


def machine() -> dict:
    import torch

    from compress.artifacts import cpu_name

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    return {"commit": commit + ("+dirty" if dirty else ""), "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(), "torch": torch.__version__}


def build_student(label: str, work: Path, args) -> dict:
    """Distil, quantize and export one construction with the pipeline (resumable), return its build record."""
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    overrides = [f"output_dir={work / label}", "bench=null", f"distill.precision={args.precision}", f"distill.eval_every={args.eval_every}", *STUDENTS[label][1], *args.overrides]
    recipe = load_recipe(args.recipe, overrides)
    run_dir = recipe.run_dir
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    result = run_recipe(recipe, resume=run_dir.exists(), progress=not args.no_progress, log=print)
    record = json.loads((run_dir / "student" / "compress.json").read_text())
    m = record["metrics"]
    seq_tokens = recipe.distill.batch_size * recipe.distill.grad_accum * recipe.data.seq_len
    return {
        "label": label,
        "construction": STUDENTS[label][0],
        "overrides": STUDENTS[label][1],
        "student_parameters": m["student_parameters"],
        "fraction": m["student_parameters"] / m["teacher_parameters"],
        "pruned": m.get("pruned"),
        "from_teacher_layers": m.get("from_teacher_layers"),
        "distill_tokens": m["train_tokens"],
        "distill_tokens_per_s": m["tokens_per_s"],
        "learning_curve": [{"step": 0, "tokens": 0, "ppl": m["initial_eval"]["student_ppl"], "kl": m["initial_eval"]["kl_per_token"]}]
        + [{"step": h["step"], "tokens": h["step"] * seq_tokens, "ppl": h["student_ppl"], "kl": h["kl_per_token"]} for h in m["eval_history"]],
        "artifacts": {o.stage: str(o.artifact) for o in result.outcomes},
        "build_s": round(time.perf_counter() - t0, 1),
        "build_loadavg": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def build_teacher_gptq(label: str, work: Path, args) -> dict:
    from compress.quantize.stage import run_quantize
    from compress.recipe import load_recipe

    bits = TEACHER_GPTQ[label]
    recipe = load_recipe(args.recipe, [f"quantize.bits={bits}", *args.overrides])
    out = work / label
    t0 = time.perf_counter()
    if not (out / "compress.json").is_file():
        run_quantize(recipe, TEACHER, out, progress=not args.no_progress)
    artifacts = {"quantize": str(out)}
    if bits == 4:
        from compress_exporters.onnx import export_onnx

        onnx = work / f"{label}-onnx"
        if not (onnx / "compress.json").is_file():
            e = recipe.export
            export_onnx(str(out), onnx, weights="int4", accuracy_level=e.accuracy_level, exporter=e.exporter, lm_head=e.lm_head, embedding=e.embedding)
        artifacts["export"] = str(onnx)
    return {"label": label, "construction": f"teacher GPTQ {bits}-bit", "bits": bits, "artifacts": artifacts, "build_s": round(time.perf_counter() - t0, 1)}


def measure(builds: dict, work: Path, args) -> dict:
    """One bench per domain over every deployable row (speed on the first domain only)."""
    from compress.bench.stage import run_bench
    from compress.recipe import BenchSpec

    rows = [("teacher", TEACHER)]
    for label, b in builds.items():
        rows.append((label, b["artifacts"].get("export") or b["artifacts"]["quantize"]))
    out = {}
    for i, (domain, source) in enumerate(DOMAINS.items()):
        spec = BenchSpec(eval=source, seq_len=512, max_eval_tokens=args.eval_tokens, prompt_lengths=[128], new_tokens=128, decode_prompt=128,
                         batch_sizes=[1], repeats=3, warmup=1, speed=i == 0, plots=False, threads=args.threads)
        result = run_bench(spec, [p for _, p in rows], work / f"bench-{domain}", labels=[l for l, _ in rows], teacher=TEACHER, progress=not args.no_progress)
        out[domain] = {"machine": result.results["machine"], "settings": result.results["settings"], "artifacts": {a["label"]: a for a in result.results["artifacts"]}}
    return out


def assemble(builds: dict, bench: dict) -> list[dict]:
    table = []
    for label in ["teacher", *builds]:
        b = builds.get(label, {"label": "teacher", "construction": "teacher (float)"})
        first = bench["pydocs"]["artifacts"][label]
        row = {k: v for k, v in b.items() if k not in ("artifacts",)}
        row.update(kind=first["kind"], parameters=first["parameters"], size_bytes=first["size_bytes"], path=first["path"])
        for domain, data in bench.items():
            q = data["artifacts"][label]["quality"]
            row[f"ppl_{domain}"] = q["ppl"]
            row[f"teacher_ppl_{domain}"] = q["teacher_ppl"]
            row[f"kl_{domain}"] = q.get("kl_per_token")
            row[f"top1_{domain}"] = q.get("top1_agreement")
        speed = first.get("speed") or {}
        row["decode_tok_s"] = (speed.get("decode") or {}).get("1", {}).get("tokens_per_s_median")
        row["runs_on"] = speed.get("runs_on")
        table.append(row)
    pareto(table)
    return table


def pareto(table: list[dict]) -> None:
    """A row is on the front when no other row is at most as large and better on both domains."""
    for r in table:
        r["pareto"] = not any(
            o is not r and o["size_bytes"] <= r["size_bytes"] and o["ppl_pydocs"] <= r["ppl_pydocs"] and o["ppl_licenses"] <= r["ppl_licenses"]
            and (o["size_bytes"], o["ppl_pydocs"], o["ppl_licenses"]) != (r["size_bytes"], r["ppl_pydocs"], r["ppl_licenses"])
            for o in table
        )


def markdown(data: dict, source: str = "frontier.json") -> str:
    m = data["machine"]
    t = next(r for r in data["rows"] if r["label"] == "teacher")
    lines = [
        f"# Size/quality frontier (generated by benchmarks/frontier.py from {'the runs ' + ', '.join(data['settings']['combined']) if data['settings'].get('combined') else source}; do not edit)",
        "",
        *([f"Rows from separate runs, each as measured there (decode tok/s compares only within one run; the machine line is the first run's): "
           + "; ".join(f"`{name}`: commit {run['machine']['commit']}, load {run['machine']['loadavg']}" for name, run in data["runs"].items()), ""] if data.get("runs") else []),
        f"Commit {m['commit']}, {m['cpu']} ({m['cpu_count']} cores), {m['threads']} torch threads, load average {m['loadavg']} at the end of the builds; "
        "bench load averages: " + ", ".join(f"{d}: {v['machine'].get('loadavg')}" for d, v in data["bench"].items()) + ".",
        f"Students: {data['settings']['recipe']} with distill.precision={data['settings']['precision']}, "
        f"{data['rows'][1]['distill_tokens'] if len(data['rows']) > 1 and 'distill_tokens' in data['rows'][1] else '?'} training tokens each; then GPTQ 4-bit and int4 ONNX as in the recipe. "
        f"Perplexity on {data['settings']['eval_tokens']} tokens of each domain in windows of 512; KL and top-1 agreement against the float teacher; "
        "decode: batch 1, 128 new tokens after a 128-token prompt, median of 3 (ONNX Runtime for ONNX rows, torch for GPTQ rows).",
        "",
        "| row | construction | shape | params (M) | kind | size (MB) | ppl pydocs | ppl licenses | KL pydocs | top-1 pydocs | decode tok/s | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        shape = (r.get("pruned") or {}).get("shape")
        shape_s = f"{shape['num_hidden_layers']}L h{shape['hidden_size']} i{shape['intermediate_size']} {shape['num_attention_heads']}/{shape['num_key_value_heads']}h" if shape else (f"{len(r['from_teacher_layers'])}L (even)" if r.get("from_teacher_layers") else "30L h576 i1536 9/3h")
        dec = f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "-"
        kl = f"{r['kl_pydocs']:.3f}" if r.get("kl_pydocs") is not None else "-"
        top1 = f"{r['top1_pydocs']:.1%}" if r.get("top1_pydocs") is not None else "-"
        lines.append(
            f"| `{r['label']}` | {r['construction']} | {shape_s} | {r['parameters'] / 1e6:.1f} | {r['kind']} | {r['size_bytes'] / 1e6:.1f} | "
            f"{r['ppl_pydocs']:.2f} ({r['ppl_pydocs'] / t['ppl_pydocs']:.2f}x) | {r['ppl_licenses']:.2f} ({r['ppl_licenses'] / t['ppl_licenses']:.2f}x) | {kl} | {top1} | {dec} | {'yes' if r['pareto'] else ''} |"
        )
    lines += ["", "## Learning curves (held-out pydocs perplexity of the float student during distillation, windows of the recipe's seq_len)", "",
              "| row | " + " | ".join(f"{p['tokens'] // 1000}k tokens" for p in next((r['learning_curve'] for r in data['rows'] if r.get('learning_curve')), [])) + " |"]
    curve_rows = [r for r in data["rows"] if r.get("learning_curve")]
    if curve_rows:
        lines.append("|---|" + "---|" * len(curve_rows[0]["learning_curve"]))
        for r in curve_rows:
            lines.append(f"| `{r['label']}` | " + " | ".join(f"{p['ppl']:.1f}" for p in r["learning_curve"]) + " |")
    lines += ["", "## Pruning choices", "", "| row | shape chosen | KL to teacher right after pruning | candidates in budget | scored |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        p = r.get("pruned")
        if p:
            lines.append(f"| `{r['label']}` | {p['shape']} | {p['proxy_kl_per_token']:.3f} | {p.get('candidates_in_budget', '')} | {p.get('scored', '')} |")
    lines += ["", f"Command: `{data['settings']['command']}`", ""]
    return "\n".join(lines)


def plots(data: dict, out: Path, stem: str = "frontier") -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = data["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, domain in zip(axes, DOMAINS):
        for r in rows:
            colour = "black" if r["label"].startswith("teacher") else "tab:blue" if r["label"].startswith("even") else "tab:orange" if r["label"].startswith("depth") else "tab:green" if r["label"].startswith("width") else "tab:red"
            ax.scatter(r["size_bytes"] / 1e6, r[f"ppl_{domain}"], color=colour, marker="o" if r["pareto"] else "x", s=40)
            ax.annotate(r["label"], (r["size_bytes"] / 1e6, r[f"ppl_{domain}"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = sorted([r for r in rows if r["pareto"]], key=lambda r: r["size_bytes"])
        ax.step([r["size_bytes"] / 1e6 for r in front], [r[f"ppl_{domain}"] for r in front], where="post", color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes on disk (MB)")
        ax.set_ylabel(f"perplexity, {DOMAINS[domain]}")
        ax.set_title(f"{domain}: o = on the Pareto front (both domains)")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        if r.get("learning_curve"):
            pts = r["learning_curve"]
            ax.plot([p["tokens"] / 1000 for p in pts], [p["ppl"] for p in pts], marker=".", label=r["label"])
    teacher = next(r for r in rows if r["label"] == "teacher")
    ax.axhline(teacher["teacher_ppl_pydocs"] if "teacher_ppl_pydocs" in teacher else teacher["ppl_pydocs"], color="black", linestyle=":", label="teacher")
    ax.set_yscale("log")
    ax.set_xlabel("distillation tokens (thousands)")
    ax.set_ylabel("held-out perplexity (pydocs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_curves.png", dpi=110)
    plt.close(fig)
    return [f"{stem}.png", f"{stem}_curves.png"]


def write_results(data: dict, results: Path) -> None:
    """The JSON first (kept if a plot fails), then the plots it lists, then the markdown generated from it."""
    from compress.artifacts import write_json_atomic

    write_json_atomic(results, data)
    data["plots"] = plots(data, results.parent, results.stem)
    write_json_atomic(results, data)
    results.with_suffix(".md").write_text(markdown(data, results.name))
    print(markdown(data, results.name))


def combine(files: list[Path], results: Path) -> None:
    """The rows of several frontier runs in one table and plot: quality and bytes are deterministic, so rows of
    separate runs compare; decode speed does not (each row keeps the run it was timed in)."""
    runs = [json.loads(f.read_text()) for f in files]
    rows, seen = [], set()
    for f, run in zip(files, runs):
        for r in run["rows"]:
            if r["label"] in seen:
                continue
            seen.add(r["label"])
            rows.append({**r, "source": f.name})
    pareto(rows)
    first = runs[0]
    data = {"machine": first["machine"], "settings": {**first["settings"], "command": "python benchmarks/frontier.py " + " ".join(os.sys.argv[1:]),
                                                       "combined": [f.name for f in files]},
            "bench": first["bench"], "runs": {f.name: {"machine": r["machine"], "bench": r["bench"]} for f, r in zip(files, runs)}, "rows": rows}
    write_results(data, results)


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"), help="the distillation budget and quantize/export settings every row shares")
    parser.add_argument("--rows", nargs="*", default=[*STUDENTS, *TEACHER_GPTQ], help="rows to build (default all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for every row")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="distill.precision of every student")
    parser.add_argument("--eval-every", type=int, default=25, help="learning-curve resolution (distill.eval_every)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "frontier"))
    parser.add_argument("--results", default=str(RESULTS / "frontier.json"))
    parser.add_argument("--measure-only", action="store_true", help="no building: bench the rows already built")
    parser.add_argument("--no-measure", action="store_true", help="build only")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--combine", nargs="+", metavar="RESULTS.json", help="no building or measuring: one table and plot of the rows of "
                        "these results files (their quality and size; the teacher and teacher-GPTQ rows from the first file) into --results")
    parser.add_argument("--render", action="store_true", help="no building or measuring: regenerate --results' markdown and plots from its JSON")
    args = parser.parse_args()
    if args.render:
        results = Path(args.results)
        return write_results(json.loads(results.read_text()), results)  # only the plots field of the JSON changes
    if args.combine:
        return combine([Path(f) for f in args.combine], Path(args.results))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    builds_file = work / "builds.json"
    builds = json.loads(builds_file.read_text()) if builds_file.is_file() else {}
    if not args.measure_only:
        for label in args.rows:
            print(f"=== {label}", flush=True)
            builds[label] = build_student(label, work, args) if label in STUDENTS else build_teacher_gptq(label, work, args)
            builds_file.write_text(json.dumps(builds, indent=2))
    if args.no_measure:
        return
    order = [label for label in [*STUDENTS, *TEACHER_GPTQ] if label in builds]
    builds = {label: builds[label] for label in order}
    bench = measure(builds, work, args)
    data = {
        "machine": machine(),
        "settings": {"recipe": os.path.relpath(args.recipe, ROOT), "precision": args.precision, "eval_every": args.eval_every, "eval_tokens": args.eval_tokens,
                     "overrides": args.overrides, "command": "python benchmarks/frontier.py " + " ".join(os.sys.argv[1:])},
        "bench": {d: {"machine": v["machine"], "settings": v["settings"]} for d, v in bench.items()},
        "rows": assemble(builds, bench),
    }
    for r in data["rows"]:
        if r.get("pruned"):
            record = json.loads((Path(r["pruned"]["path"]) / "compress.json").read_text())["metrics"]["prune"]
            r["pruned"].update(candidates_in_budget=record["candidates_in_budget"], scored=len(record["scored"]))
    results = Path(args.results)
    write_results(data, results)


if __name__ == "__main__":
    main()
