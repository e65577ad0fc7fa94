"""Decoding only what parcels cover: file blocks without parcel pixels are never decoded, the rest
once, reduced row by row while the next row decodes, with the same statistics to the last bit."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from cbm_core.config import PluginConfig
from cbm_core.errors import InputError
from cbm_core.model import READ_PLAN, BandRef, Scene
from extractors import _kernels, s1, s2_l2a
from sources._raster import read_window

CRS = "EPSG:32631"
ORIGIN = (600000.0, 5700000.0)
SIZE = (300, 260)  # rows, cols: a partial last row and column of 64-pixel blocks
BLOCK = 64


def raster(path: Path, seed: int, dtype: str = "uint16") -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 9000, SIZE).astype(dtype)
    data[rng.random(SIZE) < 0.02] = 0  # nodata pixels
    profile = dict(driver="GTiff", width=SIZE[1], height=SIZE[0], count=1, dtype=dtype, nodata=0, crs=CRS,
                   transform=from_origin(*ORIGIN, 10.0, 10.0), tiled=True, blockxsize=BLOCK,
                   blockysize=BLOCK, compress="deflate")  # fmt: skip
    with rasterio.open(path, "w", **profile) as out:
        out.write(data, 1)
    return path


def parcels_in(boxes: list[tuple[float, float, float, float]]) -> gpd.GeoDataFrame:
    """Parcels from (col0, row0, col1, row1) in pixels, slanted a little so edges cut pixels."""
    x0, y0 = ORIGIN
    geoms = [
        shapely.Polygon([(x0 + a * 10 + 3, y0 - b * 10), (x0 + c * 10, y0 - b * 10 - 7),
                         (x0 + c * 10 - 4, y0 - d * 10), (x0 + a * 10, y0 - d * 10 + 5)])
        for a, b, c, d in boxes
    ]  # fmt: skip
    return gpd.GeoDataFrame({"pid": np.arange(1, len(geoms) + 1, dtype=np.int64)}, geometry=geoms, crs=CRS)


def without_plan(band, bounds, crs):
    """The same source, made to ignore read plans: the whole window decoded, reduced at once."""
    token = READ_PLAN.set(None)
    try:
        return read_window(band, bounds, crs)
    finally:
        READ_PLAN.reset(token)


def run(module, path: Path, parcels, reader=read_window, card="s2", bands=("B04",), **options):
    scene = Scene(
        "d", pd.Timestamp("2023-04-01", tz="UTC"), "S2A", card, {b: BandRef(str(path)) for b in bands}
    )
    config = PluginConfig(module.__name__.split(".")[-1], {"cache_dir": False, **options})
    return module.cbm_extractor_extract(scene=scene, parcels=parcels, bands=list(bands), read_window=reader,
                                        config=config).stats  # fmt: skip


def corrupt_block(path: Path, block_row: int, block_col: int) -> None:
    """Overwrite one internal tile's compressed bytes with garbage: decoding it must fail."""
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item(f"BLOCK_OFFSET_{block_col}_{block_row}", "TIFF", bidx=1))
        size = int(src.get_tag_item(f"BLOCK_SIZE_{block_col}_{block_row}", "TIFF", bidx=1))
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * size)


boxes = st.lists(
    st.tuples(
        st.integers(0, SIZE[1] - 2), st.integers(0, SIZE[0] - 2), st.integers(2, 90), st.integers(2, 90)
    ).map(lambda t: (t[0], t[1], min(SIZE[1], t[0] + t[2]), min(SIZE[0], t[1] + t[3]))),
    min_size=1,
    max_size=25,
)


@settings(max_examples=15, deadline=None)
@given(boxes=boxes, seed=st.integers(0, 3))
def test_planned_reads_give_the_same_bits(tmp_path_factory, boxes, seed):
    path = raster(tmp_path_factory.mktemp("r") / "b.tif", seed)
    parcels = parcels_in(boxes)
    got = run(s2_l2a, path, parcels)
    want = run(s2_l2a, path, parcels, reader=without_plan)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    got = run(s1, path, parcels, card="bs", bands=("VV",))
    want = run(s1, path, parcels, reader=without_plan, card="bs", bands=("VV",))
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_blocks_without_parcels_are_never_decoded(tmp_path):
    path = raster(tmp_path / "b.tif", 1)
    reference = path.read_bytes()
    # Parcels in blocks (0, 0), (0, 1) and (3, 2) only; a parcel in block row 3 ends the scan late.
    parcels = parcels_in([(3, 3, 40, 30), (70, 10, 120, 50), (140, 200, 180, 240)])
    want = run(s2_l2a, path, parcels, bands=("B04", "SCL"))
    for block_row, block_col in ((1, 1), (2, 0), (4, 3), (0, 3)):  # none holds a parcel pixel
        corrupt_block(path, block_row, block_col)
    got = run(s2_l2a, path, parcels, bands=("B04", "SCL"))
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    with pytest.raises(InputError):  # a planted bug: reading everything hits the corrupt tiles
        run(s2_l2a, path, parcels, reader=without_plan)
    path.write_bytes(reference)


def test_each_block_is_decoded_once_and_rows_reach_the_reducer_in_order(tmp_path, monkeypatch):
    path = raster(tmp_path / "b.tif", 2)
    parcels = parcels_in([(0, 0, 260, 300), (10, 10, 30, 30), (100, 150, 200, 290)])
    reads: list[tuple[int, int, int, int]] = []
    ready: list[int] = []
    original_read = rasterio.io.DatasetReader.read
    original_ready = _kernels._CoveragePlan.rows_ready

    def read(self, *args, **kwargs):
        window = kwargs.get("window")
        reads.append((window.row_off, window.col_off, window.height, window.width))
        return original_read(self, *args, **kwargs)

    def rows_ready(self, rows):
        ready.append(rows)
        original_ready(self, rows)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", read)
    monkeypatch.setattr(_kernels._CoveragePlan, "rows_ready", rows_ready)
    got = run(s2_l2a, path, parcels)
    assert ready == [64, 128, 192, 256, 300]
    covered = np.zeros(SIZE, np.int64)
    for r, c, h, w in reads:
        covered[r : r + h, c : c + w] += 1
    assert covered.max() == 1  # no pixel decoded twice
    monkeypatch.undo()
    pd.testing.assert_frame_equal(got, run(s2_l2a, path, parcels, reader=without_plan), check_exact=True)


def test_a_failing_read_part_way_is_an_error_not_partial_statistics(tmp_path):
    path = raster(tmp_path / "b.tif", 3)
    corrupt_block(path, 3, 0)
    parcels = parcels_in([(0, 0, 60, 60), (5, 200, 50, 250)])
    with pytest.raises(InputError, match=r"b\.tif"):
        run(s2_l2a, path, parcels)
