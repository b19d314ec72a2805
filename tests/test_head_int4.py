"""The 4-bit LM head and embedding: GPTQ codes of the head written beside a 4-bit GPTQ checkpoint
(quantize.head_codes), carried into a 4-bit MatMulNBits head by the int4 export, and read by the tied 4-bit
embedding (GatherBlockQuantized) without a second copy; `lm_head: auto` and its refusals."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import gptq_tiny_llama, save_tiny
from onnx import numpy_helper
from test_export_fused import _embedding_subgraph

from compress.quantize.head_codes import HEAD_CODES_FILE, read_head_codes
from compress_exporters import matmulnbits
from compress_exporters.onnx import ExportError, export_onnx

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def gptq_tied(tmp_path_factory, tokenizer_dir, text_files):
    """4-bit GPTQ (act-order, groups of 64) of a tied tiny Llama, hidden 96, with the default head codes (groups of 32)."""
    return gptq_tiny_llama(tmp_path_factory.mktemp("gptq-head"), tokenizer_dir, text_files, hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=2)


def _float_head(gptq_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gptq_dir.parent / "float").get_output_embeddings().weight.detach().float()


def _inits(folder):
    model = onnx.load(str(folder / "model.onnx"))
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _looked_up(model, gbq) -> onnx.ModelProto:
    """The embedding lookup (GatherBlockQuantized, Reshape, Slice) as a model of its own."""
    consumers = {i: n for n in model.graph.node for i in n.input}
    out = consumers[gbq.output[0]].output[0]  # the Reshape to rows
    if consumers.get(out) is not None and consumers[out].op_type == "Slice":
        out = consumers[out].output[0]
    return _embedding_subgraph(model, out)


def _head_node(model):
    return next(n for n in model.graph.node if n.output[0] == "logits")


def _nbits(node, inits) -> matmulnbits.NBitsWeight:
    attrs = {a.name: a.i for a in node.attribute}
    return matmulnbits.NBitsWeight(B=inits[node.input[1]], scales=inits[node.input[2]].reshape(attrs["N"], -1), zero_points=inits[node.input[3]] if len(node.input) > 3 else None,
                                   perm=None, K=attrs["K"], N=attrs["N"], bits=attrs["bits"], block_size=attrs["block_size"])


def test_gptq_head_codes_dequantize_within_a_step_of_the_float_head(gptq_tied, text_files):
    codes = read_head_codes(gptq_tied)
    assert codes is not None and codes.packed.bits == 4 and codes.group_size == 32 and not codes.act_order
    W = _float_head(gptq_tied)
    Q = codes.dequantized()
    step = codes.packed.scales.float()[codes.packed.g_idx.long()].T.abs()  # (vocab, hidden): each weight's step
    assert Q.shape == W.shape and not torch.equal(Q, W)
    # GPTQ's error feedback moves a few weights further by design (measured here: 1.4% beyond one step, the
    # furthest 4.4 steps; round to nearest stays within half a step); codes, scales or groups out of order
    # would put most weights several steps away.
    ratio = ((Q - W).abs() / step).flatten()
    assert float((ratio <= 1 + 1e-4).float().mean()) >= 0.98 and float(ratio.median()) <= 0.5 and float(ratio.max()) <= 8, torch.quantile(ratio, torch.tensor([0.5, 0.99, 1.0]))
    record = json.loads((gptq_tied / "compress.json").read_text())["lm_head_codes"]
    assert record["file"] == HEAD_CODES_FILE and record["group_size"] == 32 and record["tokens"] == 16 * 32
    # The checkpoint's own head stays float: peers load the same model as before.
    config = json.loads((gptq_tied / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is False


def test_gptq_head_beats_round_to_nearest_on_what_the_head_reads(tmp_path, wide_llama, text_files):
    """GPTQ of the head on the final hidden states of the calibration text has a smaller output error there than
    round-to-nearest on the same grid (GPTQ's objective; equal errors would mean the Hessian was ignored)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.quantize.calibrate import head_inputs, quantize_blocks, quantize_head
    from compress.quantize.grid import QuantGrid, rtn
    from compress.quantize.stage import calibration_blocks
    from test_quantize import make_recipe

    recipe = make_recipe(tmp_path, text_files)
    model = AutoModelForCausalLM.from_pretrained(wide_llama).eval()
    calib, _ = calibration_blocks(recipe, recipe.quantize, AutoTokenizer.from_pretrained(wide_llama))
    final: list[torch.Tensor] = []
    quantize_blocks(model, calib, QuantGrid(4, True), method="gptq", group_size=32, skip=("lm_head",), final_hidden=final)
    inputs = head_inputs(model, calib, 8, final)
    assert len(inputs) == len(final) and inputs[0].shape[:2] == calib[:8].shape
    W = model.get_output_embeddings().weight.detach().float()
    res, report = quantize_head(model, inputs, QuantGrid(4, True), group_size=32, act_order=False)
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
    err = lambda Q: float(torch.linalg.norm(X @ (W - Q).T) / torch.linalg.norm(X @ W.T))  # noqa: E731
    assert report.output_error == pytest.approx(err(res.Q), rel=1e-3)
    assert err(res.Q) < 0.9 * err(rtn(W, QuantGrid(4, True), 32).Q)
    assert torch.equal(model.get_output_embeddings().weight, W)  # the model is left as it was


def test_int4_export_carries_the_gptq_head_and_the_tied_embedding_reads_its_codes(tmp_path, gptq_tied):
    import onnxruntime as ort

    codes = read_head_codes(gptq_tied)
    # lm_head auto -> the GPTQ codes; the head at level 0 so the graph check is the reference's model to float rounding
    result = export_onnx(gptq_tied, tmp_path / "onnx", weights="int4", embedding="int4", lm_head_accuracy_level=0)
    settings = result.record["recipe"]["export"]
    assert settings["lm_head"] == "int4" and settings["embedding"] == "int4" and "4 bits" in settings["lm_head_choice"]["reason"]
    details = result.record["onnx"]["weights"]
    assert details["embedding"] == "int4" and details["embedding_shared_with_lm_head"] is True and details["lm_head_block_size"] == 32
    model, inits = _inits(result.artifact)
    head = _head_node(model)
    assert head.op_type == "MatMulNBits"
    head_weight = matmulnbits.dequantize(_nbits(head, inits))  # (hidden, vocab)
    np.testing.assert_array_equal(head_weight, codes.dequantized().T.numpy())  # the GPTQ codes exactly
    (gbq,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    producers = {out: n for n in model.graph.node for out in n.output}
    assert {a.name: a.i for a in gbq.attribute}["bits"] == 4
    assert gbq.input[0] == head.input[1] and producers[gbq.input[2]].input[0] == head.input[2]  # one copy of the codes
    vocab, hidden = codes.dequantized().shape
    assert not [n for n, t in inits.items() if t.dtype == np.float32 and set(t.shape) == {vocab, hidden}]  # no float table left
    assert result.record["recipe"]["export"]["exporter"] == "fused"
    session = ort.InferenceSession(_looked_up(model, gbq).SerializeToString())
    rows = session.run(None, {"input_ids": np.arange(vocab, dtype=np.int64)[None]})[0][0]
    np.testing.assert_array_equal(rows, head_weight.T)  # every row is the head's dequantized row
    # The reference holds the same head: the folder's graph (4-bit layers checked at level 0, the head as written at
    # level 0) matches it as closely as with a float head.
    assert result.validation["passed"] and result.validation["graph_check"]["max_rel_diff"] < 1e-3, result.validation


def test_auto_pairs_the_4_bit_gptq_head_with_an_8_bit_embedding(tmp_path, gptq_tied):
    result = export_onnx(gptq_tied, tmp_path / "onnx", weights="int4")
    settings, details = result.record["recipe"]["export"], result.record["onnx"]["weights"]
    assert settings["lm_head"] == "int4" and settings["lm_head_accuracy_level"] == 4 and settings["embedding"] == "int8"
    assert "8-bit codes of its own" in settings["lm_head_choice"]["embedding_reason"] and details["embedding_shared_with_lm_head"] is False
    model, inits = _inits(result.artifact)
    bits = {n.op_type: {a.name: a.i for a in n.attribute}["bits"] for n in model.graph.node if n.op_type == "GatherBlockQuantized" or n.output[0] == "logits"}
    assert bits == {"MatMulNBits": 4, "GatherBlockQuantized": 8} and result.validation["passed"]


def test_untied_embedding_gets_4_bit_codes_of_its_own(tmp_path, tokenizer_dir, text_files):
    from transformers import AutoModelForCausalLM

    gptq = gptq_tiny_llama(tmp_path / "untied", tokenizer_dir, text_files, hidden_size=64, intermediate_size=128, tie_word_embeddings=False)
    table = AutoModelForCausalLM.from_pretrained(gptq.parent / "float").get_input_embeddings().weight.detach().numpy()
    result = export_onnx(gptq, tmp_path / "onnx", weights="int4", lm_head="int4", embedding="int4", lm_head_accuracy_level=0)
    details = result.record["onnx"]["weights"]
    assert details["embedding"] == "int4" and details["embedding_shared_with_lm_head"] is False and result.validation["passed"]
    model, inits = _inits(result.artifact)
    (gbq,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert gbq.input[0] != _head_node(model).input[1]
    import onnxruntime as ort

    assert result.validation["graph_check"]["max_rel_diff"] < 1e-3, result.validation  # the reference's embedding is rounded as the folder's
    rows = ort.InferenceSession(_looked_up(model, gbq).SerializeToString()).run(None, {"input_ids": np.arange(table.shape[0], dtype=np.int64)[None]})[0][0]
    producers = {out: n for n in model.graph.node for out in n.output}
    step = np.abs(np.repeat(inits[producers[gbq.input[2]].input[0]], 32, axis=1))
    assert not np.array_equal(rows, table) and np.all(np.abs(rows - table) <= step * (1 + 1e-5))  # round to nearest, the extreme a step away


def test_round_to_nearest_4_bit_head_from_a_float_model(tmp_path, fused_tied):
    result = export_onnx(fused_tied, tmp_path / "onnx", weights="int4", lm_head="int4")
    model, inits = _inits(result.artifact)
    head = _head_node(model)
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == 4
    assert result.record["onnx"]["weights"]["embedding_shared_with_lm_head"] is True and result.validation["passed"]
    # auto keeps 8 bits for a float model: its round-to-nearest 4-bit head costs several % of perplexity
    auto = export_onnx(fused_tied, tmp_path / "auto", weights="int4")
    assert auto.record["recipe"]["export"]["lm_head"] == "int8" and "rounded to nearest" in auto.record["recipe"]["export"]["lm_head_choice"]["reason"]


@pytest.fixture(scope="module")
def fused_tied(tmp_path_factory, tokenizer_dir):
    return save_tiny(tmp_path_factory.mktemp("tied") / "m", "llama", tokenizer_dir, layers=2, hidden_size=64, intermediate_size=128)


def test_auto_keeps_8_bits_where_the_head_is_a_small_share_of_decode(tmp_path, tokenizer_dir, text_files):
    from compress_exporters import build

    wide = gptq_tiny_llama(tmp_path / "deep", tokenizer_dir, text_files, hidden_size=64, intermediate_size=2048)
    source = build.inspect_source(wide, "int4")
    head, body = build.decode_bytes(source)
    choice = build.auto_head(source, "int4", build.head_codes_of(source))
    assert body > 3 * head and choice["lm_head"] == "int8" and choice["head_share_8bit"] < build.AUTO_INT4_HEAD_SHARE


@pytest.mark.parametrize("weights", ["fp32", "fp16"])
@pytest.mark.parametrize("key", ["lm_head", "embedding"])
def test_4_bit_head_and_embedding_need_a_4_bit_export(tmp_path, fused_tied, weights, key):
    from compress.recipe import ExportSpec

    with pytest.raises(ExportError, match=f"{key}='int4' needs weights int8 or int4"):
        export_onnx(fused_tied, tmp_path / "onnx", weights=weights, **{key: "int4"})
    with pytest.raises(ValueError, match=f"{key}: int4 needs weights int4 or int8"):
        ExportSpec(weights=weights, **{key: "int4"})
    with pytest.raises(ExportError, match=f"{key}='int4' needs weights int4"):
        export_onnx(fused_tied, tmp_path / "onnx", weights="int8", **{key: "int4"})
    assert not (tmp_path / "onnx").exists()


def test_int4_head_from_a_gptq_artifact_without_codes_is_refused(tmp_path, gptq_tied):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(gptq_tied, bare)
    (bare / HEAD_CODES_FILE).unlink()
    with pytest.raises(ExportError, match="has none .*lm_head_gptq.safetensors"):
        export_onnx(bare, tmp_path / "onnx", weights="int4", lm_head="int4")
    result = export_onnx(bare, tmp_path / "auto", weights="int4")
    assert result.record["recipe"]["export"]["lm_head"] == "int8" and "no head codes" in result.record["recipe"]["export"]["lm_head_choice"]["reason"]
    (bare / HEAD_CODES_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="lm_head_gptq.safetensors: not a readable safetensors file"):
        export_onnx(bare, tmp_path / "broken", weights="int4")


def test_recipe_refuses_an_int4_head_without_head_codes():
    from compress.recipe import validate_recipe

    base = {"quantize": {"method": "gptq", "bits": 4, "head_codes": None}, "export": {"weights": "int4", "lm_head": "int4"}}
    with pytest.raises(ValueError, match="export.lm_head: int4 exports the LM head's GPTQ codes, which quantize.head_codes: null does not write"):
        validate_recipe(base)
    assert validate_recipe({**base, "export": {"weights": "int4", "lm_head": "auto"}}).export.lm_head == "auto"
