"""Local files: parcels from GeoPackage/GeoParquet/Shapefile/GeoJSON, scenes from a catalogue CSV.

The catalogue CSV has one row per band file (as written by most download scripts):
product_id (or obsid), sensor and/or collection (or card), obstime, band, path (relative to the
CSV); optional columns: card, orbit_direction (or orbit), nodata, scale, offset, footprint (WKT).
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pandas as pd
import shapely
from pyproj import CRS

from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import InputError
from cbm_core.model import BandRef, RasterWindow, validate_parcels
from cbm_core.raster import raster_footprint, read_window

PARCEL_SUFFIXES = {".gpkg", ".parquet", ".geoparquet", ".shp", ".geojson", ".json", ".fgb"}


@impl
def cbm_source_parcels(config: PluginConfig) -> gpd.GeoDataFrame:
    return read_parcel_file(
        config.path("parcels"),
        layer=config.get("layer"),
        pid_column=config.get("pid_column", "pid"),
        crop_code_column=config.get("crop_code_column"),
        crop_name_column=config.get("crop_name_column"),
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
) -> gpd.GeoDataFrame:
    """Read a parcel file and map its columns onto the parcel model (pid, crop_code, crop_name)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"parcel file not found: {path}")
    if path.suffix.lower() not in PARCEL_SUFFIXES:
        raise InputError(
            f"{path}: unsupported parcel file type; use one of {', '.join(sorted(PARCEL_SUFFIXES))}"
        )
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            frame = gpd.read_parquet(path)
        else:
            frame = gpd.read_file(path, layer=layer)
    except Exception as exc:  # pyogrio/pyarrow raise many types for unreadable files
        raise InputError(f"{path}: cannot read parcels ({exc})") from None
    columns = {"pid": pid_column, "crop_code": crop_code_column, "crop_name": crop_name_column}
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
    return validate_parcels(parcels, str(path))


def read_catalogue_csv(path: Path) -> gpd.GeoDataFrame:
    """Group a per-band-file catalogue CSV into one row per scene with its band -> BandRef map."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scene catalogue not found: {path}")
    try:
        rows = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV catalogue ({exc})") from None
    rename = {"product_id": "obsid", "orbit_direction": "orbit"}
    rows = rows.rename(
        columns={k: v for k, v in rename.items() if k in rows.columns and v not in rows.columns}
    )
    missing = [c for c in ("obsid", "obstime", "band", "path") if c not in rows.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(rows.columns)}")
    if not {"card", "collection", "sensor"} & set(rows.columns):
        raise InputError(f"{path}: needs a card, collection or sensor column to tell S2 from S1")
    obstime = pd.to_datetime(rows["obstime"], utc=True, errors="coerce")
    if obstime.isna().any():
        line = int(obstime.isna().to_numpy().nonzero()[0][0]) + 2
        raise InputError(
            f"{path}, line {line}: column obstime: not a date/time: {rows['obstime'].iloc[line - 2]!r}"
        )
    rows = rows.assign(obstime=obstime)
    scenes = []
    for obsid, group in rows.groupby("obsid", sort=False):
        first = group.iloc[0]
        bands = {}
        for _, row in group.iterrows():
            if row["band"] in bands:
                raise InputError(f"{path}: scene {obsid} lists band {row['band']} twice")
            bands[row["band"]] = BandRef(
                uri=str((path.parent / row["path"]).resolve()),
                nodata=_number(row, "nodata", path),
                scale=_number(row, "scale", path),
                offset=_number(row, "offset", path),
            )
        scenes.append(
            {
                "obsid": str(obsid),
                "obstime": first["obstime"],
                "sensor": first.get("sensor", ""),
                "card": _card(first, path),
                "orbit": first.get("orbit") or None,
                "bands": bands,
                "geometry": _footprint(first, bands),
            }
        )
    catalogue = gpd.GeoDataFrame(scenes, geometry="geometry", crs="EPSG:4326")
    return catalogue.sort_values(["obstime", "obsid"], ignore_index=True)


def _number(row: pd.Series, column: str, path: Path) -> float | None:
    text = str(row.get(column, "")).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(
            f"{path}: scene {row['obsid']} band {row['band']}: {column} {text!r} is not a number"
        ) from None


def _card(row: pd.Series, path: Path) -> str:
    """CARD type of a scene: given, or told from the collection/sensor name."""
    if str(row.get("card", "")).strip():
        return str(row["card"]).strip().lower()
    text = f"{row.get('collection', '')} {row.get('sensor', '')}".upper()
    if "COH" in text:
        return "c6"
    if "SENTINEL2" in text or "SENTINEL-2" in text or "L2A" in text or "MSI" in text:
        return "s2"
    if "SENTINEL1" in text or "SENTINEL-1" in text or "GRD" in text or "SAR" in text:
        return "bs"
    raise InputError(f"{path}: scene {row['obsid']}: cannot tell the card (s2/bs/c6); add a card column")


def _footprint(row: pd.Series, bands: dict[str, BandRef]) -> shapely.Geometry:
    """The scene footprint in WGS84: from a WKT column, else the bounds of its first band file."""
    wkt = str(row.get("footprint", "")).strip()
    if wkt:
        return shapely.from_wkt(wkt)
    bounds, crs = raster_footprint(next(iter(bands.values())).uri)
    box = gpd.GeoSeries([shapely.box(*bounds)], crs=CRS.from_user_input(crs) if crs else None)
    return box.to_crs("EPSG:4326").iloc[0] if crs else box.iloc[0]
