"""Plugin discovery: built-ins from registry.toml, entry points, blocking, tracing, API versions."""

from __future__ import annotations

import json
import sys
import textwrap
import tomllib
import types

import pytest
from click.testing import CliRunner

from cbm_core import hookspecs
from cbm_core.cli import cli
from cbm_core.plugins import CORE_API_VERSION, api_compatible, load_plugins, registry_path


def test_every_registry_entry_loads_with_the_kind_it_declares():
    manager = load_plugins(entry_points=False)
    registry = tomllib.loads(registry_path().read_text())["plugin"]
    assert registry, "registry.toml lists no plugin"
    for entry in registry:
        info = manager.infos[entry["name"]]
        assert info.origin == "built-in"
        assert info.kind == entry["kind"], entry["name"]
        assert entry["description"]


def test_every_hook_has_a_one_line_docstring_and_the_naming_convention():
    hooks = [n for n in dir(hookspecs) if n.startswith("cbm_")]
    assert len(hooks) >= 10
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__
        assert doc and len(doc.strip().splitlines()) == 1, name
        assert name.split("_")[1] in {"source", "extractor", "store", "marker", "rule", "cli", "web"}, name


def test_blocked_plugin_is_not_loaded_and_is_reported(monkeypatch):
    monkeypatch.setenv("CBM_DISABLED_PLUGINS", "ndvi_drop, zonal")
    manager = load_plugins(entry_points=False)
    assert "ndvi_drop" not in manager.infos and "zonal" not in manager.infos
    assert "CBM_DISABLED_PLUGINS" in manager.refused["ndvi_drop"]
    assert "local" in manager.infos


def test_trace_env_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("CBM_TRACE_PLUGINS", "1")
    manager = load_plugins(entry_points=False)
    manager.hook.cbm_rule_schemes()
    assert "cbm_rule_schemes" in capsys.readouterr().err


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """Install a real (if tiny) distribution on sys.path with `cbm` entry points."""

    def install(modules: dict[str, str], entry_points: dict[str, str], version: str = "1.2.3") -> None:
        for name, code in modules.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
        info = tmp_path / f"fake_cbm_plugins-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-cbm-plugins\nVersion: {version}\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[cbm]\n{lines}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        for name in modules:
            sys.modules.pop(name, None)

    return install


MARKER_CODE = """
    from cbm_core import MarkerResult, Status, impl
    CBM_API_VERSION = "{version}"

    @impl
    def cbm_marker_run(series, params):
        return [MarkerResult("x", int(p), Status.OK) for p in series.parcels["pid"]]
"""


def test_entry_point_plugin_is_discovered_with_its_version(fake_distribution):
    fake_distribution({"fake_ok_marker": MARKER_CODE.format(version="1.0")}, {"fake_ok": "fake_ok_marker"})
    manager = load_plugins()
    info = manager.infos["fake_ok"]
    assert (info.origin, info.version, info.kind) == ("entry point", "1.2.3", "marker")
    assert info.hooks == ["cbm_marker_run"]


def test_incompatible_api_version_is_refused_naming_plugin_and_versions(fake_distribution, caplog):
    fake_distribution(
        {"fake_future": MARKER_CODE.format(version="2.0"), "fake_fine": MARKER_CODE.format(version="1.0")},
        {"future_marker": "fake_future", "fine_marker": "fake_fine"},
    )
    manager = load_plugins()
    assert "future_marker" not in manager.infos
    why = manager.refused["future_marker"]
    assert "future_marker" in why and "2.0" in why and CORE_API_VERSION in why
    assert any(r.levelname == "WARNING" and "future_marker" in r.getMessage() for r in caplog.records)
    assert "fine_marker" in manager.infos and "ndvi_drop" in manager.infos


def test_plugin_failing_to_import_is_refused_and_the_rest_load(fake_distribution):
    fake_distribution({"fake_broken": "raise RuntimeError('boom at import')"}, {"broken": "fake_broken"})
    manager = load_plugins()
    assert "boom at import" in manager.refused["broken"]
    assert "local" in manager.infos


def test_entry_point_cannot_shadow_a_builtin(fake_distribution):
    fake_distribution({"fake_shadow": MARKER_CODE.format(version="1.0")}, {"ndvi_drop": "fake_shadow"})
    manager = load_plugins()
    assert manager.infos["ndvi_drop"].origin == "built-in"
    assert any("taken by a built-in" in why for why in manager.refused.values())


@pytest.mark.parametrize(
    ("wanted", "provided", "ok"),
    [
        ("1.0", "1.0", True),
        ("1.0", "1.3", True),
        ("1.4", "1.3", False),
        ("2.0", "1.9", False),
        ("x", "1.0", False),
    ],
)
def test_api_compatibility_rule(wanted, provided, ok):
    assert api_compatible(wanted, provided) is ok


def test_cli_plugins_json_lists_builtins_and_the_installed_example():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listed = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    for name in ("local", "parquet", "zonal", "ndvi_drop", "traffic_light"):
        assert listed[name]["origin"] == "built-in"
        assert set(listed[name]) >= {"name", "version", "kind", "hooks", "origin"}
    example = listed.get("green_cover")
    assert example is not None, "the example plugin (examples/cbm-example-plugin) is not installed"
    assert (example["origin"], example["version"], example["kind"]) == ("entry point", "0.3.0", "marker")


def test_a_plugin_can_add_cli_commands(cbm_plugin_manager):
    import click

    plugin = types.SimpleNamespace()

    @hookspecs.impl
    def cbm_cli_commands(cli):
        @cli.command(name="hello-test")
        def hello() -> None:
            click.echo("hello from a plugin")

    plugin.cbm_cli_commands = cbm_cli_commands
    group = click.Group(commands=dict(cli.commands))
    cbm_plugin_manager.pm.register(plugin, name="hello")
    cbm_plugin_manager.hook.cbm_cli_commands(cli=group)
    result = CliRunner().invoke(group, ["hello-test"])
    assert result.output.strip() == "hello from a plugin"
