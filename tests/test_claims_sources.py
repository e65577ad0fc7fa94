"""Local parcel files read through a bbox (sources/local.py): GeoPackage through its spatial index,
GeoParquet through its bbox covering column, or read whole and filtered when it has none.

Each docstring names the one-line bug the test was checked against (planted, seen failing, reverted).
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pytest
import shapely
from conftest import DEMO

from sources.local import read_parcel_file


@pytest.fixture(scope="module")
def demo() -> gpd.GeoDataFrame:
    return read_parcel_file(DEMO / "parcels.gpkg")


def box_around(parcels: gpd.GeoDataFrame, pids: list[int]) -> tuple[float, float, float, float]:
    """A WGS84 box a little inside the extent of some parcels."""
    inner = parcels[parcels["pid"].isin(pids)].geometry.union_all().buffer(-5)
    return tuple(gpd.GeoSeries([inner], crs=parcels.crs).to_crs("EPSG:4326").total_bounds)


def bounds_meeting(parcels: gpd.GeoDataFrame, bbox) -> tuple[set[int], set[int]]:
    """(pids whose geometry meets the box, pids whose extent meets it), in the parcels' CRS."""
    box = gpd.GeoSeries([shapely.box(*bbox)], crs="EPSG:4326").to_crs(parcels.crs).iloc[0]
    meets = set(parcels.loc[parcels.intersects(box), "pid"])
    extent = set(parcels.loc[parcels.envelope.intersects(box.envelope), "pid"])
    return meets, extent


@pytest.mark.parametrize("layout", ["gpkg", "geoparquet", "geoparquet-covering", "geoparquet-wgs84"])
def test_bbox_keeps_the_parcels_it_meets_in_every_format(demo, tmp_path: Path, layout: str):
    """Every parcel the box meets is kept, and none whose extent misses it. Planted bugs: the
    GeoParquet fallback filter dropped (`return frame`: every parcel came back); `covering`
    misspelt (the covering column never used) survives: the answer is the same, only slower;
    `_bbox_in` not reprojecting (the UTM files filtered by degrees: no parcel)."""
    bbox = box_around(demo, [7, 8])
    if layout == "gpkg":
        path = DEMO / "parcels.gpkg"
    else:
        frame = demo.to_crs("EPSG:4326") if layout == "geoparquet-wgs84" else demo
        path = tmp_path / "parcels.parquet"
        frame.drop(columns="issue").to_parquet(path, write_covering_bbox=layout == "geoparquet-covering")
    got = read_parcel_file(path, bbox=bbox)
    meets, extent = bounds_meeting(demo, bbox)
    assert {7, 8} <= meets
    assert meets <= set(got["pid"]) <= extent
    assert len(extent) < len(demo)  # the box leaves some parcels out: the filter is tested
    assert got.crs == (demo.to_crs("EPSG:4326").crs if layout == "geoparquet-wgs84" else demo.crs)
    everything = read_parcel_file(path)
    assert sorted(everything["pid"]) == sorted(demo["pid"])


def test_a_box_far_away_gives_no_parcel(demo, tmp_path: Path):
    """Planted bug: the GeoParquet fallback filter dropped (every parcel came back)."""
    path = tmp_path / "parcels.parquet"
    demo.drop(columns="issue").to_parquet(path)
    far = (-70.0, -30.0, -69.9, -29.9)
    assert len(read_parcel_file(path, bbox=far)) == 0
    assert len(read_parcel_file(DEMO / "parcels.gpkg", bbox=far)) == 0
