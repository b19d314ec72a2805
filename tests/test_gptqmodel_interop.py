"""Interop: a GPTQ folder written by `run_quantize` loads in GPTQModel (the maintained successor of
auto-gptq) and computes what our own loader computes.

GPTQModel's CPU layer (TorchLinear, backend TORCH) runs only float16/bfloat16, so its logits are compared
with our loader in the same dtype and, with a tolerance for half-precision compute, in float32; its
dequantized weights are compared with `GPTQLinear.dequantized_weight()` (bit-exact in float16).
Skipped where gptqmodel is not installed (it is not a dependency of this project).
"""
import os

import pytest
import torch

# GPTQModel sizes its CPU thread pool from this when it is imported; it writes ./logs into the cwd.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
gptqmodel = pytest.importorskip(
    "gptqmodel",
    reason="gptqmodel is not installed: the GPTQModel interop test needs `pip install torch==<installed> 'gptqmodel==7.6.*'`",
    exc_type=ImportError,
)


from compress.quantize.gptq_checkpoint import GPTQLinear, load_gptq  # noqa: E402
from compress.quantize.stage import run_quantize  # noqa: E402
from compress.recipe import validate_recipe  # noqa: E402

N_QUANTIZED = 4 * 7  # 4 decoder layers x (q, k, v, o, gate, up, down); lm_head stays float


@pytest.fixture(scope="module", params=[False, True], ids=["act_order=False", "act_order=True"])
def gptq_folder(request, tmp_path_factory, wide_llama, text_files):
    """Our GPTQ checkpoint of `wide_llama`: 4 bits, group 32, symmetric."""
    tmp = tmp_path_factory.mktemp("gptq")
    recipe = validate_recipe({
        "data": {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 1024, "cache_dir": str(tmp / "cache")},
        "quantize": {
            "method": "gptq", "bits": 4, "group_size": 32, "sym": True, "act_order": request.param,
            "calib": {"source": str(text_files["train"]), "samples": 16, "seq_len": 32},
        },
    })
    return run_quantize(recipe, str(wide_llama), tmp / "q", progress=False).artifact


# (dtype, max |logit diff| vs our loader in the same dtype, vs our loader in float32), as fractions of max |logit|.
# Measured on this model (GPTQModel 7.6.0, torch 2.13 CPU): fp16 0 / 0.005, bf16 0.02 / 0.027. bf16 differs
# from ours in the same dtype because GPTQModel casts the fp16 scales to bf16 before multiplying (two roundings).
TOLERANCES = {torch.float16: (0.005, 0.02), torch.bfloat16: (0.05, 0.08)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gptqmodel_loads_our_checkpoint(gptq_folder, dtype, tmp_path, monkeypatch):
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    monkeypatch.chdir(tmp_path)  # GPTQModel writes ./logs
    qmodel = GPTQModel.load(str(gptq_folder), device="cpu", backend=BACKEND.TORCH, dtype=dtype)
    theirs_model = qmodel.model.eval()
    layers = {n: m for n, m in theirs_model.named_modules() if isinstance(m, BaseQuantLinear)}
    assert len(layers) == N_QUANTIZED, sorted(layers)
    assert {type(m).__name__ for m in layers.values()} == {"TorchLinear"}
    # The head is tied to the embedding (our checkpoint drops lm_head.weight): GPTQModel must re-tie it.
    assert theirs_model.lm_head.weight.data_ptr() == theirs_model.model.embed_tokens.weight.data_ptr()

    ours32 = load_gptq(gptq_folder)
    ours_same = load_gptq(gptq_folder, dtype=dtype)
    assert sum(isinstance(m, GPTQLinear) for m in ours32.modules()) == N_QUANTIZED

    # Weights: GPTQModel's dequantization of every quantized layer against ours.
    for name, layer in layers.items():
        mine = ours32.get_submodule(name)
        assert torch.equal(layer.qweight, mine.qweight), name
        assert torch.equal(layer.g_idx.to(torch.int32), mine.g_idx), name
        theirs_w = layer.dequantize_weight().T.float()  # GPTQModel returns (in, out) in the scales' dtype
        if dtype == torch.float16:
            # Same packed codes/zeros/scales, one fp16 rounding of scale * (code - zero) on both sides.
            assert torch.equal(theirs_w, mine.dequantized_weight(torch.float16).float()), name
        else:
            # bf16: GPTQModel rounds the fp16 scale to bf16, then the product: within 2 bf16 roundings.
            torch.testing.assert_close(theirs_w, mine.dequantized_weight(torch.float32), rtol=2**-7, atol=0, msg=name)

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits.float()
        same = ours_same(input_ids=ids).logits.float()
        ref = ours32(input_ids=ids).logits
    scale = ref.abs().max().item()
    tol_same, tol_fp32 = TOLERANCES[dtype]
    diff_same = (theirs - same).abs().max().item()
    diff_fp32 = (theirs - ref).abs().max().item()
    assert diff_same <= tol_same * scale, f"GPTQModel vs our loader in {dtype}: max |diff| {diff_same:.4g} (max |logit| {scale:.3g})"
    assert diff_fp32 <= tol_fp32 * scale, f"GPTQModel {dtype} vs our loader in float32: max |diff| {diff_fp32:.4g} (max |logit| {scale:.3g})"
    agree = (theirs.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"top-1 agreement with our float32 loader {agree:.2f}"
