"""A torch-free app on an exported model: python -m compress_exporters.example_app ONNX_DIR "prompt" [N_TOKENS]"""
import sys

from compress_exporters.runtime import OnnxCausalLM

model_dir, prompt = sys.argv[1], sys.argv[2]
max_new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32

lm = OnnxCausalLM.from_dir(model_dir, threads=2)
for piece in lm.stream(prompt, max_new_tokens=max_new_tokens):
    print(piece, end="", flush=True)
print()
print(lm.generate(prompt, max_new_tokens=8).token_ids)
