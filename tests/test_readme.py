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
