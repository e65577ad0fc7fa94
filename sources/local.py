"""Local files: parcels from GeoPackage/GeoParquet/Shapefile/GeoJSON, scenes from a catalogue CSV.

The catalogue CSV has one row per band file (as written by most download scripts):
product_id (or obsid), sensor and/or collection (or card), obstime, band, path (relative to the
CSV); optional columns: card, orbit_direction (or orbit), nodata, scale, offset, footprint (WKT).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import shapely
from pyproj import CRS, Transformer

from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import InputError
from cbm_core.model import BandRef, RasterWindow, validate_parcels
from sources._catalogue import catalogue_frame, scenes_from_band_rows
from sources._raster import raster_footprint, read_window

# The [source] options it reads (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(
    {"parcels", "layer", "pid_column", "crop_code_column", "crop_name_column", "parcel_code_column", "scenes"}
    | {"keep_columns", "campaign_year", "campaign_year_column"}
)

PARCEL_SUFFIXES = {".gpkg", ".parquet", ".geoparquet", ".shp", ".geojson", ".json", ".fgb"}


@impl
def cbm_source_parcels(
    config: PluginConfig, bbox: tuple[float, float, float, float] | None = None
) -> gpd.GeoDataFrame:
    return read_parcel_file(
        config.path("parcels"),
        layer=config.get("layer"),
        pid_column=config.get("pid_column", "pid"),
        crop_code_column=config.get("crop_code_column"),
        crop_name_column=config.get("crop_name_column"),
        bbox=bbox,
        parcel_code_column=config.get("parcel_code_column"),
        keep_columns=config.get("keep_columns", ()),
        campaign_year=config.get("campaign_year"),
        campaign_year_column=config.get("campaign_year_column"),
    )


@impl
def cbm_source_catalogue(config: PluginConfig) -> gpd.GeoDataFrame:
    return read_catalogue_csv(config.path("scenes"))


@impl
def cbm_source_read_window(
    config: PluginConfig, band: BandRef, bounds: tuple[float, float, float, float], crs: str
) -> RasterWindow:
    return read_window(band, bounds, crs)


def read_parcel_file(
    path: Path,
    layer: str | None = None,
    pid_column: str = "pid",
    crop_code_column: str | None = None,
    crop_name_column: str | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    parcel_code_column: str | None = None,
    keep_columns: Sequence[str] = (),
    campaign_year: int | None = None,
    campaign_year_column: str | None = None,
) -> gpd.GeoDataFrame:
    """Read a parcel file and map its columns onto the parcel model (pid, crop_code, crop_name).

    With parcel_code_column, the member state's own (often alphanumeric) parcel id is kept as an
    extra text column ``parcel_code`` (the REST API answers with it as the JRC text pid).

    keep_columns: further declared columns carried into verdicts and reports as they are.
    campaign_year (one year for the whole file) or campaign_year_column (a year per parcel) sets the
    ``campaign_year`` column, the year every "MM-DD" season window of a scheme falls in.

    With bbox (EPSG:4326), only the parcels whose extent meets it are kept (read through the file's
    spatial index; a GeoParquet file without a bbox column is read whole, then filtered).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"parcel file not found: {path}")
    if path.suffix.lower() not in PARCEL_SUFFIXES:
        raise InputError(
            f"{path}: unsupported parcel file type; use one of {', '.join(sorted(PARCEL_SUFFIXES))}"
        )
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            frame = _read_geoparquet(path, bbox)
        else:
            crs = pyogrio.read_info(path, layer=layer)["crs"] if bbox is not None else None
            frame = gpd.read_file(path, layer=layer, bbox=_bbox_in(bbox, crs))
    except Exception as exc:  # pyogrio/pyarrow raise many types for unreadable files
        raise InputError(f"{path}: cannot read parcels ({exc})") from None
    columns = {"pid": pid_column, "crop_code": crop_code_column, "crop_name": crop_name_column,
               "parcel_code": parcel_code_column, "campaign_year": campaign_year_column}  # fmt: skip
    if not isinstance(keep_columns, list | tuple) or not all(isinstance(c, str) for c in keep_columns):
        raise InputError(f"{path}: keep_columns must list column names, got {keep_columns!r}")
    columns |= {f"kept column {c}": c for c in keep_columns}
    for target, source in columns.items():
        if source is not None and source not in frame.columns:
            raise InputError(
                f"{path}: column '{source}' (for {target}) not found; columns are {', '.join(frame.columns)}"
            )
    for target, default in (("crop_code", "crop_code"), ("crop_name", "crop_name")):
        if columns[target] is None:
            columns[target] = default if default in frame.columns else None
    parcels = gpd.GeoDataFrame(
        {
            "pid": frame[pid_column],
            "crop_code": frame[columns["crop_code"]].astype("string") if columns["crop_code"] else "",
            "crop_name": frame[columns["crop_name"]].astype("string") if columns["crop_name"] else "",
        },
        geometry=frame.geometry.values,
        crs=frame.crs,
    )
    if parcel_code_column is not None:
        parcels.insert(3, "parcel_code", frame[parcel_code_column].astype("string").to_numpy())
    if campaign_year is not None and campaign_year_column is not None:
        raise InputError(f"{path}: give campaign_year or campaign_year_column, not both")
    if campaign_year is not None:
        if isinstance(campaign_year, bool) or not isinstance(campaign_year, int):
            raise InputError(f"{path}: campaign_year must be a year like 2019, got {campaign_year!r}")
        parcels["campaign_year"] = campaign_year
    elif campaign_year_column is not None:
        years = pd.to_numeric(frame[campaign_year_column], errors="coerce")
        bad = frame[campaign_year_column][years.isna() | (years % 1 != 0)]
        if len(bad):
            raise InputError(
                f"{path}: column {campaign_year_column} must hold years; bad value {bad.iloc[0]!r}"
            )
        parcels["campaign_year"] = years.astype("int64").to_numpy()
    for column in keep_columns:
        if column in parcels.columns or column == "geometry":
            raise InputError(f"{path}: keep_columns: '{column}' is already a parcel column")
        parcels[column] = frame[column].to_numpy()
    return validate_parcels(parcels, str(path))


def _bbox_in(
    bbox: tuple[float, float, float, float] | None, crs: str | dict | None
) -> tuple[float, float, float, float] | None:
    """A WGS84 box in a file's CRS, edges densified so it covers the whole box (None: no filter)."""
    if bbox is None or crs is None:
        return None  # a file without a CRS cannot be filtered safely: read it all
    target = CRS.from_user_input(crs)
    if target.equals(CRS.from_epsg(4326), ignore_axis_order=True):
        return tuple(bbox)
    return Transformer.from_crs("EPSG:4326", target, always_xy=True).transform_bounds(*bbox, densify_pts=21)


def _read_geoparquet(path: Path, bbox: tuple[float, float, float, float] | None) -> gpd.GeoDataFrame:
    """A GeoParquet file, filtered on its bbox covering column when it has one, else after reading."""
    if bbox is None:
        return gpd.read_parquet(path)
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    column = geo["columns"][geo["primary_column"]]
    box = _bbox_in(bbox, column.get("crs", "OGC:CRS84"))  # PROJJSON; a null crs is unknown
    if box is None:
        return gpd.read_parquet(path)
    if "covering" in column:
        return gpd.read_parquet(path, bbox=box)
    frame = gpd.read_parquet(path)
    return frame[frame.intersects(shapely.box(*box))]


def read_catalogue_csv(path: Path) -> gpd.GeoDataFrame:
    """Group a per-band-file catalogue CSV into one row per scene with its band -> BandRef map."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scene catalogue not found: {path}")
    try:
        rows = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV catalogue ({exc})") from None
    scenes = scenes_from_band_rows(rows, str(path), lambda p: str((path.parent / p).resolve()), _footprint)
    return catalogue_frame(scenes)


def _footprint(bands: dict[str, BandRef]) -> shapely.Geometry:
    """A scene's footprint in WGS84 from the header of its first band file."""
    bounds, crs = raster_footprint(next(iter(bands.values())).uri)
    box = gpd.GeoSeries([shapely.box(*bounds)], crs=CRS.from_user_input(crs) if crs else None)
    return box.to_crs("EPSG:4326").iloc[0] if crs else box.iloc[0]
