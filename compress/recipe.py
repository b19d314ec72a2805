"""The recipe: one YAML file validated into frozen, typed specs before any model loads.

`load_recipe(path, overrides)` is the only entry point; stages receive the specs, never YAML.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from compress.distill.losses import DIVERGENCES
from compress.errors import CompressError


class RecipeError(CompressError, ValueError):
    """A recipe that cannot be used; the message names the file and the key path."""


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogitsCacheSpec(Spec):
    enabled: StrictBool = Field(
        False,
        description="Distil from stored teacher outputs: the teacher runs once over every training block (cap them with `data.max_train_tokens`) and its top-k log-probabilities, plus its final hidden states on the eval blocks and its lm_head for exact eval metrics, go to a cache keyed by teacher, tokenizer, data, seq_len, temperature, top_k and logprob_dtype. Runs that find a complete cache never load the teacher model (`student.from_teacher` reads the kept layers from its safetensors files). The loss becomes the sparse (top-k + tail bucket) form of `distill.loss.kind`, never above the full-vocabulary one (README: Offline teacher logits). Not with `distill.hidden`.",
    )
    top_k: int = Field(64, ge=1, description="Teacher tokens stored per position (log-prob and token id each), plus one tail bucket holding the rest of its probability mass. Bytes per position: top_k x (logprob bytes + index bytes) + 4, index bytes 2 for vocabularies up to 65536, else 4.")
    logprob_dtype: Literal["float16", "float32"] = Field("float16", description="Storage of the top-k log-probabilities (2 or 4 bytes each); the tail bucket is always float32.")
    dir: str | None = Field(None, description="Folder holding the caches, one subfolder per key (default: $COMPRESS_CACHE/logits, else ~/.cache/compress/logits).")
    shard_blocks: int = Field(64, ge=1, description="Training blocks per shard file. Shards are written atomically; a killed caching run resumes after its last complete shard. Only the layout: not part of the key.")


class TeacherSpec(Spec):
    model: str = Field(
        "builtin:smollm2-135m",
        description="Local HF folder, hub id, or `builtin:smollm2-135m` (the embedded SmolLM2-135M-Instruct).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); ignored for local folders.")
    trust_remote_code: StrictBool = Field(False, description="Allow the model's own Python code from the hub. Off unless you trust it.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype the teacher is loaded in.")
    logits_cache: LogitsCacheSpec = Field(default_factory=LogitsCacheSpec, description="Offline teacher logits (off by default).")


class FromTeacherSpec(Spec):
    layers: int | list[int] = Field(
        ...,
        description="Teacher layers the student keeps: a count (evenly spaced, first and last kept) or an explicit list of indices.",
    )

    @model_validator(mode="after")
    def _check(self) -> "FromTeacherSpec":
        if isinstance(self.layers, int) and self.layers < 1:
            raise ValueError("layers must be >= 1")
        if isinstance(self.layers, list):
            if not self.layers:
                raise ValueError("layers list is empty")
            if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
                raise ValueError("layers must be distinct non-negative indices")
        return self


class PruneShapeSpec(Spec):
    num_hidden_layers: int | None = Field(None, ge=1, description="Blocks kept (the highest-importance ones, in the teacher's order); null = the teacher's.")
    hidden_size: int | None = Field(None, ge=1, description="Residual (embedding) channels kept, a multiple of `multiple_of`; null = the teacher's.")
    intermediate_size: int | None = Field(None, ge=1, description="MLP channels kept in every block, a multiple of `multiple_of`; null = the teacher's.")
    num_attention_heads: int | None = Field(None, ge=1, description="Query heads kept in every block: a multiple of the kept key/value heads, at most the teacher's query heads per key/value head each; null = the teacher's.")
    num_key_value_heads: int | None = Field(None, ge=1, description="Key/value heads (whole grouped-query groups) kept; null = the teacher's, or as few as the query heads need.")


class PruneSpec(Spec):
    target_params: float | None = Field(None, gt=0, description="Parameter budget: a fraction of the teacher's parameters (below 1) or a parameter count (1 and above). Candidate shapes within `tolerance` below it are ranked by KL to the teacher right after pruning. Give this or `shape`.")
    shape: PruneShapeSpec | None = Field(None, description="An explicit student shape instead of a budget.")
    axes: list[Literal["depth", "heads", "mlp", "hidden"]] = Field(
        default_factory=lambda: ["depth", "heads", "mlp", "hidden"], min_length=1,
        description="What a budget may prune: `depth` (whole blocks, by `depth_metric`), `heads` (whole key/value groups or query heads inside each), `mlp` (MLP channels), `hidden` (residual channels of the embedding, every norm, every projection and the tied head). Width axes need a Llama-like model (llama, mistral, qwen2, qwen3).",
    )
    depth_metric: Literal["block_influence", "skip_kl"] = Field("block_influence", description="Block importance: ShortGPT's Block Influence (1 - cos(input, output) of the block), or the measured KL increase when that one block is skipped (one extra pass per block).")
    calib_samples: int = Field(64, ge=1, description="Blocks of data.train (data.seq_len tokens each) the importance scores are measured on.")
    proxy_samples: int = Field(8, ge=1, description="Further blocks of data.train on which each candidate shape's KL to the teacher is measured.")
    candidates: int = Field(8, ge=1, description="Candidate shapes scored by the KL proxy (chosen by the share of importance each keeps, one per layer count and head layout).")
    tolerance: float = Field(0.05, gt=0, lt=1, description="Candidates may fall this fraction below the budget.")
    multiple_of: int = Field(64, ge=1, description="Pruned widths (hidden, MLP) are multiples of this, so GPTQ groups and kernels tile them.")
    batch_size: int = Field(8, ge=1, description="Blocks per forward pass while measuring.")
    forward_dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="Autocast dtype of the measuring forwards (importance and the KL proxy); the pruned weights are copied exactly in the teacher's dtype. bfloat16 is several times faster on CPUs with bf16 units.")

    @model_validator(mode="after")
    def _check(self) -> "PruneSpec":
        if (self.target_params is None) == (self.shape is None):
            raise ValueError("give exactly one of target_params (a budget) or shape (explicit sizes)")
        if self.target_params is not None and self.target_params >= 1 and self.target_params != int(self.target_params):
            raise ValueError(f"target_params {self.target_params}: a fraction must be below 1, a parameter count a whole number")
        return self


class StudentSpec(Spec):
    from_teacher: FromTeacherSpec | None = Field(None, description="Build the student from a subset of the teacher's layers (embeddings, norms, lm_head copied).")
    prune: PruneSpec | None = Field(None, description="Prune the teacher by measured importance (depth, heads, MLP and hidden channels) to a budget or shape; written to <output_dir>/pruned and reused while its inputs are unchanged.")
    config: dict[str, Any] | None = Field(None, description="Overrides on the teacher's config; the student is randomly initialised.")
    model: str | None = Field(None, description="An existing model (local folder or hub id) used as the student.")
    trust_remote_code: StrictBool = Field(False, description="Allow remote code for `student.model`.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "StudentSpec":
        given = [k for k in ("from_teacher", "prune", "config", "model") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of from_teacher, prune, config, model (got {given or 'none'})")
        return self


class DataSpec(Spec):
    train: str = Field("builtin:pydocs/train", description="Training text: .txt, .jsonl(.gz), a folder of those, a saved HF dataset, or `builtin:pydocs/train`.")
    eval: str | None = Field("builtin:pydocs/eval", description="Held-out text in the same forms; if null, `eval_fraction` of the training blocks is held out.")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Share of training blocks held out when `eval` is null.")
    text_field: str = Field("text", description="Field holding the text in .jsonl files and datasets.")
    seq_len: int = Field(256, ge=8, le=131072, description="Tokens per packed training block.")
    max_train_tokens: int | None = Field(None, ge=1, description="Cap on training tokens (after packing); null = all.")
    max_eval_tokens: int | None = Field(16384, ge=1, description="Cap on eval tokens; the same blocks are used at every evaluation.")
    cache_dir: str | None = Field(None, description="Where tokenized blocks are cached (default: $COMPRESS_CACHE or ~/.cache/compress).")


class LossSpec(Spec):
    kind: Literal[DIVERGENCES] = Field("forward_kl", description="Divergence: " + ", ".join(DIVERGENCES) + ".")  # type: ignore[valid-type]
    temperature: float = Field(1.0, gt=0, description="Softmax temperature; the divergence is scaled by T².")
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixture weight (0 = forward KL, 1 = reverse KL).")
    alpha: float = Field(0.1, ge=0, lt=1, description="Skew of skew_forward_kl / skew_reverse_kl (DistiLLM).")
    ce_weight: float = Field(0.0, ge=0, le=1, description="Weight of hard-label cross-entropy mixed into the loss.")
    chunk_size: int = Field(1024, ge=1, description="Tokens per chunk of the fused lm_head + loss (memory grows with this, not with batch×seq×vocab).")


class HiddenLossSpec(Spec):
    weight: float = Field(0.0, ge=0, description="Weight of the hidden-state MSE term (0 = off).")
    pairs: list[tuple[int, int]] = Field(
        default_factory=list,
        description="(student, teacher) indices into HF hidden_states (0 = embeddings output); empty = match each kept layer to its teacher layer.",
    )


class DistillSpec(Spec):
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch (across all processes).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to norms and biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps, then cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of `lr`.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null = no clipping.")
    loss: LossSpec = Field(default_factory=LossSpec, description="The distillation loss.")
    hidden: HiddenLossSpec = Field(default_factory=HiddenLossSpec, description="Optional hidden-state loss.")
    eval_every: int = Field(100, ge=1, description="Evaluate on the held-out set every N steps (and at the end).")
    save_every: int = Field(100, ge=1, description="Write a checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU.")
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch (null = torch's default).")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How the processes of a multi-process launch (`accelerate launch`, torchrun) share the work. `ddp`: each holds the student, its gradients and AdamW states, and a live teacher, whole; only the micro-batch is split. `fsdp`: FSDP2 (`fully_shard`, one group per decoder block): the student's weights, gradients and optimizer states and the live teacher's weights are split over the processes, which all-gather one block at a time; checkpoints are distributed (torch.distributed.checkpoint: each process writes its shards) and resume exactly, with any process count. The same training either way (tests/test_distributed.py); one process ignores it.",
    )

    @model_validator(mode="after")
    def _check(self) -> "DistillSpec":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


class CalibSpec(Spec):
    source: str | None = Field(None, description="Calibration text (same forms as data.train); null = the recipe's data.train.")
    samples: int = Field(128, ge=1, description="Calibration sequences.")
    seq_len: int = Field(512, ge=8, description="Tokens per calibration sequence.")
    max_chars: int | Literal["auto"] = Field(
        "auto",
        description="Calibration text tokenized at most, in characters. A source larger than this (and not already packed in the data cache at this seq_len) is not tokenized whole: one pass reads it, keeps a seeded sample of whole documents of about this many characters, and only those are tokenized and packed; the `samples` sequences are drawn from them. A source at or under it is tokenized whole (and cached), as before. auto = the larger of 64 million and 16 x samples x seq_len (about four times the tokens drawn, at 4 characters a token).",
    )

    @model_validator(mode="after")
    def _check_chars(self):
        if self.max_chars != "auto" and self.max_chars < 1:
            raise ValueError("max_chars must be auto or a positive number of characters")
        return self

    def resolved_max_chars(self) -> int:
        return max(64_000_000, 16 * self.samples * self.seq_len) if self.max_chars == "auto" else self.max_chars


def _check_group_size(value: int | str) -> int | str:
    if value == "auto":
        return value
    if value == 0 or value < -1:
        raise ValueError("group_size must be auto, -1 (one group per row) or a positive number of columns")
    return value


class _QuantBase(Spec):
    skip: list[str] = Field(default_factory=lambda: ["lm_head"], description="Modules kept in float: full names, last components (`down_proj`) or globs.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where quantization runs; auto = CUDA when available.")


class _IntQuantSpec(_QuantBase):
    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight.")
    load: Literal["auto", "blocks", "whole"] = Field(
        "auto",
        description="How the float model is held. `blocks`: never whole: built on the meta device, each block read from the memory-mapped safetensors when its turn comes, quantized, written and freed (peak about one block plus the activations; the plan is printed first), resumable per block with --resume; the same codes as `whole` (tests/test_sequential.py). `whole`: loaded whole (needed for checkpoints whose tensors are converted on load, such as fused mixture-of-experts stacks). auto = blocks where the checkpoint allows it, else whole.",
    )
    activations: Literal["auto", "device", "cpu", "disk"] = Field(
        "auto",
        description="With `load: blocks`, where the states between blocks (calibration and evaluation hidden states) are kept. `device`: on the compute device. `cpu`: host memory, each batch copied to the device for its forward (on a CPU device the same as `device`). `disk`: raw files in the progress folder beside the output, each batch read back for its forward. Off the device, the device holds one batch of them at a time (with `true_sequential: true`, every batch's block input while that block is calibrated). The same codes either way (tests/test_sequential.py). auto = device when the memory plan fits the device, else cpu (CUDA, when the host has the memory), else disk.",
    )
    group_size: int | Literal["auto"] = Field("auto", description="Input columns sharing one scale/zero; -1 = one group per output row; auto = the largest of 128/64/32/16 that divides every quantized layer's input width (the GPTQ kernels of GPTQModel, transformers and vLLM refuse groups that do not).")
    sym: StrictBool = Field(True, description="Symmetric grid (zero point fixed at the middle) instead of asymmetric.")

    @model_validator(mode="after")
    def _check(self):
        _check_group_size(self.group_size)
        return self


class HeadCodesSpec(Spec):
    group_size: Literal[32, 64, 128] = Field(32, description="Columns per group of the head's 4-bit codes (MatMulNBits blocks).")
    act_order: StrictBool = Field(False, description="GPTQ the head's columns in order of decreasing Hessian diagonal. Off: a tied 4-bit embedding can then read the head's codes, which act-order permutes.")


class GPTQSpec(_IntQuantSpec):
    method: Literal["gptq"] = Field(description="GPTQ (Frantar et al. 2022): layer-by-layer, Hessian-aware rounding.")
    act_order: StrictBool = Field(True, description="Quantize columns in order of decreasing Hessian diagonal (desc_act).")
    damp: float = Field(0.01, gt=0, lt=1, description="Dampening added to the Hessian diagonal, as a fraction of its mean.")
    block_size: int = Field(128, ge=1, description="Columns per lazy-update block.")
    static_groups: StrictBool = Field(False, description="With act_order, fix each group's grid before reordering, groups in column order (g_idx stays sequential). The int4 ONNX export then permutes no inputs: decode 1.05-1.14x faster on the quickstart models; perplexity (pydocs / licences) teacher 22.15 / 20.04 vs 22.33 / 20.18, student 45.42 / 191.59 vs 45.42 / 185.19 (benchmarks/results/export_latency-static-groups.md). The quickstart recipe sets it.")
    true_sequential: StrictBool = Field(True, description="Calibrate q/k/v, o, gate/up, down in turn, each on inputs through the already-quantized sub-layers (GPTQModel's default), in one forward per block (the forwards pause at each group's input). `false`: the paper's order, every Hessian from the float block, then a second forward. Same quality either way on SmolLM2-135M, true-sequential faster (benchmarks/results/gptq_ab.jsonl, rows mem-trueseq-*). Memory: each paused forward keeps its activations inside the block and its thread's allocator memory, while `false` needs only the block inputs; use `false` where memory is tight.")
    scale_search: Literal["minmax", "mse", "mse-hessian"] = Field(
        "mse-hessian",
        description="How each group's scale is chosen: `minmax` spans its range; `mse` shrinks the range to minimize the rows' sum |w-q|^2.4 (IST-DASLab/GPTQModel `mse`); `mse-hessian` minimizes GPTQ's own objective sum (w-q)^2/d^2 over the group. On SmolLM2-135M 4-bit g128 act-order, ppl increase in-domain / far-domain: minmax +16% / +38%, mse +13% / +30%, mse-hessian +13% / +21-23% (on the distilled student, mean of three calibration draws: minmax +2.1% / +2.5%, mse-hessian +1.2% / +2.6%).",
    )
    forward_dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16",
        description="Dtype of the calibration forwards: `bfloat16` runs them on a bf16 copy of each block, hidden states between blocks in bf16 (as GPTQModel on CPU); the weights GPTQ reads, the Hessians and the GPTQ math stay fp32. On SmolLM2-135M the same quality as float32 (ppl within 0.7%), forwards ~3x faster on CPUs with bf16 units.",
    )
    calib: CalibSpec = Field(default_factory=CalibSpec, description="Calibration data.")
    head_codes: HeadCodesSpec | None = Field(
        default_factory=HeadCodesSpec,
        description="4-bit GPTQ: also GPTQ the LM head (on the final hidden states of the calibration text) into `extras/lm_head_gptq.safetensors`, which `compress export` turns into the 4-bit head (and tied embedding) of an int4 folder; the checkpoint's own head stays float, so other loaders read the same model. null = none (the export's head is then 8-bit). Ignored at other bit widths.",
    )
    batch_size: int = Field(8, ge=1, description="Calibration sequences per forward pass.")
    min_expert_tokens: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="Mixture-of-experts models: an expert that fewer calibration tokens reached than this is rounded to nearest (RTN, same grid) instead of GPTQ'd, and the quantize record lists it with its token count (every expert's count is recorded). `auto` = the projection's input width, below which its Hessian is singular. 0 = GPTQ every expert any token reached (one that none reached is always RTN).",
    )

class RTNSpec(_IntQuantSpec):
    method: Literal["rtn"] = Field(description="Round-to-nearest on the same grid: the baseline every GPTQ result is shown against.")


class BnbSpec(_QuantBase):
    method: Literal["bnb-nf4", "bnb-fp4", "bnb-int8"] = Field(description="bitsandbytes: 4-bit NormalFloat / FP4, or LLM.int8.")
    double_quant: StrictBool = Field(True, description="4-bit: quantize the quantization constants too.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="4-bit: dtype of the matmuls.")
    int8_threshold: float = Field(6.0, gt=0, description="int8: outlier threshold above which activations stay in fp16.")


QuantizeSpec = Annotated[Union[GPTQSpec, RTNSpec, BnbSpec], Field(discriminator="method")]


class ExportSpec(Spec):
    weights: Literal["fp32", "fp16", "int8", "int4"] = Field("int4", description="ONNX weight format; a GPTQ/RTN input exports with its own codes (int4 for 4-bit, int8 for 8-bit).")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the ONNX model is validated and meant to run (cuda needs onnxruntime-gpu).")
    accuracy_level: int | None = Field(None, ge=0, le=4, description="MatMulNBits compute for int4/int8: 0 = fp32 activations (the same logits at any batch size), 4 = int8 activations (1.3x faster decode, +0.3-0.7% perplexity; a row's logits then depend on its batch); null = 4 (what onnxruntime-genai's builder writes). An int4 folder at 4 is also validated with its 4-bit layers at 0, against the sharp bars (compress.json: validation.graph_check).")
    lm_head: Literal["float", "int8", "int4", "auto"] | None = Field(None, description="LM head precision of int4/int8 exports. int4: from a GPTQ artifact its head's GPTQ codes (quantize.head_codes), from a float model round-to-nearest, blocks of 32. auto (null): 4 bits in int4 exports where the 8-bit head would be at least 25% of the bytes a decoded token reads and a GPTQ artifact carries head codes, else 8 bits; the choice and its reason are in compress.json (onnx.weights, recipe export.lm_head_choice).")
    embedding: Literal["float", "int8", "int4", "auto"] | None = Field(None, description="Token embedding precision of int4/int8 exports: GatherBlockQuantized, reading the quantized LM head's own codes when the head is tied (stored once); null/auto = as lm_head, except 8 bits of its own beside a 4-bit GPTQ head (whose codes as the table cost 4-5% far-domain perplexity at the same decode speed).")
    lm_head_accuracy_level: int | None = Field(None, ge=0, le=4, description="MatMulNBits compute of a quantized LM head (overrides accuracy_level for the head); null = 4, whether 8 or 4 bits (a 4-bit head at 0 decoded 9-12% slower for the same perplexity).")
    int8_method: Literal["nbits", "dynamic"] = Field("nbits", description="int8 from a float model: weight-only MatMulNBits, or ONNX Runtime's quantize_dynamic.")
    exporter: Literal["auto", "fused", "dynamo", "legacy"] = Field("auto", description="auto = the fused graph (GroupQueryAttention, fused norms and projections) for Llama/Mistral/Qwen2/Qwen3 in fp32/int8/int4, torch.onnx dynamo otherwise; legacy = the deprecated TorchScript exporter.")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime threads during validation (null = its default).")

    @model_validator(mode="after")
    def _check(self) -> "ExportSpec":
        for key in ("lm_head", "embedding"):
            value = getattr(self, key)
            if self.weights in ("fp32", "fp16") and value in ("int8", "int4"):
                raise ValueError(f"{key}: {value} needs weights int4 or int8; an {self.weights} export keeps every weight in {self.weights}")
            if self.weights == "int8" and value == "int4":
                raise ValueError(f"{key}: int4 needs weights int4; an int8 export keeps its head and embedding in 8 bits or float")
        return self


class BenchSpec(Spec):
    eval: str | None = Field(None, description="Held-out text for perplexity, KL and top-1 agreement (same forms as data.eval); null = the recipe's data.eval (or data.train).")
    seq_len: int = Field(512, ge=8, description="Tokens per evaluation window; every model sees the same windows.")
    max_eval_tokens: int = Field(16384, ge=8, description="Cap on evaluation tokens.")
    prompt_lengths: list[int] = Field(default_factory=lambda: [128, 512], min_length=1, description="Prompt lengths whose prefill latency is timed (each <= seq_len).")
    new_tokens: int = Field(128, ge=1, description="Tokens generated per decode-speed run.")
    decode_prompt: int = Field(128, ge=1, description="Prompt length before the timed decode.")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 4], min_length=1, description="Batch sizes of the decode-speed runs.")
    repeats: int = Field(5, ge=1, description="Timed runs per measurement (median and p90 reported).")
    warmup: int = Field(1, ge=0, description="Untimed runs before the timed ones.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where torch models run (ONNX on CPU, or CUDA with onnxruntime-gpu); auto = CUDA when available.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch and ONNX Runtime (null = all cores).")
    speed: StrictBool = Field(True, description="Measure latency (prefill, decode) and peak memory.")
    quality: StrictBool = Field(True, description="Measure perplexity (and KL / top-1 agreement when a teacher is known).")
    plots: StrictBool = Field(True, description="Write PNG plots (needs matplotlib: pip install 'compress-llm[plots]').")
    teacher_baseline: StrictBool = Field(True, description="`compress run` with a quantize section: also quantize (and export) the teacher itself with the recipe's quantize (and export) settings and bench it beside the student, so the report shows whether distillation paid (row `teacher-onnx-int4` or `teacher-gptq-4bit`).")

    @model_validator(mode="after")
    def _check(self) -> "BenchSpec":
        if any(n < 1 for n in self.prompt_lengths + self.batch_sizes):
            raise ValueError("prompt_lengths and batch_sizes must be positive")
        if max(self.prompt_lengths + [self.decode_prompt]) > self.seq_len:
            raise ValueError(f"prompt lengths {self.prompt_lengths} and decode_prompt {self.decode_prompt} must be <= seq_len {self.seq_len} (prompts are cut from the eval windows)")
        return self


class Recipe(Spec):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name.")
    output_dir: str | None = Field(None, description="Run folder (relative to the working directory); default runs/<name>.")
    seed: int = Field(0, description="Seed for init, data order and sampling.")
    teacher: TeacherSpec = Field(default_factory=TeacherSpec, description="The teacher model.")
    student: StudentSpec = Field(default_factory=lambda: StudentSpec(from_teacher=FromTeacherSpec(layers=10)), description="How the student is made.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training and held-out text.")
    distill: DistillSpec = Field(default_factory=DistillSpec, description="Distillation training.")
    quantize: QuantizeSpec | None = Field(None, description="Low-bit quantization (`method` picks the variant and its keys).")
    export: ExportSpec | None = Field(None, description="ONNX export of the last model of the chain (`compress run`).")
    bench: BenchSpec | None = Field(None, description="Benchmark of teacher, student and every later artifact (`compress run`, `compress bench`).")

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.teacher.logits_cache.enabled and self.distill.hidden.weight > 0:
            raise ValueError(
                "distill.hidden.weight > 0 needs the teacher's per-layer hidden states, which teacher.logits_cache does not store; "
                "set distill.hidden.weight to 0 or teacher.logits_cache.enabled to false"
            )
        q, e = self.quantize, self.export
        if e is not None and "int4" in (e.lm_head, e.embedding) and isinstance(q, GPTQSpec) and q.bits == 4 and q.head_codes is None:
            key = "lm_head" if e.lm_head == "int4" else "embedding"
            raise ValueError(f"export.{key}: int4 exports the LM head's GPTQ codes, which quantize.head_codes: null does not write; drop head_codes: null or set export.{key} to auto or int8")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string; accept it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?\d*\.\d+$|^[-+]?\d+\.$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def apply_override(data: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = parse_value(value)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {path}: unknown key")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {path}: {e['msg']}{shown}")
    return "invalid recipe\n  " + "\n  ".join(lines)


def validate_recipe(data: dict, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, source)) from None


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file (None = all defaults), apply `--set` overrides, validate."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = yaml.load(path.read_text(), Loader=_Loader)
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from None
        if data is None:  # no document, or only comments: most likely a mistake, not a request for every default
            raise RecipeError(f"recipe file is empty: {path}; write its sections into it (see recipes/), or give no recipe file to use every default")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a mapping of sections, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_recipe(data, source)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _spec_types(annotation: Any) -> list[type[Spec]]:
    """The Spec classes inside an annotation (X, X | None, Annotated[Union[...], ...])."""
    if isinstance(annotation, type) and issubclass(annotation, Spec):
        return [annotation]
    return [t for arg in get_args(annotation) for t in _spec_types(arg)]


def describe_keys(model: type[Spec] = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) for every recipe key, sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        nested = _spec_types(annotation)
        if len(nested) == 1:
            rows.append((path, "section", "", field.description or ""))
            rows.extend(describe_keys(nested[0], prefix=path + "."))
            continue
        if nested:  # a tagged union: one section per variant of `method`
            for variant in nested:
                methods = get_args(variant.model_fields["method"].annotation)
                rows.append((path, "section", "", f"method: {' | '.join(methods)} — {variant.model_fields['method'].description}"))
                rows.extend(describe_keys(variant, prefix=path + "."))
            continue
        if path.endswith(".method"):
            default = "required (picks the section)"
        elif field.is_required():
            default = "required"
        else:
            value = field.default_factory() if field.default_factory is not None else field.default
            default = json.dumps(value)
        rows.append((path, _type_name(annotation), default, field.description or ""))
    return rows


def keys_markdown() -> str:
    """The README's recipe-key table (tests/test_readme.py checks the README carries exactly this)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, kind, default, description in describe_keys():
        if kind == "section":
            rows.append(f"| **`{path}`** | section | | {cell(description)} |")
            continue
        shown = default if default.startswith("required") else f"`{default}`"
        rows.append(f"| `{path}` | {cell(kind).replace(chr(92) + '|', ' ' + chr(92) + '| ')} | {cell(shown)} | {cell(description)} |")
    return "\n".join(rows)
