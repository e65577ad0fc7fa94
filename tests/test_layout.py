"""Fitness tests of the layout: who may import whom, no import cycles, a small core, a documented contract.

The rules (README's folder table, docs/plugins.md): the core imports only itself and libraries; a
plugin family imports the core and its own family, never another family; no module imports itself
back through others, function-local imports included (only ``if TYPE_CHECKING:`` blocks, which never
run, are left out); the core stays a small share of the package code, without numba.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

from cbm_core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
CORE = "cbm_core"
FAMILIES = ("sources", "extractors", "markers", "cbm_plugins")
PACKAGES = (CORE, *FAMILIES)
MAX_CORE_SHARE = 0.35


def module_files() -> dict[str, Path]:
    """Every module of the five packages by dotted name (packages by their __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = module_files()


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


def imported_modules(name: str, source: str) -> set[str]:
    """Our modules a module imports anywhere in its body (functions included, TYPE_CHECKING not)."""
    tree = ast.parse(source)
    skipped = {id(n) for node in ast.walk(tree) if _type_checking_only(node) for n in ast.walk(node)}
    package = name if MODULES.get(name, Path()).name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: imported_modules(name, path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_graph_sees_function_local_imports_and_skips_type_checking():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sources import local\n"
    source += "def f():\n    from markers import mowing\n"
    assert imported_modules("cbm_core.example", source) == {"markers.mowing"}


def test_core_imports_no_plugin():
    for name, imports in GRAPH.items():
        if top(name) == CORE:
            assert {top(i) for i in imports} <= {CORE}, (name, sorted(imports))


def test_no_family_imports_another_family():
    for name, imports in GRAPH.items():
        family = top(name)
        if family in FAMILIES:
            foreign = sorted(i for i in imports if top(i) not in (family, CORE))
            assert not foreign, f"{name} imports {foreign}"


def test_private_modules_stay_inside_their_family():
    for name, imports in GRAPH.items():
        for target in imports:
            private = any(part.startswith("_") for part in target.split("."))
            if private:
                assert top(target) == top(name), f"{name} imports private {target}"


def test_no_import_cycle():
    """Tarjan's strongly connected components: any component of two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, cycles


def _code_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def test_core_is_a_small_share_of_the_package_code_and_has_no_numba():
    lines = {name: _code_lines(path) for name, path in MODULES.items()}
    core = sum(n for name, n in lines.items() if top(name) == CORE)
    share = core / sum(lines.values())
    assert share <= MAX_CORE_SHARE, f"cbm_core holds {share:.0%} of the package code"
    for name, path in MODULES.items():
        if top(name) == CORE:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert not any(m.split(".")[0] == "numba" for m in imported), name


@pytest.mark.parametrize("folder", ["cbm_example_plugin", "tests"])
def test_the_example_plugin_uses_only_the_public_api(folder):
    import cbm_core

    public = set(cbm_core.__all__)
    for path in sorted((ROOT / "examples" / "cbm-example-plugin" / folder).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                assert node.module == CORE, f"{path.name} imports {node.module}"
                assert {a.name for a in node.names} <= public, f"{path.name}: {ast.unparse(node)}"
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in PACKAGES for a in node.names), path.name


def test_every_hook_and_hook_argument_is_documented():
    """As datasette's test_plugin_hooks_are_documented: the docs table is generated from these."""
    hooks = {n: getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("cbm_")}
    arguments = {a for function in hooks.values() for a in inspect.signature(function).parameters}
    undocumented = sorted(arguments - set(hookspecs.ARGUMENTS))
    assert not undocumented, f"hook arguments missing from hookspecs.ARGUMENTS: {undocumented}"
    assert not set(hookspecs.ARGUMENTS) - arguments, "ARGUMENTS explains arguments no hook has"
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    docs_hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs_hooks)
    assert docs_hooks.HOOK_TABLE in (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    table = docs_hooks.hook_table()
    for name, function in hooks.items():
        row = next(line for line in table.splitlines() if f"`{name}(" in line)
        for argument in inspect.signature(function).parameters:
            assert f"`{argument}`: {hookspecs.ARGUMENTS[argument]}" in row, (name, argument)


def test_every_hook_has_a_caller_in_the_core():
    core_text = "\n".join(p.read_text(encoding="utf-8") for n, p in MODULES.items() if top(n) == CORE)
    for name in (n for n in dir(hookspecs) if n.startswith("cbm_")):
        assert f'"{name}"' in core_text or f"hook.{name}(" in core_text, f"no core caller of {name}"


def test_impl_is_imported_one_way():
    """Plugins mark hook implementations with `from cbm_core import impl`, never through hookspecs."""
    for name, path in MODULES.items():
        if name != CORE:
            assert "from cbm_core.hookspecs import impl" not in path.read_text(encoding="utf-8"), name
