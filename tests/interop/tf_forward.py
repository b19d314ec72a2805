"""Run in a side virtualenv holding another transformers (tests/interop/setup.sh builds them): load a model
folder the way a user of that version would, and write what it computes for test_interop to compare.

    python tf_forward.py MODEL_DIR TEXT_FILE OUT.safetensors

OUT holds the logits of the tokenized text and the token ids; its metadata records the transformers version,
the tokenizer class that loaded and the RoPE base the config resolved to.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def rope_base(config) -> float | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    value = getattr(config, "rope_theta", None)
    return None if value is None else float(value)


def main(model_dir: str, text_file: str, out: str) -> None:
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = tokenizer(Path(text_file).read_text(), return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    meta = {"transformers": transformers.__version__, "tokenizer_class": type(tokenizer).__name__, "rope_theta": json.dumps(rope_base(config)),
            "use_cache": json.dumps(bool(model.config.use_cache))}
    save_file({"logits": logits.contiguous(), "ids": ids.contiguous()}, out, metadata=meta)


if __name__ == "__main__":
    main(*sys.argv[1:])
