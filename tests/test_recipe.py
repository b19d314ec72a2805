import re
from pathlib import Path

import pytest
import yaml

from compress.corpus import BUILTIN_SPLITS, builtin_path
from compress.models import BUILTIN_MODELS, BUILTIN_PREFIX, _builtin_gguf
from compress.recipe import RecipeError, _Loader, describe_keys, dump_recipe, load_recipe, validate_recipe

ROOT = Path(__file__).parents[1]
RECIPES = sorted(ROOT.joinpath("recipes").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def leaves(node, prefix=()):
    """(key path, value) of every scalar or list a nested mapping sets."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, prefix + (key,))
    else:
        yield prefix, node


def builtin_sources(recipe) -> list[str]:
    """Every `builtin:` name a recipe reads (teacher, data, calibration, bench text)."""
    names = [recipe.teacher.model, recipe.data.train, recipe.data.eval, getattr(recipe.bench, "eval", None)]
    calib = getattr(recipe.quantize, "calib", None)
    names.append(getattr(calib, "source", None))
    return [n for n in names if isinstance(n, str) and n.startswith(BUILTIN_PREFIX)]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    # every value the file writes reaches the recipe as written, of the same type: nothing dropped by the
    # dump, renamed, or coerced by the spec (`steps: 150.0` would become 150)
    written = yaml.load(path.read_text(), Loader=_Loader)
    dumped = recipe.model_dump(mode="json")
    for keys, value in leaves(written):
        node = dumped
        for key in keys:
            node = node[key]
        assert node == value and type(node) is type(value), f"{path.name}: {'.'.join(keys)} is {node!r}, the file says {value!r}"
    # and the recipe round-trips through its YAML dump unchanged (the form stages record in compress.json)
    assert validate_recipe(yaml.safe_load(dump_recipe(recipe)), str(path)) == recipe
    # the builtin models and corpora it names ship with compress (no network)
    for name in builtin_sources(recipe):
        key = name[len(BUILTIN_PREFIX):]
        if key in BUILTIN_SPLITS:
            assert builtin_path(key).is_file(), name
        else:
            assert key in BUILTIN_MODELS, f"{path.name}: {name} is neither a builtin corpus nor a builtin model"
            assert _builtin_gguf(key).is_file()
    # files of this repository its comments point to exist
    named = set(re.findall(r"\b((?:benchmarks|recipes|compress|exporters|tests)/[\w./-]*\w\.(?:py|md|yaml))\b", path.read_text()))
    for rel in named:
        assert (ROOT / rel).is_file(), f"{path.name} names {rel}, which is not in the repository"


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
