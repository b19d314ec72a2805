"""Issue 13: a bad input model is refused by name (file, key or tensor) before any compute, never a traceback.

Each case runs the real command line (compress.cli.main) on a tiny model folder broken one way."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import gptq_tiny_llama, save_tiny, tiny_recipe
from safetensors.torch import load_file, save_file

from compress.cli import main

BENCH = dict(seq_len=32, max_eval_tokens=128, prompt_lengths=[8], new_tokens=2, decode_prompt=8, batch_sizes=[1], repeats=1, warmup=0, threads=1)


@pytest.fixture(scope="module")
def good(tmp_path_factory, tokenizer_dir):
    return save_tiny(tmp_path_factory.mktemp("good") / "llama", "llama", tokenizer_dir, layers=2)


@pytest.fixture(scope="module")
def gptq(tmp_path_factory, tokenizer_dir, text_files):
    """A 4-bit GPTQ artifact with groups of 64 over widths 128/256 (two or more groups per row)."""
    return gptq_tiny_llama(tmp_path_factory.mktemp("gptq"), tokenizer_dir, text_files, hidden_size=128, intermediate_size=256)


def _copy(folder, tmp_path, name="bad"):
    return shutil.copytree(folder, tmp_path / name, ignore=shutil.ignore_patterns("compress.json"))


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _cli(command, model, tmp_path, text_files, capsys, *extra):
    """Run `compress COMMAND MODEL` with tiny settings; (exit code, stdout + stderr)."""
    out = tmp_path / f"out-{command}"
    data = ["--set", f"data.eval={text_files['eval']}", "--set", "data.seq_len=32", "--set", "data.max_eval_tokens=128", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    if command == "quantize":
        argv = ["quantize", str(model), "--method", "rtn", "--bits", "8", "--group-size", "32", "--output", str(out), "--no-progress", *data]
    elif command == "export":
        argv = ["export", str(model), "--output", str(out)]
    else:
        argv = ["bench", str(model), "--output", str(out), "--data", str(text_files["eval"]), "--no-progress", *data]
        argv += [a for key, value in BENCH.items() for a in ("--set", f"bench.{key}={json.dumps(value)}")]
    code = main([*argv, *extra])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code != 0, text[-2000:]
    assert "Traceback" not in text
    assert f"compress {command}: error:" in captured.err
    assert not (out / "compress.json").exists() and not (out / "results.json").exists()
    return code, captured.err


@pytest.mark.parametrize("command", ["quantize", "export", "bench"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_safetensors_file_is_named(command, damage, good, tmp_path, text_files, capsys):
    bad = _copy(good, tmp_path)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * (len(data) // 256))
    _, err = _cli(command, bad, tmp_path, text_files, capsys)
    assert f"{weights} is unreadable" in err and "truncated or corrupt" in err and "re-download" in err


@pytest.mark.parametrize("command", ["quantize", "export", "bench"])
def test_a_config_whose_shapes_disagree_with_the_weights_names_tensors_and_keys(command, good, tmp_path, text_files, capsys):
    bad = _copy(good, tmp_path)
    _edit_config(bad, intermediate_size=96)  # the tensors were saved with 64
    _, err = _cli(command, bad, tmp_path, text_files, capsys)
    assert f"{bad / 'config.json'} does not match the weights" in err
    assert "model.layers.0.mlp.gate_proj.weight: stored (64, 32), config expects (96, 32)" in err
    assert "intermediate_size" in err


@pytest.mark.parametrize("command", ["quantize", "export", "bench"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(command, value, good, tmp_path, text_files, capsys):
    bad = _copy(good, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    _, err = _cli(command, bad, tmp_path, text_files, capsys)
    kind = "NaN" if value != value else "Inf"
    assert f"model.layers.1.mlp.down_proj.weight in {bad / 'model.safetensors'} has 1 non-finite value (1 {kind})" in err


@pytest.mark.parametrize("command", ["export", "bench"])
@pytest.mark.parametrize("configured", [128, 32, -1])
def test_a_gptq_group_size_that_disagrees_with_the_scales_is_refused(command, configured, gptq, tmp_path, text_files, capsys):
    bad = _copy(gptq, tmp_path)
    _edit_config(bad, quantization_config={"group_size": configured})
    extra = ("--weights", "int4") if command == "export" else ()
    _, err = _cli(command, bad, tmp_path, text_files, capsys, *extra)
    assert "layer model.layers.0.mlp.down_proj has 4 groups of scales over 256 input features" in err
    assert f"imply group size 64, but {bad / 'config.json'} has quantization_config.group_size {configured}" in err


def test_a_consistent_gptq_folder_still_loads(gptq):
    from compress.models import load_quantized

    assert load_quantized(gptq) is not None


def _remote(good, tmp_path):
    bad = _copy(good, tmp_path, "remote")
    _edit_config(bad, model_type="tiny_custom_lm", auto_map={"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    return bad


@pytest.mark.parametrize("command", ["quantize", "export", "bench"])
def test_a_model_that_needs_remote_code_is_refused_by_name(command, good, tmp_path, text_files, capsys):
    bad = _remote(good, tmp_path)
    _, err = _cli(command, bad, tmp_path, text_files, capsys)
    assert f"{bad} needs its own Python code" in err and "'tiny_custom_lm'" in err and "trust_remote_code" in err


def test_distill_from_a_teacher_that_needs_remote_code_says_how_to_allow_it(good, tmp_path, text_files, capsys):
    import yaml

    bad = _remote(good, tmp_path)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, bad, text_files)))
    assert main(["distill", str(recipe), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert f"{bad} needs its own Python code" in captured.err and "teacher.trust_remote_code" in captured.err


def test_the_checks_pass_a_good_folder_and_trusted_remote_code(good, tmp_path):
    from compress.models import check_model_folder

    check_model_folder(good)
    check_model_folder(_remote(good, tmp_path), trust_remote_code=True, weights=False)  # allowed when trusted


def test_a_non_finite_distill_teacher_is_named(good, tmp_path, text_files, capsys):
    import yaml

    bad = _copy(good, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.embed_tokens.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, bad, text_files)))
    assert main(["distill", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.embed_tokens.weight" in err and "non-finite" in err


@pytest.mark.parametrize("command", ["quantize", "export", "bench"])
@pytest.mark.parametrize("name", ["tokenizer.json", "chat_template.jinja"])
def test_a_damaged_tokenizer_file_is_named(command, name, good, tmp_path, text_files, capsys):
    """Found by benchmarks/fuzz.py: bytes flipped in tokenizer.json or the chat template surfaced as a UnicodeDecodeError traceback."""
    bad = _copy(good, tmp_path)
    tok = bad / name
    if not tok.exists():
        tok.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    data = bytearray(tok.read_bytes())
    data[len(data) // 2] = 0xFF  # not UTF-8
    tok.write_bytes(bytes(data))
    _, err = _cli(command, bad, tmp_path, text_files, capsys)
    assert f"{tok} is not readable" in err and "corrupt" in err


def test_run_with_a_teacher_that_needs_remote_code_is_a_named_problem(good, tmp_path, text_files, capsys):
    import yaml

    bad = _remote(good, tmp_path)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, bad, text_files)))
    code = main(["run", str(recipe), "--dry-run"])
    captured = capsys.readouterr()
    assert code != 0 and "Traceback" not in captured.out + captured.err
    assert "teacher.model" in captured.err and f"{bad} needs its own Python code" in captured.err
