"""The torch-free runtime on an exported tiny model: greedy generation equals transformers' token for token,
streaming equals generation, sampling is seeded, the example app runs with torch unimportable."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install 'compress-llm[onnx]'")
pytest.importorskip("onnxruntime", reason="the runtime needs onnxruntime: pip install 'compress-llm[onnx]'")

from conftest import save_tiny  # noqa: E402

from compress_exporters.onnx import export_onnx  # noqa: E402
from compress_exporters.runtime import OnnxCausalLM, RuntimeLoadError  # noqa: E402

ROOT = Path(__file__).parents[1]
PROMPTS = ["The module", "Python is a programming language that lets you work quickly and"]


@pytest.fixture(scope="module", params=["legacy", "fused"])
def exported(request, tmp_path_factory, tokenizer_dir):
    """Both graphs the runtime meets: a traced one (present = past + step, returned every step) and the fused one
    (GroupQueryAttention updating one shared KV buffer in place). The legacy exporter is fast; the traced
    graph's interface is the same with dynamo (tests/test_export.py)."""
    root = tmp_path_factory.mktemp(f"runtime-{request.param}")
    # GroupQueryAttention needs a head size that is a multiple of 16: 64 wide, 4 heads.
    wide = {"hidden_size": 64, "intermediate_size": 128} if request.param == "fused" else {}
    model_dir = save_tiny(root / "llama", "llama", tokenizer_dir, layers=2, train_steps=30, **wide)
    export_onnx(model_dir, root / "onnx", exporter=request.param)
    return model_dir, root / "onnx"


@pytest.fixture(scope="module")
def lm(exported):
    return OnnxCausalLM.from_dir(exported[1], threads=1)


def test_greedy_generate_equals_transformers(exported, lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = exported
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert lm.encode(prompt) == ids[0].tolist()  # tokenizers alone encodes like transformers
        expected = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        result = lm.generate(prompt, max_new_tokens=24)  # both stop at the model's EOS
        assert result.token_ids == expected and len(expected) > 5
        assert result.prompt_ids == ids[0].tolist()
        assert result.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_chunked_prefill_equals_transformers(exported, lm):
    """A prompt longer than prefill_chunk runs in chunks through the shared cache: same tokens as one pass."""
    from transformers import AutoModelForCausalLM

    if not lm.kv_shareable:
        pytest.skip("chunked prefill applies to graphs with a shared KV buffer (the fused graph)")
    ids = lm.encode(PROMPTS[1] + " " + PROMPTS[0])
    expected = AutoModelForCausalLM.from_pretrained(exported[0]).eval().generate(__import__("torch").tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    saved = lm.prefill_chunk
    try:
        for chunk in (0, 3, 5):
            lm.prefill_chunk = chunk
            assert lm.generate(ids, max_new_tokens=12, stop_tokens=[]).token_ids == expected, chunk
    finally:
        lm.prefill_chunk = saved
    assert len(ids) > 10


def test_stop_tokens_end_generation(lm):
    free = lm.generate(PROMPTS[1], max_new_tokens=12, stop_tokens=[])
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    result = lm.generate(PROMPTS[1], max_new_tokens=12, stop_tokens=[stop])
    assert result.token_ids == free.token_ids[: first + 1] and result.finish_reason == "stop"
    by_name = lm.generate(PROMPTS[1], max_new_tokens=12, stop_tokens=[lm.tokenizer.id_to_token(stop)])
    assert by_name.token_ids == result.token_ids
    with pytest.raises(ValueError, match="not in the vocabulary"):
        lm.generate("x", stop_tokens=["<no such token>"])


def test_stream_pieces_join_to_generated_text(lm):
    pieces = list(lm.stream(PROMPTS[0], max_new_tokens=20, stop_tokens=[]))
    assert len(pieces) > 1 and "".join(pieces) == lm.generate(PROMPTS[0], max_new_tokens=20, stop_tokens=[]).text


def test_sampling_is_seeded_and_top_k_1_is_greedy(lm):
    greedy = lm.generate(PROMPTS[1], max_new_tokens=16, stop_tokens=[]).token_ids
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, stop_tokens=[])
    assert lm.generate(PROMPTS[1], top_k=1, seed=3, **kwargs).token_ids == greedy
    a = lm.generate(PROMPTS[1], seed=7, **kwargs).token_ids
    assert lm.generate(PROMPTS[1], seed=7, **kwargs).token_ids == a
    runs = {tuple(lm.generate(PROMPTS[1], seed=s, top_p=0.95, **kwargs).token_ids) for s in range(4)}
    assert len(runs) > 1  # sampling at temperature 1.5 on a 384-token vocabulary varies with the seed


def test_generate_takes_token_ids_and_respects_context_length(exported):
    lm = OnnxCausalLM.from_dir(exported[1])
    ids = lm.encode(PROMPTS[0])
    assert lm.generate(ids, max_new_tokens=5, stop_tokens=[]).token_ids == lm.generate(PROMPTS[0], max_new_tokens=5, stop_tokens=[]).token_ids
    free = lm.generate(ids, max_new_tokens=10, stop_tokens=[]).token_ids
    lm.context_length = len(ids) + 3
    capped = lm.generate(ids, max_new_tokens=50, stop_tokens=[])
    assert capped.token_ids == free[:3] and capped.finish_reason == "length"  # cut at the context, not changed


def test_fused_folder_shares_its_kv_buffer(exported, lm):
    fused = json.loads((exported[1] / "compress.json").read_text())["recipe"]["export"]["exporter"] == "fused"
    assert lm.kv_shareable == fused


def test_session_threads_and_no_spinning(lm):
    options = lm.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeLoadError, match="no model.onnx"):
        OnnxCausalLM.from_dir(tmp_path)


def test_external_data_folder_loads(tmp_path, exported, monkeypatch, lm):
    import compress_exporters.onnx as exporter

    kind = json.loads((exported[1] / "compress.json").read_text())["recipe"]["export"]["exporter"]
    inline = export_onnx(exported[0], tmp_path / "inline", weights="int4", exporter=kind).artifact
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD", 0)  # as for models over 1 GiB
    out = export_onnx(exported[0], tmp_path / "onnx", weights="int4", exporter=kind).artifact
    assert not (inline / "model.onnx.data").exists()
    assert (out / "model.onnx.data").stat().st_size > 50_000  # the weights left model.onnx
    # the same model as the one with its weights inside model.onnx: the same logits at every greedy step
    want_tokens, want_logits = greedy_with_logits(OnnxCausalLM.from_dir(inline, threads=1), lm.encode(PROMPTS[1]), 16)
    tokens, logits = greedy_with_logits(OnnxCausalLM.from_dir(out, threads=1), lm.encode(PROMPTS[1]), 16)
    assert tokens == want_tokens and len(tokens) == 16
    np.testing.assert_array_equal(logits, want_logits)


def greedy_with_logits(model: OnnxCausalLM, ids: list[int], new_tokens: int) -> tuple[list[int], "np.ndarray"]:
    """Greedy tokens and the (new_tokens, vocab) logits each was picked from."""
    rows = []

    def pick(row):
        rows.append(row.copy())
        return int(row.argmax())

    tokens = list(model._token_stream(list(ids), new_tokens, pick))
    return tokens, np.stack(rows)


def _run_without_torch(code: str, cwd: Path) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"  # `import torch` raises
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_runtime_imports_no_torch(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "import sys, compress_exporters.runtime; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_example_app_runs_with_torch_unimportable(tmp_path, exported, lm):
    code = f"import runpy; sys.argv = ['app', {str(exported[1])!r}, {PROMPTS[1]!r}, '12']; runpy.run_module('compress_exporters.example_app', run_name='__main__')"
    done = _run_without_torch(code, tmp_path)
    assert done.returncode == 0, done.stderr
    streamed, ids = done.stdout.rstrip("\n").rsplit("\n", 1)
    assert streamed == lm.generate(PROMPTS[1], max_new_tokens=12).text
    assert json.loads(ids) == lm.generate(PROMPTS[1], max_new_tokens=8).token_ids
    check = _run_without_torch("import torch", tmp_path)
    assert check.returncode != 0 and "ModuleNotFoundError" in check.stderr  # the prelude really hides torch


def test_readme_shows_the_example_app():
    readme = (ROOT / "exporters" / "README.md").read_text()
    app = (ROOT / "exporters" / "example_app.py").read_text()
    assert app.strip() in readme, "exporters/README.md must show exporters/example_app.py verbatim"


def test_onnxruntime_genai_loads_the_folder(exported, lm):
    pytest.importorskip("onnxruntime_genai", reason="interop check runs where onnxruntime-genai installs (pip install onnxruntime-genai)")
    from conftest import genai_greedy

    ids = lm.encode(PROMPTS[1])
    assert genai_greedy(exported[1], ids, 10) == lm.generate(ids, max_new_tokens=10, stop_tokens=[]).token_ids
