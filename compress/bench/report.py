"""results.json -> report.md (one table, ratios to the first artifact) and PNG plots (quality vs size, quality
vs decode speed, with the Pareto front of the variants)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = {"quality_vs_size.png": "size", "quality_vs_speed.png": "speed"}


def _get(entry: dict, *keys: str):
    node: Any = entry
    for key in keys:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return node


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _cell(entry: dict, section: str, key: str, spec: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
    """A metric's cell: `non-finite` where the measurement was NaN/inf (null in results.json)."""
    if f"{section}.{key}" in entry.get("non_finite", ()):
        return "non-finite"
    value = _get(entry, section, key)
    return _fmt(value if value is None else scale * value, spec, suffix)


def _ratio(value, base) -> str:
    return "" if value is None or not base else f" ({value / base:.2f}x)"


def decode_rate(entry: dict, batch: int | str) -> float | None:
    return _get(entry, "speed", "decode", str(batch), "tokens_per_s_median")


def _vocab_cell(vocab: int | None, size: int | None) -> str:
    if vocab is None or not size:
        return "–"
    return f"{vocab / 2**20:.1f} ({100 * vocab / size:.0f}%)"


def render_markdown(results: dict) -> str:
    artifacts = results["artifacts"]
    settings = results["settings"]
    machine = results["machine"]
    lengths = [str(n) for n in settings["prompt_lengths"]]
    batches = [str(b) for b in settings["batch_sizes"]]
    head = ["artifact", "kind", "params (M)", "size (MB)", "embedding + head (MB, share)", "ppl"]
    if settings.get("teacher"):
        head += ["KL/token", "top-1 agree"]
    head += [f"prefill {n} (ms)" for n in lengths] + [f"decode b{b} (tok/s)" for b in batches] + ["peak RSS (MB)"]
    base = artifacts[0]
    rows = []
    for a in artifacts:
        size = a.get("size_bytes")
        label = f"`{a['label']}`" + (" (non-finite)" if a.get("non_finite") else "")
        cells = [label, a["kind"], _fmt(a.get("parameters") and a["parameters"] / 1e6, ".1f"),
                 _fmt(size and size / 2**20, ".1f") + _ratio(size, base.get("size_bytes")),
                 _vocab_cell(a.get("vocab_bytes"), size),
                 _cell(a, "quality", "ppl") + _ratio(_get(a, "quality", "ppl"), _get(base, "quality", "ppl"))]
        if settings.get("teacher"):
            cells += [_cell(a, "quality", "kl_per_token", ".4f"), _cell(a, "quality", "top1_agreement", ".1f", 100, "%")]
        for n in lengths:
            median, p90 = _get(a, "speed", "prefill", n, "median_s"), _get(a, "speed", "prefill", n, "p90_s")
            cells.append("–" if median is None else f"{1000 * median:.0f} (p90 {1000 * p90:.0f})")
        for b in batches:
            rate = decode_rate(a, b)
            cells.append(_fmt(rate, ".1f") + _ratio(rate, decode_rate(base, b)))
        cells.append(_fmt(_get(a, "speed", "peak_rss_mb"), ".0f"))
        rows.append(cells)
    device = machine.get("gpu") or f"{machine.get('cpu')} ({machine.get('threads')} threads of {machine.get('cpu_count')} CPUs)"
    lines = [
        "# compress bench",
        "",
        f"- Machine: {device}; torch {results['versions'].get('torch', '?')}, onnxruntime {results['versions'].get('onnxruntime', '–')}; "
        f"load average at start {' '.join(f'{x:.1f}' for x in machine.get('loadavg', []))}.",
        f"- Quality: {settings['eval_tokens']:,} tokens of `{settings['eval_data']}` in {settings['eval_windows']} windows of "
        f"{settings['seq_len']}" + (f"; KL(teacher‖model) and top-1 agreement against `{settings['teacher']}`." if settings.get("teacher") else "."),
        f"- Speed: prefill of one prompt; greedy decode of {settings['new_tokens']} tokens after a {settings['decode_prompt']}-token prompt; "
        f"median over {settings['repeats']} runs after {settings['warmup']} warm-up (p90 in brackets). Ratios are to the first row.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    flagged = [a for a in artifacts if a.get("non_finite")]
    if flagged:
        lines += ["", "**Non-finite results** (NaN or inf, null in results.json; the model's outputs are not numbers): "
                  + "; ".join(f"`{a['label']}`: {', '.join(a['non_finite'])}" for a in flagged) + "."]
    plots = [name for name in PLOTS if name in results.get("plots", [])]
    if plots:
        lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]], *, larger_x_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (lower y is better; x lower unless
    `larger_x_better`), sorted by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x if larger_x_better else x2 <= x) and y2 <= y and (x2, y2) != (x, y)
            for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _label_points(ax, points: list[tuple[float, float]], labels: list[str]) -> None:
    """Names beside the points; a label that would overlap one already placed moves down a line (close
    artifacts, e.g. a student and its GPTQ copy, stay readable)."""
    ax.autoscale_view()  # data limits final before data -> display coordinates are read
    scale = 72 / ax.figure.dpi  # display pixels -> points
    placed: list[tuple[float, float]] = []
    for (x, y), label in zip(points, labels):
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        dy = 4.0
        while any(abs(px - qx) < 8 * max(len(label), 4) and abs(py + dy - qy) < 9 for qx, qy in placed):
            dy -= 10
        placed.append((px, py + dy))
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, dy), fontsize=8)


def write_plots(results: dict, folder: Path) -> list[str]:
    """The PNGs that could be drawn (an axis missing for every artifact draws nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    batch = str(results["settings"]["batch_sizes"][0])
    for name, axis in PLOTS.items():
        points, labels = [], []
        for a in results["artifacts"]:
            ppl = _get(a, "quality", "ppl")
            x = (a.get("size_bytes") or 0) / 2**20 if axis == "size" else decode_rate(a, batch)
            if ppl is not None and x:
                points.append((x, ppl))
                labels.append(a["label"])
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        ax.scatter([p[0] for p in points], [p[1] for p in points], zorder=3)
        front = pareto_front(points, larger_x_better=axis == "speed")
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey", zorder=2, label="Pareto front")
        ax.set_xlabel("size on disk (MB)" if axis == "size" else f"decode tokens/s (batch {batch})")
        ppls = [p[1] for p in points]
        if max(ppls) > 10 * min(ppls):
            ax.set_yscale("log")
        _label_points(ax, points, labels)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title("quality vs size" if axis == "size" else "quality vs decode speed")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append(name)
    return written
