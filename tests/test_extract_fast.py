"""The fast extractor plugins (s2_l2a, s1) on the real demo data, against rasterstats, and bad input."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from rasterstats import zonal_stats as rs_zonal_stats

from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError, InputError
from cbm_core.model import HIST_COLUMNS, STATS, BandRef, Scene, clear_fraction, validate_signatures
from extractors import _kernels as zonal
from extractors import s1, s2_l2a
from sources._raster import read_window

DEMO = Path(__file__).resolve().parents[1] / "demo" / "flanders-2023"
CLEAR = "S2A_MSIL2A_20230415_T31UFS"
RS_STATS = ["count", "mean", "std", "min", "max", "percentile_25", "percentile_50", "percentile_75"]


@pytest.fixture(scope="module")
def catalogue() -> pd.DataFrame:
    return pd.read_csv(DEMO / "scenes.csv")


@pytest.fixture
def parcels() -> gpd.GeoDataFrame:
    frame = gpd.read_file(DEMO / "parcels.gpkg", layer="parcels")
    return frame.assign(pid=frame["pid"].astype("int64"))


def scene_of(catalogue: pd.DataFrame, product: str, root: Path = DEMO) -> Scene:
    rows = catalogue[catalogue["product_id"] == product]
    card = "s2" if rows["collection"].iloc[0].startswith("SENTINEL2") else "bs"
    bands = {r.band: BandRef(str(root / r.path)) for r in rows.itertuples()}
    return Scene(product, pd.Timestamp(rows["obstime"].iloc[0]), rows["sensor"].iloc[0], card, bands)


def config(tmp_path: Path, plugin: str = "s2_l2a", **options) -> PluginConfig:
    return PluginConfig(plugin, {"cache_dir": str(tmp_path / "cache"), **options})


def extract(module, scene, parcels, bands, cfg):
    return module.cbm_extractor_extract(
        scene=scene, parcels=parcels, bands=bands, read_window=read_window, config=cfg
    )


def rasterstats_physical(uri: str, parcels: gpd.GeoDataFrame) -> pd.DataFrame:
    """rasterstats on the whole band (array + affine), then value * scale + offset as the plugins do."""
    with rasterio.open(uri) as src:
        array, transform, nodata = src.read(1), src.transform, src.nodata
        scale, offset = src.scales[0], src.offsets[0]
    rows = rs_zonal_stats(
        parcels.to_crs(src.crs).geometry.values, array, affine=transform, nodata=nodata, stats=RS_STATS
    )
    frame = pd.DataFrame(rows)[RS_STATS].astype(float)
    frame.columns = list(STATS)
    for c in STATS[1:]:
        frame[c] = frame[c] * abs(scale) if c == "std" else frame[c] * scale + offset
    frame.index = parcels["pid"].to_numpy()
    return frame.fillna({"count": 0})


def assert_matches_rasterstats(got: pd.DataFrame, ref: pd.DataFrame, rtol: float = 1e-12) -> None:
    got = got.set_index("pid")[list(STATS)].sort_index()
    ref = ref.loc[got.index]
    assert (got["count"].to_numpy() == ref["count"].to_numpy()).all()
    np.testing.assert_allclose(
        got[list(STATS[1:])].to_numpy(), ref[list(STATS[1:])].to_numpy(), rtol=rtol, atol=1e-12
    )


# Sentinel-2 on the real demo data --------------------------------------------------------------


def test_s2_bands_at_10_20_60_m_equal_rasterstats(catalogue, parcels, tmp_path):
    scene = scene_of(catalogue, CLEAR)
    sig = extract(s2_l2a, scene, parcels, ["B04", "B11", "B01", "SCL"], config(tmp_path))
    validate_signatures(sig.stats, "s2_l2a")
    assert set(sig.stats["band"]) == {"B04", "B11", "B01"}
    for band in ("B04", "B11", "B01"):
        rows = sig.stats[sig.stats["band"] == band]
        assert sorted(rows["pid"]) == sorted(parcels["pid"])
        assert_matches_rasterstats(rows, rasterstats_physical(scene.bands[band].uri, parcels))
    # SCL: per-class pixel counts, as rasterstats' categorical counts on the same pixels.
    with rasterio.open(scene.bands["SCL"].uri) as src:
        scl, transform = src.read(1), src.transform
    cats = rs_zonal_stats(parcels.geometry.values, scl, affine=transform, nodata=255, categorical=True)
    hist = sig.scl.set_index("pid").loc[parcels["pid"], list(HIST_COLUMNS)].to_numpy()
    expected = np.array([[c.get(k, 0) for k in range(12)] for c in cats])
    assert (hist == expected).all() and hist.sum() > 0
    assert list(sig.scl.columns) == ["pid", "obsid", *HIST_COLUMNS]
    assert (clear_fraction(sig.scl) > 0.9).all()  # a clear date


def test_ndvi_is_computed_per_pixel_before_the_reduction(catalogue, parcels, tmp_path):
    scene = scene_of(catalogue, CLEAR)
    sig = extract(s2_l2a, scene, parcels, ["B04"], config(tmp_path, indices=["NDVI"]))
    ndvi = sig.stats[sig.stats["band"] == "NDVI"]
    with rasterio.open(scene.bands["B08"].uri) as nir, rasterio.open(scene.bands["B04"].uri) as red:
        a = nir.read(1) * nir.scales[0] + nir.offsets[0]
        b = red.read(1) * red.scales[0] + red.offsets[0]
        transform = red.transform
    per_pixel = ((a - b) / (a + b)).astype(np.float32)
    rows = rs_zonal_stats(parcels.geometry.values, per_pixel, affine=transform, nodata=np.nan, stats=RS_STATS)
    ref = pd.DataFrame(rows)[RS_STATS].set_axis(list(STATS), axis=1).set_index(parcels["pid"].to_numpy())
    assert_matches_rasterstats(ndvi, ref, rtol=1e-6)
    assert ndvi["p50"].between(0.6, 0.95).all()  # vegetated fields in April (README)


def test_boa_offset_option_shifts_reflectances_by_offset_times_scale(catalogue, parcels, tmp_path):
    scene = scene_of(catalogue, CLEAR)
    plain = extract(s2_l2a, scene, parcels, ["B04", "SCL"], config(tmp_path)).stats.set_index("pid")
    shifted = extract(s2_l2a, scene, parcels, ["B04", "SCL"], config(tmp_path, boa_offset=-1000)).stats
    shifted = shifted.set_index("pid").loc[plain.index]
    for c in ("mean", "min", "max", "p25", "p50", "p75"):
        np.testing.assert_allclose(shifted[c], plain[c] - 0.1, atol=1e-12)
    np.testing.assert_allclose(shifted["std"], plain["std"], rtol=1e-12)


def test_options_are_checked(catalogue, parcels, tmp_path):
    scene = scene_of(catalogue, CLEAR)
    with pytest.raises(ConfigError, match="unknown index NDXI"):
        extract(s2_l2a, scene, parcels, ["B04"], config(tmp_path, indices=["NDXI"]))
    with pytest.raises(ConfigError, match="all_touched"):
        extract(s2_l2a, scene, parcels, ["B04"], config(tmp_path, all_touched="yes"))
    with pytest.raises(InputError, match="Sentinel-2 scenes, not card 'bs'"):
        extract(s2_l2a, scene_of(catalogue, "S1A_IW_GRDH_20230415"), parcels, ["VV"], config(tmp_path))


def test_a_grid_is_rasterized_once_for_every_band_and_date(catalogue, parcels, tmp_path):
    cfg = config(tmp_path)
    cache = zonal.index_cache(Path(cfg.options["cache_dir"]))
    products = catalogue[catalogue["collection"] == "SENTINEL2_L2A"]["product_id"].unique()[:3]
    for product in products:
        extract(s2_l2a, scene_of(catalogue, product), parcels, ["B04", "B08", "B11", "SCL", "B01"], cfg)
    assert cache.misses == 3  # one per grid: 10 m, 20 m (B11 and SCL), 60 m
    assert cache.hits == 3 * 5 - 3


# Sentinel-1 ------------------------------------------------------------------------------------


def test_s1_backscatter_is_reduced_in_linear_power(catalogue, parcels, tmp_path):
    scene = scene_of(catalogue, "S1A_IW_GRDH_20230415")
    sig = extract(s1, scene, parcels, ["VV", "VH"], config(tmp_path, "s1"))
    assert sig.scl.empty and set(sig.stats["band"]) == {"VV", "VH"}
    for band in ("VV", "VH"):
        ref = rasterstats_physical(scene.bands[band].uri, parcels)
        assert_matches_rasterstats(sig.stats[sig.stats["band"] == band], ref, rtol=2e-6)  # float32 pixels


def test_s1_db_files_are_linearised_per_pixel(catalogue, parcels, tmp_path):
    linear_scene = scene_of(catalogue, "S1A_IW_GRDH_20230415")
    with rasterio.open(linear_scene.bands["VV"].uri) as src:
        profile, linear = src.profile, src.read(1)
    db_path = tmp_path / "VV_db.tif"
    with rasterio.open(db_path, "w", **profile) as dst:
        dst.write((10 * np.log10(linear)).astype(np.float32), 1)
    db_scene = Scene("db", linear_scene.obstime, linear_scene.sensor, "bs", {"VV": BandRef(str(db_path))})
    from_db = extract(s1, db_scene, parcels, ["VV"], config(tmp_path, "s1", db_input=True)).stats
    direct = extract(s1, linear_scene, parcels, ["VV"], config(tmp_path, "s1")).stats
    np.testing.assert_allclose(from_db[list(STATS)].to_numpy(), direct[list(STATS)].to_numpy(), rtol=1e-5)
    # the mean of linear power is not the power of the mean dB: it is higher
    naive = extract(s1, db_scene, parcels, ["VV"], config(tmp_path, "s1")).stats
    assert (10 ** (naive["mean"].to_numpy() / 10) < direct["mean"].to_numpy()).all()


# Bad input ------------------------------------------------------------------------------------


def test_truncated_geotiff_is_an_input_error_naming_the_file(catalogue, parcels, tmp_path):
    scene = scene_of(catalogue, CLEAR)
    with rasterio.open(scene.bands["B04"].uri) as src:
        profile, data = src.profile, src.read(1)
    big = tmp_path / "B04_full.tif"
    # 1 m pixels over the same extent: many tiles, so the header survives the cut and the parcels
    # need the lost tiles.
    fine = rasterio.Affine(1, 0, src.transform.c, 0, -1, src.transform.f)
    profile.update(
        width=640, height=660, blockxsize=64, blockysize=64, tiled=True, compress="deflate", transform=fine
    )
    with rasterio.open(big, "w", **profile) as dst:
        dst.write(np.kron(data, np.ones((10, 10), np.uint16)), 1)
    raw = big.read_bytes()
    cut = tmp_path / "B04.tif"
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    bad = Scene("cut", scene.obstime, scene.sensor, "s2", {"B04": BandRef(str(cut))})
    with pytest.raises(InputError, match=re.escape(str(cut))):
        extract(s2_l2a, bad, parcels, ["B04"], config(tmp_path))
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match=r"garbage\.tif"):
        extract(
            s2_l2a,
            Scene("g", scene.obstime, "S2A", "s2", {"B04": BandRef(str(garbage))}),
            parcels,
            ["B04"],
            config(tmp_path),
        )


def test_parcels_in_another_crs_are_reprojected_to_the_raster(catalogue, parcels, tmp_path):
    scene = scene_of(catalogue, CLEAR)
    lonlat = parcels.to_crs("EPSG:4326")
    sig = extract(s2_l2a, scene, lonlat, ["B04"], config(tmp_path))
    # the reference sees the same reprojected outlines (pixel-centre ties decide on the last bit)
    assert_matches_rasterstats(sig.stats, rasterstats_physical(scene.bands["B04"].uri, lonlat))
    assert (sig.stats["count"] > 0).all()


def test_scene_overlapping_no_parcel_gives_no_rows(catalogue, parcels, tmp_path):
    far = parcels.set_geometry(parcels.translate(100_000, 0))
    sig = extract(s2_l2a, scene_of(catalogue, CLEAR), far, ["B04", "SCL"], config(tmp_path))
    assert sig.stats.empty and sig.scl.empty


def test_all_nodata_scene_gives_count_0_rows(catalogue, parcels, tmp_path):
    scene = scene_of(catalogue, CLEAR)
    with rasterio.open(scene.bands["B04"].uri) as src:
        profile = src.profile
    empty = tmp_path / "B04.tif"
    with rasterio.open(empty, "w", **profile) as dst:
        dst.write(np.zeros((profile["height"], profile["width"]), np.uint16), 1)
    sig = extract(
        s2_l2a,
        Scene("nd", scene.obstime, "S2A", "s2", {"B04": BandRef(str(empty))}),
        parcels,
        ["B04"],
        config(tmp_path),
    )
    assert len(sig.stats) == len(parcels) and (sig.stats["count"] == 0).all()
    assert sig.stats[list(STATS[1:])].isna().all().all()


def test_parcel_smaller_than_a_pixel_and_invalid_parcel(catalogue, parcels, tmp_path, caplog):
    scene = scene_of(catalogue, CLEAR)
    x, y = 643_261.0, 5_676_471.0  # inside the first pixel, away from its centre
    bowtie = shapely.Polygon(
        [(643_400, 5_676_000), (643_500, 5_676_100), (643_500, 5_676_000), (643_400, 5_676_100)]
    )
    extra = gpd.GeoDataFrame(
        {"pid": [1001, 1002]}, geometry=[shapely.box(x, y, x + 3, y + 3), bowtie], crs=parcels.crs
    )
    mixed = pd.concat([parcels[["pid", "geometry"]], extra], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="cbm.extract"):
        sig = extract(s2_l2a, scene, mixed, ["B04"], config(tmp_path))
    rows = sig.stats.set_index("pid")
    assert rows.loc[1001, "count"] == 0 and np.isnan(rows.loc[1001, "mean"])
    assert "pid 1002" in caplog.text
    repaired = mixed.assign(geometry=shapely.make_valid(mixed.geometry.values))
    assert_matches_rasterstats(sig.stats, rasterstats_physical(scene.bands["B04"].uri, repaired))
    assert rows.loc[1002, "count"] > 0


def test_a_copy_of_the_demo_with_missing_band_is_skipped(catalogue, parcels, tmp_path):
    scene = scene_of(catalogue, CLEAR)
    folder = tmp_path / "S2"
    folder.mkdir()
    shutil.copy(scene.bands["B04"].uri, folder / "B04.tif")
    only = Scene(scene.obsid, scene.obstime, scene.sensor, "s2", {"B04": BandRef(str(folder / "B04.tif"))})
    sig = extract(s2_l2a, only, parcels, ["B04", "B08"], config(tmp_path, indices=["NDVI"]))
    assert set(sig.stats["band"]) == {"B04"}  # B08 and NDVI need a band this scene lacks
