"""The project's own invariants: nanolib matches its notebooks, notebooks were run top to bottom without
errors and open with their Colab badge and setup cell, and pip and conda list the same dependencies.
Each failure message names the command that fixes it."""
import ast
import importlib.metadata
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
    pip_side = _names(project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra])
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


def _canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them: 'Huggingface_Hub' -> 'huggingface-hub'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports(path: Path) -> set:
    """Top-level names of the absolute imports in a file, anywhere in it (inside functions too), less the
    standard library and nanolib itself."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "nanolib"}


def test_every_import_of_nanolib_is_a_declared_dependency():
    """A package nanolib imports must be in pyproject's [project] dependencies, not only arrive with another."""
    declared = set(_names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]))
    declared = {_canonical(n) for n in declared}
    distributions = importlib.metadata.packages_distributions()  # import name -> the distributions providing it
    problems = []
    for path in sorted((ROOT / "nanolib").glob("*.py")):
        for module in sorted(_third_party_imports(path)):
            provided_by = {_canonical(d) for d in distributions.get(module, [])}
            if not provided_by:
                problems.append(f"{path.name} imports {module}, which no installed distribution provides: "
                                f"install it and add it to pyproject.toml and environment.yml")
            elif not provided_by & declared:
                problems.append(f"{path.name} imports {module} (from {sorted(provided_by)}), not a declared "
                                f"dependency: add it to pyproject.toml's [project] dependencies and environment.yml")
    assert not problems, "\n".join(problems)


def test_nbdev_is_pinned_in_the_lab_extra_and_lesson_00_installs_that_pin_on_colab():
    lab = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["lab"]
    pins = [d for d in lab if re.fullmatch(r"nbdev==[\d.]+", d)]
    assert pins, "pin nbdev exactly (nbdev==X.Y.Z) in the lab extra"
    assert f'%pip install -q "{pins[0]}"' in (ROOT / "notebooks" / "00_setup.ipynb").read_text().replace('\\"', '"'), (
        f"lesson 00's export demo installs nbdev on Colab: make it install {pins[0]}")


# What pip puts into Colab's running kernel must leave Jupyter's own packages alone.
NOT_AT_RUNTIME = {"jupyterlab", "jupyter", "notebook", "jupyter-server", "jupyter-client", "nbclient", "nbformat",
                  "nbconvert", "nbval", "nbdev", "execnb", "widgetsnbextension", "jupyterlab-widgets", "pytest",
                  "selenium", "transformers", "pyyaml"}


def test_the_runtime_dependencies_hold_no_jupyter_notebook_tool_or_test_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_canonical(n) for n in _names(project["dependencies"])}
    assert not runtime & NOT_AT_RUNTIME, (f"{sorted(runtime & NOT_AT_RUNTIME)} are not needed by `import nanolib`: "
                                          "move them to the lab or test extra")
    assert {"jupyterlab", "nbdev"} <= {_canonical(n) for n in _names(project["optional-dependencies"]["lab"])}
    assert {"nbval", "pytest"} <= {_canonical(n) for n in _names(project["optional-dependencies"]["test"])}
    assert '.[lab,test]' in (ROOT / "Makefile").read_text(), "make lab and make test must install both extras"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_readme_lists_every_notebook_with_its_badge(path):
    readme = (ROOT / "README.md").read_text()
    assert nb.badge_markdown(path.name) in readme, f"add {path.name} and its Colab badge to README.md's lesson table"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "\nmake test\n" in ci, ".ci/run must call the README's test command"


def test_the_package_version_is_pyprojects():
    import nanolib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert nanolib.__version__ == version, (f"nanolib/__init__.py says {nanolib.__version__}, pyproject.toml "
                                            f"{version}: a release bumps both (then make badges)")


def test_the_environment_check_asks_for_pyprojects_minimum_versions():
    """Lesson 00's check_environment must not accept what pip would refuse, nor refuse what it accepts."""
    from nanolib.core import REQUIREMENTS

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(>=|==)\s*([\w.]+)", dep.split(";")[0].strip())
        if found:
            floors[_canonical(found.group(1))] = found.group(3)
    for module, (dist, minimum) in REQUIREMENTS.items():
        assert floors.get(_canonical(dist)) == minimum, (
            f"core.REQUIREMENTS wants {dist}>={minimum}, pyproject.toml says {floors.get(_canonical(dist))}: "
            "make them agree (lesson 00, then make export)")



def test_the_capstone_defines_nothing_and_asks_colab_for_a_gpu():
    """Lesson 10 only calls nanolib: its code cells hold no def, class or lambda, and import only nanolib,
    torch and the standard library."""
    import ast
    capstone = nb.read_nb(ROOT / "notebooks" / "10_train_gpt2.ipynb")
    for cell in capstone["cells"]:
        if cell["cell_type"] != "code":
            continue
        # IPython's magics (the Colab setup cell's %pip) are not Python: read them as `pass`
        code = "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!"))
                         else line for line in nb.source(cell).splitlines())
        for node in ast.walk(ast.parse(code)):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), (
                f"lesson 10 defines {getattr(node, 'name', 'a lambda')}: put it in nanolib (a lesson) instead")
            if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "level", 0) == 0:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top in ("nanolib", "torch") or top in sys.stdlib_module_names, f"lesson 10 imports {name}"
    assert capstone["metadata"].get("accelerator") == "GPU", "the capstone asks Colab for a GPU runtime"
