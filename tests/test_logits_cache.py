"""Offline teacher logits end to end on tiny models: the cache equals the live teacher's top-k, it is keyed
so another teacher, data or k never reads it, a killed build resumes to the same bytes, distillation from it
never loads the teacher, evaluates exactly like the live teacher and resumes exactly."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, save_tiny, tiny_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compress import models
from compress.architectures import student_from_teacher
from compress.data import load_blocks
from compress.distill import logits_cache, loop
from compress.distill.logits_cache import LogitsCacheError, build_cache, cache_key, open_cache
from compress.distill.loop import logits_cache_key, run_distill, student_from_checkpoint
from compress.distill.sparse import TopKTargets, fused_sparse_distill_loss, topk_targets
from compress.distill.teacher import CachedTeacher, LiveTeacher
from compress.recipe import RecipeError, validate_recipe

TRAIN_TOKENS = 32 * 40  # 40 blocks of 32 tokens: 5 shards of 8


def cache_recipe(tmp_path, teacher, text_files, *, root, cache=None, student=None, **distill):
    """A tiny recipe distilling from a top-k cache (k = 8, shards of 8 blocks) kept under `root`."""
    data = tiny_recipe(tmp_path, teacher, text_files, **distill)
    data["data"]["max_train_tokens"] = TRAIN_TOKENS
    data["teacher"]["logits_cache"] = {"enabled": True, "top_k": 8, "dir": str(root), "shard_blocks": 8, **(cache or {})}
    if student is not None:
        data["student"] = student
    return data


def blocks_for(recipe):
    tokenizer = models.load_tokenizer(recipe.teacher.model)
    return tokenizer, load_blocks(recipe.data, tokenizer)


def build(recipe, root, **kw):
    """build_cache for a recipe, with the live teacher's top-k, as run_distill calls it."""
    tokenizer, blocks = blocks_for(recipe)
    spec, T = recipe.teacher.logits_cache, recipe.distill.loss.temperature
    live = LiveTeacher(models.load_model(recipe.teacher.model))
    topk = kw.pop("topk", lambda ids: live.topk(ids, spec.top_k, temperature=T, chunk_size=64))
    return build_cache(
        root, logits_cache_key(recipe, tokenizer, blocks), train_blocks=blocks.train, eval_blocks=blocks.eval, topk=topk,
        eval_hidden=lambda ids: live.eval_hidden(None, ids, batch_size=4), head=live.head, shard_blocks=spec.shard_blocks,
        batch_size=2, facts={"teacher": {"parameters": live.parameters}}, **kw,
    )


def shard_tensors(path):
    return {f.name: load_file(f) for f in sorted(Path(path).glob("*.safetensors"))}


# ---- the cache holds the live teacher's top-k --------------------------------------------------------------


@pytest.mark.parametrize("logprob_dtype", ["float32", "float16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_sparse_loss_equals_live_topk_loss(tmp_path, teachers, text_files, logprob_dtype, temperature):
    recipe = validate_recipe(cache_recipe(tmp_path, teachers["qwen2"], text_files, root=tmp_path / "logits", cache={"logprob_dtype": logprob_dtype}, loss={"temperature": temperature}))
    cache = build(recipe, tmp_path / "logits")
    assert cache.manifest["index_dtype"] == "uint16" and cache.manifest["shards"] == 5
    _, blocks = blocks_for(recipe)
    index = torch.tensor([3, 8, 39, 17])  # across shard boundaries, out of order
    ids = blocks.train[index]
    cached = CachedTeacher(cache, "cpu").train_outputs(index, ids, with_hidden_states=False)
    # The live top-k straight from the teacher's full logits (its own forward, lm_head included).
    teacher = AutoModelForCausalLM.from_pretrained(teachers["qwen2"]).eval()
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits[:, :-1]  # (b, T-1, V)
    live = topk_targets(logits.reshape(-1, logits.shape[-1]), 8, temperature=temperature)
    got = cached.rows()
    assert got.logprobs.shape == (4 * 31, 8) and got.indices.dtype == torch.int64
    assert torch.equal(got.indices, live.indices)
    torch.testing.assert_close(got.tail, live.tail, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-6) if logprob_dtype == "float32" else dict(rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(got.logprobs, live.logprobs, **tol)
    if logprob_dtype == "float16":  # exact once the live values are stored the same way
        assert torch.equal(got.logprobs, live.logprobs.half().float())

    g = torch.Generator().manual_seed(0)
    sh, sw = torch.randn(4 * 31, 16, generator=g), torch.randn(logits.shape[-1], 16, generator=g)
    labels = ids[:, 1:].reshape(-1)
    kw = dict(temperature=temperature, chunk_size=50)
    a = fused_sparse_distill_loss(sh, sw, None, got, labels, **kw)
    b = fused_sparse_distill_loss(sh, sw, None, live, labels, **kw)
    torch.testing.assert_close(a.loss, b.loss, **tol)
    if logprob_dtype == "float16":
        rounded = TopKTargets(live.logprobs.half().float(), live.indices, live.tail)
        torch.testing.assert_close(a.loss, fused_sparse_distill_loss(sh, sw, None, rounded, labels, **kw).loss, rtol=1e-6, atol=0)


def test_eval_blocks_and_head_are_stored_exactly(tmp_path, teachers, text_files):
    recipe = validate_recipe(cache_recipe(tmp_path, teachers["qwen2"], text_files, root=tmp_path / "logits"))
    cache = build(recipe, tmp_path / "logits")
    _, blocks = blocks_for(recipe)
    live = LiveTeacher(models.load_model(str(teachers["qwen2"])))
    cached = CachedTeacher(cache, "cpu")
    every = torch.arange(len(blocks.eval))
    want = live.eval_hidden(every, blocks.eval, batch_size=2)  # the batches the build used
    assert torch.equal(cached.eval_hidden(every, blocks.eval, batch_size=2), want)
    assert torch.equal(cached.eval_hidden(every[1::2], blocks.eval[1::2], batch_size=2), want[1::2])
    assert torch.equal(cached.head[0], live.head[0]) and cached.head[1] is None
    assert cached.vocab_size == 384 and cached.parameters == live.parameters


# ---- keyed: another teacher, tokenizer, data, seq_len, temperature or k never reads it -------------------


@pytest.mark.parametrize("change", [
    {"teacher": "other"},
    {"data": {"max_train_tokens": TRAIN_TOKENS // 2}},
    {"data": {"seq_len": 16}},
    {"cache": {"top_k": 4}},
    {"cache": {"logprob_dtype": "float32"}},
    {"distill": {"loss": {"temperature": 2.0}}},
], ids=["teacher", "data", "seq_len", "top_k", "dtype", "temperature"])
def test_cache_for_something_else_is_not_used(tmp_path, teachers, text_files, tokenizer_dir, change):
    base = validate_recipe(cache_recipe(tmp_path, teachers["llama"], text_files, root=tmp_path / "logits"))
    root = base.teacher.logits_cache.dir
    first = run_distill(base, progress=False).metrics["teacher_logits_cache"]
    assert first["build_s"] is not None

    data = cache_recipe(tmp_path / "b", teachers["llama"], text_files, root=tmp_path / "logits")
    data["teacher"]["logits_cache"]["dir"] = root
    if "teacher" in change:  # same architecture and tokenizer, other weights
        data["teacher"]["model"] = str(save_tiny(tmp_path / "other", "llama", tokenizer_dir, seed=7))
    for section, values in change.items():
        if section == "cache":
            data["teacher"]["logits_cache"].update(values)
        elif section == "distill":
            data["distill"].update(values)
        elif section == "data":
            data["data"].update(values)
    other = validate_recipe(data)
    tokenizer, blocks = blocks_for(other)
    key = logits_cache_key(other, tokenizer, blocks)
    assert key.digest != first["key"]
    assert open_cache(root, key) is None  # so it is built anew, never read

    # A cache put under the other key's name by hand is refused, naming what differs.
    shutil.copytree(f"{root}/{first['key']}", f"{root}/{key.digest}")
    with pytest.raises(LogitsCacheError, match=r"made for something else \(.*cache .*wanted"):
        run_distill(other, progress=False)


def test_key_covers_the_tokenizer(tmp_path):
    blocks = torch.arange(64).view(2, 32)
    kw = dict(teacher={"sha256": "t"}, train_blocks=blocks, eval_blocks=blocks[:1], temperature=1.0, top_k=8, logprob_dtype="float16")
    assert cache_key(tokenizer="a", **kw).digest != cache_key(tokenizer="b", **kw).digest
    assert cache_key(tokenizer="a", **kw) == cache_key(tokenizer="a", **kw)


def test_hidden_state_loss_with_cache_is_a_recipe_error(tmp_path, teachers, text_files):
    data = cache_recipe(tmp_path, teachers["llama"], text_files, root=tmp_path / "logits")
    data["distill"]["hidden"] = {"weight": 0.5}
    with pytest.raises(RecipeError, match="distill.hidden.weight > 0 needs the teacher's per-layer hidden states"):
        validate_recipe(data)


def test_top_k_above_vocab_is_refused_before_any_shard(tmp_path, teachers, text_files):
    recipe = validate_recipe(cache_recipe(tmp_path, teachers["llama"], text_files, root=tmp_path / "logits", cache={"top_k": 500}))
    with pytest.raises(LogitsCacheError, match=r"top_k=500 exceeds the teacher's vocabulary \(384 tokens\)"):
        run_distill(recipe, progress=False)
    assert not list((tmp_path.parent / "logits").glob("*/train-*"))


# ---- killed builds resume; a half-written shard is never taken as complete ---------------------------------


def die_after(monkeypatch, shards: int, *, midway: bool):
    """Kill the build after `shards` complete shards: between shards, or while writing the next one."""
    real, calls = logits_cache.save_file, {"n": 0}

    def save(tensors, path, metadata=None):
        if "shard" in (metadata or {}):
            calls["n"] += 1
            if calls["n"] > shards:
                if midway:
                    real(tensors, path, metadata=metadata)
                    data = open(path, "rb").read()
                    open(path, "wb").write(data[: len(data) // 2])  # a half-written temporary file
                raise KeyboardInterrupt
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(logits_cache, "save_file", save)


@pytest.mark.parametrize("midway", [False, True], ids=["between-shards", "inside-a-shard"])
def test_killed_build_resumes_and_equals_an_uninterrupted_one(tmp_path, teachers, text_files, monkeypatch, midway):
    recipe = validate_recipe(cache_recipe(tmp_path, teachers["llama"], text_files, root=tmp_path / "logits"))
    straight = build(recipe, tmp_path / "a")

    die_after(monkeypatch, 2, midway=midway)
    with pytest.raises(KeyboardInterrupt):
        build(recipe, tmp_path / "b")
    monkeypatch.undo()
    partial = tmp_path / "b" / f".{straight.manifest['digest']}.partial"
    assert sorted(p.name for p in partial.glob("train-*")) == ["train-00000.safetensors", "train-00001.safetensors"]
    assert len(list(partial.glob(".*.tmp-*"))) == (1 if midway else 0)
    assert open_cache(tmp_path / "b", logits_cache_key(recipe, *blocks_for(recipe))) is None

    # A shard that is complete in name only (truncated by a crash the rename did not cover) is redone too.
    second = partial / "train-00001.safetensors"
    second.write_bytes(second.read_bytes()[:-7])
    calls = []
    live = LiveTeacher(models.load_model(recipe.teacher.model))
    resumed = build(recipe, tmp_path / "b", topk=lambda ids: calls.append(len(ids)) or live.topk(ids, 8, temperature=1.0, chunk_size=64))
    assert sum(calls) == 40 - 8  # shard 0 kept; shards 1-4 computed
    assert not partial.exists() and not list(resumed.path.glob(".*"))
    a, b = shard_tensors(straight.path), shard_tensors(resumed.path)
    assert a.keys() == b.keys() and len(a) == 7  # five shards, eval, head
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    drop = lambda m: {k: v for k, v in m.items() if k != "created"}  # noqa: E731
    assert drop(straight.manifest) == drop(resumed.manifest)


def test_distill_resumes_a_killed_caching_run(tmp_path, teachers, text_files, monkeypatch):
    data = cache_recipe(tmp_path / "a", teachers["llama"], text_files, root=tmp_path / "logits", steps=2, eval_every=2)
    straight = run_distill(validate_recipe(data), progress=False)
    data = cache_recipe(tmp_path / "b", teachers["llama"], text_files, root=tmp_path / "logits-b", steps=2, eval_every=2)
    die_after(monkeypatch, 3, midway=True)
    with pytest.raises(KeyboardInterrupt):
        run_distill(validate_recipe(data), progress=False)
    monkeypatch.undo()
    resumed = run_distill(validate_recipe(data), progress=False)
    assert resumed.metrics["teacher_logits_cache"]["path"] != straight.metrics["teacher_logits_cache"]["path"]
    assert resumed.metrics["eval"] == straight.metrics["eval"]
    a, b = (shard_tensors(r.metrics["teacher_logits_cache"]["path"]) for r in (straight, resumed))
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


# ---- distillation from the cache -------------------------------------------------------------------------


def forbid_teacher(monkeypatch, teacher_path):
    """Loading the teacher model, by our loader or by transformers, now fails."""
    real_load, real_pretrained = models.load_model, AutoModelForCausalLM.from_pretrained

    def load_model(name, **kw):
        if str(name) == str(teacher_path):
            raise AssertionError("the teacher model was loaded")
        return real_load(name, **kw)

    def from_pretrained(source, *a, **kw):
        if str(source) == str(teacher_path):
            raise AssertionError("the teacher model was loaded")
        return real_pretrained(source, *a, **kw)

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)


@pytest.mark.parametrize("student", ["from_teacher", "config", "model"])
def test_distill_from_cache_never_loads_the_teacher(tmp_path, teachers, text_files, tokenizer_dir, monkeypatch, student):
    teacher = teachers["qwen2"]
    spec = {
        "from_teacher": {"from_teacher": {"layers": 2}},
        "config": {"config": {"num_hidden_layers": 2}},
        "model": {"model": str(save_tiny(tmp_path / "init", "qwen2", tokenizer_dir, seed=3, layers=2))},
    }[student]
    live_recipe = tiny_recipe(tmp_path / "live", teacher, text_files)
    live_recipe["student"] = spec
    live_recipe["data"]["max_train_tokens"] = TRAIN_TOKENS
    live = run_distill(validate_recipe(live_recipe), progress=False)
    run_distill(validate_recipe(cache_recipe(tmp_path / "build", teacher, text_files, root=tmp_path / "logits", steps=2, eval_every=2)), progress=False)

    forbid_teacher(monkeypatch, teacher)
    recipe = validate_recipe(cache_recipe(tmp_path / "cached", teacher, text_files, root=tmp_path / "logits", student=spec, steps=6, eval_every=3))
    cached = run_distill(recipe, progress=False)
    m = cached.metrics
    assert m["teacher_logits_cache"]["build_s"] is None  # read, not built
    assert m["teacher_parameters"] == live.metrics["teacher_parameters"]
    # Evaluation from the stored hidden states and head is the live teacher's, exactly; the student starts the same.
    assert m["initial_eval"] == live.metrics["initial_eval"]
    assert m["eval"]["teacher_ppl"] == live.metrics["eval"]["teacher_ppl"]
    assert m["eval"]["kl_per_token"] < m["initial_eval"]["kl_per_token"]
    log = [json.loads(line) for line in (recipe.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and all(r["divergence"] >= 0 for r in log)
    roles = {i["role"] for i in json.loads((cached.artifact / "compress.json").read_text())["inputs"]}
    assert {"teacher", "teacher_logits"} <= roles


def test_killed_then_resumed_cached_run_matches_uninterrupted(tmp_path, teachers, text_files, monkeypatch):
    straight = run_distill(validate_recipe(cache_recipe(tmp_path / "a", teachers["qwen2"], text_files, root=tmp_path / "logits", loss={"kind": "jsd", "beta": 0.3})), progress=False)
    recipe = validate_recipe(cache_recipe(tmp_path / "b", teachers["qwen2"], text_files, root=tmp_path / "logits", loss={"kind": "jsd", "beta": 0.3}))
    real, calls = loop._train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", step)
    with pytest.raises(KeyboardInterrupt):
        run_distill(recipe, progress=False)
    monkeypatch.undo()
    forbid_teacher(monkeypatch, teachers["qwen2"])
    resumed = run_distill(recipe, progress=False, resume=True)
    assert resumed.metrics["final_train_loss"] == pytest.approx(straight.metrics["final_train_loss"], rel=1e-5, abs=1e-7)
    a, b = load_file(straight.artifact / "model.safetensors"), load_file(resumed.artifact / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_sparse_training_differs_from_dense_and_approaches_it_with_k(tmp_path, teachers, text_files):
    """The cache changes the loss (a top-k estimator), and with k = V it is the full loss again."""
    base = tiny_recipe(tmp_path / "live", teachers["llama"], text_files, steps=3, eval_every=3)
    base["data"]["max_train_tokens"] = TRAIN_TOKENS
    dense = run_distill(validate_recipe(base), progress=False)
    full = run_distill(validate_recipe(cache_recipe(tmp_path / "full", teachers["llama"], text_files, root=tmp_path / "logits", cache={"top_k": 384, "logprob_dtype": "float32"}, steps=3, eval_every=3)), progress=False)
    small = run_distill(validate_recipe(cache_recipe(tmp_path / "small", teachers["llama"], text_files, root=tmp_path / "logits", cache={"top_k": 2}, steps=3, eval_every=3)), progress=False)
    assert full.metrics["final_train_loss"] == pytest.approx(dense.metrics["final_train_loss"], rel=1e-4)
    assert small.metrics["final_train_loss"] < dense.metrics["final_train_loss"]  # never above the full divergence


@pytest.mark.parametrize("family", FAMILIES)
def test_student_from_checkpoint_equals_student_from_teacher_model(tmp_path, teachers, text_files, monkeypatch, family):
    recipe = validate_recipe(tiny_recipe(tmp_path, teachers[family], text_files))
    teacher = models.load_model(str(teachers[family]))
    want, keep = student_from_teacher(teacher, [0, 2])
    if family != "qwen3_moe":  # its checkpoint stores experts per projection, which transformers fuses on load: the fallback loads it
        forbid_teacher(monkeypatch, teachers[family])  # no fallback to loading the model
    got, keep2 = student_from_checkpoint(recipe, models.load_config(str(teachers[family])), [0, 2])
    assert keep == keep2 == [0, 2]
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pruned_student_from_a_cache_loads_the_teacher_only_to_prune(tmp_path, teachers, text_files, monkeypatch):
    teacher = teachers["llama"]
    prune = {"prune": {"target_params": 0.6, "multiple_of": 8, "calib_samples": 6, "proxy_samples": 3}}
    first = validate_recipe(cache_recipe(tmp_path / "a", teacher, text_files, root=tmp_path / "logits", student=prune, steps=2, eval_every=2, save_every=2))
    result = run_distill(first, progress=False)  # builds the cache and prunes (both need the teacher)
    assert result.metrics["pruned"]["parameters"] < result.metrics["teacher_parameters"]
    # Same run folder again: the pruned student and the cache are both reused, so the teacher is never loaded.
    forbid_teacher(monkeypatch, teacher)
    again = run_distill(first, progress=False, overwrite=True)
    assert again.metrics["pruned"] == result.metrics["pruned"]
    assert again.metrics["teacher_logits_cache"]["build_s"] is None


def test_targets_read_under_bf16_autocast(tmp_path, teachers, text_files):
    # distill.precision bf16 on CPU runs the training step under autocast; reading uint16 ids must still work.
    from accelerate.state import AcceleratorState

    recipe = validate_recipe(cache_recipe(tmp_path, teachers["qwen2"], text_files, root=tmp_path / "logits", steps=2, eval_every=2, precision="bf16"))
    AcceleratorState._reset_state(True)  # accelerate keeps one mixed-precision setting per process
    try:
        result = run_distill(recipe, progress=False)
    finally:
        AcceleratorState._reset_state(True)
    assert result.steps == 2 and result.metrics["eval"]["kl_per_token"] > 0
