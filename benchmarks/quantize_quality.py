"""Quantization quality, size and time: float vs RTN vs GPTQ (with/without act-order, 4 and 3 bits) vs bitsandbytes.

For each model (the embedded teacher and a distilled student) every variant is quantized with
`compress.quantize.stage.run_quantize` from the same calibration data (128 x 512 tokens of the embedded
Python-docs train split) and its perplexity measured on held-out texts of several domains, since
GPTQ can overfit its calibration domain:
  - in-domain:  builtin:pydocs/eval (held-out Python documentation)
  - far-domain: the licence texts in /usr/share/common-licenses (legal English; on every Debian machine)

    python benchmarks/quantize_quality.py --student runs/quickstart/student
    python benchmarks/quantize_quality.py --student DIR --only gptq4-act rtn4   # a subset

Results accumulate in benchmarks/results/quantize_quality.json (a rerun skips finished rows; --fresh
starts over) and are rendered to quantize_quality.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
LICENSES = Path("/usr/share/common-licenses")

VARIANTS: dict[str, dict | None] = {
    "float": None,
    "rtn4-g128": {"method": "rtn", "bits": 4, "group_size": 128},
    "gptq4-g128-act": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True},
    "gptq4-g128": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": False},
    # The defaults before scale_search and forward_dtype existed (min/max scales, fp32 forwards).
    "gptq4-g128-act-minmax-fp32": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True, "scale_search": "minmax", "forward_dtype": "float32"},
    "gptq4-g128-minmax-fp32": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": False, "scale_search": "minmax", "forward_dtype": "float32"},
    "gptq3-g128-act": {"method": "gptq", "bits": 3, "group_size": 128, "act_order": True},
    "rtn3-g128": {"method": "rtn", "bits": 3, "group_size": 128},
    "bnb-nf4": {"method": "bnb-nf4"},
    "bnb-int8": {"method": "bnb-int8"},
}

PAPER_CONTEXT = "GPTQ paper (Frantar et al. 2022), OPT-125M on WikiText2: fp16 27.65, RTN 4-bit 37.28, GPTQ 4-bit 31.12 (perplexity)."


def far_domain_file(work: Path) -> Path:
    """The Debian licence texts as one .txt (legal prose), built on the fly: nothing is shipped."""
    out = work / "licenses.txt"
    if not out.exists():
        texts = [p.read_text(errors="ignore") for p in sorted(LICENSES.iterdir()) if p.is_file() and not p.is_symlink()]
        out.write_text("\n\n".join(texts))
    return out


def evaluate_domains(model_dir: Path, domains: dict[str, str], tokenizer, seq_len: int, max_tokens: int) -> dict:
    import torch

    from compress import models
    from compress.data import packed_blocks
    from compress.evaluate import perplexity_on_blocks

    model = models.load_quantized(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for name, source in domains.items():
        blocks = packed_blocks(source, tokenizer, seq_len=seq_len, text_field="text", max_tokens=max_tokens, cache_dir=None)
        out[name] = perplexity_on_blocks(model, blocks)["ppl"]
    return out


def run_variant(model: str, label: str, settings: dict | None, work: Path, args) -> dict:
    from compress import models
    from compress.quantize.stage import run_quantize, weights_bytes
    from compress.recipe import load_recipe

    tokenizer = models.load_tokenizer(model)
    domains = {"in-domain (pydocs eval)": "builtin:pydocs/eval"}
    if LICENSES.is_dir():
        domains["far-domain (licences)"] = str(far_domain_file(work))
    if settings is None:
        path, seconds = Path(models.resolve_source(model)), 0.0
    else:
        overrides = [f"quantize.{k}={json.dumps(v)}" for k, v in settings.items()]
        if settings["method"] == "gptq":
            overrides += [f"quantize.calib.samples={args.samples}", f"quantize.calib.seq_len={args.calib_len}"]
        recipe = load_recipe(None, overrides + [f"data.seq_len={args.seq_len}", f"data.max_eval_tokens={args.eval_tokens}"])
        path = work / label
        shutil.rmtree(path, ignore_errors=True)
        load_before = os.getloadavg()[0]
        result = run_quantize(recipe, model, path, progress=True)
        seconds = result.metrics["quantize_time_s"]
        load = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    ppl = evaluate_domains(path, domains, tokenizer, args.seq_len, args.eval_tokens)
    row = {"variant": label, "settings": settings, "ppl": ppl, "size_mb": weights_bytes(path) / 2**20, "quantize_s": seconds}
    return row if settings is None else {**row, "loadavg_1min_before_after": load}


def calibration(model: str, samples: int, seq_len: int, seed: int = 0):
    """Our calibration blocks for `model` (its own tokenizer), exactly as run_quantize draws them:
    (blocks, info with their sha256, tokenizer). The peer and A/B scripts draw theirs here too."""
    from compress import models
    from compress.quantize.stage import calibration_blocks
    from compress.recipe import load_recipe

    recipe = load_recipe(None, ["quantize.method=gptq", f"quantize.calib.samples={samples}", f"quantize.calib.seq_len={seq_len}", f"seed={seed}"])
    tokenizer = models.load_tokenizer(model)
    blocks, digest = calibration_blocks(recipe, recipe.quantize, tokenizer)
    info = {"source": recipe.quantize.calib.source or recipe.data.train, "samples": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]), "seed": recipe.seed, "sha256": digest}
    return blocks, info, tokenizer


def peer_rows(path: Path, ours: dict[str, str], args) -> dict:
    """GPTQModel rows from a `gptqmodel_baseline.py` result, by model label, for the same table; `ours`
    maps our model labels to models. A row is taken only if it was calibrated on our very blocks."""
    peer = json.loads(path.read_text())
    taken: dict = {}
    for model, rows in peer["models"].items():
        if model not in ours:
            continue
        want = calibration(ours[model], args.samples, args.calib_len)[1]["sha256"]
        for label, row in rows.items():
            if label == "float" or "ppl" not in row:
                continue
            sha = row["calibration"]["sha256"]
            if sha != want:
                raise SystemExit(f"{path}: {model} {label} was calibrated on blocks {sha[:12]}..., ours on {want[:12]}...")
            load = [row["machine_before"]["loadavg_1_5_15"][0], row["machine_after_quantize"]["loadavg_1_5_15"][0]]
            taken.setdefault(model, {})[f"GPTQModel {peer['gptqmodel_version']} {label.removeprefix('gptqmodel-')}"] = {
                "variant": label, "peer": path.name, "ppl": row["ppl"], "size_mb": row["size_mb"], "quantize_s": row["quantize_s"],
                "loadavg_1min_before_after": load, "calib_sha256": sha, "command": peer["command"],
            }
    return taken


def render(results: dict) -> str:
    lines = [
        "# Quantization: quality, size, time",
        "",
        f"Calibration: {results['settings']['samples']} x {results['settings']['calib_len']} tokens of `builtin:pydocs/train` (seed 0); "
        f"perplexity on {results['settings']['eval_tokens']:,} tokens per domain, windows of {results['settings']['seq_len']}. "
        f"Machine: {results['machine']}. LM head kept in float; symmetric grid; damp 0.01. GPTQ rows use the recipe defaults "
        "(`scale_search: mse-hessian`, `forward_dtype: bfloat16`, `true_sequential: true` since session 4) unless labelled `minmax-fp32` (min/max scales, fp32 forwards: "
        "the defaults before, measured with commit cbc1092). `GPTQModel` rows: GPTQModel's own run (`benchmarks/gptqmodel_baseline.py`) on the "
        "same calibration blocks (sha256 checked), evaluated by the same code; its time is its `quantize()` call. Quantize times are on a shared "
        "2-core machine: the load average (1 min, before / after) says how shared; above ~2 the time is inflated. "
        "Each row is one calibration draw; how much GPTQ results move between draws: `gptq_seeds.md`.",
        "",
    ]
    for model, rows in results["models"].items():
        domains = list(next(iter(rows.values()))["ppl"]) if rows else []
        base = rows.get("float")
        lines += [f"## {model}", "", "| variant | " + " | ".join(f"ppl {d}" for d in domains) + " | size (MB) | quantize time (s) | load avg |", "|---" * (len(domains) + 4) + "|"]
        for label, row in rows.items():
            cells = []
            for d in domains:
                rel = "" if base is None or label == "float" else f" ({100 * (row['ppl'][d] / base['ppl'][d] - 1):+.1f}%)"
                cells.append(f"{row['ppl'][d]:.2f}{rel}")
            load = row.get("loadavg_1min_before_after")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['size_mb']:.1f} | {row['quantize_s']:.0f} | {'' if load is None else f'{load[0]} / {load[1]}'} |")
        lines.append("")
    lines += [f"For context: {PAPER_CONTEXT}", "", "Commands (rows accumulate; a rerun skips finished rows):", ""]
    lines += [f"    {c}" for c in results.get("commands", [results["command"]])] + [""]
    peers = sorted({row["command"] for rows in results["models"].values() for row in rows.values() if "peer" in row})
    if peers:
        lines += ["GPTQModel rows (then added with `--peer FILE.json`):", ""] + [f"    {c}" for c in peers] + [""]
    return "\n".join(lines)


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="builtin:smollm2-135m")
    parser.add_argument("--student", help="a distilled student folder (e.g. runs/quickstart/student)")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--results", type=Path, default=RESULTS / "quantize_quality.json", help="output json (the .md goes beside it)")
    parser.add_argument("--peer", nargs="*", type=Path, default=[], help="gptqmodel_baseline.py result JSONs whose rows join the table")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()

    import platform

    import torch

    from compress.artifacts import cpu_name

    out = args.results
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    results = json.loads(out.read_text()) if out.exists() and not args.fresh else {"models": {}}
    command = "python benchmarks/quantize_quality.py " + " ".join(sys.argv[1:])
    # Rows accumulate over runs (a rerun skips finished rows), so keep every command that added some.
    results["commands"] = [c for c in results.get("commands", []) if c != command] + [command]
    results.update(
        command=command,
        settings={"samples": args.samples, "calib_len": args.calib_len, "seq_len": args.seq_len, "eval_tokens": args.eval_tokens},
        machine=f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}",
        paper_context=PAPER_CONTEXT,
    )
    models_to_run = {"teacher (SmolLM2-135M-Instruct)": args.teacher}
    if args.student:
        models_to_run["distilled student"] = args.student
    work = Path(tempfile.mkdtemp(prefix="compress-bench-quant-"))
    try:
        for model_label, model in models_to_run.items():
            rows = results["models"].setdefault(model_label, {})
            for label in args.only or list(VARIANTS):
                if label in rows:
                    continue
                t0 = time.perf_counter()
                try:
                    rows[label] = run_variant(model, label, VARIANTS[label], work, args)
                except Exception as err:  # a failed variant is recorded, the others still run
                    rows[label] = {"variant": label, "error": f"{type(err).__name__}: {err}"}
                    print(f"{model_label} {label}: FAILED {err}", flush=True)
                    continue
                finally:
                    shutil.rmtree(work / label, ignore_errors=True)
                print(f"{model_label} {label}: {rows[label]['ppl']} ({time.perf_counter() - t0:.0f} s)", flush=True)
                out.write_text(json.dumps(results, indent=2) + "\n")
                md.write_text(render({**results, "models": {m: {k: v for k, v in r.items() if "error" not in v} for m, r in results["models"].items()}}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for path in args.peer:
        for model, rows in peer_rows(path, models_to_run, args).items():
            results["models"].setdefault(model, {}).update(rows)
    out.write_text(json.dumps(results, indent=2) + "\n")
    md.write_text(render({**results, "models": {m: {k: v for k, v in r.items() if "error" not in v} for m, r in results["models"].items()}}))
    print(md.read_text())


if __name__ == "__main__":
    main()
