"""Time-series preparation shared by every marker: one vectorised path from tidy signatures to arrays.

Markers receive batches of thousands of parcels. Instead of a pandas groupby per parcel, the tidy
``stats`` rows of one card are turned into a :class:`Panel`: flat arrays of observations sorted by
(pid, time) with per-parcel offsets, which numpy/numba kernels walk parcel by parcel. The same panel
carries the SCL cloudy fraction, derived indices (NDVI, NDWI, BSI, VH/VV...), the orbit of each S1
observation and helpers for season windows and data gaps.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any

import numba
import numpy as np
import pandas as pd

from cbm_core.model import HIST_COLUMNS, TimeSeries, ValidityPolicy

EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

# Index name -> (formula inputs); all computed from physical reflectance or linear backscatter.
INDEX_BANDS: dict[str, tuple[str, ...]] = {
    "NDVI": ("B08", "B04"),
    "NDWI": ("B03", "B08"),
    "NDMI": ("B08", "B11"),
    "BSI": ("B11", "B04", "B08", "B02"),
    "VHVV": ("VH", "VV"),
    "RVI": ("VV", "VH"),
}


@dataclass
class Panel:
    """Observations of one card for many parcels as flat arrays sorted by (pid, time).

    Rows of parcel ``pids[k]`` are ``offsets[k]:offsets[k + 1]``. ``t`` is days since 1970-01-01 UTC
    (float), ``obs`` indexes ``obs_names`` (the obsids), ``values`` maps band or index names to arrays.
    """

    pids: np.ndarray
    offsets: np.ndarray
    t: np.ndarray
    obs: np.ndarray
    obs_names: np.ndarray
    values: dict[str, np.ndarray] = field(default_factory=dict)
    orbit: np.ndarray | None = None  # S1 orbit label per observation ("" when unknown)
    orbit_code: np.ndarray | None = None  # the same as small integers (-1 when unknown)
    cloudy: np.ndarray | None = None  # S2 unusable SCL pixel share per observation (NaN: no SCL)
    hist: np.ndarray | None = None  # (n, 12) SCL class counts per observation (zeros: no SCL)
    valid: np.ndarray | None = None  # the validity policy's verdict per observation (None: not screened)
    why: np.ndarray | None = None  # and its reason ("" when valid)

    @property
    def n_obs(self) -> np.ndarray:
        """Observations per parcel."""
        return np.diff(self.offsets)

    @property
    def parcel_index(self) -> np.ndarray:
        """For every observation, the position of its parcel in ``pids``."""
        return np.repeat(np.arange(len(self.pids)), self.n_obs)

    def take(self, keep: np.ndarray) -> Panel:
        """The panel restricted to the observations where ``keep`` is true (parcels are kept)."""
        keep = np.asarray(keep, dtype=bool)
        offsets = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])[self.offsets]
        return replace(
            self,
            offsets=offsets,
            t=self.t[keep],
            obs=self.obs[keep],
            values={k: v[keep] for k, v in self.values.items()},
            orbit=None if self.orbit is None else self.orbit[keep],
            orbit_code=None if self.orbit_code is None else self.orbit_code[keep],
            cloudy=None if self.cloudy is None else self.cloudy[keep],
            hist=None if self.hist is None else self.hist[keep],
            valid=None if self.valid is None else self.valid[keep],
            why=None if self.why is None else self.why[keep],
        )

    def frame(self) -> pd.DataFrame:
        """The panel as a tidy table (pid, date, obsid, values...): for inspection and tests."""
        out = pd.DataFrame(
            {
                "pid": np.repeat(self.pids, self.n_obs),
                "date": [to_date(x) for x in self.t],
                "obsid": self.obs_names[self.obs] if len(self.obs) else np.array([], dtype=object),
            }
        )
        for name, values in self.values.items():
            out[name] = values
        if self.orbit is not None:
            out["orbit"] = self.orbit
        if self.cloudy is not None:
            out["cloudy"] = self.cloudy
        if self.valid is not None:
            out["valid"] = self.valid
            out["why"] = self.why
        return out


def to_days(times: pd.Series | pd.DatetimeIndex | Sequence[Any]) -> np.ndarray:
    """Timestamps (naive = UTC) as float days since 1970-01-01."""
    values = pd.to_datetime(times, utc=True)
    ns = np.asarray(values.to_numpy(dtype="datetime64[ns]") if hasattr(values, "to_numpy") else values)
    return ns.astype("datetime64[ns]").astype(np.int64) / 86_400e9


def to_date(days: float) -> date:
    """The calendar date (UTC) of a day number from :func:`to_days`."""
    return date.fromordinal(int(np.floor(days)) + EPOCH_ORDINAL)


def day_number(value: date | str | pd.Timestamp) -> float:
    """A date as the day number used by panels."""
    return float(to_days([pd.Timestamp(value)])[0])


def days_column(column: pd.Series, rows: np.ndarray | None = None) -> np.ndarray:
    """A timestamp column (naive = UTC) as float days, optionally only some rows.

    Reads the column's own datetime64 buffer without converting the whole column first.
    """
    if not isinstance(column.dtype, pd.DatetimeTZDtype) and not pd.api.types.is_datetime64_dtype(
        column.dtype
    ):
        column = pd.to_datetime(column, utc=True)
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        column = column.dt.tz_convert(None)  # UTC wall time, no copy of the values
    raw = column.to_numpy()
    raw = raw if rows is None else raw[rows]
    unit, _ = np.datetime_data(raw.dtype)
    per_day = np.timedelta64(1, "D") / np.timedelta64(1, unit)
    return raw.view(np.int64) / per_day


def _codes(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (-1 for missing) and their labels; categorical columns cost nothing."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy(), np.asarray(column.cat.categories, dtype=object)
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    return codes, np.asarray(uniques, dtype=object)


def _codes_at(column: pd.Series, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 codes and labels of some rows of a column (only those rows are hashed unless categorical)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes, labels = _codes(column)
        return codes[rows].astype(np.int64), labels
    codes, labels = _codes(column.iloc[rows])
    return codes.astype(np.int64), labels


def _select(column: pd.Series, wanted: Iterable[str]) -> np.ndarray:
    """Boolean mask of rows whose label is one of ``wanted`` (fast on categoricals)."""
    codes, labels = _codes(column)
    lut = np.append(np.isin(labels.astype(str), list(wanted)), False)  # code -1 (NA) -> the last, False
    return lut[codes]


def build_panel(
    stats: pd.DataFrame, card: str | Sequence[str], bands: Sequence[str], stat: str = "mean"
) -> Panel:
    """Gather the rows of the given card(s) and bands into a panel (one observation per pid and obsid).

    Robust to unsorted rows and duplicated rows (the last duplicate wins). A band missing at an
    observation is NaN there; a band absent from the whole batch is all NaN.
    """
    cards = [card] if isinstance(card, str) else list(card)
    mask = _select(stats["band"], bands)
    if "card" in stats.columns:
        mask &= _select(stats["card"], cards)
    rows = np.flatnonzero(mask)
    # work on numpy columns: copying the selected rows of the whole frame costs more than the marker
    pid = stats["pid"].to_numpy(np.int64)[rows]
    t = days_column(stats["obstime"], rows)
    obs, obs_names = _codes_at(stats["obsid"], rows)
    band_codes, band_labels = _codes_at(stats["band"], rows)
    if not _is_ordered(pid, t, obs):
        order = np.lexsort((obs, t, pid))
        rows, pid, t, obs, band_codes = rows[order], pid[order], t[order], obs[order], band_codes[order]
    slot = np.full(len(band_labels) + 1, -1, dtype=np.int64)  # band code -> output column (-1: NA code)
    for j, name in enumerate(bands):
        slot[np.flatnonzero(band_labels.astype(str) == name)] = j
    source = stats[stat].to_numpy(np.float64)[rows]
    first, table = _group(pid, t, obs, band_codes, source, slot, len(bands))
    values = {name: table[:, j].copy() for j, name in enumerate(bands)}
    gpid = pid[first]
    starts = np.flatnonzero(np.concatenate([[True], gpid[1:] != gpid[:-1]])) if len(gpid) else first
    pids = gpid[starts]
    offsets = np.append(starts, len(gpid)).astype(np.int64)
    orbit = o_codes = None
    if "orbit" in stats.columns:
        o_codes, o_labels = _codes_at(stats["orbit"], rows[first])
        labels = np.append(np.array([str(x) for x in o_labels], dtype=object), "")  # code -1 -> ""
        orbit = labels[o_codes]
    return Panel(pids, offsets, t[first], obs[first], obs_names, values, orbit, o_codes)


@numba.njit(cache=True)
def _is_ordered(pid: np.ndarray, t: np.ndarray, obs: np.ndarray) -> bool:
    for i in range(1, len(pid)):
        if pid[i] < pid[i - 1]:
            return False
        if pid[i] == pid[i - 1] and (t[i] < t[i - 1] or (t[i] == t[i - 1] and obs[i] < obs[i - 1])):
            return False
    return True


@numba.njit(cache=True)
def _group(pid, t, obs, band_codes, source, slot, n_bands):
    """One observation per run of equal (pid, t, obs) rows: first row index and band values."""
    n = len(pid)
    first = np.empty(n, np.int64)
    table = np.full((n, n_bands), np.nan)
    g = -1
    for i in range(n):
        if i == 0 or pid[i] != pid[i - 1] or obs[i] != obs[i - 1] or t[i] != t[i - 1]:
            g += 1
            first[g] = i
        j = slot[band_codes[i]]
        if j >= 0:
            table[g, j] = source[i]
    return first[: g + 1], table[: g + 1]


def attach_clouds(panel: Panel, scl: pd.DataFrame, policy: ValidityPolicy | None = None) -> Panel:
    """Attach each observation's SCL histogram and its unusable share under the validity policy
    (NaN share where the histogram is absent)."""
    policy = policy or ValidityPolicy()
    hist = np.zeros((len(panel.t), len(HIST_COLUMNS)), dtype=np.float32)
    if len(scl) and len(panel.t):
        s_obs, s_names = _codes(scl["obsid"])
        # map SCL obsid codes into the panel's code space through their labels
        lookup = pd.Index(panel.obs_names.astype(str)).get_indexer(s_names.astype(str))
        s_code = np.where(s_obs >= 0, lookup[s_obs], -1)
        s_pid = scl["pid"].to_numpy(np.int64)
        n_codes = max(len(panel.obs_names), 1)
        p_key = np.repeat(panel.pids, panel.n_obs) * n_codes + panel.obs
        s_key = s_pid * n_codes + s_code
        rows = np.flatnonzero(s_code >= 0)
        keys = s_key[rows]
        order = np.arange(len(keys)) if np.all(keys[1:] > keys[:-1]) else np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        pos = np.searchsorted(sorted_keys, p_key)
        pos_c = np.minimum(pos, max(len(sorted_keys) - 1, 0))
        found = (pos < len(sorted_keys)) & (sorted_keys[pos_c] == p_key) if len(sorted_keys) else pos < 0
        source = rows[order][pos_c[found]]
        for j, column in enumerate(HIST_COLUMNS):  # column by column: no (rows x 12) copy of the frame
            if column in scl.columns:
                hist[found, j] = np.nan_to_num(scl[column].to_numpy(np.float64)[source])
    return replace(panel, hist=hist, cloudy=policy.scl_share(hist))


def screen(panel: Panel, policy: ValidityPolicy | None = None) -> Panel:
    """The validity policy's verdict and reason for every observation (SCL, haze, NDVI dip, one per day).

    Uses the panel's SCL histograms (attach_clouds), and B02, B04 and NDVI where the panel has them.
    """
    policy = policy or ValidityPolicy()
    v = panel.values
    result = policy.screen(
        np.repeat(panel.pids, panel.n_obs),
        panel.t,
        panel.hist,
        blue=v.get("B02"),
        red=v.get("B04"),
        ndvi=v.get("NDVI"),
    )
    return replace(panel, valid=result.valid, why=result.reason, cloudy=result.unusable)


def cloud_filter(panel: Panel, policy: ValidityPolicy | None = None) -> Panel:
    """The observations the validity policy accepts (screening the panel first if needed)."""
    screened = panel if panel.valid is not None else screen(panel, policy)
    return screened.take(screened.valid)


def rejected(panel: Panel) -> list[tuple[tuple[str, str], ...]]:
    """Per parcel of a screened panel: (obsid, reason) of its observations the policy rejected.

    Built for all parcels at once (one zip over the rejected rows, then a slice per parcel): a
    marker reports them for every parcel, so this must cost little per parcel.
    """
    if panel.valid is None:
        return [()] * len(panel.pids)
    bad = np.flatnonzero(~panel.valid)
    pairs = list(
        zip(panel.obs_names[panel.obs[bad]].astype(str).tolist(), panel.why[bad].tolist(), strict=True)
    )
    cuts = np.searchsorted(bad, panel.offsets).tolist()
    return [tuple(pairs[cuts[k] : cuts[k + 1]]) for k in range(len(panel.pids))]


def add_index(panel: Panel, name: str) -> Panel:
    """Add a spectral or radar index computed from the panel's bands (NaN where an input is missing)."""
    v = panel.values
    missing = [b for b in INDEX_BANDS.get(name, ()) if b not in v]
    if name not in INDEX_BANDS:
        raise KeyError(f"unknown index {name!r}; known: {', '.join(INDEX_BANDS)}")
    if missing:
        raise KeyError(f"index {name} needs band(s) {', '.join(missing)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == "NDVI":
            out = (v["B08"] - v["B04"]) / (v["B08"] + v["B04"])
        elif name == "NDWI":
            out = (v["B03"] - v["B08"]) / (v["B03"] + v["B08"])
        elif name == "NDMI":
            out = (v["B08"] - v["B11"]) / (v["B08"] + v["B11"])
        elif name == "BSI":
            a = v["B11"] + v["B04"]
            b = v["B08"] + v["B02"]
            out = (a - b) / (a + b)
        elif name == "VHVV":
            out = v["VH"] / v["VV"]
        else:  # RVI, dual-pol radar vegetation index
            out = 4 * v["VH"] / (v["VV"] + v["VH"])
    out = np.where(np.isfinite(out), out, np.nan)
    return replace(panel, values={**panel.values, name: out})


def drop_missing(panel: Panel, names: Sequence[str]) -> Panel:
    """Drop observations where any of the named values is NaN."""
    keep = np.ones(len(panel.t), dtype=bool)
    for name in names:
        keep &= np.isfinite(panel.values[name])
    return panel if keep.all() else panel.take(keep)


def dedupe_days(panel: Panel) -> Panel:
    """Keep one observation per parcel and UTC day (the least cloudy, then the first obsid).

    Overlapping tiles or orbits give the same parcel two observations of one day; markers that
    difference consecutive values must not see a zero-day step.
    """
    if len(panel.t) < 2:
        return panel
    pidx = panel.parcel_index
    day = np.floor(panel.t)
    if not np.any((pidx[1:] == pidx[:-1]) & (day[1:] == day[:-1])):
        return panel  # sorted by (pid, t): duplicates would be neighbours
    cloudy = np.zeros(len(day)) if panel.cloudy is None else np.nan_to_num(panel.cloudy, nan=1.0)
    order = np.lexsort((panel.obs, cloudy, day, pidx))
    same = np.zeros(len(day), dtype=bool)
    same[1:] = (pidx[order][1:] == pidx[order][:-1]) & (day[order][1:] == day[order][:-1])
    keep = np.zeros(len(day), dtype=bool)
    keep[order[~same]] = True
    return panel.take(keep)


def split_orbits(panel: Panel) -> dict[str, Panel]:
    """One panel per orbit label (S1 geometry differs between ascending and descending passes)."""
    if panel.orbit is None:
        return {"": panel}
    return {str(o): panel.take(panel.orbit == o) for o in pd.unique(panel.orbit)}


def orbit_direction(orbit: str) -> str:
    """'ascending' / 'descending' / the label itself, from orbit labels such as 'ASC_88' or 'D'."""
    text = str(orbit).strip().lower()
    if text.startswith(("asc", "a_", "a")) and not text.startswith("ab"):
        return "ascending"
    if text.startswith(("desc", "d_", "d")):
        return "descending"
    return text


def campaign_year(params: Mapping[str, Any]) -> int | None:
    """The campaign year the engine gives a batch (params["campaign_year"]), None when unknown."""
    year = params.get("campaign_year")
    return None if year is None else int(year)


def season_bounds(
    panel: Panel, start: str | None, end: str | None, year: int | None = None
) -> tuple[float, float]:
    """Day numbers of a season window given as 'MM-DD' (in the campaign year) or full dates.

    Without a campaign year, 'MM-DD' falls in the year of the batch's median observation.
    A window that ends before it starts is refused (ValueError naming both ends).
    """
    if year is None:
        year = int(to_date(float(np.median(panel.t))).year) if len(panel.t) else date.today().year

    def resolve(text: str | None, fallback: float) -> float:
        if text is None or text == "":
            return fallback
        text = str(text)
        full = f"{year}-{text}" if len(text) == 5 else text
        return day_number(full)

    lo, hi = resolve(start, -np.inf), resolve(end, np.inf)
    if lo > hi:
        raise ValueError(
            f"season window ends before it starts: season_start {start} is after season_end {end} ({year})"
        )
    return lo, hi


def evidence_window(t_all: np.ndarray, t_valid: np.ndarray, lo: float, hi: float) -> tuple[str, float]:
    """The window a parcel was judged on ('YYYY-MM-DD..YYYY-MM-DD': the season, else the span of its
    acquisitions) and the longest stretch in it without a valid observation, in days."""
    first = lo if np.isfinite(lo) else (float(t_all.min()) if len(t_all) else np.nan)
    last = hi if np.isfinite(hi) else (float(t_all.max()) if len(t_all) else np.nan)
    if not np.isfinite(first) or not np.isfinite(last):
        return "no observation", float("nan")
    edges = np.concatenate([[np.floor(first)], np.floor(t_valid), [np.floor(last)]])
    return f"{to_date(first)}..{to_date(last)}", float(np.diff(edges).max()) if len(edges) > 1 else 0.0


def in_window(panel: Panel, lo: float, hi: float) -> Panel:
    """Keep observations with lo <= t < hi + 1 (the end day is inclusive)."""
    keep = (panel.t >= lo) & (panel.t < hi + 1)
    return panel if keep.all() else panel.take(keep)


@dataclass(frozen=True)
class Gaps:
    """Per-parcel data gaps: the longest gap and all gaps longer than the threshold."""

    max_gap: np.ndarray  # days, per parcel (window length when there is no observation)
    gaps: list[list[tuple[float, float]]]  # per parcel: (from, to) day numbers of long gaps


def find_gaps(panel: Panel, lo: float, hi: float, max_gap_days: float = 20.0) -> Gaps:
    """Gaps between consecutive observations (and the window edges) longer than ``max_gap_days``."""
    n = len(panel.pids)
    max_gap = np.zeros(n)
    gaps: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    for k in range(n):
        t = panel.t[panel.offsets[k] : panel.offsets[k + 1]]
        t = t[(t >= lo) & (t <= hi)]
        edges = np.concatenate([[lo], t, [hi]]) if np.isfinite(lo) and np.isfinite(hi) else t
        if len(edges) < 2:
            max_gap[k] = hi - lo if np.isfinite(hi - lo) else np.inf
            continue
        d = np.diff(edges)
        max_gap[k] = d.max()
        gaps[k] = [(edges[i], edges[i + 1]) for i in np.flatnonzero(d > max_gap_days)]
    return Gaps(max_gap, gaps)


def batch_pids(series: TimeSeries) -> np.ndarray:
    """The pids a marker must answer for: every declared parcel, else every pid with data."""
    if series.parcels is not None and len(series.parcels):
        return series.parcels["pid"].to_numpy(np.int64)
    return np.unique(series.stats["pid"].to_numpy(np.int64))


def align(panel: Panel, pids: np.ndarray) -> np.ndarray:
    """For each pid, its position in the panel or -1 when the panel has no data for it."""
    pos = np.searchsorted(panel.pids, pids)
    pos_c = np.minimum(pos, max(len(panel.pids) - 1, 0))
    ok = (
        (pos < len(panel.pids)) & (panel.pids[pos_c] == pids)
        if len(panel.pids)
        else np.zeros(len(pids), bool)
    )
    return np.where(ok, pos_c, -1)


def obs_ranges(panel: Panel, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets of each aligned parcel's observations (empty range where pos is -1)."""
    if not len(panel.pids):
        zero = np.zeros(len(pos), dtype=np.int64)
        return zero, zero.copy()
    safe = np.maximum(pos, 0)
    start = np.where(pos >= 0, panel.offsets[:-1][safe], 0).astype(np.int64)
    end = np.where(pos >= 0, panel.offsets[1:][safe], 0).astype(np.int64)
    return start, end


def obs_count(panel: Panel, pos: np.ndarray) -> np.ndarray:
    """Number of observations of each aligned parcel (0 where pos is -1)."""
    start, end = obs_ranges(panel, pos)
    return end - start


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small result objects.

    Allocating a million dataclasses triggers repeated full collections that cost more than the
    markers themselves; the objects hold no reference cycles.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def param(params: Mapping[str, Any], key: str, default: Any) -> Any:
    """A marker parameter with its default (kept in one place so docs and code agree)."""
    value = params.get(key, default)
    return default if value is None else value


def present(column: pd.Series) -> set[str]:
    """The labels that actually occur in a column (a categorical may declare unused categories)."""
    codes, labels = _codes(column)
    used = np.unique(codes[codes >= 0])
    return {str(x) for x in labels[used]}


def s2_panel(
    series: TimeSeries,
    bands: Sequence[str],
    params: Mapping[str, Any],
    indices: Sequence[str] = (),
) -> tuple[Panel, Panel]:
    """The S2 panel of a batch screened by the validity policy, with indices.

    Returns (all observations with the policy's verdict and reason, the valid ones: at most one per
    parcel and day). The policy is ``params["validity"]`` (the scheme's [validity] table), else the
    default. B02 and B04 are read besides ``bands`` for the haze screen, NDVI for the dip screen.
    """
    policy = ValidityPolicy.of(params)
    extra = [b for b in ("B02", "B04", "B08") if b not in bands]
    panel = build_panel(series.stats, "s2", [*bands, *extra])
    panel = attach_clouds(panel, series.scl, policy)
    for name in dict.fromkeys([*indices, "NDVI"]):
        panel = add_index(panel, name)
    panel = drop_missing(panel, list(indices) or list(bands))
    panel = screen(panel, policy)
    return panel, panel.take(panel.valid)


def composite(panel: Panel, names: Sequence[str], start: float, step: float, n_bins: int) -> np.ndarray:
    """Mean of each value per parcel and time bin: array (parcels, bins, names), NaN where empty.

    Bins are [start + k * step, start + (k + 1) * step). Markers compare parcels on such fixed
    grids (peers, crop type) because raw acquisition dates differ between parcels and years.
    """
    out = np.full((len(panel.pids), n_bins, len(names)), np.nan)
    if not len(panel.t):
        return out
    k = np.floor((panel.t - start) / step).astype(np.int64)
    ok = (k >= 0) & (k < n_bins)
    row = panel.parcel_index[ok]
    cell = row * n_bins + k[ok]
    counts = np.bincount(cell, minlength=len(panel.pids) * n_bins).astype(float)
    for j, name in enumerate(names):
        v = panel.values[name][ok]
        good = np.isfinite(v)
        sums = np.bincount(cell[good], weights=v[good], minlength=len(panel.pids) * n_bins)
        cnt = np.bincount(cell[good], minlength=len(panel.pids) * n_bins) if not good.all() else counts
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, :, j] = (sums / np.where(cnt > 0, cnt, np.nan)).reshape(len(panel.pids), n_bins)
    return out


def fill_bins(values: np.ndarray) -> np.ndarray:
    """Fill empty bins along axis 1 by linear interpolation, edges by the nearest value.

    Rows with no value at all stay NaN (the caller reports those parcels as not valid).
    """
    return _fill_bins(np.ascontiguousarray(values, dtype=np.float64))


@numba.njit(cache=True)
def _fill_bins(values: np.ndarray) -> np.ndarray:
    out = values.copy()
    n_rows, n_bins, n_names = values.shape
    for r in range(n_rows):
        for j in range(n_names):
            last = -1
            for k in range(n_bins):
                if np.isfinite(values[r, k, j]):
                    if last < 0:
                        for q in range(k):
                            out[r, q, j] = values[r, k, j]
                    else:
                        for q in range(last + 1, k):
                            w = (q - last) / (k - last)
                            out[r, q, j] = (1 - w) * values[r, last, j] + w * values[r, k, j]
                    last = k
            if last >= 0:
                for q in range(last + 1, n_bins):
                    out[r, q, j] = values[r, last, j]
    return out
