"""Image chips: rawChipByLocation, rawChipByParcelID, rawChipsBatch and the chip files they link to.

Chips are native-grid GeoTIFF crops written to a per-request folder named by a random token; the
folder records its aoi, and a chip file is served only to users who may read that aoi.
"""

from __future__ import annotations

import re
import secrets
import shutil
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import geopandas as gpd
import pandas as pd
import rasterio
import shapely
from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field
from pyproj import Transformer

from cbm_plugins.serve._auth import Who
from cbm_plugins.serve._datasets import AOI, Dataset, Datasets
from cbm_plugins.serve._http import ApiError, columns
from cbm_plugins.serve._params import Aoi, Band, Lat, Legacy, Lon, Pid, Served, Year, the_pid
from cbm_plugins.serve._users import User

CHIP_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}\.tif$")
TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
CHIP_TTL = 3600.0  # seconds a chip folder is kept

router = APIRouter(tags=["chips"])
ChipSize = Annotated[float, Query(gt=0)]


class ChipsBatch(BaseModel):
    """rawChipsBatch request body (JSON)."""

    lon: float = Field(ge=-180, le=180)
    lat: float = Field(ge=-90, le=90)
    tiles: list[Annotated[str, Field(max_length=120)]] = Field(max_length=1000)
    bands: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,16}$")]] = Field(min_length=1, max_length=32)
    chipsize: float = Field(default=1280, gt=0)
    aoi: Annotated[str | None, Field(pattern=AOI)] = None
    year: int | None = Field(default=None, ge=1970, le=2200)
    parcels: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")] = None


def square(lon: float, lat: float, size: float) -> tuple[tuple[float, float, float, float], str]:
    """A size x size metre square centred on a WGS84 point, in its UTM zone."""
    zone = int((lon + 180) // 6) % 60 + 1
    crs = f"EPSG:{32600 + zone if lat >= 0 else 32700 + zone}"
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    half = size / 2
    return (x - half, y - half, x + half, y + half), crs


def write_chip(path: Path, window: Any) -> None:
    """A window as a GeoTIFF on its own grid, with the nodata, scale and offset it was read with."""
    array = window.array
    profile = {
        "driver": "GTiff", "height": array.shape[0], "width": array.shape[1], "count": 1,
        "dtype": array.dtype, "crs": window.crs, "transform": window.transform, "nodata": window.nodata,
        "compress": "deflate",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as out:
        out.write(array, 1)
        out.scales = (window.scale,)
        out.offsets = (window.offset,)


def expire_chips(root: Path, ttl: float = CHIP_TTL) -> None:
    cutoff = time.time() - ttl
    for folder in root.iterdir():
        try:
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def in_dates(scenes: pd.DataFrame, start_date: date, end_date: date) -> pd.DataFrame:
    """The scenes observed from start_date to end_date, both days included."""
    times = pd.to_datetime(scenes["obstime"], utc=True)
    start = pd.Timestamp(start_date, tz="UTC")
    end = pd.Timestamp(end_date, tz="UTC") + pd.Timedelta(days=1)
    return scenes[(times >= start) & (times < end)]


def make_chips(
    data: Datasets, ds: Dataset, lon: float, lat: float, bands: Sequence[str], chipsize: float,
    scenes: pd.DataFrame, base_url: str,
) -> Response:  # fmt: skip
    """Write the chips of some scenes and bands around a point; answer their dates and links."""
    limits = data.limits
    if chipsize > limits["max_chipsize"]:
        raise ApiError(400, f"chipsize {chipsize} m is larger than the limit {limits['max_chipsize']:g} m")
    point = shapely.Point(lon, lat)
    if scenes.geometry.notna().any():
        scenes = scenes[scenes.geometry.isna() | scenes.geometry.intersects(point)]
    wanted = [(s, b) for s in scenes.itertuples(index=False) for b in bands if b in s.bands]
    if len(wanted) > limits["max_chips"]:
        raise ApiError(
            400, f"{len(wanted)} chips selected, over the limit {int(limits['max_chips'])}: shorten the dates"
        )
    token = secrets.token_urlsafe(18)
    folder = data.chip_dir / token
    folder.mkdir(parents=True)
    (folder / ".aoi").write_text(ds.aoi)
    expire_chips(data.chip_dir)
    bounds, crs = square(lon, lat, chipsize)
    reader = ds.hook(ds.source, "cbm_source_read_window")
    out: dict[str, list] = {"dates": [], "chips": [], "obsids": [], "bands": [], "cards": [], "orbits": []}
    for scene, band in wanted:
        window = reader(config=ds.source, band=scene.bands[band], bounds=bounds, crs=crs)
        if window.array.size == 0:
            continue
        name = f"{scene.obsid}.{band}.tif"
        if not CHIP_NAME.match(name):
            raise ApiError(500, f"scene {scene.obsid!r} has a name that cannot be a file name")
        write_chip(folder / name, window)
        out["dates"].append(pd.Timestamp(scene.obstime).isoformat())
        out["chips"].append(f"{base_url}chips/{token}/{name}")
        out["obsids"].append(scene.obsid)
        out["bands"].append(band)
        out["cards"].append(scene.card)
        out["orbits"].append(scene.orbit)
    return columns(out)


def chip_dataset(
    data: Datasets, who: User, aoi: str | None, year: int | None, parcels: str | None, lon: float, lat: float
) -> Dataset:
    """The named dataset, or for old clients that send no aoi the first readable one at the point."""
    if aoi is not None or parcels is not None:
        return data.lookup(who, aoi, year, parcels)
    return data.covering(who, lon, lat)


def path_prefix(request: Request) -> str:
    return str(request.url_for("chip_file", token="T", name="N.tif")).split("chips/T/")[0]


@router.get("/query/rawChipByLocation")
def raw_chip_by_location(
    request: Request, who: Who, data: Served, lon: Lon, lat: Lat, start_date: date, end_date: date,
    band: Band = "B08", chipsize: ChipSize = 1280, aoi: Aoi = None, year: Year = None,
    parcels: Legacy = None, plevel: Annotated[str, Query(max_length=16)] = "LEVEL2A",
) -> Response:  # fmt: skip
    """GeoTIFF chips (native grid, no resampling) of one band around a location: dates, chips
    (links needing the same credentials). Extra columns: obsids, bands, cards, orbits."""
    ds = chip_dataset(data, who, aoi, year, parcels, lon, lat)
    selected = in_dates(ds.catalogue(), start_date, end_date)
    return make_chips(data, ds, lon, lat, [band], chipsize, selected, path_prefix(request))


@router.get("/query/rawChipByParcelID")
def raw_chip_by_parcel_id(
    request: Request, who: Who, data: Served, start_date: date, end_date: date, aoi: Aoi = None,
    year: Year = None, parcels: Legacy = None, pid: Pid = None, ogc_fid: Pid = None, band: Band = "B08",
    chipsize: ChipSize = 1280,
) -> Response:  # fmt: skip
    """As rawChipByLocation, centred on a parcel."""
    ds = data.lookup(who, aoi, year, parcels)
    pid, _ = the_pid(pid, ogc_fid)
    centre = gpd.GeoSeries([ds.parcel(pid).geometry], crs=ds.parcels().crs)
    centre = centre.representative_point().to_crs("EPSG:4326").iloc[0]
    selected = in_dates(ds.catalogue(), start_date, end_date)
    return make_chips(data, ds, centre.x, centre.y, [band], chipsize, selected, path_prefix(request))


@router.post("/query/rawChipsBatch")
def raw_chips_batch(
    request: Request, who: Who, data: Served, batch: Annotated[ChipsBatch, Body()]
) -> Response:
    """Chips of the listed scenes (tiles = scene references) and bands around a location."""
    ds = chip_dataset(data, who, batch.aoi, batch.year, batch.parcels, batch.lon, batch.lat)
    if len(batch.tiles) * len(batch.bands) > data.limits["max_chips"]:
        raise ApiError(400, f"{len(batch.tiles)} tiles x {len(batch.bands)} bands is more than "
                            f"{int(data.limits['max_chips'])} chips")  # fmt: skip
    scenes = ds.catalogue()
    unknown = [t for t in batch.tiles if t not in scenes.index]
    if unknown:
        raise ApiError(404, f"unknown tile(s) in {ds.key}: {', '.join(unknown[:5])}")
    selected = scenes.loc[batch.tiles]
    return make_chips(
        data, ds, batch.lon, batch.lat, batch.bands, batch.chipsize, selected, path_prefix(request)
    )


@router.get("/chips/{token}/{name}", name="chip_file", response_class=FileResponse)
def chip_file(who: Who, data: Served, token: str, name: str) -> FileResponse:
    """A chip GeoTIFF made by a chip query; readable only by users of the same aoi."""
    if not TOKEN.match(token) or not CHIP_NAME.match(name):
        raise ApiError(404, "no such chip")
    folder = data.chip_dir / token
    try:
        aoi = (folder / ".aoi").read_text()
    except OSError:
        raise ApiError(404, "no such chip (chips expire after an hour)") from None
    if not who.may_read(aoi):
        raise ApiError(403, f"user {who.name} may not read chips of {aoi}")
    if not (folder / name).is_file():
        raise ApiError(404, "no such chip")
    return FileResponse(folder / name, media_type="image/tiff", filename=name)
