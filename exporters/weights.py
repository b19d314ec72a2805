"""Weight formats of an exported fp32 ONNX decoder: fp16, int8 (dynamic, per channel), int4 MatMulNBits
quantized by ONNX Runtime from float weights, or carried over exactly from a GPTQ checkpoint.

Every function takes and returns an in-memory `onnx.ModelProto` (int8 goes through a file because
`quantize_dynamic` writes one) and leaves saving to the caller.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress_exporters.matmulnbits import NBitsWeight, dequantize

MS_DOMAIN = "com.microsoft"


def _quiet_ort_logs():
    # The quantizers log one INFO line per node through the root logger.
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def find_lm_head(model: onnx.ModelProto, logits: str = "logits") -> onnx.NodeProto | None:
    """The MatMul/Gemm that produces the logits (through Add/Cast/Reshape-like nodes), or None."""
    producers = _producers(model.graph)
    frontier, seen = [logits], set()
    while frontier:
        name = frontier.pop()
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits"):
            return node
        if node.op_type in ("Add", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose"):
            frontier.extend(i for i in node.input if i)
    return None


def untie_lm_head(model: onnx.ModelProto) -> bool:
    """A tied head multiplies by Transpose(embedding): give it its own (K, N) initializer so the quantizers,
    which only take constant weights, can quantize it. Returns whether anything changed."""
    head = find_lm_head(model)
    if head is None or head.op_type != "MatMul":
        return False
    producers = _producers(model.graph)
    inits = {init.name: init for init in model.graph.initializer}
    transpose = producers.get(head.input[1])
    if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
        return False
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    W = numpy_helper.to_array(inits[transpose.input[0]])
    if W.ndim != 2 or perm not in (None, [1, 0]):
        return False
    name = f"{transpose.input[0]}.T"
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(W.T), name))
    head.input[1] = name
    remove_unused(model)
    return True


def remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads and initializers no node reads (top-level graph only)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = needed | {i.name for i in graph.input}
    inits = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def strip_metadata(model: onnx.ModelProto) -> None:
    """The dynamo exporter stores a Python stack trace per node: several times the weights of a small model."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model.graph.doc_string = ""


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights, activations, KV cache and logits; token ids and masks stay int64."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Shape inference cannot take protos over 2 GB; the converter does not need it for these graphs.
    return convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)


def quantize_int8(model: onnx.ModelProto, work: Path, *, exclude: list[str]) -> onnx.ModelProto:
    """Dynamic int8: MatMul weights int8 per output channel, activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet_ort_logs()
    out = work / "int8.onnx"
    quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=True)
    return onnx.load(str(out))


def quantize_nbits(model: onnx.ModelProto, *, bits: int, block_size: int, accuracy_level: int | None, exclude=(), include=None) -> onnx.ModelProto:
    """ONNX Runtime's MatMulNBits quantizer (symmetric round-to-nearest per block) on constant MatMul weights."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet_ort_logs()
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, nodes_to_exclude=list(exclude), nodes_to_include=include)
    quantizer.process()
    return quantizer.model.model


def nbits_rtn(W: np.ndarray, *, bits: int, block_size: int) -> NBitsWeight:
    """A (K, N) float weight as ONNX Runtime's MatMulNBits quantizer stores it (symmetric round-to-nearest per
    block, what `quantize_nbits` writes into a graph), read back as an `NBitsWeight`: the export's own
    rounding, for measuring it outside a graph."""
    K, N = W.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="head")], "rtn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, K])], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, N])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(W, np.float32), "w")],
    )
    model = quantize_nbits(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), bits=bits, block_size=block_size, accuracy_level=None)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    return NBitsWeight(B=inits[node.input[1]].reshape(N, -1, block_size * bits // 8), scales=inits[node.input[2]].reshape(N, -1).astype(np.float32), zero_points=None if zp is None else zp.reshape(N, -1), perm=None, K=K, N=N, bits=bits, block_size=block_size)


def find_embedding(model: onnx.ModelProto, ids: str = "input_ids") -> onnx.NodeProto | None:
    """The Gather that looks the token ids up in a constant 2-D float table (the ids directly, or reshaped on the
    way, as GPT-2's `input_ids.view(-1, T)`), or None."""
    inits = {init.name: init for init in model.graph.initializer}
    producers = _producers(model.graph)

    def reads_ids(name: str) -> bool:
        while name != ids:
            node = producers.get(name)
            if node is None or node.op_type not in ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast"):
                return False
            name = node.input[0]
        return True

    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and len(node.input) == 2 else None
        if table is not None and len(table.dims) == 2 and table.data_type == onnx.TensorProto.FLOAT and reads_ids(node.input[1]):
            return node
    return None


def quantize_embedding(model: onnx.ModelProto, head: onnx.NodeProto | None, *, bits: int = 8, block_size: int) -> dict:
    """The token embedding in `bits` (8 or 4) bits: a `GatherBlockQuantized` (com.microsoft) that reads either
    the quantized LM head's own codes and scales, when the head is the same matrix quantized at these bits (a
    tied head: stored once), or symmetric codes of its own in blocks of `block_size` along the hidden size
    (ONNX Runtime's MatMulNBits rounding). Returns what was done.

    The lookup reads the codes as MatMulNBits stores them, (vocab, blocks, block_size * bits / 8), quantized
    along the last axis (4-bit codes two to a byte, low nibble first), so nothing is reshaped or copied at load:
    the rows come out (batch, sequence, blocks, block_size), and are flattened and cut to the hidden size."""
    if bits not in (4, 8):
        raise ValueError(f"embedding bits must be 4 or 8, got {bits}")
    graph = model.graph
    gather = find_embedding(model)
    if gather is None:
        raise ValueError("no Gather of input_ids from a float embedding table was found in the graph")
    inits = {init.name: init for init in graph.initializer}
    table = numpy_helper.to_array(inits[gather.input[0]])  # (vocab, hidden)
    vocab, hidden = table.shape
    name = "model.embed_tokens"
    new_inits: list[onnx.TensorProto] = []
    shared = _shareable_head(head, inits, table, bits)
    if shared is not None:
        codes, scales2d, zero_points2d, size = shared
    else:
        size = block_size
        if bits == 8:
            B, scale = quantize_rows_int8(table, size)
            B = B.reshape(vocab, -1, size)
        else:
            own = nbits_rtn(np.ascontiguousarray(table.T), bits=4, block_size=size)
            B, scale = own.B, own.scales
        codes, scales2d, zero_points2d = f"{name}.codes", f"{name}.scales", ""
        new_inits += [numpy_helper.from_array(B, codes), numpy_helper.from_array(scale, scales2d)]
    blocks = -(-hidden // size)
    new_inits += [
        numpy_helper.from_array(np.asarray([vocab, blocks, 1], np.int64), f"{name}.per_block_shape"),
        numpy_helper.from_array(np.asarray([0, 0, blocks * size], np.int64), f"{name}.rows_shape"),
    ]
    new_nodes = [helper.make_node("Reshape", [scales2d, f"{name}.per_block_shape"], [f"{name}/scales"], name=f"{name}/ReshapeScales")]
    inputs = [codes, gather.input[1], f"{name}/scales"]
    if zero_points2d:
        new_nodes.append(helper.make_node("Reshape", [zero_points2d, f"{name}.per_block_shape"], [f"{name}/zero_points"], name=f"{name}/ReshapeZeroPoints"))
        inputs.append(f"{name}/zero_points")
    new_nodes.append(helper.make_node("GatherBlockQuantized", inputs, [f"{name}/blocks"], name=f"{name}/GatherBlockQuantized", domain=MS_DOMAIN, bits=bits, block_size=size, gather_axis=0, quantize_axis=2))
    rows = gather.output[0] if blocks * size == hidden else f"{name}/padded"
    new_nodes.append(helper.make_node("Reshape", [f"{name}/blocks", f"{name}.rows_shape"], [rows], name=f"{name}/ReshapeRows"))
    if rows != gather.output[0]:
        new_inits += [numpy_helper.from_array(np.asarray([0], np.int64), f"{name}.slice_start"), numpy_helper.from_array(np.asarray([hidden], np.int64), f"{name}.slice_end"), numpy_helper.from_array(np.asarray([-1], np.int64), f"{name}.slice_axis")]
        new_nodes.append(helper.make_node("Slice", [rows, f"{name}.slice_start", f"{name}.slice_end", f"{name}.slice_axis"], [gather.output[0]], name=f"{name}/Slice"))
    nodes = list(graph.node)
    index = nodes.index(gather)
    nodes[index:index + 1] = new_nodes
    _rewrite(model, nodes, new_inits)
    return {"embedding": f"int{bits}", "embedding_block_size": size, "embedding_shared_with_lm_head": shared is not None}


def quantize_rows_int8(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit codes of a (rows, cols) table in blocks of `block_size` along cols, as
    GatherBlockQuantized reads them: uint8 (rows, padded cols) with the implicit zero point 128, fp32 scales
    (rows, blocks). Padding columns get code 128 (zero)."""
    rows, cols = table.shape
    blocks = -(-cols // block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :cols] = table
    W = padded.reshape(rows, blocks, block_size)
    scale = np.abs(W).max(axis=-1) / 127.0  # (rows, blocks)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint(W / scale[..., None]), -127, 127).astype(np.int16) + 128
    return codes.astype(np.uint8).reshape(rows, -1), scale


def _shareable_head(head: onnx.NodeProto | None, inits: dict, table: np.ndarray, bits: int = 8):
    """(B, scales, zero_points or "", block_size) of a `bits`-bit MatMulNBits LM head whose dequantized weight is
    `table` rounded (within one step everywhere), else None: the check that the head really is tied. A head
    whose input is permuted (act-order) stores its codes column-permuted and is not shared, nor a 4-bit head
    with zero points (GatherBlockQuantized would need them in another packing)."""
    if head is None or head.op_type != "MatMulNBits" or len(head.input) < 3 or len(head.input) > 4:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    vocab, hidden = table.shape
    if attrs.get("bits") != bits or attrs.get("N") != vocab or attrs.get("K") != hidden or not all(n in inits for n in head.input[1:]):
        return None
    has_zero_points = len(head.input) == 4 and bool(head.input[3])
    if bits == 4 and has_zero_points:
        return None
    size = int(attrs["block_size"])
    weight = NBitsWeight(
        B=numpy_helper.to_array(inits[head.input[1]]),
        scales=numpy_helper.to_array(inits[head.input[2]]).reshape(vocab, -1).astype(np.float32),
        zero_points=numpy_helper.to_array(inits[head.input[3]]).reshape(vocab, -1) if has_zero_points else None,
        perm=None, K=hidden, N=vocab, bits=bits, block_size=size,
    )
    if weight.B.ndim != 3:
        return None
    step = np.abs(np.repeat(weight.scales, size, axis=1)[:, :hidden])  # (vocab, hidden)
    # ONNX Runtime's symmetric quantizer spans [-2^(b-1), 2^(b-1) - 1] (its scale is negative when the block's
    # extreme is): values round within half a step, the extreme of a block lands a whole step away; GPTQ codes lie
    # within a step of the weight they replace. An unrelated matrix, or codes of permuted columns, miss by far.
    if not (np.abs(dequantize(weight).T - table) <= step * 1.01).all():
        return None
    return head.input[1], head.input[2], head.input[3] if has_zero_points else "", size


def weight_key(W: np.ndarray) -> str:
    """Identity of a (K, N) float32 weight by value: exporters rename and transpose-fold initializers."""
    W = np.ascontiguousarray(W, dtype=np.float32)
    return f"{W.shape}:{hashlib.sha256(W.tobytes()).hexdigest()}"


def replace_with_nbits(model: onnx.ModelProto, weights: dict[str, tuple[str, NBitsWeight]], *, accuracy_level: int | None) -> set[str]:
    """Swap every MatMul whose constant B equals a known weight (by `weight_key`) for a MatMulNBits fed the
    exact packed tensors; act-order layers get a Gather permuting their input (shared by q/k/v, which read the
    same input in the same order). Returns the keys of the weights that were found."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    gathers: dict[tuple[str, str], str] = {}
    replaced: set[str] = set()
    for node in graph.node:
        b, transposed = _constant_b(node)
        init = inits.get(b) if b else None
        key = None
        if init is not None and len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT:
            B = numpy_helper.to_array(init)
            key = weight_key(B.T if transposed else B)
        match = weights.get(key)
        if match is None:
            new_nodes.append(node)
            continue
        layer, w = match
        a = node.input[0]
        outputs = list(node.output)
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        if bias is not None:  # Gemm's bias C (GPT-2's Conv1D, OPT's fc1/fc2 on flattened tokens), added after
            outputs = [f"{layer}.MatMulNBits.out"]
        if w.perm is not None:
            perm_key = hashlib.sha256(w.perm.tobytes()).hexdigest()[:16]
            if (a, perm_key) not in gathers:
                perm_name = f"{layer}.MatMulNBits.perm"
                new_inits.append(numpy_helper.from_array(w.perm.astype(np.int64), perm_name))
                gathers[(a, perm_key)] = f"{layer}.MatMulNBits.input_in_group_order"
                new_nodes.append(helper.make_node("Gather", [a, perm_name], [gathers[(a, perm_key)]], name=f"{layer}/ActOrderGather", axis=-1))
            a = gathers[(a, perm_key)]
        prefix = f"{layer}.MatMulNBits"
        new_inits += [numpy_helper.from_array(w.B, f"{prefix}.B"), numpy_helper.from_array(w.scales, f"{prefix}.scales")]
        inputs = [a, f"{prefix}.B", f"{prefix}.scales"]
        if w.zero_points is not None:
            new_inits.append(numpy_helper.from_array(w.zero_points, f"{prefix}.zero_points"))
            inputs.append(f"{prefix}.zero_points")
        attrs = dict(K=w.K, N=w.N, bits=w.bits, block_size=w.block_size)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        new_nodes.append(helper.make_node("MatMulNBits", inputs, outputs, name=f"{layer}/MatMulNBits", domain=MS_DOMAIN, **attrs))
        if bias is not None:
            new_nodes.append(helper.make_node("Add", [outputs[0], bias], list(node.output), name=f"{layer}/Bias"))
        replaced.add(key)
    _rewrite(model, new_nodes, new_inits)
    return replaced


def _constant_b(node: onnx.NodeProto) -> tuple[str | None, bool]:
    """(the name of the weight input B, whether it is stored transposed) of a MatMul, or of a Gemm that is a
    plain matmul plus bias (alpha = beta = 1, A not transposed), as torch.onnx writes Linear/Conv1D on 2-D inputs."""
    if node.op_type == "MatMul" and len(node.input) == 2:
        return node.input[1], False
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0):
            return node.input[1], bool(attrs.get("transB", 0))
    return None, False


def _rewrite(model: onnx.ModelProto, nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto]) -> None:
    """Install `nodes` as the graph's nodes with `new_inits` added (com.microsoft opset declared), then drop
    what nothing reads any more."""
    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    remove_unused(model)


class NBitsProjector:
    """GPTQ layers straight into the fused graph (`compress_exporters.graph`): layers that read the same input
    (q/k/v, gate/up) become one MatMulNBits when they share bits, block size and act-order permutation (GPTQ
    sorts columns by the Hessian of the shared input, so they do), else one each and a Concat. Layers without
    GPTQ weights stay float MatMuls."""

    def __init__(self, packed: dict[str, NBitsWeight], *, accuracy_level: int | None):
        from compress_exporters.graph import FloatProjector

        self.packed = packed
        self.level = accuracy_level
        self.used: set[str] = set()
        self._float = FloatProjector()
        self._gathers: dict[tuple[str, bytes], str] = {}

    def mlp_input_order(self, gate_up: list[str], down: str) -> np.ndarray | None:
        """down_proj's act-order permutation when gate/up can emit their outputs in it (both GPTQ, fusable, no
        bias), else None."""
        weights = [self.packed.get(n) for n in gate_up]
        w_down = self.packed.get(down)
        if w_down is None or w_down.perm is None or any(w is None for w in weights) or not _fusable(weights):
            return None
        return w_down.perm

    def project(self, graph, x: str, names: list[str], modules: list, out: str, *, out_perm: np.ndarray | None = None, input_ordered: bool = False) -> str:
        """`out_perm`: write output columns in this order (each layer's own columns; MatMulNBits rows are output
        columns, so this is a row shuffle, exact). `input_ordered`: `x` already comes in group order."""
        from compress_exporters.graph import add_bias, fused_name, has_bias

        weights = [self.packed.get(n) for n in names]
        if out_perm is not None:
            if has_bias(modules):
                raise ValueError(f"{names}: output reordering is only planned for bias-free layers")
            weights = [_rows(w, out_perm) for w in weights]
        if all(w is None for w in weights):
            return self._float.project(graph, x, names, modules, out)
        if any(w is None for w in weights) or not _fusable(weights):
            parts = [self.project(graph, x, [n], [m], f"{out}.{n.rpartition('.')[2]}") for n, m in zip(names, modules)]
            return graph.node("Concat", parts, out, name=f"{fused_name(names)}/Concat", axis=-1)[0]
        self.used.update(names)
        w = weights[0]
        prefix = f"{fused_name(names)}.MatMulNBits"
        a = x if input_ordered else self._permuted(graph, x, w, prefix)
        inputs = [a, graph.init(f"{prefix}.B", np.concatenate([v.B for v in weights])), graph.init(f"{prefix}.scales", np.concatenate([v.scales for v in weights]))]
        if any(v.zero_points is not None for v in weights):
            inputs.append(graph.init(f"{prefix}.zero_points", np.concatenate([_zero_points(v) for v in weights])))
        attrs = dict(K=w.K, N=sum(v.N for v in weights), bits=w.bits, block_size=w.block_size)
        if self.level:
            attrs["accuracy_level"] = self.level
        y = graph.node("MatMulNBits", inputs, out if not has_bias(modules) else out + "_nobias", name=f"{fused_name(names)}/MatMulNBits", domain=MS_DOMAIN, **attrs)[0]
        return add_bias(graph, y, names, modules, out)

    def _permuted(self, graph, x: str, w: NBitsWeight, prefix: str) -> str:
        """Act-order: the input's columns in group order, one Gather per input and permutation."""
        if w.perm is None:
            return x
        key = (x, w.perm.tobytes())
        if key not in self._gathers:
            perm = graph.init(f"{prefix}.perm", w.perm.astype(np.int64))
            self._gathers[key] = graph.node("Gather", [x, perm], f"{prefix}.input_in_group_order", name=f"{prefix}/ActOrderGather", axis=-1)[0]
        return self._gathers[key]


def _rows(w: NBitsWeight, order: np.ndarray) -> NBitsWeight:
    """The same weight with its output columns (MatMulNBits rows) in `order`."""
    from dataclasses import replace

    return replace(w, B=w.B[order], scales=w.scales[order], zero_points=None if w.zero_points is None else w.zero_points[order])


def _fusable(weights: list[NBitsWeight]) -> bool:
    first = weights[0]
    same_perm = all((w.perm is None) == (first.perm is None) and (w.perm is None or np.array_equal(w.perm, first.perm)) for w in weights)
    return same_perm and all((w.K, w.bits, w.block_size) == (first.K, first.bits, first.block_size) for w in weights)


def _zero_points(w: NBitsWeight) -> np.ndarray:
    """Packed zero points, the implicit default (2**(bits-1)) written out when a layer has none."""
    from compress_exporters.matmulnbits import pack_along_last

    if w.zero_points is not None:
        return w.zero_points
    return pack_along_last(np.full((w.N, w.k_blocks), 1 << (w.bits - 1), np.uint8), w.bits)
