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
from cbm_plugins.serve._http import ApiError, columns
from cbm_plugins.serve._params import Aoi, Lat, Legacy, Lon, Pid, Served, Year, the_pid

PEER_MIN_AREA = 3000.0  # m²: JRC peers leave out parcels too small for a clean signature

router = APIRouter(tags=["parcels"])
Ptype = Annotated[str, Query(max_length=8)]


def describe(rows: gpd.GeoDataFrame, geometry: bool, wgs84: bool, legacy: bool) -> Response:
    """The JRC parcel columns of some rows: pid, cropname, cropcode, srid, area, clon, clat [, geom]."""
    crs = rows.crs
    srid = crs.to_epsg() if crs is not None else None
    in_wgs84 = rows.geometry.to_crs("EPSG:4326") if len(rows) else rows.geometry
    centroids = rows.geometry.centroid.to_crs("EPSG:4326") if len(rows) else rows.geometry
    data: dict[str, Any] = {
        ("ogc_fid" if legacy else "pid"): rows["pid"].to_numpy(),
        "cropname": rows["crop_name"].astype(str).to_numpy(),
        "cropcode": rows["crop_code"].astype(str).to_numpy(),
        "srid": [4326 if wgs84 else srid] * len(rows),
        "area": rows.geometry.to_crs("EPSG:3035").area.round(2).to_numpy() if len(rows) else [],
        "clon": centroids.x.round(6).to_numpy() if len(rows) else [],
        "clat": centroids.y.round(6).to_numpy() if len(rows) else [],
    }
    if geometry:
        shapes = in_wgs84 if wgs84 else rows.geometry
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
    frame = data.lookup(who, aoi, year, parcels).parcels()
    point = gpd.GeoSeries([shapely.Point(lon, lat)], crs="EPSG:4326").to_crs(frame.crs).iloc[0]
    hits = frame.iloc[np.sort(frame.sindex.query(point, predicate="intersects"))[:1]]
    return describe(hits, withGeometry, wgs84, legacy=parcels is not None)


@router.get("/query/parcelByID")
def parcel_by_id(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    ogc_fid: Pid = None, ptype: Ptype = "", withGeometry: bool = False, wgs84: bool = False,
) -> Response:  # fmt: skip
    """One parcel by id: pid, cropname, cropcode, srid, area, clon, clat [, geom as GeoJSON]."""
    ds = data.lookup(who, aoi, year, parcels)
    pid, legacy = the_pid(pid, ogc_fid)
    frame = ds.parcels()
    rows = frame.loc[[pid]] if pid in frame.index else frame.iloc[:0]
    return describe(rows, withGeometry, wgs84, legacy=legacy or parcels is not None)


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
        return columns({"ogc_fid" if parcels is not None else "pid": hits["pid"].to_numpy()})
    return describe(hits, withGeometry, wgs84, legacy=parcels is not None)


@router.get("/query/parcelPeers")
def parcel_peers(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    ogc_fid: Pid = None, distance: Annotated[float, Query(gt=0, le=50_000)] = 2000,
    max: Annotated[int, Query(ge=1, le=100)] = 10,
) -> Response:  # fmt: skip
    """Parcels of the same crop (area > 3000 m²) within distance metres, nearest first: pids, distance."""
    ds = data.lookup(who, aoi, year, parcels)
    pid, _ = the_pid(pid, ogc_fid)
    row = ds.parcel(pid)
    frame = ds.parcels()
    projected = frame.crs is not None and frame.crs.is_projected
    geoms = frame.geometry if projected else frame.geometry.to_crs("EPSG:3035")
    target = geoms.loc[pid]
    near = frame.iloc[frame.sindex.query(target.buffer(distance))] if projected else frame
    same = near[(near["crop_name"] == row["crop_name"]) & (near["pid"] != pid)]
    large = same.geometry.to_crs("EPSG:3035").area > PEER_MIN_AREA
    dist = geoms.loc[same.index].centroid.distance(target.centroid)
    chosen = dist[large & (dist <= distance)].sort_values(kind="stable").iloc[:max]
    return columns({"pids": chosen.index.to_numpy(np.int64), "distance": chosen.round(2).to_numpy()})
