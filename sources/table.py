"""Ready-made signatures from a tidy table: the source `cbm score` reads.

Analysts often already have per-parcel statistics (JRC database exports, openEO or WorldCereal
extractions). This source turns a tidy Parquet/CSV table (pid, obstime, card, band, count, mean,
std, min, max, p25, p50, p75, optional obsid, orbit and hist_0..hist_11 SCL counts) into the
TimeSeries markers see, through the ``cbm_source_signatures`` hook.

Options: ``signatures`` (the table, required), ``parcels`` (declared parcels file; default the
pids of the table, undeclared), ``scale`` ('reflectance', 'dn' or a factor) and ``offset``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import InputError
from cbm_core.model import CARDS, HIST_COLUMNS, STATS, TimeSeries, int64_ids, validate_parcels
from sources.local import read_parcel_file

CBM_OPTIONS = frozenset({"signatures", "parcels", "scale", "offset"})  # the options it reads

REQUIRED = ("pid", "obstime", "card", "band", "mean")
REFLECTANCE_STATS = ("mean", "min", "max", "p25", "p50", "p75")
SCALES = {"reflectance": 1.0, "dn": 1e-4}


def reflectance_scale(scale: str | float) -> float:
    """The factor turning stored S2 values into reflectance: 'reflectance' (1), 'dn' (1e-4) or a number."""
    if isinstance(scale, int | float):
        return float(scale)
    text = str(scale).strip().lower()
    if text in SCALES:
        return SCALES[text]
    try:
        return float(text)
    except ValueError:
        raise InputError(f"scale must be 'reflectance', 'dn' or a number, not {scale!r}") from None


def read_table(path: Path) -> pd.DataFrame:
    """A Parquet or CSV signature table."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"signatures file not found: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq", ".geoparquet"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable Parquet/CSV signature table ({exc})") from None


def _refuse_duplicates(frame: pd.DataFrame, what: str) -> None:
    """Refuse two different rows for one parcel, observation and band (which would the markers take?).

    Repeated identical rows are harmless and dropped (in place)."""
    key = ["pid", "obsid", "band"]
    if not frame.duplicated(key).any():
        return
    frame.drop_duplicates(inplace=True, ignore_index=True)
    clash = frame.duplicated(key, keep=False)
    if clash.any():
        row = frame[clash].iloc[0]
        raise InputError(
            f"{what}: parcel {row['pid']} has band {row['band']} twice for observation {row['obsid']} "
            f"({row['obstime']:%Y-%m-%d}) with different values; give one row per parcel, observation and "
            "band (an obsid or orbit column tells two acquisitions of one day apart)"
        )


def signatures_series(
    table: pd.DataFrame,
    parcels: gpd.GeoDataFrame | None = None,
    scale: str | float = "reflectance",
    offset: float = 0.0,
    what: str = "signatures",
) -> TimeSeries:
    """A tidy signature table as a TimeSeries.

    ``scale``/``offset`` convert S2 reflectance bands: reflectance = value * scale + offset
    (e.g. 'dn' with offset -0.1 for L2A processing baseline >= 04.00 DN). Missing obsids are made
    from card, date and orbit; missing stats columns from the mean (count 1, std 0).
    """
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise InputError(
            f"{what}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, table.columns))}"
        )
    frame = table.copy()
    frame["obstime"] = pd.to_datetime(frame["obstime"], utc=True, errors="coerce")
    if frame["obstime"].isna().any():
        bad = table["obstime"][frame["obstime"].isna()].iloc[0]
        raise InputError(f"{what}: obstime {bad!r} is not a date/time")
    frame["card"] = frame["card"].astype(str).str.lower()
    unknown = sorted(set(frame["card"]) - set(CARDS))
    if unknown:
        raise InputError(f"{what}: unknown card(s) {', '.join(unknown)}; expected {', '.join(CARDS)}")
    frame["band"] = frame["band"].astype(str)
    frame["pid"] = int64_ids(frame["pid"], what)
    if "orbit" not in frame.columns:
        frame["orbit"] = None
    if "obsid" not in frame.columns:
        stamp = frame["obstime"].dt.strftime("%Y%m%dT%H%M%S")
        orbit = frame["orbit"].fillna("").astype(str)
        frame["obsid"] = frame["card"] + "_" + stamp + np.where(orbit != "", "_" + orbit, "")
    frame["obsid"] = frame["obsid"].astype(str)
    _refuse_duplicates(frame, what)
    if "count" not in frame.columns:
        frame["count"] = 1
    for column in STATS:
        if column not in frame.columns:
            frame[column] = 0.0 if column == "std" else frame["mean"]
        frame[column] = numeric_column(frame[column], table, column, what)
    factor = reflectance_scale(scale)
    reflectance = (frame["card"] == "s2") & (frame["band"] != "SCL")
    typical = float(frame.loc[reflectance, "mean"].median()) if reflectance.any() else 0.0
    if factor == 1.0 and typical > 2.0:
        raise InputError(
            f"{what}: Sentinel-2 values look like digital numbers (median {typical:g}), not reflectance "
            "0..1; give scale 'dn' (--scale dn), with offset -0.1 for processing baseline >= 04.00"
        )
    if factor != 1.0 or offset:
        s2 = (frame["card"] == "s2") & (frame["band"] != "SCL")
        for column in REFLECTANCE_STATS:
            frame.loc[s2, column] = frame.loc[s2, column] * factor + offset
        frame.loc[s2, "std"] = frame.loc[s2, "std"] * abs(factor)
    hist = [c for c in HIST_COLUMNS if c in frame.columns]
    scl = frame.loc[frame["card"] == "s2", ["pid", "obsid", "obstime", *hist]].drop_duplicates(
        ["pid", "obsid"]
    )
    scl = scl.dropna(subset=hist) if hist else scl.iloc[0:0]
    for column in HIST_COLUMNS:
        scl[column] = scl[column].astype("int64") if column in scl.columns else 0
    stats = frame[frame["band"] != "SCL"]
    stats = stats[["pid", "obsid", "band", *STATS, "obstime", "card", "orbit"]].astype({"count": "int64"})
    stats = stats.sort_values(["pid", "obstime", "obsid", "band"], ignore_index=True)
    scl = scl[["pid", "obsid", *HIST_COLUMNS, "obstime"]].sort_values(["pid", "obstime"], ignore_index=True)
    parcels = parcels_from_table(table) if parcels is None else validate_parcels(parcels, "parcels")
    parcels = parcels.sort_values("pid", ignore_index=True)
    return TimeSeries(stats, scl, parcels)


def numeric_column(values: pd.Series, table: pd.DataFrame, column: str, what: str) -> pd.Series:
    """A statistic as numbers; text that is not a number is refused naming its row and column, as
    `cbm run` refuses it (a NaN would quietly turn a red parcel yellow). Empty cells stay missing."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values
    numbers = pd.to_numeric(values, errors="coerce")
    blank = values.isna() | values.astype(str).str.strip().isin(("", "nan", "NaN"))
    bad = values[numbers.isna() & ~blank]
    if len(bad):
        row = table.index.get_loc(bad.index[0])
        raise InputError(
            f"{what}: column {column} must be numeric; bad value {bad.iloc[0]!r} in row {row + 1} "
            f"(pid {table['pid'].iloc[row]})"
        )
    return numbers


def parcels_from_table(table: pd.DataFrame) -> gpd.GeoDataFrame:
    """Declared parcels when only signatures are given: crop columns if present, no geometry."""
    cols = [c for c in ("crop_code", "crop_name") if c in table.columns]
    declared = table[["pid", *cols]].drop_duplicates("pid").copy()
    declared["pid"] = int64_ids(declared["pid"], "signatures")
    for column in ("crop_code", "crop_name"):
        if column not in declared.columns:
            declared[column] = ""
    declared = declared.sort_values("pid", ignore_index=True)
    return gpd.GeoDataFrame(declared, geometry=gpd.GeoSeries([None] * len(declared)), crs="EPSG:4326")


def read_signatures(
    path: Path,
    parcels: gpd.GeoDataFrame | Path | None = None,
    scale: str | float = "reflectance",
    offset: float = 0.0,
) -> TimeSeries:
    """Read a tidy Parquet/CSV signature file (and optionally the declared parcels) as a TimeSeries."""
    if parcels is not None and not isinstance(parcels, gpd.GeoDataFrame):
        parcels = read_parcel_file(Path(parcels))  # as `cbm run` reads them (crop_name, crop_code columns)
    return signatures_series(read_table(Path(path)), parcels, scale, offset, what=str(path))


def series_table(series: TimeSeries) -> pd.DataFrame:
    """A TimeSeries as the tidy table `cbm score` reads (stats rows with their SCL histogram)."""
    stats = series.stats.copy()
    for column in ("obsid", "band", "card", "orbit"):
        if column in stats.columns and isinstance(stats[column].dtype, pd.CategoricalDtype):
            stats[column] = stats[column].astype(object)
    scl = series.scl.drop(columns=["obstime"], errors="ignore").copy()
    scl["obsid"] = scl["obsid"].astype(object)
    table = stats.merge(scl, on=["pid", "obsid"], how="left")
    return table.sort_values(["pid", "obstime", "card", "band"], ignore_index=True)


@impl
def cbm_source_signatures(config: PluginConfig, pids: Sequence[int] | None) -> TimeSeries:
    series = read_signatures(
        config.path("signatures"),
        config.path("parcels") if config.get("parcels") else None,
        config.get("scale", "reflectance"),
        float(config.get("offset", 0.0)),
    )
    return series if pids is None else series.subset(pids)
