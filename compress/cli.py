"""`compress` command line: parse, load the recipe, call a stage, print. No logic lives here."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from compress.errors import CompressError
from compress.recipe import describe_keys, dump_recipe, load_recipe


def _keys_help(section: str | None = None) -> str:
    lines = ["recipe keys (override any with --set KEY=VALUE):"]
    for path, kind, default, description in describe_keys():
        if section and path.split(".")[0] not in (section, "data"):
            continue
        if kind == "section":
            lines.append(f"\n  {path}: {description}")
            continue
        lines.append(f"    {path} ({kind}, default {default})")
        lines.extend(textwrap.wrap(description, width=88, initial_indent="        ", subsequent_indent="        "))
    return "\n".join(lines)


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML file (omit to use all defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key, e.g. --set distill.steps=50 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate the recipe, print it resolved, and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description="Distil, quantize, export and benchmark causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    distill = sub.add_parser(
        "distill",
        help="distil a teacher into a smaller student with KL losses",
        description="Train the recipe's student on the teacher's output distribution and write "
        "<output_dir>/student (HF folder + compress.json). Multi-process: accelerate launch -m compress.cli distill ...",
        epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_recipe_args(distill)
    distill.add_argument("--resume", action="store_true", help="continue from the last checkpoint in <output_dir>/checkpoints")
    distill.add_argument("--overwrite", action="store_true", help="start over: replace the student artifact and remove the earlier run's checkpoints")
    distill.add_argument("--overwrite-any", action="store_true", help="like --overwrite, and also replace a <output_dir>/student folder compress did not write (never an input)")
    distill.add_argument("--no-progress", action="store_true", help="no progress bar")
    quantize = sub.add_parser(
        "quantize",
        help="quantize a model to 2-8 bits (GPTQ, RTN, bitsandbytes)",
        description="Quantize a float model folder (a distilled student, a teacher, any HF causal LM) and write an "
        "artifact with held-out perplexity before/after. Flags override the recipe's quantize section.",
        epilog="examples:\n  compress quantize runs/quickstart/student --method gptq --bits 4 --group-size 128 --output runs/quickstart/gptq\n"
        "  compress quantize runs/quickstart/student --method bnb-nf4 --output runs/quickstart/nf4\n\n" + _keys_help("quantize"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quantize.add_argument("model", help="model folder, hub id or builtin:NAME")
    quantize.add_argument("--output", required=True, help="artifact folder to create")
    quantize.add_argument("--recipe", help="recipe whose quantize (and data) sections to use")
    quantize.add_argument("--method", choices=["gptq", "rtn", "bnb-nf4", "bnb-fp4", "bnb-int8"])
    quantize.add_argument("--bits", type=int, choices=[2, 3, 4, 8])
    quantize.add_argument("--group-size", type=_group_size, help="columns per scale/zero group; -1 = per row; auto (default) = the largest of 128/64/32/16 dividing every quantized width")
    quantize.add_argument("--calib", help="calibration text (.txt/.jsonl/folder); default: the recipe's data.train")
    quantize.add_argument("--samples", type=int, help="calibration sequences")
    quantize.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None, help="GPTQ desc_act")
    quantize.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override any recipe key")
    quantize.add_argument("--resume", action="store_true", help="continue an interrupted block-at-a-time quantization from its last finished block (same inputs and settings)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing artifact (a folder compress wrote) at --output")
    quantize.add_argument("--overwrite-any", action="store_true", help="like --overwrite, and also replace a folder compress did not write (never the input)")
    quantize.add_argument("--no-progress", action="store_true")
    prune = sub.add_parser(
        "prune",
        help="prune a teacher by measured importance (depth, heads, MLP, hidden channels) into a smaller student",
        description="Measure block, head and channel importance on calibration blocks of the recipe's data.train, "
        "pick the shape within the parameter budget (or the explicit shape) that stays closest to the teacher, and "
        "write it as a Hugging Face model folder with compress.json (scores, kept indices, candidates). Distil it "
        "next with student.model: DIR, or use student.prune in a recipe to do both in one run.",
        epilog="examples:\n  compress prune builtin:smollm2-135m --target-params 0.5 --output runs/pruned-0.5\n"
        "  compress prune builtin:smollm2-135m --target-params 0.5 --axes depth --output runs/depth-0.5\n"
        "  compress prune MODEL --set student.prune.shape.hidden_size=448 --set student.prune.shape.intermediate_size=1024 --output DIR\n\n" + _keys_help("student"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prune.add_argument("model", help="teacher: model folder, hub id or builtin:NAME")
    prune.add_argument("--output", required=True, help="artifact folder to create")
    prune.add_argument("--target-params", type=float, help="budget: a fraction of the teacher's parameters (below 1) or a count")
    prune.add_argument("--axes", help="comma-separated axes a budget may prune: depth,heads,mlp,hidden (default all)")
    prune.add_argument("--depth-metric", choices=["block_influence", "skip_kl"])
    prune.add_argument("--recipe", help="recipe whose student.prune and data sections to use")
    prune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override any recipe key, e.g. --set student.prune.calib_samples=128")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing output artifact (a folder compress wrote)")
    prune.add_argument("--overwrite-any", action="store_true", help="also replace a non-empty folder compress did not write (never an input)")
    prune.add_argument("--no-progress", action="store_true")
    from compress_exporters.cli import add_export_parser

    add_export_parser(sub)
    run = sub.add_parser(
        "run",
        help="the whole chain from one recipe: distill -> quantize -> export -> bench",
        description="Check the recipe's whole chain before any compute, then run its stages in order (distill, and "
        "quantize / export / bench when the recipe has those sections), each writing its artifact under the run folder, "
        "and print the bench report. With --resume, stages whose artifact is complete and whose inputs are unchanged are "
        "skipped and an interrupted distillation continues from its last checkpoint.",
        epilog="examples:\n  compress run recipes/quickstart.yaml\n  compress run recipes/quickstart.yaml --resume                # after an interruption or a recipe edit\n"
        "  compress run recipes/quickstart.yaml --set quantize.bits=8 --set export.weights=int8 --resume\n\n" + _keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_recipe_args(run)
    plan = sub.add_parser(
        "plan",
        help="the memory each stage of a recipe needs on its device, from the configs alone",
        description="Print the memory plan of the recipe's distill and quantize stages per device (teacher, student, "
        "gradients, optimizer states, activations; one block at a time for quantize), computed from the teacher's config "
        "without loading weights or needing the devices, and exit 2 when a plan does not fit the memory its device has "
        "free here. `compress run --dry-run` and `compress distill --dry-run` print the same plans; `compress distill` "
        "refuses a plan that cannot fit its CUDA device before any model loads.",
        epilog="example:\n  compress plan recipes/gpu-llama-8b.yaml --set teacher.model=/path/to/Llama-3.1-8B",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("recipe", help="recipe YAML file")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    plan.add_argument("--processes", type=int, default=None, help="distillation processes (DDP under accelerate launch); default: WORLD_SIZE or 1")
    run.add_argument("--resume", action="store_true", help="continue an existing run folder, skipping finished stages whose inputs are unchanged")
    run.add_argument("--overwrite", action="store_true", help="start over, replacing every stage's artifact (only folders compress wrote)")
    run.add_argument("--overwrite-any", action="store_true", help="like --overwrite, and also replace stage folders compress did not write (never an input)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench = sub.add_parser(
        "bench",
        help="measure quality, speed and size of artifacts side by side (float, GPTQ, bitsandbytes, ONNX)",
        description="Measure every artifact on the same held-out windows and prompts: perplexity, KL(teacher||model) "
        "and top-1 agreement (teacher from --teacher or the artifacts' lineage), prefill latency, decode tokens/s, "
        "peak memory, parameters and size. Writes results.json, report.md and PNG plots into --output; rerunning "
        "into the same folder reuses finished measurements (keyed by content hash and settings). Exit status 3 (the files "
        "written, the numbers null and flagged) when a measured number is NaN or inf; 2 for a bad input, before anything is written.",
        epilog="examples:\n  compress bench builtin:smollm2-135m runs/quickstart/student runs/quickstart/gptq runs/quickstart/onnx-int4 --output runs/bench\n"
        "  compress bench runs/quickstart/student --set bench.batch_sizes=[1] --set bench.repeats=3\n\n" + _keys_help("bench"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="model folder (float/GPTQ/bnb), ONNX folder, hub id or builtin:NAME; the first is the baseline of the ratios")
    bench.add_argument("--output", default="runs/bench", help="report folder (default runs/bench)")
    bench.add_argument("--label", dest="labels", action="append", metavar="NAME", help="row name per artifact, in order (default: folder names)")
    bench.add_argument("--teacher", help="reference for KL and top-1 agreement (default: from the artifacts' compress.json lineage)")
    bench.add_argument("--data", help="held-out text (default: the recipe's bench.eval, data.eval, or builtin:pydocs/eval)")
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where torch models run")
    bench.add_argument("--threads", type=int, help="CPU threads")
    bench.add_argument("--recipe", help="recipe whose bench (and data) sections to use")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override any recipe key, e.g. --set bench.repeats=3")
    bench.add_argument("--fresh", action="store_true", help="measure everything again instead of reusing finished measurements")
    bench.add_argument("--no-progress", action="store_true")
    return parser


# quantize flags that only some methods take: (flag, its args attribute, the methods that take it, why the others do not)
_NO_CALIBRATION = "it needs no calibration samples: it rounds each weight on its own"
_BNB_NO_CALIBRATION = "bitsandbytes quantizes each weight on its own and needs no calibration samples"
_METHOD_FLAGS = (
    ("--calib", "calib", ("gptq",), {"rtn": _NO_CALIBRATION, "bnb": _BNB_NO_CALIBRATION}),
    ("--samples", "samples", ("gptq",), {"rtn": _NO_CALIBRATION, "bnb": _BNB_NO_CALIBRATION}),
    ("--act-order", "act_order", ("gptq",), {"rtn": "act-order is GPTQ's column order; round-to-nearest has none", "bnb": "act-order is GPTQ's column order; bitsandbytes has none"}),
    ("--bits", "bits", ("gptq", "rtn"), {"bnb": "the method sets the format (bnb-nf4 and bnb-fp4: 4 bits, bnb-int8: 8 bits)"}),
    ("--group-size", "group_size", ("gptq", "rtn"), {"bnb": "bitsandbytes uses its own block size"}),
)


def _check_method_flags(args, method: str) -> None:
    """Refuse, before anything loads, a flag the chosen method does not take, naming the flag and why."""
    family = "bnb" if method.startswith("bnb-") else method
    for flag, attr, takes, why in _METHOD_FLAGS:
        if getattr(args, attr) is not None and method not in takes:
            for_gptq = " (it is for --method gptq)" if takes == ("gptq",) else ""
            raise CompressError(f"{flag} does not apply to --method {method}: {why[family]}; drop {flag}{for_gptq}")


def _quantize(args) -> int:
    from compress.quantize.stage import describe, run_quantize

    flags = {"method": args.method, "bits": args.bits, "group_size": args.group_size, "calib.source": args.calib, "calib.samples": args.samples, "act_order": args.act_order}
    overrides = [f"quantize.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    if any(getattr(args, attr) is not None for _, attr, *_ in _METHOD_FLAGS):
        # the method in effect (--method, the recipe's, or a --set), from the recipe without the method's own flags
        quantize = load_recipe(args.recipe, [o for o in overrides if o.startswith("quantize.method=")] + args.overrides).quantize
        if quantize is not None:
            _check_method_flags(args, quantize.method)
    recipe = load_recipe(args.recipe, overrides + args.overrides)
    result = run_quantize(recipe, args.model, args.output, overwrite=args.overwrite, overwrite_any=args.overwrite_any, progress=not args.no_progress, resume=args.resume)
    print(describe(result))
    return 0


def _prune(args) -> int:
    from compress.prune.stage import describe, run_prune
    from compress.recipe import apply_override, validate_recipe

    student_overrides = [o for o in args.overrides if o.strip().startswith("student.")]
    recipe = load_recipe(args.recipe, [o for o in args.overrides if o not in student_overrides])
    data = recipe.model_dump(mode="json", exclude_none=True)
    prune = data.get("student", {}).get("prune") or {}
    if args.target_params is not None:
        prune.pop("shape", None)
        prune["target_params"] = args.target_params
    if args.axes:
        prune["axes"] = [a.strip() for a in args.axes.split(",") if a.strip()]
    if args.depth_metric:
        prune["depth_metric"] = args.depth_metric
    data["student"] = {"prune": prune}
    for assignment in student_overrides:
        apply_override(data, assignment)
    recipe = validate_recipe(data, args.recipe or "<command line>")
    result = run_prune(recipe, args.model, args.output, overwrite=args.overwrite, overwrite_any=args.overwrite_any, progress=not args.no_progress)
    print(describe(result))
    return 0


def _distill(args) -> int:
    from compress.distill.loop import run_distill

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return _print_plans(recipe, stages=("distill",), strict=False)
    result = run_distill(recipe, resume=args.resume, overwrite=args.overwrite, overwrite_any=args.overwrite_any, progress=not args.no_progress, recipe_file=args.recipe)
    ev = result.metrics["eval"]
    print(
        f"student: {result.artifact}\n"
        f"  eval ppl {ev['student_ppl']:.2f} (teacher {ev['teacher_ppl']:.2f}), "
        f"KL(teacher||student) {ev['kl_per_token']:.4f}/token, top-1 agreement {ev['top1_agreement']:.1%}, "
        f"{result.metrics['tokens_per_s']:.0f} train tokens/s"
    )
    return 0


def _plan(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    return _print_plans(recipe, stages=("distill", "quantize"), processes=args.processes)


def _print_plans(recipe, stages: tuple[str, ...], processes: int | None = None, strict: bool = True) -> int:
    """The memory plan of each stage, per device, from the configs alone; one that cannot fit is refused.
    `strict=False` (distill --dry-run, which validates the recipe alone): a config that cannot be read here (a hub
    id offline) leaves the plan out, with why, instead of failing the validation."""
    from compress.plans import check_plans, recipe_plans

    try:
        plans = [p for p in recipe_plans(recipe, processes=processes) if p.stage in stages]
    except (CompressError, OSError) as err:
        if strict:
            raise
        print("# memory plan not computed: " + " ".join(str(err).split()))
        return 0
    print("# memory plan (estimated from the configs; no weights loaded):")
    for plan in plans:
        print("#   " + plan.describe().replace("\n", "\n#"))
    check_plans(plans)
    return 0


def _run(args) -> int:
    from compress.pipeline import check_chain, run_recipe, stage_outputs

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        check_chain(recipe, resume=True, overwrite_any=args.overwrite_any, source=args.recipe or "the recipe")
        print(dump_recipe(recipe), end="")
        print("# stages: " + ", ".join(f"{stage} -> {path}" for stage, path in stage_outputs(recipe).items()))
        return _print_plans(recipe, stages=("distill", "quantize"))
    result = run_recipe(recipe, resume=args.resume, overwrite=args.overwrite, overwrite_any=args.overwrite_any, progress=not args.no_progress, recipe_file=args.recipe)
    if result.report:
        print()
        print(result.report)
    for outcome in result.outcomes:
        print(f"{outcome.stage:>8}: {outcome.artifact}" + (" (up to date, skipped)" if outcome.skipped else f" ({outcome.seconds:.0f} s)"))
    bench = next((o.artifact for o in result.outcomes if o.stage == "bench"), None)
    results = Path(bench) / "results.json" if bench else None
    if results is not None and results.is_file():
        bad = {a["label"]: a.get("non_finite") for a in json.loads(results.read_text()).get("artifacts", []) if a.get("non_finite")}
        if bad:
            print(f"compress run: error: {_non_finite(bad, results)}", file=sys.stderr)
            return NON_FINITE_EXIT
    return 0


NON_FINITE_EXIT = 3  # compress bench finished, wrote its files, and some measured numbers are NaN/inf


def _non_finite(flagged: dict[str, list[str]], results: Path) -> str:
    listed = "; ".join(f"{label} ({', '.join(metrics)})" for label, metrics in flagged.items())
    return f"non-finite results for {listed}: written as null in {results} and flagged in artifacts[].non_finite"


def _bench(args) -> int:
    from compress.bench.stage import run_bench
    from compress.recipe import BenchSpec

    flags = {"eval": args.data, "device": args.device, "threads": args.threads}
    overrides = [f"bench.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    recipe = load_recipe(args.recipe, overrides + args.overrides)
    spec = recipe.bench or BenchSpec()
    result = run_bench(
        spec, args.artifacts, args.output, labels=args.labels, teacher=args.teacher,
        eval_default=recipe.data.eval or recipe.data.train, text_field=recipe.data.text_field,
        cache_dir=recipe.data.cache_dir and Path(recipe.data.cache_dir), fresh=args.fresh, progress=not args.no_progress,
    )
    print(result.markdown)
    print(f"wrote {result.output / 'results.json'}, {result.output / 'report.md'}" + "".join(f", {result.output / p}" for p in result.results["plots"]))
    if result.non_finite:  # the files are written, but a number that is not a number is no result
        print(f"compress bench: error: {_non_finite(result.non_finite, result.output / 'results.json')}", file=sys.stderr)
        return NON_FINITE_EXIT
    return 0


def _export(args) -> int:
    from compress_exporters.cli import run_export_cli

    return run_export_cli(args)


# What actually continues an interrupted command (only distill and run can resume).
INTERRUPTED = {
    "distill": "rerun with --resume to continue from the last checkpoint",
    "run": "rerun with --resume: finished stages are kept and an interrupted distillation continues from its last checkpoint",
    "bench": "rerun the same command: finished measurements in the output folder are reused",
    "prune": "nothing was written; rerun the same command to start again",
    "quantize": "the output appears only when complete; rerun with --resume to continue from the last finished block (block-at-a-time quantization), or the same command to start again",
    "export": "nothing was written (the output appears only when complete); rerun the same command to start again",
    "plan": "nothing was written",
}

COMMANDS = {"distill": _distill, "prune": _prune, "quantize": _quantize, "export": _export, "bench": _bench, "run": _run, "plan": _plan}


def _group_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from compress.heap import bound_heap

    bound_heap()  # memory-bounded stages free whole blocks: let glibc return them (compress/heap.py)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CompressError as err:
        print(f"compress {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ncompress {args.command}: interrupted; {INTERRUPTED[args.command]}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
