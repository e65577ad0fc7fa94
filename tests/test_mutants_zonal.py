"""Zonal reductions, exactly: the reference extractor (extractors/zonal.py) against numpy on the
pixels it must select, the numba kernels' entry points (extractors/_kernels.py) against numpy, and
the fast S2 extractor against rasterstats on the real demo scenes, bit for bit.

Focused and fast: bench/mutation.py runs this file against the mutants of both modules. Each
docstring names a one-line bug the test was checked against (planted, seen failing, reverted).
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from affine import Affine
from conftest import DEMO
from rasterio.features import geometry_mask

import cbm_core as cbm
from cbm_core.config import PluginConfig
from cbm_core.model import HIST_COLUMNS, STATS, BandRef, RasterWindow, Scene
from extractors import zonal
from extractors._kernels import (
    Grid,
    PixelIndex,
    class_histogram,
    rasterize,
    scl_frame,
    stats_frame,
    to_physical,
    zonal_stats,
)

CRS = "EPSG:32631"
TRANSFORM = Affine(10, 0, 600000, 0, -10, 5000200)  # 20 x 20 pixels of 10 m
RNG = np.random.default_rng(19)
VALUES = RNG.integers(0, 1000, (20, 20)).astype(np.uint16)
CLASSES = RNG.integers(0, 14, (20, 20)).astype(np.uint8)  # 12 and 13 are no SCL class


def parcels(*geoms, crs: str = CRS) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame({"pid": np.arange(1, len(geoms) + 1)}, geometry=list(geoms), crs=crs)


SHAPES = (
    shapely.box(600012, 5000012, 600088, 5000088),  # inside
    shapely.Polygon([(600100, 5000100), (600190, 5000110), (600150, 5000190)]),  # a triangle
    shapely.box(599950, 5000150, 600030, 5000250),  # over the upper-left corner
    shapely.box(600001, 5000001, 600004, 5000004),  # holds no pixel centre
    shapely.box(610000, 5000000, 610100, 5000100),  # outside the window
    shapely.box(600100, 5000000, 600200, 5000001),  # only touches the lower edge band
    shapely.box(600004.9, 5000100.2, 600016.1, 5000113.3),  # rounding drops a column: the margin keeps it
    shapely.box(600001, 5000051, 600009, 5000059),  # one pixel, in the window's first column
)


def mask(geom, transform=TRANSFORM, shape=(20, 20)) -> np.ndarray:
    return ~geometry_mask([geom], out_shape=shape, transform=transform, all_touched=False)


def expected(values: np.ndarray, scale: float = 1.0, offset: float = 0.0) -> dict:
    data = values.astype(np.float64)
    if data.size == 0:
        return {"count": 0, **{s: np.nan for s in STATS[1:]}}
    p25, p50, p75 = np.percentile(data, [25, 50, 75])
    low, high = (data.min(), data.max()) if scale >= 0 else (data.max(), data.min())
    q25, q75 = (p25, p75) if scale >= 0 else (p75, p25)
    return {"count": data.size, "mean": data.mean() * scale + offset, "std": data.std() * abs(scale),
            "min": low * scale + offset, "max": high * scale + offset, "p25": q25 * scale + offset,
            "p50": p50 * scale + offset, "p75": q75 * scale + offset}  # fmt: skip


def reference(frame: gpd.GeoDataFrame, bands: dict[str, np.ndarray], nodata=None, scale=1.0, offset=0.0,
              crs: str = CRS, transform: Affine = TRANSFORM, wanted=None):  # fmt: skip
    scene = Scene("S2_x", pd.Timestamp("2023-05-01", tz="UTC"), "S2A", "s2", {b: BandRef(b) for b in bands})
    read = lambda ref, bounds, asked: RasterWindow(bands[ref.uri], transform, crs, nodata, scale, offset)  # noqa: E731
    return zonal.cbm_extractor_extract(
        scene=scene,
        parcels=frame,
        bands=wanted or list(bands),
        read_window=read,
        config=PluginConfig("zonal"),
    )


@pytest.mark.parametrize(("scale", "offset"), [(1.0, 0.0), (0.0001, -0.1), (-0.5, 3.0)])
def test_reference_statistics_are_numpy_on_the_pixel_centres_inside(scale, offset):
    """Every statistic of every parcel equals numpy on exactly the pixels whose centre lies in the
    polygon, then scaled. Planted bugs: the `+ 1` margin of the sub-window dropped (edge pixels
    lost: parcel 7); the window's left edge taken one pixel in (parcel 8 lost); `scale < 0` ->
    `scale > 0` (min/max not swapped); `abs(scale)` dropped from std; `np.percentile` at
    25/50/75 -> 25/50/76."""
    got = reference(parcels(*SHAPES), {"B04": VALUES}, scale=scale, offset=offset).stats.set_index("pid")
    assert sorted(got.index) == [1, 2, 3, 4, 6, 7, 8]  # the parcel outside the window has no row
    for pid, geom in enumerate(SHAPES, start=1):
        if pid == 5:
            continue
        want = expected(VALUES[mask(geom)], scale, offset)
        row = got.loc[pid]
        assert row["count"] == want["count"], pid
        for stat in STATS[1:]:
            assert row[stat] == pytest.approx(want[stat], rel=1e-12, nan_ok=True), (pid, stat)
    assert got.loc[4, "count"] == 0 and np.isnan(got.loc[4, "mean"])  # no pixel centre: a row of NaN
    assert got["obsid"].eq("S2_x").all() and got["band"].eq("B04").all()


def test_reference_leaves_out_nodata_and_nan_and_counts_scl_classes():
    """Nodata and NaN pixels are not statistics; SCL pixels become a 12-class histogram (other
    values ignored). Planted bugs: `values != nodata` -> `==`; the NaN filter dropped;
    `minlength=SCL_CLASSES` -> `SCL_CLASSES + 1` with `[:SCL_CLASSES]` dropped."""
    floats = VALUES.astype(np.float32)
    floats[::3, ::2] = np.nan
    floats[1::4] = -1.0
    geoms = parcels(SHAPES[0], SHAPES[2])
    out = reference(geoms, {"B04": floats, "SCL": CLASSES}, nodata=-1.0)
    stats = out.stats.set_index("pid")
    for pid, geom in zip(geoms["pid"], geoms.geometry, strict=True):
        pixels = floats[mask(geom)]
        want = expected(pixels[(pixels != -1.0) & ~np.isnan(pixels)])
        assert stats.loc[pid, "count"] == want["count"]
        assert stats.loc[pid, "mean"] == pytest.approx(want["mean"], rel=1e-12)
        hist = out.scl.set_index("pid").loc[pid, list(HIST_COLUMNS)].to_numpy()
        classes = CLASSES[mask(geom)]
        assert hist.tolist() == np.bincount(classes[classes < 12], minlength=12).tolist()
    assert list(out.scl.columns) == ["pid", "obsid", *HIST_COLUMNS]
    assert out.stats["count"].dtype == np.int64 and out.scl["hist_0"].dtype == np.int64


def test_reference_reprojects_parcels_skips_missing_bands_and_empty_outlines():
    """Parcels in another CRS are brought to the raster's; a band the scene lacks and an empty or
    missing outline give no row. Planted bugs: `parcels.crs == window.crs` -> `!=`; the empty
    geometry check dropped."""
    wgs84 = parcels(SHAPES[0], shapely.Polygon(), None).to_crs("EPSG:4326")
    out = reference(wgs84, {"B04": VALUES}, wanted=["B04", "B99"])
    assert out.stats["pid"].tolist() == [1] and out.stats["band"].tolist() == ["B04"]
    assert out.stats["count"].iloc[0] == mask(SHAPES[0]).sum()
    nothing = reference(parcels(SHAPES[4]), {"B04": VALUES, "SCL": CLASSES})
    assert len(nothing.stats) == 0 and len(nothing.scl) == 0
    assert list(nothing.stats.columns) == ["pid", "obsid", "band", *STATS]
    empty = reference(parcels(SHAPES[0]), {"B04": np.zeros((0, 0), np.uint16)})
    assert len(empty.stats) == 0


def test_window_edges_are_exclusive():
    """A parcel that only touches the window's edge meets no pixel of it. Planted bugs: `<=` ->
    `<` (or `>=` -> `>`) at any edge (a touching parcel got a row of count 0)."""
    touching = [
        shapely.box(599900, 5000000, 600000, 5000100), shapely.box(600200, 5000000, 600300, 5000100),
        shapely.box(600000, 5000200, 600100, 5000300), shapely.box(600000, 4999900, 600100, 5000000),
    ]  # fmt: skip
    assert len(reference(parcels(*touching), {"B04": VALUES}).stats) == 0


# The numba kernels' entry points ------------------------------------------------------------------


def index_of(geoms) -> PixelIndex:
    grid = Grid(TRANSFORM, (20, 20), CRS)
    offsets, starts, lengths = rasterize(np.asarray(geoms, dtype=object), grid, False)
    return PixelIndex(grid, np.arange(len(geoms), dtype=np.int64), offsets, starts, lengths, "test")


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32", "float64", "int32"])
def test_kernels_equal_numpy_exactly(dtype):
    """The numba reductions (radix select for 8/16-bit, sort otherwise) against numpy: counts,
    order statistics and percentiles bit-identical; mean and std to the last bits of a float64
    sum. Planted bugs: the nodata key offset by one; `_RADIX_SHIFT` lookup bypassed for a dtype
    (wrong kernel); `max(longest, 1)` -> `longest`."""
    array = (VALUES.astype(np.int64) - (500 if dtype.startswith("int") else 0)).astype(dtype)
    nodata = float(array[0, 0])
    geoms = SHAPES[:4]
    got = zonal_stats(array, index_of(geoms), nodata)
    for geom, row in zip(geoms, got, strict=True):
        pixels = array[mask(geom)]
        want = expected(pixels[pixels != nodata])
        assert row[0] == want["count"]
        if want["count"]:
            assert row[[3, 4, 5, 6, 7]].tolist() == [want[s] for s in ("min", "max", "p25", "p50", "p75")]
            assert row[1] == pytest.approx(want["mean"], rel=1e-13) and row[2] == pytest.approx(
                want["std"], rel=1e-9
            )
        else:
            assert np.isnan(row[1:]).all()


def test_kernel_class_histogram_and_physical_units():
    """Planted bugs: class values >= 12 counted; to_physical's negative-scale swap of p25/p75 lost."""
    geoms = SHAPES[:3]
    hist = class_histogram(CLASSES, index_of(geoms))
    for geom, row in zip(geoms, hist, strict=True):
        classes = CLASSES[mask(geom)]
        assert row.tolist() == np.bincount(classes[classes < 12], minlength=12).tolist()
    raw = np.array([[4, 10.0, 2.0, 5.0, 15.0, 7.0, 10.0, 13.0]])
    assert to_physical(raw, 0.5, -1.0).tolist() == [[4, 4.0, 1.0, 1.5, 6.5, 2.5, 4.0, 5.5]]
    assert to_physical(raw, -1.0, 0.0).tolist() == [[4, -10.0, 2.0, -15.0, -5.0, -13.0, -10.0, -7.0]]
    frame = stats_frame(np.array([7]), "S2_x", "B04", raw)
    assert list(frame.columns) == ["pid", "obsid", "band", *STATS] and frame["count"].dtype == np.int64
    assert frame.iloc[0].tolist() == [7, "S2_x", "B04", 4, 10.0, 2.0, 5.0, 15.0, 7.0, 10.0, 13.0]
    scl = scl_frame(np.array([7, 8]), "S2_x", np.arange(24).reshape(2, 12))
    assert list(scl.columns) == ["pid", "obsid", *HIST_COLUMNS] and scl["hist_11"].tolist() == [11, 23]


def test_fast_extractor_equals_rasterstats_bit_for_bit_on_real_scenes():
    """The issue-19 complaint: the "exactly" test went through the reference extractor with
    rel=1e-6. Here the numba path (s2_l2a, the production extractor) on the real demo scenes:
    count, min, max and the quartiles are identical floats, the mean too (integer pixels sum
    exactly); std to 1e-12. Planted bug: to_physical's `value * scale` -> `value / (1 / scale)`
    (off in the last bits: rel=1e-6, as the old test had it, passes it)."""
    from rasterio.io import MemoryFile
    from rasterstats import zonal_stats as rasterstats

    demo = cbm.read_parcels(DEMO / "parcels.gpkg")
    catalogue = cbm.read_catalogue(DEMO / "scenes.csv")
    obsid = "S2A_MSIL2A_20230405_T31UFS"
    one = catalogue[catalogue["obsid"] == obsid]
    signatures = cbm.extract(demo, one, bands={"s2": ["B04", "B08", "B11"]}, extractor="s2_l2a")
    for band in ("B04", "B08", "B11"):
        with open(one.iloc[0]["bands"][band].uri, "rb") as f, MemoryFile(f.read()) as mem, mem.open() as ds:
            array, scale, offset = ds.read(1), ds.scales[0], ds.offsets[0]
            stats = "count mean std min max percentile_25 percentile_50 percentile_75"
            want = rasterstats(list(demo.geometry), array, affine=ds.transform, nodata=ds.nodata, stats=stats)
        got = signatures.stats.query("band == @band").set_index("pid")
        for pid, theirs in zip(demo["pid"], want, strict=True):
            row = got.loc[pid]
            assert row["count"] == theirs["count"], (band, pid)
            pairs = (("min", "min"), ("max", "max"), ("p25", "percentile_25"), ("p50", "percentile_50"),
                     ("p75", "percentile_75"), ("mean", "mean"))  # fmt: skip
            for ours, key in pairs:
                assert row[ours] == theirs[key] * scale + offset, (band, pid, ours)
            assert row["std"] == pytest.approx(theirs["std"] * scale, rel=1e-12)
