"""Scenes found through a STAC API (pystac-client): Earth Search, Planetary Computer, CDSE, or any other.

The search: ``url`` (the API's landing page), ``collections``, the parcels' bounding box (or
option ``bbox``, lon/lat), ``start`` / ``end`` (dates, end day included) and ``max_cloud_cover``
(percent of eo:cloud_cover: sent as a CQL2 filter when the API conforms to it, always checked on
the items too). Items become scenes; their assets become bands through an asset-key *profile*:

========================  =============================================  ======================
profile                   collection                                     asset keys
========================  =============================================  ======================
earth-search-s2           sentinel-2-l2a (Element 84 Earth Search v1)    red, nir, scl, ...
earth-search-s1           sentinel-1-grd                                 vv, vh
planetary-computer-s2     sentinel-2-l2a (needs signed URLs: ``sign``)   B04, B08, SCL, ...
planetary-computer-s1     sentinel-1-rtc (needs signed URLs)             vv, vh
cdse-s2                   sentinel-2-l2a (CDSE STAC, s3://eodata JP2)    B04_10m, SCL_20m, ...
========================  =============================================  ======================

``assets = {B04 = "red", SCL = ["scl", "SCL_20m"]}`` adds to or overrides the profile's mapping
(a list: the first key an item has wins); with ``profile = "custom"`` it is the whole mapping and
``card`` (s2, bs, c6) and ``collections`` must be given. Nodata, scale and offset come from the
asset's raster:bands (so Earth Search's -0.1 offset of baseline >= 04.00 is applied), else from
the file's tags.

Access: ``headers`` (sent with every API request), ``token_env`` (the name of an environment
variable holding a bearer token, read at each request so a refreshed token is used, for the API
and for http(s) assets), ``sign`` (``"module:function"``, called with each asset href just before
it is read, returning the signed href: e.g. ``"planetary_computer:sign"``); s3:// hrefs use the
S3 options of the ``s3`` source (endpoint_url, access_key_id, ..., requester_pays through
``gdal = {AWS_REQUEST_PAYER = "requester"}``).

Bad answers: a timeout (option ``timeout``, seconds, with ``retries``) or a refusal (an expired
token) stops the catalogue with one line naming the API; an API that pages forever (the same items
again, or more than ``max_items``) is cut off with a warning; an item without the asset a band
needs keeps its scene but that band fails when read, named in the run summary against the scene.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import geopandas as gpd
import pandas as pd
import rasterio
import requests
import shapely.geometry
from pystac_client import Client
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO

import sources.s3 as s3
from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError, InputError
from cbm_core.model import CARDS, BandRef, RasterWindow
from sources._archive import date_option, names_list, problem_band, raise_if_problem
from sources._catalogue import catalogue_frame
from sources._raster import read_window

log = logging.getLogger("cbm.source.stac")

# The [source] options it reads (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset({
    "url", "collections", "profile", "assets", "card", "bbox", "start", "end",
    "max_cloud_cover", "max_items", "page_size", "timeout", "retries", "headers", "token_env", "sign",
    "parcels", "layer", "pid_column", "crop_code_column", "crop_name_column", "endpoint_url", "region",
    "path_style", "access_key_id", "secret_access_key", "session_token", "anonymous", "gdal",
})  # fmt: skip
DEFAULT_MAX_ITEMS = 100_000  # a season of one country's S2 tiles is ~50k items
DEFAULT_PAGE_SIZE = 250
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Profile:
    """How one catalogue names things: its collections, their CARD and band -> asset keys."""

    collections: tuple[str, ...]
    card: str
    assets: dict[str, tuple[str, ...]]


_S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
_EARTH_SEARCH_S2 = dict(zip(
    (*_S2_BANDS, "SCL", "AOT", "WVP"),
    ("coastal", "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "nir09",
     "swir16", "swir22", "scl", "aot", "wvp"),
    strict=True,
))  # fmt: skip
_RESOLUTIONS = ("10m", "20m", "60m")

PROFILES: dict[str, Profile] = {
    "earth-search-s2": Profile(("sentinel-2-l2a",), "s2", {b: (k,) for b, k in _EARTH_SEARCH_S2.items()}),
    "earth-search-s1": Profile(("sentinel-1-grd",), "bs", {"VV": ("vv",), "VH": ("vh",)}),
    "planetary-computer-s2": Profile(
        ("sentinel-2-l2a",), "s2", {b: (b,) for b in (*_S2_BANDS, "SCL", "AOT", "WVP")}
    ),
    "planetary-computer-s1": Profile(("sentinel-1-rtc",), "bs", {"VV": ("vv",), "VH": ("vh",)}),
    "cdse-s2": Profile(
        ("sentinel-2-l2a",),
        "s2",
        {b: tuple(f"{b}_{r}" for r in _RESOLUTIONS) for b in (*_S2_BANDS, "SCL", "AOT", "WVP")},
    ),
}


# Options ------------------------------------------------------------------------------------------


def _where(config: PluginConfig) -> str:
    return f"{config.where} (plugin '{config.plugin}')"


def _check_options(config: PluginConfig) -> None:
    unknown = sorted(set(config.options) - CBM_OPTIONS - {"plugin", "name"})
    if unknown:
        raise ConfigError(
            f"{_where(config)}: unknown option(s) {', '.join(unknown)}; "
            f"expected {', '.join(sorted(CBM_OPTIONS))}"
        )


def profile_of(config: PluginConfig) -> Profile:
    """The configured profile with the ``assets``, ``collections`` and ``card`` options applied."""
    where = _where(config)
    name = str(config.get("profile", "custom" if config.get("assets") else "earth-search-s2"))
    if name != "custom" and name not in PROFILES:
        raise ConfigError(f"{where}: unknown profile {name!r}; expected custom or {', '.join(PROFILES)}")
    base = PROFILES.get(name, Profile((), "", {}))
    assets = dict(base.assets)
    extra = config.get("assets", {})
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}: option 'assets' must be a table of band = asset key(s), got {extra!r}")
    for band, keys in extra.items():
        assets[str(band)] = tuple(names_list(keys, f"assets.{band}", where))
    collections = tuple(names_list(config.get("collections"), "collections", where)) or base.collections
    card = str(config.get("card", base.card))
    if not collections:
        raise ConfigError(f"{where}: give the collections to search (option 'collections')")
    if card not in CARDS:
        raise ConfigError(f"{where}: option 'card' must be one of {', '.join(CARDS)}, got {card!r}")
    if not assets:
        raise ConfigError(f"{where}: profile 'custom' needs an 'assets' table (band = asset key)")
    return Profile(collections, card, assets)


def _token(config: PluginConfig) -> str | None:
    name = config.get("token_env")
    if not name:
        return None
    token = os.environ.get(str(name), "")
    if not token:
        raise InputError(f"{_where(config)}: environment variable {name} (token_env) is not set")
    return token


def _signer(config: PluginConfig) -> Callable[[str], str] | None:
    spec = config.get("sign")
    return None if not spec else _load_signer(str(spec), _where(config))


@cache
def _load_signer(spec: str, where: str) -> Callable[[str], str]:
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(
            f"{where}: option 'sign' = {spec!r}: no such function (expected 'module:function')"
        ) from None
    if not callable(function):
        raise ConfigError(f"{where}: option 'sign' = {spec!r} is not callable")
    return function


# Search -------------------------------------------------------------------------------------------


def _client(config: PluginConfig) -> Client:
    url = str(config.require("url"))
    headers = {str(k): str(v) for k, v in dict(config.get("headers", {})).items()}

    def authorise(request: requests.Request) -> requests.Request:
        token = _token(config)  # read per request: a refreshed token is picked up
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        return request

    timeout = float(config.get("timeout", DEFAULT_TIMEOUT))
    io = StacApiIO(max_retries=int(config.get("retries", 3)))
    try:  # Client.open re-applies headers, modifier and timeout to the StacApiIO (None would unset them)
        return Client.open(url, headers=headers, request_modifier=authorise, timeout=timeout, stac_io=io)
    except (APIError, requests.RequestException, ValueError) as exc:
        raise InputError(f"{url}: not a reachable STAC API ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return f"timed out: {text}"
    if any(code in text for code in ("401", "403", "Unauthorized", "Forbidden")):
        return f"refused, token missing or expired? ({text})"
    return text[:300]


def _bbox(config: PluginConfig) -> tuple[float, float, float, float]:
    value = config.get("bbox")
    if value is not None:
        if not (isinstance(value, list | tuple) and len(value) == 4):
            raise ConfigError(f"{_where(config)}: option 'bbox' must be [west, south, east, north]")
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    parcels = cbm_source_parcels(config=config)
    return tuple(float(v) for v in parcels.to_crs("EPSG:4326").total_bounds)  # type: ignore[return-value]


def _items(config: PluginConfig, profile: Profile) -> Iterator[dict[str, Any]]:
    """Item dicts of the search, page by page, cut off when the API repeats itself or overflows."""
    where = _where(config)
    client = _client(config)
    start = date_option(config.get("start"), "start", where)
    end = date_option(config.get("end"), "end", where, end=True)
    span = None if start is None and end is None else (
        f"{start.isoformat() if start is not None else '..'}/{end.isoformat() if end is not None else '..'}"
    )  # fmt: skip
    max_items = int(config.get("max_items", DEFAULT_MAX_ITEMS))
    arguments: dict[str, Any] = {
        "collections": list(profile.collections),
        "bbox": list(_bbox(config)),
        "datetime": span,
        "limit": int(config.get("page_size", DEFAULT_PAGE_SIZE)),
    }
    cloud = config.get("max_cloud_cover")
    if cloud is not None and client.conforms_to("FILTER"):
        arguments["filter"] = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, float(cloud)]}
        arguments["filter_lang"] = "cql2-json"
    url = str(config.require("url"))
    seen: set[str] = set()
    page_number = 0
    try:
        for page in client.search(**arguments).pages_as_dicts():
            page_number += 1
            features = page.get("features", [])
            fresh = [f for f in features if str(f.get("id")) not in seen]
            if features and not fresh:
                log.warning(
                    "%s: page %d repeats items already read; stopping the search there", url, page_number
                )
                return
            for feature in fresh:
                if len(seen) >= max_items:
                    log.warning(
                        "%s: more than max_items = %d items; the rest is not read (narrow the search or "
                        "raise max_items)", url, max_items,
                    )  # fmt: skip
                    return
                seen.add(str(feature.get("id")))
                yield feature
    except (APIError, requests.RequestException) as exc:
        raise InputError(f"{url}: search failed on page {page_number + 1} ({_reason(exc)})") from None


def _band(asset: dict[str, Any], href: str) -> BandRef:
    """A BandRef from an asset: raster:bands (STAC 1.0) or bands (STAC 1.1) nodata/scale/offset."""
    info = (asset.get("raster:bands") or asset.get("bands") or [{}])[0] or {}

    def number(*keys: str) -> float | None:
        for key in keys:
            if info.get(key) is not None:
                return float(info[key])
            if asset.get(key) is not None:
                return float(asset[key])
        return None

    return BandRef(href, number("nodata", "raster:nodata"), number("scale", "raster:scale"),
                   number("offset", "raster:offset"))  # fmt: skip


def _scene(item: dict[str, Any], profile: Profile, url: str) -> dict[str, Any] | None:
    props = item.get("properties", {})
    item_id = str(item.get("id"))
    when = props.get("datetime") or props.get("start_datetime")
    if not when or not item.get("geometry"):
        log.warning("%s: item %s has no datetime or geometry; skipped", url, item_id)
        return None
    assets = item.get("assets", {})
    bands: dict[str, BandRef] = {}
    for band, keys in profile.assets.items():
        key = next((k for k in keys if k in assets), None)
        if key is None:
            bands[band] = problem_band(
                f"{url}: item {item_id} (collection {item.get('collection')}) has no asset "
                f"{' or '.join(repr(k) for k in keys)} for band {band}"
            )
        else:
            bands[band] = _band(assets[key], _absolute(str(assets[key].get("href", "")), item))
    orbit = props.get("sat:orbit_state")
    if profile.card == "s2" and props.get("sat:relative_orbit") is not None:
        orbit = f"R{int(props['sat:relative_orbit']):03d}"
    return {
        "obsid": item_id,
        "obstime": pd.Timestamp(when).tz_convert("UTC")
        if pd.Timestamp(when).tzinfo
        else pd.Timestamp(when, tz="UTC"),
        "sensor": str(props.get("platform") or props.get("constellation") or ""),
        "card": profile.card,
        "orbit": orbit,
        "bands": bands,
        "geometry": shapely.geometry.shape(item["geometry"]),
        "cloud": props.get("eo:cloud_cover"),
    }


def _absolute(href: str, item: dict[str, Any]) -> str:
    """Relative hrefs against the item's self link (absolute ones as they are)."""
    if "://" in href or href.startswith("/"):
        return href
    base = next((link["href"] for link in item.get("links", []) if link.get("rel") == "self"), None)
    if base is None:
        return href
    return requests.compat.urljoin(base, href)


# Hooks --------------------------------------------------------------------------------------------


@impl
def cbm_source_catalogue(config: PluginConfig) -> gpd.GeoDataFrame:
    """The scenes the search finds, one per item, bands mapped through the asset-key profile."""
    _check_options(config)
    profile = profile_of(config)
    url = str(config.require("url"))
    cloud = config.get("max_cloud_cover")
    scenes = []
    for item in _items(config, profile):
        scene = _scene(item, profile, url)
        if scene is None:
            continue
        if cloud is not None and scene["cloud"] is not None and float(scene["cloud"]) > float(cloud):
            continue  # the API could not filter (no CQL2): done here
        del scene["cloud"]
        scenes.append(scene)
    return catalogue_frame(scenes)


@impl
def cbm_source_parcels(
    config: PluginConfig, bbox: tuple[float, float, float, float] | None = None
) -> gpd.GeoDataFrame:
    """Parcels from a file (local or s3://), read like the s3 source does."""
    return s3.cbm_source_parcels(config=config)


@impl
def cbm_source_read_window(
    config: PluginConfig, band: BandRef, bounds: tuple[float, float, float, float], crs: str
) -> RasterWindow:
    """A window of one asset: signed just before the read (signatures expire), s3:// over /vsis3/."""
    raise_if_problem(band)
    signer = _signer(config)
    href = signer(band.uri) if signer else band.uri
    options: dict[str, str] = {}
    token = _token(config) if href.startswith(("http://", "https://")) else None
    if token:
        options["GDAL_HTTP_HEADERS"] = f"Authorization: Bearer {token}"
    remote_s3 = href.startswith("s3://")
    path = s3.vsi_path(href) if remote_s3 else (f"/vsicurl/{href}" if href.startswith("http") else href)
    if href.split("?", 1)[0].lower().endswith(".jp2"):
        # GDAL's multi-threaded JPEG2000 path logs a corrupt code-stream but returns zeros
        options["GDAL_NUM_THREADS"] = "1"
    try:
        with (
            s3.gdal_env(config) if remote_s3 else contextlib.nullcontext(),
            rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", **options),
        ):
            return read_window(BandRef(path, band.nodata, band.scale, band.offset), bounds, crs)
    except InputError as exc:
        text = str(exc)
        if any(code in text for code in ("401", "403", "Access denied", "AccessDenied", "Forbidden")):
            raise InputError(f"{band.uri}: access denied (token or signed URL expired?)") from None
        if remote_s3:
            raise InputError(s3._explain(config, href)) from None
        raise InputError(f"{band.uri}: {text.split(': ', 1)[-1]}") from None
