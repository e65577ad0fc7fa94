"""Issue 15: every mistake is refused in one line naming what is at fault; nothing is silently ignored."""

from __future__ import annotations

import re
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

INFO_RECORD = re.compile(r"^\S+Z INFO ")  # progress records on the console (cbm_core.logs), not errors
CBM = str(Path(sys.executable).with_name("cbm"))


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def error_line(result) -> str:
    """The one `Error:` line of a refused command (and nothing but it)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not INFO_RECORD.match(line)]
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
    assert not (tmp_path / "out" / "signatures").exists()  # refused before any work


def test_unknown_source_option_names_the_plugin_and_its_valid_options(tmp_path, demo_dir):
    config = write_config(
        tmp_path,
        f'[source]\nplugin = "local"\nparcel = "{demo_dir / "parcels.gpkg"}"\n'
        f'scenes = "{demo_dir / "scenes.csv"}"\n',
    )
    line = error_line(invoke("run", str(config)))
    assert "[source] (plugin 'local'): unknown key 'parcel' (did you mean 'parcels'?)" in line
    assert (
        "valid keys: campaign_year, campaign_year_column, crop_code_column, crop_name_column, keep_columns, "
        "layer, parcel_code_column, parcels, pid_column, plugin, scenes" in line
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
    config = write_config(
        tmp_path, '[[extract]]\ncard = "s2"\nplugin = "zonal"\nbands = ["B04", "B08", "B99"]\n'
    )
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
    assert [line for line in done.stderr.splitlines() if not INFO_RECORD.match(line)] == [
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


# Values at the edge of their type -----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_signatures(tmp_path_factory, demo_dir) -> Path:
    """The demo's Sentinel-2 signatures as the tidy table `cbm score` reads (written by `cbm extract`)."""
    out = tmp_path_factory.mktemp("signatures") / "sig.parquet"
    result = invoke(
        "extract", "--parcels", str(demo_dir / "parcels.gpkg"), "--scenes", str(demo_dir / "scenes.csv"),
        "--out", str(out), "--bands", "s2:B04,B08,SCL",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("pid", [1e20, "99999999999999999999", -(2**63) - 1])
def test_pids_beyond_int64_are_refused_naming_the_value(tmp_path, demo_dir, demo_signatures, pid):
    import geopandas as gpd
    import pandas as pd

    parcels = gpd.read_file(demo_dir / "parcels.gpkg")
    parcels["pid"] = parcels["pid"].astype(object)
    parcels.loc[3, "pid"] = pid
    if isinstance(pid, int):  # beyond what a GeoPackage integer holds: as text, through GeoJSON
        parcels["pid"] = parcels["pid"].astype(str)
    path = tmp_path / "p.geojson"
    parcels.to_file(path, driver="GeoJSON")
    config = write_config(tmp_path, f'[source]\nparcels = "{path}"\nscenes = "{demo_dir / "scenes.csv"}"\n')
    line = error_line(invoke("run", str(config)))
    assert "column pid must hold integers; bad value" in line
    assert "(ids are 64-bit: -9223372036854775808 to 9223372036854775807)" in line
    assert repr(pid) in line or str(pid) in line
    table = pd.read_parquet(demo_signatures)
    table["pid"] = table["pid"].astype(object)
    table.loc[table["pid"] == 4, "pid"] = pid
    table.to_csv(tmp_path / "sig.csv", index=False)
    line = error_line(invoke("score", "--signatures", str(tmp_path / "sig.csv"), "--scheme", "ndvi-drop",
                             "--out", str(tmp_path / "o")))  # fmt: skip
    assert "sig.csv: column pid must hold integers" in line and str(pid).replace("e+", "e") in line.replace(
        "e+", "e"
    )


def test_score_refuses_a_non_numeric_statistic_naming_row_and_column(tmp_path, demo_signatures):
    import pandas as pd

    table = pd.read_parquet(demo_signatures)
    table["mean"] = table["mean"].astype(object)
    table.loc[5, "mean"] = "0.3x"
    table.to_csv(tmp_path / "sig.csv", index=False)
    out = tmp_path / "o"
    line = error_line(invoke("score", "--signatures", str(tmp_path / "sig.csv"), "--scheme", "ndvi-drop",
                             "--out", str(out)))  # fmt: skip
    assert f"column mean must be numeric; bad value '0.3x' in row 6 (pid {table['pid'][5]})" in line
    assert not out.exists()


def test_score_accepts_the_parcel_file_run_accepts(tmp_path, demo_dir, demo_signatures):
    result = invoke("score", "--signatures", str(demo_signatures), "--scheme", "ndvi-drop",
                    "--out", str(tmp_path / "o"), "--parcels", str(demo_dir / "parcels.gpkg"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "18 parcels" in result.output


def test_points_lines_and_mislabelled_utm_parcels_are_refused(tmp_path, demo_dir):
    import geopandas as gpd

    parcels = gpd.read_file(demo_dir / "parcels.gpkg")
    scenes = demo_dir / "scenes.csv"
    for kind, geometry in (("Point", parcels.centroid), ("LineString", parcels.boundary)):
        parcels.set_geometry(geometry).to_file(tmp_path / f"{kind}.gpkg")
        config = write_config(
            tmp_path, f'[source]\nparcels = "{tmp_path / f"{kind}.gpkg"}"\nscenes = "{scenes}"\n'
        )
        line = error_line(invoke("run", str(config)))
        assert (
            "parcels must be polygons, found " in line and f"{kind} (pid 1); a point or line covers" in line
        )
    mixed = parcels.copy()
    mixed.loc[2, "geometry"] = mixed.geometry[2].centroid
    mixed.to_file(tmp_path / "mixed.gpkg")
    config = write_config(tmp_path, f'[source]\nparcels = "{tmp_path / "mixed.gpkg"}"\nscenes = "{scenes}"\n')
    from cbm_core.api import run

    verdicts = run(config, progress=False).verdicts.set_index("pid")
    assert verdicts.loc[3, "light"] == "yellow" and "not a polygon (Point)" in verdicts.loc[3, "reasons"]
    parcels.set_crs("EPSG:4326", allow_override=True).to_file(tmp_path / "mislabelled.gpkg")
    config = write_config(
        tmp_path, f'[source]\nparcels = "{tmp_path / "mislabelled.gpkg"}"\nscenes = "{scenes}"\n'
    )
    line = error_line(invoke("run", str(config)))
    assert "are not longitude/latitude although the CRS is EPSG:4326" in line and "mislabelled.gpkg" in line


# Output folders: creatable, one run at a time, no stale temporaries ---------------------------------


@pytest.mark.parametrize("out", ["/proc/cbm-out", "afile/out"])
def test_output_folder_that_cannot_be_created_is_one_error_line(tmp_path, out):
    (tmp_path / "afile").write_text("not a folder")
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('out = "out"', f'out = "{out}"'))
    line = error_line(invoke("run", str(config)))
    assert line.startswith("Error: cannot create output folder") and out in line


def test_extract_out_pointing_at_a_folder_is_one_error_line(tmp_path, demo_dir):
    args = ["extract", "--parcels", str(demo_dir / "parcels.gpkg"), "--scenes", str(demo_dir / "scenes.csv")]
    line = error_line(invoke(*args, "--out", str(tmp_path), "--bands", "s2:B04"))
    assert f"--out {tmp_path} is a folder" in line
    (tmp_path / "afile").write_text("x")
    line = error_line(invoke(*args, "--out", str(tmp_path / "afile" / "s.parquet"), "--bands", "s2:B04"))
    assert "cannot create output folder" in line and "afile" in line


def test_second_run_on_a_held_output_folder_is_refused_naming_the_holder_or_waits(tmp_path):
    import os
    import socket
    import threading
    import time

    from cbm_core.locks import folder_lock

    config = write_config(tmp_path)
    out = tmp_path / "out"
    with folder_lock(out):
        done = subprocess.run([CBM, "run", "--quiet", str(config)], capture_output=True, text=True)
        assert done.returncode == 1 and not (out / "summary.json").exists()
        lines = [line for line in done.stderr.splitlines() if not INFO_RECORD.match(line)]
        assert len(lines) == 1 and lines[0].startswith(
            f"Error: output folder {out} is in use by another run "
            f"(pid {os.getpid()} on {socket.gethostname()}, started 20"
        )
        assert lines[0].endswith("); wait for it to finish, or run with --wait to queue behind it")
        released = threading.Event()

        def release_later() -> None:
            time.sleep(1.0)
            released.set()

        threading.Thread(target=release_later).start()
        waiting = subprocess.Popen(
            [CBM, "run", "--quiet", "--wait", str(config)], stdout=subprocess.PIPE, text=True
        )
        released.wait()
        time.sleep(0.5)
        assert waiting.poll() is None  # still queued behind the holder
    assert waiting.wait(timeout=300) == 0 and (out / "summary.json").exists()


def test_a_shared_parquet_store_is_locked_too(tmp_path):
    from cbm_core.locks import folder_lock

    store = tmp_path / "shared-store"
    config = write_config(tmp_path, f'[store]\nplugin = "parquet"\npath = "{store}"\n')
    with folder_lock(store, what="signature store"):
        line = error_line(invoke("run", "--quiet", str(config)))
    assert f"signature store {store} is in use by another run" in line


def test_temporaries_of_a_killed_run_are_removed_at_start_up(tmp_path):
    config = write_config(tmp_path)
    stats = tmp_path / "out" / "signatures" / "stats"
    stats.mkdir(parents=True)
    stale = [
        stats / ".S2A_MSIL2A_20230415-1a2b3c4d.parquet.0123456789abcdef0123456789abcdef.tmp",
        tmp_path / "out" / ".fedcba9876543210fedcba9876543210.gpkg",
    ]
    keep = tmp_path / "out" / "notes.txt"
    for path in [*stale, keep]:
        path.write_text("x")
    assert invoke("run", "--quiet", str(config)).exit_code == 0
    assert not any(p.exists() for p in stale) and keep.exists()
    assert not [p.name for p in (tmp_path / "out").rglob(".*") if p.name != ".cbm-run.lock"]


# cbm doctor ---------------------------------------------------------------------------------------


def doctor_lines(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli, ["doctor", *args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [line for line in result.output.splitlines() if not INFO_RECORD.match(line)]


def test_doctor_passes_a_good_configuration_and_writes_nothing(tmp_path):
    config = write_config(tmp_path)
    code, lines = doctor_lines(str(config))
    assert code == 0, lines
    assert [line.split()[0] for line in lines] == ["ok"] * 10
    assert any("18 of 18 parcels inside a scene footprint" in line for line in lines)
    assert not (tmp_path / "out").exists()


def test_doctor_names_every_problem_it_finds_without_running(tmp_path, demo_dir):
    import shutil

    demo = tmp_path / "demo"
    shutil.copytree(demo_dir, demo)
    (demo / "S2" / "S2A_MSIL2A_20230405_T31UFS" / "B08.tif").unlink()
    (tmp_path / "afile").write_text("x")
    config = write_config(
        tmp_path,
        f'[source]\nparcels = "{demo / "parcels.gpkg"}"\nscenes = "{demo / "scenes.csv"}"\n'
        '[[extract]]\ncard = "s2"\nplugin = "zonal"\nbands = ["B04", "B99"]\n',
    )
    config.write_text(config.read_text().replace('out = "out"', 'out = "afile/out"'))
    code, lines = doctor_lines(str(config))
    assert code == 1
    failures = [line for line in lines if line.startswith("fail")]
    assert any("bands:" in line and "band 'B99' is in no s2 scene" in line for line in failures)
    assert any("band files: 1 of" in line and "B08.tif" in line for line in failures)
    assert any("output folder" in line and "afile is not a folder" in line for line in failures)
    assert any(line.startswith("fail  signature store") for line in failures)  # under the output folder
    assert lines[-1] == f"Error: {config}: 4 of 9 checks failed"


def test_doctor_refuses_a_bad_configuration_in_one_failure_line(tmp_path):
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('out = "out"', 'otu = "out"'))
    code, lines = doctor_lines(str(config))
    assert code == 1 and lines[0].startswith("fail  configuration: ") and "did you mean 'out'" in lines[0]


def test_doctor_checks_a_server_configuration_and_its_users_file(tmp_path):
    from test_server import write_server

    config = write_server(tmp_path, '{ plugin = "parquet", path = "s" }')
    code, lines = doctor_lines(str(config))
    assert code == 0, lines
    assert any("users file" in line and "3 user(s)" in line for line in lines)
    users = tmp_path / "users.json"
    users.write_text(users.read_text().replace('"aois": [\n        "fl"\n      ]', '"aois": "fl"', 1))
    code, lines = doctor_lines(str(config))
    assert code == 1 and any(
        line.startswith("fail  users file:") and '"aois" must be' in line for line in lines
    )


def test_unknown_key_of_a_per_marker_rule_is_refused(tmp_path):
    scheme = (
        '[[marker]]\nplugin = "ndvi_drop"\n'
        '[rule]\nplugin = "traffic_light"\nmarkers.ndvi_drop = { expect = "event", min_confidance = 0.9 }\n'
    )
    line = error_line(invoke("run", "--quiet", str(write_config(tmp_path, scheme=scheme))))
    assert "[rule] markers.ndvi_drop: unknown key 'min_confidance' (did you mean 'min_confidence'?)" in line


def test_a_bad_extractor_option_value_stops_the_run_and_fails_the_doctor(tmp_path):
    body = '[[extract]]\ncard = "s2"\nplugin = "s2_l2a"\nbands = ["B04", "B08", "SCL"]\nindices = 5\n'
    config = write_config(tmp_path, body)
    line = error_line(invoke("run", "--quiet", str(config)))
    assert "[[extract]] #1 (plugin 's2_l2a'): option 'indices' must be" in line  # not 12 failed scenes
    code, lines = doctor_lines(str(config))
    assert code == 1 and any(line.startswith("fail") and "trial extraction" in line for line in lines)
