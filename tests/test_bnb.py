"""bitsandbytes through transformers: quantize, save, reload with from_pretrained, outputs stay close."""
import importlib.util

import pytest
import torch
from test_quantize import make_recipe
from transformers import AutoModelForCausalLM

from compress.artifacts import read_record
from compress.quantize.bnb import BnbUnavailableError
from compress.quantize.stage import run_quantize

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed (pip install 'compress-llm[bnb]')")


@needs_bnb
@pytest.mark.parametrize("method,bound", [("bnb-int8", 0.05), ("bnb-nf4", 0.25), ("bnb-fp4", 0.35)])
def test_bnb_round_trip(tmp_path, wide_llama, text_files, method, bound):
    result = run_quantize(make_recipe(tmp_path, text_files, method=method), str(wide_llama), tmp_path / "q", progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(result.artifact, device_map={"": "cpu"}).eval()
    assert reloaded.config.quantization_config.quant_method == "bitsandbytes"
    float_model = AutoModelForCausalLM.from_pretrained(wide_llama).eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        a, b = reloaded(ids).logits.float(), float_model(ids).logits
    rel = ((a - b).norm() / b.norm()).item()
    assert 0 < rel < bound, rel  # quantized (not silently float) and close
    m = read_record(result.artifact)["metrics"]
    assert m["method"] == method and m["size_after_bytes"] < m["size_before_bytes"]


def test_missing_bitsandbytes_is_a_clear_error(tmp_path, wide_llama, text_files, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(BnbUnavailableError, match=r"pip install 'compress-llm\[bnb\]'"):
        run_quantize(make_recipe(tmp_path, text_files, method="bnb-nf4"), str(wide_llama), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
