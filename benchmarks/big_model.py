"""Block-at-a-time quantization against the model's size: peak RSS, wall time and time per block of `compress quantize`
(GPTQ 4-bit, CPU) on a synthetic Llama with random weights that this script builds and saves itself, and on the
embedded teacher both in memory (`quantize.load: whole`) and block at a time (`blocks`), with the codes compared
tensor by tensor. Each measurement is one `compress quantize` process, run alone; its peak RSS is its own VmHWM
(/proc/PID/status, read until it exits).

    python benchmarks/big_model.py                      # builds runs/big-model/synthetic once (about 6 GB)
    python benchmarks/big_model.py --skip-synthetic     # the teacher rows only

Results: benchmarks/results/big_model.json and the generated .md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from export_latency import report_header, write_report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "big-model")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "big_model")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--intermediate", type=int, default=6912)
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=49152, help="the embedded tokenizer's vocabulary")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="teacher runs per mode, alternating whole / blocks")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-teacher", action="store_true")
    p.add_argument("--skip-offload", action="store_true")
    p.add_argument("--offload-samples", type=int, default=256, help="calibration sequences of the offload part (of the quickstart's seq_len)")
    return p.parse_args(argv)


# ---- the synthetic model, written shard by shard (never whole in memory) -------------------------------------

def build_synthetic(folder: Path, args) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from compress import models

    shape = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")}
    marker = folder / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return _describe(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
    )
    config.dtype = "bfloat16"
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        skeleton = AutoModelForCausalLM.from_config(config)
    names = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    groups: list[list[str]] = [[]]
    size, limit = 0, 2 * 10**9
    for name, s in names.items():
        nbytes = 2 * math.prod(s)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for i, name in enumerate(group):
            g = torch.Generator().manual_seed(hash((k, i)) % 2**31)
            s = names[name]
            # norms at 1, projections N(0, 0.02) as Llama initialises them
            tensors[name] = torch.ones(s, dtype=torch.bfloat16) if len(s) == 1 else (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    tokenizer = models.load_tokenizer("builtin:smollm2-135m")
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(shape))
    return _describe(folder)


def _describe(folder: Path) -> dict:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    params = 0
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / file), "pt") as fh:
            params += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return {"folder": str(folder), "parameters": params, "bf16_bytes": index["metadata"]["total_size"], "shape": json.loads((folder / "synthetic.json").read_text()) if (folder / "synthetic.json").is_file() else None}


# ---- one measured `compress quantize` ------------------------------------------------------------------------

def measure(args_list: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    load = list(os.getloadavg())
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", *args_list], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Peak RSS is the process's own VmHWM, read until it exits. ru_maxrss is not: exec() folds the high-water mark
    # of the address space it replaces (this script's, forked or vforked) into it, so a parent that once held
    # 3 GB (building the synthetic model) would make every child appear to peak at 3 GB.
    hwm = [0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            try:
                status_text = Path(f"/proc/{proc.pid}/status").read_text()
                hwm[0] = max(hwm[0], int(status_text.split("VmHWM:")[1].split()[0]) * 1024)
            except (OSError, IndexError, ValueError):
                pass
            done.wait(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out = proc.stdout.read()  # EOF: the process closed its output, at exit
    done.set()
    watcher.join()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(out[-4000:], file=sys.stderr)
        raise SystemExit(f"compress {' '.join(args_list)} failed with {proc.returncode}")
    plan = next((line for line in out.splitlines() if line.startswith("memory plan")), None)
    return {"wall_s": round(wall, 1), "peak_rss_bytes": hwm[0], "peak_rss_method": "VmHWM", "ru_maxrss_bytes": usage.ru_maxrss * 1024, "load_average_before": load, "plan": plan}


def recipe_file(path: Path, quantize: dict, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"seed": 0, "data": data, "quantize": quantize}))
    return path


def record_of(folder: Path) -> dict:
    return json.loads((folder / "compress.json").read_text())


def same_tensors(a: Path, b: Path) -> dict:
    import torch
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for file in sorted(folder.glob("*.safetensors")) + sorted((folder / "extras").glob("*.safetensors")):
            with safe_open(str(file), "pt") as fh:
                out.update({f"{file.parent.name}/{k}" if file.parent != folder else k: fh.get_tensor(k) for k in fh.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    differ = sorted(k for k in set(ta) | set(tb) if k not in ta or k not in tb or ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]))
    return {"tensors": len(ta), "differ": len(differ), "first_differing": differ[:5], "identical": not differ}


# ---- the runs ------------------------------------------------------------------------------------------------

def synthetic(args) -> dict:
    model = build_synthetic(args.work / "synthetic", args)
    data = {"train": "builtin:pydocs/train", "eval": "builtin:pydocs/eval", "seq_len": args.calib_seq_len, "max_eval_tokens": args.eval_tokens, "cache_dir": str(args.work / "cache")}
    quantize = {"method": "gptq", "bits": 4, "calib": {"samples": args.calib_samples, "seq_len": args.calib_seq_len}}
    recipe = recipe_file(args.work / "synthetic.yaml", quantize, data)
    out = args.work / "synthetic-gptq4"
    row = measure(["quantize", model["folder"], "--recipe", str(recipe), "--output", str(out), "--overwrite", "--no-progress"], args.threads)
    rec = record_of(out)
    seconds = rec["block_seconds"]
    return {
        "model": model, "recipe": {"data": data, "quantize": quantize}, **row,
        "peak_rss_share_of_bf16": row["peak_rss_bytes"] / model["bf16_bytes"],
        "load": rec["load"], "memory_plan": rec.get("memory_plan"),
        "block_seconds": {"median": sorted(seconds)[len(seconds) // 2], "min": min(seconds), "max": max(seconds), "all": seconds},
        "metrics": {k: rec["metrics"][k] for k in ("ppl_before", "ppl_after", "size_before_bytes", "size_after_bytes", "quantize_time_s")},
    }


def warm_caches(quick: dict, data: dict) -> None:
    """Tokenize the calibration and evaluation text once, before any timed run, so that no run pays for it."""
    from compress import models
    from compress.data import packed_blocks

    tokenizer = models.load_tokenizer("builtin:smollm2-135m")
    calib = quick["quantize"]["calib"]
    cache = Path(data["cache_dir"])
    packed_blocks(calib.get("source") or data["train"], tokenizer, seq_len=calib["seq_len"], text_field=data.get("text_field", "text"), max_tokens=None, cache_dir=cache)
    packed_blocks(data.get("eval") or data["train"], tokenizer, seq_len=data["seq_len"], text_field=data.get("text_field", "text"), max_tokens=data.get("max_eval_tokens"), cache_dir=cache)


def teacher(args) -> dict:
    import yaml

    quick = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    data = {**quick["data"], "cache_dir": str(args.work / "cache")}
    warm_caches(quick, data)
    rows = []
    for r in range(args.repeats):
        for mode in ("whole", "blocks"):
            recipe = recipe_file(args.work / f"teacher-{mode}.yaml", {**quick["quantize"], "load": mode}, data)
            out = args.work / f"teacher-{mode}"
            row = measure(["quantize", "builtin:smollm2-135m", "--recipe", str(recipe), "--output", str(out), "--overwrite", "--no-progress"], args.threads)
            rec = record_of(out)
            rows.append({"mode": mode, "repeat": r, **row, "quantize_time_s": rec["metrics"]["quantize_time_s"], "ppl_after": rec["metrics"]["ppl_after"], "ppl_before": rec["metrics"]["ppl_before"], "load": rec["load"]})
            print(f"teacher {mode} #{r}: {row['wall_s']} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    comparison = same_tensors(args.work / "teacher-whole", args.work / "teacher-blocks")
    import statistics

    med = lambda mode, key: statistics.median(x[key] for x in rows if x["mode"] == mode)  # noqa: E731
    return {
        "recipe": "recipes/quickstart.yaml (quantize, data) with quantize.load whole / blocks",
        "runs": rows, "codes": comparison,
        "wall_ratio_blocks_over_whole": med("blocks", "wall_s") / med("whole", "wall_s"),
        "peak_rss_ratio_blocks_over_whole": med("blocks", "peak_rss_bytes") / med("whole", "peak_rss_bytes"),
    }


def offload(args) -> dict:
    """The embedded teacher block at a time with the states between blocks on the device (RAM here) and on disk
    (`quantize.activations`), the paper's order (true_sequential false: a block's inputs are not all held by
    paused forwards), a larger calibration set so that the states are a visible share of the memory."""
    import yaml

    quick = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    data = {**quick["data"], "cache_dir": str(args.work / "cache")}
    base = {**quick["quantize"], "load": "blocks", "true_sequential": False, "calib": {**quick["quantize"]["calib"], "samples": args.offload_samples}}
    warm_caches({"quantize": base}, data)
    rows = []
    for where in ("device", "disk"):
        spec = {**base, "activations": where}
        recipe = recipe_file(args.work / f"offload-{where}.yaml", spec, data)
        out = args.work / f"offload-{where}"
        row = measure(["quantize", "builtin:smollm2-135m", "--recipe", str(recipe), "--output", str(out), "--overwrite", "--no-progress"], args.threads)
        rec = record_of(out)
        plan = rec.get("memory_plan") or {}
        rows.append({"activations": where, **row, "quantize_time_s": rec["metrics"]["quantize_time_s"], "ppl_after": rec["metrics"]["ppl_after"],
                     "plan_activations_bytes": plan.get("activations"), "plan_offloaded_bytes": plan.get("offloaded"), "plan_peak_bytes": plan.get("peak")})
        print(f"offload {where}: {row['wall_s']} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return {"recipe": f"recipes/quickstart.yaml (quantize, data) with load blocks, true_sequential false, calib.samples {args.offload_samples}; activations device / disk",
            "runs": rows, "codes": same_tensors(args.work / "offload-device", args.work / "offload-disk")}


def render(report: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = ["# Block-at-a-time quantization: peak memory and time", "", "Generated by `benchmarks/big_model.py` from `big_model.json`; each part was measured by the run named under it.", ""]

    def ran(part: dict) -> list[str]:
        r = part["run"]
        return [f"Command: `{r['command']}`; git {r['git']}; {r['machine']['cpu']}, {r['machine']['threads']} threads; "
                f"load average {' '.join(f'{x:.2f}' for x in r['load_average_start'])} at start, {' '.join(f'{x:.2f}' for x in r['load_average_end'])} at end.", ""]
    s = report.get("synthetic")
    if s:
        m = s["model"]
        lines += ["## Synthetic Llama (random weights), GPTQ 4-bit, block at a time", "", *ran(s),
                  "| parameters | bf16 size | peak RSS | peak RSS / bf16 size | wall | per block (median, min-max) | plan printed |", "|---|---|---|---|---|---|---|",
                  f"| {m['parameters'] / 1e9:.2f} B ({m['shape']}) | {gib(m['bf16_bytes'])} | {gib(s['peak_rss_bytes'])} | {100 * s['peak_rss_share_of_bf16']:.1f}% (target <= 25%) | {s['wall_s']:.0f} s | "
                  f"{s['block_seconds']['median']:.1f} s ({s['block_seconds']['min']:.1f}-{s['block_seconds']['max']:.1f}) | {s['plan']} |", "",
                  f"Peak RSS: the process's {s.get('peak_rss_method', 'ru_maxrss')}" + (f" (its ru_maxrss: {gib(s['ru_maxrss_bytes'])}; ru_maxrss also folds in this script's own high-water mark at exec, so it reads high in a run where this script has just built the model)" if s.get("ru_maxrss_bytes") else "") + ". "
                  f"Calibration {s['recipe']['quantize']['calib']['samples']} x {s['recipe']['quantize']['calib']['seq_len']} tokens, evaluation {s['recipe']['data']['max_eval_tokens']} tokens; "
                  f"size {gib(s['metrics']['size_before_bytes'])} -> {gib(s['metrics']['size_after_bytes'])}; ppl of the random model {s['metrics']['ppl_before']:.0f} -> {s['metrics']['ppl_after']:.0f}.", ""]
    t = report.get("teacher")
    if t:
        lines += ["## Embedded teacher (SmolLM2-135M), quickstart GPTQ settings: in memory vs block at a time", "", *ran(t),
                  "| mode | repeat | wall | quantize_time_s | peak RSS | ppl after | load average before |", "|---|---|---|---|---|---|---|"]
        for r in t["runs"]:
            lines.append(f"| {r['mode']} | {r['repeat']} | {r['wall_s']:.1f} s | {r['quantize_time_s']:.1f} | {gib(r['peak_rss_bytes'])} | {r['ppl_after']:.4f} | {r['load_average_before'][0]:.2f} |")
        c = t["codes"]
        method = t["runs"][0].get("peak_rss_method", "ru_maxrss (os.wait4: also counts this script's own high-water mark, folded in at exec: an upper bound on the process's own)")
        lines += ["", f"- Peak RSS: {method}.", f"- Codes: {c['tensors']} tensors compared, {c['differ']} differ ({'bit-identical' if c['identical'] else 'NOT identical: ' + ', '.join(c['first_differing'])}).",
                  f"- Median wall time blocks / whole: {t['wall_ratio_blocks_over_whole']:.3f} (target <= 1.10); median peak RSS blocks / whole: {t['peak_rss_ratio_blocks_over_whole']:.3f}.", ""]
    o = report.get("offload")
    if o:
        lines += ["## Embedded teacher block at a time: states between blocks on the device vs on disk", "", *ran(o), o["recipe"] + ".", "",
                  "| activations | wall | quantize_time_s | peak RSS | plan: on the device | plan: on disk | ppl after |", "|---|---|---|---|---|---|---|"]
        for r in o["runs"]:
            lines.append(f"| {r['activations']} | {r['wall_s']:.1f} s | {r['quantize_time_s']:.1f} | {gib(r['peak_rss_bytes'])} | {gib(r['plan_activations_bytes'] or 0)} | {gib(r['plan_offloaded_bytes'] or 0)} | {r['ppl_after']:.4f} |")
        c = o["codes"]
        lines += ["", f"- Codes: {c['tensors']} tensors compared, {c['differ']} differ ({'bit-identical' if c['identical'] else 'NOT identical'}).", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    report = report_header(args, ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "calib_samples", "calib_seq_len", "eval_tokens", "repeats", "threads"))
    # Each part records its own command, commit, machine and load; the report is written after each part, so a
    # later part that fails keeps what the earlier one measured, and a part skipped keeps its previous results.
    previous = args.out.with_suffix(".json")
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    for part, skip, run in (("teacher", args.skip_teacher, teacher), ("synthetic", args.skip_synthetic, synthetic), ("offload", args.skip_offload, offload)):
        if skip:
            if part in old:
                report[part] = old[part]
            continue
        header = report_header(args, ())
        result = run(args)
        report[part] = {**result, "run": {**{k: header[k] for k in ("command", "git", "machine", "load_average_start")}, "load_average_end": list(os.getloadavg())}}
        write_report(report, args.out, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
