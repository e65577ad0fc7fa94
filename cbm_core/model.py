"""The objects that flow between plugins, and their validation at the boundaries.

Tables are pandas/geopandas frames (what analysts already use); per-parcel results are small
dataclasses so plugin authors get names, types and defaults instead of bare dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any

import geopandas as gpd
import numpy as np
import orjson
import pandas as pd
import shapely

from cbm_core.errors import InputError

STATS = ("count", "mean", "std", "min", "max", "p25", "p50", "p75")
SIGNATURE_COLUMNS = ("pid", "obsid", "band", *STATS)
SCL_CLASSES = 12
HIST_COLUMNS = tuple(f"hist_{c}" for c in range(SCL_CLASSES))
SCL_COLUMNS = ("pid", "obsid", *HIST_COLUMNS)
PARCEL_COLUMNS = ("pid", "crop_code", "crop_name", "geometry")
CATALOGUE_COLUMNS = ("obsid", "obstime", "sensor", "card", "orbit", "bands", "geometry")
CARDS = ("s2", "bs", "c6")
MARKER_RESULT_COLUMNS = (
    "marker",
    "pid",
    "status",
    "reason",
    "events",
    "values",
    "confidence",
    "obsids",
)
VERDICT_COLUMNS = ("pid", "light", "reasons")

# Observation validity: one policy for every marker, rule, plot and chip ranking.
# Sentinel-2 L2A scene classification (SCL) classes that make a pixel unusable: no data,
# saturated/defective, cloud shadow, cloud medium/high probability, thin cirrus, snow.
SCL_NODATA_CLASS = 0
DEFAULT_UNUSABLE_CLASSES = (0, 1, 3, 8, 9, 10, 11)
DEFAULT_MAX_UNUSABLE_SHARE = 0.05  # an observation with more unusable pixels than this is not valid


class Status(StrEnum):
    """Whether a marker could say something about a parcel."""

    OK = "OK"
    NOT_VALID = "NOT_VALID"  # ran, but the data cannot support a conclusion
    NOT_EXECUTED = "NOT_EXECUTED"  # did not run on this parcel (plugin error, missing input)


class Light(StrEnum):
    """The traffic light of a parcel."""

    GREEN = "green"  # declaration confirmed
    YELLOW = "yellow"  # inconclusive: needs a human look
    RED = "red"  # declaration rejected


@dataclass(frozen=True)
class BandRef:
    """Where one band of a scene lives and how its values become physical units.

    None means "as the file says" (the raster's own nodata, scale and offset tags).
    """

    uri: str
    nodata: float | None = None
    scale: float | None = None
    offset: float | None = None


@dataclass(frozen=True)
class Scene:
    """One acquisition: a row of the catalogue."""

    obsid: str
    obstime: pd.Timestamp
    sensor: str
    card: str
    bands: dict[str, BandRef]
    orbit: str | None = None


@dataclass(frozen=True)
class RasterWindow:
    """Pixels read from one band file, with the grid they sit on (rasterio conventions)."""

    array: np.ndarray  # 2-D
    transform: Any  # affine.Affine of the window
    crs: str
    nodata: float | None
    scale: float = 1.0
    offset: float = 0.0


@dataclass
class Signatures:
    """Per-parcel statistics of scenes: tidy stats rows plus the SCL class histograms."""

    stats: pd.DataFrame  # SIGNATURE_COLUMNS
    scl: pd.DataFrame  # SCL_COLUMNS

    @classmethod
    def empty(cls) -> Signatures:
        return cls(empty_signatures(), empty_scl())

    @classmethod
    def concat(cls, parts: Iterable[Signatures]) -> Signatures:
        parts = list(parts)
        if not parts:
            return cls.empty()
        return cls(
            pd.concat([p.stats for p in parts], ignore_index=True),
            pd.concat([p.scl for p in parts], ignore_index=True),
        )


@dataclass
class TimeSeries:
    """What markers see: signatures joined with scene dates, plus the parcels they belong to."""

    stats: pd.DataFrame  # SIGNATURE_COLUMNS + obstime, card, orbit; sorted by pid, obstime
    scl: pd.DataFrame  # SCL_COLUMNS + obstime
    parcels: gpd.GeoDataFrame

    def subset(self, pids: Sequence[int]) -> TimeSeries:
        """The same series restricted to some parcels (used to isolate a failing parcel)."""
        keep = set(pids)
        return TimeSeries(
            self.stats[self.stats["pid"].isin(keep)],
            self.scl[self.scl["pid"].isin(keep)],
            self.parcels[self.parcels["pid"].isin(keep)],
        )


@dataclass(frozen=True)
class Event:
    """A dated happening found by a marker (a cut, a ploughing...)."""

    start: date
    main: date
    end: date
    magnitude: float
    confidence: float
    obsids: tuple[str, ...] = ()
    kind: str = ""


@dataclass
class MarkerResult:
    """What one marker concluded about one parcel."""

    marker: str
    pid: int
    status: Status
    reason: str = ""
    events: list[Event] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    confidence: float | None = None
    obsids: tuple[str, ...] = ()


@dataclass
class Verdict:
    """The traffic light of one parcel with reasons a human can check."""

    pid: int
    light: Light
    reasons: list[str]


# Constructors and validation -----------------------------------------------------------------


def empty_signatures() -> pd.DataFrame:
    columns = {"pid": np.zeros(0, np.int64), "obsid": np.zeros(0, object), "band": np.zeros(0, object)}
    columns.update({c: np.zeros(0, np.int64 if c == "count" else np.float64) for c in STATS})
    return pd.DataFrame(columns)


def empty_scl() -> pd.DataFrame:
    columns = {"pid": np.zeros(0, np.int64), "obsid": np.zeros(0, object)}
    columns.update({c: np.zeros(0, np.int64) for c in HIST_COLUMNS})
    return pd.DataFrame(columns)


def require_columns(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise an InputError naming the missing columns of a table and where it came from."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(
            f"{what}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}"
        )


def validate_parcels(parcels: gpd.GeoDataFrame, what: str) -> gpd.GeoDataFrame:
    """Check the parcel table: unique integer pids, a CRS, and usable geometries."""
    require_columns(parcels, PARCEL_COLUMNS, what)
    if parcels.crs is None:
        raise InputError(f"{what}: the parcels have no CRS")
    pid = parcels["pid"]
    if not pd.api.types.is_integer_dtype(pid):
        converted = pd.to_numeric(pid, errors="coerce")
        bad = pid[converted.isna() | (converted % 1 != 0)]
        if len(bad):
            raise InputError(f"{what}: column pid must hold integers; bad value {_plain(bad.iloc[0])!r}")
        parcels = parcels.assign(pid=converted.astype("int64"))
    parcels = parcels.assign(pid=parcels["pid"].astype("int64"))  # one pid dtype whatever the file format
    duplicated = parcels["pid"][parcels["pid"].duplicated()]
    if len(duplicated):
        raise InputError(f"{what}: column pid has duplicated value {int(duplicated.iloc[0])}")
    return _checked_geometries(parcels)


def _checked_geometries(parcels: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Repair invalid polygons and note empty ones per parcel in an `issue` column.

    A bad outline is the parcel's problem, not the run's: it stays in the table so that it
    still gets a (yellow) verdict that says what is wrong with it.
    """
    geoms = parcels.geometry.values
    missing = np.asarray(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    invalid = ~missing & ~np.asarray(shapely.is_valid(geoms))
    issue = np.full(len(parcels), "", dtype=object)
    issue[missing] = "empty geometry"
    if invalid.any():
        reasons = shapely.is_valid_reason(geoms[invalid])
        issue[invalid] = [f"invalid geometry repaired ({r})" for r in reasons]
        geoms = geoms.copy()
        geoms[invalid] = [_polygonal(g) for g in shapely.make_valid(geoms[invalid])]
    previous = parcels["issue"].fillna("").astype(str).to_numpy() if "issue" in parcels else None
    if previous is not None:
        issue = np.where(issue == "", previous, issue)
    return parcels.assign(issue=issue).set_geometry(
        gpd.GeoSeries(geoms, index=parcels.index, crs=parcels.crs)
    )


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so messages show 2.5, not np.float64(2.5)."""
    return value.item() if isinstance(value, np.generic) else value


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry:
    """Keep the areal part of a repaired geometry (make_valid may add stray lines or points)."""
    parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.unary_union(parts) if parts else shapely.Polygon()


def validate_signatures(stats: pd.DataFrame, what: str) -> pd.DataFrame:
    """Check a tidy signature table and bring it to the canonical dtypes."""
    require_columns(stats, SIGNATURE_COLUMNS, what)
    for column in STATS:
        if not pd.api.types.is_numeric_dtype(stats[column]):
            values = pd.to_numeric(stats[column], errors="coerce")
            bad = stats[column][values.isna() & stats[column].notna()]
            if len(bad):
                raise InputError(f"{what}: column {column} must be numeric; bad value {bad.iloc[0]!r}")
    out = stats.astype({"pid": "int64", "obsid": "str", "band": "str"})
    return out.astype({c: "float64" for c in STATS if c != "count"} | {"count": "int64"})


def results_frame(results: Iterable[MarkerResult]) -> pd.DataFrame:
    """Marker results as a table; events and values as JSON text so any file format holds them."""
    rows = [
        {
            "marker": r.marker,
            "pid": int(r.pid),
            "status": str(r.status),
            "reason": r.reason,
            "events": to_json(r.events),
            "values": to_json(r.values),
            "confidence": np.nan if r.confidence is None else float(r.confidence),
            "obsids": to_json(r.obsids),
        }
        for r in results
    ]
    return pd.DataFrame(rows, columns=list(MARKER_RESULT_COLUMNS)).astype({"pid": "int64"})


# orjson writes dataclasses (events), numpy scalars and arrays as they are, NaN and infinity as
# null (strict JSON), and keys that are not text as their text; dates go through _json_date.
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


def to_json(value: Any) -> str:
    """Marker values and events as compact JSON text; dates (and timestamps) as YYYY-MM-DD."""
    return orjson.dumps(value, default=_json_date, option=_JSON_OPTIONS).decode()


def _json_date(value: Any) -> Any:
    if isinstance(value, date):  # datetime and pd.Timestamp too: markers report days
        return value.isoformat()[:10]
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as JSON")


def verdict_table(verdicts: Iterable[Verdict]) -> pd.DataFrame:
    """Verdicts as a plain table (pid, light, reasons as one text): cheap to send between processes."""
    return pd.DataFrame(
        [(int(v.pid), str(v.light), "; ".join(v.reasons)) for v in verdicts], columns=list(VERDICT_COLUMNS)
    ).astype({"pid": "int64"})


def verdicts_frame(table: pd.DataFrame, parcels: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """A verdict table joined to its parcels' declarations and geometry."""
    declared = parcels[["pid", "crop_code", "crop_name", "geometry"]]
    return gpd.GeoDataFrame(declared.merge(table, on="pid", how="inner"), crs=parcels.crs)


def unusable_share(
    hist: np.ndarray | pd.DataFrame, unusable: Sequence[int] = DEFAULT_UNUSABLE_CLASSES
) -> np.ndarray:
    """Share of all a parcel's pixels (no data included) in an unusable class; NaN without pixels.

    Takes the (n, 12) counts or an SCL frame with the hist_0..hist_11 columns.
    """
    if isinstance(hist, pd.DataFrame):
        hist = hist[list(HIST_COLUMNS)]
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum(axis=1)
    bad = hist[:, list(unusable)].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, bad / np.maximum(total, 1), np.nan)


def clear_fraction(
    hist: np.ndarray | pd.DataFrame, unusable: Sequence[int] = DEFAULT_UNUSABLE_CLASSES
) -> np.ndarray:
    """Share of a parcel's observed (SCL != 0) pixels in no unusable class; NaN without observed pixels.

    Takes the (n, 12) counts or an SCL frame with the hist_0..hist_11 columns.
    """
    if isinstance(hist, pd.DataFrame):
        hist = hist[list(HIST_COLUMNS)]
    hist = np.asarray(hist)
    observed = hist.sum(axis=1) - hist[:, SCL_NODATA_CLASS]
    bad = hist[:, [c for c in unusable if c != SCL_NODATA_CLASS]].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(observed > 0, (observed - bad) / np.maximum(observed, 1), np.nan)


def time_series(signatures: Signatures, catalogue: pd.DataFrame, parcels: gpd.GeoDataFrame) -> TimeSeries:
    """Join signatures with their scenes' dates, cards and orbits, sorted by parcel and time."""
    scenes = catalogue[["obsid", "obstime", "card", "orbit"]]
    stats = signatures.stats.merge(scenes, on="obsid", how="inner")
    scl = signatures.scl.merge(scenes[["obsid", "obstime"]], on="obsid", how="inner")
    scl = scl.assign(clear_fraction=clear_fraction(scl))  # derived from the histogram, never stored
    known = parcels["pid"]
    stats = stats[stats["pid"].isin(known)].sort_values(["pid", "obstime", "band"], ignore_index=True)
    scl = scl[scl["pid"].isin(known)].sort_values(["pid", "obstime"], ignore_index=True)
    return TimeSeries(stats, scl, parcels.sort_values("pid", ignore_index=True))


def signatures_table(signatures: Signatures, catalogue: pd.DataFrame) -> pd.DataFrame:
    """Signatures as one tidy table (the format `cbm score` reads): stats rows with dates, card
    and the SCL histogram and clear-sky fraction of their observation."""
    series_scenes = catalogue[["obsid", "obstime", "card"]]
    table = signatures.stats.merge(series_scenes, on="obsid", how="left")
    scl = signatures.scl.assign(clear_fraction=clear_fraction(signatures.scl))
    table = table.merge(scl, on=["pid", "obsid"], how="left")
    columns = ["pid", "obsid", "obstime", "card", "band", *STATS, *HIST_COLUMNS, "clear_fraction"]
    return table[columns].sort_values(["pid", "obstime", "band"], ignore_index=True)
