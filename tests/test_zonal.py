"""The fast-extraction kernels (extractors._kernels) against GDAL's rasterizer and plain numpy."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from rasterio import features

from cbm_core.config import PluginConfig
from cbm_core.model import clear_fraction
from extractors import _kernels as zonal
from extractors._kernels import (
    Grid,
    PixelIndex,
    RasterizeOptions,
    class_histogram,
    rasterize,
    to_physical,
    zonal_stats,
)

ROOT = Path(__file__).resolve().parents[1]
CRS = "EPSG:32631"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def masks(geoms, grid: Grid, all_touched: bool = False) -> np.ndarray:
    """Our rasterization as one boolean mask per geometry."""
    offsets, starts, lengths = rasterize(np.asarray(geoms, dtype=object), grid, all_touched)
    out = np.zeros((len(geoms), grid.shape[0] * grid.shape[1]), bool)
    for i in range(len(geoms)):
        for s, n in zip(
            starts[offsets[i] : offsets[i + 1]], lengths[offsets[i] : offsets[i + 1]], strict=True
        ):
            assert not out[i, s : s + n].any(), "runs of one parcel overlap"
            out[i, s : s + n] = True
    return out.reshape(len(geoms), *grid.shape)


def gdal_mask(geom, grid: Grid, all_touched: bool = False) -> np.ndarray:
    return features.rasterize(
        [(geom, 1)], out_shape=grid.shape, transform=grid.transform, all_touched=all_touched, fill=0
    ).astype(bool)


def index_of(geoms, grid: Grid, all_touched: bool = False) -> PixelIndex:
    offsets, starts, lengths = rasterize(np.asarray(geoms, dtype=object), grid, all_touched)
    return PixelIndex(grid, np.arange(len(geoms), dtype=np.int64), offsets, starts, lengths, "test")


@st.composite
def grids(draw) -> Grid:
    size = draw(st.sampled_from([10.0, 20.0, 60.0]))
    x0 = draw(st.floats(-1000, 1000, allow_nan=False)) + 600_000
    y0 = draw(st.floats(-1000, 1000, allow_nan=False)) + 5_700_000
    shape = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    return Grid(Affine(size, 0, x0, 0, -size, y0), shape, CRS)


@st.composite
def polygons(draw, grid: Grid):
    """Valid star-shaped polygons near the grid, sometimes with a hole or a second part."""
    left, bottom, right, top = grid.bounds
    pixel = grid.transform.a
    cx = draw(st.floats(left - 2 * pixel, right + 2 * pixel))
    cy = draw(st.floats(bottom - 2 * pixel, top + 2 * pixel))
    n = draw(st.integers(3, 12))
    angles = np.sort(np.array(draw(st.lists(st.floats(0, 2 * np.pi), min_size=n, max_size=n, unique=True))))
    radii = np.array(draw(st.lists(st.floats(0.2 * pixel, 12 * pixel), min_size=n, max_size=n)))
    poly = shapely.make_valid(
        shapely.Polygon(np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)])
    )
    if draw(st.booleans()):
        poly = poly.difference(shapely.Point(cx, cy).buffer(draw(st.floats(0.3 * pixel, 4 * pixel))))
    if draw(st.booleans()):  # a second part well away from the first: a multipolygon
        far = shapely.box(
            cx + 14 * pixel, cy, cx + 14 * pixel + draw(st.floats(0.5, 8)) * pixel, cy + 3 * pixel
        )
        poly = poly.union(far)
    poly = shapely.make_valid(poly)
    parts = [p for p in shapely.get_parts(poly) if p.geom_type in ("Polygon", "MultiPolygon")]
    assume(parts)
    return shapely.union_all(parts)


# Rasterization --------------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_pixel_centre_rasterization_is_gdal_exactly(data):
    grid = data.draw(grids())
    geoms = [data.draw(polygons(grid)) for _ in range(3)]
    ours = masks(geoms, grid)
    for geom, mask in zip(geoms, ours, strict=True):
        assert (mask == gdal_mask(geom, grid)).all()


@FAST
@given(data=st.data())
def test_all_touched_is_every_pixel_the_polygon_overlaps(data):
    grid = data.draw(grids())
    geom = data.draw(polygons(grid))
    touched = masks([geom], grid, all_touched=True)[0]
    assert (touched >= masks([geom], grid)[0]).all()
    rows, cols = np.indices(grid.shape)
    t = grid.transform
    cells = shapely.box(t.c + cols * t.a, t.f + (rows + 1) * t.e, t.c + (cols + 1) * t.a, t.f + rows * t.e)
    area = shapely.area(shapely.intersection(cells, geom))
    clear = (area > 1e-6 * t.a**2) | ~shapely.intersects(cells, geom)  # leave out grazing contacts
    assert (touched[clear] == (area[clear] > 0)).all()


@pytest.mark.parametrize("exterior_cw", [False, True])
def test_edges_on_pixel_centres_follow_gdal(exterior_cw):
    # Outlines on a 10 m staircase seen from a 20 m grid: every other edge lies exactly on a row or
    # column of pixel centres, where GDAL's half-open rule and the ring direction decide.
    steps = [(0, 0), (30, 0), (30, 10), (50, 10), (50, 30), (70, 30), (70, 70), (10, 70), (10, 50), (0, 50)]
    stair = shapely.Polygon([(600_000 + x, 5_699_800 + y) for x, y in steps])
    hole = shapely.box(600_030, 5_699_840, 600_050, 5_699_850)
    geom = shapely.orient_polygons(shapely.Polygon(stair.exterior, [hole.exterior]), exterior_cw=exterior_cw)
    for size in (10.0, 20.0):
        grid = Grid(Affine(size, 0, 599_980, 0, -size, 5_700_000), (int(240 / size), int(120 / size)), CRS)
        assert (masks([geom], grid)[0] == gdal_mask(geom, grid)).all()


def test_overlapping_parcels_each_get_the_shared_pixels():
    grid = Grid(Affine(10, 0, 0, 0, -10, 100), (10, 10), CRS)
    a, b = shapely.box(0, 0, 60, 60), shapely.box(40, 40, 100, 100)
    ma, mb = masks([a, b], grid)
    assert (ma & mb).sum() == 4  # the 2 x 2 pixels whose centres lie in both squares
    assert ma.sum() == mb.sum() == 36


def test_parcel_smaller_than_a_pixel_has_no_pixel_but_a_row():
    grid = Grid(Affine(10, 0, 0, 0, -10, 100), (10, 10), CRS)
    tiny = shapely.box(11, 11, 14, 14)  # misses every pixel centre
    index = index_of([tiny], grid)
    assert len(index) == 1 and index.pixel_counts().tolist() == [0]
    stats = zonal_stats(np.ones(grid.shape, np.uint16), index, 0)
    assert stats[0, 0] == 0 and np.isnan(stats[0, 1:]).all()


def test_negative_buffer_drops_the_edge_pixels():
    parcels = gpd.GeoDataFrame({"pid": [1]}, geometry=[shapely.box(0, 0, 100, 100)], crs=CRS)
    prepared = zonal.prepare_parcels(parcels)
    grid = Grid(Affine(10, 0, 0, 0, -10, 100), (10, 10), CRS)
    plain = zonal.build_index(prepared, prepared.blocks[0], grid, RasterizeOptions())
    shrunk = zonal.build_index(prepared, prepared.blocks[0], grid, RasterizeOptions(buffer=-10.0))
    assert plain.pixel_counts().tolist() == [100] and shrunk.pixel_counts().tolist() == [64]


# Reductions ------------------------------------------------------------------------------------


def numpy_reference(values: np.ndarray) -> np.ndarray:
    if values.size == 0:
        return np.array([0] + [np.nan] * 7)
    # In float64: numpy's integer lerp computes b - a in the pixel type, which overflows for int16
    # values more than 32767 apart; for every other case the result is the same.
    p25, p50, p75 = np.percentile(values.astype(np.float64), [25, 50, 75])
    return np.array([values.size, values.mean(dtype=np.float64), values.astype(np.float64).std(),
                     values.min(), values.max(), p25, p50, p75], dtype=np.float64)  # fmt: skip


@FAST
@given(
    data=st.data(),
    dtype=st.sampled_from(["uint8", "uint16", "int16", "int32", "float32", "float64"]),
    nodata_share=st.floats(0, 1),
)
def test_statistics_equal_numpy_on_the_pixels_gdal_selects(data, dtype, nodata_share):
    grid = data.draw(grids())
    geoms = [data.draw(polygons(grid)) for _ in range(4)]  # random, so they often overlap
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    info = np.iinfo(dtype) if dtype[0] in "ui" else None
    if info is not None:
        low = max(info.min, -40_000)
        array = rng.integers(low, min(info.max, 40_000), grid.shape, endpoint=True).astype(dtype)
        nodata = float(low)
    else:
        array = rng.normal(0.2, 0.1, grid.shape).astype(dtype)
        array[rng.random(grid.shape) < nodata_share / 2] = np.nan
        nodata = -9999.0
    array[rng.random(grid.shape) < nodata_share] = nodata
    got = zonal_stats(array, index_of(geoms, grid), nodata)
    for geom, row in zip(geoms, got, strict=True):
        pixels = array[gdal_mask(geom, grid)]
        valid = pixels[(pixels != nodata) & ~np.isnan(pixels.astype(np.float64))]
        ref = numpy_reference(valid)
        assert row[0] == ref[0]
        # float32 tolerance: numpy reduces float32 in float32, we accumulate in float64
        np.testing.assert_allclose(
            row[1:], ref[1:], rtol=2e-6, atol=1e-9 * max(1.0, np.nanmax(np.abs(ref[1:]), initial=0))
        )
        if info is not None and ref[0]:  # integer pixels: order statistics and percentiles are bit-identical
            assert (row[3:] == ref[3:]).all()


def test_constant_parcel_has_exactly_zero_std():
    grid = Grid(Affine(10, 0, 0, 0, -10, 1000), (100, 100), CRS)
    array = np.full(grid.shape, 65_000, np.uint16)
    stats = zonal_stats(array, index_of([shapely.box(0, 0, 1000, 1000)], grid), 0)
    assert stats[0, 0] == 10_000 and stats[0, 2] == 0.0 and stats[0, 1] == 65_000


def test_class_histogram_counts_every_class_including_nodata_class_0():
    grid = Grid(Affine(20, 0, 0, 0, -20, 400), (20, 20), CRS)
    rng = np.random.default_rng(3)
    scl = rng.integers(0, 13, grid.shape).astype(np.uint8)  # 12 is not an SCL class: not counted
    geoms = [shapely.box(0, 0, 250, 250), shapely.Point(200, 200).buffer(150)]
    hist = class_histogram(scl, index_of(geoms, grid))
    for geom, row in zip(geoms, hist, strict=True):
        assert row.tolist() == np.bincount(scl[gdal_mask(geom, grid)], minlength=13)[:12].tolist()
    assert clear_fraction(np.array([[5, 0, 0, 0, 3, 1, 0, 0, 0, 2, 0, 0]])).tolist() == [4 / 6]
    assert np.isnan(clear_fraction(np.array([[7] + [0] * 11])))[0]


def test_physical_units_after_reduction_and_negative_scale():
    raw = np.array([[4, 10.0, 2.0, 5.0, 15.0, 7.0, 10.0, 13.0]])
    phys = to_physical(raw, 0.5, -1.0)
    assert phys.tolist() == [[4, 4.0, 1.0, 1.5, 6.5, 2.5, 4.0, 5.5]]
    flipped = to_physical(raw, -1.0, 0.0)
    assert flipped.tolist() == [[4, -10.0, 2.0, -15.0, -5.0, -13.0, -10.0, -7.0]]


# Preparation and caching ---------------------------------------------------------------------


def test_invalid_geometry_is_repaired_and_reported(caplog):
    bowtie = shapely.Polygon([(0, 0), (100, 100), (100, 0), (0, 100)])
    parcels = gpd.GeoDataFrame({"pid": [7, 8]}, geometry=[bowtie, shapely.box(0, 0, 50, 50)], crs=CRS)
    with caplog.at_level(logging.WARNING, logger="cbm.extract"):
        prepared = zonal.prepare_parcels(parcels)
    assert prepared.repaired == [7] and "pid 7" in caplog.text
    assert shapely.is_valid(prepared.geoms).all()
    assert shapely.area(prepared.geoms[0]) == pytest.approx(5000)


def test_prepared_parcels_are_memoised_for_subsets_sharing_geometries():
    parcels = gpd.GeoDataFrame(
        {"pid": [1, 2]}, geometry=[shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)], crs=CRS
    )
    first = zonal.prepare_parcels(parcels)
    assert zonal.prepare_parcels(parcels.iloc[[0, 1]]) is first  # what the pipeline passes per scene
    other = zonal.prepare_parcels(parcels.iloc[[1]])
    assert other is not first and other.fingerprint != first.fingerprint
    moved = parcels.set_geometry(parcels.translate(1, 0))
    assert zonal.prepare_parcels(moved).fingerprint != first.fingerprint


def _demo_like(tmp_path: Path) -> tuple[zonal.PreparedParcels, Grid]:
    parcels = gpd.GeoDataFrame(
        {"pid": [1, 2, 3]},
        geometry=[shapely.box(5, 5, 95, 95), shapely.Point(150, 50).buffer(40), shapely.box(0, 0, 3, 3)],
        crs=CRS,
    )
    return zonal.prepare_parcels(parcels), Grid(Affine(10, 0, 0, 0, -10, 100), (10, 20), CRS)


def _gdal_counts(prepared: zonal.PreparedParcels, grid: Grid) -> list[int]:
    return [int(gdal_mask(g, grid).sum()) for g in prepared.geoms]


def test_index_cache_rasterizes_once_per_grid_then_reuses(tmp_path):
    prepared, grid = _demo_like(tmp_path)
    cache = zonal.IndexCache(tmp_path / "cache")
    first = cache.get(prepared, 0, grid, RasterizeOptions())
    again = cache.get(prepared, 0, grid, RasterizeOptions())
    assert (cache.misses, cache.hits) == (1, 1) and again is first
    other_grid = Grid(Affine(20, 0, 0, 0, -20, 100), (5, 10), CRS)
    cache.get(prepared, 0, other_grid, RasterizeOptions())
    cache.get(prepared, 0, grid, RasterizeOptions(all_touched=True))
    assert cache.misses == 3  # grids and options are part of the key
    fresh = zonal.IndexCache(tmp_path / "cache")  # a new process state: same key, from disk
    loaded = fresh.get(prepared, 0, grid, RasterizeOptions())
    assert (fresh.misses, fresh.disk_hits) == (0, 1)
    for name in ("pids", "offsets", "run_start", "run_length"):
        assert np.array_equal(getattr(loaded, name), getattr(first, name))


def test_disk_cache_is_shared_across_processes(tmp_path):
    script = f"""
import geopandas as gpd, shapely
from affine import Affine
from extractors import _kernels as zonal
parcels = gpd.GeoDataFrame({{"pid": [1, 2, 3]}}, geometry=[shapely.box(5, 5, 95, 95),
    shapely.Point(150, 50).buffer(40), shapely.box(0, 0, 3, 3)], crs="{CRS}")
cache = zonal.IndexCache({str(tmp_path / "cache")!r})
cache.get(zonal.prepare_parcels(parcels), 0, zonal.Grid(Affine(10, 0, 0, 0, -10, 100), (10, 20), "{CRS}"),
          zonal.RasterizeOptions())
assert cache.misses == 1
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)
    prepared, grid = _demo_like(tmp_path)
    cache = zonal.IndexCache(tmp_path / "cache")
    index = cache.get(prepared, 0, grid, RasterizeOptions())
    assert (cache.misses, cache.disk_hits) == (0, 1)
    assert index.pixel_counts().tolist() == _gdal_counts(prepared, grid)


def test_disk_cache_stays_under_its_cap_evicting_the_least_recently_used(tmp_path):
    prepared, _ = _demo_like(tmp_path)
    grids = [
        Grid(Affine(res, 0, 0, 0, -res, 100), (int(100 / res), int(200 / res)), CRS)
        for res in (5, 10, 20, 25)
    ]
    folder = tmp_path / "cache"

    def files() -> dict[str, int]:
        return {p.name: p.stat().st_size for p in folder.glob("*.npz")}

    probe = zonal.IndexCache(folder)
    probe.get(prepared, 0, grids[0], RasterizeOptions())
    cap = 2.5 * max(files().values())  # room for two indexes of this size
    cache = zonal.IndexCache(folder, max_bytes=cap)
    names = []
    for grid in grids[1:3]:
        cache.get(prepared, 0, grid, RasterizeOptions())
        names.append(max(files(), key=lambda n: (folder / n).stat().st_mtime_ns))
    assert sum(files().values()) <= cap and set(files()) == set(names)  # the first (oldest) went
    zonal.IndexCache(folder, max_bytes=cap).get(prepared, 0, grids[1], RasterizeOptions())  # used again
    cache.get(prepared, 0, grids[3], RasterizeOptions())
    assert sum(files().values()) <= cap
    assert names[0] in files() and names[1] not in files()  # least recently used, not first written
    assert cache.evicted == 2


def test_cache_folder_and_cap_come_from_config_environment_or_platform(tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.delenv(zonal.CACHE_ENV, raising=False)
    monkeypatch.delenv(zonal.CACHE_MAX_MB_ENV, raising=False)
    monkeypatch.setattr(platformdirs, "user_cache_path", lambda app, appauthor: tmp_path / "platform" / app)
    options = zonal.extract_options(PluginConfig("s2_l2a", {}, tmp_path, "[[extract]]"))
    assert options.cache.directory == tmp_path / "platform" / "cbm-engine" / "pixel-index"
    assert options.cache.max_bytes == zonal.DEFAULT_CACHE_MAX_MB * 2**20
    monkeypatch.setenv(zonal.CACHE_MAX_MB_ENV, "64")
    assert zonal.extract_options(PluginConfig("s2_l2a", {}, tmp_path)).cache.max_bytes == 64 * 2**20
    configured = PluginConfig("s2_l2a", {"cache_dir": "c", "cache_max_mb": 1.5}, tmp_path, "[[extract]]")
    assert zonal.extract_options(configured).cache.max_bytes == 1.5 * 2**20
    with pytest.raises(zonal.ConfigError, match="cache_max_mb > 0"):
        zonal.extract_options(PluginConfig("s2_l2a", {"cache_max_mb": 0}, tmp_path, "[[extract]]"))
    monkeypatch.setenv(zonal.CACHE_MAX_MB_ENV, "lots")
    with pytest.raises(zonal.ConfigError, match="CBM_CACHE_MAX_MB: not a number: 'lots'"):
        zonal.extract_options(PluginConfig("s2_l2a", {}, tmp_path))


def test_unreadable_cache_file_is_rebuilt(tmp_path, caplog):
    prepared, grid = _demo_like(tmp_path)
    cache = zonal.IndexCache(tmp_path / "cache")
    cache.get(prepared, 0, grid, RasterizeOptions())
    for path in (tmp_path / "cache").glob("*.npz"):
        path.write_bytes(b"not a zip")
    fresh = zonal.IndexCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="cbm.extract"):
        index = fresh.get(prepared, 0, grid, RasterizeOptions())
    assert fresh.misses == 1 and "unreadable pixel-index cache" in caplog.text
    assert index.pixel_counts().tolist() == _gdal_counts(prepared, grid)
