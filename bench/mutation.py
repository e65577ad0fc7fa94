"""Mutation testing of the modules where a silent bug changes verdicts or leaks data.

    python bench/mutation.py                      # every module in MODULES, JSON on stdout
    python bench/mutation.py --module rule        # one module
    python bench/mutation.py --module rule --list # the mutants, without running anything
    nice -n 19 python bench/mutation.py --module model --out bench/mutation-model.json

Each mutant is one small AST change (operators after mutmut's: a comparison or boolean operator
swapped, one operand of `and`/`or` dropped, `not` or unary minus removed, arithmetic swapped, a number
off by one, a boolean flipped, a data string changed, a call statement removed, a condition negated,
an element of a constant tuple/list/set dropped) applied to one module. The module's
focused test selection runs against it; the mutant is *killed* when a test fails (or hangs), and
*survives* when every test passes. Mutants on lines no selected test executes are not run: they
count as survivors ("not covered").

Why not mutmut or cosmic-ray: mutmut 3 switches mutants through function trampolines, so it never
mutates module-level constants (the SCL validity policy `DEFAULT_UNUSABLE_CLASSES` is one, and a
changed class there was a surviving bug) and it cannot trampoline numba functions; cosmic-ray runs
one fresh interpreter per mutant and has no coverage filter, about 6 s per mutant here before a
test even starts (numpy, pandas, geopandas, numba imports). This runner imports the third-party
libraries once and forks a child per mutant (about 1-2 s per mutant), from a private copy of the
repository, so tests that start `cbm` subprocesses see the mutant too.

The report (JSON) gives per module: mutants, killed, survived (with line, function and change),
not covered, the kill rate, and the kill rate counting the mutants listed in EQUIVALENT (mutants
that cannot change behaviour, each with the reason) as killed. docs/testing.md lists the scores.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cbm_core", "cbm_plugins", "extractors", "markers", "sources")
LINKED = ("demo", "docs", "examples", "registry.toml", "pyproject.toml", "README.md", "bench")
PRELOAD = (  # third-party imports of the project and of the test plugins: ~6 s per fresh interpreter
    "numpy", "pandas", "geopandas", "shapely", "pyarrow.parquet", "pyarrow.dataset", "pyproj", "rasterio",
    "rasterio.features", "rasterio.windows", "rasterio.session", "numba", "scipy.spatial", "scipy.ndimage",
    "pluggy", "click", "tqdm.auto", "requests", "boto3", "psycopg2", "fastapi", "httpx", "orjson",
    "starlette.testclient", "pytest", "hypothesis", "hypothesis.strategies", "schemathesis",
    "schemathesis.pytest", "schemathesis.graphql", "trio", "coverage", "pytest_cov", "rasterstats",
)  # fmt: skip
TIMEOUT_FACTOR = 3.0  # a mutant running this many times longer than the clean run counts as a hang
TIMEOUT_FLOOR = 20.0
SAMPLE_SEED = 19


@dataclass(frozen=True)
class Target:
    """One module under mutation: its file, the functions to mutate (all when empty) and its tests."""

    path: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()


MODULES: dict[str, Target] = {
    "model": Target(
        "cbm_core/model.py",
        ("tests/test_mutants_model.py", "tests/test_claims_rule.py"),
    ),
    "rule": Target("cbm_plugins/traffic_light.py", ("tests/test_claims_rule.py",)),
    "parquet": Target("sources/parquet.py", ("tests/test_claims_stores.py",)),
    "postgis": Target(
        "sources/postgis.py",
        (
            *(
                f"tests/test_claims_postgis.py::{t}"
                for t in (
                    "test_scene_and_band_values_round_trip_and_filter_exactly",
                    "test_claim_and_release_values_are_stored_as_given",
                    "test_parcel_values_round_trip",
                    "test_catalogue_values_round_trip",
                )
            ),
            "tests/test_postgis.py::test_store_round_trip_replaces_scenes_exactly",
            "tests/test_postgis.py::test_released_claims_are_claimable_at_once_and_only_the_holders_are_touched",
            "tests/test_postgis.py::test_identifiers_from_configuration_cannot_inject_sql",
        ),
        # the SQL layer: the functions that build or run a query on signatures, scenes or claims
        (
            "Tables",
            "tables",
            "cbm_store_write",
            "cbm_store_read",
            "cbm_store_obsids",
            "cbm_store_claim",
            "cbm_store_release",
            "_scenes_of",
            "_delete_scenes",
            "_copy_scenes",
            "_catalogue_ids",
            "_copy_text",
            "_escape",
            "import_parcels",
            "import_catalogue",
        ),
    ),
    "auth": Target(
        "cbm_plugins/serve/_users.py",
        (
            "tests/test_claims_server.py",
            "tests/test_server.py::test_only_verified_passwords_skip_the_hash_until_the_users_file_changes",
            "tests/test_server.py::test_users_command_hashes_passwords",
            "tests/test_server_hardening.py::test_users_file_with_a_string_of_aois_is_refused",
        ),
    ),
    "aoi": Target(
        "cbm_plugins/serve/_datasets.py",
        ("tests/test_claims_server.py",),
        ("Datasets.lookup", "Datasets.covering"),
    ),
    "http": Target("cbm_plugins/serve/_http.py", ("tests/test_claims_server.py",)),
    "zonal": Target(
        "extractors/zonal.py",
        tuple(
            f"tests/test_mutants_zonal.py::{t}"
            for t in (
                "test_reference_statistics_are_numpy_on_the_pixel_centres_inside",
                "test_reference_leaves_out_nodata_and_nan_and_counts_scl_classes",
                "test_reference_reprojects_parcels_skips_missing_bands_and_empty_outlines",
                "test_window_edges_are_exclusive",
            )
        ),
    ),
    "kernels": Target(
        "extractors/_kernels.py",
        (
            "tests/test_mutants_zonal.py::test_kernels_equal_numpy_exactly",
            "tests/test_mutants_zonal.py::test_kernel_class_histogram_and_physical_units",
        ),
        ("zonal_stats", "class_histogram", "to_physical", "stats_frame", "scl_frame"),
    ),
}

# Mutants that cannot change behaviour: (module, function, change, why they survive).
EQUIVALENTS = [
    (
        "rule",
        "cbm_rule_decide",
        "failed and passed and (light == Light.RED) -> passed and light == Light.RED",
        "a red light with a passing marker implies a failed one (_combine is red only with a failure)",
    ),
    (
        "rule",
        "_judge",
        "pd.notna(confidence) and confidence < rule['min_confidence'] -> confidence < rule['min_confidence']",
        "NaN < x is False, so a missing confidence is trusted either way (the guard documents it)",
    ),
    ("rule", "_judge", "'[]' -> 'XX[]XX'", "a shortcut: json.loads('[]') is [] too"),
    (
        "rule",
        "_counts",
        "10 -> 11",
        "event dates in marker results are ISO dates of 10 characters (model._jsonable)",
    ),
    ("rule", "_combine", "False -> True", "the default is never used: the only caller passes the flag"),
    (
        "rule",
        "<module>",
        r"re:^(\{'expect', 'min_confidence'|\{'season_start'|'(expect|min_confidence|min_events|max_events|"
        r"min_valid|max_gap_days|season_start|season_end|kinds|crops)' ->)",
        "MARKER_RULE_KEYS is never read (dead code: unknown per-marker rule keys are not refused; reported)",
    ),
    (
        "rule",
        "_describe",
        "event.get('obsids') or [] -> event.get('obsids')",
        "obsids of an event are always a JSON list (model.to_json of a tuple)",
    ),
    (
        "model",
        "validate_signatures",
        "'count' -> 'XXcountXX'",
        "the float64 cast it guards is overridden by the int64 cast of count that follows",
    ),
    (
        "model",
        "_checked_geometries",
        "'parcels' -> 'XXparcelsXX'",
        "a default for `what` that no caller uses (validate_parcels always names the table)",
    ),
    (
        "model",
        "ValidityPolicy.screen",
        "self.require_scl and missing.any() -> self.require_scl",
        "assigning through an all-false mask changes nothing",
    ),
    (
        "model",
        "ValidityPolicy.screen",
        "ndvi is not None and self.dip is not None -> self.dip is not None",
        "np.asarray(None, float) is NaN: without a finite NDVI no dip is found either way",
    ),
    (
        "model",
        "ValidityPolicy.screen",
        "hist is not None and n -> hist is not None",
        "with no observation every array is empty: the SCL screen does nothing either way",
    ),
    (
        "zonal",
        "_parcel_values",
        r"re:^window\.transform @ .* -> window\.transform \* ",
        "affine's `*` is the deprecated spelling of `@`: the same transform",
    ),
    (
        "zonal",
        "cbm_extractor_extract",
        "0 -> 1",
        "`array.size == 0` -> `== 1`: an empty window meets no parcel either way (_parcel_values gives None)",
    ),
    (
        "parquet",
        "cbm_store_write",
        "False -> True",
        "groupby(sort=False) -> sort=True: the groups are looked up by obsid, their order is unused",
    ),
    (
        "parquet",
        "_write_atomic",
        "False -> True",
        "preserve_index=True after reset_index(drop=True) and with an explicit schema adds nothing",
    ),
]
EQUIVALENT = {
    (module, function, change): why
    for module, function, change, why in EQUIVALENTS
    if not change.startswith("re:")
}
EQUIVALENT_PATTERNS = [
    (module, function, re.compile(change[3:]), why)
    for module, function, change, why in EQUIVALENTS
    if change.startswith("re:")
]


def equivalent(module: str, function: str, change: str) -> str | None:
    """Why a surviving mutant is equivalent, if it is listed in EQUIVALENTS."""
    if (module, function, change) in EQUIVALENT:
        return EQUIVALENT[(module, function, change)]
    for name, where, pattern, why in EQUIVALENT_PATTERNS:
        if name == module and where == function and pattern.search(change):
            return why
    return None


# Mutation operators -----------------------------------------------------------------------------

COMPARE_SWAP = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}  # fmt: skip
BINOP_SWAP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.Pow: ast.Mult,
    ast.RShift: ast.LShift, ast.LShift: ast.RShift, ast.MatMult: ast.Mult,
}  # fmt: skip
SAFETY_NETS = {"strict"}  # zip(strict=True) -> False changes nothing for inputs of equal length
NUMBA_DECORATORS = {"njit", "jit", "vectorize", "guvectorize", "stencil"}


@dataclass
class Mutant:
    index: int
    line: int
    function: str
    change: str
    status: str = "pending"  # killed | survived | timeout | not covered
    seconds: float = 0.0


@dataclass
class Report:
    module: str
    path: str
    tests: list[str]
    mutants: int = 0
    killed: int = 0
    survived: int = 0
    not_covered: int = 0
    equivalent: int = 0
    kill_rate: float = 0.0
    kill_rate_without_equivalent: float = 0.0
    seconds: float = 0.0
    sampled: str = ""  # with --sample: how many of the covered mutants were run
    survivors: list[dict] = field(default_factory=list)


def _is_docstring(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    parent = parents.get(node)
    if not isinstance(parent, ast.Expr):
        return False
    holder = parents.get(parent)
    body = getattr(holder, "body", None)
    return isinstance(body, list) and body and body[0] is parent


def _meaningful(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """A string whose value is data (compared, returned, in a constant collection, a default), not
    a column name or key a mutant would only turn into a KeyError, nor a message."""
    parent = parents.get(node)
    if isinstance(parent, ast.Dict):
        return any(v is node for v in parent.values)
    return isinstance(
        parent,
        ast.Compare
        | ast.Return
        | ast.Tuple
        | ast.List
        | ast.Set
        | ast.keyword
        | ast.IfExp
        | ast.BoolOp
        | ast.Assign
        | ast.AnnAssign
        | ast.arguments,
    )


def _constants(node: ast.Tuple | ast.List | ast.Set) -> bool:
    """A short literal collection of constants, such as a policy's class list."""
    return 1 < len(node.elts) <= 12 and all(isinstance(e, ast.Constant) for e in node.elts)


def _numba(func: ast.AST) -> bool:
    for decorator in getattr(func, "decorator_list", []):
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name in NUMBA_DECORATORS:
            return True
    return False


def _sites(
    tree: ast.Module, lines: list[str], functions: tuple[str, ...]
) -> list[tuple[int, str, int, str, tuple[int, int]]]:
    """Every mutation site as (node number in ast.walk order, operator, line, qualified function,
    first and last line of the enclosing statement)."""
    parents: dict[ast.AST, ast.AST] = {}
    scope: dict[ast.AST, str] = {}
    skip: set[ast.AST] = set()

    def visit(node: ast.AST, qual: str, skipping: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            qual = f"{qual}.{node.name}" if qual else node.name
            skipping = skipping or _numba(node)
        if skipping:
            skip.add(node)
        scope[node] = qual
        for child in ast.iter_child_nodes(node):
            parents[child] = node
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and child in node.decorator_list:
                skip.add(child)
            annotation = isinstance(node, ast.arg | ast.AnnAssign) and child is node.annotation
            returns = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and child is node.returns
            visit(child, qual, skipping or annotation or returns or child in skip)

    visit(tree, "", False)

    def wanted(node: ast.AST) -> bool:
        if node in skip or not hasattr(node, "lineno"):
            return False
        if "pragma: no mutate" in lines[node.lineno - 1]:
            return False
        qual = scope.get(node, "")
        if functions:
            return any(qual == f or qual.startswith(f + ".") for f in functions)
        return True

    def in_fstring(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.JoinedStr):
                return True
        return False

    found = []
    for number, node in enumerate(ast.walk(tree)):
        if not wanted(node):
            continue
        qual = scope.get(node, "") or "<module>"
        ops: list[str] = []
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARE_SWAP:
            ops.append("compare")
        elif isinstance(node, ast.BoolOp):
            ops += ["and/or"] + [f"drop:{i}" for i in range(len(node.values))]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            ops.append("not")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            ops.append("neg")
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAP:
            ops.append("binop")
        elif isinstance(node, ast.Constant) and not in_fstring(node) and not _is_docstring(node, parents):
            if isinstance(node.value, bool):
                if not (isinstance(parents.get(node), ast.keyword) and parents[node].arg in SAFETY_NETS):
                    ops.append("bool")
            elif isinstance(node.value, int | float):
                ops.append("number")
            elif isinstance(node.value, str) and 0 < len(node.value) <= 40 and _meaningful(node, parents):
                ops.append("string")
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            ops.append("remove-call")
        elif isinstance(node, ast.If | ast.While | ast.IfExp) and not isinstance(node.test, ast.Compare):
            ops.append("negate-condition")  # a comparison is already swapped by "compare"
        elif isinstance(node, ast.Tuple | ast.List | ast.Set) and _constants(node):
            ops += [f"drop-element:{i}" for i in range(len(node.elts))]
        statement = node
        while not isinstance(statement, ast.stmt) and statement in parents:
            statement = parents[statement]
        span = (statement.lineno, getattr(statement, "end_lineno", statement.lineno) or statement.lineno)
        found += [(number, op, node.lineno, qual, span) for op in ops]
    return sorted(found, key=lambda site: (site[2], site[0], site[1]))


def _apply(tree: ast.Module, number: int, op: str) -> tuple[ast.Module, str]:
    """A copy of the tree with one mutation; and a description of the change."""
    tree = copy.deepcopy(tree)
    node = next(n for i, n in enumerate(ast.walk(tree)) if i == number)
    before = ast.unparse(node).splitlines()[0][:80] if not isinstance(node, ast.If | ast.While) else ""
    if op == "compare":
        node.ops = [COMPARE_SWAP[type(node.ops[0])]()]
    elif op == "and/or":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif op.startswith("drop:"):
        keep = [v for i, v in enumerate(node.values) if i != int(op.split(":")[1])]
        if len(keep) == 1:
            _replace(tree, node, keep[0])
            return tree, f"{before} -> {ast.unparse(keep[0])[:80]}"
        node.values = keep
    elif op in ("not", "neg"):
        _replace(tree, node, node.operand)
        return tree, f"{before} -> {ast.unparse(node.operand)[:80]}"
    elif op == "binop":
        node.op = BINOP_SWAP[type(node.op)]()
    elif op == "bool":
        node.value = not node.value
    elif op == "number":
        node.value = node.value + 1 if node.value != 1 else 0
    elif op == "string":
        node.value = f"XX{node.value}XX"
    elif op == "remove-call":
        _replace(tree, node, ast.Pass())
        return tree, f"{before} -> pass"
    elif op == "negate-condition":
        before = f"if {ast.unparse(node.test)[:70]}"
        node.test = ast.UnaryOp(ast.Not(), node.test)
        return tree, f"{before} -> if not (...)"
    elif op.startswith("drop-element:"):
        node.elts = [e for i, e in enumerate(node.elts) if i != int(op.split(":")[1])]
    else:
        raise ValueError(op)
    after = ast.unparse(node).splitlines()[0][:80] if before else op
    return tree, f"{before} -> {after}"


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
                return
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is old:
                        value[i] = new
                        return
    raise ValueError("node not found")


# Running ----------------------------------------------------------------------------------------


def _copy_repo(into: Path) -> Path:
    """A private copy of the packages and tests; data folders are linked, not copied."""
    for name in (*PACKAGES, "tests"):
        shutil.copytree(ROOT / name, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in LINKED:
        if (ROOT / name).exists():
            (into / name).symlink_to(ROOT / name)
    return into


def _start(copy_root: Path, tests: tuple[str, ...], trace: str | None = None) -> int:
    """Fork a child that runs the tests against the copy (fresh imports of the project); its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        os.chdir(copy_root)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        sys.path.insert(0, str(copy_root))
        sys.path.insert(1, str(copy_root / "tests"))
        os.environ["PYTHONPATH"] = str(copy_root)
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
        os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only the plugin the tests use
        sys.dont_write_bytecode = True
        import pytest

        args = [*tests, "-x", "-q", "-p", "no:cacheprovider", "-p", "cbm_core.testing", "-W", "ignore"]
        if trace is None:
            code = pytest.main(args)
        else:
            import coverage

            cov = coverage.Coverage(data_file=trace, include=[str(copy_root / "*")], config_file=False)
            cov.start()
            code = pytest.main(args)
            cov.stop()
            cov.save()
    finally:
        os._exit(int(code))


def _outcome(pid: int, started: float, timeout: float, wait: bool = False) -> str | None:
    """'killed' (a test failed), 'survived', 'timeout' (killed as hung), or None while running."""
    done, status = os.waitpid(pid, 0 if wait else os.WNOHANG)
    if done:
        return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
    if time.monotonic() - started > timeout:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "timeout"
    return None


def run_module(
    name: str,
    target: Target,
    max_mutants: int | None = None,
    jobs: int = 1,
    sample: int | None = None,
    deadline: float | None = None,
) -> Report:
    source = (ROOT / target.path).read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    sites = _sites(tree, lines, target.functions)
    report = Report(name, target.path, list(target.tests))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"cbm-mutation-{name}-") as tmp:
        copies = [_copy_repo(Path(tmp) / f"repo{j}") for j in range(jobs)]  # one per running mutant
        trace = str(Path(tmp) / ".coverage")
        clean = time.monotonic()
        if _outcome(_start(copies[0], target.tests, trace), clean, 3600, wait=True) != "survived":
            raise SystemExit(f"{name}: the tests fail without any mutant ({' '.join(target.tests)})")
        timeout = max(TIMEOUT_FLOOR, TIMEOUT_FACTOR * (time.monotonic() - clean))
        import coverage

        data = coverage.CoverageData(basename=trace)
        data.read()
        covered = set(data.lines(str(copies[0] / target.path)) or ())
        mutants, queue = [], []
        for index, (number, op, line, function, statement) in enumerate(sites):
            mutant_tree, change = _apply(tree, number, op)
            mutant = Mutant(index, line, function, change)
            mutants.append(mutant)
            if max_mutants is not None and len(mutants) > max_mutants:
                mutant.status = "skipped"
            elif not any(line in covered for line in range(statement[0], statement[1] + 1)):
                # coverage records the lines that ran, which for a statement spanning several
                # lines may be any of them: covered if any line of the enclosing statement ran
                mutant.status = "not covered"
            else:
                queue.append((mutant, ast.unparse(mutant_tree)))
        if sample is not None and sample < len(queue):  # a fixed random sample, reported as such
            chosen = set(random.Random(SAMPLE_SEED).sample(range(len(queue)), sample))
            report.sampled = f"{sample} of {len(queue)} covered mutants run"
            for i, (mutant, _) in enumerate(queue):
                if i not in chosen:
                    mutant.status = "skipped"
            queue = [q for i, q in enumerate(queue) if i in chosen]
        running: dict[int, tuple[Mutant, int, float]] = {}  # copy slot -> (mutant, pid, start)
        while queue or running:
            if deadline is not None and time.time() > deadline and queue:  # out of time: report what ran
                report.sampled = (
                    f"stopped at the deadline with {len(queue)} mutants not run; " + report.sampled
                )
                for mutant, _ in queue:
                    mutant.status = "skipped"
                queue = []
            for slot in range(jobs):
                if slot not in running and queue:
                    mutant, text = queue.pop(0)
                    (copies[slot] / target.path).write_text(text)
                    running[slot] = (mutant, _start(copies[slot], target.tests), time.monotonic())
            for slot, (mutant, pid, begun) in list(running.items()):
                status = _outcome(pid, begun, timeout)
                if status is not None:
                    mutant.status, mutant.seconds = status, time.monotonic() - begun
                    del running[slot]
                    where = f"{name} #{mutant.index}/{len(sites)} line {mutant.line} {mutant.function}"
                    print(
                        f"{where}: {mutant.change} -> {status} ({mutant.seconds:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
            time.sleep(0.05)
    counted = [m for m in mutants if m.status != "skipped"]
    report.mutants = len(counted)
    report.killed = sum(m.status in ("killed", "timeout") for m in counted)
    report.not_covered = sum(m.status == "not covered" for m in counted)
    report.survived = report.mutants - report.killed
    alive = [m for m in counted if m.status in ("survived", "not covered")]
    report.equivalent = sum(equivalent(name, m.function, m.change) is not None for m in alive)
    if report.mutants:
        report.kill_rate = round(report.killed / report.mutants, 3)
        report.kill_rate_without_equivalent = round(
            report.killed / max(1, report.mutants - report.equivalent), 3
        )
    report.seconds = round(time.monotonic() - started, 1)
    report.survivors = [
        {"line": m.line, "function": m.function, "change": m.change, "status": m.status,
         "equivalent": equivalent(name, m.function, m.change)}
        for m in alive
    ]  # fmt: skip
    return report


def _deadline(text: str | None) -> float | None:
    """Today's HH:MM (UTC) as a time.time() value."""
    if text is None:
        return None
    hours, minutes = map(int, text.split(":"))
    now = time.gmtime()
    return time.time() + (hours * 60 + minutes - now.tm_hour * 60 - now.tm_min) * 60 - now.tm_sec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="default: all")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--max-mutants", type=int, help="stop after this many (a quick look)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (each in its own copy)")
    parser.add_argument("--sample", type=int, help="run a fixed random sample of this many covered mutants")
    parser.add_argument("--deadline", help="HH:MM (UTC): start no mutant after it; the report says so")
    args = parser.parse_args()
    names = args.module or sorted(MODULES)
    if args.list:
        for name in names:
            target = MODULES[name]
            source = (ROOT / target.path).read_text()
            tree = ast.parse(source)
            for number, op, line, function, _ in _sites(tree, source.splitlines(), target.functions):
                print(f"{name}\t{line}\t{function}\t{_apply(tree, number, op)[1]}")
        return
    for module in PRELOAD:  # once, in the parent: every forked child shares them
        with contextlib.suppress(ImportError):
            __import__(module)
    reports = {
        name: asdict(
            run_module(
                name, MODULES[name], args.max_mutants, args.jobs, args.sample, _deadline(args.deadline)
            )
        )
        for name in names
    }
    text = json.dumps(reports, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
