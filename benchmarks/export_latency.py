"""Export latency: prefill and decode speed of the exported ONNX formats against torch fp32 eager and
onnxruntime-genai's model builder, batch 1, on this CPU.

For the teacher (and a distilled student with --student): torch fp32 eager, ONNX fp32, int8, int4 from the
float model, int4 from a GPTQ artifact (--gptq / --student-gptq), and the builder's int4 folder (--genai,
made with `python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4 -e cpu`) run through the
same loop as ours (`compress_exporters.runtime`, shared KV buffer) and, when `onnxruntime_genai` imports,
through its own runtime too. Missing ONNX exports are made with `compress export` defaults into --work.

Per variant: prefill time of 128- and 512-token prompts, decode tok/s for --new-tokens tokens after a short
prompt (median and p90 over --repeats, after a warm-up), peak RSS (a child process per variant), size on disk,
and the share of the memory-bandwidth bound reached: weight bytes read per decoded token x tok/s / the
machine's copy bandwidth (numpy, measured here). Variants run alternately, round after round, so a change in
background load hits them all alike; the load average is recorded with every measurement.

    python benchmarks/export_latency.py --gptq runs/teacher-gptq4 --genai runs/genai-int4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from latency_variants import make_variant  # noqa: E402  (benchmarks/ is on sys.path when this file runs)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
ONNX_FORMATS = {"onnx-fp32": {"weights": "fp32"}, "onnx-int8": {"weights": "int8"}, "onnx-int4": {"weights": "int4"}}
# From the GPTQ artifact, one folder per setting: the default (every quantized layer at accuracy_level 4, int8
# activations; lm_head auto: the head's 4-bit GPTQ codes where the head is a large share of the bytes a decoded
# token reads, beside an 8-bit embedding of its own), an 8-bit head, a float head, level 0 for the 4-bit layers
# (fp32 activations: the same answer at any batch size; the old default), and the 4-bit embedding sharing the head's codes.
GPTQ_FORMATS = {
    "onnx-int4-gptq": {"weights": "int4"},
    "onnx-int4-gptq-head8": {"weights": "int4", "lm_head": "int8"},
    "onnx-int4-gptq-headfp32": {"weights": "int4", "lm_head": "float"},
    "onnx-int4-gptq-level0": {"weights": "int4", "accuracy_level": 0, "lm_head_accuracy_level": 4},
    "onnx-int4-gptq-emb4": {"weights": "int4", "embedding": "int4"},
}
# From a second GPTQ artifact of the same model quantized with act-order's dynamic groups (--gptq-dynamic): its
# columns' groups are scattered, so the folder permutes each projection's input (one Gather per q/k/v, o_proj and
# gate/up input). Static groups (quantize.static_groups, the quickstart's) keep g_idx sequential and need none.
DYNAMIC_FORMATS = {
    "onnx-int4-gptq-dynamic-groups": {"weights": "int4"},
    "onnx-int4-gptq-dynamic-groups-level0": {"weights": "int4", "accuracy_level": 0, "lm_head_accuracy_level": 4},
}
OURS = (*GPTQ_FORMATS, *DYNAMIC_FORMATS)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="builtin:smollm2-135m")
    p.add_argument("--gptq", type=Path, help="GPTQ 4-bit artifact of the teacher (compress quantize ... --method gptq --bits 4)")
    p.add_argument("--gptq-dynamic", type=Path, help="GPTQ 4-bit artifact of the teacher with act-order's dynamic groups (quantize.static_groups: false)")
    p.add_argument("--genai", type=Path, help="onnxruntime-genai builder int4 folder of the teacher")
    p.add_argument("--student", type=Path, help="distilled student folder (float)")
    p.add_argument("--student-gptq", type=Path, help="GPTQ 4-bit artifact of the student")
    p.add_argument("--student-gptq-dynamic", type=Path, help="GPTQ 4-bit artifact of the student with act-order's dynamic groups")
    p.add_argument("--student-genai", type=Path, help="onnxruntime-genai builder int4 folder of the student")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "export_latency", help="where missing ONNX exports are written")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--decode-prompt", type=int, default=32, help="prompt tokens before the timed decode")
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    p.add_argument("--quality-windows", type=int, default=8, help="perplexity windows per domain (0 = skip the quality check)")
    p.add_argument("--quality-length", type=int, default=512)
    p.add_argument("--only", nargs="+", help="variant names to run (default all available)")
    p.add_argument("--reverse-load", action="store_true", help="create the variants' sessions in reverse order (later-created sessions ran faster here)")
    p.add_argument("--spin", action="store_true", help="let ONNX Runtime threads spin-wait (faster on an idle machine, ruinous on a shared one)")
    p.add_argument("--out", type=Path, default=RESULTS / "export_latency")
    p.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)  # peak-RSS probe
    return p.parse_args(argv)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second moved by a numpy copy of a big array (read + write), best of `repeats`."""
    src = np.ones(megabytes * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def machine(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    versions = {}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "numpy"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - absent packages are simply not listed
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(), "versions": versions}


# ---- quality: perplexity on held-out text of two domains -------------------------------------------------

def quality_windows(float_dir: str, work: Path, windows: int, length: int) -> dict[str, list[list[int]]]:
    """`windows` blocks of `length` tokens per domain: in-domain (pydocs eval; GPTQ calibrates on pydocs train)
    and far-domain (the Debian licence texts, where GPTQ's calibration helps least)."""
    from compress import models
    from compress.data import packed_blocks

    tokenizer = models.load_tokenizer(float_dir)
    sources = {"pydocs": "builtin:pydocs/eval"}
    licences = Path("/usr/share/common-licenses")
    if licences.is_dir():
        text = work / "licences.txt"
        if not text.exists():
            text.write_text("\n\n".join(p.read_text(errors="ignore") for p in sorted(licences.iterdir()) if p.is_file() and not p.is_symlink()))
        sources["licences"] = str(text)
    out = {}
    for name, source in sources.items():
        blocks = packed_blocks(source, tokenizer, seq_len=length, text_field="text", max_tokens=windows * length, cache_dir=None)
        out[name] = blocks[:windows].tolist()
    return out


def perplexity(variant, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logits = variant.logits(ids)[:-1].astype(np.float64)  # (length - 1, vocab): predicts ids[1:]
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        nll += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return float(np.exp(nll / count))


# ---- static facts: bytes read per token, size on disk ---------------------------------------------------

def onnx_weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes of initializers read whole per decoded token, model files on disk). Embedding tables (read one row
    by a Gather), rotary caches and act-order permutations are left out; KV-cache reads are not weights."""
    import onnx

    model = onnx.load(str(path / "model.onnx"))
    sizes = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    read = set()
    for node in model.graph.node:
        if node.op_type in ("Gather", "GatherBlockQuantized", "GroupQueryAttention"):
            continue
        read.update(i for i in node.input if i in sizes)
    disk = sum(p.stat().st_size for p in path.glob("model.onnx*"))
    return sum(sizes[n] for n in read), disk


def torch_weight_bytes(model) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}  # a tied head is one tensor
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    read = sum(p.numel() * p.element_size() for p in params.values() if p is not embed or tied)
    return read, sum(p.numel() * p.element_size() for p in params.values())


def peak_rss_mb(kind: str, path: str, args) -> float | None:
    """Peak RSS of a fresh process that loads the variant, prefills 512 tokens and decodes 16."""
    cmd = [sys.executable, __file__, "--child", kind, path, "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"peak RSS probe failed for {kind} {path}: {done.stderr[-500:]}", file=sys.stderr)
        return None


def child(args) -> None:
    kind, path = args.child
    variant = make_variant(kind, "probe", path, args)
    ids = list(range(1000, 1512))
    variant.prefill(ids)
    variant.decode(ids[:32], 16)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent (this big benchmark).
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) / 1024)


# ---- the run ----------------------------------------------------------------------------------------------

def prompt_ids(tokenizer_source: str, length: int) -> list[int]:
    """Real text (the embedded Python-docs eval split), so the attention and the logits see ordinary tokens."""
    import gzip

    from compress import models
    from compress.corpus import builtin_path

    tokenizer = models.load_tokenizer(tokenizer_source)
    ids: list[int] = []
    with gzip.open(builtin_path("pydocs/eval"), "rt") as fh:
        for line in fh:
            ids += tokenizer(json.loads(line)["text"])["input_ids"]
            if len(ids) >= length:
                return ids[:length]
    raise RuntimeError(f"the eval split has fewer than {length} tokens")


def ensure_exports(label: str, float_dir: str, gptq_dir: Path | None, work: Path, threads: int, only, dynamic_dir: Path | None = None) -> dict[str, Path]:
    from compress_exporters.onnx import export_onnx

    wanted = {name: (float_dir, kwargs) for name, kwargs in ONNX_FORMATS.items()}
    if gptq_dir is not None:
        wanted.update({name: (str(gptq_dir), kwargs) for name, kwargs in GPTQ_FORMATS.items()})
    if dynamic_dir is not None:
        wanted.update({name: (str(dynamic_dir), kwargs) for name, kwargs in DYNAMIC_FORMATS.items()})
    out = {}
    for name, (source, kwargs) in wanted.items():
        if only and name not in only:
            continue
        folder = work / f"{label}-{name}"
        if not (folder / "compress.json").is_file():
            print(f"exporting {source} -> {folder} ({kwargs})", flush=True)
            export_onnx(source, folder, overwrite=True, threads=threads, **kwargs)
        out[name] = folder
    return out


def variants_for(label: str, float_dir: str, gptq_dir, genai_dir, args, dynamic_dir=None) -> list[tuple[str, str, object]]:
    """(name, kind, path) in run order."""
    found = [("torch-fp32", "torch", float_dir)]
    exports = ensure_exports(label, float_dir, gptq_dir, args.work, args.threads, args.only, dynamic_dir)
    found += [(name, "onnx", path) for name, path in exports.items()]
    try:
        import onnxruntime_genai  # noqa: F401

        genai_runtime = True
    except ImportError:
        genai_runtime = False
        print("onnxruntime_genai is not importable: the folders run through our loop only", file=sys.stderr)
    if genai_dir is not None:
        found.append(("builder-int4", "builder", genai_dir))
        if genai_runtime:
            found.append(("builder-int4-genai-runtime", "genai-runtime", genai_dir))
    for name in OURS:  # our folders as apps built on onnxruntime-genai run them
        if genai_runtime and name in exports:
            found.append((f"{name}-genai-runtime", "genai-runtime", exports[name]))
    return [v for v in found if not args.only or v[0] in args.only]


def summarize(values: list[float], *, rate: bool = False) -> dict:
    """Median and p90 of the latency: for a rate (tok/s) the slow end is the low one, so p90 is its 10th percentile."""
    ordered = sorted(values, reverse=rate)
    return {"median": round(statistics.median(ordered), 4), "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4), "all": [round(v, 4) for v in values]}


def bench_model(label: str, float_dir: str, gptq_dir, genai_dir, args, bandwidth: float, dynamic_dir=None) -> dict:
    specs = variants_for(label, float_dir, gptq_dir, genai_dir, args, dynamic_dir)
    prompts = {n: prompt_ids(float_dir, n) for n in sorted(set(args.prefill) | {args.decode_prompt})}
    rows = {name: {"kind": kind, "path": str(path), "prefill_s": {str(n): [] for n in args.prefill}, "decode_tok_s": [], "load_average": []} for name, kind, path in specs}
    # Creation order matters: of identical ONNX Runtime sessions in one process, the later-created ran faster
    # (benchmarks/results/export_latency-idle.json vs -idle-reversed.json). --reverse-load flips it for a check.
    loaded = [(name, kind, path, make_variant(kind, name, path, args)) for name, kind, path in (specs[::-1] if args.reverse_load else specs)]
    for _, _, _, variant in loaded:  # warm-up: allocations, kernel choices, page faults
        variant.prefill(prompts[args.prefill[0]])
        variant.decode(prompts[args.decode_prompt], 8)
    for round_ in range(args.repeats):
        order = loaded if round_ % 2 == 0 else loaded[::-1]
        for name, _, _, variant in order:
            row = rows[name]
            for n in args.prefill:
                row["prefill_s"][str(n)].append(variant.prefill(prompts[n]))
            row["decode_tok_s"].append(variant.decode(prompts[args.decode_prompt], args.new_tokens))
            row["load_average"].append(load_average())
            prefill = ", ".join(f"{n}: {row['prefill_s'][str(n)][-1]:.3f} s" for n in args.prefill)
            print(f"[{label}] round {round_ + 1}/{args.repeats} {name}: decode {row['decode_tok_s'][-1]:.1f} tok/s, prefill {prefill} (load {row['load_average'][-1]})", flush=True)
    for name, kind, path, variant in loaded:
        row = rows[name]
        read, disk = torch_weight_bytes(variant.model) if kind == "torch" else onnx_weight_bytes(Path(path))
        decode = summarize(row["decode_tok_s"], rate=True)
        row.update(
            prefill_s={n: summarize(v) for n, v in row["prefill_s"].items()},
            decode_tok_s=decode,
            weight_bytes_per_token=read,
            size_on_disk_bytes=disk,
            bandwidth_fraction=round(read * decode["median"] / bandwidth, 3),
        )
    if args.quality_windows:
        windows = quality_windows(float_dir, args.work, args.quality_windows, args.quality_length)
        for name, kind, _, variant in loaded:
            if kind != "genai-runtime":  # the same graph as the folder's row in our loop
                rows[name]["perplexity"] = {domain: round(perplexity(variant, w), 3) for domain, w in windows.items()}
                print(f"[{label}] {name}: perplexity {rows[name]['perplexity']}", flush=True)
    del loaded
    for name, kind, path in specs:
        rows[name]["peak_rss_mb"] = peak_rss_mb(kind, str(path), args)
    return rows


def render(report: dict) -> str:
    lines = [
        "# Export latency: prefill and decode, batch 1",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['threads']} threads of {report['machine']['cores']} cores; "
        f"copy bandwidth {report['bandwidth_gb_s']} GB/s (numpy, read + write); ONNX Runtime spin-waiting {'on' if report['settings']['spin'] else 'off'}; "
        f"sessions created {'bottom row first' if report['settings'].get('reverse_load') else 'top row first'} (later-created sessions ran up to 8% faster here). "
        f"Load average at start {report['load_average_start']}, end {report['load_average_end']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["machine"]["versions"].items()) + ".",
        "",
        f"Command: `{report['command']}` (at commit {report.get('git')})",
        "",
        f"Decode: {report['settings']['new_tokens']} new tokens after a {report['settings']['decode_prompt']}-token prompt, greedy; "
        f"median and p90 (the slowest tenth: tok/s at its 10th percentile, seconds at their 90th) over {report['settings']['repeats']} rounds, variants alternating. "
        "Bandwidth share: weight bytes read per token x tok/s / copy bandwidth. Perplexity: "
        f"{report['settings'].get('quality_windows')} windows of {report['settings'].get('quality_length')} tokens per domain, every position's logits of one prefill "
        "(pydocs: held-out Python docs, the GPTQ calibration domain; licences: Debian licence texts), change vs torch fp32 in brackets.",
    ]
    for label, rows in report["models"].items():
        prefill_cols = list(next(iter(rows.values()))["prefill_s"])
        domains = list(next((r["perplexity"] for r in rows.values() if "perplexity" in r), {}))
        float_ppl = rows.get("torch-fp32", {}).get("perplexity", {})
        lines += ["", f"## {label}", "", "| variant | decode tok/s (median / p90) | " + " | ".join(f"prefill {n} tok s (median)" for n in prefill_cols)
                  + " | weights read / token (MB) | bandwidth share | size on disk (MB) | peak RSS (MB) | load avg | " + " | ".join(f"ppl {d}" for d in domains) + " |",
                  "|---|---|" + "---|" * len(prefill_cols) + "---|---|---|---|---|" + "---|" * len(domains)]
        for name, row in rows.items():
            d = row["decode_tok_s"]
            loads = row["load_average"]
            lines.append(
                f"| {name} | {d['median']:.1f} / {d['p90']:.1f} | " + " | ".join(f"{row['prefill_s'][n]['median']:.3f}" for n in prefill_cols)
                + f" | {row['weight_bytes_per_token'] / 1e6:.1f} | {row['bandwidth_fraction']:.2f} | {row['size_on_disk_bytes'] / 1e6:.1f} | "
                + f"{row['peak_rss_mb'] if row['peak_rss_mb'] is None else round(row['peak_rss_mb'])} | {min(loads):.1f}-{max(loads):.1f} | "
                + " | ".join(_ppl_cell(row.get("perplexity", {}).get(d), float_ppl.get(d)) for d in domains) + " |"
            )
        lines += _versus_builder(rows)
    return "\n".join(lines) + "\n"


def _versus_builder(rows: dict) -> list[str]:
    """Our GPTQ folders against the builder's, in the same runtime: decode speed ratio (medians) and perplexity."""
    out = []
    for runtime, suffix in (("our loop", ""), ("onnxruntime-genai's runtime", "-genai-runtime")):
        builder = rows.get(f"builder-int4{suffix}")
        if builder is None:
            continue
        for name in OURS:
            ours = rows.get(f"{name}{suffix}")
            if ours is None:
                continue
            ppl = ", ".join(f"{d} {rows[name]['perplexity'][d]:.2f} vs {rows['builder-int4']['perplexity'][d]:.2f}" for d in rows.get(name, {}).get("perplexity", {}) if d in rows["builder-int4"].get("perplexity", {}))
            out.append(f"- {runtime}: {name} decodes at {ours['decode_tok_s']['median'] / builder['decode_tok_s']['median']:.2f}x the builder's int4"
                       + (f"; perplexity {ppl}" if ppl else ""))
    return ["", *out] if out else []


def _git_state() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' (uncommitted changes)' if dirty else ''}" or None


def _ppl_cell(value, reference) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ({100 * (value / reference - 1):+.1f}%)" if reference else "")


def report_header(args, settings: tuple[str, ...]) -> dict:
    """What every results JSON starts with: the command, the commit, the machine, the load, the settings."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": _git_state(),
        "machine": machine(args.threads),
        "load_average_start": list(os.getloadavg()),
        "settings": {k: v for k, v in vars(args).items() if k in settings},
    }


def write_report(report: dict, out: Path, render) -> None:
    """results JSON at `out`.json, the markdown generated from it at `out`.md, the markdown printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(render(report))
    print(render(report))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    report = report_header(args, ("threads", "repeats", "new_tokens", "decode_prompt", "prefill", "spin", "reverse_load", "quality_windows", "quality_length"))
    bandwidth = copy_bandwidth()
    report["bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    report["models"] = {"teacher": bench_model("teacher", args.teacher, args.gptq, args.genai, args, bandwidth, args.gptq_dynamic)}
    if args.student:
        report["models"]["student"] = bench_model("student", str(args.student), args.student_gptq, args.student_genai, args, bandwidth, args.student_gptq_dynamic)
    report["load_average_end"] = list(os.getloadavg())
    write_report(report, args.out, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
