"""FOI heterogeneity: v1 class shares, v2 connected clusters, on synthetic and real thematic rasters."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from rasterio.transform import from_origin

from cbm_core.model import Status, TimeSeries
from markers import heterogeneity

DATA = Path(__file__).parent / "data" / "slovenia-2017"


def test_v1_shares_ignore_class_zero():
    classes = np.array([[1, 1, 2, 0], [1, 1, 2, 0]])
    inside = np.ones_like(classes, bool)
    out = heterogeneity.assess(classes, inside, inside, {"min_cluster_pixels": 1, "classes": {1: "grass"}})
    assert out["n_pixels"] == 6
    assert out["shares"] == {"grass": round(4 / 6, 4), "2": round(2 / 6, 4)}
    assert out["v1_heterogeneous"]  # 33 % and 67 % both fall in 30..70 %
    assert not heterogeneity.assess(classes, inside, inside, {"min_share": 0.7})["v1_heterogeneous"]


def test_v2_connectivity_and_cluster_size():
    diagonal = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    inside = np.ones_like(diagonal, bool)
    four = heterogeneity.assess(diagonal, inside, inside, {"connectivity": 4, "min_cluster_pixels": 1})
    eight = heterogeneity.assess(diagonal, inside, inside, {"connectivity": 8, "min_cluster_pixels": 1})
    assert len(four["clusters"]) == 3 and four["v2_heterogeneous"]
    assert eight["clusters"] == [{"class": "1", "pixels": 3}] and not eight["v2_heterogeneous"]
    big = heterogeneity.assess(diagonal, inside, inside, {"connectivity": 4, "min_cluster_pixels": 2})
    assert big["clusters"] == []


def write_raster(path: Path, array: np.ndarray) -> None:
    profile = {
        "driver": "GTiff",
        "width": array.shape[1],
        "height": array.shape[0],
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(0, 100, 10, 10),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array.astype("uint8"), 1)


def series_of(parcels: gpd.GeoDataFrame) -> TimeSeries:
    return TimeSeries(pd.DataFrame(), pd.DataFrame(), parcels)


def test_negative_buffer_removes_edge_pixels_before_v2(tmp_path):
    array = np.full((10, 10), 1)
    array[:, 0] = 2  # a one-pixel strip of another class along the west edge
    write_raster(tmp_path / "classes.tif", array)
    parcels = gpd.GeoDataFrame(
        {"pid": [1, 2], "crop_code": 1, "crop_name": "grass"},
        geometry=[shapely.box(0, 0, 100, 100), shapely.box(0, 0, 30, 30)],
        crs="EPSG:32633",
    )
    params = {"raster": str(tmp_path / "classes.tif"), "min_cluster_pixels": 5, "map_date": "2023-06-01"}
    unbuffered = heterogeneity.run(series_of(parcels), {**params, "buffer": 0.0})
    buffered = heterogeneity.run(series_of(parcels), params)
    assert unbuffered[0].values["v2_heterogeneous"] and not buffered[0].values["v2_heterogeneous"]
    assert buffered[0].values["shares"] == {"1": 0.9, "2": 0.1}
    assert (
        unbuffered[0].events[0].kind == "cardinality_v2" and str(unbuffered[0].events[0].main) == "2023-06-01"
    )
    assert buffered[1].status == Status.NOT_VALID and "too small" in buffered[1].reason  # 9 pixels


def test_real_land_use_map_and_bad_inputs(tmp_path):
    parcels = gpd.read_file(DATA / "lulc.gpkg").reset_index(names="pid")
    parcels["crop_code"], parcels["crop_name"] = parcels["LULC_ID"], parcels["LULC_NAME"]
    raster = str(DATA / "lulc_mask.tif")
    results = heterogeneity.run(series_of(parcels), {"raster": raster})
    assert len(results) == len(parcels)
    ok = [r for r in results if r.status == Status.OK]
    assert ok and all(r.values["n_pixels"] >= 40 for r in ok)
    # the map was rasterised from these polygons: each assessed parcel is dominated by its own class
    names = {int(k): str(k) for k in parcels["LULC_ID"]}
    for r in ok:
        own = str(int(parcels.loc[parcels["pid"] == r.pid, "LULC_ID"].iloc[0]))
        assert max(r.values["shares"], key=r.values["shares"].get) == names[int(own)]
    outside = parcels.iloc[:1].assign(geometry=[shapely.box(0, 0, 10, 10)])
    assert "outside" in heterogeneity.run(series_of(outside), {"raster": raster})[0].reason
    missing = heterogeneity.run(series_of(parcels.iloc[:2]), {"raster": str(tmp_path / "none.tif")})
    assert all(r.status == Status.NOT_VALID and "not readable" in r.reason for r in missing)
    assert "no thematic raster" in heterogeneity.run(series_of(parcels.iloc[:1]), {})[0].reason
