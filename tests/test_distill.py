"""End to end on tiny models: every family distils, artifacts record lineage, runs resume exactly, bad input fails clearly."""
import json
import os

import pytest
import torch
from conftest import FAMILIES, dead_pid, save_tiny, staging_name, tiny_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compress.artifacts import ArtifactExistsError, OutputPathError, hash_path, read_record
from compress.distill import loop
from compress.distill.loop import DistillError, run_distill
from compress.models import IncompatibleModelsError, ModelSourceError
from compress.recipe import validate_recipe


def recipe_for(tmp_path, teacher, text_files, student=None, **distill):
    data = tiny_recipe(tmp_path, teacher, text_files, **distill)
    if student is not None:
        data["student"] = student
    return validate_recipe(data)


@pytest.mark.parametrize("family", FAMILIES)
def test_distill_every_family(tmp_path, teachers, text_files, family):
    # A randomly initialised 2-layer student starts far from the teacher: distillation must close the gap.
    data = tiny_recipe(tmp_path, teachers[family], text_files, steps=12, eval_every=12, lr=1e-2)
    data.update(seed=1, student={"config": {tiny_layer_key(family): 2}})
    recipe = validate_recipe(data)
    result = run_distill(recipe, progress=False)
    m = result.metrics
    assert m["eval"]["kl_per_token"] < 0.7 * m["initial_eval"]["kl_per_token"], m
    assert m["eval"]["student_ppl"] < m["initial_eval"]["student_ppl"]
    reloaded = AutoModelForCausalLM.from_pretrained(result.artifact)
    assert reloaded.config.model_type == family


def tiny_layer_key(family):
    return "n_layer" if family == "gpt2" else "num_hidden_layers"


def test_artifact_records_lineage(tmp_path, teachers, text_files):
    recipe = recipe_for(tmp_path, teachers["llama"], text_files)
    result = run_distill(recipe, progress=False, recipe_file="tiny.yaml")
    record = read_record(result.artifact)
    assert record["stage"] == "distill" and record["recipe_file"] == "tiny.yaml"
    assert record["recipe"]["distill"]["steps"] == 6
    roles = {i["role"]: i for i in record["inputs"]}
    assert roles["teacher"]["sha256"] == hash_path(teachers["llama"])
    assert roles["train_data"]["sha256"] == hash_path(text_files["train"])
    for key in ("student_ppl", "teacher_ppl", "kl_per_token", "top1_agreement"):
        assert key in record["metrics"]["eval"]
    assert record["metrics"]["from_teacher_layers"] == [0, 3]
    assert {"torch", "transformers", "python"} <= set(record["versions"])
    assert record["device"]["type"] == "cpu" and record["wall_time_s"] > 0
    assert (result.artifact / "model.safetensors").is_file() and (result.artifact / "tokenizer.json").is_file()
    assert not list(result.artifact.parent.glob(".student.tmp-*")), "staging folder left behind"
    log = [json.loads(l) for l in (recipe.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))


def test_existing_output_is_not_overwritten(tmp_path, teachers, text_files):
    recipe = recipe_for(tmp_path, teachers["llama"], text_files, steps=2, eval_every=2, save_every=1)
    first = run_distill(recipe, progress=False)
    before = hash_path(first.artifact)
    with pytest.raises(ArtifactExistsError, match="already exists; pass --overwrite"):
        run_distill(recipe, progress=False)
    assert hash_path(first.artifact) == before
    run_distill(recipe, progress=False, overwrite=True)


def test_overwrite_refuses_a_student_folder_compress_did_not_write(tmp_path, teachers, text_files, monkeypatch):
    recipe = recipe_for(tmp_path, teachers["llama"], text_files, steps=2, eval_every=2, save_every=1)
    mine = recipe.run_dir / "student"
    mine.mkdir(parents=True)
    (mine / "notes.md").write_text("mine")
    monkeypatch.setattr(loop.models, "load_model", lambda *a, **k: pytest.fail("model loaded before the output check"))
    with pytest.raises(OutputPathError, match="not a compress artifact .*pass --overwrite-any") as err:
        run_distill(recipe, progress=False, overwrite=True)
    assert str(mine) in str(err.value)
    assert (mine / "notes.md").read_text() == "mine"


def test_overwrite_removes_only_the_runs_own_checkpoints(tmp_path, teachers, text_files):
    recipe = recipe_for(tmp_path, teachers["llama"], text_files, steps=2, eval_every=2, save_every=1)
    ckpts = recipe.run_dir / "checkpoints"
    old = ckpts / "step-00000099"
    old.mkdir(parents=True)
    (old / "state.json").write_text("{}")
    (ckpts / "README.txt").write_text("a note of mine")
    killed = ckpts / staging_name(ckpts / "step-00000001").replace(f"-{os.getpid()}@", f"-{dead_pid()}@")
    killed.mkdir()
    run_distill(recipe, progress=False, overwrite=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["README.txt", "step-00000001"]
    assert (ckpts / "README.txt").read_text() == "a note of mine"


def test_leftover_checkpoints_need_resume_or_overwrite(tmp_path, teachers, text_files, monkeypatch):
    recipe = recipe_for(tmp_path, teachers["llama"], text_files)
    interrupt_at(monkeypatch, call=5)
    with pytest.raises(KeyboardInterrupt):
        run_distill(recipe, progress=False)
    with pytest.raises(ArtifactExistsError, match="--resume"):
        run_distill(recipe, progress=False)


def interrupt_at(monkeypatch, call: int):
    """Make the `call`-th training step die like a killed process."""
    real, calls = loop._train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", step)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_killed_then_resumed_run_matches_uninterrupted(tmp_path, teachers, text_files, monkeypatch, grad_accum):
    straight = run_distill(recipe_for(tmp_path / "a", teachers["qwen2"], text_files, grad_accum=grad_accum), progress=False)

    recipe = recipe_for(tmp_path / "b", teachers["qwen2"], text_files, grad_accum=grad_accum)
    interrupt_at(monkeypatch, call=5)  # dies in step 5; the checkpoint of step 3 survives
    with pytest.raises(KeyboardInterrupt):
        run_distill(recipe, progress=False)
    assert (recipe.run_dir / "checkpoints" / "step-00000003" / "model.safetensors").is_file()
    monkeypatch.undo()
    resumed = run_distill(recipe, progress=False, resume=True)

    assert resumed.metrics["final_train_loss"] == pytest.approx(straight.metrics["final_train_loss"], rel=1e-5, abs=1e-7)
    assert resumed.metrics["eval"]["kl_per_token"] == pytest.approx(straight.metrics["eval"]["kl_per_token"], rel=1e-5)
    a, b = load_file(straight.artifact / "model.safetensors"), load_file(resumed.artifact / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_checkpoints_keep_last_k(tmp_path, teachers, text_files):
    recipe = recipe_for(tmp_path, teachers["llama"], text_files, steps=7, save_every=2, keep_last=2)
    run_distill(recipe, progress=False)
    names = sorted(p.name for p in (recipe.run_dir / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, teachers, text_files, monkeypatch):
    recipe = recipe_for(tmp_path, teachers["llama"], text_files, save_every=2)
    real, calls = loop._train_step, {"n": 0}

    def poisoned(model, objective, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                objective.student.get_input_embeddings().weight.fill_(float("nan"))
        return real(model, objective, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", poisoned)
    with pytest.raises(DistillError, match=r"loss became nan at step 4.*step-00000002"):
        run_distill(recipe, progress=False)
    good = load_file(recipe.run_dir / "checkpoints" / "step-00000002" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (recipe.run_dir / "student").exists()


def test_vocab_mismatch_is_refused(tmp_path, teachers, text_files, tokenizer_dir):
    other = save_tiny(tmp_path / "other", "llama", tokenizer_dir, vocab=400)
    recipe = recipe_for(tmp_path, teachers["llama"], text_files, student={"model": str(other)})
    with pytest.raises(IncompatibleModelsError, match="vocabularies differ: teacher lm_head has 384 rows, student 400"):
        run_distill(recipe, progress=False)


def test_missing_teacher_path_is_named(tmp_path, text_files):
    recipe = recipe_for(tmp_path, tmp_path / "no" / "such" / "teacher", text_files)
    with pytest.raises(ModelSourceError, match="model path not found: .*no/such/teacher"):
        run_distill(recipe, progress=False)


def test_existing_student_model_and_hidden_loss(tmp_path, teachers, text_files, tokenizer_dir, monkeypatch):
    from compress.distill.losses import token_divergence
    from compress.distill.objective import DistillObjective

    init = save_tiny(tmp_path / "init", "llama", tokenizer_dir, seed=3, layers=2)
    recipe_data = tiny_recipe(tmp_path, teachers["llama"], text_files)
    recipe_data["student"] = {"model": str(init)}
    recipe_data["distill"].update(hidden={"weight": 0.5, "pairs": [[1, 2], [2, 4]]}, loss={"kind": "jsd", "beta": 0.3, "ce_weight": 0.2, "chunk_size": 7})
    batches = []  # the training batches, in order (grad_accum 1: one per step)
    real_forward = DistillObjective.forward

    def spy(self, input_ids, teacher=None, *, eval_hidden=None):
        if eval_hidden is None:  # a training batch (evaluation runs through forward too)
            batches.append(input_ids.detach().clone())
        return real_forward(self, input_ids, teacher, eval_hidden=eval_hidden)

    monkeypatch.setattr(DistillObjective, "forward", spy)
    result = run_distill(validate_recipe(recipe_data), progress=False)
    roles = {i["role"] for i in read_record(result.artifact)["inputs"]}
    assert "student_init" in roles
    log = [json.loads(l) for l in (result.artifact.parent / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == len(batches) == 6
    # every step's loss is its weighted parts: (1 - ce_weight) * divergence + ce_weight * CE + hidden weight * MSE
    for r in log:
        assert r["loss"] == pytest.approx(0.8 * r["divergence"] + 0.2 * r["ce"] + 0.5 * r["hidden_mse"], rel=1e-5), r
    # step 1 ran the untrained student: recompute its parts from the two saved models on that batch
    ids = batches[0]
    with torch.no_grad():
        s = AutoModelForCausalLM.from_pretrained(init).eval()(input_ids=ids, output_hidden_states=True)
        t = AutoModelForCausalLM.from_pretrained(teachers["llama"]).eval()(input_ids=ids, output_hidden_states=True)
    # HF hidden_states: index 0 the embeddings, index i the output of block i (the last one normed)
    mse = sum(float((s.hidden_states[i] - t.hidden_states[j]).pow(2).mean()) for i, j in [(1, 2), (2, 4)]) / 2
    vocab = s.logits.shape[-1]
    zs, zt, labels = s.logits[:, :-1].reshape(-1, vocab), t.logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)
    jsd = float(token_divergence(zs, zt, "jsd", beta=0.3).mean())
    ce = float(torch.nn.functional.cross_entropy(zs, labels))
    first = log[0]
    assert first["hidden_mse"] == pytest.approx(mse, rel=1e-4) and mse > 0
    assert first["divergence"] == pytest.approx(jsd, rel=1e-4)
    assert first["ce"] == pytest.approx(ce, rel=1e-5)
    assert first["loss"] == pytest.approx(0.8 * jsd + 0.2 * ce + 0.5 * mse, rel=1e-4)
