"""Fuzz the CLI with bad recipes, damaged artifacts and kill -9 at random points; record how each case ended.

Every case runs the real `compress` command in a subprocess and is classified:
- `clean error`: non-zero exit, no Python traceback (the promise: a named error before compute);
- `accepted`: exit 0 (a mutation that leaves a valid input, e.g. a changed learning rate, or bytes flipped
  inside weight data that still parse);
- `traceback`: a Python traceback reached the user (a defect);
- `hang`: no answer within the time limit (a defect).
Kill cases SIGKILL a stage after a random delay, rerun the same command (`--resume` where the command has it)
and check that the rerun succeeds and that no staging folder (`.*.tmp-*`) of the dead process is left.

    python benchmarks/fuzz.py [--seed 0] [--recipe-cases 40] [--artifact-cases 24] [--kill-cases 6]

Writes benchmarks/results/fuzz.json (every case: what was done, exit code, class, the message's last line) and
fuzz.md, generated from it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
COMPRESS = [sys.executable, "-m", "compress.cli"]
WRONG_VALUES = ["abc", -1, 0, 1.0e30, [], {}, None, True, "1e-3x", -0.5, [1, "x"], "builtin:nope/none"]


def run(cmd: list[str], *, timeout: float, cwd: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        return {"rc": None, "class": "hang", "message": f"no answer in {timeout:.0f} s", "s": round(time.perf_counter() - t0, 1)}
    out = proc.stdout + proc.stderr
    tb = "Traceback (most recent call last)" in out
    cls = "traceback" if tb else ("accepted" if proc.returncode == 0 else "clean error")
    lines = [line for line in out.strip().splitlines() if line.strip() and "it/s]" not in line and "WARNING: Location" not in line]
    return {"rc": proc.returncode, "class": cls, "message": (lines[-1] if lines else "")[:300], "s": round(time.perf_counter() - t0, 1)}


# -- recipes ---------------------------------------------------------------------------------------------------

def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _delete(tree, path):
    for k in path[:-1]:
        tree = tree[k]
    del tree[path[-1]]


def recipe_cases(rng: random.Random, n: int, base_text: str) -> list[tuple[str, str]]:
    base = yaml.safe_load(base_text)
    leaves = [p for p in _leaves(base) if p]
    kinds = ["truncate", "garbage", "wrong value", "delete key", "unknown key", "tab indent", "empty"]
    cases = []
    for i in range(n):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        tree = json.loads(json.dumps(base))
        if kind == "truncate":
            cut = rng.randrange(1, len(base_text))
            cases.append((f"truncate at byte {cut}", base_text[:cut]))
        elif kind == "garbage":
            at = rng.randrange(len(base_text))
            junk = "".join(rng.choice("{}[]:,-&*!|>'\"%@`\t\x00") for _ in range(rng.randint(1, 6)))
            cases.append((f"insert {junk!r} at byte {at}", base_text[:at] + junk + base_text[at:]))
        elif kind == "wrong value":
            path, value = rng.choice(leaves), rng.choice(WRONG_VALUES)
            _set(tree, path, value)
            cases.append((f"{'.'.join(path)} = {value!r}", yaml.safe_dump(tree)))
        elif kind == "delete key":
            path = rng.choice(leaves)
            _delete(tree, path)
            cases.append((f"delete {'.'.join(path)}", yaml.safe_dump(tree)))
        elif kind == "unknown key":
            path = rng.choice(leaves)
            parent = tree
            for k in path[:-1]:
                parent = parent[k]
            parent[path[-1] + "_typo"] = 1
            cases.append((f"unknown key {'.'.join(path)}_typo", yaml.safe_dump(tree)))
        elif kind == "tab indent":
            cases.append(("tab instead of spaces", base_text.replace("  ", "\t", 1)))
        else:
            cases.append(("empty file", ""))
    return cases


def fuzz_recipes(rng, n, work) -> list[dict]:
    base_text = (ROOT / "recipes" / "quickstart.yaml").read_text()
    rows = []
    for i, (what, text) in enumerate(recipe_cases(rng, n, base_text)):
        path = work / f"recipe-{i}.yaml"
        path.write_text(text)
        r = run([*COMPRESS, "run", str(path), "--dry-run"], timeout=120, cwd=work)
        rows.append({"group": "recipe", "case": what, "command": "compress run RECIPE --dry-run", **r})
        print(f"recipe {i:3d} {r['class']:12s} {what[:60]!r}: {r['message'][:100]}", flush=True)
    return rows


# -- artifacts -------------------------------------------------------------------------------------------------

def tiny_model(folder: Path) -> Path:
    """A 2-layer Llama with the embedded teacher's tokenizer (built from a config: no download)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress import models

    import torch

    torch.manual_seed(0)
    teacher = models.local_path("builtin:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    model = LlamaForCausalLM(config)
    from compress.artifacts import ArtifactRecord, write_artifact

    record = ArtifactRecord(stage="fuzz", recipe={}, inputs=[], metrics={}, device={})
    write_artifact(folder, record, lambda d: models.save_model(model, tokenizer, d))
    return folder


def damage(rng: random.Random, folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "compress.json")
    target = rng.choice(files)
    kind = rng.choice(["truncate", "flip bytes", "delete", "empty"] + (["config value"] if target.name == "config.json" else []))
    rel = target.relative_to(folder)
    data = target.read_bytes()
    if kind == "truncate" and len(data) > 1:
        cut = rng.randrange(1, len(data))
        target.write_bytes(data[:cut])
        return f"{rel}: truncated to {cut} of {len(data)} bytes"
    if kind == "flip bytes" and data:
        buf = bytearray(data)
        for _ in range(8):
            buf[rng.randrange(len(buf))] ^= 0xFF
        target.write_bytes(bytes(buf))
        return f"{rel}: 8 bytes flipped"
    if kind == "delete":
        target.unlink()
        return f"{rel}: deleted"
    if kind == "config value":
        config = json.loads(data)
        key = rng.choice(["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size", "model_type", "torch_dtype"])
        value = rng.choice(WRONG_VALUES + [17, 3])
        config[key] = value
        target.write_text(json.dumps(config))
        return f"{rel}: {key} = {value!r}"
    target.write_bytes(b"")
    return f"{rel}: emptied"


def fuzz_artifacts(rng, n, work) -> list[dict]:
    clean = {"float": tiny_model(work / "clean-float")}
    r = run([*COMPRESS, "quantize", str(clean["float"]), "--method", "rtn", "--bits", "4", "--group-size", "32", "--output", str(work / "clean-rtn"), "--no-progress"], timeout=600, cwd=work)
    assert r["rc"] == 0, r
    clean["gptq"] = work / "clean-rtn"
    r = run([*COMPRESS, "export", str(clean["float"]), "--output", str(work / "clean-onnx"), "--weights", "int4"], timeout=600, cwd=work)
    assert r["rc"] == 0, r
    clean["onnx"] = work / "clean-onnx"
    consumers = {
        "float": [("quantize", lambda src, out: ["quantize", src, "--method", "rtn", "--bits", "4", "--group-size", "32", "--output", out, "--no-progress"]),
                  ("export", lambda src, out: ["export", src, "--output", out, "--weights", "fp32"]),
                  ("bench", lambda src, out: ["bench", src, "--output", out, "--no-progress", "--set", "bench.max_eval_tokens=256", "--set", "bench.speed=false"])],
        "gptq": [("export", lambda src, out: ["export", src, "--output", out, "--weights", "int4"]),
                 ("bench", lambda src, out: ["bench", src, "--output", out, "--no-progress", "--set", "bench.max_eval_tokens=256", "--set", "bench.speed=false"])],
        "onnx": [("bench", lambda src, out: ["bench", src, "--output", out, "--no-progress", "--set", "bench.max_eval_tokens=256", "--set", "bench.speed=false"])],
    }
    rows = []
    for i in range(n):
        kind = list(clean)[i % len(clean)]
        src = work / f"art-{i}"
        shutil.copytree(clean[kind], src)
        what = damage(rng, src)
        command, build = rng.choice(consumers[kind])
        out = work / f"out-{i}"
        r = run([*COMPRESS, *build(str(src), str(out))], timeout=600, cwd=work)
        left = out.exists() and not any(out.iterdir()) if out.exists() else False
        rows.append({"group": "artifact", "case": f"{kind}: {what}", "command": f"compress {command}", "empty_output_left": left, **r})
        print(f"artifact {i:3d} {r['class']:12s} {kind} {what!r} -> {command}: {r['message'][:100]}", flush=True)
    return rows


# -- kill -9 ---------------------------------------------------------------------------------------------------

def fuzz_kills(rng, n, work) -> list[dict]:
    src = work / "clean-float" if (work / "clean-float").exists() else tiny_model(work / "clean-float")
    recipe = work / "distill.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": "{out}", "teacher": {"model": str(src)}, "student": {"from_teacher": {"layers": 1}},
        "data": {"train": "builtin:pydocs/train", "eval": "builtin:pydocs/eval", "seq_len": 64, "max_train_tokens": 64 * 48, "max_eval_tokens": 512},
        "distill": {"steps": 24, "batch_size": 2, "grad_accum": 1, "warmup_steps": 2, "eval_every": 12, "save_every": 4, "keep_last": 2},
    }))
    stages = {
        "quantize": (["quantize", str(src), "--method", "gptq", "--bits", "4", "--group-size", "32", "--samples", "8", "--output", "{out}", "--no-progress"], [], 20.0),
        "export": (["export", str(src), "--output", "{out}", "--weights", "int4"], [], 20.0),
        "distill": (["distill", "{recipe}", "--no-progress"], ["--resume"], 30.0),
    }
    rows = []
    for i in range(n):
        stage = list(stages)[i % len(stages)]
        args, resume, horizon = stages[stage]
        out = work / f"kill-{i}"
        stage_recipe = work / f"distill-{i}.yaml"
        stage_recipe.write_text(recipe.read_text().replace("'{out}'", str(out)).replace("{out}", str(out)))
        cmd = [*COMPRESS, *[a.replace("{out}", str(out)).replace("{recipe}", str(stage_recipe)) for a in args]]
        artifact, staging = (out / "student", out / "checkpoints") if stage == "distill" else (out, out.parent)
        delay = round(rng.uniform(1.0, horizon), 1)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        pattern = ".*.tmp-*" if stage == "distill" else f".{out.name}.*"
        stale_before = sorted(p.name for p in staging.glob(pattern))
        rerun = cmd + (resume if resume and out.exists() else (["--overwrite"] if out.exists() and not resume else []))
        r = run(rerun, timeout=900, cwd=work)
        stale_after = sorted(p.name for p in staging.glob(pattern))
        ok = r["rc"] == 0 and (artifact / "compress.json").is_file() and not stale_after
        rows.append({"group": "kill", "case": f"{stage}: SIGKILL after {delay} s" + ("" if killed else " (had finished)"), "command": f"compress {stage} (rerun)",
                     "staging_left_by_kill": stale_before, "staging_after_rerun": stale_after, **r, "class": "recovered" if ok else ("traceback" if r["class"] == "traceback" else "not recovered")})
        print(f"kill {i:3d} {rows[-1]['class']:12s} {rows[-1]['case']}: left {stale_before}, after rerun {stale_after}", flush=True)
    return rows


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = ["# CLI fuzz: bad recipes, damaged artifacts, kill -9 (generated by benchmarks/fuzz.py from fuzz.json; do not edit)", "",
             f"Commit {m['commit']}, {m['cpu']}, seed {data['settings']['seed']}. Command: `{data['settings']['command']}`", "", "| group | cases | " +
             " | ".join(data["classes"]) + " |", "|---|---|" + "---|" * len(data["classes"])]
    for group, counts in data["summary"].items():
        lines.append(f"| {group} | {sum(counts.values())} | " + " | ".join(str(counts.get(c, 0)) for c in data["classes"]) + " |")
    bad = [r for r in data["cases"] if r["class"] in ("traceback", "hang", "not recovered")]
    lines += ["", f"## Defects ({len(bad)})", ""]
    if bad:
        lines += ["| group | case | command | class | last line |", "|---|---|---|---|---|"]
        lines += [f"| {r['group']} | {r['case']} | `{r['command']}` | {r['class']} | {r['message'].replace('|', '/')} |" for r in bad]
    else:
        lines.append("None: every case ended in a clean error, was accepted, or recovered.")
    lines += ["", "## Every case", "", "| group | case | class | exit | last line |", "|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['case'].replace('|', '/')} | {r['class']} | {r['rc']} | {r['message'].replace('|', '/')[:160]} |" for r in data["cases"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe-cases", type=int, default=40)
    parser.add_argument("--artifact-cases", type=int, default=24)
    parser.add_argument("--kill-cases", type=int, default=9)
    parser.add_argument("--results", default=str(RESULTS / "fuzz.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="compress-fuzz-"))
    try:
        cases = fuzz_recipes(rng, args.recipe_cases, work) + fuzz_artifacts(rng, args.artifact_cases, work) + fuzz_kills(rng, args.kill_cases, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    classes = ["clean error", "accepted", "recovered", "traceback", "hang", "not recovered"]
    summary = {}
    for r in cases:
        summary.setdefault(r["group"], {}).setdefault(r["class"], 0)
        summary[r["group"]][r["class"]] += 1
    try:  # benchmarks/ is sys.path[0] when this runs as a script
        from benchmarks.frontier import machine
    except ImportError:
        from frontier import machine
    data = {"machine": machine(), "settings": {**vars(args), "command": "python benchmarks/fuzz.py " + " ".join(sys.argv[1:])}, "classes": classes, "summary": summary, "cases": cases}
    from compress.artifacts import write_json_atomic

    results = Path(args.results)
    write_json_atomic(results, data)
    results.with_suffix(".md").write_text(markdown(data))
    print(markdown(data).split("## Every case")[0])


if __name__ == "__main__":
    main()
