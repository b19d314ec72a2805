"""Config and tokenizer files that every supported transformers reads the same way.

transformers 5 writes RoPE settings only as ``rope_parameters: {rope_theta, rope_type, ...}`` and names the
tokenizer class ``TokenizersBackend``. transformers 4.x (4.57 is what optimum-onnx pins) knows neither: it reads
``rope_theta`` and ``rope_scaling`` from the top level and silently falls back to ``rope_theta=10000`` when they
are missing (a different model: logits up to 1.0 apart on SmolLM2, whose base is 100000), and it refuses the
tokenizer class outright. Every folder compress writes therefore carries both spellings:

- ``rope_theta`` (and ``partial_rotary_factor``) at the top level beside ``rope_parameters``, under the
  family's own 4.x names too where it has them (GPT-NeoX: ``rotary_emb_base``, ``rotary_pct``); ``rope_scaling``
  is ``rope_parameters`` without those, or null for plain RoPE. transformers 5 gives ``rope_scaling`` priority
  over ``rope_parameters`` when it is set, so the two always agree;
- ``torch_dtype`` beside ``dtype`` (transformers 5 reads ``torch_dtype`` too, without a warning);
- ``use_cache: true`` (training turns the cache off; a saved model must generate with it);
- ``tokenizer_class: PreTrainedTokenizerFast`` where transformers 5 wrote its own ``TokenizersBackend`` (both
  lines build the same tokenizer from ``tokenizer.json``); the machine-local fields that transformers 5 copies
  into ``tokenizer_config.json`` (``local_files_only``, ``is_local``, ...) are dropped.

The oldest transformers that reads our folders is ``OLDEST_TRANSFORMERS``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OLDEST_TRANSFORMERS = "4.57"

# tokenizer_config.json fields that describe how this machine loaded the tokenizer, not the tokenizer.
MACHINE_LOCAL_TOKENIZER_KEYS = ("local_files_only", "is_local", "cache_dir", "force_download", "token", "use_auth_token", "proxies", "_commit_hash", "name_or_path")
# Tokenizer classes of transformers 5 that transformers 4.x does not have, and the class both lines load.
TOKENIZER_CLASS_ALIASES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# RoPE keys that transformers 4.x reads from the top level of the config rather than from rope_scaling.
_TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")
# Families whose 4.x config spells those keys its own way (4.57 GPTNeoXConfig overwrites rope_theta with
# rotary_emb_base, default 10000, and partial_rotary_factor with rotary_pct).
_LEGACY_ROPE_NAMES = {"gpt_neox": {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}}


def _is_nested(rope: dict[str, Any]) -> bool:
    """Per-layer-type RoPE (`{"full_attention": {...}, "sliding_attention": {...}}`): no 4.x spelling exists."""
    return bool(rope) and all(isinstance(v, dict) for v in rope.values())


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json content that transformers 4.57+ and 5.x read as the same model (see the module doc)."""
    out = dict(config)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and rope and not _is_nested(rope):
        for key in _TOP_LEVEL_ROPE_KEYS:
            if key in rope:
                out[key] = rope[key]
                legacy = _LEGACY_ROPE_NAMES.get(out.get("model_type"), {}).get(key)
                if legacy:
                    out[legacy] = rope[key]
        scaling = {k: v for k, v in rope.items() if k not in _TOP_LEVEL_ROPE_KEYS}
        plain = scaling.get("rope_type", scaling.get("type", "default")) == "default" and set(scaling) <= {"rope_type", "type"}
        out["rope_scaling"] = None if plain else scaling
    if out.get("dtype") is not None:
        out["torch_dtype"] = out["dtype"]
    if "use_cache" in out:
        out["use_cache"] = True
    for key in ("text_config", "decoder"):  # composite configs keep the same fields one level down
        if isinstance(out.get(key), dict):
            out[key] = portable_config(out[key])
    return out


def portable_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json content that transformers 4.57+ and 5.x load the same way, without this machine's fields."""
    out = {k: v for k, v in config.items() if k not in MACHINE_LOCAL_TOKENIZER_KEYS}
    cls = out.get("tokenizer_class")
    if cls in TOKENIZER_CLASS_ALIASES:
        out["tokenizer_class"] = TOKENIZER_CLASS_ALIASES[cls]
    return out


def _rewrite(path: Path, transform) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    new = transform(data)
    if new != data:
        path.write_text(json.dumps(new, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def make_portable(directory: Path) -> None:
    """Rewrite config.json and tokenizer_config.json in `directory` (a folder being written: call it before the
    folder is renamed into place) so that every supported transformers reads them the same way."""
    directory = Path(directory)
    _rewrite(directory / "config.json", portable_config)
    _rewrite(directory / "tokenizer_config.json", portable_tokenizer_config)
