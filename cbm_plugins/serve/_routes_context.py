"""Context around a parcel: orthophoto backgrounds (backgroundByLocation, backgroundByParcelID)
from the dataset's tile services, and daily weather (weatherTimeSeries) from its meteo source.

A background answer is, as the JRC client expects, the plain-text URL of the image (a signed link:
the client fetches it without credentials). JRC answers an HTML page unless ``raw`` is given; the
JRC client 0.0.18 reads the answer as the URL, so we always answer the URL.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

import numpy as np
import rasterio
from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse, Response
from rasterio.warp import Resampling, reproject

from cbm_plugins.serve._auth import Who
from cbm_plugins.serve._datasets import Dataset, Datasets
from cbm_plugins.serve._http import ApiError, columns
from cbm_plugins.serve._params import Aoi, Lat, Legacy, Lon, Pid, Served, Year, known_pid
from cbm_plugins.serve._routes_chips import parcel_centre, square

MAX_BACKGROUND_PIXELS = 2048  # an image side; JRC's default is 256
MAX_BACKGROUND_EXTEND = 5000.0  # metres
WEATHER_COLUMNS = ("meteo_date", "tmin", "tmax", "tmean", "prec")  # JRC order

router = APIRouter(tags=["context"])
Pixels = Annotated[int, Query(ge=16, le=MAX_BACKGROUND_PIXELS, description="Image side in pixels")]
Extend = Annotated[float, Query(gt=0, le=MAX_BACKGROUND_EXTEND, description="Image side in metres")]
Tms = Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{1,32}$", description="Background name (dataset config)")]
ImageFormat = Literal["tif", "png"]


def background(
    request: Request, data: Datasets, ds: Dataset, lon: float, lat: float, chipsize: int, extend: float,
    tms: str, iformat: str,
) -> Response:  # fmt: skip
    """Render the named background of a dataset around a point; answer its signed URL."""
    source = ds.backgrounds.get(tms.lower())
    if source is None:
        names = ", ".join(sorted(ds.backgrounds)) or "none configured"
        raise ApiError(404, f"dataset {ds.key} has no background {tms!r} (available: {names})")
    bounds, crs = square(lon, lat, extend)
    photo = ds.hook(source, "cbm_source_orthophoto")(config=source, bounds=bounds, crs=crs, pixels=chipsize)
    size = extend / chipsize
    transform = rasterio.transform.from_origin(bounds[0], bounds[3], size, size)
    image = np.zeros((3, chipsize, chipsize), np.uint8)
    for band in range(3):
        reproject(photo.array[band], image[band], src_transform=photo.transform, src_crs=photo.crs,
                  dst_transform=transform, dst_crs=crs, resampling=Resampling.bilinear)  # fmt: skip
    token, folder = data.files.new_folder(ds.aoi)
    name = f"{tms.lower()}.{iformat}"
    profile = {"driver": "GTiff" if iformat == "tif" else "PNG", "height": chipsize, "width": chipsize,
               "count": 3, "dtype": "uint8", "crs": crs, "transform": transform}  # fmt: skip
    with rasterio.open(folder / name, "w", **profile) as out:
        out.write(image)
        out.update_tags(attribution=str(source.get("attribution", "")))
    return PlainTextResponse(str(request.base_url).rstrip("/") + data.files.signed(token, name))


@router.get("/query/backgroundByLocation")
def background_by_location(
    request: Request, who: Who, data: Served, lon: Lon, lat: Lat, chipsize: Pixels = 256,
    extend: Extend = 256, tms: Tms = "Google", iformat: ImageFormat = "tif", aoi: Aoi = None,
    year: Year = None, raw: bool = True,
) -> Response:  # fmt: skip
    """An orthophoto (chipsize pixels over extend metres) around a location, as the URL of a
    GeoTIFF (or PNG); the dataset is the named one or the first readable one covering the point."""
    ds = data.lookup(who, aoi, year, None) if aoi is not None else data.with_parcels_at(who, lon, lat)
    if not ds.near(lon, lat):
        raise ApiError(404, f"the location is outside dataset {ds.key}")
    return background(request, data, ds, lon, lat, chipsize, extend, tms, iformat)


@router.get("/query/backgroundByParcelID")
@router.get("/query/backgroundByParcelId", include_in_schema=False)
def background_by_parcel_id(
    request: Request, who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None,
    pid: Pid = None, chipsize: Pixels = 256, extend: Extend = 256, tms: Tms = "Google",
    iformat: ImageFormat = "tif", raw: bool = True,
) -> Response:  # fmt: skip
    """As backgroundByLocation, centred on a parcel."""
    ds = data.lookup(who, aoi, year, parcels)
    lon, lat = parcel_centre(ds, known_pid(ds, pid, None))
    return background(request, data, ds, lon, lat, chipsize, extend, tms, iformat)


@router.get("/query/weatherTimeSeries")
def weather_time_series(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    ptype: Annotated[str, Query(max_length=8)] = "",
) -> Response:  # fmt: skip
    """Daily weather of the dataset's year at a parcel (its meteo cell): meteo_date, tmin, tmax,
    tmean (°C), prec (mm). 404 when the dataset has no meteo source or the parcel no cell."""
    ds = data.lookup(who, aoi, year, parcels)
    number = known_pid(ds, pid, None)
    if ds.meteo is None:
        raise ApiError(404, f"dataset {ds.key} has no weather (set meteo in the server configuration)")
    lon, lat = parcel_centre(ds, number)
    days = (date(ds.year, 1, 1), date(ds.year, 12, 31))
    table = ds.hook(ds.meteo, "cbm_source_weather")(config=ds.meteo, point=(lon, lat), dates=days)
    if table.empty:
        raise ApiError(404, f"no meteo cell with data at parcel {pid} of {ds.key}")
    return columns({c: table[c].to_numpy() for c in WEATHER_COLUMNS})
