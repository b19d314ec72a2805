"""README.md of an exported ONNX folder: what a user of another app needs to run it, read from the graph itself
(input and output names, element types and dimensions), with an onnxruntime-only example that
tests/test_export.py runs as written."""
from __future__ import annotations

from pathlib import Path

_ELEM = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool"}


def _io_rows(values) -> list[str]:
    rows = []
    for v in values:
        t = v.type.tensor_type
        dims = ", ".join(d.dim_param or str(d.dim_value) for d in t.shape.dim) if t.HasField("shape") else "scalar"
        rows.append(f"| `{v.name}` | {_ELEM.get(t.elem_type, str(t.elem_type))} | ({dims}) |")
    return rows


def _collapse(rows: list[str], num_layers: int) -> list[str]:
    """One row for layer 0 of the per-layer KV inputs/outputs, named with `{i}`."""
    out = []
    for row in rows:
        name = row.split("`")[1]
        if ".0." in name:
            out.append(row.replace(".0.", ".{i}.", 1).rstrip(" |") + f" | one per layer, i = 0..{num_layers - 1} |")
        elif any(f".{i}." in name for i in range(1, num_layers)):
            continue
        else:
            out.append(row + " |")
    return out


def folder_readme(model_path: Path, *, config: dict, kv: dict, settings: dict, share_buffer: bool, keep_input: str | None) -> str:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    optional = [i for i in graph.input if i.name in initializers]
    layers, kv_heads, head_dim = kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]
    kv_type = next((_ELEM.get(i.type.tensor_type.elem_type, "float32") for i in inputs if i.name.startswith("past_key_values.")), "float32")
    name = config.get("_name_or_path") or config.get("name_or_path") or config.get("model_type", "model")
    lines = [
        f"# ONNX export of `{name}`",
        "",
        f"Written by `compress export` (weights `{settings.get('weights')}`, exporter `{settings.get('exporter')}`); `compress.json` records",
        "the settings, the source artifact and its sha256, and the validation against torch.",
        f"{config.get('model_type')}: {layers} layers, {config.get('num_attention_heads')} attention heads, {kv_heads} KV heads of {head_dim}, "
        f"vocabulary {config.get('vocab_size')}.",
        "",
        "## Inputs",
        "",
        "| name | type | shape | |",
        "|---|---|---|---|",
        *_collapse(_io_rows(inputs), layers),
        *[r.rstrip(" |") + " | optional (an initializer the caller may override) |" for r in _io_rows(optional)],
        "",
        "## Outputs",
        "",
        "| name | type | shape | |",
        "|---|---|---|---|",
        *_collapse(_io_rows(graph.output), layers),
        "",
        "## Conventions",
        "",
        "- One graph serves prefill (past length 0) and decode (one new token per row). `attention_mask` covers past and",
        "  new tokens: (batch, past + sequence), 1 for real tokens, 0 for padding. Batches are left-padded (as transformers",
        "  and optimum pad), or right-padded with each step's 1 appended after the pads (as onnxruntime-genai does).",
        f"- KV cache: BNSH, (batch, {kv_heads} KV heads, past length, {head_dim}), {kv_type}. `present.{{i}}` is the past plus this step:",
        "  feed it back as the next step's `past_key_values.{i}`.",
    ]
    if share_buffer:
        lines += [
            "- Shared buffer (optional, faster): bind one max-length buffer per layer as both `past_key_values.{i}.*` and",
            "  `present.{i}.*` (IO binding) and the graph writes the new keys in place. `genai_config.json` says",
            "  `past_present_share_buffer: true`, so onnxruntime-genai does this itself.",
        ]
    if settings.get("accuracy_level"):
        lines += [f"- Quantized layers run at MatMulNBits accuracy_level {settings['accuracy_level']} (int8 activations, ONNX Runtime's fast CPU kernels):",
                  "  a prompt's logits can move slightly with the batch it runs in (a few % of greedy tokens on real models).",
                  "  `compress export --accuracy-level 0` gives the same answer at any batch size, for about 1.3x slower decode."]
    if keep_input:
        lines += [f"- `logits` covers every input position. The graph holds an int64 initializer `{keep_input}` (0 here, not an",
                  "  input); a copy of the graph with 1 there computes the last position's logits only, all a prefill for",
                  "  generation needs (`compress_exporters.runtime` loads it that way)."]
    lines += [
        "",
        "## Run it with onnxruntime alone",
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        "from tokenizers import Tokenizer",
        "tok, sess = Tokenizer.from_file(\"tokenizer.json\"), ort.InferenceSession(\"model.onnx\", providers=[\"CPUExecutionProvider\"])",
        f"ids = np.array([tok.encode(\"def fibonacci(n):\").ids], np.int64); text = ids[0].tolist()",
        f"past = {{f\"past_key_values.{{i}}.{{k}}\": np.zeros((1, {kv_heads}, 0, {head_dim}), np.{kv_type}) for i in range({layers}) for k in (\"key\", \"value\")}}",
        "for _ in range(16):",
        "    n = past[\"past_key_values.0.key\"].shape[2]",
        "    feeds = {\"input_ids\": ids, \"attention_mask\": np.ones((1, n + ids.shape[1]), np.int64), \"position_ids\": np.arange(n, n + ids.shape[1])[None], **past}",
        "    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))",
        "    past = {k.replace(\"present\", \"past_key_values\"): v for k, v in out.items() if k.startswith(\"present\")}",
        "    ids = out[\"logits\"][:, -1:].argmax(-1).astype(np.int64); text.append(int(ids[0, 0]))",
        "print(tok.decode(text))",
        "```",
        "",
        "## Other runtimes",
        "",
        "- onnxruntime-genai: `og.Model(\"this folder\")` reads `genai_config.json`; `og.Tokenizer(model)`, `og.Generator(model, params)`.",
        "- optimum-onnx (transformers 4.57): `ORTModelForCausalLM.from_pretrained(\"this folder\")` is the way it loads a",
        "  folder like this one; compress does not test it yet. `config.json` carries the keys transformers 4.x reads.",
        "- compress's own torch-free runtime: `compress_exporters.runtime.OnnxCausalLM.from_dir(\"this folder\").generate(...)`.",
        "",
    ]
    return "\n".join(lines)
