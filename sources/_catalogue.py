"""Scene catalogues: per-band-file rows (as download scripts write them) grouped into scenes.

Shared by the file-based sources (local folders, object storage), which differ only in how a
relative band path becomes a URI and how a footprint is found when the catalogue has none.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import geopandas as gpd
import pandas as pd
import shapely

from cbm_core.errors import InputError
from cbm_core.model import CARDS, CATALOGUE_COLUMNS, BandRef

REQUIRED = ("obsid", "obstime", "band", "path")


def card_of(text: str, where: str) -> str:
    """The CARD (s2 / bs / c6) named by a card, collection, platform or sensor text."""
    upper = text.upper()
    for card in CARDS:
        if re.search(rf"\b{card.upper()}\b", upper):
            return card
    if "COH" in upper:
        return "c6"
    if any(s in upper for s in ("SENTINEL2", "SENTINEL-2", "L2A", "MSI")):
        return "s2"
    if any(s in upper for s in ("SENTINEL1", "SENTINEL-1", "GRD", "SAR")):
        return "bs"
    raise InputError(f"{where}: cannot tell the card (s2/bs/c6) from {text.strip()!r}; add a card column")


def scenes_from_band_rows(
    rows: pd.DataFrame,
    where: str,
    uri: Callable[[str], str],
    footprint: Callable[[dict[str, BandRef]], shapely.Geometry],
) -> list[dict[str, Any]]:
    """One catalogue record per scene from rows of product_id/obsid, obstime, band, path (+ optional
    card, collection, sensor, orbit_direction/orbit, relative_orbit, nodata, scale, offset, footprint
    WKT). The orbit label is the direction, the relative orbit number, or both ("ASC_161")."""
    rename = {"product_id": "obsid", "orbit_direction": "orbit"}
    rows = rows.rename(
        columns={k: v for k, v in rename.items() if k in rows.columns and v not in rows.columns}
    )
    if "relative_orbit" in rows.columns:  # keep the track number: one S1 geometry per relative orbit
        number = rows["relative_orbit"].fillna("").astype(str).str.strip()
        if "orbit" in rows.columns:
            direction = rows["orbit"].fillna("").astype(str).str.strip()
            number = direction.where(number == "", direction.where(direction == "", direction + "_") + number)
        rows = rows.assign(orbit=number)
    missing = [c for c in REQUIRED if c not in rows.columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {', '.join(missing)}; found {', '.join(rows.columns)}")
    if not {"card", "collection", "sensor"} & set(rows.columns):
        raise InputError(f"{where}: needs a card, collection or sensor column to tell S2 from S1")
    obstime = pd.to_datetime(rows["obstime"], utc=True, errors="coerce", format="ISO8601")
    if obstime.isna().any():
        line = int(obstime.isna().to_numpy().nonzero()[0][0])
        raise InputError(
            f"{where}, line {line + 2}: column obstime: not a date/time: {rows['obstime'].iloc[line]!r}"
        )
    rows = rows.assign(obstime=obstime)
    scenes = []
    for obsid, group in rows.groupby("obsid", sort=False):
        first = group.iloc[0]
        bands: dict[str, BandRef] = {}
        for _, row in group.iterrows():
            if row["band"] in bands:
                raise InputError(f"{where}: scene {obsid} lists band {row['band']} twice")
            numbers = (_number(row, column, where) for column in ("nodata", "scale", "offset"))
            bands[row["band"]] = BandRef(uri(row["path"]), *numbers)
        text = " ".join(str(first.get(c, "")) for c in ("card", "collection", "sensor"))
        wkt = str(first.get("footprint", "")).strip()
        scenes.append(
            {
                "obsid": str(obsid),
                "obstime": first["obstime"],
                "sensor": first.get("sensor", ""),
                "card": card_of(text, f"{where}: scene {obsid}"),
                "orbit": first.get("orbit") or None,
                "bands": bands,
                "geometry": shapely.from_wkt(wkt) if wkt else footprint(bands),
            }
        )
    return scenes


def catalogue_frame(scenes: list[dict[str, Any]]) -> gpd.GeoDataFrame:
    """The catalogue table: one row per scene, footprints in WGS84, sorted by time."""
    frame = pd.DataFrame(scenes, columns=list(CATALOGUE_COLUMNS))
    catalogue = gpd.GeoDataFrame(frame, geometry="geometry", crs="EPSG:4326")
    return catalogue.sort_values(["obstime", "obsid"], ignore_index=True)


def _number(row: pd.Series, column: str, where: str) -> float | None:
    text = str(row.get(column, "")).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(
            f"{where}: scene {row['obsid']} band {row['band']}: {column} {text!r} is not a number"
        ) from None
