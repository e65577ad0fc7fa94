"""Sentinel-2 L2A SAFE products: folders, .zip files or S3 prefixes in the CDSE ``eodata`` layout.

Where the products are (option ``root``, a folder or ``s3://bucket/prefix``):

* the CDSE layout ``Sentinel-2/MSI/L2A/YYYY/MM/DD/<product>.SAFE/`` under the root (or the root
  being that ``Sentinel-2/MSI/L2A`` folder itself): only the day folders between ``start`` and
  ``end`` are listed, so a date range over the whole archive costs one listing per day;
* ``<product>.SAFE`` folders or ``<product>.zip`` / ``<product>.SAFE.zip`` files directly in the root;
* the root naming one product (a .SAFE folder or a .zip).

Scenes are chosen by ``start`` / ``end`` (dates, end day included), ``tiles`` (MGRS ids such as
``"31UFS"``) and ``max_cloud_cover`` (percent, from Cloud_Coverage_Assessment). Everything else
comes from the product's own metadata, never from assumptions:

* MTD_MSIL2A.xml: the band files (IMAGE_FILE; each band at its finest resolution), the
  PROCESSING_BASELINE, BOA_ADD_OFFSET per band_id (physicalBand names from Spectral_Information),
  BOA/AOT/WVP_QUANTIFICATION_VALUE and the NODATA special value;
* MTD_TL.xml: the tile CRS (HORIZONTAL_CS_CODE), SENSING_TIME and the tile grid (Geoposition, Size),
  which gives the footprint without opening a band.

Each band's BandRef carries the calibration: physical = (DN + BOA_ADD_OFFSET) / QUANTIFICATION,
i.e. scale = 1 / quantification and offset = BOA_ADD_OFFSET / quantification. Baselines before
04.00 have no offset (0); a baseline >= 04.00 product without offsets, a missing band file or a
JP2 GDAL cannot decode fails that scene only, named in the run summary (see sources._archive).

JPEG2000 bands are read through GDAL's JP2OpenJPEG driver by window (only the code-blocks that
cover the window are decoded); zipped products through /vsizip/, S3 through /vsis3/ with the
connection options of the ``s3`` source (endpoint_url, region, path_style, access_key_id,
secret_access_key, session_token, anonymous, retries, timeout, gdal). On CDSE: endpoint_url =
"https://eodata.dataspace.copernicus.eu", root = "s3://eodata", and S3 keys from the CDSE dashboard.
``parcels`` (a file, local or ``s3://``) is read by the local source plugin.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import re
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import geopandas as gpd
import pandas as pd
import rasterio
import shapely
from pyproj import CRS

import sources.s3 as s3
from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError, InputError
from cbm_core.model import BandRef, RasterWindow
from sources._archive import date_option, names_list, problem_band, raise_if_problem
from sources._catalogue import catalogue_frame
from sources._raster import read_window

# The [source] options it reads (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset({
    "root", "start", "end", "tiles", "max_cloud_cover", "parcels", "layer", "pid_column",
    "crop_code_column", "crop_name_column", "endpoint_url", "region", "path_style", "access_key_id",
    "secret_access_key", "session_token", "anonymous", "retries", "timeout", "gdal",
})  # fmt: skip
EODATA_L2A = "Sentinel-2/MSI/L2A"
PRODUCT = re.compile(
    r"^S2(?P<unit>[A-D])_MSIL2A_(?P<date>\d{8})T(?P<time>\d{6})_N(?P<baseline>\d{4})_R(?P<orbit>\d{3})"
    r"_T(?P<tile>\d{2}[A-Z]{3})_\d{8}T\d{6}(?:\.SAFE)?(?:\.zip)?$"
)
IMAGE_NAME = re.compile(r"_(?P<band>B\d{2}|B8A|AOT|WVP|SCL|TCI)_(?P<res>\d+)m$")
# Band order of band_id in the metadata, used when Spectral_Information does not name them.
BAND_IDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
OFFSET_BASELINE = (4, 0)  # from processing baseline 04.00 on, L2A DNs carry BOA_ADD_OFFSET
L2A_NODATA = 0.0  # the NODATA special value of every L2A product so far
SKIPPED_IMAGES = ("TCI",)  # true-colour previews are not measurements
# GDAL's multi-threaded JPEG2000 decoding logs a corrupt code-stream but returns the pixels as
# read (zeros): one decoding thread per read makes it fail instead. Scenes give the parallelism.
JP2_DECODE = {"GDAL_NUM_THREADS": "1"}
METADATA_THREADS = 8  # products whose metadata is read at once (S3 round trips overlap)
WORLD = shapely.box(-180.0, -90.0, 180.0, 90.0)


# Options ------------------------------------------------------------------------------------------


def _check_options(config: PluginConfig) -> None:
    unknown = sorted(set(config.options) - CBM_OPTIONS - {"plugin", "name"})
    if unknown:
        raise ConfigError(
            f"{config.where}: unknown option(s) {', '.join(unknown)} for plugin 'safe'; "
            f"expected {', '.join(sorted(CBM_OPTIONS))}"
        )


def _root(config: PluginConfig) -> str:
    value = str(config.require("root"))
    return value.rstrip("/") if value.startswith("s3://") else str(config.path("root"))


# Product storage: one interface over local folders, local zips, S3 prefixes and S3 zips -------------


class Product:
    """One SAFE product wherever it lives: read its small files, name its band files for GDAL."""

    name: str  # e.g. S2A_MSIL2A_20230402T104621_N0509_R051_T31UFS_20230402T170010

    def read(self, relative: str) -> bytes:
        raise NotImplementedError

    def exists(self, relative: str) -> bool:
        raise NotImplementedError

    def gdal_path(self, relative: str) -> str:
        raise NotImplementedError

    def where(self, relative: str = "") -> str:
        raise NotImplementedError


@dataclass
class FolderProduct(Product):
    path: Path

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.path.name.removesuffix(".SAFE")

    def read(self, relative: str) -> bytes:
        try:
            return (self.path / relative).read_bytes()
        except OSError as exc:
            raise InputError(f"{self.path / relative}: cannot read ({exc.strerror})") from None

    def exists(self, relative: str) -> bool:
        return (self.path / relative).is_file()

    def gdal_path(self, relative: str) -> str:
        return str(self.path / relative)

    def where(self, relative: str = "") -> str:
        return str(self.path / relative) if relative else str(self.path)


@dataclass
class ZipProduct(Product):
    location: str  # a local path or s3://bucket/key of the .zip
    archive: zipfile.ZipFile
    top: str  # the product folder inside the zip ("<name>.SAFE/")

    @property
    def name(self) -> str:  # type: ignore[override]
        return posixpath.basename(self.top.rstrip("/")).removesuffix(".SAFE")

    def read(self, relative: str) -> bytes:
        try:
            return self.archive.read(self.top + relative)
        except KeyError:
            raise InputError(f"{self.where(relative)}: not in the zip") from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"{self.where(relative)}: cannot read ({exc})") from None

    def exists(self, relative: str) -> bool:
        try:
            self.archive.getinfo(self.top + relative)
        except KeyError:
            return False
        return True

    def gdal_path(self, relative: str) -> str:
        return f"/vsizip/{s3.vsi_path(self.location)}/{self.top}{relative}"

    def where(self, relative: str = "") -> str:
        return f"{self.location}!/{self.top}{relative}" if relative else self.location


@dataclass
class S3Product(Product):
    config: PluginConfig
    bucket: str
    prefix: str  # ".../<name>.SAFE/"
    _keys: set[str] | None = None  # listed on first use, in the thread that reads this product

    @property
    def name(self) -> str:  # type: ignore[override]
        return posixpath.basename(self.prefix.rstrip("/")).removesuffix(".SAFE")

    def read(self, relative: str) -> bytes:
        return s3.get_object(self.config, self.bucket, self.prefix + relative)

    def exists(self, relative: str) -> bool:
        if self._keys is None:
            self._keys = set(s3.list_keys(self.config, self.bucket, self.prefix))
        return self.prefix + relative in self._keys

    def gdal_path(self, relative: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{relative}"

    def where(self, relative: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{relative}"


class S3Object(io.RawIOBase):
    """A read-only, seekable view of one S3 object by range requests, so zipfile can read a zipped
    product's directory and metadata without downloading its JPEG2000 bands."""

    def __init__(self, config: PluginConfig, bucket: str, key: str) -> None:
        self.config, self.bucket, self.key, self.position = config, bucket, key, 0
        try:
            self.size = int(s3.client(config).head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as exc:  # botocore errors: name the object
            raise InputError(f"s3://{bucket}/{key}: cannot open ({exc})") from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        if self.position >= self.size or not len(buffer):
            return 0
        last = min(self.size, self.position + len(buffer)) - 1
        body = (
            s3.client(self.config)
            .get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.position}-{last}")["Body"]
            .read()
        )
        buffer[: len(body)] = body
        self.position += len(body)
        return len(body)


def _open_zip(location: str, opener: Callable[[], Any]) -> ZipProduct:
    try:
        archive = zipfile.ZipFile(opener())
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{location}: not a readable zip ({exc})") from None
    tops = sorted(
        {n.split("/", 1)[0] + "/" for n in archive.namelist() if n.split("/", 1)[0].endswith(".SAFE")}
    )
    if not tops:
        raise InputError(f"{location}: no <product>.SAFE folder in the zip")
    return ZipProduct(location, archive, tops[0])


# Finding products -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    start: pd.Timestamp | None
    end: pd.Timestamp | None
    tiles: frozenset[str]
    max_cloud_cover: float | None

    def wants_name(self, name: str) -> bool:
        """Cheap pre-filter on the product name (date, tile) before any metadata is read."""
        match = PRODUCT.match(name)
        if match is None:
            return False
        if self.tiles and match["tile"] not in self.tiles:
            return False
        day = pd.Timestamp(match["date"], tz="UTC")
        if self.start is not None and day + pd.Timedelta(days=1) <= self.start:
            return False
        return not (self.end is not None and day > self.end)

    def days(self) -> list[pd.Timestamp]:
        return list(pd.date_range(self.start.normalize(), self.end.normalize(), freq="D"))


def _selection(config: PluginConfig) -> Selection:
    where = f"{config.where} (plugin 'safe')"
    tiles = [t.upper().removeprefix("T") for t in names_list(config.get("tiles"), "tiles", where)]
    cloud = config.get("max_cloud_cover")
    if cloud is not None and (isinstance(cloud, bool) or not isinstance(cloud, int | float)):
        raise ConfigError(f"{where}: option 'max_cloud_cover' must be a percentage, got {cloud!r}")
    start = date_option(config.get("start"), "start", where)
    end = date_option(config.get("end"), "end", where, end=True)
    if start is not None and end is not None and end < start:
        raise ConfigError(f"{where}: end {config.get('end')} is before start {config.get('start')}")
    return Selection(start, end, frozenset(tiles), None if cloud is None else float(cloud))


def _is_product_name(name: str) -> bool:
    return name.endswith((".SAFE", ".zip")) and PRODUCT.match(name) is not None


def _local_products(root: Path, selection: Selection) -> Iterator[Product]:
    if _is_product_name(root.name):
        yield from _local_product(root)
        return
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    base = root / EODATA_L2A if (root / EODATA_L2A).is_dir() else root
    if selection.start is not None and selection.end is not None:
        folders = [base / f"{d:%Y/%m/%d}" for d in selection.days()]
    else:
        folders = sorted(p for p in base.glob("[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]") if p.is_dir())
    for folder in [root, *folders]:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if _is_product_name(path.name) and selection.wants_name(path.name):
                yield from _local_product(path)


def _local_product(path: Path) -> Iterator[Product]:
    if path.suffix == ".zip":
        yield _open_zip(str(path), lambda: open(path, "rb"))  # noqa: SIM115 (the zip keeps it open)
    elif path.is_dir():
        yield FolderProduct(path)


def _s3_products(config: PluginConfig, root: str, selection: Selection) -> Iterator[Product]:
    bucket, prefix = s3.split_uri(root + "/") if "/" in root[5:] else (root[5:], "")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    name = posixpath.basename(prefix.rstrip("/"))
    if _is_product_name(name):
        candidates = [prefix.rstrip("/")]
    else:
        base = prefix if prefix.rstrip("/").endswith(EODATA_L2A) else None
        if base is None and _has_prefix(config, bucket, prefix + EODATA_L2A + "/"):
            base = prefix + EODATA_L2A + "/"
        candidates = list(_children(config, bucket, prefix))
        if base is not None:
            if selection.start is None or selection.end is None:
                raise ConfigError(
                    f"{config.where}: {root} is an eodata archive; give start and end so only "
                    "those days are listed"
                )
            for day in selection.days():
                candidates += _children(config, bucket, f"{base}{day:%Y/%m/%d}/")
    for key in candidates:
        name = posixpath.basename(key.rstrip("/"))
        if not (_is_product_name(name) and selection.wants_name(name)):
            continue
        if name.endswith(".zip"):
            yield _open_zip(f"s3://{bucket}/{key}", lambda key=key: S3Object(config, bucket, key))
        else:
            folder = key.rstrip("/") + "/"
            yield S3Product(config, bucket, folder)


def _children(config: PluginConfig, bucket: str, prefix: str) -> Iterator[str]:
    """Immediate children of a prefix (sub-prefixes and objects), one listing with a delimiter."""
    paginator = s3.client(config).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                yield common["Prefix"]
            for item in page.get("Contents", []):
                yield item["Key"]
    except Exception as exc:  # botocore errors: one line naming the prefix
        raise InputError(f"s3://{bucket}/{prefix}: cannot list ({exc})") from None


def _has_prefix(config: PluginConfig, bucket: str, prefix: str) -> bool:
    return next(_children(config, bucket, prefix), None) is not None


# Metadata ---------------------------------------------------------------------------------------


def _xml(product: Product, relative: str) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(product.read(relative))
    except ElementTree.ParseError as exc:
        raise InputError(f"{product.where(relative)}: not valid XML ({exc})") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _all(root: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    """Elements by local name anywhere below root: the PSD versions differ in namespaces."""
    return [e for e in root.iter() if _local(e.tag) == name]


def _text(root: ElementTree.Element, *names: str) -> str | None:
    for name in names:
        for element in _all(root, name):
            if element.text and element.text.strip():
                return element.text.strip()
    return None


def _number(root: ElementTree.Element, where: str, *names: str) -> float | None:
    text = _text(root, *names)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{where}: {names[0]} {text!r} is not a number") from None


def _baseline(text: str | None, name_baseline: str) -> tuple[int, int]:
    """The processing baseline as (major, minor), from the metadata or else the product name."""
    if text and re.fullmatch(r"\d{1,2}\.\d{1,2}", text):
        major, minor = text.split(".")
        return int(major), int(minor)
    return int(name_baseline[:2]), int(name_baseline[2:])


def _band_names(root: ElementTree.Element) -> dict[int, str]:
    """band_id -> B01... from Spectral_Information (physicalBand "B1" -> "B01"), else the fixed order."""
    names = dict(enumerate(BAND_IDS))
    for info in _all(root, "Spectral_Information"):
        band_id, physical = info.get("bandId"), info.get("physicalBand")
        if band_id is not None and physical:
            digits = physical[1:]
            names[int(band_id)] = physical if not digits.isdigit() else f"B{int(digits):02d}"
    return names


def _scene(product: Product, selection: Selection) -> dict[str, Any] | None:
    """The catalogue record of one product, or None when the selection excludes it.

    Problems that only touch the pixels (missing band file, missing offsets) become problem
    bands; a product whose metadata cannot even be parsed raises, and the caller records it.
    """
    match = PRODUCT.match(product.name)
    top = _xml(product, "MTD_MSIL2A.xml")
    where = product.where("MTD_MSIL2A.xml")
    cloud = _number(top, where, "Cloud_Coverage_Assessment")
    if selection.max_cloud_cover is not None and cloud is not None and cloud > selection.max_cloud_cover:
        return None
    files = [e.text.strip() for e in _all(top, "IMAGE_FILE") if e.text and e.text.strip()]
    if not files:
        raise InputError(f"{where}: no IMAGE_FILE entries (not an L2A product?)")
    granule = files[0].split("/IMG_DATA/")[0]
    tile_xml = _xml(product, f"{granule}/MTD_TL.xml")
    tile_where = product.where(f"{granule}/MTD_TL.xml")
    sensing = _text(tile_xml, "SENSING_TIME")
    crs_code = _text(tile_xml, "HORIZONTAL_CS_CODE")
    if sensing is None or crs_code is None:
        missing = "SENSING_TIME" if sensing is None else "HORIZONTAL_CS_CODE"
        raise InputError(f"{tile_where}: no {missing}")
    obstime = pd.Timestamp(sensing)
    obstime = obstime.tz_localize("UTC") if obstime.tzinfo is None else obstime.tz_convert("UTC")
    if (selection.start is not None and obstime < selection.start) or (
        selection.end is not None and obstime > selection.end
    ):
        return None

    baseline = _baseline(_text(top, "PROCESSING_BASELINE"), match["baseline"] if match else "0000")
    boa_q = _number(top, where, "BOA_QUANTIFICATION_VALUE", "L2A_BOA_QUANTIFICATION_VALUE")
    aot_q = _number(top, where, "AOT_QUANTIFICATION_VALUE", "L2A_AOT_QUANTIFICATION_VALUE")
    wvp_q = _number(top, where, "WVP_QUANTIFICATION_VALUE", "L2A_WVP_QUANTIFICATION_VALUE")
    names = _band_names(top)
    offsets: dict[str, float] = {}
    for element in _all(top, "BOA_ADD_OFFSET"):
        try:
            offsets[names[int(element.get("band_id", ""))]] = float((element.text or "").strip())
        except (ValueError, KeyError):
            raise InputError(
                f"{where}: BOA_ADD_OFFSET band_id={element.get('band_id')!r} = {element.text!r} is not valid"
            ) from None
    nodata = L2A_NODATA
    for special in _all(top, "Special_Values"):
        if _text(special, "SPECIAL_VALUE_TEXT") == "NODATA":
            nodata = float(_text(special, "SPECIAL_VALUE_INDEX") or L2A_NODATA)

    finest: dict[str, tuple[int, str]] = {}
    for relative in files:
        image = IMAGE_NAME.search(relative)
        if image is None or image["band"] in SKIPPED_IMAGES:
            continue
        resolution = int(image["res"])
        if image["band"] not in finest or resolution < finest[image["band"]][0]:
            finest[image["band"]] = (resolution, relative)

    bands: dict[str, BandRef] = {}
    for band, (_, relative) in sorted(finest.items()):
        path = relative if relative.endswith(".jp2") else relative + ".jp2"
        if not product.exists(path):
            bands[band] = problem_band(
                f"{product.where(path)}: band {band} listed in MTD_MSIL2A.xml is missing"
            )
            continue
        uri = product.gdal_path(path)
        if band == "SCL":
            bands[band] = BandRef(uri, nodata, 1.0, 0.0)
        elif band in ("AOT", "WVP"):
            quantification = aot_q if band == "AOT" else wvp_q
            if quantification is None:
                bands[band] = problem_band(f"{where}: no {band}_QUANTIFICATION_VALUE for band {band}")
            else:
                bands[band] = BandRef(uri, nodata, 1.0 / quantification, 0.0)
        elif boa_q is None:
            bands[band] = problem_band(f"{where}: no BOA_QUANTIFICATION_VALUE for band {band}")
        elif band not in offsets and baseline >= OFFSET_BASELINE:
            bands[band] = problem_band(
                f"{where}: processing baseline {baseline[0]:02d}.{baseline[1]:02d} but no BOA_ADD_OFFSET "
                f"for band {band}; the reflectances cannot be calibrated"
            )
        else:
            bands[band] = BandRef(uri, nodata, 1.0 / boa_q, offsets.get(band, 0.0) / boa_q)

    crs = CRS.from_user_input(crs_code)
    bounds = _tile_bounds(tile_xml, tile_where)
    footprint = gpd.GeoSeries([shapely.box(*bounds)], crs=crs).to_crs("EPSG:4326").iloc[0]
    unit = match["unit"] if match else (_text(top, "SPACECRAFT_NAME") or "Sentinel-2?")[-1]
    return {
        "obsid": product.name,
        "obstime": obstime,
        "sensor": _text(top, "SPACECRAFT_NAME") or f"Sentinel-2{unit}",
        "card": "s2",
        "orbit": f"R{match['orbit']}" if match else None,
        "bands": bands,
        "geometry": footprint,
    }


def _tile_bounds(tile_xml: ElementTree.Element, where: str) -> tuple[float, float, float, float]:
    """The tile's bounds in its CRS from the finest Geoposition and the Size at that resolution."""
    positions = {int(e.get("resolution", "0")): e for e in _all(tile_xml, "Geoposition")}
    sizes = {int(e.get("resolution", "0")): e for e in _all(tile_xml, "Size")}
    common = sorted(set(positions) & set(sizes))
    if not common:
        raise InputError(f"{where}: no Geoposition/Size pair to place the tile")
    resolution = common[0]
    try:
        ulx = float(_text(positions[resolution], "ULX") or "")
        uly = float(_text(positions[resolution], "ULY") or "")
        xdim = float(_text(positions[resolution], "XDIM") or resolution)
        ydim = float(_text(positions[resolution], "YDIM") or -resolution)
        nrows = int(_text(sizes[resolution], "NROWS") or "")
        ncols = int(_text(sizes[resolution], "NCOLS") or "")
    except ValueError:
        raise InputError(f"{where}: Geoposition/Size at {resolution} m is incomplete") from None
    xs, ys = (ulx, ulx + xdim * ncols), (uly, uly + ydim * nrows)
    return min(xs), min(ys), max(xs), max(ys)


# Hooks ------------------------------------------------------------------------------------------


@impl
def cbm_source_catalogue(config: PluginConfig) -> gpd.GeoDataFrame:
    """Scenes of the SAFE products under root that match start/end, tiles and max_cloud_cover.

    A product whose metadata cannot be read is still listed, every band a problem band naming the
    file, so the run summary shows it against the scene while the other scenes are extracted.
    """
    _check_options(config)
    selection = _selection(config)
    root = _root(config)
    found = (
        _s3_products(config, root, selection)
        if root.startswith("s3://")
        else _local_products(Path(root), selection)
    )

    def record(product: Product) -> dict[str, Any] | None:
        try:
            return _scene(product, selection)
        except InputError as exc:
            return _broken_scene(product, str(exc))

    # Each product costs a listing and two small reads: on object storage that is latency, so
    # several products are read at once.
    with ThreadPoolExecutor(max_workers=METADATA_THREADS) as pool:
        scenes = [scene for scene in pool.map(record, found) if scene is not None]
    return catalogue_frame(scenes)


def _broken_scene(product: Product, reason: str) -> dict[str, Any] | None:
    """A product with unreadable metadata: kept (by its name) so the failure is reported."""
    match = PRODUCT.match(product.name)
    if match is None:
        return None
    bands = dict.fromkeys((*BAND_IDS, "SCL", "AOT", "WVP"), problem_band(reason))
    return {
        "obsid": product.name,
        "obstime": pd.Timestamp(f"{match['date']}T{match['time']}", tz="UTC"),
        "sensor": f"Sentinel-2{match['unit']}",
        "card": "s2",
        "orbit": f"R{match['orbit']}",
        "bands": bands,
        "geometry": WORLD,  # footprint unknown: every parcel is a target, so the read reports it
    }


@impl
def cbm_source_parcels(
    config: PluginConfig, bbox: tuple[float, float, float, float] | None = None
) -> gpd.GeoDataFrame:
    """Parcels from a file (local or s3://), read like the s3 source does."""
    _check_options(config)
    return s3.cbm_source_parcels(config=config)


@impl
def cbm_source_read_window(
    config: PluginConfig, band: BandRef, bounds: tuple[float, float, float, float], crs: str
) -> RasterWindow:
    """A window of one band (JPEG2000 through GDAL), only the code-blocks covering it decoded."""
    raise_if_problem(band)
    remote = "/vsis3/" in s3.vsi_path(band.uri)
    try:
        with s3.gdal_env(config) if remote else contextlib.nullcontext(), rasterio.Env(**JP2_DECODE):
            return read_window(
                BandRef(s3.vsi_path(band.uri), band.nodata, band.scale, band.offset), bounds, crs
            )
    except InputError as exc:
        if not remote and not band.uri.startswith("/vsi") and not Path(band.uri).is_file():
            raise InputError(f"{band.uri}: band file missing") from None
        raise InputError(f"{band.uri}: cannot decode ({str(exc).split(': ', 1)[-1]})") from None
