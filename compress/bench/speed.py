"""Latency and memory of one artifact: prefill time per prompt length, greedy decode tokens/s per batch size,
peak memory. Each artifact is measured in a fresh process (`measure_in_subprocess`), so its peak RSS is its
own and no allocator, cache or thread pool warmed by another model flatters it.

Warm-up runs are excluded; every timed run is kept in the result next to its median and p90. On CUDA each
timing ends with a device synchronisation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from compress.errors import CompressError


class SpeedMeasurementError(CompressError, RuntimeError):
    pass


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _rss_mb(field: str) -> float | None:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure_speed(subject, prompts: dict, spec: dict, on_done: Callable[[str], None] = lambda _: None) -> dict:
    """`prompts`: {"prefill": {length: [ids]}, "decode": [[ids] x max batch]}; `spec`: the BenchSpec as a dict.
    `on_done(summary)` after each measurement (progress)."""
    result: dict = {"prefill": {}, "decode": {}}
    for length, ids in prompts["prefill"].items():
        x = torch.tensor([ids], dtype=torch.long)
        for _ in range(spec["warmup"]):
            subject.time_prefill(x)
        runs = [subject.time_prefill(x) for _ in range(spec["repeats"])]
        result["prefill"][str(length)] = {"median_s": statistics.median(runs), "p90_s": percentile(runs, 90), "runs_s": runs}
        on_done(f"prefill {length} tokens: {1000 * statistics.median(runs):.0f} ms")
    warm_tokens = min(spec["new_tokens"], 16)  # warm-up decodes a few steps: kernels and allocator, not the timing
    for batch in spec["batch_sizes"]:
        x = torch.tensor(prompts["decode"][:batch], dtype=torch.long)
        for _ in range(spec["warmup"]):
            subject.time_decode(x, warm_tokens)
        runs = [subject.time_decode(x, spec["new_tokens"]) for _ in range(spec["repeats"])]
        rates = [batch * len(steps) / sum(steps) for steps in runs]
        all_steps = [s for steps in runs for s in steps]
        result["decode"][str(batch)] = {
            "tokens_per_s_median": statistics.median(rates),
            "tokens_per_s_runs": rates,
            "step_ms_median": 1000 * statistics.median(all_steps),
            "step_ms_p90": 1000 * percentile(all_steps, 90),
            "new_tokens": spec["new_tokens"],
            "prompt_tokens": x.shape[1],
        }
        on_done(f"decode batch {batch}: {statistics.median(rates):.1f} tokens/s")
    return result


def _worker(request: dict) -> dict:
    """Runs in the child process: load, measure, report memory."""
    from compress.bench.subjects import ArtifactInfo, open_subject

    threads = request["spec"].get("threads")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(request["device"])
    info = ArtifactInfo(**{**request["info"], "path": Path(request["info"]["path"]) if request["info"]["path"] else None})
    base_rss = _rss_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    subject = open_subject(info, device=device, threads=threads)
    load_s = time.perf_counter() - start
    print(f"loaded in {load_s:.1f} s", flush=True)
    result = measure_speed(subject, request["prompts"], request["spec"], on_done=lambda line: print(line, flush=True))
    result.update(load_s=load_s, base_rss_mb=base_rss, peak_rss_mb=_rss_mb("VmHWM"), threads=threads or torch.get_num_threads(), runs_on=getattr(subject, "provider", device.type))
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def measure_in_subprocess(info, prompts: dict, spec: dict, device: str, on_line: Callable[[str], None] = lambda _: None) -> dict:
    """`measure_speed` for one artifact in a fresh Python process; its errors come back as SpeedMeasurementError.
    The child's progress lines (stdout) go to `on_line` as they come."""
    info_dict = {**asdict(info), "path": str(info.path) if info.path else None, "record": None}
    request = {"info": info_dict, "prompts": prompts, "spec": spec, "device": device}
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        err = Path(tmp) / "stderr.txt"
        with err.open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "compress.bench.speed", str(req), str(out)], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
            for line in proc.stdout:
                on_line(line.rstrip())
            proc.wait()
        if proc.returncode != 0 or not out.is_file():
            lines = err.read_text().strip().splitlines()
            if proc.returncode == CHILD_ERROR and lines and lines[-1].startswith(CHILD_PREFIX):  # the child's own one-line error
                raise SpeedMeasurementError(f"speed measurement of {info.label} ({info.name}) failed: {lines[-1][len(CHILD_PREFIX):]}")
            tail = "\n".join(lines[-15:])
            raise SpeedMeasurementError(f"speed measurement of {info.label} ({info.name}) failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


CHILD_ERROR, CHILD_PREFIX = 3, "compress bench speed: error: "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="internal: measure one artifact's speed (used by compress bench)")
    parser.add_argument("request")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    try:
        result = _worker(json.loads(Path(args.request).read_text()))
    except CompressError as err:  # an input error: its message, on one line, is what the parent reports
        print(CHILD_PREFIX + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return CHILD_ERROR
    Path(args.output).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
