"""Bad input gets a clear message naming what is at fault, and nothing else is lost."""

from __future__ import annotations

import shutil
import types

import geopandas as gpd
import pandas as pd
import pytest
import shapely
from click.testing import CliRunner
from conftest import write_config

import cbm_core as cbm
from cbm_core import MarkerResult, Status, hookspecs
from cbm_core.api import run
from cbm_core.cli import cli
from cbm_core.config import PluginConfig, Scheme, load_run_config
from cbm_core.errors import ConfigError, InputError, PluginError
from cbm_core.pipeline import Engine


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result


def test_missing_config_file_is_one_clear_line(tmp_path):
    result = invoke("run", str(tmp_path / "nope.toml"))
    assert result.exit_code == 1 and "configuration file not found" in result.output


def test_invalid_toml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[source\nplugin = 1")
    result = invoke("run", str(bad))
    assert result.exit_code == 1 and "bad.toml: not valid TOML" in result.output and "line 1" in result.output


def test_missing_parcel_file_is_named(tmp_path):
    config = write_config(tmp_path, f'[source]\nparcels = "{tmp_path / "missing.gpkg"}"\nscenes = "x.csv"\n')
    result = invoke("run", str(config))
    assert (
        result.exit_code == 1 and "parcel file not found" in result.output and "missing.gpkg" in result.output
    )


def test_unknown_section_and_unknown_plugin_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown section"):
        load_run_config(write_config(tmp_path, "[sauce]\nx = 1\n"))
    config = write_config(
        tmp_path, '[[marker]]\nplugin = "mowingg"\n[rule]\nplugin = "traffic_light"\n', scheme=""
    )
    result = invoke("run", str(config))
    assert result.exit_code == 1
    assert "[[marker]] #1: no plugin named 'mowingg'" in result.output and "ndvi_drop" in result.output


def test_plugin_of_the_wrong_kind_is_refused_before_any_work(tmp_path):
    config = write_config(
        tmp_path, '[[marker]]\nplugin = "zonal"\n[rule]\nplugin = "traffic_light"\n', scheme=""
    )
    with pytest.raises(PluginError, match="'zonal' \\(extractor\\) has no cbm_marker_run hook"):
        run(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_scheme_recipe_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="ndvi-drop"):
        run(write_config(tmp_path, scheme='scheme = "no-such-scheme"'), progress=False)


def test_parcels_in_another_crs_are_reprojected_not_refused(tmp_path, demo_dir):
    parcels = gpd.read_file(demo_dir / "parcels.gpkg").to_crs("EPSG:4326")
    parcels.to_file(tmp_path / "parcels_wgs84.geojson", driver="GeoJSON")
    utm = cbm.read_parcels(demo_dir / "parcels.gpkg")
    wgs = cbm.read_parcels(tmp_path / "parcels_wgs84.geojson")
    catalogue = cbm.read_catalogue(demo_dir / "scenes.csv")
    one = catalogue[catalogue["obsid"] == "S2A_MSIL2A_20230415_T31UFS"]
    a = cbm.extract(utm, one, bands={"s2": ["B04"]}).stats.set_index("pid")
    b = cbm.extract(wgs, one, bands={"s2": ["B04"]}).stats.set_index("pid")
    assert len(a) == len(b) == 18
    # The round trip through degrees moves vertices by micrometres; these outlines were simplified
    # onto the pixel grid, so a few pixel centres lying exactly on an edge may switch side.
    assert ((a["count"] - b["count"]).abs() <= (0.02 * a["count"]).clip(lower=2)).all()
    assert ((a["mean"] - b["mean"]).abs() <= 0.01 * a["mean"]).all()


def test_invalid_and_empty_geometries_are_repaired_or_reported_per_parcel(tmp_path, demo_dir):
    parcels = gpd.read_file(demo_dir / "parcels.gpkg")
    x0, y0, x1, y1 = parcels.geometry.iloc[6].bounds
    parcels.loc[6, "geometry"] = shapely.Polygon([(x0, y0), (x1, y1), (x1, y0), (x0, y1)])  # bow-tie
    parcels.loc[7, "geometry"] = shapely.Polygon()
    parcels.to_file(tmp_path / "bad.gpkg", layer="parcels")
    config = write_config(
        tmp_path, f'[source]\nparcels = "{tmp_path / "bad.gpkg"}"\nscenes = "{demo_dir / "scenes.csv"}"\n'
    )
    result = run(config, progress=False)
    verdicts = result.verdicts.set_index("pid")
    assert len(verdicts) == 18
    assert "invalid geometry repaired (Self-intersection" in verdicts.loc[7, "reasons"]
    assert "empty geometry" in verdicts.loc[8, "reasons"] and verdicts.loc[8, "light"] == "yellow"
    assert result.summary["parcel_issues"].keys() == {7, 8}
    assert result.series.stats.query("pid == 7")["count"].gt(0).all()  # the repaired parcel was measured


def test_duplicated_pids_and_missing_columns_are_named(tmp_path, demo_dir):
    parcels = gpd.read_file(demo_dir / "parcels.gpkg")
    parcels.loc[3, "pid"] = 1
    parcels.to_file(tmp_path / "dup.gpkg")
    with pytest.raises(InputError, match="pid has duplicated value 1"):
        cbm.read_parcels(tmp_path / "dup.gpkg")
    with pytest.raises(InputError, match=r"column 'field_id' .*not found"):
        cbm.read_parcels(demo_dir / "parcels.gpkg", pid_column="field_id")
    catalogue = pd.read_csv(demo_dir / "scenes.csv").drop(columns="obstime")
    catalogue.to_csv(tmp_path / "scenes.csv", index=False)
    with pytest.raises(InputError, match="missing column\\(s\\) obstime"):
        cbm.read_catalogue(tmp_path / "scenes.csv")


def test_scene_file_that_is_not_a_raster_fails_that_scene_only_and_is_retried(tmp_path, demo_dir):
    demo = tmp_path / "demo"
    shutil.copytree(demo_dir, demo)
    broken = demo / "S2" / "S2A_MSIL2A_20230415_T31UFS" / "B08.tif"
    good_bytes = broken.read_bytes()
    broken.write_text("this is not a GeoTIFF")
    config = write_config(
        tmp_path, f'[source]\nparcels = "{demo / "parcels.gpkg"}"\nscenes = "{demo / "scenes.csv"}"\n'
    )
    first = run(config, progress=False)
    failed = first.summary["scenes"]["failed"]
    assert list(failed) == ["S2A_MSIL2A_20230415_T31UFS"]
    assert "B08.tif: not a readable raster" in failed["S2A_MSIL2A_20230415_T31UFS"]
    assert first.summary["scenes"]["extracted"] == 11 and len(first.verdicts) == 18
    broken.write_bytes(good_bytes)
    second = run(config, progress=False)
    assert second.summary["scenes"]["extracted"] == 1 and second.summary["scenes"]["failed"] == {}
    stats = Engine(progress=False).read_store(load_run_config(config).store).stats
    assert not stats.duplicated(["pid", "obsid", "band"]).any()
    assert stats["obsid"].nunique() == 12


def _plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, hookspecs.impl(function))
    return module


def test_marker_raising_on_one_parcel_marks_only_that_parcel(cbm_plugin_manager, cbm_sample_series):
    def cbm_marker_run(series, params):
        if 3 in set(series.parcels["pid"]):
            raise ZeroDivisionError("parcel 3 has a bad day")
        return [MarkerResult("fragile", int(p), Status.OK) for p in series.parcels["pid"]]

    cbm_plugin_manager.register(_plugin("fragile", cbm_marker_run=cbm_marker_run), name="fragile")
    engine = Engine(plugins=cbm_plugin_manager, progress=False)
    scheme = Scheme((PluginConfig("fragile"),), PluginConfig("traffic_light"))
    results = engine.run_markers(cbm_sample_series, scheme).set_index("pid")
    assert results.loc[3, "status"] == "NOT_EXECUTED"
    assert "ZeroDivisionError: parcel 3 has a bad day" in results.loc[3, "reason"]
    assert (results.drop(index=3)["status"] == "OK").all() and len(results) == 6
    verdicts = engine.decide(results.reset_index(), cbm_sample_series.parcels, scheme).set_index("pid")
    assert verdicts.loc[3, "light"] == "yellow"
    assert (
        "ZeroDivisionError: parcel 3 has a bad day" in verdicts.loc[3, "reasons"]
    )  # the marker's error, named


def test_extractor_raising_on_one_parcel_isolates_it(cbm_plugin_manager, demo_dir):
    zonal = cbm_plugin_manager.pm.get_plugin("zonal")

    def cbm_extractor_extract(scene, parcels, bands, read_window, config):
        if 9 in set(parcels["pid"]):
            raise ValueError("cannot handle parcel 9")
        return zonal.cbm_extractor_extract(scene, parcels, bands, read_window, config)

    cbm_plugin_manager.register(_plugin("picky", cbm_extractor_extract=cbm_extractor_extract), name="picky")
    engine = Engine(plugins=cbm_plugin_manager, progress=False)
    source = PluginConfig(
        "local", {"parcels": str(demo_dir / "parcels.gpkg"), "scenes": str(demo_dir / "scenes.csv")}
    )
    parcels, catalogue = engine.parcels(source), engine.catalogue(source)
    one = catalogue[catalogue["obsid"] == "S2A_MSIL2A_20230405_T31UFS"]
    signatures, report = engine.extract(
        parcels, one, [PluginConfig("picky", {"card": "s2", "bands": ["B04"]})], source
    )
    assert report.failed_parcels == [
        {"obsid": "S2A_MSIL2A_20230405_T31UFS", "pid": 9, "reason": "ValueError: cannot handle parcel 9"}
    ]
    assert sorted(signatures.stats["pid"]) == [p for p in range(1, 19) if p != 9]


def test_cli_extract_writes_a_tidy_parquet_that_names_dates_and_cards(tmp_path, demo_dir):
    out = tmp_path / "sig.parquet"
    result = invoke(
        "extract",
        "--parcels",
        str(demo_dir / "parcels.gpkg"),
        "--scenes",
        str(demo_dir / "scenes.csv"),
        "--out",
        str(out),
        "--bands",
        "s2:B04,B08,SCL",
        "--bands",
        "bs:VV",
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    assert set(table["band"]) == {"B04", "B08", "VV"} and set(table["card"]) == {"s2", "bs"}
    assert len(table) == 18 * (12 * 2 + 10)
    s2 = table[table["card"] == "s2"]
    assert (s2.filter(like="hist_").sum(axis=1) > 0).all()
    bad = invoke("extract", "--parcels", "p.gpkg", "--scenes", "s.csv", "--out", "o.parquet", "--bands", "s2")
    assert bad.exit_code == 2 and "CARD:BAND" in bad.output


def test_installed_cbm_command_reports_user_errors_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    cbm_command = Path(sys.executable).with_name("cbm")
    done = subprocess.run(
        [str(cbm_command), "run", str(tmp_path / "absent.toml")], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.strip() == f"Error: configuration file not found: {tmp_path / 'absent.toml'}"
    help_text = subprocess.run([str(cbm_command), "run", "--help"], capture_output=True, text=True).stdout
    assert "verdicts.gpkg" in help_text and "--force" in help_text


def test_marker_failure_on_one_parcel_is_isolated_by_halving_not_parcel_by_parcel(cbm_plugin_manager):
    from cbm_core.testing import sample_parcels, sample_series

    series = sample_series(sample_parcels(64))
    calls = []

    def cbm_marker_run(series, params):
        calls.append(len(series.parcels))
        if 41 in set(series.parcels["pid"]):
            raise RuntimeError("parcel 41 breaks the marker")
        return [MarkerResult("brittle", int(p), Status.OK) for p in series.parcels["pid"]]

    cbm_plugin_manager.register(_plugin("brittle", cbm_marker_run=cbm_marker_run), name="brittle")
    engine = Engine(plugins=cbm_plugin_manager, progress=False)
    results = engine.run_markers(series, Scheme((PluginConfig("brittle"),), PluginConfig("traffic_light")))
    failed = results[results["status"] == "NOT_EXECUTED"]
    assert failed["pid"].tolist() == [41] and "parcel 41 breaks the marker" in failed["reason"].iloc[0]
    assert (results["status"] == "OK").sum() == 63
    assert len(calls) <= 1 + 2 * 6  # halving 64 parcels: 13 calls at most, instead of 65 one by one


def test_rule_raising_on_one_parcel_leaves_only_that_parcel_yellow(cbm_plugin_manager, cbm_sample_series):
    traffic_light = cbm_plugin_manager.pm.get_plugin("traffic_light")

    def cbm_rule_decide(results, parcels, params):
        if 4 in set(parcels["pid"]):
            raise KeyError("no rule for parcel 4")
        return traffic_light.cbm_rule_decide(results, parcels, params)

    cbm_plugin_manager.register(_plugin("shaky", cbm_rule_decide=cbm_rule_decide), name="shaky")
    engine = Engine(plugins=cbm_plugin_manager, progress=False)
    scheme = Scheme((PluginConfig("ndvi_drop"),), PluginConfig("shaky"))
    verdicts = engine.decide(engine.run_markers(cbm_sample_series, scheme), cbm_sample_series.parcels, scheme)
    verdicts = verdicts.set_index("pid")
    assert len(verdicts) == 6
    assert (
        verdicts.loc[4, "light"] == "yellow" and "rule shaky failed: KeyError" in verdicts.loc[4, "reasons"]
    )
    assert (verdicts.loc[[1, 3, 5], "light"] == "green").all() and (
        verdicts.loc[[2, 6], "light"] == "red"
    ).all()
