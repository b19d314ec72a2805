"""README promises: it opens with the two set-up commands, CI runs the second verbatim, every recipe key is documented."""
from pathlib import Path

from compress.recipe import describe_keys, keys_markdown

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python3 -m venv")][:2]


def test_readme_opens_with_two_setup_commands():
    first, second = readme_commands()
    assert "compress run recipes/quickstart.yaml" in first
    assert "pytest" in second
    head = ROOT.joinpath("README.md").read_text()[:1500]
    assert first in head and second in head


def test_ci_runs_readme_test_command():
    ci = ROOT.joinpath(".ci/run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_readme_documents_every_recipe_key():
    readme = ROOT.joinpath("README.md").read_text()
    missing = [path for path, kind, _, _ in describe_keys() if kind != "section" and f"`{path}`" not in readme]
    assert not missing, f"README lacks recipe keys: {missing}"


def test_readme_key_table_is_current():
    assert keys_markdown() in ROOT.joinpath("README.md").read_text(), "regenerate the README key table from compress.recipe.keys_markdown()"


def test_results_tables_are_generated_from_their_json():
    """A results table typed or edited by hand (or left stale after a rerun) differs from what its script makes."""
    import json
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks import frontier, fuzz, gptq_ab_report

    results = ROOT / "benchmarks" / "results"
    ab, seeds = gptq_ab_report.rows(results / "gptq_ab.jsonl"), gptq_ab_report.rows(results / "gptq_seeds.jsonl")
    assert (results / "gptq_ab.md").read_text() == gptq_ab_report.ab_markdown(ab)
    assert (results / "gptq_seeds.md").read_text() == gptq_ab_report.seeds_markdown(ab, seeds)
    assert (results / "frontier.md").read_text() == frontier.markdown(json.loads((results / "frontier.json").read_text()))
    for name in ("frontier-0.7", "frontier_all"):
        assert (results / f"{name}.md").read_text() == frontier.markdown(json.loads((results / f"{name}.json").read_text()), f"{name}.json")
    assert (results / "fuzz.md").read_text() == fuzz.markdown(json.loads((results / "fuzz.json").read_text()))
    sys.path.insert(0, str(ROOT / "benchmarks"))  # accuracy_level imports its sibling scripts by name
    from benchmarks import accuracy_level

    assert (results / "accuracy_level.md").read_text() == accuracy_level.render(json.loads((results / "accuracy_level.json").read_text()))
    from benchmarks import families_gptq

    assert (results / "families_gptq.md").read_text() == families_gptq.render(json.loads((results / "families_gptq.json").read_text()))
    assert (results / "families_gptq_moe.md").read_text() == families_gptq.render(json.loads((results / "families_gptq_moe.json").read_text()))
    assert (results / "families_gptq_teacher.md").read_text() == families_gptq.render_compare(json.loads((results / "families_gptq_teacher.json").read_text()))
    from benchmarks import big_model

    assert (results / "big_model.md").read_text() == big_model.render(json.loads((results / "big_model.json").read_text()))
