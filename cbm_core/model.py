"""The objects that flow between plugins, and their validation at the boundaries.

Tables are pandas/geopandas frames (what analysts already use); per-parcel results are small
dataclasses so plugin authors get names, types and defaults instead of bare dicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from datetime import date
from enum import StrEnum
from typing import Any, Protocol

import geopandas as gpd
import numpy as np
import orjson
import pandas as pd
import shapely

from cbm_core.errors import ConfigError, InputError

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
    "rejected",
)
VERDICT_COLUMNS = ("pid", "light", "reasons")

# Observation validity: one policy (ValidityPolicy below) for every marker, rule, plot and chip ranking.
# Sentinel-2 L2A scene classification (SCL) classes that make a pixel unusable: no data,
# saturated/defective, cloud shadow, cloud medium/high probability, thin cirrus, snow (the
# WorldCereal SCL_MASK_VALUES; JRC's newer tooling forgets 10, which lets thin cirrus through).
SCL_NODATA_CLASS = 0
DEFAULT_UNUSABLE_CLASSES = (0, 1, 3, 8, 9, 10, 11)
DEFAULT_MAX_UNUSABLE_SHARE = 0.05  # an observation with more unusable pixels than this is not valid
SCL_GROUPS = {
    0: "no data",
    1: "defective",
    3: "shadow",
    8: "cloud",
    9: "cloud",
    10: "thin cirrus",
    11: "snow",
}


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
    NOT_APPLICABLE = "not_applicable"  # the scheme does not judge this declared crop: no light from it


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


class ReadPlan(Protocol):
    """What an extractor will use of a window, so a source can decode less (optional to honour).

    An extractor sets READ_PLAN around its read_window call. A source that honours it allocates the
    window's array, asks ``covered`` which of the file's internal blocks (tiles) inside the window
    hold pixels the extractor will read, decodes only those, row of blocks by row of blocks, and
    calls ``rows_ready`` after each row so the extractor can reduce finished rows while the next one
    decodes. Pixels of skipped blocks are left 0 and never read. A source that ignores the plan
    returns the whole window as before: the statistics are the same either way.
    """

    def covered(self, frame: RasterWindow, row_edges: np.ndarray, col_edges: np.ndarray) -> np.ndarray:
        """frame: the window being filled; edges: block boundaries in window pixels (0 ... height
        or width). Returns a bool array (len(row_edges) - 1, len(col_edges) - 1)."""
        ...

    def rows_ready(self, rows: int) -> None:
        """Rows [0, rows) of frame.array hold their final pixels."""
        ...


READ_PLAN: ContextVar[ReadPlan | None] = ContextVar("cbm_read_plan", default=None)


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
    obsids: tuple[str, ...] = ()  # the observations the marker used (all valid under the policy)
    rejected: tuple[tuple[str, str], ...] = ()  # (obsid, reason) of the observations it left out


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


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the range of parcel ids (stored as int64 everywhere)


def int64_ids(values: pd.Series, what: str, column: str = "pid") -> pd.Series:
    """Ids as int64, refusing (naming the value) anything that is not an integer within int64's range.

    A plain astype would wrap 1e20 or "99999999999999999999" to -9223372036854775808: a parcel
    nobody declared, silently judged.
    """
    kind = values.dtype.kind
    if kind == "i":
        return values.astype("int64")
    if kind == "u":
        ok = (values <= INT64_MAX).to_numpy()
    elif kind == "f":
        numbers = values.to_numpy()
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(numbers) & (numbers % 1 == 0) & (numbers >= INT64_MIN) & (numbers < 2.0**63)
    else:  # text or mixed: value by value, exactly (a float would round near the limits)
        exact = values.map(_exact_int64)
        ok = exact.notna().to_numpy()
        if ok.all():
            return exact.astype("int64")
    if not ok.all():
        raise InputError(
            f"{what}: column {column} must hold integers; bad value {_plain(values[~ok].iloc[0])!r} "
            f"(ids are 64-bit: {INT64_MIN} to {INT64_MAX})"
        )
    return values.astype("int64")


def _exact_int64(value: Any) -> int | None:
    """One id as a Python int if it is an integer within int64's range, else None."""
    if isinstance(value, bool | np.bool_) or value is None:
        return None
    if isinstance(value, int | np.integer):
        number = int(value)
    else:
        text = str(value).strip()
        try:
            number = int(text)
        except ValueError:
            try:
                real = float(text)
            except ValueError:
                return None
            if not math.isfinite(real) or not real.is_integer():
                return None
            number = int(real)
    return number if INT64_MIN <= number <= INT64_MAX else None


def validate_parcels(parcels: gpd.GeoDataFrame, what: str, outlines: bool = True) -> gpd.GeoDataFrame:
    """Check the parcel table: unique integer pids, a CRS, and usable geometries.

    outlines=False accepts points and lines (parcels located, not outlined: signatures need no
    outline); otherwise a table of nothing but points or lines is refused (no pixel would be
    measured) and a stray one is noted as the parcel's issue.
    """
    require_columns(parcels, PARCEL_COLUMNS, what)
    if parcels.crs is None:
        raise InputError(f"{what}: the parcels have no CRS")
    parcels = parcels.assign(pid=int64_ids(parcels["pid"], what))  # one pid dtype whatever the file
    duplicated = parcels["pid"][parcels["pid"].duplicated()]
    if len(duplicated):
        raise InputError(f"{what}: column pid has duplicated value {int(duplicated.iloc[0])}")
    return _checked_geometries(parcels, what, outlines)


AREAL_TYPE_IDS = (3, 6, 7)  # shapely type ids of Polygon, MultiPolygon, GeometryCollection (repaired below)
GEOGRAPHIC_LIMITS = (180.0, 90.0)  # |longitude|, |latitude| in degrees


def _check_geographic_range(parcels: gpd.GeoDataFrame, missing: np.ndarray, what: str) -> None:
    """Refuse projected coordinates (metres) labelled with a geographic CRS such as EPSG:4326:
    they would fall outside every scene and end as '0 clear observations'."""
    if not parcels.crs.is_geographic or missing.all():
        return
    minx, miny, maxx, maxy = shapely.total_bounds(parcels.geometry.values[~missing])
    lon, lat = GEOGRAPHIC_LIMITS
    if max(abs(minx), abs(maxx)) > lon or max(abs(miny), abs(maxy)) > lat:
        raise InputError(
            f"{what}: coordinates up to ({max(abs(minx), abs(maxx)):.0f}, {max(abs(miny), abs(maxy)):.0f}) "
            f"are not longitude/latitude although the CRS is {parcels.crs.to_string()}: projected "
            "coordinates with a wrong CRS label? Set the file's real CRS (e.g. its UTM zone)"
        )


def _checked_geometries(
    parcels: gpd.GeoDataFrame, what: str = "parcels", outlines: bool = True
) -> gpd.GeoDataFrame:
    """Repair invalid polygons and note empty and non-areal ones per parcel in an `issue` column.

    A bad outline is the parcel's problem, not the run's: it stays in the table so that it
    still gets a (yellow) verdict that says what is wrong with it.
    """
    geoms = parcels.geometry.values
    missing = np.asarray(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    kinds = np.asarray(shapely.get_type_id(geoms))
    areal = missing | np.isin(kinds, AREAL_TYPE_IDS) | (not outlines)
    if len(parcels) and not areal.any():
        first = int(np.flatnonzero(~missing)[0])
        raise InputError(
            f"{what}: parcels must be polygons, found {geoms[first].geom_type} "
            f"(pid {parcels['pid'].iloc[first]}); a point or line covers no pixel"
        )
    _check_geographic_range(parcels, missing, what)
    invalid = ~missing & areal & ~np.asarray(shapely.is_valid(geoms))
    issue = np.full(len(parcels), "", dtype=object)
    issue[missing] = "empty geometry"
    if not areal.all():
        issue[~areal] = [f"not a polygon ({g.geom_type}): covers no pixel" for g in geoms[~areal]]
        geoms = geoms.copy()
        geoms[~areal] = shapely.Polygon()  # extractors see an empty parcel; the verdict says why
    if invalid.any():
        reasons = shapely.is_valid_reason(geoms[invalid])
        issue[invalid] = [f"invalid geometry repaired ({r})" for r in reasons]
        geoms = geoms.copy()
        geoms[invalid] = [_polygonal(g) for g in shapely.make_valid(geoms[invalid])]
    previous = parcels["issue"].fillna("").astype(str).to_numpy() if "issue" in parcels else None
    if previous is not None:
        issue = np.where(previous != "", previous, issue)  # the first check saw the original outline
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
            "rejected": to_json(r.rejected),
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


EVENT_COLUMNS = ("pid", "marker", "kind", "start", "main", "end", "magnitude", "confidence", "obsids")


def events_frame(results: pd.DataFrame) -> pd.DataFrame:
    """Every marker event as one row (EVENT_COLUMNS; dates as dates, obsids joined by ' '), from the
    results table: what analysts filter and count without decoding JSON."""
    rows = []
    for pid, marker, text in zip(results["pid"], results["marker"], results["events"], strict=True):
        for e in orjson.loads(text) if isinstance(text, str) and text != "[]" else []:
            rows.append(
                (int(pid), marker, e.get("kind") or "", e["start"], e["main"], e["end"],
                 e.get("magnitude"), e.get("confidence"), " ".join(e.get("obsids") or []))
            )  # fmt: skip
    frame = pd.DataFrame(rows, columns=list(EVENT_COLUMNS))
    for column in ("start", "main", "end"):
        frame[column] = pd.to_datetime(frame[column]).dt.date
    return frame.astype({"pid": "int64", "magnitude": "float64", "confidence": "float64"})


def verdict_table(verdicts: Iterable[Verdict]) -> pd.DataFrame:
    """Verdicts as a plain table (pid, light, reasons as one text): cheap to send between processes."""
    return pd.DataFrame(
        [(int(v.pid), str(v.light), "; ".join(v.reasons)) for v in verdicts], columns=list(VERDICT_COLUMNS)
    ).astype({"pid": "int64"})


def verdicts_frame(table: pd.DataFrame, parcels: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """A verdict table joined to its parcels' declarations (every declared column: pid,
    parcel_code, crop code and name, campaign year, columns a source keeps) and geometry."""
    declared = parcels[
        [c for c in parcels.columns if (c != "issue" and c not in table.columns) or c == "pid"]
    ]
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


# Observation validity ------------------------------------------------------------------------

# Residual haze that SCL calls clear: haze adds to blue far more than to red, so an observation
# lying above the clear-sky blue-red line is hazy (a haze-optimised transform, Zhang et al. 2002).
# On the 1,340 SCL-clear parcel observations of flanders-seasons the clear line is
# B02 = 0.48..0.54 x B04 + 0.012; B02 - 0.5 x B04 > 0.05 rejects 43 (3 %), concentrated on the
# hazy dates (2017-08-24 all 14 parcels, 2018-06-10, 2018-07-13), and keeps bright bare soil
# (B02 up to 0.14 with B04 0.29), which a plain B02 threshold would throw away.
HAZE_RED_WEIGHT = 0.5
DEFAULT_MAX_HAZE = 0.05
# An NDVI dip that recovers at the next valid observation is haze or shadow, not a cut: a cut
# grass sward needs ~20 days to regrow (Sinergise), so a fall of >= 0.15 undone within 10 days
# (back to within 0.05 of the level before) did not happen on the ground.
DEFAULT_DIP = 0.15
DEFAULT_DIP_RECOVERY_DAYS = 10.0
DEFAULT_DIP_TOLERANCE = 0.05
VALIDITY_KEYS = (
    "unusable_classes",
    "max_unusable_share",
    "require_scl",
    "max_haze",
    "dip",
    "dip_recovery_days",
    "dip_tolerance",
)


@dataclass(frozen=True)
class Screening:
    """The validity of each observation of a screened series: flag, reason ('' when valid), SCL share."""

    valid: np.ndarray  # bool per observation
    reason: np.ndarray  # object (str) per observation: why it was rejected, "" when valid
    unusable: np.ndarray  # float per observation: share of unusable SCL pixels, NaN without SCL


@dataclass(frozen=True)
class ValidityPolicy:
    """Which Sentinel-2 observations count as valid evidence: one answer for markers, rules, plots, chips.

    An observation is rejected when (in this order) its SCL histogram has more than
    ``max_unusable_share`` of its pixels in ``unusable_classes`` (or it has none and ``require_scl``);
    when its parcel means B02 - 0.5 x B04 exceed ``max_haze`` (haze SCL misses; skipped where B02 or
    B04 is absent or ``max_haze`` is None); of several valid observations of one parcel and day, all
    but the least cloudy; when its NDVI lies ``dip`` below both valid neighbours and the next one,
    within ``dip_recovery_days``, is back within ``dip_tolerance`` of the level before (skipped where
    NDVI is absent or ``dip`` is None). Configured by a scheme's [validity] table (keys as the fields).
    """

    unusable_classes: tuple[int, ...] = DEFAULT_UNUSABLE_CLASSES
    max_unusable_share: float = DEFAULT_MAX_UNUSABLE_SHARE
    require_scl: bool = False
    max_haze: float | None = DEFAULT_MAX_HAZE
    dip: float | None = DEFAULT_DIP
    dip_recovery_days: float = DEFAULT_DIP_RECOVERY_DAYS
    dip_tolerance: float = DEFAULT_DIP_TOLERANCE

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None, where: str = "[validity]") -> ValidityPolicy:
        """A policy from a [validity] table: unknown keys, wrong types and bad values are refused.

        max_haze = false or dip = false switch that screen off (TOML has no null).
        """
        if table is None:
            return cls()
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
        unknown = sorted(set(table) - set(VALIDITY_KEYS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(VALIDITY_KEYS)}"
            )
        options: dict[str, Any] = {}
        for key, value in table.items():
            if key == "unusable_classes":
                if not isinstance(value, list | tuple) or not all(
                    isinstance(c, int) and not isinstance(c, bool) and 0 <= c < SCL_CLASSES for c in value
                ):
                    raise ConfigError(
                        f"{where}: 'unusable_classes' must list SCL classes 0..11, got {value!r}"
                    )
                options[key] = tuple(sorted(set(value)))
            elif key == "require_scl":
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}: 'require_scl' must be true or false, got {value!r}")
                options[key] = value
            elif key in ("max_haze", "dip") and value is False:
                options[key] = None
            else:
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ConfigError(f"{where}: '{key}' must be a non-negative number, got {value!r}")
                if key == "max_unusable_share" and value > 1:
                    raise ConfigError(f"{where}: 'max_unusable_share' is a share 0..1, got {value!r}")
                options[key] = float(value)
        return cls(**options)

    @classmethod
    def of(cls, params: Mapping[str, Any] | None) -> ValidityPolicy:
        """The policy given in params["validity"] (a policy or a table), else the default policy."""
        given = (params or {}).get("validity")
        if isinstance(given, ValidityPolicy):
            return given
        return cls.from_table(given, "validity")

    def as_table(self) -> dict[str, Any]:
        """The policy as a [validity] table (for summaries and the plots' captions)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["unusable_classes"] = list(self.unusable_classes)
        return {k: (False if v is None else v) for k, v in out.items()}

    def scl_share(self, hist: np.ndarray | pd.DataFrame) -> np.ndarray:
        """Share of each observation's pixels (no data included) in an unusable class; NaN without pixels."""
        return unusable_share(hist, self.unusable_classes)

    def screen(
        self,
        pid: np.ndarray,
        t: np.ndarray,
        hist: np.ndarray | None = None,
        blue: np.ndarray | None = None,
        red: np.ndarray | None = None,
        ndvi: np.ndarray | None = None,
    ) -> Screening:
        """Judge observations sorted by (pid, t): t in days since 1970 (float), hist (n, 12) SCL counts
        or None (rows of zeros or NaN: no SCL), blue (B02), red (B04) and NDVI parcel means or None (NaN:
        unknown).

        Of several valid observations of one parcel on one day only the least cloudy counts (a second
        tile or orbit is no new evidence, and a zero-day step would fake a change).
        """
        n = len(t)
        pid = np.asarray(pid)
        t = np.asarray(t, dtype=np.float64)
        valid = np.ones(n, dtype=bool)
        reason = np.full(n, "", dtype=object)
        share = np.full(n, np.nan)
        if hist is not None and n:
            counts = np.nan_to_num(np.asarray(hist, dtype=np.float64))
            share = self.scl_share(counts)
            bad = share > self.max_unusable_share
            if bad.any():
                reason[bad] = self._scl_reasons(counts[bad], share[bad])
            valid &= ~bad
        missing = np.isnan(share)
        if self.require_scl and missing.any():
            reason[missing & valid] = "no SCL histogram"
            valid &= ~missing
        if blue is not None and red is not None and self.max_haze is not None:
            haze = np.asarray(blue, np.float64) - HAZE_RED_WEIGHT * np.asarray(red, np.float64)
            hazy = valid & (haze > self.max_haze)
            if hazy.any():
                reason[hazy] = _labels(
                    np.round(haze[hazy], 3), lambda h: f"haze: B02 - 0.5 B04 = {h:.3f} > {self.max_haze:.2f}"
                )
            valid &= ~hazy
        day = np.floor(t)
        candidates = np.flatnonzero(valid)
        order = candidates[
            np.lexsort((np.nan_to_num(share[candidates], nan=0.0), day[candidates], pid[candidates]))
        ]
        repeat = np.zeros(len(order), dtype=bool)
        repeat[1:] = (pid[order][1:] == pid[order][:-1]) & (day[order][1:] == day[order][:-1])
        if repeat.any():
            reason[order[repeat]] = "second observation of the day"
            valid[order[repeat]] = False
        if ndvi is not None and self.dip is not None:
            for i, text in self._dips(pid, t, np.asarray(ndvi, np.float64), valid).items():
                reason[i] = text
                valid[i] = False
        return Screening(valid, reason, share)

    def _scl_reasons(self, counts: np.ndarray, share: np.ndarray) -> np.ndarray:
        """'SCL thin cirrus 100% > 5%': the unusable share and its largest class group (vectorised:
        one string per distinct group and percentage, so a million rejections cost little)."""
        groups = sorted({SCL_GROUPS.get(c, f"class {c}") for c in self.unusable_classes})
        member = np.zeros((SCL_CLASSES, len(groups)))
        for c in self.unusable_classes:
            member[c, groups.index(SCL_GROUPS.get(c, f"class {c}"))] = 1.0
        top = np.argmax(counts @ member, axis=1)
        key = top * 1000 + np.round(share * 100).astype(np.int64)
        limit = f"{self.max_unusable_share:.0%}"
        return _labels(key, lambda k: f"SCL {groups[int(k) // 1000]} {int(k) % 1000}% > {limit}")

    def _dips(self, pid: np.ndarray, t: np.ndarray, ndvi: np.ndarray, valid: np.ndarray) -> dict[int, str]:
        """Valid observations whose NDVI dips below both valid neighbours and recovers quickly."""
        idx = np.flatnonzero(valid & np.isfinite(ndvi))
        if len(idx) < 3:
            return {}
        prev, mid, nxt = idx[:-2], idx[1:-1], idx[2:]
        same = (pid[prev] == pid[mid]) & (pid[mid] == pid[nxt])
        fall = ndvi[prev] - ndvi[mid]
        rise = ndvi[nxt] - ndvi[mid]
        hit = (
            same
            & (fall >= self.dip)
            & (rise >= self.dip)
            & (t[nxt] - t[mid] <= self.dip_recovery_days)
            & (ndvi[nxt] >= ndvi[prev] - self.dip_tolerance)
        )
        return {
            int(mid[k]): (
                f"NDVI dip {ndvi[mid[k]]:.2f} between {ndvi[prev[k]]:.2f} and {ndvi[nxt[k]]:.2f} "
                f"{t[nxt[k]] - t[mid[k]]:.0f} d later"
            )
            for k in np.flatnonzero(hit)
        }


def _labels(keys: np.ndarray, text: Callable[[Any], str]) -> np.ndarray:
    """Strings for many keys, formatted once per distinct key."""
    unique, inverse = np.unique(keys, return_inverse=True)
    return np.array([text(k) for k in unique], dtype=object)[inverse.reshape(-1)]
