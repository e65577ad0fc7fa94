"""Client of the CbM RESTful query API (the JRC reference server or `cbm serve`).

Parcels come from parcelByID (ids from the ``pids`` option or a parcelsByPolygon search), ready
signatures from parcelTimeSeries (tstype s2/bs/c6 and scl), and imagery from raw chips: the
catalogue lists the chips around the parcels (rawChipByLocation, one call per band), and
read_window reads from a chip once downloaded. Chips are cut on the scenes' own pixel grid, so
signatures extracted from them equal those from the full scenes.

Options: url, aoi, year, username, password (or the environment variable named by password_env,
default CBM_API_PASSWORD), pids or polygon ("lon_lat-lon_lat-..."), tstypes (default s2, bs, c6),
start_date / end_date and bands (for the catalogue), chipsize (metres; default: covers the parcels),
timeout (s), retries, workers (parallel requests), chip_dir (default: a temporary folder).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import requests
import shapely
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import CbmError, ConfigError, InputError
from cbm_core.model import (
    HIST_COLUMNS,
    SCL_CLASSES,
    STATS,
    BandRef,
    RasterWindow,
    TimeSeries,
    validate_parcels,
)
from sources._raster import read_window

# The [source] options it reads (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(
    {"url", "username", "password", "password_env", "retries", "timeout", "aoi", "year", "workers", "pids",
     "polygon", "polygon_limit", "tstypes", "bands", "start_date", "end_date", "chipsize", "chip_dir"}
)  # fmt: skip

_SESSIONS = threading.local()
OUR_CONVENTIONS = {"bandnames": "cbm", "values": "reflectance"}  # parcelTimeSeries options of cbm serve
JRC_DN_PER_REFLECTANCE = 10_000.0  # JRC time series give S2 values as DN = reflectance x 10000


# HTTP --------------------------------------------------------------------------------------------


def _password(config: PluginConfig) -> str | None:
    if config.get("password"):
        return str(config.get("password"))
    return os.environ.get(str(config.get("password_env", "CBM_API_PASSWORD")))


def _session(config: PluginConfig) -> requests.Session:
    """One session per thread (connection reuse), retrying 429/5xx and lost connections with backoff."""
    key = (str(config.require("url")), config.get("username"), int(config.get("retries", 4)))
    sessions = _SESSIONS.__dict__.setdefault("by_key", {})
    if key not in sessions:
        session = requests.Session()
        retry = Retry(
            total=key[2], backoff_factor=0.3, status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"GET", "POST"}), raise_on_status=False,
        )  # fmt: skip
        session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=16))
        session.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=16))
        if config.get("username"):
            session.auth = (str(config.get("username")), _password(config) or "")
        sessions[key] = session
    return sessions[key]


def _base(config: PluginConfig) -> str:
    return str(config.require("url")).rstrip("/") + "/"


def query(config: PluginConfig, name: str, params: dict[str, Any] | None = None, body: Any = None) -> dict:
    """One query (GET, or POST with a JSON body): the column-oriented JSON answer as a dict."""
    url = f"{_base(config)}query/{name}"
    timeout = float(config.get("timeout", 30))
    try:
        if body is None:
            response = _session(config).get(url, params=params, timeout=timeout)
        else:
            response = _session(config).post(url, json=body, timeout=timeout)
    except requests.RequestException as exc:
        raise CbmError(f"REST API {url}: {exc}") from None
    if response.status_code in (401, 403):
        raise ConfigError(
            f"REST API {url}: {response.status_code} {_message(response)} (check username/password)"
        )
    if response.status_code >= 400:
        raise InputError(f"REST API {url}: {response.status_code} {_message(response)}")
    try:
        return response.json()
    except ValueError:
        raise InputError(f"REST API {url}: the answer is not JSON") from None


def _message(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", response.reason))
    except (ValueError, AttributeError):
        return str(response.reason)


def _dataset(config: PluginConfig) -> dict[str, Any]:
    return {"aoi": config.require("aoi"), "year": int(config.require("year"))}


def _parallel(config: PluginConfig, work: Any, items: Sequence[Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=int(config.get("workers", 8))) as pool:
        return list(pool.map(work, items))


# Parcels -----------------------------------------------------------------------------------------


def _pids(config: PluginConfig) -> list[int]:
    if config.get("pids") is not None:
        return [int(p) for p in config.get("pids")]
    polygon = config.get("polygon")
    if polygon is None:
        raise ConfigError(f'{config.where}: give pids = [...] or polygon = "lon_lat-lon_lat-..."')
    found = query(config, "parcelsByPolygon", {**_dataset(config), "polygon": polygon, "only_ids": "true"})
    pids = found.get("pid", found.get("ogc_fid", []))
    limit = int(config.get("polygon_limit", 100))
    if len(pids) >= limit:
        raise InputError(
            f"{config.where}: the polygon holds {limit} or more parcels (the API's limit); split it"
        )
    return sorted(int(p) for p in pids)


@impl
def cbm_source_parcels(config: PluginConfig) -> gpd.GeoDataFrame:
    def one(pid: int) -> dict[str, Any] | None:
        answer = query(config, "parcelByID", {**_dataset(config), "pid": pid, "withGeometry": "true"})
        ids = answer.get("pid", answer.get("ogc_fid", []))
        if not ids:
            return None
        return {"pid": int(ids[0]), "crop_code": str(answer["cropcode"][0] or ""),
                "crop_name": str(answer["cropname"][0] or ""), "srid": int(answer["srid"][0]),
                "geometry": shapely.from_geojson(answer["geom"][0])}  # fmt: skip

    rows = [r for r in _parallel(config, one, _pids(config)) if r is not None]
    if not rows:
        raise InputError(f"{config.where}: the REST API returned no parcels")
    srids = {r["srid"] for r in rows}
    if len(srids) > 1:
        raise InputError(f"{config.where}: parcels come in several SRIDs {sorted(srids)}")
    frame = pd.DataFrame(rows).drop(columns="srid")
    parcels = gpd.GeoDataFrame(frame, geometry="geometry", crs=f"EPSG:{srids.pop()}")
    parcels = parcels.astype({"crop_code": "string", "crop_name": "string"})
    return validate_parcels(parcels, f"REST API {_base(config)}", outlines=False)  # locations, not outlines


# Signatures --------------------------------------------------------------------------------------


@impl
def cbm_source_signatures(config: PluginConfig, pids: Sequence[int] | None) -> TimeSeries:
    parcels = cbm_source_parcels(config)
    if pids is not None:
        parcels = parcels[parcels["pid"].isin(set(pids))]
    tstypes = [str(t) for t in config.get("tstypes", ["s2", "bs", "c6"])]
    jobs = [(int(p), t) for p in parcels["pid"] for t in [*tstypes, "scl"] if t != "scl" or "s2" in tstypes]

    def one(job: tuple[int, str]) -> tuple[int, str, dict]:
        pid, tstype = job
        # cbm servers answer in our names and units when asked; JRC servers ignore the request
        params = {**_dataset(config), "pid": pid, "tstype": tstype, "scl": "False", **OUR_CONVENTIONS}
        return pid, tstype, query(config, "parcelTimeSeries", params)

    stats_parts, scl_parts = [], []
    for pid, tstype, answer in _parallel(config, one, jobs):
        if not answer or not answer.get("date_part"):
            continue
        obstime = pd.to_datetime(np.asarray(answer["date_part"], dtype=np.int64), unit="s", utc=True)
        card = "s2" if tstype == "scl" else tstype  # SCL histograms belong to the S2 scenes
        named = [f"{card}_{t:%Y%m%dT%H%M%S}" for t in obstime]  # JRC servers send no obsid column
        obsid = answer.get("obsid") or named
        if tstype == "scl":
            scl_parts.append(_scl_rows(pid, obsid, obstime, answer["hist"]))
            continue
        frame = pd.DataFrame({"pid": pid, "obsid": obsid, "band": answer["band"]})
        for name in STATS:
            frame[name] = np.asarray([np.nan if v is None else v for v in answer[name]], dtype=np.float64)
        if "obsid" not in answer:  # a JRC server: its band names and S2 digital numbers
            frame = _from_jrc(frame, tstype)
        frame["count"] = frame["count"].fillna(0).astype("int64")
        frame["obstime"], frame["card"] = obstime, tstype
        frame["orbit"] = answer.get("orbit") or [None] * len(frame)
        stats_parts.append(frame)
    stats = pd.concat(stats_parts, ignore_index=True) if stats_parts else _empty_stats()
    scl = pd.concat(scl_parts, ignore_index=True) if scl_parts else _empty_scl()
    stats = stats.astype({"obsid": object, "band": object}).sort_values(
        ["pid", "obstime", "band"], ignore_index=True
    )
    scl = scl.astype({"obsid": object}).sort_values(["pid", "obstime"], ignore_index=True)
    return TimeSeries(stats, scl, parcels.sort_values("pid", ignore_index=True))


def _from_jrc(frame: pd.DataFrame, tstype: str) -> pd.DataFrame:
    """JRC conventions to ours: VVb/VHc -> VV/VH, SC -> SCL, S2 DN -> reflectance."""
    bands = frame["band"].astype(str)
    s1 = bands.str.fullmatch(r"V[VH][bc]")
    frame["band"] = np.where(s1, bands.str[:2], np.where(bands == "SC", "SCL", bands))
    if tstype == "s2":
        reflectance = frame["band"] != "SCL"
        for name in STATS:
            if name != "count":
                frame.loc[reflectance, name] = frame.loc[reflectance, name] / JRC_DN_PER_REFLECTANCE
    return frame


def _scl_rows(
    pid: int, obsid: Sequence[str], obstime: pd.DatetimeIndex, hists: Sequence[Any]
) -> pd.DataFrame:
    counts = np.zeros((len(hists), SCL_CLASSES), dtype=np.int64)
    for row, hist in enumerate(hists):
        for key, value in (json.loads(hist) if isinstance(hist, str) else hist or {}).items():
            if 0 <= int(key) < SCL_CLASSES:
                counts[row, int(key)] = int(value)
    frame = pd.DataFrame(counts, columns=list(HIST_COLUMNS))
    frame.insert(0, "obsid", list(obsid))
    frame.insert(0, "pid", pid)
    frame["obstime"] = obstime
    return frame


def _empty_stats() -> pd.DataFrame:
    frame = pd.DataFrame({"pid": pd.Series(dtype="int64"), "obsid": pd.Series(dtype="object"),
                          "band": pd.Series(dtype="object")})  # fmt: skip
    for name in STATS:
        frame[name] = pd.Series(dtype="int64" if name == "count" else "float64")
    return frame.assign(obstime=pd.Series(dtype="datetime64[ns, UTC]"), card=pd.Series(dtype="object"),
                        orbit=pd.Series(dtype="object"))  # fmt: skip


def _empty_scl() -> pd.DataFrame:
    frame = pd.DataFrame({"pid": pd.Series(dtype="int64"), "obsid": pd.Series(dtype="object")})
    for name in HIST_COLUMNS:
        frame[name] = pd.Series(dtype="int64")
    return frame.assign(obstime=pd.Series(dtype="datetime64[ns, UTC]"))


# Imagery through chips ---------------------------------------------------------------------------


@impl
def cbm_source_catalogue(config: PluginConfig) -> gpd.GeoDataFrame:
    parcels = cbm_source_parcels(config)
    lon, lat, size = _chip_area(config, parcels)
    bands = [str(b) for b in config.require("bands")]
    dates = {"start_date": str(config.require("start_date")), "end_date": str(config.require("end_date"))}

    def one(band: str) -> dict:
        params = {**_dataset(config), "lon": lon, "lat": lat, "band": band, "chipsize": size, **dates}
        return query(config, "rawChipByLocation", params)

    scenes: dict[str, dict[str, Any]] = {}
    for band, answer in zip(bands, _parallel(config, one, bands), strict=True):
        if "obsids" not in answer:
            raise InputError(
                f"{config.where}: the server's chip answers carry no scene ids (not a cbm server)"
            )
        for when, chip, obsid, card, orbit in zip(
            answer["dates"], answer["chips"], answer["obsids"], answer["cards"], answer["orbits"], strict=True
        ):
            first = {"obsid": obsid, "obstime": _utc(when), "sensor": "",
                     "card": card, "orbit": orbit, "bands": {}}  # fmt: skip
            scene = scenes.setdefault(obsid, first)
            scene["bands"][band] = BandRef(_absolute(config, chip))
    frame = pd.DataFrame(
        list(scenes.values()), columns=["obsid", "obstime", "sensor", "card", "orbit", "bands"]
    )
    catalogue = gpd.GeoDataFrame(frame, geometry=[None] * len(frame), crs="EPSG:4326")
    return catalogue.sort_values(["obstime", "obsid"], ignore_index=True)


def _utc(when: str) -> pd.Timestamp:
    """A chip date label (JRC YYYYMMDDTHHMMSS, in UTC, or ISO with a zone) as a UTC time."""
    stamp = pd.Timestamp(when)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _chip_area(config: PluginConfig, parcels: gpd.GeoDataFrame) -> tuple[float, float, float]:
    """Centre (WGS84) and side (m) of a square chip covering every parcel, with a 100 m margin."""
    if config.get("chipsize") is not None:
        size = float(config.get("chipsize"))
    else:
        minx, miny, maxx, maxy = parcels.to_crs(parcels.estimate_utm_crs()).total_bounds
        size = float(np.ceil(np.hypot(maxx - minx, maxy - miny) + 200))
    centre = gpd.GeoSeries([shapely.box(*parcels.total_bounds).centroid], crs=parcels.crs).to_crs("EPSG:4326")
    return round(centre.x.iloc[0], 7), round(centre.y.iloc[0], 7), size


def _absolute(config: PluginConfig, link: str) -> str:
    return link if "://" in link else _base(config) + link.lstrip("/")


@impl
def cbm_source_read_window(
    config: PluginConfig, band: BandRef, bounds: tuple[float, float, float, float], crs: str
) -> RasterWindow:
    return read_window(
        BandRef(str(_download(config, band.uri)), band.nodata, band.scale, band.offset), bounds, crs
    )


def _download(config: PluginConfig, url: str) -> Path:
    """A chip file, fetched once (with the API's credentials) and kept in the chip folder."""
    target = _chip_dir(str(config.get("chip_dir", ""))) / f"{hashlib.sha1(url.encode()).hexdigest()}.tif"
    if target.exists():
        return target
    try:
        response = _session(config).get(url, timeout=float(config.get("timeout", 30)))
    except requests.RequestException as exc:
        raise CbmError(f"chip {url}: {exc}") from None
    if response.status_code != 200:
        raise InputError(f"chip {url}: {response.status_code} {_message(response)}")
    partial = target.with_suffix(f".{threading.get_ident()}.part")
    partial.write_bytes(response.content)
    os.replace(partial, target)
    return target


@cache
def _chip_dir(configured: str) -> Path:
    if not configured:
        folder = Path(tempfile.mkdtemp(prefix="cbm-rest-chips-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return folder
    folder = Path(configured)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
