"""Structured pruning: exact surgery, importance against direct computations, budgets and shapes, bad input."""
import json

import pytest
import torch
from conftest import save_tiny, tiny_config, tiny_recipe
from transformers import AutoModelForCausalLM

from compress import cli
from compress.architectures import StudentSpecError
from compress.prune import importance as imp
from compress.prune.measure import Importance, measure_importance
from compress.prune.stage import plan_prune, prune_model
from compress.prune.structure import Selection, Shape, build_pruned, count_parameters, select, teacher_shape, width_layout
from compress.recipe import PruneSpec, validate_recipe

WIDTH_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny(family="llama", layers=4, seed=0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, layers=layers, **overrides)).eval()


def ids(n=6, t=16, seed=1):
    return torch.randint(0, 384, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_keeping_everything_reproduces_the_teacher_exactly(family):
    teacher = tiny(family)
    shape = teacher_shape(teacher.config)
    scores = measure_importance(teacher, ids(), batch_size=4, width=True)
    student = build_pruned(teacher, shape, select(shape, shape, scores))
    x = ids(2, 12, seed=5)
    assert torch.equal(student(x).logits, teacher(x).logits)
    # The same through the width path: a selection that names every index explicitly.
    everything = Selection(
        layers=list(range(shape.num_hidden_layers)), hidden=list(range(shape.hidden_size)),
        q_heads={i: list(range(shape.num_attention_heads)) for i in range(shape.num_hidden_layers)},
        kv_heads={i: list(range(shape.num_key_value_heads)) for i in range(shape.num_hidden_layers)},
        mlp={i: list(range(shape.intermediate_size)) for i in range(shape.num_hidden_layers)},
    )
    student2 = build_pruned(teacher, shape, everything)  # every tensor cut by its role, nothing removed
    assert torch.equal(student2(x).logits, teacher(x).logits)


def _zeroed_reference(teacher, selection, shape):
    """The teacher with the dropped heads' o_proj columns and the dropped MLP channels' down_proj columns zeroed:
    removing them must give exactly the same function."""
    import copy

    ref = copy.deepcopy(teacher)
    t = teacher_shape(teacher.config)
    d = teacher.config.head_dim if getattr(teacher.config, "head_dim", None) else t.hidden_size // t.num_attention_heads
    for i, block in enumerate(ref.model.layers):
        if i in selection.q_heads:
            dropped = [h for h in range(t.num_attention_heads) if h not in selection.q_heads[i]]
            for h in dropped:
                block.self_attn.o_proj.weight.data[:, h * d : (h + 1) * d] = 0
        if i in selection.mlp:
            dropped = [c for c in range(t.intermediate_size) if c not in selection.mlp[i]]
            block.mlp.down_proj.weight.data[:, dropped] = 0
    return ref


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
@pytest.mark.parametrize("heads,kv", [(2, 2), (2, 1)])  # query heads inside each group; whole groups
def test_pruning_heads_and_channels_equals_zeroing_them(family, heads, kv):
    teacher = tiny(family)
    t = teacher_shape(teacher.config)
    scores = measure_importance(teacher, ids(), batch_size=3, width=True)
    shape = Shape(t.num_hidden_layers, t.hidden_size, 40, heads, kv)
    selection = select(shape, t, scores)
    student = build_pruned(teacher, shape, selection)
    assert student.config.num_attention_heads == heads and student.config.num_key_value_heads == kv
    assert sum(p.numel() for p in student.parameters()) == count_parameters(width_layout(teacher)[0], shape)
    x = ids(2, 12, seed=7)
    torch.testing.assert_close(student(x).logits, _zeroed_reference(teacher, selection, shape)(x).logits, rtol=1e-5, atol=1e-5)
    # A different choice of heads gives a different function (the comparison above can fail).
    other = Selection(layers=selection.layers, q_heads={i: sorted(set(range(t.num_attention_heads)) - set(v))[:heads] for i, v in selection.q_heads.items()},
                      kv_heads=selection.kv_heads, mlp=selection.mlp)
    if kv == t.num_key_value_heads:
        assert not torch.allclose(_zeroed_reference(teacher, other, shape)(x).logits, student(x).logits, atol=1e-4)


def test_dropping_blocks_equals_skipping_them():
    teacher = tiny("llama", layers=4)
    t = teacher_shape(teacher.config)
    scores = measure_importance(teacher, ids(), batch_size=3, width=False)
    shape = Shape(2, t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads)
    selection = select(shape, t, scores)
    assert selection.layers == sorted(scores.depth.topk(2).indices.tolist())
    student = build_pruned(teacher, shape, selection)
    x = ids(2, 12, seed=7)
    reference = _identity_blocks(teacher, [i for i in range(4) if i not in selection.layers])
    torch.testing.assert_close(student(x).logits, reference(x).logits)


def _identity_blocks(teacher, dropped):
    """The teacher with blocks made into the identity (their residual branches zeroed)."""
    import copy

    ref = copy.deepcopy(teacher)
    for i in dropped:
        ref.model.layers[i].self_attn.o_proj.weight.data.zero_()
        ref.model.layers[i].mlp.down_proj.weight.data.zero_()
    return ref


def test_hidden_channel_pruning_cuts_every_tensor_consistently():
    teacher = tiny("qwen2", layers=2)  # untied head, q/k/v biases
    t = teacher_shape(teacher.config)
    scores = measure_importance(teacher, ids(), batch_size=3, width=True)
    shape = Shape(2, 16, t.intermediate_size, 4, 2)
    selection = select(shape, t, scores)
    student = build_pruned(teacher, shape, selection)
    keep = torch.tensor(selection.hidden)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, keep])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, keep])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[keep])
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight[:, keep])
    assert torch.equal(student.model.layers[1].self_attn.q_proj.bias, teacher.model.layers[1].self_attn.q_proj.bias)
    assert torch.equal(student.model.layers[0].mlp.down_proj.weight, teacher.model.layers[0].mlp.down_proj.weight[keep])
    assert student.config.head_dim == 8 and student.config.hidden_size == 16
    student(ids(1, 8))  # runs with head_dim decoupled from hidden_size


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_parameter_arithmetic_matches_built_models(family):
    teacher = tiny(family)
    layout, why = width_layout(teacher)
    assert layout is not None, why
    t = teacher_shape(teacher.config)
    assert count_parameters(layout, t) == sum(p.numel() for p in teacher.parameters())
    for shape in (Shape(3, 16, 24, 2, 1), Shape(1, 32, 64, 4, 2), Shape(4, 24, 8, 4, 2)):
        config = tiny_config(family, layers=shape.num_hidden_layers, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                             num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads, head_dim=8)
        built = AutoModelForCausalLM.from_config(config)
        assert count_parameters(layout, shape) == sum(p.numel() for p in built.parameters()), shape


def test_importance_equals_a_direct_computation():
    teacher = tiny("llama", layers=3)
    x = ids(5, 10)
    scores = measure_importance(teacher, x, batch_size=2, width=True)  # 3 batches: accumulation is exercised
    # Block Influence from HF's own hidden states (blocks 0..L-2; the last entry is after the final norm).
    hs = teacher(x, output_hidden_states=True).hidden_states
    for i in range(2):
        cos = torch.nn.functional.cosine_similarity(hs[i].reshape(-1, 32), hs[i + 1].reshape(-1, 32), dim=-1)
        assert scores.block_influence[i].detach().item() == pytest.approx(float((1 - cos).mean().detach()), rel=1e-5)
    # Heads, MLP channels, hidden channels: the formula applied to captured activations, written out by hand.
    captured = {"o": [], "down": [], "norms": []}
    handles = [teacher.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured["o"].append(a[0])),
               teacher.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured["down"].append(a[0]))]
    for block in teacher.model.layers:
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            handles.append(norm.register_forward_hook(lambda m, a, out: captured["norms"].append(out)))
    handles.append(teacher.model.norm.register_forward_hook(lambda m, a, out: captured["norms"].append(out)))
    with torch.no_grad():
        teacher(x)
    for h in handles:
        h.remove()
    o, down = captured["o"][0], captured["down"][0]  # (5, 10, 32), (5, 10, 64)
    for head in range(4):
        per_seq = [float(sum(o[s, t, head * 8 : (head + 1) * 8].norm() for t in range(10)) / 10) for s in range(5)]
        assert scores.heads[1, head].item() == pytest.approx(sum(v * v for v in per_seq) ** 0.5, rel=1e-4)
    for c in (0, 17, 63):
        per_seq = [float(down[s, :, c].abs().mean()) for s in range(5)]
        assert scores.mlp[2, c].item() == pytest.approx(sum(v * v for v in per_seq) ** 0.5, rel=1e-4)
    for c in (0, 31):
        total = sum(float(out[s, :, c].abs().mean()) ** 2 for out in captured["norms"] for s in range(5))
        assert scores.hidden[c].item() == pytest.approx(total ** 0.5, rel=1e-4)


def test_skip_kl_is_the_kl_of_the_model_without_that_block():
    teacher = tiny("llama", layers=3)
    x = ids(4, 10)
    scores = measure_importance(teacher, x, batch_size=2, width=False, depth_metric="skip_kl")
    full = torch.log_softmax(teacher(x).logits[:, :-1], -1)
    skipped = torch.log_softmax(_identity_blocks(teacher, [1])(x).logits[:, :-1], -1)
    kl = (full.exp() * (full - skipped)).sum(-1).mean()
    assert scores.skip_kl[1].item() == pytest.approx(kl.item(), rel=1e-3)
    assert scores.depth is scores.skip_kl


def test_pure_statistics():
    a = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[0.0, 2.0], [-1.0, 2.0]]])  # (B=2, T=2, C=2)
    # channel 0: per-sequence means |a| = 2, 0.5 -> sqrt(4 + 0.25)
    assert imp.finish(imp.channel_square_sums(a))[0].item() == pytest.approx(4.25 ** 0.5)
    same = torch.randn(3, 5, 8)
    assert imp.block_influence_sums(same, 2 * same)[0] == pytest.approx(0.0, abs=1e-5)
    assert imp.block_influence_sums(same, -same)[0] == pytest.approx(2.0 * 15, rel=1e-5)
    assert imp.retained_fraction(torch.tensor([1.0, 3.0, 0.0, 4.0]), 2) == pytest.approx(7 / 8)


def test_budget_picks_a_valid_shape_within_budget():
    teacher = tiny("llama", layers=4)
    total = sum(p.numel() for p in teacher.parameters())
    spec = PruneSpec(target_params=0.6, multiple_of=8, calib_samples=4, proxy_samples=3, candidates=4)
    result = prune_model(teacher, ids(8, 16), spec, progress=False, log=lambda s: None)
    assert 0.55 * total <= result.parameters <= 0.6 * total
    assert result.parameters == sum(p.numel() for p in result.model.parameters())
    s = result.shape
    assert s.num_attention_heads % s.num_key_value_heads == 0 and s.hidden_size % s.num_attention_heads == 0
    assert s.hidden_size % 8 == 0 and s.intermediate_size % 8 == 0
    scored = result.report["scored"]
    assert result.report["chosen"] == min(scored, key=lambda r: r["proxy_kl_per_token"])
    assert len(scored) <= 4


def test_depth_only_for_families_without_width_roles():
    teacher = tiny("gpt2", layers=4)
    plan = plan_prune(teacher, PruneSpec(target_params=0.8, axes=["depth"], tolerance=0.3))
    assert {s.num_hidden_layers for s, _ in plan.candidates} <= {1, 2, 3}
    with pytest.raises(StudentSpecError, match=r"student.prune.axes.*use axes: \[depth\]"):
        plan_prune(teacher, PruneSpec(target_params=0.5, axes=["mlp"]))
    result = prune_model(teacher, ids(6, 16), PruneSpec(shape={"num_hidden_layers": 2}, calib_samples=3, proxy_samples=2), progress=False, log=lambda s: None)
    assert result.model.config.n_layer == 2


@pytest.mark.parametrize("spec,match", [
    (dict(target_params=0.01), r"student.prune.target_params: no valid shape .* smallest shape these axes reach has"),
    (dict(target_params=0.3, axes=["depth"]), r"student.prune.target_params: no valid shape with axes \['depth'\]"),
    (dict(target_params=10**9), r"not below the teacher's"),
    (dict(shape={"num_attention_heads": 3}), r"hidden_size 32 is not a multiple of num_attention_heads 3.*use num_attention_heads in \[1, 2, 4\]"),
    (dict(shape={"num_attention_heads": 4, "num_key_value_heads": 1}), r"num_attention_heads: 4 does not fit 1 key/value heads.*use one of \[1, 2\]"),
    (dict(shape={"hidden_size": 20}), r"hidden_size: 20 is not a multiple of 8 .*use 16 or 24"),
    (dict(shape={"intermediate_size": 100}), r"intermediate_size: 100 is out of range"),
    (dict(shape={"num_hidden_layers": 9}), r"num_hidden_layers: 9 is out of range; the teacher has 4 layers"),
])
def test_bad_budgets_and_shapes_are_refused_before_compute(spec, match):
    teacher = tiny("llama", layers=4)
    with pytest.raises(StudentSpecError, match=match):
        plan_prune(teacher, PruneSpec(multiple_of=8, **spec))


def test_recipe_needs_a_budget_or_a_shape():
    for bad in ({}, {"target_params": 0.5, "shape": {"hidden_size": 16}}, {"target_params": 1.5}):
        with pytest.raises(Exception, match="student.prune"):
            validate_recipe({"student": {"prune": bad}})


def test_compress_prune_writes_a_loadable_artifact(tmp_path, teachers, text_files, capsys):
    out = tmp_path / "pruned"
    code = cli.main(["prune", str(teachers["llama"]), "--target-params", "0.6", "--output", str(out), "--no-progress",
                     "--set", f"data.train={text_files['train']}", "--set", "data.seq_len=32", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                     "--set", "student.prune.multiple_of=8", "--set", "student.prune.calib_samples=8", "--set", "student.prune.proxy_samples=4"])
    assert code == 0, capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(out)
    record = json.loads((out / "compress.json").read_text())
    report = record["metrics"]["prune"]
    assert record["stage"] == "prune"
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.config.num_hidden_layers == report["shape"]["num_hidden_layers"] == len(report["kept"]["layers"])
    assert len(report["importance"]["block_influence"]) == 4 and report["scored"]
    assert model.config.use_cache is True


def test_compress_prune_bad_input_is_a_named_error(tmp_path, teachers, capsys):
    code = cli.main(["prune", str(teachers["llama"]), "--output", str(tmp_path / "o"), "--set", "student.prune.shape.num_attention_heads=3"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "num_attention_heads" in err
    assert not (tmp_path / "o").exists()


def test_distill_refuses_bad_student_before_loading_weights(tmp_path, teachers, text_files, monkeypatch):
    from compress import models
    from compress.distill.loop import run_distill

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights were loaded before the student was checked"))
    for student, match in (({"from_teacher": {"layers": [0, 7]}}, r"indices \[7\] out of range"),
                           ({"prune": {"target_params": 0.001}}, "no valid shape")):
        data = tiny_recipe(tmp_path, teachers["llama"], text_files)
        data["student"] = student
        with pytest.raises(StudentSpecError, match=match):
            run_distill(validate_recipe(data), progress=False)


def test_distill_from_a_pruned_student_reuses_the_pruned_artifact(tmp_path, teachers, text_files, monkeypatch):
    from compress.distill.loop import run_distill
    from compress.prune import stage

    data = tiny_recipe(tmp_path, teachers["llama"], text_files, steps=2, eval_every=2, save_every=2)
    data["student"] = {"prune": {"target_params": 0.6, "multiple_of": 8, "calib_samples": 6, "proxy_samples": 3}}
    result = run_distill(validate_recipe(data), progress=False)
    pruned = tmp_path / "run" / "pruned"
    assert result.metrics["pruned"]["shape"] == json.loads((pruned / "compress.json").read_text())["metrics"]["prune"]["shape"]
    monkeypatch.setattr(stage, "prune_model", lambda *a, **k: pytest.fail("pruned again although nothing changed"))
    again = run_distill(validate_recipe(data), progress=False, overwrite=True)
    assert again.metrics["pruned"] == result.metrics["pruned"]
    # A changed prune setting is not served from the old artifact.
    data["student"]["prune"]["target_params"] = 0.7
    with pytest.raises(pytest.fail.Exception, match="pruned again"):
        run_distill(validate_recipe(data), progress=False, overwrite=True)


def test_a_failed_prune_leaves_nothing_behind(tmp_path, teachers, text_files, monkeypatch):
    from compress import models

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(models, "save_model", broken)
    out = tmp_path / "pruned"
    with pytest.raises(OSError, match="disk full"):
        cli.main(["prune", str(teachers["llama"]), "--target-params", "0.6", "--output", str(out), "--no-progress",
                  "--set", f"data.train={text_files['train']}", "--set", "data.seq_len=32", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                  "--set", "student.prune.multiple_of=8", "--set", "student.prune.calib_samples=4", "--set", "student.prune.proxy_samples=2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no output, no staging folder


def test_shortlist_spans_the_depths_a_budget_allows():
    from compress.prune.stage import _shortlist

    teacher = tiny("llama", layers=6)
    plan = plan_prune(teacher, PruneSpec(target_params=0.6, multiple_of=8))
    scores = measure_importance(teacher, ids(), batch_size=3, width=True)
    # Block Influence as on SmolLM2: the first and last blocks hold most of it, so the prior alone
    # would score only shallow shapes.
    scores.depth = torch.tensor([10.0, 0.02, 0.01, 0.01, 0.02, 3.0])
    depths = {s.num_hidden_layers for s, _ in plan.candidates}
    short = _shortlist(plan, scores, 4)
    assert len(short) == 4 and len({s for s, _, _ in short}) == 4
    got = {s.num_hidden_layers for s, _, _ in short}
    assert min(depths) in got and max(depths) in got  # the shallowest and the full-depth (width-only) shapes are both scored
