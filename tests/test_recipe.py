from pathlib import Path

import pytest
import yaml

from compress.recipe import Recipe, RecipeError, describe_keys, dump_recipe, load_recipe, validate_recipe

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.distill.steps >= 1


def test_defaults():
    recipe = load_recipe(None)
    assert recipe.teacher.model == "builtin:smollm2-135m"
    assert recipe.student.from_teacher.layers == 10
    assert recipe.run_dir == Path("runs/run")


def test_unknown_key_names_file_and_path(tmp_path):
    path = write(tmp_path, "distill:\n  stepz: 5\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}: distill.stepz: unknown key" in str(err.value)


def test_wrong_type_names_key_and_expectation(tmp_path):
    path = write(tmp_path, "distill:\n  loss:\n    temperature: hot\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}: distill.loss.temperature" in msg and "valid number" in msg and "'hot'" in msg


def test_out_of_range_and_literal(tmp_path):
    path = write(tmp_path, "distill:\n  lr: -1\n  loss:\n    kind: kl\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "distill.lr: Input should be greater than 0" in msg
    assert "distill.loss.kind" in msg and "forward_kl" in msg


def test_student_needs_exactly_one_source(tmp_path):
    path = write(tmp_path, "student:\n  from_teacher: {layers: 2}\n  model: some/model\n")
    with pytest.raises(RecipeError, match="exactly one of"):
        load_recipe(path)


def test_bool_is_strict(tmp_path):
    with pytest.raises(RecipeError, match="teacher.trust_remote_code"):
        load_recipe(write(tmp_path, "teacher:\n  trust_remote_code: 'yes please'\n"))


def test_scientific_floats_without_dot(tmp_path):
    recipe = load_recipe(write(tmp_path, "distill:\n  lr: 3e-4\n"))
    assert recipe.distill.lr == pytest.approx(3e-4)


def test_overrides_reach_any_key(tmp_path):
    recipe = load_recipe(None, ["distill.steps=50", "distill.loss.kind=jsd", "student.from_teacher.layers=[0, 5]", "data.eval=null", "name=x"])
    assert recipe.distill.steps == 50
    assert recipe.distill.loss.kind == "jsd"
    assert recipe.student.from_teacher.layers == [0, 5]
    assert recipe.data.eval is None
    assert recipe.name == "x"


def test_override_errors(tmp_path):
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(None, ["distill.steps"])
    with pytest.raises(RecipeError, match="<defaults>: distill.nope: unknown key"):
        load_recipe(None, ["distill.nope=1"])
    with pytest.raises(RecipeError, match="name is not a section"):
        load_recipe(write(tmp_path, "name: x\n"), ["name.x=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "a: [1,\n"))
    with pytest.raises(RecipeError, match="mapping of sections"):
        load_recipe(write(tmp_path, "- 1\n- 2\n"))


@pytest.mark.parametrize("text", ["", "\n  \n", "# to do: fill in\n"])
def test_empty_recipe_file_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=f"recipe file is empty: {path}"):
        load_recipe(path, ["distill.steps=5"])
    assert load_recipe(write(tmp_path, "{}\n")) == load_recipe(None)  # an explicit empty mapping is all defaults


def test_round_trip():
    recipe = load_recipe(None, ["distill.hidden.pairs=[[1, 2]]", "distill.betas=[0.8, 0.9]"])
    again = validate_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe


def test_specs_are_frozen():
    recipe = Recipe()
    with pytest.raises(Exception):
        recipe.distill.steps = 3  # type: ignore[misc]


def test_warmup_must_fit():
    with pytest.raises(RecipeError, match="warmup_steps"):
        load_recipe(None, ["distill.steps=10", "distill.warmup_steps=10"])


def test_describe_keys_covers_every_leaf():
    rows = {path: (kind, default) for path, kind, default, _ in describe_keys()}
    assert rows["distill.loss.kind"][1] == '"forward_kl"'
    assert rows["distill.steps"] == ("int", "300")
    assert rows["data.eval"][1] == '"builtin:pydocs/eval"'
    assert rows["teacher.trust_remote_code"][1] == "false" and rows["data.cache_dir"][1] == "null"
    assert all(desc for *_, desc in describe_keys()), "every key needs a description"


def test_quantize_section_is_a_tagged_union(tmp_path):
    recipe = load_recipe(None, ["quantize.method=rtn", "quantize.bits=3", "quantize.group_size=-1"])
    assert recipe.quantize.method == "rtn" and recipe.quantize.bits == 3
    with pytest.raises(RecipeError, match=r"quantize.gptq.double_quant: unknown key"):
        load_recipe(None, ["quantize.method=gptq", "quantize.double_quant=true"])
    with pytest.raises(RecipeError, match=r"quantize: .*'zzz'.*'gptq', 'rtn', 'bnb-nf4'"):
        load_recipe(None, ["quantize.method=zzz"])
    with pytest.raises(RecipeError, match=r"quantize.gptq.bits: Input should be 2, 3, 4 or 8"):
        load_recipe(None, ["quantize.method=gptq", "quantize.bits=5"])
    with pytest.raises(RecipeError, match=r"group_size must be auto, -1"):
        load_recipe(None, ["quantize.method=gptq", "quantize.group_size=0"])
    with pytest.raises(RecipeError, match=r"quantize.gptq.damp: Input should be greater than 0"):
        load_recipe(None, ["quantize.method=gptq", "quantize.damp=0"])


@pytest.mark.parametrize("key", ["lm_head", "embedding"])
def test_int8_head_or_embedding_needs_a_quantized_export(key):
    with pytest.raises(RecipeError, match=f"export: .*{key}: int8 needs weights int4 or int8"):
        load_recipe(None, ["export.weights=fp32", f"export.{key}=int8"])
    assert getattr(load_recipe(None, ["export.weights=int4", f"export.{key}=int8"]).export, key) == "int8"
