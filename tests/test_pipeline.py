"""The embedded pipeline end to end on the real Flanders demo data."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from rasterio.io import MemoryFile
from rasterstats import zonal_stats

import cbm_core as cbm
from cbm_core.api import run
from cbm_core.config import PluginConfig, load_run_config
from cbm_core.model import time_series
from cbm_core.pipeline import Engine


def test_demo_run_gives_every_parcel_a_verdict_and_writes_all_outputs(demo_config):
    result = run(demo_config, progress=False)
    out = demo_config.parent / "out"
    parcels = gpd.read_file(out / "verdicts.gpkg", layer="verdicts")
    assert sorted(parcels["pid"]) == list(range(1, 19))
    # docs/data.md: two clear S2 dates (04-05, 04-15; 04-30 is thin cirrus): too few to judge a drop
    assert (parcels["light"] == "yellow").all()
    assert parcels["reasons"].str.contains(r"insufficient evidence: [12] valid Sentinel-2 observation").all()
    assert parcels.crs.to_epsg() == 32631
    table = pd.read_csv(out / "verdicts.csv")
    assert (table["reasons"].str.len() > 0).all()
    results = pd.read_parquet(out / "markers.parquet")
    assert len(results) == 18 and set(results["marker"]) == {"ndvi_drop"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenes"]["extracted"] == 12 and summary["scenes"]["failed"] == {}
    assert sum(summary["verdicts"].values()) == 18
    assert len(result.verdicts) == 18


def test_rerun_skips_stored_scenes_and_duplicates_nothing(demo_config):
    first = run(demo_config, progress=False)
    stored_first = Engine(progress=False).read_store(load_run_config(demo_config).store)
    second = run(demo_config, progress=False)
    stored_second = Engine(progress=False).read_store(load_run_config(demo_config).store)
    assert second.summary["scenes"]["extracted"] == 0
    assert second.summary["scenes"]["skipped_already_stored"] == 12
    assert len(stored_second.stats) == len(stored_first.stats) > 0
    assert not stored_second.stats.duplicated(["pid", "obsid", "band"]).any()
    pd.testing.assert_frame_equal(
        first.verdicts.drop(columns="geometry"), second.verdicts.drop(columns="geometry")
    )
    forced = run(demo_config, force=True, progress=False)
    assert forced.summary["scenes"]["extracted"] == 12
    assert len(Engine(progress=False).read_store(load_run_config(demo_config).store).stats) == len(
        stored_first.stats
    )


def test_reference_extractor_matches_rasterstats_on_real_scenes(demo_dir):
    """To float32 precision (rel 1e-6); the production extractor is compared bit for bit in
    tests/test_mutants_zonal.py."""
    parcels = cbm.read_parcels(demo_dir / "parcels.gpkg")
    catalogue = cbm.read_catalogue(demo_dir / "scenes.csv")
    signatures = cbm.extract(parcels, catalogue, bands={"s2": ["B04", "B11"], "bs": ["VV"]})
    for obsid, band in (
        ("S2A_MSIL2A_20230405_T31UFS", "B04"),
        ("S2A_MSIL2A_20230415_T31UFS", "B11"),
        ("S1A_IW_GRDH_20230403", "VV"),
    ):
        ref = catalogue.set_index("obsid").loc[obsid, "bands"][band]
        with open(ref.uri, "rb") as f, MemoryFile(f.read()) as mem, mem.open() as ds:
            array, nodata = ds.read(1), ds.nodata
            scale, offset = ds.scales[0], ds.offsets[0]
            expected = zonal_stats(
                list(parcels.geometry),
                array,
                affine=ds.transform,
                nodata=nodata,
                stats="count mean std min max percentile_25 percentile_50 percentile_75",
            )
        got = signatures.stats.query("obsid == @obsid and band == @band").set_index("pid")
        for pid, want in zip(parcels["pid"], expected, strict=True):
            row = got.loc[pid]
            assert row["count"] == want["count"]
            for ours, theirs in (
                ("mean", "mean"),
                ("min", "min"),
                ("max", "max"),
                ("p25", "percentile_25"),
                ("p50", "percentile_50"),
                ("p75", "percentile_75"),
            ):
                assert row[ours] == pytest.approx(want[theirs] * scale + offset, rel=1e-6), (
                    pid,
                    ours,
                )  # float32 tolerance
            assert row["std"] == pytest.approx(want["std"] * scale, rel=1e-6)


def test_scl_histograms_count_every_pixel_of_the_parcel(demo_dir):
    parcels = cbm.read_parcels(demo_dir / "parcels.gpkg")
    catalogue = cbm.read_catalogue(demo_dir / "scenes.csv")
    signatures = cbm.extract(parcels, catalogue, bands={"s2": ["SCL", "B11"]})
    merged = signatures.scl.merge(signatures.stats[signatures.stats["band"] == "B11"], on=["pid", "obsid"])
    hist_total = merged.filter(like="hist_").sum(axis=1)
    assert len(merged) == 18 * 12
    assert (hist_total == merged["count"]).all()  # SCL and B11 share the 20 m grid and nodata-free pixels


def test_python_api_chains_like_the_cli(demo_dir):
    parcels = cbm.read_parcels(demo_dir / "parcels.gpkg", crop_name_column="crop_name")
    catalogue = cbm.read_catalogue(demo_dir / "scenes.csv")
    assert isinstance(parcels, gpd.GeoDataFrame) and len(catalogue) == 22
    assert set(catalogue["card"]) == {"s2", "bs"}
    signatures = cbm.extract(parcels, catalogue, bands={"s2": ["B04", "B08", "SCL"]})
    series = cbm.time_series(signatures, catalogue, parcels)
    results = cbm.run_markers(series, "ndvi-drop")
    verdicts = cbm.decide(results, parcels, "ndvi-drop")
    assert isinstance(verdicts, gpd.GeoDataFrame) and len(verdicts) == 18
    assert results["pid"].is_unique


def test_markers_see_observations_in_time_order_per_parcel(demo_dir):
    parcels = cbm.read_parcels(demo_dir / "parcels.gpkg")
    catalogue = cbm.read_catalogue(demo_dir / "scenes.csv")
    series = time_series(cbm.extract(parcels, catalogue, bands={"s2": ["B04"]}), catalogue, parcels)
    for _, group in series.stats.groupby("pid"):
        assert group["obstime"].is_monotonic_increasing
    assert str(series.stats["obstime"].dt.tz) == "UTC"


def test_ndvi_drop_marker_finds_the_cut_in_sample_series(cbm_plugin_manager, cbm_sample_series):
    engine = Engine(plugins=cbm_plugin_manager, progress=False)
    scheme = engine.scheme("ndvi-drop", Path("."))
    results = engine.run_markers(cbm_sample_series, scheme).set_index("pid")
    for pid, row in results.iterrows():
        events = json.loads(row["events"])
        if pid % 2:
            assert [e["main"] for e in events] == ["2023-06-15"], pid
        else:
            assert events == [], pid
    verdicts = engine.decide(results.reset_index(), cbm_sample_series.parcels, scheme).set_index("pid")
    assert (verdicts.loc[[1, 3, 5], "light"] == "green").all()
    assert (verdicts.loc[[2, 4, 6], "light"] == "red").all()
    assert "2023-06-15" in verdicts.loc[1, "reasons"] and "S2_20230615" in verdicts.loc[1, "reasons"]


def test_signatures_are_in_physical_units(demo_dir):
    parcels = cbm.read_parcels(demo_dir / "parcels.gpkg")
    catalogue = cbm.read_catalogue(demo_dir / "scenes.csv")
    stats = cbm.extract(parcels, catalogue, bands={"s2": ["B04"], "bs": ["VV"]}).stats
    clear_red = stats.loc[(stats["band"] == "B04") & (stats["obsid"] == "S2A_MSIL2A_20230405_T31UFS"), "mean"]
    assert len(clear_red) == 18 and clear_red.between(0.0, 0.3).all()  # vegetation red reflectance, not DN
    vv = stats.loc[stats["band"] == "VV", "mean"]
    assert (vv > 0).all() and np.isfinite(vv).all()  # linear power


def test_extract_without_store_returns_only_requested_bands(demo_dir):
    engine = Engine(progress=False)
    source = PluginConfig(
        "local", {"parcels": str(demo_dir / "parcels.gpkg"), "scenes": str(demo_dir / "scenes.csv")}
    )
    parcels, catalogue = engine.parcels(source), engine.catalogue(source)
    job = PluginConfig("zonal", {"card": "bs", "bands": ["VH"]})
    signatures, report = engine.extract(parcels, catalogue, [job], source)
    assert set(signatures.stats["band"]) == {"VH"} and len(report.extracted) == 10
    assert signatures.scl.empty
