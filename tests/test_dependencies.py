"""Declared dependencies match what the code imports, and each extra installs only what it is for."""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OWN = {"cbm_core", "cbm_plugins", "markers", "extractors", "sources"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extra(name: str) -> set[str]:
    """Distributions an extra installs directly, following its cbm-engine[...] references."""
    out: set[str] = set()
    for text in PROJECT["optional-dependencies"][name]:
        requirement = Requirement(text)
        if norm(requirement.name) == "cbm-engine":
            for inner in requirement.extras:
                out |= extra(inner)
        else:
            out.add(norm(requirement.name))
    return out


CORE = {norm(Requirement(text).name) for text in PROJECT["dependencies"]}


def imported(folders: list[Path]) -> dict[str, str]:
    """Top-level third-party modules imported anywhere in the folders (also inside functions and
    through importlib.import_module("name")), each with one file that imports it."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "import_module"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    names = [str(node.args[0].value)]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@functools.cache
def installed() -> dict[str, list[str]]:
    return md.packages_distributions()  # scans every installed distribution: once


def distribution(module: str) -> str:
    names = installed().get(module)
    assert names, f"{module}: imported but not installed"
    return norm(names[0])


def test_every_import_of_the_packages_is_declared():
    # pytest: imported only by cbm_core/testing.py, the fixtures plugin pytest itself loads
    declared = CORE | extra("all") | {"pytest"}  # `all`: every runtime extra
    packages = [ROOT / name for name in sorted(OWN)]
    undeclared = {
        f"{module} ({distribution(module)}, in {where})"
        for module, where in imported(packages).items()
        if distribution(module) not in declared
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"


# Scripts the tests run with another virtualenv's Python: the JRC client (cbm 0.0.18) lives in
# .venv-jrc, which scripts/test.sh makes, so that its pins never touch ours.
OWN_VENV_SCRIPTS = {"tests/jrc_client_calls.py"}


def test_every_import_of_the_tests_is_installed_by_the_test_command():
    """scripts/test.sh installs .[all,docs,test]: that must be all the tests import."""
    declared = CORE | extra("all") | extra("docs") | extra("test")
    undeclared = {
        f"{module} (in {where})"
        for module, where in imported([ROOT / "tests"]).items()
        if module != "tests"
        and not (ROOT / "tests" / f"{module}.py").exists()  # the tests' own helpers
        and where not in OWN_VENV_SCRIPTS
        and distribution(module) not in declared
    }
    assert not undeclared, sorted(undeclared)


def test_extras_install_only_what_they_are_for():
    assert not {"tensorflow", "tensorflow-cpu", "keras"} & extra("ml")  # ~1 GB for an optional model
    assert {"tensorflow-cpu", "scikit-learn", "skops"} <= extra("cnn")
    assert "skops" in extra("ml") and "orjson" in CORE and "urllib3" in CORE
    assert "psycopg" in extra("postgis") and "psycopg2-binary" not in extra("all")
    assert "httpx" not in CORE | extra("all") and "httpx" in extra("test")  # only fastapi's TestClient
    assert "exactextract" not in CORE | extra("all") | extra("test") and "exactextract" in extra("bench")
    assert extra("cnn") <= extra("all")  # the test suite trains the CNN too
