"""Issue 15: every mistake is refused in one line naming what is at fault; nothing is silently ignored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_config

from cbm_core.cli import cli
from cbm_core.config import load_run_config
from cbm_core.errors import ConfigError
from cbm_core.pipeline import Engine

CBM = str(Path(sys.executable).with_name("cbm"))


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def error_line(result) -> str:
    """The one `Error:` line of a refused command (and nothing but it)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# Strict configuration schemas ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[cluster]\nworker = 2\n", "[cluster]: unknown key 'worker' (did you mean 'workers'?)"),
        ("[store]\npaht = 'x'\n", "[store] (plugin 'parquet'): unknown key 'paht' (did you mean 'path'?)"),
    ],
)
def test_unknown_key_in_a_known_section_is_refused_with_a_did_you_mean(tmp_path, body, expected):
    config = write_config(tmp_path, body)
    line = error_line(invoke("run", str(config)))
    assert expected in line and str(config) in line
    assert not (tmp_path / "out").exists()  # refused before any work


def test_unknown_source_option_names_the_plugin_and_its_valid_options(tmp_path, demo_dir):
    config = write_config(
        tmp_path,
        f'[source]\nplugin = "local"\nparcel = "{demo_dir / "parcels.gpkg"}"\n'
        f'scenes = "{demo_dir / "scenes.csv"}"\n',
    )
    line = error_line(invoke("run", str(config)))
    assert "[source] (plugin 'local'): unknown key 'parcel' (did you mean 'parcels'?)" in line
    assert (
        "valid keys: crop_code_column, crop_name_column, layer, parcel_code_column, parcels, pid_column, "
        "plugin, scenes" in line
    )


def test_unknown_extract_option_and_marker_parameter_are_refused(tmp_path):
    config = write_config(
        tmp_path, '[[extract]]\ncard = "s2"\nplugin = "s2_l2a"\nbands = ["B04"]\nall_touch = true\n'
    )
    assert "unknown key 'all_touch' (did you mean 'all_touched'?)" in error_line(invoke("run", str(config)))
    scheme = (
        '[[marker]]\nplugin = "ndvi_drop"\nmin_dorp = 0.2\n'
        '[rule]\nplugin = "traffic_light"\nmarkers.ndvi_drop = { expect = "event" }\n'
    )
    config = write_config(tmp_path, scheme=scheme)
    line = error_line(invoke("run", str(config)))
    assert "[[marker]] #1 (plugin 'ndvi_drop'): unknown key 'min_dorp' (did you mean 'min_drop'?)" in line
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        scheme.replace("min_dorp", "min_drop").replace("[rule]", "[rule]\nred_if_any_fail = true")
    )
    line = error_line(invoke("score", "--signatures", "x.parquet", "--scheme", str(recipe), "--out", "o"))
    assert "unknown key 'red_if_any_fail' (did you mean 'red_if_any_fails'?)" in line


def test_every_shipped_recipe_and_the_demo_pass_the_strict_schema(demo_dir):
    engine = Engine(progress=False)
    config = load_run_config(demo_dir.parent / "flanders.toml")
    scheme = engine.scheme(str(config.scheme_ref), config.base_dir)
    engine.check(config, scheme)
    for found in engine.plugins.hook.cbm_rule_schemes():
        for name in found:
            engine.scheme(name, Path.cwd())


def test_unknown_card_and_band_are_refused_with_the_valid_ones(tmp_path):
    config = write_config(tmp_path, '[[extract]]\ncard = "s3"\nplugin = "zonal"\nbands = ["B04"]\n')
    line = error_line(invoke("run", str(config)))
    assert "[[extract]] #1: card 's3' is not a known card; valid cards: s2, bs, c6" in line
    config = write_config(tmp_path, '[[extract]]\ncard = "s2"\nplugin = "zonal"\nbands = ["B04", "B99"]\n')
    line = error_line(invoke("run", str(config)))
    assert (
        "[[extract]] #1: band 'B99' is in no s2 scene of the catalogue; "
        "its bands: AOT, B01, B04, B08, B11, SCL" in line
    )


def test_a_plugin_declaring_options_badly_is_refused_not_fatal():
    import types

    from cbm_core.plugins import PluginManager

    module = types.ModuleType("bad_options")
    module.CBM_OPTIONS = "min_drop"  # a string, not a set of names
    manager = PluginManager()
    assert not manager.register(module, "bad_options")
    assert "CBM_OPTIONS must be a set of option names" in manager.refused["bad_options"]


def test_config_schema_is_extensible_in_one_place(tmp_path, monkeypatch):
    from cbm_core import config as settings

    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('out = "out"', 'out = "out"\nlabel = "campaign 2023"'))
    with pytest.raises(ConfigError, match="unknown key 'label'"):
        load_run_config(path)
    monkeypatch.setitem(settings.RUN_KEYS, "run", settings.RUN_KEYS["run"] | {"label"})
    assert load_run_config(path).out_dir == tmp_path / "out"


def test_installed_cbm_refuses_a_misspelt_key_in_one_line(tmp_path):
    config = write_config(tmp_path, "")
    config.write_text(config.read_text().replace('out = "out"', 'otu = "out"'))
    done = subprocess.run([CBM, "run", str(config)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"Error: {config} [run]: unknown key 'otu' (did you mean 'out'?); valid keys: out"
    ]


def test_server_configuration_refuses_unknown_keys_and_plugin_options(tmp_path):
    from cbm_core.plugins import load_plugins
    from cbm_plugins.serve import load_server_config
    from cbm_plugins.serve._config import check_plugins

    config = tmp_path / "server.toml"
    dataset = '[[dataset]]\naoi = "fl"\nyear = 2023\nsource = { plugin = "local", parcels = "p.gpkg" }\n'
    config.write_text(f'[server]\nuser = "u.json"\n{dataset}store = {{ plugin = "parquet", path = "s" }}\n')
    with pytest.raises(ConfigError, match=r"\[server\]: unknown key 'user' \(did you mean 'users'\?\)"):
        load_server_config(config)
    config.write_text(f'{dataset}store = {{ plugin = "parquet", path = "s" }}\nresult = "m.parquet"\n')
    with pytest.raises(ConfigError, match=r"#1: unknown key 'result' \(did you mean 'results'\?\)"):
        load_server_config(config)
    config.write_text(f'{dataset}store = {{ plugin = "parquet", pth = "s" }}\n')
    settings = load_server_config(config)
    with pytest.raises(
        ConfigError, match=r"store \(plugin 'parquet'\): unknown key 'pth' \(did you mean 'path'"
    ):
        check_plugins(settings, load_plugins())
