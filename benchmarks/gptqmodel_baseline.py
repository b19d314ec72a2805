"""Peer baseline for benchmarks/quantize_quality.py: GPTQModel's GPTQ on OUR calibration data, scored by OUR evaluation.

For each model (the embedded teacher, and a distilled student with --student) GPTQModel quantizes the
model from exactly the calibration blocks `compress.quantize.stage.calibration_blocks` gives our GPTQ
(128 x 512 tokens of builtin:pydocs/train, seed 0; passed pre-tokenized, every token attended), with
4 bits, group 128, symmetric, damp 0.01, LM head kept float, fp32 calibration, desc_act off and on.
The checkpoint is saved in GPTQ v1 format, loaded back with our fp32 torch loader
(`compress.models.load_quantized`) and scored with `evaluate_domains` from quantize_quality.py on the
same domains, windows and token budget, so its rows compare one-to-one with quantize_quality.json.

GPTQModel is not a dependency of this package: run this with an environment that has it
(GPTQModel 7.6.0 was measured; 7.7 needs torch>=2.14.1):

    /work/gptqmodel-check/venv/bin/python benchmarks/gptqmodel_baseline.py --student runs/bench-distill-pays/distilled/student

Results accumulate in benchmarks/results/gptqmodel_baseline.json (a rerun skips finished rows; --fresh
starts over) and are rendered to gptqmodel_baseline.md. Each GPTQModel run takes minutes on 2 cores:
run nothing else beside it, the quantize time is reported together with the load average around it.
"""
from __future__ import annotations

import os

# Before torch / GPTQModel are imported: GPTQModel sizes its CPU worker pool from this at import time.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import contextlib
import gc
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEACHER_LABEL = "teacher (SmolLM2-135M-Instruct)"  # the labels quantize_quality.json uses
STUDENT_LABEL = "distilled student"
DEFAULT_STUDENT = ROOT / "runs" / "bench-distill-pays" / "distilled" / "student"

# label -> GPTQModel desc_act; the labels mirror quantize_quality.py's gptq4-g128 / gptq4-g128-act
VARIANTS = {"gptqmodel-gptq4-g128": False, "gptqmodel-gptq4-g128-act": True}
BITS, GROUP_SIZE, SYM, DAMP = 4, 128, True, 0.01


def _quality_module():
    """benchmarks/quantize_quality.py, imported from its path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("quantize_quality", HERE / "quantize_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _busy_processes(min_cpu: float = 20.0) -> list[str]:
    """Other processes using CPU right now (ps %CPU is averaged over their lifetime: a hint, not a measure)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    busy = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 3)
        if len(parts) < 4 or int(parts[0]) == os.getpid():
            continue
        with contextlib.suppress(ValueError):
            if float(parts[1]) >= min_cpu:
                busy.append(f"pid {parts[0]} {parts[1]}% cpu, up {parts[2]}: {parts[3][:120]}")
    return busy


def _machine_state() -> dict:
    return {"loadavg_1_5_15": _load(), "busy_processes": _busy_processes()}


def quantize_with_gptqmodel(model_dir: str, blocks, desc_act: bool, out_dir: Path, batch_size: int) -> dict:
    """GPTQModel 4-bit g128 of `model_dir` from `blocks` (n, seq_len) into `out_dir` (GPTQ v1). Runs in a temp cwd."""
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT

    qconfig = QuantizeConfig(
        bits=BITS, group_size=GROUP_SIZE, sym=SYM, desc_act=desc_act, damp_percent=DAMP,
        lm_head=False, format=FORMAT.GPTQ, device="cpu",
    )
    examples = [{"input_ids": row.clone(), "attention_mask": torch.ones_like(row)} for row in blocks]
    cwd = os.getcwd()
    scratch = Path(tempfile.mkdtemp(prefix="gptqmodel-cwd-"))
    os.chdir(scratch)  # GPTQModel writes ./logs (and may offload) into the cwd
    try:
        model = GPTQModel.load(model_dir, qconfig, dtype=torch.float32)  # QuantizeConfig.device="cpu" places it
        load_dtype = str(next(model.model.parameters()).dtype)
        t0 = time.perf_counter()
        # calibration_sort=None keeps our order (all rows have one length; GPTQModel's default "desc" sort would too)
        model.quantize(examples, batch_size=batch_size, calibration_sort=None)
        seconds = time.perf_counter() - t0
        effective = {
            "desc_act": model.quantize_config.desc_act,
            "act_group_aware": getattr(model.quantize_config, "act_group_aware", None),
            "damp_percent": model.quantize_config.damp_percent,
            "true_sequential": model.quantize_config.true_sequential,
            "static_groups": getattr(model.quantize_config, "static_groups", None),
            "offload_to_disk": getattr(model.quantize_config, "offload_to_disk", None),
        }
        t1 = time.perf_counter()
        model.save(str(out_dir))
        save_s = time.perf_counter() - t1
        del model
        gc.collect()
    finally:
        os.chdir(cwd)
        shutil.rmtree(scratch, ignore_errors=True)
    qc = json.loads((out_dir / "config.json").read_text()).get("quantization_config", {})
    saved = {k: qc.get(k) for k in ("quant_method", "checkpoint_format", "bits", "group_size", "desc_act", "sym", "damp_percent", "lm_head", "true_sequential")}
    return {"quantize_s": round(seconds, 1), "save_s": round(save_s, 1), "load_dtype": load_dtype, "gptqmodel_config": effective, "saved_quantization_config": saved}


def _checkpoint_shapes(directory: Path, module: str = "model.layers.0.mlp.down_proj") -> dict:
    """Groups GPTQModel wrote for one layer whose input width may not be a multiple of the group size."""
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if key.startswith("model.layers.0.") and key.endswith((".scales", ".g_idx")):
                    out[key.removeprefix("model.layers.0.")] = list(fh.get_slice(key).get_shape())
    return out


def run_row(model_label: str, model: str, label: str, work: Path, args, quality) -> dict:
    from compress import models
    from compress.quantize.stage import weights_bytes

    tokenizer = models.load_tokenizer(model)
    domains = {"in-domain (pydocs eval)": "builtin:pydocs/eval"}
    if quality.LICENSES.is_dir():
        domains["far-domain (licences)"] = str(quality.far_domain_file(work))
    source = models.resolve_source(model)
    before = _machine_state()
    if label == "float":
        row = {"variant": "float", "size_mb": weights_bytes(Path(source)) / 2**20, "quantize_s": 0.0}
        path = Path(source)
    else:
        blocks, calib_info, _ = quality.calibration(model, args.samples, args.calib_len, args.seed)
        path = work / label
        shutil.rmtree(path, ignore_errors=True)
        print(f"{model_label} {label}: GPTQModel quantize, calibration {tuple(blocks.shape)} sha256 {calib_info['sha256'][:12]}", flush=True)
        info = quantize_with_gptqmodel(source, blocks, VARIANTS[label], path, args.batch_size)
        row = {
            "variant": label,
            "settings": {"bits": BITS, "group_size": GROUP_SIZE, "sym": SYM, "damp_percent": DAMP, "desc_act": VARIANTS[label], "lm_head": False, "batch_size": args.batch_size},
            "calibration": calib_info,
            **info,
            "size_mb": weights_bytes(path) / 2**20,
            "layer0_shapes": _checkpoint_shapes(path),
        }
    row["machine_before"] = before
    row["machine_after_quantize"] = _machine_state()
    try:
        row["ppl"] = quality.evaluate_domains(path, domains, tokenizer, args.seq_len, args.eval_tokens)
    except Exception as err:  # our loader refusing GPTQModel's output is a finding: record exactly why
        row["ppl_error"] = f"{type(err).__name__}: {err}"
    row["machine_after"] = _machine_state()
    return row


def render(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# GPTQModel baseline (peer of quantize_quality.md)",
        "",
        f"GPTQModel {results['gptqmodel_version']}: {BITS}-bit, group {GROUP_SIZE}, symmetric, damp {DAMP}, LM head kept float, "
        f"fp32 calibration, GPTQ v1 checkpoint; calibration = our blocks ({s['samples']} x {s['calib_len']} tokens of "
        f"`builtin:pydocs/train`, seed {s.get('seed', 0)}, batch {s['batch_size']}). Perplexity by our fp32 loader and `evaluate_domains` "
        f"on {s['eval_tokens']:,} tokens per domain, windows of {s['seq_len']}. Machine: {results['machine']}.",
        "",
    ]
    for model, rows in results["models"].items():
        ok = {k: v for k, v in rows.items() if "ppl" in v}
        domains = list(next(iter(ok.values()))["ppl"]) if ok else []
        base = ok.get("float")
        lines += [f"## {model}", "", "| variant | " + " | ".join(f"ppl {d}" for d in domains) + " | size (MB) | quantize time (s) | load avg (1 min) before / after |", "|---" * (len(domains) + 4) + "|"]
        for label, row in rows.items():
            if "ppl" not in row:
                lines.append(f"| {label} | " + " | ".join("-" for _ in domains) + f" | {row.get('size_mb', 0):.1f} | {row.get('quantize_s', 0):.0f} | FAILED: {row.get('ppl_error') or row.get('error')} |")
                continue
            cells = []
            for d in domains:
                rel = "" if base is None or label == "float" else f" ({100 * (row['ppl'][d] / base['ppl'][d] - 1):+.1f}%)"
                cells.append(f"{row['ppl'][d]:.2f}{rel}")
            la = f"{row['machine_before']['loadavg_1_5_15'][0]:.1f} / {row['machine_after_quantize']['loadavg_1_5_15'][0]:.1f}"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['size_mb']:.1f} | {row['quantize_s']:.0f} | {la} |")
        lines.append("")
    lines += [
        "GPTQModel's desc_act=False runs with its default `act_group_aware=True` (group-aware reordering); desc_act=True turns it off. "
        "Quantize time is the `model.quantize(...)` call alone (not load or save). A load average above ~2 on this 2-core machine means "
        "other jobs shared the cores and the time is inflated.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="builtin:smollm2-135m")
    parser.add_argument("--student", default=str(DEFAULT_STUDENT), help="distilled student folder (skipped if missing)")
    parser.add_argument("--only-model", choices=["teacher", "student"], help="run one model only")
    parser.add_argument("--only", nargs="*", choices=["float", *VARIANTS], help="rows to run (default: all)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="GPTQModel calibration batch (ours: quantize.batch_size=8; the Hessian is per token either way)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="which calibration blocks are drawn (recipe seed)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--results", type=Path, default=RESULTS / "gptqmodel_baseline.json", help="output json (the .md goes beside it)")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("COMPRESS_THREADS", "2")))
    import gptqmodel

    from compress.artifacts import cpu_name

    quality = _quality_module()
    out = args.results
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() and not args.fresh else {"models": {}}
    results.update(
        command=" ".join([Path(sys.executable).name, "benchmarks/gptqmodel_baseline.py", *sys.argv[1:]]) + "  (a Python with gptqmodel installed)",
        gptqmodel_version=gptqmodel.__version__,
        settings={"samples": args.samples, "calib_len": args.calib_len, "seed": args.seed, "batch_size": args.batch_size, "seq_len": args.seq_len, "eval_tokens": args.eval_tokens},
        machine=f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, GPTQMODEL_CPU_WORKERS={os.environ['GPTQMODEL_CPU_WORKERS']}, "
        f"torch {torch.__version__}, Python {platform.python_version()}",
    )
    models_to_run = {}
    if args.only_model in (None, "teacher"):
        models_to_run[TEACHER_LABEL] = args.teacher
    if args.only_model in (None, "student"):
        if args.student and (Path(args.student) / "config.json").is_file():
            models_to_run[STUDENT_LABEL] = str(Path(args.student).resolve())  # GPTQModel runs in a scratch cwd
        else:
            print(f"student {args.student} not found: skipped", flush=True)
    md = out.with_suffix(".md")
    work = Path(tempfile.mkdtemp(prefix="compress-bench-gptqmodel-"))
    try:
        for model_label, model in models_to_run.items():
            rows = results["models"].setdefault(model_label, {})
            for label in args.only or ["float", *VARIANTS]:
                if label in rows and "ppl" in rows[label]:
                    continue
                t0 = time.perf_counter()
                try:
                    rows[label] = run_row(model_label, model, label, work, args, quality)
                except Exception as err:  # a failed row is recorded, the others still run
                    rows[label] = {"variant": label, "error": f"{type(err).__name__}: {err}"}
                    print(f"{model_label} {label}: FAILED {type(err).__name__}: {err}", flush=True)
                finally:
                    shutil.rmtree(work / label, ignore_errors=True)
                    gc.collect()
                row = rows[label]
                print(f"{model_label} {label}: ppl {row.get('ppl') or row.get('ppl_error') or row.get('error')}, quantize {row.get('quantize_s', 0):.0f} s "
                      f"(row {time.perf_counter() - t0:.0f} s, load {row.get('machine_before', {}).get('loadavg_1_5_15')} -> {row.get('machine_after', {}).get('loadavg_1_5_15')})", flush=True)
                out.write_text(json.dumps(results, indent=2) + "\n")
                md.write_text(render(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.write_text(json.dumps(results, indent=2) + "\n")  # also when every row was already there (refreshes command/md)
    md.write_text(render(results))
    print(md.read_text())


if __name__ == "__main__":
    main()
