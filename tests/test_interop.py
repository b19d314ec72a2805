"""Our artifacts load as the same model in the transformers a user already has.

The side virtualenvs come from tests/interop/setup.sh (CI builds them and sets COMPRESS_INTEROP_REQUIRED=1,
so a missing one fails there; elsewhere those tests are skipped with the command that builds them). The
portable-config tests at the top need no side virtualenv.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_recipe
from safetensors import safe_open

from compress import models
from compress.artifacts import ArtifactRecord, write_artifact
from compress.portable import portable_config, portable_tokenizer_config

ROOT = Path(__file__).parents[1]
INTEROP = Path(os.environ.get("COMPRESS_INTEROP_DIR", ROOT / ".venv-interop"))
SCRIPT = ROOT / "tests" / "interop" / "tf_forward.py"
ROPE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox")


def side_python(name: str) -> Path:
    python = INTEROP / name / "bin" / "python"
    if not python.is_file():
        message = f"interop virtualenv {name} is missing ({python}); build it with: bash tests/interop/setup.sh"
        if os.environ.get("COMPRESS_INTEROP_REQUIRED"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def rope_overrides(family: str) -> dict:
    """A RoPE base far from every default (10000), so a loader that drops it computes another model."""
    rope = {"rope_theta": 123456.0, "rope_type": "default"}
    if family == "gpt_neox":
        rope["partial_rotary_factor"] = 0.5
    return {"rope_parameters": rope}


def save_ours(directory: Path, model, tokenizer) -> Path:
    """The way every stage writes a model folder (artifacts.write_artifact over models.save_model)."""
    record = ArtifactRecord(stage="test", recipe={}, inputs=[], metrics={}, device={})
    return write_artifact(directory, record, lambda d: models.save_model(model, tokenizer, d))


def forward_in(python: Path, folder: Path, text: Path, out: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    proc = subprocess.run([str(python), str(SCRIPT), str(folder), str(text), str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(out), "pt") as fh:
        return fh.metadata(), fh.get_tensor("logits"), fh.get_tensor("ids")


def forward_here(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# -- no side virtualenv needed ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_portable_config_spells_rope_both_ways_and_reloads_identically(tmp_path, tokenizer_dir, family):
    from transformers import AutoConfig

    folder = save_ours(tmp_path / "ours", *_tiny(tmp_path, tokenizer_dir, family))
    written = json.loads((folder / "config.json").read_text())
    assert written["rope_theta"] == 123456.0 and written["rope_scaling"] is None
    assert written["torch_dtype"] == written["dtype"] and written["use_cache"] is True
    if family == "gpt_neox":
        assert (written["rotary_emb_base"], written["rotary_pct"], written["partial_rotary_factor"]) == (123456.0, 0.5, 0.5)
    # transformers 5 reads the written file as the model it saved
    assert AutoConfig.from_pretrained(folder).rope_parameters == AutoConfig.from_pretrained(tmp_path / "plain").rope_parameters


def test_scaled_rope_keeps_its_parameters_in_rope_scaling(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    out = portable_config({"model_type": "llama", "rope_parameters": rope, "use_cache": False})
    assert out["rope_theta"] == 500000.0
    assert out["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert out["use_cache"] is True
    from transformers import LlamaConfig

    # transformers 5 gives rope_scaling priority: the two spellings must resolve to the same parameters
    (tmp_path / "config.json").write_text(json.dumps(out))
    assert LlamaConfig.from_pretrained(tmp_path).rope_parameters == rope


def test_tokenizer_config_names_a_class_both_lines_know_and_no_machine_fields(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    before = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    after = portable_tokenizer_config({**before, "tokenizer_class": "TokenizersBackend", "local_files_only": True, "is_local": True})
    assert after["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "local_files_only" not in after and "is_local" not in after
    # transformers 5 loads the renamed class as the same tokenizer
    for name in ("tokenizer.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(after))
    text = "def f(x):\n    return x ** 2  # squares"
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == AutoTokenizer.from_pretrained(tokenizer_dir)(text)["input_ids"]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_gptq_config_is_accepted_by_transformers_gptq_config(tmp_path, tokenizer_dir, text_files, method):
    """transformers' GPTQConfig (which optimum and GPTQModel mirror) refuses damp_percent outside (0, 1): an RTN
    checkpoint wrote 0.0 and could not be loaded through transformers at all. Both format keys are written."""
    import warnings

    from transformers import GPTQConfig

    from compress.quantize.stage import run_quantize
    from compress.recipe import validate_recipe

    teacher = save_tiny(tmp_path / "float", "llama", tokenizer_dir, layers=2)
    recipe = validate_recipe({
        "data": {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 128, "cache_dir": str(tmp_path / "cache")},
        "quantize": {"method": method, "bits": 4, **({"calib": {"source": str(text_files["train"]), "samples": 4, "seq_len": 32}} if method == "gptq" else {})},
    })
    folder = run_quantize(recipe, str(teacher), tmp_path / "q", progress=False).artifact
    written = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert written["format"] == written["checkpoint_format"] == "gptq" and written["act_group_aware"] is False
    assert ("damp_percent" in written) == (method == "gptq")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = GPTQConfig.from_dict(dict(written))
    assert (config.bits, config.group_size, config.sym) == (written["bits"], written["group_size"], written["sym"])
    assert not [w for w in caught if "act_group_aware" in str(w.message)]


def _tiny(tmp_path: Path, tokenizer_dir: Path, family: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = save_tiny(tmp_path / "plain", family, tokenizer_dir, layers=2, **rope_overrides(family))
    return AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32), AutoTokenizer.from_pretrained(plain)


# -- transformers 4.57 in its side virtualenv ------------------------------------------------------------------

@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_transformers_4_reads_our_model_folder_as_the_same_model(tmp_path, tokenizer_dir, text_files, family):
    python = side_python("tf4")
    folder = save_ours(tmp_path / "ours", *_tiny(tmp_path, tokenizer_dir, family))
    meta, logits, ids = forward_in(python, folder, text_files["eval"], tmp_path / "tf4.safetensors")
    assert meta["transformers"].startswith("4.")
    assert json.loads(meta["rope_theta"]) == 123456.0, "transformers 4 resolved another RoPE base"
    assert json.loads(meta["use_cache"]) is True
    from transformers import AutoTokenizer

    assert ids[0].tolist() == AutoTokenizer.from_pretrained(folder)(text_files["eval"].read_text())["input_ids"][:64]
    torch.testing.assert_close(logits, forward_here(folder, ids), rtol=1e-4, atol=1e-4)


def test_transformers_4_loads_a_distilled_student(tmp_path, tokenizer_dir, text_files):
    """The distill stage's own artifact (trained with use_cache off), not only the shared writer."""
    from compress.distill.loop import run_distill
    from compress.recipe import validate_recipe

    python = side_python("tf4")
    teacher = save_tiny(tmp_path / "teacher", "llama", tokenizer_dir, layers=2, **rope_overrides("llama"))
    recipe = tiny_recipe(tmp_path, teacher, text_files, steps=2, eval_every=2, save_every=2)
    result = run_distill(validate_recipe(recipe), progress=False)
    meta, logits, ids = forward_in(python, result.artifact, text_files["eval"], tmp_path / "tf4.safetensors")
    assert json.loads(meta["rope_theta"]) == 123456.0 and json.loads(meta["use_cache"]) is True
    torch.testing.assert_close(logits, forward_here(result.artifact, ids), rtol=1e-4, atol=1e-4)


# -- GPTQModel 7.6 in its side virtualenv ------------------------------------------------------------------------

@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_gptqmodel_loads_our_gptq_folder_with_its_default_backend(tmp_path, tokenizer_dir, text_files, sym):
    """group_size auto (the default) picks a group that divides every width (96 and 192 here: 32), so GPTQModel's
    default CPU kernel (torch int4pack, which refuses a partial group) loads the folder; it computes our
    loader's logits within bf16 rounding. Asymmetric grids are written as gptq_v2 (true zeros): GPTQModel
    refused the v1 asym folder we used to write ("Loading of a sym=False model with format=FORMAT.GPTQ is only
    supported if produced by gptqmodel version >= 0.9.0")."""
    from safetensors.torch import load_file, save_file

    from compress.quantize.stage import run_quantize
    from compress.recipe import validate_recipe

    python = side_python("gptqmodel")
    teacher = save_tiny(tmp_path / "float", "llama", tokenizer_dir, layers=2, train_steps=20, hidden_size=96, intermediate_size=192, num_attention_heads=6)
    recipe = validate_recipe({
        "data": {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 256, "cache_dir": str(tmp_path / "cache")},
        "quantize": {"method": "gptq", "bits": 4, "act_order": True, "sym": sym, "calib": {"source": str(text_files["train"]), "samples": 8, "seq_len": 32}},
    })
    folder = run_quantize(recipe, str(teacher), tmp_path / "gptq", progress=False).artifact
    written = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert written["group_size"] == 32 and written["checkpoint_format"] == written["format"] == ("gptq" if sym else "gptq_v2")
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(folder)(text_files["eval"].read_text())["input_ids"][:48]])
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    proc = subprocess.run([str(python), str(ROOT / "tests" / "interop" / "gptqmodel_forward.py"), str(folder), str(tmp_path / "ids.safetensors"), str(tmp_path / "gm.safetensors")],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(tmp_path / "gm.safetensors"), "pt") as fh:
        meta, theirs = fh.metadata(), fh.get_tensor("logits")
    assert meta["gptqmodel"].startswith("7.6") and meta["layer_class"] != "TorchLinear"  # not the slow fallback
    with torch.no_grad():
        ours = models.load_quantized(folder)(input_ids=ids).logits.float()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.95
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0.05 * float(ours.abs().max()))


# -- optimum-onnx and onnxruntime-genai (the tf4 side virtualenv) ----------------------------------------------

# Token-id prompts of different lengths (left padding in a batch), none holding the pad id.
GENERATE_PROMPTS = [[5, 17, 101, 7, 9, 250, 3, 8, 9, 10, 44, 61, 12], [3, 4], [7, 8, 9, 11, 12, 13], [99, 150, 200, 31]]
EQUAL_PROMPTS = [[5, 17, 101, 7, 9, 250], [3, 4, 5, 6, 7, 8], [7, 8, 9, 11, 12, 13], [99, 150, 200, 31, 32, 33]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def onnx_folders(tmp_path_factory, tokenizer_dir, text_files):
    """An fp32 folder and a GPTQ int4 folder (export defaults) of one tiny Llama (fused graph). Random weights
    ten times the usual scale: peaked logits whose greedy tokens change with the context (a briefly trained toy
    repeats one frequent token, which would hide a misread cache or mask)."""
    from compress.quantize.stage import run_quantize
    from compress.recipe import validate_recipe
    from compress_exporters.onnx import export_onnx

    root = tmp_path_factory.mktemp("ort-interop")
    float_dir = save_tiny(root / "float", "llama", tokenizer_dir, layers=2, hidden_size=64, intermediate_size=128, initializer_range=0.2)
    recipe = validate_recipe({
        "data": {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 256, "cache_dir": str(root / "cache")},
        "quantize": {"method": "gptq", "bits": 4, "act_order": True, "calib": {"source": str(text_files["train"]), "samples": 16, "seq_len": 32}},
    })
    gptq = run_quantize(recipe, str(float_dir), root / "gptq", progress=False).artifact
    return {"fp32": export_onnx(float_dir, root / "onnx-fp32").artifact, "int4-gptq": export_onnx(gptq, root / "onnx-int4", weights="int4").artifact}


@pytest.fixture(scope="module")
def peer_tokens(tmp_path_factory, onnx_folders):
    """Per folder: our runtime's greedy tokens, and what tests/interop/ort_generate.py got from optimum-onnx and
    onnxruntime-genai in the tf4 side virtualenv."""
    from compress_exporters.runtime import OnnxCausalLM

    python = side_python("tf4")
    out = {}
    for kind, folder in onnx_folders.items():
        work = tmp_path_factory.mktemp(f"peers-{kind}")
        lm = OnnxCausalLM.from_dir(folder)
        ours = {name: [lm.generate(p, max_new_tokens=NEW_TOKENS).token_ids for p in prompts] for name, prompts in (("padded", GENERATE_PROMPTS), ("equal", EQUAL_PROMPTS))}
        (work / "prompts.json").write_text(json.dumps({"padded": GENERATE_PROMPTS, "equal": EQUAL_PROMPTS}))
        proc = subprocess.run([str(python), str(ROOT / "tests" / "interop" / "ort_generate.py"), str(folder), str(work / "prompts.json"), str(NEW_TOKENS), str(work / "out.json")],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "appears in graph inputs" not in proc.stderr
        out[kind] = (lm, ours, json.loads((work / "out.json").read_text()))
    return out


@pytest.mark.parametrize("kind", ["fp32", "int4-gptq"])
def test_optimum_and_onnxruntime_genai_generate_our_tokens(peer_tokens, onnx_folders, kind):
    """optimum-onnx's ORTModelForCausalLM (one prompt at a time and in one left-padded batch) and
    onnxruntime-genai (one at a time, and a batch of equal lengths) load our folder and, greedy, produce the
    tokens of our runtime; optimum's batched logits equal our single-prompt runs."""
    import numpy as np


    lm, ours, theirs = peer_tokens[kind]
    assert theirs["optimum-onnx"].startswith("0.1") and theirs["onnxruntime-genai"].startswith("0.18")
    assert all(p.count(theirs["pad_token_id"]) == 0 for p in GENERATE_PROMPTS + EQUAL_PROMPTS)
    assert sum(len(set(tokens)) for tokens in ours["padded"]) >= 12, ours  # tokens that depend on the context
    for way, prompts in (("optimum-single", "padded"), ("optimum-batch", "padded"), ("genai-single", "padded"), ("genai-batch-equal", "equal")):
        assert theirs[way] == ours[prompts], f"{way} differs from our runtime: {theirs[way]} vs {ours[prompts]}"
    # optimum's logits of the left-padded batch (no cache): each row's last position equals our single-prompt run
    for prompt, row in zip(GENERATE_PROMPTS, theirs["optimum-batch-last-logits"]):
        np.testing.assert_allclose(np.asarray(row, np.float32), lm.forward([prompt], every_position=True)[0][0, -1], rtol=0, atol=1e-4 if kind == "fp32" else 0.05)


@pytest.mark.parametrize("kind", ["fp32", "int4-gptq"])
def test_onnxruntime_genai_batch_of_unequal_prompts(peer_tokens, kind):
    """onnxruntime-genai pads a batch on the right and relies on GroupQueryAttention's per-row seqlens_k; the
    graph used to declare every row full (the left-padding convention of optimum), so the rows' positions
    shifted by their padding after the first token. It now derives seqlens_k from the mask for both."""
    _, ours, theirs = peer_tokens[kind]
    assert theirs["genai-batch"] == ours["padded"]
