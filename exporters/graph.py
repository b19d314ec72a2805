"""The fused decoder graph for Llama-like families (llama, mistral, qwen2, qwen3), Gemma-2/3 and Phi-3, written
directly from the weights instead of traced through torch.onnx: the ops ONNX Runtime has fast CPU kernels for, the same ones
onnxruntime-genai's model builder emits.

Per layer: `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization` (RMSNorm, with the residual add
fused in), one projection for q/k/v and one for gate/up (one MatMulNBits each when quantized),
`GroupQueryAttention` (com.microsoft) with the rotary embedding inside (`do_rotary`, cos/sin caches taken from
the model's own rotary module, so any rope scaling it implements is carried) and the KV cache in BNSH.

    proto, fused = build_fused_decoder(model, projector=FloatProjector())

Inputs and outputs are the folder's usual ones (`decoder.py`): input_ids, attention_mask, position_ids,
past_key_values.{i}.key/value -> logits, present.{i}.key/value. Two things differ from the traced graph:

- Positions come from the cache: GroupQueryAttention rotates query `s` at `past_length + s`, where every
  column of the attention mask counts (`position_ids` is accepted but not read). Rotary attention depends only
  on the distance between positions, and a left-padded row is shifted by the same padding for all its keys
  and queries, so its valid positions get exactly the scores the torch model gives them.
- Padding: left padding (transformers, optimum) is masked by an additive attention bias on a row's leading
  zeros, with the row declared full (`seqlens_k = T - 1`); right padding (onnxruntime-genai) through GQA's own
  per-row `seqlens_k` (the real length - 1), see `_mask_inputs`. Padded query rows produce finite,
  meaningless logits (torch's are meaningless too).

Past and present may be one buffer (GroupQueryAttention writes the new keys in place when past_key and
present_key are the same tensor): `runtime.OnnxCausalLM` binds them so, with a past of the maximum length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FUSED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
# Gemma's blocks: (1 + w) RMSNorms, a norm on each sublayer's output before the residual add ("sandwich"),
# the embedding scaled by sqrt(hidden), GELU-tanh MLPs; Gemma-2 soft-caps attention scores and final logits.
GEMMA_FAMILIES = ("gemma2", "gemma3_text")
MS_DOMAIN = "com.microsoft"
WINDOW_OFFSET = 1
OPSET = 23  # RMSNormalization (the first norm, which has no residual to fuse) is standard ONNX from opset 23
# An int64 scalar initializer (not a graph input: ONNX Runtime warns at every load about an initializer that is
# also an input): logits for the last N positions (0, as written = every position, what ONNX Runtime, optimum and
# onnxruntime-genai callers get). compress_exporters.runtime loads the graph with 1 there, since generation reads
# only the last position's logits (a prefill then skips the LM head for every other position).
KEEP_INPUT = "num_logits_to_keep"
KEEP_METADATA_KEY = "compress.logits_to_keep_initializer"
# the runtime binds past and present to one buffer; it may set KEEP_INPUT to 1
KV_CACHE_METADATA = {"compress.kv_cache": "gqa-shareable", KEEP_METADATA_KEY: KEEP_INPUT}


class Projector(Protocol):
    """Emits y = x @ concat(W_i.T) (+ bias) for linear layers that read the same input."""

    def project(self, graph: "GraphWriter", x: str, names: list[str], modules: list, out: str) -> str: ...


class GraphWriter:
    """Collects nodes and initializers; names are unique per call site."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[tuple, str] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # ascontiguousarray makes scalars 1-d
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", array)
        return self._consts[key]

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, *, name: str, domain: str = "", **attrs) -> list[str]:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


class FloatProjector:
    """fp32 MatMul over the concatenated weights (ONNX Runtime's MatMulNBits quantizer can quantize them later:
    quantizing a fused weight per column block is quantizing each part)."""

    def project(self, graph: GraphWriter, x: str, names: list[str], modules: list, out: str) -> str:
        W = np.concatenate([m.weight.detach().float().numpy().T for m in modules], axis=1)  # (K, N)
        y = graph.node("MatMul", [x, graph.init(f"{fused_name(names)}.weight", W)], out if not has_bias(modules) else out + "_nobias", name=f"{fused_name(names)}/MatMul")[0]
        return add_bias(graph, y, names, modules, out)


def fused_name(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    parent = names[0].rpartition(".")[0]
    suffix = "_".join(n.rpartition(".")[2].removesuffix("_proj") for n in names)
    return f"{parent}.{suffix}_proj"


def has_bias(modules) -> bool:
    return any(getattr(m, "bias", None) is not None for m in modules)


def add_bias(graph: GraphWriter, y: str, names: list[str], modules: list, out: str) -> str:
    if not has_bias(modules):
        return y
    b = np.concatenate([(m.bias.detach().float().numpy() if m.bias is not None else np.zeros(m.out_features, np.float32)) for m in modules])
    return graph.node("Add", [y, graph.init(f"{fused_name(names)}.bias", b)], out, name=f"{fused_name(names)}/BiasAdd")[0]


@dataclass(frozen=True)
class DecoderSpec:
    model_type: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    scale: float
    windows: tuple[int, ...]  # GroupQueryAttention local_window_size per layer (-1 = full attention)
    qk_norm: bool
    layer_types: tuple[str, ...]  # per layer; Gemma-3's two kinds have their own rotary base (cos/sin cache)
    gemma: bool = False  # (1 + w) norms, sandwich norms, scaled embedding, GELU-tanh
    embed_scale: float | None = None
    attn_softcap: float = 0.0  # GroupQueryAttention softcap (0 = none)
    final_softcap: float | None = None
    activation: str = "silu"  # of the gated MLP: "silu" or "gelu_tanh"


def decoder_spec(model) -> DecoderSpec:
    config = model.config
    layers = model.model.layers
    attn = layers[0].self_attn
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    # Without per-layer types a configured window applies to every layer (Mistral); Qwen2 clears its window
    # when use_sliding_window is off.
    types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * len(layers)
    # local_window_size = the config's window: the same keys as torch's sliding mask (checked on a window of 4).
    windows = tuple(window if (window and kind == "sliding_attention") else -1 for kind in types)
    gemma = config.model_type in GEMMA_FAMILIES
    return DecoderSpec(
        model_type=config.model_type,
        num_layers=len(layers),
        hidden=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        eps=float(config.rms_norm_eps),
        scale=float(getattr(attn, "scaling", head_dim**-0.5)),
        windows=windows,
        qk_norm=hasattr(attn, "q_norm"),
        layer_types=tuple(types),
        gemma=gemma,
        embed_scale=float(model.model.embed_tokens.embed_scale) if gemma else None,
        attn_softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
        final_softcap=float(config.final_logit_softcapping) if getattr(config, "final_logit_softcapping", None) else None,
        activation=_activation(config),
    )


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _activation(config) -> str:
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "silu"
    if name not in _ACTIVATIONS:
        raise ValueError(f"{config.model_type}: MLP activation {name!r} is not written by the fused graph (silu, gelu_pytorch_tanh); export with exporter='dynamo'")
    return _ACTIVATIONS[name]


def rotary_caches(model, length: int, head_dim: int, layer_type: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(length, rotary_dim / 2) cos and sin from the model's own rotary module (rope scaling included); for
    models with a rotary base per layer type (Gemma-3: local and global), the one of `layer_type`."""
    import torch

    rotary = model.model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        per_type = len(getattr(rotary, "layer_types", ())) > 0
        cos, sin = rotary(x, torch.arange(length)[None], layer_type) if per_type else rotary(x, torch.arange(length)[None])
    if cos.shape[-1] != head_dim:
        raise ValueError(f"rotary dimension {cos.shape[-1]} != head size {head_dim}: partial rotary is not written by the fused graph; export with exporter='dynamo'")
    half = cos.shape[-1] // 2
    # HF's rotate_half layout: cos = cat(freqs, freqs).cos(); GroupQueryAttention takes the first half.
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def build_fused_decoder(model, *, projector: Projector, context_length: int | None = None) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """(fp32 fused decoder graph, {fused projection: the torch layers it holds})."""
    from compress_exporters.decoder import input_names, output_names

    spec = decoder_spec(model)
    g = GraphWriter()
    fused: dict[str, list[str]] = {}
    length = int(context_length or getattr(model.config, "max_position_embeddings", 0) or 4096)
    caches: dict[str, tuple[str, str]] = {}  # layer type -> (cos, sin) cache names; one pair unless the bases differ
    written: list[tuple[np.ndarray, np.ndarray, tuple[str, str]]] = []
    for kind in dict.fromkeys(spec.layer_types):
        cos, sin = rotary_caches(model, length, spec.head_dim, kind)
        same = next((names for c, s_, names in written if np.array_equal(c, cos) and np.array_equal(s_, sin)), None)
        if same is None:
            suffix = "" if not written else f"_{kind}"
            same = (g.init(f"cos_cache{suffix}", cos), g.init(f"sin_cache{suffix}", sin))
            written.append((cos, sin, same))
        caches[kind] = same
    seqlens, total, bias = _mask_inputs(g)

    embed = model.model.embed_tokens.weight.detach().float().numpy()
    x = g.node("Gather", [g.init("model.embed_tokens.weight", embed), "input_ids"], "embeddings", name="embed_tokens/Gather")[0]
    if spec.embed_scale is not None:  # Gemma: embeddings * sqrt(hidden), the scale in the weights' dtype
        x = g.node("Mul", [x, g.init("model.embed_tokens.embed_scale", np.asarray(spec.embed_scale, np.float32))], "embeddings_scaled", name="embed_tokens/Scale")[0]
    residual, pending = x, None  # `pending` is the last block's output, added to the residual by the next norm
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        normed, residual = _norm(g, f"{prefix}.input_layernorm", layer.input_layernorm, residual, pending, spec)
        attn = layer.self_attn
        if hasattr(attn, "qkv_proj"):  # Phi-3: q/k/v are already one Linear
            qkv_names, qkv_modules = [f"{prefix}.self_attn.qkv_proj"], [attn.qkv_proj]
        else:
            qkv_names, qkv_modules = [f"{prefix}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")], [attn.q_proj, attn.k_proj, attn.v_proj]
        qkv = projector.project(g, normed, qkv_names, qkv_modules, f"{prefix}.self_attn.qkv")
        fused[fused_name(qkv_names)] = qkv_names
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        gqa_inputs = [qkv, "", "", *past, seqlens, total, *caches[spec.layer_types[i]], "", bias]
        attrs = dict(num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1, rotary_interleaved=0, scale=spec.scale, local_window_size=spec.windows[i])
        if spec.attn_softcap:
            attrs["softcap"] = spec.attn_softcap
        if spec.qk_norm:
            gqa_inputs[:3] = _qk_norm(g, f"{prefix}.self_attn", qkv, attn, spec)
        context = g.node("GroupQueryAttention", gqa_inputs, [f"{prefix}.self_attn.context", f"present.{i}.key", f"present.{i}.value"], name=f"{prefix}.self_attn/GroupQueryAttention", domain=MS_DOMAIN, **attrs)[0]
        o_name = f"{prefix}.self_attn.o_proj"
        pending = projector.project(g, context, [o_name], [attn.o_proj], f"{o_name}.out")
        if spec.gemma:  # the attention output is normed before the residual add; the MLP reads pre_feedforward_layernorm
            pending = _plain_norm(g, f"{prefix}.post_attention_layernorm", layer.post_attention_layernorm, pending, spec)
            normed, residual = _norm(g, f"{prefix}.pre_feedforward_layernorm", layer.pre_feedforward_layernorm, residual, pending, spec)
        else:
            normed, residual = _norm(g, f"{prefix}.post_attention_layernorm", layer.post_attention_layernorm, residual, pending, spec)
        mlp = layer.mlp
        down = f"{prefix}.mlp.down_proj"
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate and up are one Linear, gate's rows first
            gu_names, gu_modules, width, order = [f"{prefix}.mlp.gate_up_proj"], [mlp.gate_up_proj], mlp.gate_up_proj.out_features // 2, None
        else:
            gu_names, gu_modules, width = [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], [mlp.gate_proj, mlp.up_proj], mlp.gate_proj.out_features
            # An act-order down_proj reads its input in group order: gate/up can write their outputs in that order
            # (SwiGLU is elementwise), which saves a Gather per layer.
            order = projector.mlp_input_order(gu_names, down) if hasattr(projector, "mlp_input_order") else None
        gate_up = projector.project(g, normed, gu_names, gu_modules, f"{prefix}.mlp.gate_up", **({"out_perm": order} if order is not None else {}))
        fused[fused_name(gu_names)] = gu_names
        act = _gated(g, f"{prefix}.mlp", gate_up, width, spec.activation)
        pending = projector.project(g, act, [down], [mlp.down_proj], f"{down}.out", **({"input_ordered": True} if order is not None else {}))
        if spec.gemma:
            pending = _plain_norm(g, f"{prefix}.post_feedforward_layernorm", layer.post_feedforward_layernorm, pending, spec)
    normed, _ = _norm(g, "model.norm", model.model.norm, residual, pending, spec)
    normed = _keep_last(g, normed)
    head = model.lm_head.weight.detach().float().numpy().T  # (hidden, vocab); a tied head gets its own copy
    logits = "logits" if spec.final_softcap is None else "logits_uncapped"
    g.node("MatMul", [normed, g.init("lm_head.weight", np.ascontiguousarray(head))], logits, name="lm_head/MatMul")
    if spec.final_softcap is not None:  # Gemma-2: cap * tanh(logits / cap)
        cap = g.init("final_logit_softcapping", np.asarray(spec.final_softcap, np.float32))
        scaled = g.node("Div", [logits, cap], "logits_scaled", name="logits/SoftcapDiv")[0]
        bent = g.node("Tanh", [scaled], "logits_tanh", name="logits/SoftcapTanh")[0]
        g.node("Mul", [bent, cap], "logits", name="logits/SoftcapMul")
    return _model(g, spec, input_names(spec.num_layers), output_names(spec.num_layers)), fused


def _weight(module) -> np.ndarray:
    return module.weight.detach().float().numpy()


def _gamma(module, spec: DecoderSpec) -> np.ndarray:
    """The RMSNorm's scale as the kernels apply it: Gemma's norms multiply by (1 + w), stored as w."""
    w = _weight(module)
    return (1.0 + w).astype(np.float32) if spec.gemma else w


def _plain_norm(g: GraphWriter, name: str, module, x: str, spec: DecoderSpec) -> str:
    """RMSNorm of x alone (Gemma's norms of a sublayer's output, before its residual add)."""
    return g.node("RMSNormalization", [x, g.init(f"{name}.weight", _gamma(module, spec))], f"{name}.out", name=f"{name}/RMSNormalization", axis=-1, epsilon=spec.eps, stash_type=1)[0]


def _norm(g: GraphWriter, name: str, module, residual: str, pending: str | None, spec: DecoderSpec) -> tuple[str, str]:
    """RMSNorm of residual (+ pending): (normalized, new residual)."""
    eps = spec.eps
    gamma = g.init(f"{name}.weight", _gamma(module, spec))
    if pending is None:
        # ONNX Runtime's SimplifiedLayerNormalization is not a schema onnx.checker knows; RMSNormalization is.
        out = g.node("RMSNormalization", [residual, gamma], f"{name}.out", name=f"{name}/RMSNormalization", axis=-1, epsilon=eps, stash_type=1)[0]
        return out, residual
    outs = g.node("SkipSimplifiedLayerNormalization", [pending, residual, gamma], [f"{name}.out", "", "", f"{name}.residual"], name=f"{name}/SkipSimplifiedLayerNormalization", domain=MS_DOMAIN, epsilon=eps)
    return outs[0], outs[3]


def _qk_norm(g: GraphWriter, prefix: str, qkv: str, attn, spec: DecoderSpec) -> list[str]:
    """Qwen3's per-head RMSNorm of q and k, before the rotary embedding. GroupQueryAttention has inputs for it
    (q_norm_weight / k_norm_weight) but its CPU kernel refuses them, so it runs here: split, norm each head."""
    q_width, kv_width = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    q, k, v = g.node("Split", [qkv, g.const([q_width, kv_width, kv_width])], [f"{prefix}.q", f"{prefix}.k", f"{prefix}.v"], name=f"{prefix}/SplitQKV", axis=-1)
    normed = []
    for name, x, module in (("q_norm", q, attn.q_norm), ("k_norm", k, attn.k_norm)):
        heads = g.node("Reshape", [x, g.const([0, 0, -1, spec.head_dim])], f"{prefix}.{name}.heads", name=f"{prefix}/{name}/Reshape")[0]
        eps = float(getattr(module, "variance_epsilon", None) or module.eps)
        y = g.node("RMSNormalization", [heads, g.init(f"{prefix}.{name}.weight", _gamma(module, spec))], f"{prefix}.{name}.out", name=f"{prefix}/{name}/RMSNormalization", axis=-1, epsilon=eps, stash_type=1)[0]
        normed.append(g.node("Reshape", [y, g.const([0, 0, -1])], f"{prefix}.{name}.flat", name=f"{prefix}/{name}/Flatten")[0])
    return [normed[0], normed[1], v]


def _gated(g: GraphWriter, prefix: str, gate_up: str, width: int, activation: str) -> str:
    """act(gate) * up: SiLU (Llama-like) or GELU with the tanh approximation (Gemma's gelu_pytorch_tanh)."""
    gate, up = g.node("Split", [gate_up, g.const([width, width])], [f"{prefix}.gate", f"{prefix}.up"], name=f"{prefix}/Split", axis=-1)
    if activation == "gelu_tanh":
        act = g.node("Gelu", [gate], f"{prefix}.gate_gelu", name=f"{prefix}/Gelu", approximate="tanh")[0]
    else:
        sig = g.node("Sigmoid", [gate], f"{prefix}.gate_sigmoid", name=f"{prefix}/Sigmoid")[0]
        act = g.node("Mul", [gate, sig], f"{prefix}.gate_silu", name=f"{prefix}/SiLU")[0]
    return g.node("Mul", [act, up], f"{prefix}.act", name=f"{prefix}/Mul")[0]


def _mask_inputs(g: GraphWriter) -> tuple[str, str, str]:
    """seqlens_k (batch,) int32, total_sequence_length int32 (1,) = T, and the additive attention bias
    (batch, 1, sequence, T): finfo.min on a row's leading zeros (left padding), 0 elsewhere.

    seqlens_k = sum(mask) + (index of the first 1) - 1 serves both padding conventions. A left-padded row
    (transformers, optimum: zeros only in front) gets T - 1, every column a slot, the pads hidden by the bias.
    A right-padded row (onnxruntime-genai: zeros at the end of the prompt, then each step's 1 appended after
    them) gets its real length - 1, which is how GroupQueryAttention is meant to be fed: it attends to the
    first seqlens_k + 1 slots, writes the step's keys at slot seqlens_k (over the first pad) and rotates the
    query at that position, so the pads neither count nor shift positions."""
    # Fewer nodes is faster decode here: a run of a small model is a few hundred kernel calls, each a few
    # microseconds of dispatch. Shapes are read with Shape's start/end (opset 15) instead of Shape + Gather/Slice.
    total_1d = g.node("Shape", ["attention_mask"], "total_length_1d", name="mask/total", start=1, end=2)[0]
    total = g.node("Cast", [total_1d], "total_sequence_length", name="mask/total_i32", to=TensorProto.INT32)[0]  # (1,): GQA takes one element
    maskf = g.node("Cast", ["attention_mask"], "mask_float", name="mask/float", to=TensorProto.FLOAT)[0]
    count = g.node("ReduceSum", ["attention_mask", g.const([1])], "mask_count", name="mask/count", keepdims=0)[0]
    first = g.node("ArgMax", [maskf], "mask_first_one", name="mask/first_one", axis=1, keepdims=0)[0]
    end = g.node("Add", [count, first], "mask_end", name="mask/end")[0]
    last = g.node("Sub", [end, g.const(1)], "seqlens_k_i64", name="mask/seqlens_k_i64")[0]
    seqlens = g.node("Cast", [last], "seqlens_k", name="mask/seqlens_k", to=TensorProto.INT32)[0]
    seen = g.node("CumSum", [maskf, g.const(1)], "mask_seen", name="mask/seen")[0]  # 0 before a row's first 1
    leading = g.node("Less", [seen, g.const(0.5, np.float32)], "mask_leading_zero", name="mask/leading_zero")[0]
    bias2d = g.node("Where", [leading, g.const(np.finfo(np.float32).min, np.float32), g.const(0.0, np.float32)], "mask_bias_2d", name="mask/bias")[0]
    bias4d = g.node("Unsqueeze", [bias2d, g.const([1, 2])], "mask_bias_4d", name="mask/bias_4d")[0]  # (batch, 1, 1, T)
    seq = g.node("Shape", ["input_ids"], "seq_1d", name="ids/seq", start=1, end=2)[0]
    target = g.node("Concat", [g.const([1, 1]), seq, g.const([1])], "bias_broadcast", name="mask/bias_shape", axis=0)[0]
    bias = g.node("Expand", [bias4d, target], "attention_bias", name="mask/attention_bias")[0]  # (batch, 1, S, T)
    return seqlens, total, bias


def _keep_last(g: GraphWriter, hidden: str) -> str:
    """The last `num_logits_to_keep` positions of `hidden` (0, the default, keeps all). A prefill only needs the
    last position's logits: skipping the others saves the LM head's largest product (positions x vocab).
    Slice from -keep: -0 = 0 is every position, a keep beyond the sequence clamps to all of it. The count is a
    constant initializer, so ONNX Runtime folds the Neg at load and a run pays for the Slice alone."""
    g.init(KEEP_INPUT, np.asarray(0, np.int64))  # 0 = every position; the runtime loads the graph with 1
    keep = g.node("Unsqueeze", [KEEP_INPUT, g.const([0])], "keep_1d", name="logits/keep_1d")[0]
    start = g.node("Neg", [keep], "logits_start", name="logits/start")[0]
    return g.node("Slice", [hidden, start, g.const([np.iinfo(np.int64).max]), g.const([1])], "hidden_kept", name="logits/Slice")[0]


def _model(g: GraphWriter, spec: DecoderSpec, names_in: list[str], names_out: list[str]) -> onnx.ModelProto:
    kv = lambda name, length: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", spec.num_kv_heads, length, spec.head_dim])  # noqa: E731
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence_length"]),
    ] + [kv(name, "past_sequence_length") for name in names_in[3:]]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "logits_length", spec.vocab])]
    outputs += [kv(name, "present_sequence_length") for name in names_out[1:]]
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)], producer_name="compress")
    helper.set_model_props(model, KV_CACHE_METADATA)
    return model
