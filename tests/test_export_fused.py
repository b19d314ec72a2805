"""The fused graph (compress_exporters.graph): fp32 equals torch on a left-padded batch (prefill and decode with
the cache) for every family it covers, GPTQ int4 equals the dequantized GPTQ model and its fused tensors are the
GPTQ layers exactly, and what it cannot export goes to torch.onnx (auto) or is refused (fused)."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install 'compress-llm[onnx]'")
pytest.importorskip("onnxruntime", reason="ONNX export needs onnxruntime: pip install 'compress-llm[onnx]'")

import onnx  # noqa: E402
from conftest import gptq_tiny_llama, save_tiny  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from compress_exporters import matmulnbits  # noqa: E402
from compress_exporters.graph import FUSED_FAMILIES  # noqa: E402
from compress_exporters.onnx import TOLERANCES, ExportError, export_onnx  # noqa: E402
from compress_exporters.runtime import create_session  # noqa: E402
from compress_exporters.validation import Tolerance, ValidationFailedError, compare_with_torch  # noqa: E402

# GroupQueryAttention needs head sizes that are multiples of 16: 64 wide with 4 heads (2 KV heads).
WIDE = dict(hidden_size=64, intermediate_size=128)
# Left-padded batch: lengths 11, 2, 6 and 1, longer than Mistral's window of 4 below.
PROMPTS = [[5, 17, 101, 7, 9, 250, 3, 8, 9, 10, 44], [3, 4], [7, 8, 9, 11, 12, 13], [99]]


def ops(folder):
    return json.loads((folder / "compress.json").read_text())["onnx"]["ops"]


@pytest.fixture(scope="module")
def fused_model(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("fused")
    # qwen3: per-head q/k norms; mistral: a window shorter than the prompts; Gemma: the same window on alternate
    # layers (Gemma-3's with their own rotary base), Gemma-2's soft-caps small enough to bend these logits.
    extra = {"qwen3": {"head_dim": 16}, "mistral": {"sliding_window": 4}, "gemma3_text": {"head_dim": 16, "sliding_window": 4},
             "gemma2": {"head_dim": 16, "sliding_window": 4, "final_logit_softcapping": 0.5, "attn_logit_softcapping": 0.05},
             "phi3": {"sliding_window": 4}}  # Phi-3: q/k/v and gate/up already fused in the checkpoint
    return lambda family: (root / family) if (root / family).exists() else save_tiny(root / family, family, tokenizer_dir, layers=2, **WIDE, **extra.get(family, {}))


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_fp32_matches_torch_on_a_padded_batch(tmp_path, fused_model, family):
    from transformers import AutoModelForCausalLM

    src = fused_model(family)
    result = export_onnx(src, tmp_path / "onnx")  # auto: the fused graph for this family
    assert result.record["recipe"]["export"]["exporter"] == "fused"
    found = ops(result.artifact)
    assert found["GroupQueryAttention"] == 2 and found["SkipSimplifiedLayerNormalization"] == 4 and found["MatMul"] == 2 * 4 + 1  # qkv, o, gate_up, down + head
    assert result.validation["passed"] and result.validation["max_rel_diff"] < 1e-5
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    comparison = compare_with_torch(create_session(result.artifact / "model.onnx"), model, PROMPTS, decode_steps=6)
    assert comparison.max_abs_diff < 1e-4 and comparison.top1_agreement == 1.0, comparison
    assert comparison.decode_max_abs_diff < 1e-4
    # each prompt alone gives the batch's numbers (left padding masked, not attended)
    assert comparison.batch_max_abs_diff < 1e-5 and comparison.batch_top1_agreement == 1.0, comparison
    assert result.validation["batch_max_abs_diff"] < 1e-5  # recorded in compress.json
    genai = json.loads((result.artifact / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True  # GroupQueryAttention updates the buffer in place


def test_fused_graph_takes_right_padding_as_onnxruntime_genai_feeds_it(tmp_path, fused_model):
    """onnxruntime-genai pads a batch on the right (pad ids masked at the end of the prompt), takes each row's
    logits at its last real token, then appends one 1 to the mask per step (the pads stay in the middle) with
    the row's real position. Every row must get what it gets alone; the graph used to rotate the steps at the
    mask's width, so the rows drifted by their padding from the first decoded token on."""
    session = create_session(export_onnx(fused_model("llama"), tmp_path / "onnx").artifact / "model.onnx")
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    heads, dim = session.get_inputs()[-1].shape[1], session.get_inputs()[-1].shape[3]
    names = [o.name for o in session.get_outputs()]

    def run(prompts: list[list[int]], forced: list[list[int]]) -> list[np.ndarray]:
        width = max(map(len, prompts))
        ids = np.asarray([p + [0] * (width - len(p)) for p in prompts], np.int64)
        mask = np.asarray([[1] * len(p) + [0] * (width - len(p)) for p in prompts], np.int64)
        positions = np.asarray([list(range(len(p))) + [0] * (width - len(p)) for p in prompts], np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **{n: np.zeros((len(prompts), heads, 0, dim), np.float32) for n in past_names}}
        out = dict(zip(names, session.run(None, feeds)))
        rows = [[out["logits"][r, len(p) - 1]] for r, p in enumerate(prompts)]
        for step in range(len(forced[0])):
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
            position = np.asarray([[len(p) + step] for p in prompts], np.int64)
            feeds = {"input_ids": np.asarray([[f[step]] for f in forced], np.int64), "attention_mask": mask, "position_ids": position}
            feeds.update({n: out[n.replace("past_key_values.", "present.")] for n in past_names})
            out = dict(zip(names, session.run(None, feeds)))
            for r in range(len(prompts)):
                rows[r].append(out["logits"][r, -1])
        return [np.stack(r) for r in rows]

    forced = [[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34], [41, 42, 43, 44]]
    batched = run(PROMPTS, forced)
    for r, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(batched[r], run([prompt], [forced[r]])[0], rtol=0, atol=1e-4, err_msg=f"row {r}")


def test_batch_check_sees_a_graph_that_attends_to_left_padding(tmp_path, fused_model):
    """The batch-vs-alone comparison must catch padding that leaks into the answer: the same folder run as if
    every pad were a token (mask all ones) agrees with itself alone far worse than the real graph."""
    from transformers import AutoModelForCausalLM

    src = fused_model("llama")
    session = create_session(export_onnx(src, tmp_path / "onnx").artifact / "model.onnx")

    class PadsAttended:  # what a graph that ignores attention_mask computes
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def run(self, names, feeds):
            return self.inner.run(names, {**feeds, "attention_mask": np.ones_like(feeds["attention_mask"]), "position_ids": np.broadcast_to(np.arange(feeds["attention_mask"].shape[1])[-feeds["input_ids"].shape[1]:], feeds["input_ids"].shape).copy()})

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    good = compare_with_torch(session, model, PROMPTS)
    leaky = compare_with_torch(PadsAttended(session), model, PROMPTS)
    assert good.batch_max_abs_diff < 1e-5 and good.within(TOLERANCES["fp32"])
    assert leaky.batch_max_abs_diff > 1e-2 and leaky.batch_top1_agreement < 1.0, leaky
    batch_only = lambda key: Tolerance(max_rel_diff=None, min_top1=0.0, max_batch_rel_diff=TOLERANCES[key].max_batch_rel_diff)  # noqa: E731
    assert good.within(batch_only("fp32")) and not leaky.within(batch_only("fp32")) and not leaky.within(batch_only("int4-gptq"))


def test_fused_graph_ignores_nothing_the_torch_model_reads(tmp_path, fused_model, monkeypatch):
    """A wrong weight anywhere must show: scale one layer's RMSNorm weight and validation has to fail."""
    import compress_exporters.build as build
    from compress_exporters.validation import ValidationFailedError

    real = build.apply_weights

    def corrupt(proto, *args, **kwargs):
        proto, details = real(proto, *args, **kwargs)
        gamma = next(t for t in proto.graph.initializer if t.name == "model.layers.1.post_attention_layernorm.weight")
        gamma.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(gamma) * 3.0, gamma.name))
        return proto, details

    monkeypatch.setattr(build, "apply_weights", corrupt)
    with pytest.raises(ValidationFailedError, match="max relative logit difference"):
        export_onnx(fused_model("llama"), tmp_path / "onnx")


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_fused_quantized_formats_from_float(tmp_path, fused_model, weights):
    result = export_onnx(fused_model("llama"), tmp_path / "onnx", weights=weights)
    assert result.record["recipe"]["export"]["exporter"] == "fused" and result.validation["passed"]
    model = onnx.load(str(result.artifact / "model.onnx"))
    bits = sorted({a.name: a.i for a in n.attribute}["bits"] for n in model.graph.node if n.op_type == "MatMulNBits")
    assert bits == [int(weights[3])] * 8 + ([8] if weights == "int4" else [int(weights[3])])  # 4 fused projections x 2 layers + the 8-bit head


@pytest.fixture(scope="module")
def gptq_fused(tmp_path_factory, tokenizer_dir, text_files):
    """4-bit GPTQ with act-order and groups of 64 over widths 96 and 192 (a partial last group), 6 heads of 16."""
    return gptq_tiny_llama(tmp_path_factory.mktemp("gptq-fused"), tokenizer_dir, text_files, hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=2)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3"])
def test_fused_gptq_int4_gemma_and_phi3_equal_the_dequantized_model(tmp_path, tokenizer_dir, text_files, family):
    """GPTQ codes carried into Gemma's fused graph (sandwich norms, GELU-tanh, soft-caps, two rotary bases) and
    Phi-3's (whose checkpoint already fuses q/k/v and gate/up: one GPTQ layer each) around the same MatMulNBits."""
    from test_quantize import make_recipe

    from compress.models import load_quantized
    from compress.quantize.stage import run_quantize

    caps = {"final_logit_softcapping": 0.5, "attn_logit_softcapping": 0.05} if family == "gemma2" else {}
    heads = {} if family == "phi3" else {"head_dim": 16}
    folder = save_tiny(tmp_path / family, family, tokenizer_dir, layers=2, hidden_size=64, intermediate_size=128, sliding_window=4, train_steps=20, **heads, **caps)
    gptq = run_quantize(make_recipe(tmp_path, text_files, group_size=32), str(folder), tmp_path / "gptq", progress=False).artifact
    result = export_onnx(gptq, tmp_path / "onnx", weights="int4", accuracy_level=0, lm_head="float")
    assert result.record["recipe"]["export"]["exporter"] == "fused"
    assert result.record["onnx"]["weights"]["layers"] == (8 if family == "phi3" else 14) and result.record["onnx"]["weights"]["matmulnbits_nodes"] == 8
    comparison = compare_with_torch(create_session(result.artifact / "model.onnx"), load_quantized(gptq), PROMPTS, decode_steps=4)
    assert comparison.max_rel_diff < 1e-4 and comparison.top1_agreement == 1.0, comparison


def test_fused_gptq_int4_equals_the_dequantized_model(tmp_path, gptq_fused):
    from compress.models import load_quantized

    result = export_onnx(gptq_fused, tmp_path / "onnx", weights="int4", accuracy_level=0, lm_head="float")
    assert result.record["recipe"]["export"]["exporter"] == "fused"
    details = result.record["onnx"]["weights"]
    assert details["layers"] == 14 and details["matmulnbits_nodes"] == 8 and details["act_order_layers"] == 14
    # act-order Gathers: one for q/k/v (one Hessian, one permutation), o_proj, gate/up; none for down_proj,
    # whose input gate/up write pre-sorted: 3 a layer, + the embedding
    assert ops(result.artifact)["Gather"] == 3 * 2 + 1
    reference = load_quantized(gptq_fused)
    comparison = compare_with_torch(create_session(result.artifact / "model.onnx"), reference, PROMPTS, decode_steps=4)
    assert comparison.max_abs_diff < 1e-4 and comparison.top1_agreement == 1.0, comparison

    # Bit-exact: each fused q/k/v MatMulNBits dequantizes to exactly the GPTQ layers' weights, side by side.
    model = onnx.load(str(result.artifact / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    fused = result.record["onnx"]["fused_projections"]
    checked = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or not node.name.endswith("q_k_v_proj/MatMulNBits"):
            continue
        attrs = {a.name: a.i for a in node.attribute}
        gather = producers[node.input[0]]
        assert gather.op_type == "Gather"
        weight = matmulnbits.NBitsWeight(B=inits[node.input[1]], scales=inits[node.input[2]], zero_points=inits[node.input[3]] if len(node.input) > 3 else None, perm=inits[gather.input[1]], K=attrs["K"], N=attrs["N"], bits=attrs["bits"], block_size=attrs["block_size"])
        layers = fused[node.name.rsplit("/", 1)[0]]
        expected = torch.cat([reference.get_submodule(name).dequantized_weight() for name in layers]).T.numpy()
        assert np.array_equal(matmulnbits.dequantize(weight), expected), node.name
        checked += 1
    assert checked == 2


@pytest.mark.parametrize("lm_head,expected", [(None, {(4, 4)}), ("int8", {(4, 4), (8, 4)})], ids=["auto-4-bit-head", "8-bit-head"])
def test_fused_gptq_default_levels_and_close(tmp_path, gptq_fused, lm_head, expected):
    # every quantized layer at level 4 (int8 activations), the head too, whether its 4-bit GPTQ codes (auto) or 8 bits;
    # the graph is also checked with its 4-bit layers at level 0, against the sharp bars
    result = export_onnx(gptq_fused, tmp_path / "onnx", weights="int4", lm_head=lm_head)
    v = result.validation
    assert v["passed"] and v["top1_agreement"] >= 0.95 and v["tolerance"] == asdict(TOLERANCES["int4-gptq-level4"])
    check = v["graph_check"]
    assert check["passed"] and check["tolerance"] == asdict(TOLERANCES["int4-gptq"]) and "accuracy_level 0" in check["reference"]
    assert check["max_rel_diff"] < 0.03 and check["batch_max_rel_diff"] < 1e-3 and check["batch_top1_agreement"] == 1.0
    model = onnx.load(str(result.artifact / "model.onnx"))
    levels = {(attrs["bits"], attrs.get("accuracy_level", 0)) for n in model.graph.node if n.op_type == "MatMulNBits" for attrs in [{a.name: a.i for a in n.attribute}]}
    assert levels == expected
    assert not list(result.artifact.glob(".graph-check*"))  # the check's copy of the graph is gone


def test_static_groups_export_without_input_permutations(tmp_path, tokenizer_dir, text_files):
    """Act-order with static groups (g_idx sequential): the fused int4 graph carries the codes with no act-order
    Gather (the only Gather left is none: the embedding is quantized), equals the dequantized model, and says
    nothing about scattered groups; the same model with dynamic groups gets 3 Gathers a layer and the note."""
    from compress.models import load_quantized
    from compress.quantize.stage import run_quantize
    from test_quantize import make_recipe

    folder = save_tiny(tmp_path / "llama", "llama", tokenizer_dir, layers=2, hidden_size=64, intermediate_size=128, train_steps=20)
    exported = {}
    for static in (True, False):
        gptq = run_quantize(make_recipe(tmp_path / f"r{static}", text_files, act_order=True, static_groups=static), str(folder), tmp_path / f"gptq-{static}", progress=False).artifact
        exported[static] = (gptq, export_onnx(gptq, tmp_path / f"onnx-{static}", weights="int4", accuracy_level=0, lm_head="float"))
    gptq, static = exported[True]
    assert static.record["onnx"]["weights"]["act_order_layers"] == 0 and not static.notes
    assert ops(static.artifact)["Gather"] == 1  # the float embedding's lookup; no act-order permutation
    comparison = compare_with_torch(create_session(static.artifact / "model.onnx"), load_quantized(gptq), PROMPTS, decode_steps=4)
    assert comparison.max_abs_diff < 1e-4 and comparison.top1_agreement == 1.0, comparison
    _, dynamic = exported[False]
    assert dynamic.record["onnx"]["weights"]["act_order_layers"] == 14 and ops(dynamic.artifact)["Gather"] == 3 * 2 + 1
    assert any("static_groups" in note for note in dynamic.notes)


def test_level0_graph_check_catches_what_int8_activations_hide(tmp_path, gptq_fused, monkeypatch):
    """A graph error that keeps every argmax (the final norm 10% too large: all logits scaled) passes the
    level-4 bar, which judges top-1 only; the check of the same graph at level 0 refuses it by its logits."""
    from compress_exporters import build

    real = build.apply_weights

    def scaled_final_norm(proto, *args, **kwargs):
        proto, details = real(proto, *args, **kwargs)
        norm = next(t for t in proto.graph.initializer if t.name == "model.norm.weight")
        norm.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(norm) * np.float32(1.1), norm.name))
        return proto, details

    monkeypatch.setattr(build, "apply_weights", scaled_final_norm)
    with pytest.raises(ValidationFailedError, match="4-bit layers at accuracy_level 0"):
        export_onnx(gptq_fused, tmp_path / "onnx", weights="int4")
    assert not (tmp_path / "onnx").exists()
    monkeypatch.setattr(build, "apply_weights", real)
    assert export_onnx(gptq_fused, tmp_path / "onnx", weights="int4").validation["graph_check"]["passed"]


def test_what_the_fused_graph_cannot_export(tmp_path, tiny_narrow, fused_model):
    # head size 8: GroupQueryAttention refuses it, so auto takes torch.onnx and fused says why
    result = export_onnx(tiny_narrow, tmp_path / "auto", exporter="auto")
    assert result.record["recipe"]["export"]["exporter"] == "dynamo" and "GroupQueryAttention" not in ops(result.artifact)
    with pytest.raises(ExportError, match="multiple of 16"):
        export_onnx(tiny_narrow, tmp_path / "fused", exporter="fused")
    with pytest.raises(ExportError, match="not fp16"):
        export_onnx(fused_model("llama"), tmp_path / "fp16", exporter="fused", weights="fp16")
    with pytest.raises(ExportError, match="opset applies to the torch.onnx exporters"):
        export_onnx(fused_model("llama"), tmp_path / "opset", exporter="fused", opset=17)


@pytest.fixture(scope="module")
def tiny_narrow(tmp_path_factory, tokenizer_dir):
    return save_tiny(tmp_path_factory.mktemp("narrow") / "llama", "llama", tokenizer_dir, layers=1)


def test_other_families_are_refused_by_the_fused_exporter(tmp_path, tokenizer_dir):
    src = save_tiny(tmp_path / "gpt2", "gpt2", tokenizer_dir, layers=1)
    with pytest.raises(ExportError, match=r"the fused graph covers llama, .*, not gpt2"):
        export_onnx(src, tmp_path / "onnx", exporter="fused")


def test_int8_embedding_rows_are_within_half_a_step():
    from compress_exporters.weights import quantize_rows_int8

    table = np.random.default_rng(0).normal(size=(50, 72)).astype(np.float32)  # 72 = one block of 64 + a partial one
    table[3] = 0.0  # an all-zero row must not divide by zero
    codes, scales = quantize_rows_int8(table, 64)
    assert codes.shape == (50, 128) and codes.dtype == np.uint8 and scales.shape == (50, 2)
    step = np.repeat(scales, 64, axis=1)
    restored = (codes.astype(np.float32) - 128) * step
    assert np.all(np.abs(restored[:, :72] - table) <= 0.5 * step[:, :72] + 1e-7)
    assert np.all(codes[:, 72:] == 128) and np.all(restored[3] == 0)


def _embedding_subgraph(model: onnx.ModelProto, output: str = "embeddings") -> onnx.ModelProto:
    """The nodes between input_ids and the embedding output, as a model of their own."""
    from onnx import TensorProto, helper

    producers = {out: n for n in model.graph.node for out in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    nodes, needed, frontier = [], set(), [output]
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node in nodes:
            continue
        nodes.append(node)
        frontier += [i for i in node.input if i and i not in inits]
        needed.update(i for i in node.input if i in inits)
    graph = helper.make_graph(list(reversed(nodes)), "embedding", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], [inits[n] for n in sorted(needed)])
    return helper.make_model(graph, opset_imports=list(model.opset_import))


@pytest.mark.parametrize("tied", [True, False])
def test_int8_embedding_is_shared_with_a_tied_8_bit_head(tmp_path, tokenizer_dir, tied):
    """int4 export: the embedding becomes a GatherBlockQuantized; a tied head's 8-bit codes are stored once and
    read by both, an untied embedding gets 8-bit codes of its own. No float (vocab, hidden) table is left, and
    every row the graph looks up is the float row rounded to its 8-bit step."""
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    from compress_exporters.weights import quantize_rows_int8

    src = save_tiny(tmp_path / "src", "llama", tokenizer_dir, layers=2, tie_word_embeddings=tied, **WIDE)
    table = AutoModelForCausalLM.from_pretrained(src).get_input_embeddings().weight.detach().numpy()  # (vocab, hidden)
    result = export_onnx(src, tmp_path / "onnx", weights="int4")
    details = result.record["onnx"]["weights"]
    assert details["embedding"] == "int8" and details["embedding_shared_with_lm_head"] is tied and result.validation["passed"]
    model = onnx.load(str(result.artifact / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not [name for name, t in inits.items() if t.shape == table.shape and t.dtype == np.float32]
    (gbq,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    producers = {out: n for n in model.graph.node for out in n.output}
    assert producers[gbq.input[2]].op_type == "Reshape"  # scales (vocab, blocks) -> (vocab, blocks, 1)
    if tied:  # the head's own initializers, not a copy
        assert gbq.input[0] == head.input[1] and producers[gbq.input[2]].input[0] == head.input[2]
        scales = inits[head.input[2]].reshape(table.shape[0], -1)
        attrs = {a.name: a.i for a in head.attribute}
        head_weight = matmulnbits.dequantize(matmulnbits.NBitsWeight(B=inits[head.input[1]], scales=scales, zero_points=None, perm=None, K=attrs["K"], N=attrs["N"], bits=8, block_size=attrs["block_size"]))
    else:
        codes, scales = quantize_rows_int8(table, 128)
        assert np.array_equal(inits[gbq.input[0]], codes.reshape(table.shape[0], -1, 128)) and np.array_equal(inits[producers[gbq.input[2]].input[0]], scales)
    session = ort.InferenceSession(_embedding_subgraph(model).SerializeToString())
    rows = session.run(None, {"input_ids": np.arange(table.shape[0], dtype=np.int64)[None]})[0][0]
    step = np.abs(np.repeat(scales, 128, axis=1)[:, : table.shape[1]])  # ONNX Runtime's scales may be negative
    assert rows.shape == table.shape and not np.array_equal(rows, table)
    if tied:  # exactly the weights the head multiplies by, which ONNX Runtime rounded within a step of the table
        np.testing.assert_array_equal(rows, head_weight.T)
        assert np.all(np.abs(rows - table) <= step)
    else:  # round to nearest
        assert np.all(np.abs(rows - table) <= 0.5 * step * (1 + 1e-5))


def test_int8_embedding_needs_a_quantized_export(tmp_path, fused_model):
    with pytest.raises(ExportError, match="embedding='int8' needs weights int8 or int4"):
        export_onnx(fused_model("llama"), tmp_path / "onnx", weights="fp32", embedding="int8")
    result = export_onnx(fused_model("llama"), tmp_path / "float-embedding", weights="int4", embedding="float")
    assert "GatherBlockQuantized" not in ops(result.artifact) and result.record["onnx"]["weights"].get("embedding") is None


def test_onnxruntime_genai_runs_the_int4_folder_with_the_8_bit_embedding(tmp_path, fused_model):
    pytest.importorskip("onnxruntime_genai", reason="interop check runs where onnxruntime-genai installs (pip install onnxruntime-genai)")
    from conftest import genai_greedy

    from compress_exporters.runtime import OnnxCausalLM

    result = export_onnx(fused_model("llama"), tmp_path / "onnx", weights="int4")
    assert ops(result.artifact)["GatherBlockQuantized"] == 1
    lm = OnnxCausalLM.from_dir(result.artifact, threads=1)
    assert genai_greedy(result.artifact, PROMPTS[0], 10) == lm.generate(PROMPTS[0], max_new_tokens=10, stop_tokens=[]).token_ids


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_exported_folder_loads_without_a_warning_and_the_runtime_keeps_the_last_logits(tmp_path, fused_model, weights):
    """ONNX Runtime at its default log level says nothing when a plain app loads the folder (an initializer that
    is also a graph input made it warn at every load); the graph as written gives every position's logits,
    the runtime's copy only the last position's, the same numbers."""
    import subprocess
    import sys

    from compress_exporters.runtime import OnnxCausalLM

    folder = export_onnx(fused_model("llama"), tmp_path / "onnx", weights=weights).artifact
    load = "import onnxruntime as ort; ort.InferenceSession(r'%s', providers=['CPUExecutionProvider'])" % (folder / "model.onnx")
    proc = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "onnxruntime" not in proc.stderr + proc.stdout, proc.stderr
    model = onnx.load(str(folder / "model.onnx"))
    assert "num_logits_to_keep" not in {i.name for i in model.graph.input}

    lm = OnnxCausalLM.from_dir(folder)
    assert lm._keeps_last and lm.kv_device == "cpu"
    assert not create_session(folder / "model.onnx").compress_last_logits_only
    ids = np.asarray([PROMPTS[0]], np.int64)
    every, _ = lm.forward(ids, every_position=True)  # the graph as written
    last, _ = lm.forward(ids)
    assert every.shape[1] == ids.shape[1] and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], every[:, -1], rtol=0, atol=1e-5)
