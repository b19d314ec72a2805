"""Run in the tf4 side virtualenv (tests/interop/setup.sh): greedy generation from an ONNX folder written by
`compress export`, the way apps built on optimum-onnx and on onnxruntime-genai run it, one prompt at a time
and all prompts in one left-padded batch.

    python ort_generate.py ONNX_DIR PROMPTS.json NEW_TOKENS OUT.json

PROMPTS.json holds "padded" (token-id lists of different lengths) and "equal" (lists of one length).
OUT.json maps "optimum-single", "optimum-batch", "genai-single", "genai-batch" (the padded prompts) and
"genai-batch-equal" to one list of new tokens per prompt (up to and with the first EOS), "optimum-batch-last-logits" to the last position's logits of
each row of the batch (one forward, no cache), plus the peers' versions.
"""
import json
import sys
from importlib.metadata import version

import numpy as np


def optimum_tokens(folder: str, prompts: list[list[int]], new: int, pad: int) -> tuple[list, list]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False, provider="CPUExecutionProvider")

    def generate(batch: list[list[int]]) -> list[list[int]]:
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
        return out[:, width:].tolist()

    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        last = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1].float().tolist()
    return [generate([p])[0] for p in prompts], generate(prompts), last


def genai_tokens(folder: str, prompts: list[list[int]], new: int, pad: int) -> tuple[list, list]:
    import onnxruntime_genai as og

    model = og.Model(og.Config(folder))

    def generate(batch: list[list[int]]) -> list[list[int]]:
        width = max(map(len, batch))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=width + new, do_sample=False, batch_size=len(batch))
        generator = og.Generator(model, params)
        # onnxruntime-genai takes a padded (batch, width) array and masks the pad id it reads from genai_config,
        # padded on the right as its Tokenizer.encode_batch does: it masks trailing pad ids only (a left pad
        # reads as a token to it, whatever the model) and takes each row's logits at its last real token
        generator.append_tokens(np.asarray([p + [pad] * (width - len(p)) for p in batch], np.int32))
        rows: list[list[int]] = [[] for _ in batch]
        while not generator.is_done():
            generator.generate_next_token()
            for row, token in zip(rows, generator.get_next_tokens()):
                row.append(int(token))
        return rows

    return [generate([p])[0] for p in prompts], generate(prompts), generate


def main(folder: str, prompts_file: str, new: str, out: str) -> None:
    given = json.loads(open(prompts_file).read())
    prompts = given["padded"]
    genai = json.loads(open(f"{folder}/genai_config.json").read())
    pad = int(genai["model"]["pad_token_id"])
    result = {"optimum-onnx": version("optimum-onnx"), "onnxruntime-genai": version("onnxruntime-genai"), "onnxruntime": version("onnxruntime"),
              "transformers": version("transformers"), "pad_token_id": pad}
    result["optimum-single"], result["optimum-batch"], result["optimum-batch-last-logits"] = optimum_tokens(folder, prompts, int(new), pad)
    result["genai-single"], result["genai-batch"], generate = genai_tokens(folder, prompts, int(new), pad)
    result["genai-batch-equal"] = generate(given["equal"])
    eos = genai["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    for way in ("optimum-single", "optimum-batch", "genai-single", "genai-batch", "genai-batch-equal"):
        result[way] = [until_eos(row, eos) for row in result[way]]
    open(out, "w").write(json.dumps(result))


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The tokens up to and with the first EOS (a batch pads the rows that ended)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


if __name__ == "__main__":
    main(*sys.argv[1:])
