"""Image chips: raw GeoTIFF chips (rawChipByLocation, rawChipByParcelID, rawChipsBatch,
rawS1ChipsBatch), composite PNG chips (chipsByLocation, chipsByParcelID) and the files they link to.

Chips are cut on the scenes' own grid (no resampling) and written to a per-request folder (see
_files). Answers follow JRC: ``dates`` as YYYYMMDDTHHMMSS labels and ``chips`` as relative links
(signed, so that the JRC client can fetch them without credentials); extra columns obsids,
bands, cards, orbits. ``onlylist=True`` lists the scenes without cutting chips.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date
from typing import Annotated, Any, Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from fastapi import APIRouter, Body, Query
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field
from pyproj import Transformer

from cbm_plugins.serve._auth import Who
from cbm_plugins.serve._datasets import AOI, Dataset, Datasets
from cbm_plugins.serve._files import safe_stem
from cbm_plugins.serve._http import ApiError, columns
from cbm_plugins.serve._params import Aoi, Band, Lat, Legacy, Lon, Pid, Served, Year, known_pid
from cbm_plugins.serve._users import User

JRC_DATE = "%Y%m%dT%H%M%S"
S1_LEVELS = {"CARD-BS": "bs", "CARD-COH6": "c6"}
S1_BANDS = ("VV", "VH")
DEFAULT_LUT = "5_95"  # JRC: stretch each band between its 5th and 95th percentile
MAX_PERCENTILE = 100.0  # lut values up to 100 are percentiles, larger ones DN/reflectance bounds
SAFE_NAME = re.compile(
    r"^(?P<sensor>S[12][ABCD])_[A-Z0-9_]*?(?P<day>\d{8})T\d{6}"
)  # S2A_MSIL2A_20230405T105031_...
SAFE_TILE = re.compile(r"_(T\d{2}[A-Z]{3})(?:_|\.|$)")  # the MGRS tile of an S2 product name

router = APIRouter(tags=["chips"])
ChipSize = Annotated[float, Query(gt=0, description="Chip side in metres")]
OnlyList = Annotated[bool, Query(description="List the scenes (dates, obsids) without cutting chips")]
SceneRef = Annotated[str, Field(max_length=120)]
BandName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,16}$")]


class ChipsBatch(BaseModel):
    """rawChipsBatch request body (JSON): tiles are scene ids or JRC .SAFE references."""

    lon: float = Field(ge=-180, le=180)
    lat: float = Field(ge=-90, le=90)
    tiles: list[SceneRef] = Field(max_length=1000)
    bands: list[BandName] = Field(min_length=1, max_length=32)
    chipsize: float = Field(default=1280, gt=0)
    aoi: Annotated[str | None, Field(pattern=AOI)] = None
    year: int | None = Field(default=None, ge=1970, le=2200)
    parcels: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")] = None


class S1ChipsBatch(BaseModel):
    """rawS1ChipsBatch request body (JSON): S1 CARD chips between two dates."""

    lon: float = Field(ge=-180, le=180)
    lat: float = Field(ge=-90, le=90)
    dates: list[date] = Field(min_length=2, max_length=2)
    chipsize: float = Field(default=1280, gt=0)
    plevel: Literal["CARD-BS", "CARD-COH6"] = "CARD-BS"
    bands: list[Literal["VV", "VH"]] = Field(default=list(S1_BANDS), min_length=1, max_length=2)
    aoi: Annotated[str | None, Field(pattern=AOI)] = None
    year: int | None = Field(default=None, ge=1970, le=2200)


def square(lon: float, lat: float, size: float) -> tuple[tuple[float, float, float, float], str]:
    """A size x size metre square centred on a WGS84 point, in its UTM zone."""
    zone = int((lon + 180) // 6) % 60 + 1
    crs = f"EPSG:{32600 + zone if lat >= 0 else 32700 + zone}"
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    half = size / 2
    return (x - half, y - half, x + half, y + half), crs


def write_chip(path: Any, window: Any) -> None:
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


def in_dates(scenes: pd.DataFrame, start_date: date, end_date: date) -> pd.DataFrame:
    """The scenes observed from start_date to end_date, both days included."""
    times = pd.to_datetime(scenes["obstime"], utc=True)
    start = pd.Timestamp(start_date, tz="UTC")
    end = pd.Timestamp(end_date, tz="UTC") + pd.Timedelta(days=1)
    return scenes[(times >= start) & (times < end)]


def at_point(scenes: pd.DataFrame, lon: float, lat: float) -> pd.DataFrame:
    point = shapely.Point(lon, lat)
    if scenes.geometry.notna().any():
        scenes = scenes[scenes.geometry.isna() | scenes.geometry.intersects(point)]
    return scenes


def resolve_scenes(ds: Dataset, refs: Sequence[str]) -> pd.DataFrame:
    """Catalogue rows for scene ids or JRC references (.SAFE product names: sensor, day and tile
    are matched against the catalogue); 404 naming the first unknown ones."""
    scenes = ds.catalogue()
    days = pd.to_datetime(scenes["obstime"], utc=True).dt.strftime("%Y%m%d").to_numpy()
    obsids = scenes.index.astype(str)
    found, unknown = [], []
    for ref in refs:
        if ref in scenes.index:
            found.append(ref)
            continue
        match = SAFE_NAME.match(ref)
        hits = []
        if match:
            same = (days == match["day"]) & obsids.str.startswith(match["sensor"])
            tile = SAFE_TILE.search(ref)
            if tile:
                same &= obsids.str.contains(tile[1])
            hits = obsids[same].tolist()
        if len(hits) == 1:
            found.append(hits[0])
        else:
            unknown.append(ref)
    if unknown:
        raise ApiError(404, f"unknown or ambiguous scene reference(s) in {ds.key}: {', '.join(unknown[:5])}")
    return scenes.loc[found]


def make_chips(
    data: Datasets, ds: Dataset, lon: float, lat: float, bands: Sequence[str], chipsize: float,
    scenes: pd.DataFrame, onlylist: bool = False,
) -> Response:  # fmt: skip
    """Write the chips of some scenes and bands around a point; answer their dates and links."""
    limits = data.limits
    if chipsize > limits["max_chipsize"]:
        raise ApiError(400, f"chipsize {chipsize} m is larger than the limit {limits['max_chipsize']:g} m")
    scenes = at_point(scenes, lon, lat)
    wanted = [(s, b) for s in scenes.itertuples(index=False) for b in bands if b in s.bands]
    out: dict[str, list] = {"dates": [], "chips": [], "obsids": [], "bands": [], "cards": [], "orbits": []}
    if onlylist:
        for scene, band in wanted:
            for name, value in zip(out, (pd.Timestamp(scene.obstime).strftime(JRC_DATE), "", scene.obsid,
                                         band, scene.card, scene.orbit), strict=True):  # fmt: skip
                out[name].append(value)
        del out["chips"]
        return columns(out)
    if len(wanted) > limits["max_chips"]:
        raise ApiError(
            400, f"{len(wanted)} chips selected, over the limit {int(limits['max_chips'])}: shorten the dates"
        )
    if not wanted:
        return columns(out)  # no chip: no request folder either
    token, folder = data.files.new_folder(ds.aoi)
    bounds, crs = square(lon, lat, chipsize)
    reader = ds.hook(ds.source, "cbm_source_read_window")
    for scene, band in wanted:
        window = reader(config=ds.source, band=scene.bands[band], bounds=bounds, crs=crs)
        if window.array.size == 0:
            continue
        name = f"{safe_stem(scene.obsid)}.{band}.tif"
        write_chip(folder / name, window)
        values = (pd.Timestamp(scene.obstime).strftime(JRC_DATE), data.files.signed(token, name), scene.obsid,
                  band, scene.card, scene.orbit)  # fmt: skip
        for column, value in zip(out, values, strict=True):
            out[column].append(value)
    data.files.discard_if_empty(folder)
    return columns(out)


def chip_dataset(
    data: Datasets, who: User, aoi: str | None, year: int | None, parcels: str | None, lon: float, lat: float
) -> Dataset:
    """The named dataset, or for JRC clients that send no aoi the first readable one at the point."""
    if aoi is not None or parcels is not None:
        return data.lookup(who, aoi, year, parcels)
    return data.covering(who, lon, lat)


def parcel_centre(ds: Dataset, pid: int) -> tuple[float, float]:
    centre = gpd.GeoSeries([ds.parcel(pid).geometry], crs=ds.parcels().crs)
    point = centre.representative_point().to_crs("EPSG:4326").iloc[0]
    return point.x, point.y


@router.get("/query/rawChipByLocation")
def raw_chip_by_location(
    who: Who, data: Served, lon: Lon, lat: Lat, start_date: date, end_date: date,
    band: Band = "B08", chipsize: ChipSize = 1280, aoi: Aoi = None, year: Year = None,
    parcels: Legacy = None, plevel: Annotated[str, Query(max_length=16)] = "LEVEL2A",
    onlylist: OnlyList = False,
) -> Response:  # fmt: skip
    """GeoTIFF chips (native grid, no resampling) of one band around a location: dates
    (YYYYMMDDTHHMMSS), chips (relative signed links). Extra columns: obsids, bands, cards, orbits."""
    ds = chip_dataset(data, who, aoi, year, parcels, lon, lat)
    selected = in_dates(ds.catalogue(), start_date, end_date)
    return make_chips(data, ds, lon, lat, [band], chipsize, selected, onlylist)


@router.get("/query/rawChipByParcelID")
def raw_chip_by_parcel_id(
    who: Who, data: Served, start_date: date, end_date: date, aoi: Aoi = None,
    year: Year = None, parcels: Legacy = None, pid: Pid = None, ogc_fid: Pid = None, band: Band = "B08",
    chipsize: ChipSize = 1280, onlylist: OnlyList = False,
) -> Response:  # fmt: skip
    """As rawChipByLocation, centred on a parcel."""
    ds = data.lookup(who, aoi, year, parcels)
    lon, lat = parcel_centre(ds, known_pid(ds, pid, ogc_fid))
    selected = in_dates(ds.catalogue(), start_date, end_date)
    return make_chips(data, ds, lon, lat, [band], chipsize, selected, onlylist)


@router.post("/query/rawChipsBatch")
def raw_chips_batch(who: Who, data: Served, batch: Annotated[ChipsBatch, Body()]) -> Response:
    """Chips of the listed scenes (scene ids or JRC .SAFE references) and bands around a location."""
    ds = chip_dataset(data, who, batch.aoi, batch.year, batch.parcels, batch.lon, batch.lat)
    if len(batch.tiles) * len(batch.bands) > data.limits["max_chips"]:
        chips = len(batch.tiles) * len(batch.bands)
        raise ApiError(400, f"{len(batch.tiles)} tiles x {len(batch.bands)} bands = {chips} chips, more than "
                            f"the limit {int(data.limits['max_chips'])}: split the batch")  # fmt: skip
    selected = resolve_scenes(ds, batch.tiles)
    return make_chips(data, ds, batch.lon, batch.lat, batch.bands, batch.chipsize, selected)


@router.post("/query/rawS1ChipsBatch")
def raw_s1_chips_batch(who: Who, data: Served, batch: Annotated[S1ChipsBatch, Body()]) -> Response:
    """Sentinel-1 CARD chips (plevel CARD-BS backscatter or CARD-COH6 coherence) between two dates."""
    ds = chip_dataset(data, who, batch.aoi, batch.year, None, batch.lon, batch.lat)
    scenes = in_dates(ds.catalogue(), min(batch.dates), max(batch.dates))
    scenes = scenes[scenes["card"] == S1_LEVELS[batch.plevel]]
    return make_chips(data, ds, batch.lon, batch.lat, batch.bands, batch.chipsize, scenes)


def stretch(array: np.ndarray, lut: tuple[float, float], nodata: float | None) -> np.ndarray:
    """One band to 0-255: between two percentiles (lut values <= 100) or two values."""
    values = array.astype(np.float64)
    valid = np.isfinite(values) if nodata is None else np.isfinite(values) & (values != nodata)
    if not valid.any():
        return np.zeros(array.shape, np.uint8)
    low, high = lut
    if high <= MAX_PERCENTILE:
        low, high = np.percentile(values[valid], [low, high])
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1) * 255
    return np.where(valid, scaled, 0).astype(np.uint8)


def parse_lut(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split("_"))
    except ValueError:
        raise ApiError(400, f"lut {text!r}: expected LOW_HIGH (percentiles up to 100, else values)") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ApiError(400, f"lut {text!r}: LOW must be below HIGH")
    return low, high


def make_composites(
    data: Datasets, ds: Dataset, lon: float, lat: float, bands: Sequence[str], lut: tuple[float, float],
    chipsize: float, scenes: pd.DataFrame,
) -> Response:  # fmt: skip
    """PNG composites of three bands (the first band's grid; others repeated onto it)."""
    if chipsize > data.limits["max_chipsize"]:
        raise ApiError(
            400, f"chipsize {chipsize} m is larger than the limit {data.limits['max_chipsize']:g} m"
        )
    scenes = at_point(scenes, lon, lat)
    usable = [s for s in scenes.itertuples(index=False) if all(b in s.bands for b in bands)]
    if len(usable) > data.limits["max_chips"]:
        raise ApiError(
            400, f"{len(usable)} composites selected, over the limit {int(data.limits['max_chips'])}"
        )
    out: dict[str, list] = {"dates": [], "chips": [], "obsids": []}
    if not usable:
        return columns(out)  # no composite: no request folder either
    token, folder = data.files.new_folder(ds.aoi)
    bounds, crs = square(lon, lat, chipsize)
    reader = ds.hook(ds.source, "cbm_source_read_window")
    for scene in usable:
        windows = [reader(config=ds.source, band=scene.bands[b], bounds=bounds, crs=crs) for b in bands]
        if windows[0].array.size == 0:
            continue
        height, width = windows[0].array.shape
        layers = []
        for window in windows:
            rows = np.arange(height) * window.array.shape[0] // height
            cols = np.arange(width) * window.array.shape[1] // width
            layers.append(stretch(window.array[np.ix_(rows, cols)], lut, window.nodata))
        name = f"{safe_stem(scene.obsid)}.{'_'.join(bands)}.png"
        profile = {"driver": "PNG", "height": height, "width": width, "count": 3, "dtype": "uint8",
                   "crs": windows[0].crs, "transform": windows[0].transform}  # fmt: skip
        with rasterio.open(folder / name, "w", **profile) as png:
            png.write(np.stack(layers))
        out["dates"].append(pd.Timestamp(scene.obstime).strftime(JRC_DATE))
        out["chips"].append(data.files.signed(token, name))
        out["obsids"].append(scene.obsid)
    data.files.discard_if_empty(folder)
    return columns(out)


CompositeBands = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9]{1,8}(_[A-Za-z0-9]{1,8}){2}$")]
Lut = Annotated[str, Query(max_length=32, description="LOW_HIGH: percentiles (<= 100) or values")]


def composite_bands(bands: str | None, band: str | None) -> list[str]:
    return (bands or band or "B08_B04_B03").split("_")


@router.get("/query/chipsByLocation")
def chips_by_location(
    who: Who, data: Served, lon: Lon, lat: Lat, start_date: date, end_date: date, lut: Lut = DEFAULT_LUT,
    bands: CompositeBands = None, band: CompositeBands = None, chipsize: ChipSize = 1280,
    plevel: Annotated[str, Query(max_length=16)] = "LEVEL2A", aoi: Aoi = None, year: Year = None,
) -> Response:  # fmt: skip
    """Composite PNG chips (three bands, e.g. B08_B04_B03, stretched by lut) around a location:
    dates, chips (relative signed links), obsids."""
    ds = chip_dataset(data, who, aoi, year, None, lon, lat)
    scenes = in_dates(ds.catalogue(), start_date, end_date)
    return make_composites(data, ds, lon, lat, composite_bands(bands, band), parse_lut(lut), chipsize, scenes)


@router.get("/query/chipsByParcelID")
def chips_by_parcel_id(
    who: Who, data: Served, start_date: date, end_date: date, aoi: Aoi = None, year: Year = None,
    pid: Pid = None, lut: Lut = DEFAULT_LUT, bands: CompositeBands = None, band: CompositeBands = None,
    chipsize: ChipSize = 1280, plevel: Annotated[str, Query(max_length=16)] = "LEVEL2A",
) -> Response:  # fmt: skip
    """As chipsByLocation, centred on a parcel."""
    ds = data.lookup(who, aoi, year, None)
    lon, lat = parcel_centre(ds, known_pid(ds, pid, None))
    scenes = in_dates(ds.catalogue(), start_date, end_date)
    return make_composites(data, ds, lon, lat, composite_bands(bands, band), parse_lut(lut), chipsize, scenes)


def file_response(path: Any) -> FileResponse:
    media = "image/png" if path.suffix == ".png" else "image/tiff"
    return FileResponse(path, media_type=media, filename=path.name)


@router.get("/chips/{token}/{name}", name="chip_file", response_class=FileResponse)
def chip_file(who: Who, data: Served, token: str, name: str) -> FileResponse:
    """A file made by a chip or background query, for users of the same aoi (basic auth)."""
    found = data.files.find(token, name)
    if found is None:
        raise ApiError(404, "no such chip (chips expire after an hour)")
    if not who.may_read(found[0]):
        raise ApiError(403, f"user {who.name} may not read chips of {found[0]}")
    return file_response(found[1])


@router.get("/signed/{stamp}/{token}/{name}", response_class=FileResponse)
def signed_file(data: Served, stamp: str, token: str, name: str) -> FileResponse:
    """A file made by a chip or background query, through the signed link the query answered with
    (no credentials: the link expires after a quarter of an hour)."""
    if not data.files.check_signature(stamp, token):
        raise ApiError(403, "link signature invalid or expired: query again")
    found = data.files.find(token, name)
    if found is None:
        raise ApiError(404, "no such chip (chips expire after an hour)")
    return file_response(found[1])
