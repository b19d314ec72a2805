"""Run in the `gptqmodel` side virtualenv (tests/interop/setup.sh): load a GPTQ folder with GPTQModel's
default backend for the CPU, as a GPTQModel user would, and write its logits for test_interop to compare.

    python gptqmodel_forward.py GPTQ_DIR IDS.safetensors OUT.safetensors
"""
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import gptqmodel  # noqa: E402
import torch  # noqa: E402
from gptqmodel import GPTQModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main(folder: str, ids_file: str, out: str) -> None:
    ids = load_file(ids_file)["ids"]
    model = GPTQModel.load(folder, device="cpu", dtype=torch.bfloat16)  # its CPU kernels run half precision only
    layer = model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits.float()
    save_file({"logits": logits.contiguous()}, out, metadata={"gptqmodel": gptqmodel.__version__, "layer_class": type(layer).__name__})


if __name__ == "__main__":
    main(*sys.argv[1:])
