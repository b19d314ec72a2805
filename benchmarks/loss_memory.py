"""Benchmark 1: peak memory and time of one training step of the distillation loss, fused/chunked vs naive.

One step = forward + backward from the student's final hidden states and lm_head weight, the teacher
side given as hidden states + its lm_head (as in training). Naive = full [B*T, V] logits of both
models, `F.kl_div` on full log-softmax. Each measurement runs in a fresh process so peak RSS is its own.

    python benchmarks/loss_memory.py                 # CPU, vocab 49152, seq 512, batch 8, hidden 576
    python benchmarks/loss_memory.py --device cuda   # when a GPU is present

Writes benchmarks/results/loss_memory-<device>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _inputs(args, torch):
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.seq
    dev = args.device
    h = (torch.randn(n, args.hidden, generator=g) * 1.0).to(dev).requires_grad_(True)
    w = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).to(dev).requires_grad_(True)
    th = torch.randn(n, args.hidden, generator=g).to(dev)
    tw = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).to(dev)
    labels = torch.randint(0, args.vocab, (n,), generator=g).to(dev)
    return h, w, th, tw, labels


def _step(variant: str, args, tensors, torch):
    import torch.nn.functional as F

    from compress.distill.losses import fused_distill_loss

    h, w, th, tw, labels = tensors
    h.grad = w.grad = None
    if variant == "naive":
        s_logits = h @ w.T  # (N, V)
        with torch.no_grad():
            t_logits = th @ tw.T  # (N, V)
        loss = F.kl_div(F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1), log_target=True, reduction="batchmean")
    else:
        loss = fused_distill_loss(h, w, None, th, tw, None, labels, chunk_size=args.chunk).loss
    loss.backward()
    return float(loss)


def worker(args) -> dict:
    """Runs inside a fresh process: one variant, warm-up, then timed repeats."""
    import torch

    torch.set_num_threads(args.threads)
    tensors = _inputs(args, torch)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = _rss_mb()
    loss = _step(args.variant, args, tensors, torch)  # warm-up, also the peak-memory measurement
    sync()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if args.device == "cuda" else _peak_rss_mb() - base_rss
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        _step(args.variant, args, tensors, torch)
        sync()
        times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "loss": loss, "peak_mb": round(peak, 1), "median_s": round(statistics.median(times), 4), "times_s": [round(t, 4) for t in times]}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return

    rows = []
    for variant in ("naive", "fused"):
        cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={getattr(args, k)}" for k in ("device", "vocab", "seq", "batch", "hidden", "chunk", "repeats", "threads")]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    naive, fused = rows
    result = {
        "benchmark": "loss_memory",
        "command": "python benchmarks/loss_memory.py " + " ".join(sys.argv[1:]),
        "settings": {k: getattr(args, k) for k in ("device", "vocab", "seq", "batch", "hidden", "chunk", "repeats", "threads")},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
        "memory_ratio": round(naive["peak_mb"] / fused["peak_mb"], 2),
        "speed_ratio": round(naive["median_s"] / fused["median_s"], 2),
        "same_loss": abs(naive["loss"] - fused["loss"]) <= 1e-3 * abs(naive["loss"]),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import torch

        result["machine"]["torch"] = torch.__version__
        if args.device == "cuda":
            result["machine"]["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"loss_memory-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["settings"]
    md = [
        f"# Distillation loss: one training step, {args.device}",
        "",
        f"vocab {s['vocab']}, seq {s['seq']}, batch {s['batch']}, hidden {s['hidden']}, chunk {s['chunk']}, {s['threads']} threads; "
        f"peak = {'CUDA max allocated' if args.device == 'cuda' else 'peak RSS above the inputs'}; time = median of {s['repeats']} after a warm-up.",
        "",
        "| variant | peak memory (MB) | time (s) | loss |",
        "|---|---|---|---|",
    ]
    md += [f"| {r['variant']} | {r['peak_mb']:.0f} | {r['median_s']:.3f} | {r['loss']:.5f} |" for r in rows]
    md += ["", f"Fused uses **{result['memory_ratio']}x less** peak memory and is **{result['speed_ratio']}x** the speed of naive (>1 = faster).", "", f"Command: `{result['command']}`", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
