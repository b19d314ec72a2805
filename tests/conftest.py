"""Shared fixtures: a tiny BPE tokenizer, tiny teachers of three families saved as HF folders, small text."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from compress.corpus import builtin_path  # noqa: E402

VOCAB = 384


def corpus_texts(split: str = "pydocs/eval", limit_chars: int = 200_000) -> list[str]:
    out, total = [], 0
    with gzip.open(builtin_path(split), "rt") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            out.append(text)
            total += len(text)
            if total >= limit_chars:
                break
    return out


_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# One tiny config per family in compress.architectures.TESTED_FAMILIES (test_architectures checks the two agree).
TINY = {
    "llama": dict(_LLAMA_LIKE, tie_word_embeddings=True),
    "mistral": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE, tie_word_embeddings=False),
    "qwen3": dict(_LLAMA_LIKE, head_dim=8),
    "gpt2": dict(n_embd=32, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=256),
    "opt": dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32, dropout=0.0),
    # Soft-capped attention and final logits, (1 + w) RMSNorms, pre/post feed-forward norms, scaled embeddings;
    # hybrid sliding (window 16, shorter than the 32-token windows the tests use) and global layers.
    "gemma2": dict(_LLAMA_LIKE, head_dim=8, sliding_window=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=8),
    # q/k norms, hybrid layers with two rotary bases (local 10k, global 1M).
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=8, sliding_window=16, sliding_window_pattern=2, rope_local_base_freq=10000.0),
    # Fused qkv_proj and gate_up_proj.
    "phi3": dict(_LLAMA_LIKE, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    # Mixture of experts: 4 experts, 2 per token, every expert in one 3-D tensor (transformers 5).
    "qwen3_moe": dict(_LLAMA_LIKE, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}
FAMILIES = tuple(TINY)
# The families the issue names; the others run the same code through the same table.
MAIN_FAMILIES = ("llama", "qwen2", "gpt2")


def tiny_config(family: str, vocab: int = VOCAB, layers: int = 4, **overrides):
    from transformers import AutoConfig

    count = "n_layer" if family == "gpt2" else "num_hidden_layers"
    return AutoConfig.for_model(family, vocab_size=vocab, **{count: layers}, **{**TINY[family], **overrides})


def _train_tokenizer(out: Path, bos: str | None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", *([bos] if bos else [])]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts(), trainer)
    if bos:  # as Gemma's and Llama's tokenizers do: BOS in front of every encoded text
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", **({"bos_token": bos} if bos else {}))
    fast.save_pretrained(out)
    assert len(fast) <= VOCAB
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on the embedded corpus, saved as an HF tokenizer folder (adds no BOS, as GPT-2's)."""
    return _train_tokenizer(tmp_path_factory.mktemp("tokenizer"), bos=None)


@pytest.fixture(scope="session")
def bos_tokenizer_dir(tmp_path_factory) -> Path:
    """The same kind of tokenizer that puts a BOS token in front of every text, as Gemma's and Llama's do."""
    return _train_tokenizer(tmp_path_factory.mktemp("bos-tokenizer"), bos="<bos>")


def save_tiny(directory: Path, family: str, tokenizer_dir: Path, seed: int = 0, layers: int = 4, vocab: int = VOCAB, train_steps: int = 0, **overrides) -> Path:
    """A tiny model saved as an HF folder; `train_steps` of plain LM training give it a peaked, data-aware distribution."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab=vocab, layers=layers, **overrides))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if train_steps:
        ids = torch.tensor(tokenizer(" ".join(corpus_texts(limit_chars=20_000)))["input_ids"][: 64 * 32]).view(64, 32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(train_steps):
            batch = ids[(step * 8) % 64 : (step * 8) % 64 + 8]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def teachers(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {f: save_tiny(root / f, f, tokenizer_dir, train_steps=30) for f in FAMILIES}


@pytest.fixture(scope="session")
def wide_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama trained long enough that its blocks matter (quantization error shows in perplexity);
    widths 64/128 are multiples of every group size the quantization tests use."""
    root = tmp_path_factory.mktemp("wide")
    return save_tiny(root / "llama", "llama", tokenizer_dir, train_steps=300, hidden_size=64, intermediate_size=128, num_key_value_heads=4)


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    """Small train (.jsonl) and eval (.txt) files cut from the embedded corpus."""
    root = tmp_path_factory.mktemp("text")
    texts = corpus_texts(limit_chars=60_000)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[1:]))
    held = root / "eval.txt"
    held.write_text(texts[0][:6000])
    return {"train": train, "eval": held}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def staging_name(target: Path) -> str:
    """The name compress.artifacts.staging_dir gives its folder for `target` in this process."""
    from compress.artifacts import staging_dir

    with pytest.raises(RuntimeError):
        with staging_dir(target, overwrite=True) as tmp:
            name = tmp.name
            raise RuntimeError
    return name


def tiny_recipe(tmp_path: Path, teacher: Path, text_files: dict[str, Path], **distill) -> dict:
    """A recipe dict for a few fast steps on a tiny teacher."""
    settings = dict(steps=6, batch_size=2, grad_accum=1, lr=3e-3, warmup_steps=1, eval_every=3, save_every=3, keep_last=2)
    settings.update(distill)
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "teacher": {"model": str(teacher)},
        "student": {"from_teacher": {"layers": 2}},
        "data": {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 512, "cache_dir": str(tmp_path / "cache")},
        "distill": settings,
    }


def gptq_tiny_llama(root: Path, tokenizer_dir: Path, text_files: dict[str, Path], **llama) -> Path:
    """A 4-bit GPTQ artifact (act-order, groups of 64) of a 2-layer tiny Llama with the given widths: with widths
    of 96/192 the groups are scattered over the columns and each row's last group is partial (96 = 64 + 32),
    like 576 with groups of 128."""
    from compress.quantize.stage import run_quantize
    from compress.recipe import validate_recipe

    saved = TINY["llama"]
    TINY["llama"] = dict(saved, **llama)
    try:
        float_dir = save_tiny(root / "float", "llama", tokenizer_dir, layers=2, train_steps=30)
    finally:
        TINY["llama"] = saved
    recipe = validate_recipe({
        "data": {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 256, "cache_dir": str(root / "cache")},
        "quantize": {"method": "gptq", "bits": 4, "group_size": 64, "act_order": True, "calib": {"source": str(text_files["train"]), "samples": 16, "seq_len": 32}},
    })
    return run_quantize(recipe, str(float_dir), root / "gptq", progress=False).artifact


def genai_greedy(folder: Path, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai's own runtime on an exported folder (the caller skips where it is
    not installed)."""
    import onnxruntime_genai as og

    model = og.Model(og.Config(str(folder)))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need a CUDA device: skipped with that reason where torch sees none, so they are told
    apart from tests that break."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
