"""End to end on tiny models: quantize, save, reload, compare; bad input fails before long work."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compress.artifacts import ArtifactExistsError, read_record
from compress.quantize.calibrate import quantize_blocks
from compress.quantize.gptq_checkpoint import GPTQLinear, load_gptq
from compress.quantize.grid import QuantGrid
from compress.quantize.stage import QuantizeError, calibration_blocks, run_quantize
from compress.recipe import validate_recipe


def make_recipe(tmp_path, text_files, **quantize):
    q = {"method": "gptq", "bits": 4, "group_size": 32, "calib": {"source": str(text_files["train"]), "samples": 16, "seq_len": 32}}
    q.update(quantize)
    if q["method"] != "gptq":
        q.pop("calib")
    if q["method"].startswith("bnb"):
        q.pop("bits"), q.pop("group_size")
    return validate_recipe({
        "data": {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 1024, "cache_dir": str(tmp_path / "cache")},
        "quantize": q,
    })


@pytest.mark.parametrize("act_order,sym", [(False, True), (True, True), (True, False)], ids=["sym", "sym-act_order", "asym-act_order"])
def test_gptq_end_to_end_reloads_and_matches_fake_quant(tmp_path, wide_llama, text_files, act_order, sym):
    recipe = make_recipe(tmp_path, text_files, act_order=act_order, sym=sym)
    result = run_quantize(recipe, str(wide_llama), tmp_path / "q", progress=False)

    # The fake-quantized model (weights replaced in memory) is what the checkpoint must reproduce.
    model = AutoModelForCausalLM.from_pretrained(wide_llama).eval()
    from transformers import AutoTokenizer

    calib, _ = calibration_blocks(recipe, recipe.quantize, AutoTokenizer.from_pretrained(wide_llama))
    spec = recipe.quantize
    quantize_blocks(model, calib, QuantGrid(4, sym), method="gptq", group_size=32, skip=("lm_head",), act_order=act_order, scale_search=spec.scale_search, forward_dtype=spec.forward_dtype, true_sequential=spec.true_sequential)
    reloaded = load_gptq(result.artifact)
    assert sum(isinstance(m, GPTQLinear) for m in reloaded.modules()) == 4 * 7
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)

    record = read_record(result.artifact)
    m = record["metrics"]
    assert record["stage"] == "quantize" and m["method"] == "gptq"
    assert m["size_after_bytes"] < m["size_before_bytes"]
    assert m["ppl_after"] > 0 and abs(m["ppl_increase"]) < 0.5
    assert {i["role"] for i in record["inputs"]} == {"model", "calibration"}
    assert len(record["layers"]) == 28 and all(l["output_error"] is not None for l in record["layers"])
    config = json.loads((result.artifact / "config.json").read_text())
    assert config["quantization_config"]["desc_act"] is act_order and config["quantization_config"]["bits"] == 4
    # asymmetric zeros are stored as they are (gptq_v2): v1's zero - 1 cannot hold a zero of 0
    assert config["quantization_config"]["checkpoint_format"] == config["quantization_config"]["format"] == ("gptq" if sym else "gptq_v2")
    with safe_open(str(result.artifact / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in keys and "model.layers.0.self_attn.q_proj.weight" not in keys
    assert "lm_head.weight" not in keys or not config.get("tie_word_embeddings")


def test_gptq_beats_rtn_on_held_out_text(tmp_path, wide_llama, text_files):
    gptq = run_quantize(make_recipe(tmp_path, text_files, bits=3, act_order=True), str(wide_llama), tmp_path / "g", progress=False).metrics
    rtn = run_quantize(make_recipe(tmp_path, text_files, method="rtn", bits=3), str(wide_llama), tmp_path / "r", progress=False).metrics
    assert gptq["ppl_before"] == rtn["ppl_before"]
    assert gptq["ppl_after"] <= rtn["ppl_after"], (gptq["ppl_after"], rtn["ppl_after"])


def test_gpt2_conv1d_layers_quantize(tmp_path, teachers, text_files):
    result = run_quantize(make_recipe(tmp_path, text_files, method="rtn", bits=8), str(teachers["gpt2"]), tmp_path / "q", progress=False)
    model = load_gptq(result.artifact)
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 4 * 4
    assert result.metrics["ppl_increase"] < 0.05


def test_bad_input_fails_before_calibration(tmp_path, teachers, wide_llama, text_files, monkeypatch):
    import compress.quantize.stage as stage

    monkeypatch.setattr(stage, "quantize_blocks", lambda *a, **k: pytest.fail("long work started"))
    with pytest.raises(QuantizeError, match=r"cannot be packed at 3 bits"):
        run_quantize(make_recipe(tmp_path, text_files, bits=3), str(teachers["llama"]), tmp_path / "a", progress=False)
    with pytest.raises(QuantizeError, match=r"group_size=256 exceeds the 64 input features"):
        run_quantize(make_recipe(tmp_path, text_files, group_size=256), str(wide_llama), tmp_path / "b", progress=False)
    with pytest.raises(QuantizeError, match=r"fewer than quantize.calib.samples x seq_len = 100000 x 32"):
        run_quantize(make_recipe(tmp_path, text_files, calib={"source": str(text_files["eval"]), "samples": 100000, "seq_len": 32}), str(wide_llama), tmp_path / "c", progress=False)
    with pytest.raises(QuantizeError, match="no Linear layers matched"):
        run_quantize(make_recipe(tmp_path, text_files, skip=["*"]), str(wide_llama), tmp_path / "d", progress=False)
    with pytest.raises(QuantizeError, match=r"quantizing the LM head \(lm_head\) is not supported"):
        run_quantize(make_recipe(tmp_path, text_files, skip=[]), str(wide_llama), tmp_path / "d", progress=False)
    (tmp_path / "e").mkdir()
    with pytest.raises(ArtifactExistsError, match="already exists"):
        run_quantize(make_recipe(tmp_path, text_files), str(wide_llama), tmp_path / "e", progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".a", ".b", ".c", ".d"))], "half-written output left behind"


def test_unsupported_architecture_is_named(tmp_path, text_files):
    from transformers import BertConfig, BertLMHeadModel

    folder = tmp_path / "bert"
    BertLMHeadModel(BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, is_decoder=True)).save_pretrained(folder)
    from compress.architectures import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'bert'"):
        run_quantize(make_recipe(tmp_path, text_files), str(folder), tmp_path / "q", progress=False)


def test_true_sequential_groups_follow_the_block(wide_llama):
    from compress.quantize.calibrate import capture_block_inputs, linear_groups, quantizable_linears
    from compress.architectures import get_blocks

    model = AutoModelForCausalLM.from_pretrained(wide_llama).eval()
    states = capture_block_inputs(model, torch.randint(0, 300, (2, 16)), batch_size=2)
    mine = {n: m for n, m in quantizable_linears(model, ("lm_head",)).items() if n.startswith("model.layers.0.")}
    with torch.no_grad():
        groups = linear_groups(get_blocks(model)[0], mine, states)
    short = [[n.rsplit(".", 1)[1] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_true_sequential_option_runs_and_is_recorded(tmp_path, wide_llama, text_files):
    result = run_quantize(make_recipe(tmp_path, text_files, true_sequential=True), str(wide_llama), tmp_path / "q", progress=False)
    config = json.loads((result.artifact / "config.json").read_text())
    assert config["quantization_config"]["true_sequential"] is True
    assert result.metrics["ppl_increase"] < 0.5


def test_bf16_calibration_forwards_give_hessians_close_to_fp32(wide_llama):
    import copy

    from compress.architectures import get_blocks
    from compress.quantize.calibrate import _block_hessians, _cast_floats, capture_block_inputs, linear_groups, quantizable_linears

    model = AutoModelForCausalLM.from_pretrained(wide_llama).eval()
    states = capture_block_inputs(model, torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0)), batch_size=4)
    block = get_blocks(model)[0]
    mine = {n: m for n, m in quantizable_linears(model, ("lm_head",)).items() if n.startswith("model.layers.0.")}
    runner = copy.deepcopy(block).to(torch.bfloat16)
    ours = {n: runner.get_submodule(n[len("model.layers.0."):]) for n in mine}
    with torch.no_grad():
        groups = linear_groups(block, mine, states)
        fp32 = _block_hessians(block, mine, groups, states)
        bf16 = _block_hessians(runner, ours, groups, [(h.bfloat16(), _cast_floats(kw, torch.bfloat16)) for h, kw in states])
    for name, (H, tokens) in fp32.items():
        assert tokens == bf16[name][1] == 8 * 32  # every calibration token reaches a dense block's Linears
        rel = float((bf16[name][0] - H).norm() / H.norm())
        assert bf16[name][0].dtype == torch.float32
        assert 0 < rel < 2e-2, f"{name}: bf16 calibration Hessian is {rel:.2e} off fp32"
        assert torch.linalg.eigvalsh(bf16[name][0].double()).min() > -1e-6 * float(H.diagonal().mean()), "H must stay positive semidefinite"


@pytest.mark.parametrize("settings", [{"forward_dtype": "bfloat16"}, {"scale_search": "mse-hessian"}, {"scale_search": "mse", "forward_dtype": "bfloat16"}])
def test_gptq_options_quantize_and_are_recorded(tmp_path, wide_llama, text_files, settings):
    result = run_quantize(make_recipe(tmp_path, text_files, act_order=True, **settings), str(wide_llama), tmp_path / "q", progress=False)
    meta = json.loads((result.artifact / "config.json").read_text())["quantization_config"]["meta"]
    for key, value in settings.items():
        assert meta[key] == value
    assert result.metrics["ppl_increase"] < 0.3


@pytest.fixture(scope="module")
def width_96(tmp_path_factory, tokenizer_dir):
    """Input widths 96 (attention, gate/up) and 192 (down): 128 and 64 divide neither/one, 32 divides both."""
    from conftest import save_tiny

    return save_tiny(tmp_path_factory.mktemp("w96") / "llama", "llama", tokenizer_dir, layers=1, hidden_size=96, intermediate_size=192, num_attention_heads=6)


def _stored_group(artifact):
    config = json.loads((artifact / "config.json").read_text())["quantization_config"]
    with safe_open(str(artifact / "model.safetensors"), "pt") as fh:
        scales = fh.get_slice("model.layers.0.self_attn.q_proj.scales").get_shape()
    return config["group_size"], scales[0]


def test_auto_group_size_divides_every_quantized_width(tmp_path, width_96, text_files, capsys):
    recipe = make_recipe(tmp_path, text_files, method="rtn", group_size="auto")
    result = run_quantize(recipe, str(width_96), tmp_path / "q", progress=False)
    assert _stored_group(result.artifact) == (32, 96 // 32)  # 64 leaves a partial group of 32 on the width-96 layers
    assert "warning" not in capsys.readouterr().out
    from compress.recipe import GPTQSpec

    assert GPTQSpec(method="gptq").group_size == "auto"


def test_an_explicit_group_size_that_leaves_partial_groups_is_kept_with_a_warning(tmp_path, width_96, text_files, capsys):
    recipe = make_recipe(tmp_path, text_files, method="rtn", group_size=64)
    result = run_quantize(recipe, str(width_96), tmp_path / "q", progress=False)
    assert _stored_group(result.artifact) == (64, 2)  # ceil(96 / 64): the last group holds 32 columns
    out = capsys.readouterr().out
    assert "quantize.group_size=64 does not divide the input width of" in out and "model.layers.0.self_attn.q_proj" in out
    assert "widths 96" in out and "vLLM" in out and "GPTQModel" in out and "group_size 32 (or auto) fits every layer" in out


def test_cli_group_size_accepts_auto(tmp_path, width_96, text_files):
    from compress.cli import main

    code = main(["quantize", str(width_96), "--method", "rtn", "--bits", "4", "--group-size", "auto", "--output", str(tmp_path / "q"), "--no-progress",
                 "--set", f"data.eval={text_files['eval']}", "--set", "data.seq_len=32", "--set", "data.max_eval_tokens=256", "--set", f"data.cache_dir={tmp_path / 'c'}"])
    assert code == 0
    assert _stored_group(tmp_path / "q") == (32, 3)


@pytest.mark.gpu
def test_gptq_on_cuda_leaves_each_finished_layer_on_the_cpu(wide_llama, text_files):
    """Issue 15: the codes and dequantized weights of finished layers go to host memory as each layer ends."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(wide_llama).eval().to("cuda")
    ids = AutoTokenizer.from_pretrained(wide_llama)(text_files["train"].read_text())["input_ids"][: 8 * 32]
    calib = torch.tensor(ids).view(8, 32).to("cuda")
    results, _ = quantize_blocks(model, calib, QuantGrid(4, True), method="gptq", group_size=32, skip=("lm_head",))
    assert results and all(t.device.type == "cpu" for r in results.values() for t in (r.Q, r.codes, r.scales, r.zeros, r.g_idx))
    assert next(model.parameters()).device.type == "cuda"


def _numbered_corpus(path, count=120):
    """Documents whose words name them: doc-17 is 'alpha17 beta17 ...', so a block's text tells where it came from."""
    path.write_text("".join(json.dumps({"text": " ".join(f"{w}{i}" for w in ("alpha", "beta", "gamma", "delta", "omega") * 6)}) + "\n" for i in range(count)))
    return path


def test_sample_documents_is_a_seeded_bounded_sample_in_corpus_order(tmp_path):
    from compress.data import read_texts, sample_documents

    source = _numbered_corpus(tmp_path / "docs.jsonl")
    texts = list(read_texts(source))
    total = sum(map(len, texts))
    picked, count = sample_documents(str(source), "text", max_chars=total // 4, seed=0)
    assert count == len(texts) and 0 < len(picked) < len(texts) // 2
    assert sum(map(len, picked)) <= total // 4
    order = [texts.index(t) for t in picked]
    assert order == sorted(order)  # the source's order, not the sampling keys'
    assert order != list(range(len(picked)))  # not simply the first documents
    assert sample_documents(str(source), "text", max_chars=total // 4, seed=0)[0] == picked
    assert sample_documents(str(source), "text", max_chars=total // 4, seed=1)[0] != picked
    assert sample_documents(str(source), "text", max_chars=total, seed=0) == (None, len(texts))  # small enough: tokenize it whole


def test_calibration_tokenizes_only_the_sampled_documents_of_a_large_source(tmp_path, wide_llama, monkeypatch):
    from transformers import AutoTokenizer

    import compress.data as data
    from compress.data import pack, packed_blocks, read_texts

    source = _numbered_corpus(tmp_path / "docs.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(wide_llama)
    texts = list(read_texts(source))
    files = {"train": source, "eval": source}
    tokenized = []
    real_rows = data._packed_rows

    def counting_rows(docs, *args):
        def seen():
            for text in docs:
                tokenized.append(text)
                yield text
        return real_rows(seen(), *args)

    monkeypatch.setattr(data, "_packed_rows", counting_rows)
    budget = sum(map(len, texts)) // 3
    recipe = make_recipe(tmp_path, files, calib={"source": str(source), "samples": 4, "seq_len": 32, "max_chars": budget})
    facts = {}
    calib, _ = calibration_blocks(recipe, recipe.quantize, tokenizer, facts)
    assert facts["tokenized"] == "sampled documents" and facts["documents"] == len(texts)
    assert 0 < len(tokenized) == facts["sampled_documents"] < len(texts) / 2  # nothing else was tokenized
    picked = {texts.index(t) for t in tokenized}
    # Every drawn block is text of the sampled documents only.
    for row in calib:
        words = tokenizer.decode(row).split()[1:-1]  # a block may cut a word at either end
        named = {int(w[len(p):]) for w in words for p in ("alpha", "beta", "gamma", "delta", "omega") if w.startswith(p) and w[len(p):].isdigit()}
        assert named and named <= picked
    # The draw is the one the whole-source path makes, over the sampled documents' blocks.
    sampled = list(tokenized)
    blocks = pack(iter(sampled), tokenizer, 32)
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(recipe.seed))[:4]
    assert torch.equal(calib, blocks[pick.sort().values])

    # Under the limit (auto: 64 M characters) the whole source is tokenized, exactly as before.
    tokenized.clear()
    whole_recipe = make_recipe(tmp_path, files, calib={"source": str(source), "samples": 4, "seq_len": 32})
    facts = {}
    whole, _ = calibration_blocks(whole_recipe, whole_recipe.quantize, tokenizer, facts)
    assert facts["tokenized"] == "whole source" and len(tokenized) == len(texts)
    every = packed_blocks(str(source), tokenizer, seq_len=32, text_field="text", max_tokens=None, cache_dir=tmp_path / "cache")
    pick = torch.randperm(len(every), generator=torch.Generator().manual_seed(whole_recipe.seed))[:4]
    assert torch.equal(whole, every[pick.sort().values])
    # ... and cached: the next calibration of that source tokenizes nothing, even with a small limit.
    tokenized.clear()
    facts = {}
    again, _ = calibration_blocks(recipe, recipe.quantize, tokenizer, facts)
    assert facts["tokenized"] == "cached" and not tokenized and torch.equal(again, whole)
