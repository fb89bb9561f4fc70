"""The project's own invariants: nanolib matches its notebooks, notebooks were run top to bottom without
errors and open with their Colab badge and setup cell, and pip and conda list the same dependencies.
Each failure message names the command that fixes it."""
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import nb  # noqa: E402

NOTEBOOKS = nb.notebooks()


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:1] == ["00_setup.ipynb"]


def test_nanolib_matches_its_notebooks():
    problems = nb.export_diff()
    assert not problems, "\n".join(problems) + f"\nnanolib/ is generated: edit the notebook, then run {nb.FIX_EXPORT}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_execution_counts_run_in_order(path):
    problems = nb.count_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_error_outputs(path):
    problems = nb.error_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_badge_and_setup_cell(path):
    problems = nb.badge_problems(path)
    assert not problems, "\n".join(problems) + f"\nfix: {nb.FIX_BADGES}"


def _names(requirements):
    """{'torch>=2.4', ...} -> {'torch': 'torch>=2.4'} with names normalised."""
    out = {}
    for req in requirements:
        name = re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0]
        out[name.lower().replace("_", "-")] = req.replace(" ", "")
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_side = _names(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    conda_side = _names([r for lst in pip_lists for r in lst])
    conda_side.update(_names([d for d in env["dependencies"] if isinstance(d, str) and d not in ("pip",)
                              and not d.startswith("python")]))
    assert pip_side == conda_side, (
        f"pyproject.toml and environment.yml name different dependencies:\n"
        f"only in pyproject: {sorted(set(pip_side.items()) - set(conda_side.items()))}\n"
        f"only in environment.yml: {sorted(set(conda_side.items()) - set(pip_side.items()))}\n"
        "edit both so they agree")


def test_nbdev_is_pinned():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.fullmatch(r"nbdev==[\d.]+", d) for d in deps), "pin nbdev exactly (nbdev==X.Y.Z)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_readme_lists_every_notebook_with_its_badge(path):
    readme = (ROOT / "README.md").read_text()
    assert nb.badge_markdown(path.name) in readme, f"add {path.name} and its Colab badge to README.md's lesson table"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "\nmake test\n" in ci, ".ci/run must call the README's test command"
