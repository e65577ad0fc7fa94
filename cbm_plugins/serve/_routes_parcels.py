"""Parcel queries: parcelByLocation, parcelByID, parcelsByPolygon, parcelPeers."""

from __future__ import annotations

import math
from typing import Annotated, Any

import geopandas as gpd
import numpy as np
import shapely
from fastapi import APIRouter, Query
from fastapi.responses import Response

from cbm_plugins.serve._auth import Who
from cbm_plugins.serve._datasets import Dataset
from cbm_plugins.serve._http import ApiError, columns
from cbm_plugins.serve._params import Aoi, Lat, Legacy, Lon, Pid, Served, Year, the_pid

PEER_MIN_AREA = 3000.0  # m²: JRC peers leave out parcels too small for a clean signature
MAX_PEERS = 10_000  # as JRC
MAX_PEER_DISTANCE = 50_000.0  # m: one spatial-index query stays small

router = APIRouter(tags=["parcels"])
Ptype = Annotated[str, Query(max_length=8)]


def describe(ds: Dataset, rows: gpd.GeoDataFrame, geometry: bool, wgs84: bool, legacy: bool) -> Response:
    """The JRC parcel columns of some rows: pid (text), cropname, cropcode, srid (the parcels' own,
    as JRC, also when wgs84 is set), area (whole m², EPSG:3035), clon, clat [, geom]."""
    crs = rows.crs
    srid = crs.to_epsg() if crs is not None else None
    some = len(rows) > 0
    centroids = rows.geometry.centroid.to_crs("EPSG:4326") if some else rows.geometry
    data: dict[str, Any] = {
        ("ogc_fid" if legacy else "pid"): ds.text_ids(rows["pid"].to_numpy()),
        "cropname": rows["crop_name"].astype(str).to_numpy(),
        "cropcode": rows["crop_code"].astype(str).to_numpy(),
        "srid": [srid] * len(rows),
        "area": rows.geometry.to_crs("EPSG:3035").area.round().astype(np.int64).to_numpy() if some else [],
        "clon": centroids.x.to_numpy() if some else [],
        "clat": centroids.y.to_numpy() if some else [],
    }
    if geometry:
        shapes = (rows.geometry.to_crs("EPSG:4326") if some else rows.geometry) if wgs84 else rows.geometry
        data["geom"] = [shapely.to_geojson(g) for g in shapes.values]
    return columns(data)


def parse_polygon(text: str, max_vertices: int, max_km2: float) -> shapely.Polygon:
    """Parse lon_lat-lon_lat-... into a valid WGS84 polygon within the size limits (else 400)."""
    parts = [p for p in text.strip().split("-") if p]
    if len(parts) > max_vertices:
        raise ApiError(400, f"polygon has {len(parts)} vertices, more than the limit {max_vertices}")
    try:
        points = [tuple(float(v) for v in p.split("_")) for p in parts]
    except ValueError:
        raise ApiError(400, "polygon: expected lon_lat-lon_lat-... with decimal degrees") from None
    if len(points) < 3 or any(len(p) != 2 or not all(math.isfinite(v) for v in p) for p in points):
        raise ApiError(400, "polygon: expected at least 3 lon_lat pairs")
    if any(not (-180 <= x <= 180 and -90 <= y <= 90) for x, y in points):
        raise ApiError(400, "polygon: coordinates outside WGS84 range")
    shape = shapely.make_valid(shapely.Polygon(points))
    if shape.is_empty or shape.area == 0:
        raise ApiError(400, "polygon: empty or degenerate")
    area = gpd.GeoSeries([shape], crs="EPSG:4326").to_crs("EPSG:3035").area.iloc[0] / 1e6
    if area > max_km2:
        raise ApiError(400, f"polygon covers {area:.1f} km², more than the limit {max_km2:g} km²")
    return shape


@router.get("/query/parcelByLocation")
def parcel_by_location(
    who: Who, data: Served, lon: Lon, lat: Lat, aoi: Aoi = None, year: Year = None, parcels: Legacy = None,
    ptype: Ptype = "", withGeometry: bool = False, wgs84: bool = False,
) -> Response:  # fmt: skip
    """The parcel at a WGS84 location: pid, cropname, cropcode, srid, area (m², EPSG:3035), clon, clat."""
    ds = data.lookup(who, aoi, year, parcels)
    frame = ds.parcels()
    point = gpd.GeoSeries([shapely.Point(lon, lat)], crs="EPSG:4326").to_crs(frame.crs).iloc[0]
    hits = frame.iloc[np.sort(frame.sindex.query(point, predicate="intersects"))[:1]]
    return describe(ds, hits, withGeometry, wgs84, legacy=parcels is not None)


@router.get("/query/parcelByID")
def parcel_by_id(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    ogc_fid: Pid = None, ptype: Ptype = "", withGeometry: bool = False, wgs84: bool = False,
) -> Response:  # fmt: skip
    """One parcel by id: pid, cropname, cropcode, srid, area, clon, clat [, geom as GeoJSON]."""
    ds = data.lookup(who, aoi, year, parcels)
    number, legacy = the_pid(ds, pid, ogc_fid)
    frame = ds.parcels()
    rows = frame.loc[[number]] if number is not None and number in frame.index else frame.iloc[:0]
    return describe(ds, rows, withGeometry, wgs84, legacy=legacy or parcels is not None)


@router.get("/query/parcelsByPolygon")
def parcels_by_polygon(
    who: Who, data: Served,
    polygon: Annotated[str, Query(max_length=8000, description="lon_lat-lon_lat-... (WGS84)")],
    aoi: Aoi = None, year: Year = None, parcels: Legacy = None, only_ids: bool = True,
    withGeometry: bool = False, wgs84: bool = False,
) -> Response:  # fmt: skip
    """Parcels intersecting a polygon (at most max_parcels): pid [, details and geometry]."""
    ds = data.lookup(who, aoi, year, parcels)
    limits = data.limits
    shape = parse_polygon(polygon, int(limits["max_polygon_vertices"]), float(limits["max_polygon_km2"]))
    frame = ds.parcels()
    local = gpd.GeoSeries([shape], crs="EPSG:4326").to_crs(frame.crs).iloc[0]
    hits = frame.iloc[np.sort(frame.sindex.query(local, predicate="intersects"))]
    hits = hits.sort_values("pid").iloc[: int(limits["max_parcels"])]
    if only_ids and not withGeometry:
        return columns({"ogc_fid" if parcels is not None else "pid": ds.text_ids(hits["pid"].to_numpy())})
    return describe(ds, hits, withGeometry, wgs84, legacy=parcels is not None)


@router.get("/query/parcelPeers")
def parcel_peers(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    ogc_fid: Pid = None, distance: Annotated[float, Query(gt=0, le=MAX_PEER_DISTANCE)] = 2000,
    max: Annotated[int, Query(ge=1, le=MAX_PEERS)] = 10, ptype: Ptype = "",
) -> Response:  # fmt: skip
    """Parcels of the same crop (area > 3000 m²) within distance metres of the parcel's outline
    (polygon to polygon, as JRC), nearest first: pids, distance. An unknown pid: empty columns."""
    ds = data.lookup(who, aoi, year, parcels)
    number, _ = the_pid(ds, pid, ogc_fid)
    frame = ds.parcels()
    if number is None or number not in frame.index:
        return columns({"pids": [], "distance": []})
    row = frame.loc[number]
    projected = frame.crs is not None and frame.crs.is_projected
    geoms = frame.geometry if projected else frame.geometry.to_crs("EPSG:3035")
    target = geoms.loc[number]
    near = frame.iloc[frame.sindex.query(target.buffer(distance))] if projected else frame
    same = near[(near["crop_name"] == row["crop_name"]) & (near["pid"] != number)]
    large = same.geometry.to_crs("EPSG:3035").area > PEER_MIN_AREA
    dist = geoms.loc[same.index].distance(target)
    chosen = dist[large & (dist <= distance)].sort_values(kind="stable").iloc[:max]
    return columns(
        {"pids": ds.text_ids(chosen.index.to_numpy(np.int64)), "distance": chosen.round(2).to_numpy()}
    )
