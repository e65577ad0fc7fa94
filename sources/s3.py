"""S3 object storage: scenes as Cloud-Optimized GeoTIFFs, read window by window over GDAL /vsis3/.

The catalogue comes from one of three places (option ``catalogue``):

* ``listing`` (default): objects ``<prefix><scene>/<band>.tif``; date, sensor, card and orbit come
  from the scene folder's product name (S2x_MSIL2A_YYYYMMDD..., S1x_..._YYYYMMDD...), the
  footprint from the first band's header (a range read, never the pixels).
* ``csv``: a catalogue CSV in the bucket (key in option ``scenes``), columns as the local source's
  (product_id/obsid, obstime, band, path relative to the CSV, card/collection/sensor, nodata...).
* ``stac``: STAC item JSON files under the prefix; bands are the items' GeoTIFF assets.

Only the windows the extractor asks for are fetched: GDAL reads the COG header and the tiles that
cover a window, with HTTP range requests. boto3 (listing, catalogue files, parcels) and GDAL both
retry throttling and 5xx answers with exponential backoff. Options: bucket, prefix, endpoint_url,
region, path_style, access_key_id / secret_access_key (else the usual AWS environment), anonymous,
retries, timeout, parcels (``s3://bucket/key`` or a local path; read by the local source plugin,
with its pid_column / crop_code_column / crop_name_column / layer options), gdal (extra GDAL
config options).
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions
import geopandas as gpd
import pandas as pd
import rasterio
import shapely
import shapely.geometry
from pyproj import CRS
from rasterio.session import AWSSession

from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError, InputError
from cbm_core.model import BandRef, RasterWindow
from cbm_core.plugins import load_plugins
from sources._catalogue import card_of, catalogue_frame, scenes_from_band_rows
from sources._raster import raster_footprint, read_window

# The [source] options it reads (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(
    {"bucket", "prefix", "endpoint_url", "region", "path_style", "access_key_id", "secret_access_key",
     "session_token", "anonymous", "retries", "timeout", "parcels", "layer", "pid_column",
     "crop_code_column", "crop_name_column", "gdal", "catalogue", "scenes"}
)  # fmt: skip

RASTER_SUFFIXES = (".tif", ".tiff")
S2_NAME = re.compile(
    r"^S2(?P<unit>[A-D])_MSI(?:L2A|L1C)_(?P<date>\d{8})(?:T(?P<time>\d{6}))?(?:_N\d{4})?(?:_(?P<orbit>R\d{3}))?"
)
S1_NAME = re.compile(r"^S1(?P<unit>[A-D])_.*?_(?P<date>\d{8})(?:T(?P<time>\d{6}))?")


# Connection settings ---------------------------------------------------------------------------


def _endpoint(config: PluginConfig) -> str | None:
    value = config.get("endpoint_url")
    return None if value in (None, "") else str(value)


def _path_style(config: PluginConfig) -> bool:
    """Path-style addressing (bucket in the path): what MinIO, Ceph and moto usually need."""
    return bool(config.get("path_style", _endpoint(config) is not None))


def _credentials(config: PluginConfig) -> dict[str, str]:
    keys = {"aws_access_key_id": "access_key_id", "aws_secret_access_key": "secret_access_key",
            "aws_session_token": "session_token"}  # fmt: skip
    return {k: str(config.get(v)) for k, v in keys.items() if config.get(v)}


def client(config: PluginConfig) -> Any:
    """A boto3 S3 client with retries (backoff on throttling and 5xx) and timeouts."""
    return _client(
        _endpoint(config),
        str(config.get("region", "us-east-1")),
        _path_style(config),
        bool(config.get("anonymous", False)),
        int(config.get("retries", 8)),
        float(config.get("timeout", 30)),
        tuple(sorted(_credentials(config).items())),
    )


@cache
def _client(endpoint, region, path_style, anonymous, retries, timeout, credentials) -> Any:
    settings = botocore.config.Config(
        region_name=region,
        retries={"max_attempts": retries, "mode": "standard"},
        connect_timeout=timeout,
        read_timeout=timeout,
        s3={"addressing_style": "path" if path_style else "auto"},
        signature_version=botocore.UNSIGNED if anonymous else None,
    )
    return boto3.session.Session(**dict(credentials)).client("s3", endpoint_url=endpoint, config=settings)


def gdal_env(config: PluginConfig) -> rasterio.Env:
    """A GDAL environment whose /vsis3/ reads use the configured endpoint, credentials and retries.

    Credentials go through rasterio's AWS session (rasterio refuses them as plain options).
    """
    endpoint = gdal_options(config).get("AWS_S3_ENDPOINT")
    session = AWSSession(
        aws_unsigned=bool(config.get("anonymous", False)),
        region_name=str(config.get("region", "us-east-1")),
        endpoint_url=endpoint,
        **_credentials(config),
    )
    return rasterio.Env(session=session, **gdal_options(config))


def gdal_options(config: PluginConfig) -> dict[str, str]:
    """GDAL config options for /vsis3/: endpoint, addressing, retries with backoff, no folder listing."""
    options = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # never list a "folder" to open one file
        "GDAL_HTTP_MAX_RETRY": str(config.get("retries", 8)),
        "GDAL_HTTP_RETRY_DELAY": "0.5",  # doubled on each retry by GDAL
        "GDAL_HTTP_TIMEOUT": str(int(float(config.get("timeout", 30)))),
        "AWS_REGION": str(config.get("region", "us-east-1")),
        "AWS_VIRTUAL_HOSTING": "FALSE" if _path_style(config) else "TRUE",
    }
    endpoint = _endpoint(config)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["AWS_S3_ENDPOINT"] = parsed.netloc
        options["AWS_HTTPS"] = "NO" if parsed.scheme == "http" else "YES"
    options.update({str(k): str(v) for k, v in dict(config.get("gdal", {})).items()})
    return options


def vsi_path(uri: str) -> str:
    """s3://bucket/key as GDAL's /vsis3/bucket/key (other paths unchanged)."""
    return "/vsis3/" + uri[len("s3://") :] if uri.startswith("s3://") else uri


def split_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InputError(f"{uri}: not an s3://bucket/key address")
    return parsed.netloc, parsed.path.lstrip("/")


# Object access with clear errors -----------------------------------------------------------------


def get_object(config: PluginConfig, bucket: str, key: str) -> bytes:
    """The bytes of one object; a missing or forbidden object is an InputError naming it."""
    try:
        return client(config).get_object(Bucket=bucket, Key=key)["Body"].read()
    except botocore.exceptions.ClientError as exc:
        raise InputError(_describe(bucket, key, exc)) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise InputError(f"s3://{bucket}/{key}: {exc}") from None


def list_keys(config: PluginConfig, bucket: str, prefix: str) -> Iterator[str]:
    try:
        for page in client(config).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]
    except botocore.exceptions.ClientError as exc:
        raise InputError(_describe(bucket, prefix, exc)) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise InputError(f"s3://{bucket}/{prefix}: {exc}") from None


def _describe(bucket: str, key: str, exc: botocore.exceptions.ClientError) -> str:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket":
        return f"s3://{bucket}: bucket not found"
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return f"s3://{bucket}/{key}: object not found"
    if code in ("AccessDenied", "403", "Forbidden") or status == 403:
        return f"s3://{bucket}/{key}: access denied (check the credentials and the bucket policy)"
    return f"s3://{bucket}/{key}: {code or status}: {exc}"


def _bucket(config: PluginConfig) -> str:
    return str(config.require("bucket"))


def _prefix(config: PluginConfig) -> str:
    prefix = str(config.get("prefix", "")).lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


# Parcels -----------------------------------------------------------------------------------------


@impl
def cbm_source_parcels(config: PluginConfig) -> gpd.GeoDataFrame:
    """Parcels from a file in the bucket (s3://...) or on disk, read by the local source plugin."""
    location = str(config.require("parcels"))
    keys = ("layer", "pid_column", "crop_code_column", "crop_name_column")
    options = {k: config.get(k) for k in keys if config.get(k) is not None}
    with tempfile.TemporaryDirectory(prefix="cbm-s3-parcels-") as folder:
        if location.startswith("s3://"):
            bucket, key = split_uri(location)
            path = Path(folder) / posixpath.basename(key)
            path.write_bytes(get_object(config, bucket, key))
        else:
            path = config.path("parcels")
        reader = PluginConfig("local", {"parcels": str(path), **options}, Path.cwd(), config.where)
        return load_plugins().caller("local", "cbm_source_parcels", config.where)(config=reader)


# Catalogue ---------------------------------------------------------------------------------------


@impl
def cbm_source_catalogue(config: PluginConfig) -> gpd.GeoDataFrame:
    mode = str(config.get("catalogue", "csv" if config.get("scenes") else "listing"))
    if mode == "listing":
        scenes = _listing_catalogue(config)
    elif mode == "csv":
        scenes = _csv_catalogue(config)
    elif mode == "stac":
        scenes = _stac_catalogue(config)
    else:
        raise ConfigError(f"{config.where}: catalogue = {mode!r}; expected listing, csv or stac")
    return catalogue_frame(scenes)


def _listing_catalogue(config: PluginConfig) -> list[dict[str, Any]]:
    bucket, prefix = _bucket(config), _prefix(config)
    folders: dict[str, dict[str, BandRef]] = {}
    for key in list_keys(config, bucket, prefix):
        folder, name = posixpath.split(key[len(prefix) :])
        if not folder or not name.lower().endswith(RASTER_SUFFIXES):
            continue
        band = name.rsplit(".", 1)[0]
        folders.setdefault(folder, {})[band] = BandRef(f"s3://{bucket}/{key}")
    scenes = []
    for folder, bands in sorted(folders.items()):
        obsid = posixpath.basename(folder)
        facts = _product_facts(obsid)
        if facts is None:
            raise InputError(
                f"s3://{bucket}/{prefix}{folder}: cannot tell date and sensor from the folder name; "
                'use catalogue = "csv" or "stac" for this layout'
            )
        scenes.append({"obsid": obsid, **facts, "bands": dict(sorted(bands.items())),
                       "geometry": _footprint(config, bands)})  # fmt: skip
    return scenes


def _product_facts(name: str) -> dict[str, Any] | None:
    """Date, sensor, card and orbit of a Sentinel product name, or None if it is not one."""
    if match := S2_NAME.match(name):
        card, sensor = "s2", f"Sentinel-2{match['unit']} MSI"
    elif match := S1_NAME.match(name):
        card, sensor = ("c6" if "COH" in name.upper() else "bs"), f"Sentinel-1{match['unit']} C-SAR"
    else:
        return None
    obstime = pd.Timestamp(f"{match['date']}T{match['time'] or '000000'}", tz="UTC")
    orbit = match.groupdict().get("orbit")
    return {"obstime": obstime, "sensor": sensor, "card": card, "orbit": orbit}


def _footprint(config: PluginConfig, bands: dict[str, BandRef]) -> shapely.Geometry:
    """A scene's footprint in WGS84 from the header of its first band file."""
    uri = next(iter(bands.values())).uri
    with gdal_env(config):
        try:
            bounds, crs = raster_footprint(vsi_path(uri))
        except InputError:
            raise InputError(_explain(config, uri)) from None
    box = gpd.GeoSeries([shapely.box(*bounds)], crs=CRS.from_user_input(crs) if crs else None)
    return box.to_crs("EPSG:4326").iloc[0] if crs else box.iloc[0]


def _csv_catalogue(config: PluginConfig) -> list[dict[str, Any]]:
    bucket = _bucket(config)
    key = _prefix(config) + str(config.require("scenes")).lstrip("/")
    try:
        rows = pd.read_csv(io.BytesIO(get_object(config, bucket, key)), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"s3://{bucket}/{key}: not a readable CSV catalogue ({exc})") from None
    where = f"s3://{bucket}/{key}"
    folder = posixpath.dirname(key)
    return scenes_from_band_rows(
        rows,
        where,
        lambda path: f"s3://{bucket}/{posixpath.normpath(posixpath.join(folder, path))}",
        lambda bands: _footprint(config, bands),
    )


def _stac_catalogue(config: PluginConfig) -> list[dict[str, Any]]:
    bucket, prefix = _bucket(config), _prefix(config)
    scenes = []
    for key in list_keys(config, bucket, prefix):
        if not key.endswith(".json"):
            continue
        where = f"s3://{bucket}/{key}"
        try:
            item = json.loads(get_object(config, bucket, key))
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc})") from None
        if item.get("type") != "Feature":
            continue  # a STAC catalog or collection file, not an item
        props = item.get("properties", {})
        bands = {}
        for name, asset in item.get("assets", {}).items():
            href = str(asset.get("href", ""))
            if not (href.lower().endswith(RASTER_SUFFIXES) or "tiff" in str(asset.get("type", ""))):
                continue
            info = (asset.get("raster:bands") or [{}])[0]
            bands[name] = BandRef(
                _resolve_href(bucket, key, href), info.get("nodata"), info.get("scale"), info.get("offset")
            )
        if not bands:
            raise InputError(f"{where}: item {item.get('id')} has no GeoTIFF assets")
        text = " ".join(
            str(props.get(k, "")) for k in ("cbm:card", "constellation", "platform", "sar:product_type")
        )
        scenes.append({
            "obsid": str(item["id"]),
            "obstime": pd.Timestamp(props["datetime"]).tz_convert("UTC"),
            "sensor": str(props.get("platform", "")),
            "card": card_of(f"{text} {item.get('collection', '')}", where),
            "orbit": props.get("sat:orbit_state") or _relative_orbit(props),
            "bands": bands,
            "geometry": shapely.geometry.shape(item["geometry"]) if item.get("geometry")
            else _footprint(config, bands),
        })  # fmt: skip
    return scenes


def _relative_orbit(props: dict[str, Any]) -> str | None:
    number = props.get("sat:relative_orbit")
    return None if number is None else f"R{int(number):03d}"


def _resolve_href(bucket: str, item_key: str, href: str) -> str:
    """An asset href as s3://: absolute s3 hrefs as they are, relative ones against the item's key."""
    if href.startswith("s3://"):
        return href
    if "://" in href:
        raise InputError(f"s3://{bucket}/{item_key}: asset {href} is not in S3; only s3:// or relative hrefs")
    return f"s3://{bucket}/{posixpath.normpath(posixpath.join(posixpath.dirname(item_key), href))}"


# Pixels ------------------------------------------------------------------------------------------


@impl
def cbm_source_read_window(
    config: PluginConfig, band: BandRef, bounds: tuple[float, float, float, float], crs: str
) -> RasterWindow:
    with gdal_env(config):
        try:
            return read_window(BandRef(vsi_path(band.uri), band.nodata, band.scale, band.offset), bounds, crs)
        except InputError:
            if not band.uri.startswith("s3://"):
                raise
            raise InputError(_explain(config, band.uri)) from None


def _explain(config: PluginConfig, uri: str) -> str:
    """Why GDAL could not read an object: ask S3 directly (missing, denied, or not a raster)."""
    bucket, key = split_uri(uri)
    try:
        client(config).head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        return _describe(bucket, key, exc)
    except botocore.exceptions.BotoCoreError as exc:
        return f"{uri}: {exc}"
    return f"{uri}: not a readable GeoTIFF"
