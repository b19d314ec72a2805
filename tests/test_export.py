"""ONNX export on tiny models: fp32 is the torch model (prefill and decode with the cache), the weight
formats run and agree, GPTQ int4 weights are carried over bit-exactly, and bad input leaves nothing behind."""
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install 'compress-llm[onnx]'")
pytest.importorskip("onnxruntime", reason="ONNX export needs onnxruntime: pip install 'compress-llm[onnx]'")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript: pip install 'compress-llm[onnx]'")

import onnx  # noqa: E402
from conftest import TINY, gptq_tiny_llama, save_tiny  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from compress.architectures import TESTED_FAMILIES, UnsupportedArchitectureError  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress_exporters import matmulnbits  # noqa: E402
from compress_exporters.decoder import cache_kwarg  # noqa: E402
from compress_exporters.onnx import TOLERANCES, ExportError, export_onnx  # noqa: E402
from compress_exporters.runtime import ProviderUnavailableError, create_session  # noqa: E402
from compress_exporters.validation import Tolerance, ValidationFailedError  # noqa: E402

ROOT = Path(__file__).parents[1]

# Every tested family either exports or is refused, and each outcome has a test: a family added to
# compress.architectures.TESTED_FAMILIES without an entry here fails test_every_architecture_has_an_export_outcome.
EXPORT_OUTCOME = {f: "exports" for f in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt", "qwen3_moe")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    """2-layer models: faster to export than the shared 4-layer teachers."""
    root = tmp_path_factory.mktemp("tiny-export")
    # Only the Llama is trained (format tests judge top-1 agreement); fp32 exactness needs no training.
    return lambda family: (root / family) if (root / family).exists() else save_tiny(root / family, family, tokenizer_dir, layers=2, train_steps=30 if family == "llama" else 0)


def onnx_vs_torch(model_dir: Path, onnx_dir: Path, prompt=(5, 17, 101, 7, 9, 250, 3), steps=3):
    """Independent of the exporter's own validation: prefill + greedy decode steps with the cache."""
    from transformers import AutoModelForCausalLM

    from compress.models import load_quantized

    quantized = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    model = load_quantized(model_dir) if quantized else AutoModelForCausalLM.from_pretrained(model_dir).eval()
    session = create_session(onnx_dir / "model.onnx")
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    ids = np.array([prompt], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    feeds.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past})
    diffs, same_top1 = [], []
    cache = None
    for step in range(steps + 1):
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(None, feeds)))
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]), position_ids=torch.from_numpy(feeds["position_ids"]), use_cache=True, **{cache_kwarg(model): cache})
        cache = getattr(ref, "cache", None) or ref.past_key_values
        diffs.append(float(np.abs(out["logits"] - ref.logits.numpy()).max()))
        same_top1.append(bool((out["logits"].argmax(-1) == ref.logits.numpy().argmax(-1)).all()))
        token = ref.logits[:, -1:].argmax(-1).numpy()
        n = feeds["attention_mask"].shape[1] + 1
        feeds = {"input_ids": token, "attention_mask": np.ones((1, n), np.int64), "position_ids": np.array([[n - 1]])}
        feeds.update({i.name: out[i.name.replace("past_key_values.", "present.")] for i in past})
    return diffs, same_top1


def assert_nothing_left(parent: Path, name: str):
    assert not (parent / name).exists(), "an output folder was left behind"
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")], "a temporary folder was left behind"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fp32_export_matches_torch_with_cache(tmp_path, tiny, family):
    src = tiny(family)
    result = export_onnx(src, tmp_path / "onnx")
    out = result.artifact
    diffs, same = onnx_vs_torch(src, out)
    assert max(diffs) < 1e-4 and all(same), diffs
    v = result.validation
    assert v["passed"] and v["max_abs_diff"] < 1e-4 and v["top1_agreement"] == 1.0 and v["decode_steps"] > 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("tokenizer") and p.name != "special_tokens_map.json") == [
        "README.md", "compress.json", "config.json", "genai_config.json", "generation_config.json", "model.onnx"]
    assert (out / "tokenizer.json").is_file()
    record = json.loads((out / "compress.json").read_text())
    assert record["stage"] == "export" and record["recipe"]["export"]["weights"] == "fp32"
    (lineage,) = record["inputs"]
    assert lineage["path"] == str(src.resolve()) and len(lineage["sha256"]) == 64
    assert record["metrics"]["validation"]["max_abs_diff"] == v["max_abs_diff"]
    genai = json.loads((out / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key" and decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert decoder["num_hidden_layers"] == 2 and decoder["num_key_value_heads"] == TINY[family]["num_key_value_heads"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_every_architecture_has_an_export_outcome():
    assert set(EXPORT_OUTCOME) == set(TESTED_FAMILIES), f"add an export outcome (and its test) for {set(TESTED_FAMILIES) ^ set(EXPORT_OUTCOME)}"


@pytest.mark.parametrize("family", [f for f, outcome in EXPORT_OUTCOME.items() if outcome == "exports" and f not in ("llama", "qwen2", "mistral")])
def test_other_supported_families_export(tmp_path, tiny, family):
    # The legacy exporter keeps the suite fast; every family also exported with dynamo (exporters/README.md).
    result = export_onnx(tiny(family), tmp_path / "onnx", exporter="legacy")
    assert result.validation["passed"] and result.validation["max_abs_diff"] < 1e-4


def test_unsupported_architecture_is_refused_by_name(tmp_path, monkeypatch):
    from transformers import BertConfig, BertLMHeadModel

    import compress_exporters.build as build

    monkeypatch.setattr(build, "load_reference", lambda *a, **k: pytest.fail("weights loaded before the architecture check"))
    BertLMHeadModel(BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, is_decoder=True)).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'bert'"):
        export_onnx(tmp_path / "bert", tmp_path / "onnx")
    assert_nothing_left(tmp_path, "onnx")


def test_bad_artifact_path_and_existing_output(tmp_path, tiny):
    with pytest.raises(CompressError, match="not found"):
        export_onnx(tmp_path / "no" / "such-model", tmp_path / "onnx")
    assert_nothing_left(tmp_path, "onnx")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CompressError, match="already exists"):
        export_onnx(tiny("llama"), tmp_path / "taken")


def test_forced_validation_failure_leaves_no_output(tmp_path, tiny, monkeypatch):
    import compress_exporters.onnx as exporter

    monkeypatch.setitem(exporter.TOLERANCES, "fp32", Tolerance(max_rel_diff=0.0, min_top1=1.0))
    with pytest.raises(ValidationFailedError, match=r"does not match torch fp32: max relative logit difference .* \(allowed 0\)"):
        export_onnx(tiny("llama"), tmp_path / "onnx", exporter="legacy")
    assert_nothing_left(tmp_path, "onnx")


def test_corrupted_weight_fails_validation(tmp_path, tiny, monkeypatch):
    import compress_exporters.build as build

    real = build.apply_weights

    def corrupt(proto, *args, **kwargs):
        proto, details = real(proto, *args, **kwargs)
        biggest = max(proto.graph.initializer, key=lambda t: t.ByteSize())
        W = numpy_helper.to_array(biggest)
        biggest.CopyFrom(numpy_helper.from_array((W * -3.0).astype(W.dtype), biggest.name))
        return proto, details

    monkeypatch.setattr(build, "apply_weights", corrupt)
    with pytest.raises(ValidationFailedError, match="top-1 agreement"):
        export_onnx(tiny("llama"), tmp_path / "onnx", exporter="legacy")
    assert_nothing_left(tmp_path, "onnx")


@pytest.mark.parametrize("weights,options", [("int4", {}), ("int4", {"accuracy_level": 0, "lm_head": "float"}), ("int8", {}), ("int8", {"int8_method": "dynamic"}), ("fp16", {})])
def test_weight_formats_run_and_agree(tmp_path, tiny, weights, options):
    result = export_onnx(tiny("llama"), tmp_path / "onnx", weights=weights, exporter="legacy", **options)
    v, record = result.validation, result.record
    assert v["passed"]
    # Tiny trained Llama, measured top-1: int4 0.94, int8 0.97-1.0, fp16 1.0 (exporters/README.md).
    assert v["top1_agreement"] >= {"int8": 0.93, "int4": 0.85, "fp16": 0.98}[weights]
    settings, ops = record["recipe"]["export"], record["onnx"]["ops"]
    if weights == "fp16":
        assert result.notes and "CUDA" in result.notes[0] and v["max_rel_diff"] < 1e-2
        return
    if options.get("int8_method") == "dynamic":
        assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulInteger", 0) == 2 * 7 + 1 and "MatMulNBits" not in ops
        assert settings["accuracy_level"] is None
        return
    # default: every quantized layer and the head at 4 (int8 activations); an explicit level applies to the head too
    level = options.get("accuracy_level", 4)
    head_level = None if options.get("lm_head") == "float" else options.get("accuracy_level", 4)
    assert settings["accuracy_level"] == level and settings["lm_head_accuracy_level"] == head_level  # recorded, and what the graph carries
    model = onnx.load(str(result.artifact / "model.onnx"))
    nodes = [{a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {n.get("accuracy_level", 0) for n in nodes if n["bits"] == int(weights[3])} == {level}
    if head_level is not None:
        assert {n.get("accuracy_level", 0) for n in nodes if n["bits"] == 8} == {head_level}
    if level == 0:
        assert v["batch_max_rel_diff"] < 5e-3 and v["tolerance"]["max_batch_rel_diff"] is not None and "graph_check" not in v  # judged
    elif weights == "int4":  # int8 activations: the graph is judged again with its 4-bit layers at level 0
        check = v["graph_check"]
        assert check["passed"] and check["batch_max_rel_diff"] < 5e-3 and check["tolerance"] == asdict(TOLERANCES["int4"])
    head_bits = [] if options.get("lm_head") == "float" else [8]
    assert sorted(n["bits"] for n in nodes) == [int(weights[3])] * 14 + head_bits  # 7 projections x 2 layers (+ head)


@pytest.fixture(scope="module")
def gptq_artifact(tmp_path_factory, tokenizer_dir, text_files):
    """A 4-bit GPTQ artifact with act-order and groups of 64 over widths of 96 and 192: groups are scattered over
    the columns and the last group of each row is partial (96 = 64 + 32), like 576 with groups of 128."""
    return gptq_tiny_llama(tmp_path_factory.mktemp("gptq-export"), tokenizer_dir, text_files, hidden_size=96, intermediate_size=192)


def test_int4_from_gptq_carries_weights_exactly(tmp_path, gptq_artifact):
    from compress.models import load_quantized
    from compress.quantize.gptq_checkpoint import GPTQLinear

    result = export_onnx(gptq_artifact, tmp_path / "onnx", weights="int4", accuracy_level=0, lm_head="float")
    diffs, same = onnx_vs_torch(gptq_artifact, result.artifact)
    assert max(diffs) < 1e-4 and all(same), diffs  # measured 5e-6: the same model
    assert result.validation["top1_agreement"] == 1.0
    details = result.record["onnx"]["weights"]
    assert details["layers"] == 14 and details["act_order_layers"] == 14 and details["block_sizes"] == [64]
    assert any("quantize.static_groups: true" in note for note in result.notes)  # scattered groups cost decode speed: said

    # Bit-exact: the MatMulNBits tensors dequantize to exactly the GPTQ layer's weight (no re-rounding).
    model = onnx.load(str(result.artifact / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    torch_model = load_quantized(gptq_artifact)
    checked = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        layer = node.name.rsplit("/", 1)[0]
        attrs = {a.name: a.i for a in node.attribute}
        gather = producers.get(node.input[0])  # act-order: the input permuted into group order (shared by q/k/v)
        perm = inits[gather.input[1]] if gather is not None and gather.op_type == "Gather" else None
        weight = matmulnbits.NBitsWeight(B=inits[node.input[1]], scales=inits[node.input[2]], zero_points=inits[node.input[3]] if len(node.input) > 3 else None, perm=perm, K=attrs["K"], N=attrs["N"], bits=attrs["bits"], block_size=attrs["block_size"])
        module = torch_model.get_submodule(layer)
        assert isinstance(module, GPTQLinear)
        assert np.array_equal(matmulnbits.dequantize(weight), module.dequantized_weight().T.numpy()), layer
        checked += 1
    assert checked == 14


@pytest.mark.parametrize("level", [None, 0])
def test_int4_from_gptq_accuracy_levels(tmp_path, gptq_artifact, level):
    result = export_onnx(gptq_artifact, tmp_path / "onnx", weights="int4", exporter="legacy", accuracy_level=level)  # GPTQ matching on the legacy graph too
    v = result.validation
    # the head's 4-bit GPTQ codes (lm_head auto); the layers and the head at level 4 (default, int8 activations) or 0
    assert v["passed"] and v["top1_agreement"] >= 0.95 and v["max_rel_diff"] < 0.03
    settings = result.record["recipe"]["export"]
    assert settings["lm_head"] == "int4" and (settings["accuracy_level"], settings["lm_head_accuracy_level"]) == ((4, 4) if level is None else (0, 0))
    assert v["tolerance"] == asdict(TOLERANCES["int4-gptq-level4" if level is None else "int4-gptq"])
    if level is None:  # the traced graph is checked at level 0 too
        assert v["graph_check"]["passed"] and v["graph_check"]["tolerance"] == asdict(TOLERANCES["int4-gptq"]) and v["graph_check"]["max_rel_diff"] < 0.03
    else:
        assert "graph_check" not in v


def test_gptq_artifact_needs_its_own_format(tmp_path, gptq_artifact):
    with pytest.raises(ExportError, match="4-bit GPTQ artifact: export it with --weights int4"):
        export_onnx(gptq_artifact, tmp_path / "onnx", weights="fp32")
    assert_nothing_left(tmp_path, "onnx")


def test_bitsandbytes_artifact_is_refused(tmp_path, tiny):
    bnb = tmp_path / "bnb"
    shutil.copytree(tiny("llama"), bnb)
    config = json.loads((bnb / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (bnb / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="bitsandbytes layers do not export to ONNX. Export the float model"):
        export_onnx(bnb, tmp_path / "onnx", weights="int4")
    assert_nothing_left(tmp_path, "onnx")


def test_cuda_requested_without_cuda_provider_is_an_error(tmp_path, tiny, monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ExportError, match="onnxruntime-gpu"):
            export_onnx(tiny("llama"), tmp_path / "onnx", device="cuda")
        assert_nothing_left(tmp_path, "onnx")
    # onnxruntime-gpu without its CUDA libraries: the provider is listed, the session silently runs on CPU.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda path, sess_options=None, providers=None: real(path, sess_options=sess_options, providers=["CPUExecutionProvider"]))
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", 1, [1])], [helper.make_tensor_value_info("y", 1, [1])]))
    onnx.save(model, str(tmp_path / "id.onnx"))
    with pytest.raises(ProviderUnavailableError, match=r"runs on \['CPUExecutionProvider'\]"):
        create_session(tmp_path / "id.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_cuda_export_refuses_the_fused_fp32_graph_and_auto_avoids_it():
    """ONNX Runtime's CUDA GroupQueryAttention has no fp32 kernel: on CUDA the fused graph is refused by name
    and `auto` takes torch.onnx (the CUDA run itself is in the gpu-marked test below)."""
    from types import SimpleNamespace

    from compress_exporters.build import fused_refusal

    source = SimpleNamespace(model_type="llama", head_dim=64)
    assert fused_refusal(source, "fp32", "nbits", "cpu") is None
    assert "fp16/bf16 kernels only" in fused_refusal(source, "int4", "nbits", "cuda")


@pytest.mark.gpu
def test_cuda_export_runs_on_cuda(tmp_path, tiny):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with CUDA (CUDAExecutionProvider)")
    result = export_onnx(tiny("llama"), tmp_path / "onnx", weights="fp16", device="cuda")
    assert "CUDAExecutionProvider" in result.record["device"]["onnxruntime_providers"]
    from compress_exporters.runtime import OnnxCausalLM

    lm = OnnxCausalLM.from_dir(result.artifact, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert lm.kv_device == "cuda"  # the KV cache stays on the device between steps
    cpu = OnnxCausalLM.from_dir(result.artifact)
    assert cpu.kv_device == "cpu"
    assert lm.generate([5, 6, 7], max_new_tokens=8, stop_tokens=[]).token_ids == cpu.generate([5, 6, 7], max_new_tokens=8, stop_tokens=[]).token_ids


@pytest.mark.parametrize("N,K,group,bits,act_order,sym", [
    (64, 576, 128, 4, False, True),  # 576 = 4 x 128 + 64: a partial last block
    (64, 576, 128, 4, True, False),
    (48, 96, 32, 4, True, False),
    (32, 192, 48, 4, False, False),  # groups of 48 -> blocks of 16
    (32, 160, 32, 8, True, False),
    (32, 128, 32, 2, False, False),
])
def test_matmulnbits_layout_matches_onnxruntime(N, K, group, bits, act_order, sym):
    """Our packing (B, scales, zero points, act-order permutation) against ONNX Runtime's kernel."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    groups, maxq = -(-K // group), 2**bits - 1
    codes = rng.integers(0, maxq + 1, (N, K))
    scales = rng.uniform(0.01, 0.1, (groups, N)).astype(np.float16).astype(np.float32)
    zeros = np.full((groups, N), 2 ** (bits - 1)) if sym else rng.integers(0, maxq + 1, (groups, N))
    g_idx = np.arange(K) // group
    if act_order:
        g_idx = g_idx[np.argsort(rng.permutation(K))]
    W = scales[g_idx].T * (codes - zeros[g_idx].T)  # (N, K)
    w = matmulnbits.from_gptq(codes, scales, zeros, g_idx, bits)
    assert np.array_equal(matmulnbits.dequantize(w), W.T.astype(np.float32))
    assert (w.perm is not None) == act_order and (w.zero_points is None) == sym
    inits = [numpy_helper.from_array(w.B, "B"), numpy_helper.from_array(w.scales, "scales")]
    nodes, a = [], "A"
    if w.perm is not None:
        inits.append(numpy_helper.from_array(w.perm, "perm"))
        nodes.append(helper.make_node("Gather", ["A", "perm"], ["A_sorted"], axis=-1))
        a = "A_sorted"
    inputs = [a, "B", "scales"]
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.zero_points, "zp"))
        inputs.append("zp")
    nodes.append(helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=w.block_size))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", 1, [None, K])], [helper.make_tensor_value_info("Y", 1, [None, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    A = rng.standard_normal((5, K)).astype(np.float32)
    Y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    ref = A.astype(np.float64) @ W.T
    assert np.abs(Y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_unmappable_groups_are_refused():
    with pytest.raises(matmulnbits.UnmappableGroupsError, match="blocks of 16, 32, 64 or 128"):
        matmulnbits.from_gptq(np.zeros((8, 40), int), np.ones((2, 8)), np.zeros((2, 8), int), np.arange(40) // 20, 4)


def test_cli_export(tmp_path, tiny, capsys):
    import argparse

    from compress_exporters.cli import add_export_parser, run_export_cli

    parser = argparse.ArgumentParser(prog="compress")
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(tiny("llama")), "--output", str(tmp_path / "onnx"), "--exporter", "legacy", "--prompt", "Hello there", "--prompt", "A second prompt"])
    assert run_export_cli(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'onnx'} (fp32 from a float model" in printed and "top-1 agreement 1.000" in printed
    assert json.loads((tmp_path / "onnx" / "compress.json").read_text())["metrics"]["validation"]["prompts"] == 2


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "compress").rglob("__init__.py")}
    found |= {"compress_exporters." + ".".join(p.parent.relative_to(ROOT / "exporters").parts) if p.parent != ROOT / "exporters" else "compress_exporters" for p in (ROOT / "exporters").rglob("__init__.py")}
    assert found == listed, f"pyproject.toml [tool.setuptools] packages must list exactly {sorted(found)}"


@pytest.mark.parametrize("family,weights", [("llama", "int4"), ("gpt2", "fp32")])
def test_folder_readme_documents_the_graph_and_its_example_runs(tmp_path, tiny, family, weights):
    """The README's inputs are the graph's inputs, and its onnxruntime-only example, run as written in the
    folder, generates the tokens our runtime generates (fused graph: llama; traced graph: gpt2)."""
    import re
    import subprocess
    import sys

    import onnx

    from compress_exporters.runtime import OnnxCausalLM

    out = tmp_path / "onnx"
    export_onnx(tiny(family), out, weights=weights)
    readme = (out / "README.md").read_text()
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    for value in [*graph.input, *graph.output]:
        documented = re.sub(r"\.\d+\.", ".{i}.", value.name)
        assert f"`{documented}`" in readme, f"{value.name} is not in the folder's README"
    assert ("accuracy_level 4 (int8 activations" in readme) == (weights == "int4")  # batch-dependent numerics are said where they apply
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runtime = OnnxCausalLM.from_dir(out)
    prompt = runtime.tokenizer.encode("def fibonacci(n):").ids
    expected = runtime.decode(prompt + runtime.generate(prompt, max_new_tokens=16, stop_tokens=[]).token_ids)
    assert proc.stdout == expected + "\n"
