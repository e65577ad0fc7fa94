"""Time-series preparation shared by every marker: one vectorised path from tidy signatures to arrays.

Markers receive batches of thousands of parcels. Instead of a pandas groupby per parcel, the tidy
``stats`` rows of one card are turned into a :class:`Panel`: flat arrays of observations sorted by
(pid, time) with per-parcel offsets, which numpy/numba kernels walk parcel by parcel. The same panel
carries the SCL cloudy fraction, derived indices (NDVI, NDWI, BSI, VH/VV...), the orbit of each S1
observation and helpers for season windows and data gaps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any

import numpy as np
import pandas as pd

from cbm_core.model import HIST_COLUMNS, TimeSeries

# SCL classes treated as unusable by default: no data, saturated/defective, cloud shadow, cloud
# medium/high probability, thin cirrus, snow. Configurable per marker ("cloud_classes").
DEFAULT_CLOUD_CLASSES = (0, 1, 3, 8, 9, 10, 11)
DEFAULT_MAX_CLOUDY = 0.05
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
    cloudy: np.ndarray | None = None  # S2 cloudy pixel fraction per observation (NaN: no SCL)

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
            cloudy=None if self.cloudy is None else self.cloudy[keep],
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


def _codes(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and their labels for a column; categorical columns cost nothing."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy(np.int64), np.asarray(column.cat.categories, dtype=object)
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _select(column: pd.Series, wanted: Iterable[str]) -> np.ndarray:
    """Boolean mask of rows whose label is one of ``wanted`` (fast on categoricals)."""
    codes, labels = _codes(column)
    lut = np.append(np.isin(labels.astype(str), list(wanted)), False)  # code -1 (NA) -> False
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
    rows = stats.loc[mask] if not mask.all() else stats
    pid = rows["pid"].to_numpy(np.int64)
    t = to_days(rows["obstime"]) if len(rows) else np.zeros(0)
    obs, obs_names = _codes(rows["obsid"])
    band_codes, band_labels = _codes(rows["band"])
    order = np.lexsort((obs, t, pid))
    if not np.all(order[1:] > order[:-1]):
        pid, t, obs, band_codes = pid[order], t[order], obs[order], band_codes[order]
    else:
        order = slice(None)
    new = np.ones(len(pid), dtype=bool)
    if len(pid):
        new[1:] = (pid[1:] != pid[:-1]) | (obs[1:] != obs[:-1]) | (t[1:] != t[:-1])
    group = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    values = {}
    source = rows[stat].to_numpy(np.float64)[order]
    for name in bands:
        out = np.full(len(first), np.nan)
        hit = np.flatnonzero(band_labels.astype(str) == name)
        if len(hit):
            sel = band_codes == hit[0]
            out[group[sel]] = source[sel]
        values[name] = out
    gpid = pid[first]
    pids, starts = np.unique(gpid, return_index=True)
    offsets = np.append(starts, len(gpid)).astype(np.int64)
    orbit = None
    if "orbit" in rows.columns:
        orb = rows["orbit"].to_numpy(object)[order][first] if len(first) else np.zeros(0, object)
        orbit = np.array(["" if o is None or o != o else str(o) for o in orb], dtype=object)
    return Panel(pids, offsets, t[first], obs[first], obs_names, values, orbit)


def attach_clouds(panel: Panel, scl: pd.DataFrame, classes: Sequence[int] = DEFAULT_CLOUD_CLASSES) -> Panel:
    """Set the cloudy pixel fraction of each observation from the SCL histograms (NaN where absent).

    The fraction counts the ``classes`` pixels over all pixels of the parcel at that date.
    """
    cloudy = np.full(len(panel.t), np.nan)
    if len(scl) and len(panel.t):
        hist = scl[[c for c in HIST_COLUMNS if c in scl.columns]].to_numpy(np.float64)
        hist = np.nan_to_num(hist)
        bad_cols = [i for i, c in enumerate(HIST_COLUMNS) if c in scl.columns and int(c[5:]) in set(classes)]
        total = hist.sum(axis=1)
        frac = np.where(total > 0, hist[:, bad_cols].sum(axis=1) / np.maximum(total, 1), np.nan)
        s_obs, s_names = _codes(scl["obsid"])
        # map SCL obsid codes into the panel's code space through their labels
        lookup = pd.Index(panel.obs_names.astype(str)).get_indexer(s_names.astype(str))
        s_code = np.where(s_obs >= 0, lookup[s_obs], -1)
        s_pid = scl["pid"].to_numpy(np.int64)
        n_codes = max(len(panel.obs_names), 1)
        p_key = np.repeat(panel.pids, panel.n_obs) * n_codes + panel.obs
        s_key = s_pid * n_codes + s_code
        valid = s_code >= 0
        order = np.argsort(s_key[valid], kind="stable")
        sorted_keys = s_key[valid][order]
        pos = np.searchsorted(sorted_keys, p_key)
        pos_c = np.minimum(pos, max(len(sorted_keys) - 1, 0))
        found = (pos < len(sorted_keys)) & (sorted_keys[pos_c] == p_key) if len(sorted_keys) else pos < 0
        cloudy[found] = frac[valid][order][pos_c[found]]
    return replace(panel, cloudy=cloudy)


def cloud_filter(panel: Panel, max_cloudy: float = DEFAULT_MAX_CLOUDY, require_scl: bool = False) -> Panel:
    """Keep observations whose cloudy fraction is at most ``max_cloudy``.

    Observations without an SCL histogram are kept unless ``require_scl`` (then they are dropped).
    """
    if panel.cloudy is None:
        return panel
    keep = panel.cloudy <= max_cloudy
    if not require_scl:
        keep |= np.isnan(panel.cloudy)
    return panel.take(keep)


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


def season_bounds(panel: Panel, start: str | None, end: str | None) -> tuple[float, float]:
    """Day numbers of a season window given as 'MM-DD' (in the batch's main year) or full dates."""
    year = int(to_date(float(np.median(panel.t))).year) if len(panel.t) else date.today().year

    def resolve(text: str | None, fallback: float) -> float:
        if text is None or text == "":
            return fallback
        text = str(text)
        full = f"{year}-{text}" if len(text) == 5 else text
        return day_number(full)

    return resolve(start, -np.inf), resolve(end, np.inf)


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


def param(params: Mapping[str, Any], key: str, default: Any) -> Any:
    """A marker parameter with its default (kept in one place so docs and code agree)."""
    value = params.get(key, default)
    return default if value is None else value


def unknown_bands(stats: pd.DataFrame, known: Iterable[str]) -> list[str]:
    """Bands present in the signatures that no marker knows (reported, never fatal)."""
    _, labels = _codes(stats["band"])
    return sorted(set(map(str, labels)) - set(known))


def s2_panel(
    series: TimeSeries,
    bands: Sequence[str],
    params: Mapping[str, Any],
    indices: Sequence[str] = (),
) -> tuple[Panel, Panel]:
    """The S2 panel of a batch before and after the cloud filter, with indices and one obs per day.

    Returns (all observations with their cloudy fraction, clear observations). The cloud filter is
    configured by ``cloud_classes`` (SCL classes) and ``max_cloudy`` (fraction) in ``params``.
    """
    panel = build_panel(series.stats, "s2", bands)
    classes = tuple(int(c) for c in param(params, "cloud_classes", DEFAULT_CLOUD_CLASSES))
    panel = attach_clouds(panel, series.scl, classes)
    for name in indices:
        panel = add_index(panel, name)
    panel = drop_missing(panel, list(indices) or list(bands))
    clear = cloud_filter(
        panel,
        float(param(params, "max_cloudy", DEFAULT_MAX_CLOUDY)),
        bool(param(params, "require_scl", False)),
    )
    return panel, dedupe_days(clear)
