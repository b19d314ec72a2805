"""A/B runs of the GPTQ driver on one model: time per phase and perplexity on two domains.

Lighter than quantize_quality.py (no checkpoint written or reloaded: the model quantized in place
holds exactly the dequantized weights the checkpoint would), for comparing code paths and knobs:

    python benchmarks/gptq_ab.py --label base
    python benchmarks/gptq_ab.py --label bf16 --kw forward_dtype='"bfloat16"'

Each run appends one JSON line (settings, phase times, load averages, ppl) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--label", required=True)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="which calibration blocks are drawn (recipe seed)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--kw", nargs="*", default=[], help="extra quantize_blocks keyword arguments, KEY=JSON")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/gptq_ab.jsonl")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    from benchmarks.quantize_quality import LICENSES, calibration, far_domain_file
    from benchmarks.frontier import machine
    from compress import models
    from compress.data import packed_blocks
    from compress.evaluate import perplexity_on_blocks
    from compress.quantize import calibrate
    from compress.quantize.grid import QuantGrid

    kwargs = dict(act_order=True, damp=0.01, group_size=128)
    kwargs.update({k: json.loads(v) for k, v in (a.split("=", 1) for a in args.kw)})
    model = models.load_model(args.model)
    calib, calib_info, tokenizer = calibration(args.model, args.samples, args.calib_len, args.seed)
    calib_hash = calib_info["sha256"]

    # Phase timers, wrapped around the driver's imports (the pure core stays untouched).
    times = {"hessian": 0.0, "gptq": 0.0}
    core = "gptq_shared" if hasattr(calibrate, "gptq_shared") else "gptq"
    real_acc, real_gptq = calibrate.accumulate_hessian, getattr(calibrate, core)

    def timed(key, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                times[key] += time.perf_counter() - t0

        return wrapper

    calibrate.accumulate_hessian = timed("hessian", real_acc)
    setattr(calibrate, core, timed("gptq", real_gptq))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    group_size = kwargs.pop("group_size")
    calibrate.quantize_blocks(model, calib, QuantGrid(bits=kwargs.pop("bits", 4), sym=True), method="gptq", group_size=group_size, skip=("lm_head",), **kwargs)
    total = time.perf_counter() - t0
    load_after = os.getloadavg()
    provenance = machine()
    calibrate.accumulate_hessian = real_acc
    setattr(calibrate, core, real_gptq)
    row = {
        "label": args.label, "model": args.model, "seed": args.seed, "kwargs": {**kwargs, "group_size": group_size}, "calib_sha256": calib_hash,
        "quantize_s": round(total, 1), "hessian_s": round(times["hessian"], 1), "gptq_s": round(times["gptq"], 1),
        "forwards_s": round(total - times["hessian"] - times["gptq"], 1),
        "loadavg_before": load_before, "loadavg_after": load_after, "threads": torch.get_num_threads(),
        "commit": provenance["commit"], "machine": f"{provenance['cpu']} ({provenance['cpu_count']} cores)",
    }
    print(json.dumps(row), flush=True)
    if not args.no_eval:
        work = Path("/tmp/gptq_ab")
        work.mkdir(exist_ok=True)
        domains = {"in": "builtin:pydocs/eval"}
        if LICENSES.is_dir():
            domains["far"] = str(far_domain_file(work))
        ppl = {}
        for name, source in domains.items():
            blocks = packed_blocks(source, tokenizer, seq_len=512, text_field="text", max_tokens=args.eval_tokens, cache_dir=None)
            ppl[name] = round(perplexity_on_blocks(model, blocks)["ppl"], 3)
        row["ppl"] = ppl
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    from benchmarks.gptq_ab_report import main as report

    report()  # the markdown tables, regenerated from the JSONL


if __name__ == "__main__":
    main()
