"""`compress bench`: the same windows for every kind of artifact, numbers equal to direct formulas, resumable."""
from __future__ import annotations

import json
import math
import weakref

import pytest
import torch

from compress.bench import quality, stage
from compress.bench.report import pareto_front
from compress.bench.stage import MEASUREMENTS_FILE, run_bench
from compress.bench.subjects import BenchInputError, TorchSubject, inspect_artifact, teacher_from_lineage
from compress.data import packed_blocks
from compress.errors import CompressError
from compress.recipe import BenchSpec
from conftest import save_tiny

SPEC = dict(seq_len=32, max_eval_tokens=320, prompt_lengths=[8, 24], new_tokens=4, decode_prompt=8, batch_sizes=[1, 2], repeats=2, warmup=1, threads=1)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer_dir, text_files):
    """A trained tiny teacher, a different (weaker) student, the teacher's RTN 4-bit artifact and its fp32 ONNX export."""
    from compress.quantize.stage import run_quantize
    from compress.recipe import validate_recipe
    from compress_exporters.onnx import export_onnx

    root = tmp_path_factory.mktemp("bench-zoo")
    teacher = save_tiny(root / "teacher", "llama", tokenizer_dir, layers=2, train_steps=40, hidden_size=64, intermediate_size=128)
    student = save_tiny(root / "student", "llama", tokenizer_dir, layers=1, train_steps=10, seed=1, hidden_size=64, intermediate_size=128)
    recipe = validate_recipe({
        "data": {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 256, "cache_dir": str(root / "cache")},
        "quantize": {"method": "rtn", "bits": 4, "group_size": 32},
    })
    rtn = run_quantize(recipe, str(teacher), root / "rtn4", progress=False).artifact
    onnx_dir = export_onnx(teacher, root / "onnx-fp32", exporter="legacy").artifact
    return {"teacher": teacher, "student": student, "rtn4": rtn, "onnx": onnx_dir, "cache": root / "cache"}


@pytest.fixture(scope="module")
def bench(zoo, text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    names = [str(zoo[k]) for k in ("teacher", "student", "rtn4", "onnx")]
    report = run_bench(BenchSpec(**SPEC), names, out, labels=["teacher", "student", "rtn4", "onnx"], teacher=str(zoo["teacher"]),
                       eval_default=str(text_files["eval"]), cache_dir=zoo["cache"], progress=False, log=lambda _: None)
    return report


def _windows(zoo, text_files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo["teacher"])
    return packed_blocks(str(text_files["eval"]), tok, seq_len=32, text_field="text", max_tokens=320, cache_dir=zoo["cache"])


def test_quality_equals_direct_formulas(bench, zoo, text_files):
    from transformers import AutoModelForCausalLM

    rows = {a["label"]: a for a in bench.results["artifacts"]}
    ids = _windows(zoo, text_files)
    with torch.no_grad():
        t = AutoModelForCausalLM.from_pretrained(zoo["teacher"]).eval()(input_ids=ids).logits[:, :-1].double()
        s = AutoModelForCausalLM.from_pretrained(zoo["student"]).eval()(input_ids=ids).logits[:, :-1].double()
    labels = ids[:, 1:]
    log_t, log_s = t.log_softmax(-1), s.log_softmax(-1)
    nll_s = -log_s.gather(-1, labels[..., None]).mean().item()
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()
    top1 = (t.argmax(-1) == s.argmax(-1)).double().mean().item()
    q = rows["student"]["quality"]
    assert q["tokens"] == labels.numel() == 10 * 31
    assert q["ppl"] == pytest.approx(math.exp(nll_s), rel=1e-5)
    assert q["kl_per_token"] == pytest.approx(kl, rel=1e-4)
    assert q["top1_agreement"] == pytest.approx(top1)
    assert rows["teacher"]["quality"]["kl_per_token"] == 0 and rows["teacher"]["quality"]["top1_agreement"] == 1
    # the ONNX export of the teacher is the teacher: same perplexity, no divergence
    assert rows["onnx"]["quality"]["ppl"] == pytest.approx(rows["teacher"]["quality"]["ppl"], rel=1e-4)
    assert rows["onnx"]["quality"]["kl_per_token"] < 1e-6 and rows["onnx"]["quality"]["top1_agreement"] == 1
    # 4-bit RTN costs quality, but less than a different, weaker model
    assert rows["teacher"]["quality"]["ppl"] < rows["rtn4"]["quality"]["ppl"] < rows["student"]["quality"]["ppl"]
    assert 0 < rows["rtn4"]["quality"]["kl_per_token"] < q["kl_per_token"]


def test_speed_cost_and_files(bench, zoo):
    results = bench.results
    for a in results["artifacts"]:
        speed = a["speed"]
        assert set(speed["prefill"]) == {"8", "24"} and set(speed["decode"]) == {"1", "2"}
        for p in speed["prefill"].values():
            fast, slow = sorted(p["runs_s"])  # two timed runs: median their mean, p90 interpolated 90% of the way
            assert fast > 0 and p["median_s"] == pytest.approx((fast + slow) / 2) and p["p90_s"] == pytest.approx(fast + 0.9 * (slow - fast))
        for b, d in speed["decode"].items():
            assert len(d["tokens_per_s_runs"]) == 2 and min(d["tokens_per_s_runs"]) > 0
            assert d["tokens_per_s_median"] == pytest.approx(sum(d["tokens_per_s_runs"]) / 2) and d["step_ms_p90"] >= d["step_ms_median"] > 0
            assert d["new_tokens"] == 4 and d["prompt_tokens"] == 8
        assert speed["peak_rss_mb"] >= speed["base_rss_mb"] > 0 and speed["threads"] == 1
        assert speed["runs_on"] == ("CPUExecutionProvider" if a["kind"] == "onnx" else "cpu")
    rows = {a["label"]: a for a in results["artifacts"]}
    from transformers import AutoModelForCausalLM

    for label in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(zoo[label])
        assert rows[label]["parameters"] == sum(p.numel() for p in model.parameters())  # tied weights once
    # the quantized copy and the export report the float architecture's count
    assert rows["teacher"]["parameters"] == rows["rtn4"]["parameters"] == rows["onnx"]["parameters"]
    for label in ("teacher", "student", "rtn4"):
        assert rows[label]["size_bytes"] == sum(f.stat().st_size for f in zoo[label].glob("*.safetensors"))
    assert rows["onnx"]["size_bytes"] == sum(f.stat().st_size for f in zoo["onnx"].glob("model.onnx*"))
    assert rows["rtn4"]["size_bytes"] < rows["teacher"]["size_bytes"]
    # The tied embedding + head, stored once: 384 x 64 fp32 in the safetensors folders (the RTN copy keeps its head
    # in float); the legacy ONNX export stores the head's transposed copy beside the table: twice that.
    table = 384 * 64 * 4
    assert [rows[k]["vocab_bytes"] for k in ("teacher", "student", "rtn4", "onnx")] == [table, table, table, 2 * table]
    assert [rows[k]["kind"] for k in ("teacher", "rtn4", "onnx")] == ["float", "gptq", "onnx"]
    out = bench.output
    assert json.loads((out / "results.json").read_text())["artifacts"][1]["label"] == "student"
    report = (out / "report.md").read_text()
    assert all(f"`{label}`" in report for label in rows) and "KL/token" in report and "decode b2 (tok/s)" in report
    share = 100 * rows["rtn4"]["vocab_bytes"] / rows["rtn4"]["size_bytes"]
    assert f"| {384 * 64 * 4 / 2**20:.1f} ({share:.0f}%) |" in report  # the embedding's share of the quantized copy
    for png in ("quality_vs_size.png", "quality_vs_speed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.results["settings"]["eval_tokens"] == 320 and bench.results["machine"]["cpu_count"] >= 1


def test_rerun_reuses_finished_measurements(bench, zoo, text_files):
    kwargs = dict(teacher=str(zoo["teacher"]), eval_default=str(text_files["eval"]), cache_dir=zoo["cache"], progress=False, log=lambda _: None)
    again = run_bench(BenchSpec(**SPEC), [str(zoo["teacher"]), str(zoo["rtn4"])], bench.output, labels=["teacher", "rtn4"], **kwargs)
    assert again.measured == ()
    assert again.results["artifacts"][1]["quality"] == bench.results["artifacts"][2]["quality"]
    # a changed speed setting remeasures speed only; quality is still valid
    changed = run_bench(BenchSpec(**{**SPEC, "new_tokens": 3, "batch_sizes": [1]}), [str(zoo["rtn4"])], bench.output, labels=["rtn4"], **kwargs)
    assert changed.measured == ("speed:rtn4",)
    assert len(json.loads((bench.output / MEASUREMENTS_FILE).read_text())) == 9  # 4 quality + 4 speed + 1


def test_bad_inputs_are_named(tmp_path, zoo, tokenizer_dir, text_files):
    from compress.models import ModelSourceError

    spec = BenchSpec(**SPEC)
    with pytest.raises(ModelSourceError, match="no/such/model"):
        run_bench(spec, [str(tmp_path / "no/such/model")], tmp_path / "out", eval_default=str(text_files["eval"]), log=lambda _: None)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(CompressError, match="not a compress bench folder"):
        run_bench(spec, [str(zoo["teacher"])], tmp_path / "taken", eval_default=str(text_files["eval"]), log=lambda _: None)
    with pytest.raises(BenchInputError, match="share the label"):
        run_bench(spec, [str(zoo["teacher"]), str(zoo["student"])], tmp_path / "out", labels=["a", "a"], eval_default=str(text_files["eval"]), log=lambda _: None)
    from transformers import AutoTokenizer

    other = save_tiny(tmp_path / "other-vocab", "llama", tokenizer_dir, layers=1, vocab=400)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    with pytest.raises(BenchInputError, match="different vocabulary"):
        run_bench(spec, [str(zoo["teacher"]), str(other)], tmp_path / "out", eval_default=str(text_files["eval"]), log=lambda _: None)
    assert not (tmp_path / "out" / "results.json").exists()


def test_report_inside_an_artifact_is_refused(tmp_path, tokenizer_dir, text_files, monkeypatch):
    import compress.bench.stage as stage

    model = save_tiny(tmp_path / "m", "llama", tokenizer_dir, layers=1)
    monkeypatch.setattr(stage, "inspect_artifact", lambda *a, **k: pytest.fail("artifacts inspected before the output check"))
    for output, message in ((model / "bench", "lies inside the input"), (tmp_path, "contains the input")):
        with pytest.raises(CompressError, match=message):
            run_bench(BenchSpec(**SPEC), [str(model)], output, eval_default=str(text_files["eval"]), log=lambda _: None)
    assert not (model / "bench").exists()


def _fake_distilled(target, student, inputs):
    """`student`'s files as a distillation artifact whose compress.json records `inputs` (a real run is slower)."""
    import shutil

    from compress.artifacts import ArtifactRecord, write_artifact

    record = ArtifactRecord(stage="distill", recipe={}, inputs=inputs)
    return write_artifact(target, record, lambda d: [shutil.copy2(f, d) for f in student.iterdir() if f.is_file()])


def test_teacher_is_found_through_the_lineage(zoo, tmp_path, text_files):
    from compress.artifacts import describe_input, read_record
    from compress.quantize.stage import run_quantize
    from compress.recipe import validate_recipe

    rtn = inspect_artifact(str(zoo["rtn4"]))
    assert rtn.kind == "gptq"
    assert teacher_from_lineage(rtn) is None  # a quantized float model that was never distilled has no teacher

    # a distilled student whose teacher was given by a path relative to another working directory: the teacher
    # is named by the absolute path recorded beside it
    teacher = zoo["teacher"].resolve()
    entry = {**describe_input("teacher", str(teacher), teacher), "source": "../elsewhere/teacher"}
    distilled = _fake_distilled(tmp_path / "student", zoo["student"], [entry, describe_input("train_data", str(text_files["train"]), text_files["train"])])
    assert teacher_from_lineage(inspect_artifact(str(distilled))) == str(teacher)
    # quantized on top (a real quantize stage, whose record names the student as its model input): the
    # lineage is followed upstream to the distillation's teacher
    recipe = validate_recipe({
        "data": {"train": str(text_files["train"]), "eval": str(text_files["eval"]), "seq_len": 32, "max_eval_tokens": 256, "cache_dir": str(zoo["cache"])},
        "quantize": {"method": "rtn", "bits": 4, "group_size": 32},
    })
    quantized = run_quantize(recipe, str(distilled), tmp_path / "student-rtn4", progress=False).artifact
    assert [(i["role"], i["path"]) for i in read_record(quantized)["inputs"]] == [("model", str(distilled.resolve()))]
    assert teacher_from_lineage(inspect_artifact(str(quantized))) == str(teacher)
    # compress bench given no teacher measures against that one
    spec = BenchSpec(**{**SPEC, "speed": False, "plots": False})
    report = run_bench(spec, [str(quantized)], tmp_path / "report", eval_default=str(text_files["eval"]), cache_dir=zoo["cache"], progress=False, log=lambda _: None)
    assert report.results["settings"]["teacher"] == str(teacher)
    assert report.results["artifacts"][0]["quality"]["kl_per_token"] > 0

    # a builtin teacher is named by its builtin name, not its cache folder; a teacher folder since removed by its source
    builtin = _fake_distilled(tmp_path / "builtin", zoo["student"], [{"role": "teacher", "source": "builtin:smollm2-135m", "path": str(teacher)}])
    assert teacher_from_lineage(inspect_artifact(str(builtin))) == "builtin:smollm2-135m"
    gone = _fake_distilled(tmp_path / "gone", zoo["student"], [{"role": "teacher", "source": "some/hub-teacher", "path": str(tmp_path / "removed")}])
    assert teacher_from_lineage(inspect_artifact(str(gone))) == "some/hub-teacher"
    # a lineage whose upstream model is no compress artifact ends without a teacher
    assert teacher_from_lineage(inspect_artifact(str(zoo["rtn4"]))) is None


def test_pareto_front():
    points = [(1.0, 10.0), (2.0, 8.0), (3.0, 9.0), (4.0, 5.0)]
    assert pareto_front(points, larger_x_better=False) == [0, 1, 3]
    assert pareto_front(points, larger_x_better=True) == [3]


def test_spec_refuses_prompts_longer_than_windows():
    with pytest.raises(ValueError, match="seq_len"):
        BenchSpec(seq_len=64, prompt_lengths=[128])


def test_cli_bench_reuses_measurements_and_prints_the_table(bench, zoo, text_files, capsys):
    from compress.cli import main

    argv = ["bench", str(zoo["teacher"]), str(zoo["onnx"]), "--output", str(bench.output), "--teacher", str(zoo["teacher"]), "--data", str(text_files["eval"]), "--no-progress"]
    for key, value in SPEC.items():
        argv += ["--set", f"bench.{key}={json.dumps(value)}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| `teacher` | float |" in out and "| `onnx-fp32` | onnx |" in out and "results.json" in out
    assert main(["bench", str(zoo["teacher"]), "--output", str(zoo["student"])]) == 2  # a model folder is not a report folder
    assert "not a compress bench folder" in capsys.readouterr().err
    assert main(["bench", str(zoo["teacher"]), "--output", str(zoo["teacher"])]) == 2  # nor is the artifact measured
    assert f"the output {zoo['teacher']} is the input" in capsys.readouterr().err


def test_a_failing_measurement_names_the_artifact_and_keeps_the_others(tmp_path, zoo, text_files):
    from compress.bench.speed import SpeedMeasurementError

    from conftest import save_tiny

    # a valid model (every check before measuring passes) whose vocabulary is smaller than its tokenizer's: the
    # prompt's token ids index past its embedding, which fails only inside the measuring child
    broken = save_tiny(tmp_path / "broken-weights", "llama", zoo["student"], layers=1, vocab=64, hidden_size=64, intermediate_size=128)
    spec = BenchSpec(**{**SPEC, "quality": False, "batch_sizes": [1], "repeats": 1})
    out = tmp_path / "out"
    with pytest.raises(SpeedMeasurementError, match="broken-weights"):
        run_bench(spec, [str(zoo["student"]), str(broken)], out, eval_default=str(text_files["eval"]), progress=False, log=lambda _: None)
    assert len(json.loads((out / MEASUREMENTS_FILE).read_text())) == 1  # the student's speed is kept for the rerun


# ---- one model at a time -------------------------------------------------------------------------------------

def _openers(zoo, labels):
    return {label: (lambda label=label: TorchSubject(inspect_artifact(str(zoo[label]), label), torch.device("cpu"))) for label in labels}


def test_logits_from_the_head_inputs_on_disk_equal_the_teachers(zoo, text_files, tmp_path):
    windows = _windows(zoo, text_files)
    teacher = TorchSubject(inspect_artifact(str(zoo["teacher"])), torch.device("cpu"))
    record = quality.record_teacher(teacher, windows, 2, tmp_path)
    assert record is not None and (tmp_path / quality.HEAD_INPUTS_FILE).stat().st_size == windows.numel() * 64 * 4
    for b in range(len(windows) // 2):
        assert torch.equal(record.logits(b), teacher.logits(windows[2 * b : 2 * b + 2]))


def test_on_disk_and_resident_teacher_give_the_same_numbers(zoo, text_files, tmp_path):
    windows = _windows(zoo, text_files)
    open_teacher = _openers(zoo, ["teacher"])["teacher"]
    labels = ["teacher", "student", "rtn4"]
    on_disk = quality.measure_quality(_openers(zoo, labels), windows, open_teacher=open_teacher, teacher_label="teacher", scratch=tmp_path)
    resident = quality.measure_quality(_openers(zoo, labels), windows, open_teacher=open_teacher, teacher_label="teacher", scratch=None)
    assert on_disk == resident
    assert on_disk["teacher"]["kl_per_token"] == 0 and on_disk["student"]["kl_per_token"] > 0


class Rescaled(TorchSubject):
    """A teacher whose logits are not its head's output (as a model that scales them would be)."""

    def logits(self, ids):
        return super().logits(ids) * 0.5


def test_a_teacher_whose_logits_are_not_its_heads_stays_loaded_and_is_still_exact(zoo, text_files, tmp_path):
    windows = _windows(zoo, text_files)
    said = []
    open_teacher = lambda: Rescaled(inspect_artifact(str(zoo["teacher"])), torch.device("cpu"))  # noqa: E731
    assert quality.record_teacher(open_teacher(), windows, 2, tmp_path) is None
    got = quality.measure_quality(_openers(zoo, ["student"]), windows, open_teacher=open_teacher, scratch=tmp_path, log=said.append)
    expected = quality.measure_quality(_openers(zoo, ["student"]), windows, open_teacher=open_teacher, scratch=None)
    assert got == expected and "stays loaded" in said[0]


def test_bench_loads_one_model_at_a_time(zoo, text_files, tmp_path, monkeypatch):
    alive: list[weakref.ref] = []
    most = [0]
    real = stage.open_subject

    def tracked(info, **kwargs):
        subject = real(info, **kwargs)
        model = getattr(subject, "model", None) or getattr(subject, "lm", None)
        alive.append(weakref.ref(model))
        most[0] = max(most[0], sum(r() is not None for r in alive))
        return subject

    monkeypatch.setattr(stage, "open_subject", tracked)
    spec = BenchSpec(**{**SPEC, "speed": False, "plots": False})
    names = [str(zoo[k]) for k in ("teacher", "student", "rtn4", "onnx")]
    report = run_bench(spec, names, tmp_path / "report", labels=["teacher", "student", "rtn4", "onnx"], teacher=str(zoo["teacher"]),
                       eval_default=str(text_files["eval"]), cache_dir=zoo["cache"], progress=False, log=lambda _: None)
    assert most[0] == 1, f"{most[0]} models were loaded at once"
    assert len(alive) == 4  # the teacher once (its own row is its recorded logits), then student, rtn4, onnx
    rows = {a["label"]: a["quality"] for a in report.results["artifacts"]}
    assert rows["teacher"]["kl_per_token"] == 0 and rows["onnx"]["kl_per_token"] < 1e-6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.teacher-")], "the teacher's head inputs were left on disk"
