"""Grassland mowing marker for real series: cuts as departures below the parcel's recent growth.

A cut removes most of the canopy in a day: NDVI falls by 0.15-0.4 between the last observation
before the cut and the first after it, then recovers over ~3 weeks. Real Sentinel-2 series are
noisier than that picture: haze that SCL calls clear makes single-date dips, clouds hide weeks,
grass is dormant (or already green) before the first growth, a dry summer makes NDVI sink slowly.
So, per parcel:

1. valid observations: the core validity policy (the scheme's [validity]: SCL classes and share, its
   blue-red haze line, quickly regained deep dips, one per day), then the marker's residual-haze
   screen for what the policy lets through: an isolated dip that recovers at the next valid
   observation and coincides with a blue-band (B02) rise, a not fully clear parcel, or a recovery
   too quick for regrowth, is not a cut;
2. the parcel's own noise (robust spread of consecutive differences) sets the drop threshold;
3. the season starts at the observed green-up (half-way from the spring low to the spring high),
   never before ``season_start``: no cut can precede the first growth;
4. a cut is a departure of at least the threshold below the recent high (the highest valid value
   in the preceding few days, or the last one before a gap) from a canopy that was green, followed
   by regrowth when later observations exist;
5. the event is dated between the last high and the first low valid observation (its start/end),
   its main date at the gap's middle, or, in long gaps, where a cut still leaves a visible drop; a
   Sentinel-1 6-day coherence rise in that window confirms the cut and dates it (GRD backscatter
   only helps dating, its speckle being as large as a cut's response on real parcels);
6. a coherence rise alone is a cut only where Sentinel-2 was blind after it, confirmed by a second
   acquisition, and never against a valid Sentinel-2 observation that shows no drop.

Every threshold is a parameter (``DEFAULTS``) or a named constant below; docs/markers.md gives the
reason and source of each. All per-parcel work runs in one numba kernel over pid-sorted arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numba
import numpy as np
import pandas as pd

from cbm_core import impl
from cbm_core.model import Event, MarkerResult, Status, TimeSeries, ValidityPolicy
from markers import _series as ts

NAME = "mowing"
DEFAULTS: dict[str, Any] = {
    "season_start": "03-16",  # earliest cut date (DOY 75 as in the MODCiX protocol); green-up may come later
    "season_end": "10-27",  # latest cut date (DOY 300, same protocol)
    "min_drop": 0.08,  # floor of the NDVI drop threshold (about 2.5 x the noise of a clean parcel)
    "max_drop_threshold": 0.12,  # the noise-derived threshold never exceeds this (subtle cuts: 0.7 -> 0.5)
    "noise_k": 2.5,  # drop threshold = noise_k x the parcel's NDVI noise, within the two bounds above
    "min_high": 0.45,  # NDVI of the last high: a canopy worth cutting (naive rule: drops from above 0.4)
    "drop_window_days": 8,  # the recent high is the highest valid value this many days before a low
    "regrowth_days": 45,  # regrowth must show within this many days after the low ...
    "regrowth_share": 0.3,  # ... recovering at least this share of the drop (spring peaks do not return)
    "recent_cut_days": 12,  # in a long gap, the cut is placed this many days before the first low
    "min_spacing_days": 20,  # two cuts closer than this are one (regrowth takes ~3 weeks)
    "greenup_fraction": 0.5,  # green-up: first valid value half-way from the spring low to the spring high
    "greenup_min_amplitude": 0.1,  # below this spring amplitude the parcel was green already
    "greenup_search_days": 90,  # the spring high is looked for up to this many days after season_start
    "haze_min_dip": 0.05,  # an NDVI dip below both neighbours smaller than this is noise, not screened
    "haze_max_span_days": 30,  # the neighbours of a hazy dip are at most this far apart
    "haze_recovery": 0.7,  # the next value recovers at least this share of the dip
    "haze_blue_rise": 0.025,  # B02 reflectance rise over both neighbours that marks haze
    "haze_min_clear": 0.99,  # a dip on a parcel less clear than this share is haze
    "haze_quick_days": 10,  # a full recovery within this many days is too quick for regrowth ...
    "haze_full_recovery": 0.03,  # ... full = back within this NDVI of the value before the dip
    "haze_noblue_days": 15,  # without B02: a dip regained within this many days ...
    "haze_noblue_recovery": 0.75,  # ... by this share is haze (cuts regain it over 3+ weeks)
    "min_rise": 0.08,  # 6-day coherence rise over the same-orbit median that confirms a cut
    "s1_alone_rise": 0.15,  # coherence rise accepted without Sentinel-2 (where S2 was blind)
    "s1_alone_min_obs": 2,  # ... seen on at least this many acquisitions (one pair is too fragile)
    "s2_sees_days": 15,  # a valid S2 observation this soon after a cut would show its drop
    "bs_min_change_db": 2.0,  # backscatter change that may date a cut in a gap (2 x measured speckle)
    "min_clear_obs": 5,  # valid S2 observations needed in season (else S1 coherence must suffice)
    "min_s1_obs": 10,  # coherence observations needed in season when S2 is insufficient
    "coherence_band": "VV",
    "backscatter_band": "VH",
}
# The parameters a scheme may give this marker (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(DEFAULTS)

SRC_S2, SRC_S1, SRC_BOTH = 1, 2, 3
S1_COHERENCE, S1_BACKSCATTER, S1_NONE = 1, 2, 0

# Kernel constants (not parameters: they follow from the sensors, not from the landscape).
CONTEXT_BEFORE_DAYS = 75.0  # S2 context before season_start: winter level for green-up, recent highs
CONTEXT_AFTER_DAYS = 45.0  # S2 context after season_end: regrowth after a late cut
NOISE_PAIR_MAX_DAYS = 12.0  # consecutive pairs at most this far apart measure noise, not growth
NOISE_MIN_PAIRS = 4  # fewer pairs: the threshold floor applies
ROBUST_SIGMA = 1.4826 / np.sqrt(2.0)  # MAD of differences of two noisy values -> noise of one value
DRYING_DAYS = 6.0  # cut grass keeps drying on the field: the low may come one revisit later
GREENUP_LOOKBACK_DAYS = 30.0  # green-up is looked for from this long before season_start
REGROWTH_FLOOR_DAYS = 12.0  # regrowth counts from the lowest value this soon after the low
COH_PAIR_DAYS = 6.0  # a coherence value at t spans the pair (t - 6 days, t]
COH_LAG_DAYS = 7.5  # a cut is seen in the first pair after it: cut ~ t - 7.5 days (pair mid-span)
S1_BASELINE_OBS = 4  # same-orbit values before t that make its baseline (median)
S1_BASELINE_DAYS = 40.0  # ... within this many days
S1_CONFIRM_AFTER_DAYS = 12.0  # an S1 rise up to this long after the first low still confirms the cut
S1_PEAK_JOIN_DAYS = 7.0  # anomalous acquisitions closer than this form one S1 peak
CONF_CAP = 0.95  # no single sensor makes a verdict certain
CONF_UNCONFIRMED = 0.8  # an S2 cut without later observations to show regrowth
CONF_NO_REGROWTH = 0.5  # a cut whose later observations show no regrowth (yet): reported, too weak alone
NO_REGROWTH_MIN_DROP = 2.0  # without regrowth only a drop of this many thresholds is a cut
CONF_S1_ALONE = 0.7  # an S1-only cut (blind S2) is weaker evidence than a seen drop
CONF_NO_EVENT_S1 = 0.8  # confidence in "no cut" given steady coherence coverage
NO_EVENT_FULL_GAP = 15.0  # longest S2 gap (days) that still rules out an unseen cut
NO_EVENT_ZERO_GAP = 60.0  # longest gap at which "no cut" has no S2 support left


class KernelParams(NamedTuple):
    """The kernel's parameters by name (a numba-compatible tuple; see DEFAULTS for each reason)."""

    min_drop: float
    max_drop_threshold: float
    noise_k: float
    min_high: float
    drop_window_days: float
    regrowth_days: float
    regrowth_share: float
    recent_cut_days: float
    min_spacing_days: float
    greenup_fraction: float
    greenup_min_amplitude: float
    greenup_search_days: float
    haze_min_dip: float
    haze_max_span_days: float
    haze_recovery: float
    haze_blue_rise: float
    haze_min_clear: float
    haze_quick_days: float
    haze_full_recovery: float
    haze_noblue_days: float
    haze_noblue_recovery: float
    min_rise: float
    s1_alone_rise: float
    s1_alone_min_obs: float
    s2_sees_days: float
    bs_min_change_db: float


def kernel_params(p: Mapping[str, Any]) -> KernelParams:
    """The kernel's parameters from the merged marker parameters (all as floats)."""
    return KernelParams(**{name: float(p[name]) for name in KernelParams._fields})


@impl
def cbm_marker_requires(params: Mapping[str, Any]) -> Mapping[str, list[str]]:
    return {"s2": ["B04|NDVI", "B08|NDVI"]}  # NDVI from B04/B08, else an NDVI band; S1 optional


@impl
def cbm_marker_run(series: TimeSeries, params: Mapping[str, Any]) -> list[MarkerResult]:
    return run(series, params)


def _s2_series(series: TimeSeries, p: Mapping[str, Any]) -> tuple[ts.Panel, ts.Panel]:
    """All S2 observations with an NDVI, and the valid (cloud-filtered, one per day) ones.

    NDVI comes from B04/B08 where both exist, else from an NDVI band of the table (signature
    tables often carry the index only). B02 stays NaN where absent (the haze screen then relies on
    the dip's recovery).
    """
    panel = ts.build_panel(series.stats, "s2", ("B02", "B04", "B08", "NDVI"))
    policy = ValidityPolicy.of(p)  # the scheme's one observation-validity policy
    panel = ts.attach_clouds(panel, series.scl, policy)
    v = panel.values
    with np.errstate(divide="ignore", invalid="ignore"):
        computed = (v["B08"] - v["B04"]) / (v["B08"] + v["B04"])
    ndvi = np.where(np.isfinite(computed), computed, v["NDVI"])
    panel.values["NDVI"] = np.where(np.isfinite(ndvi), ndvi, np.nan)
    panel = ts.drop_missing(panel, ["NDVI"])
    panel = ts.screen(panel, policy)
    return panel, panel.take(panel.valid)


# S1 band names seen in signature tables: the engine's (VV/VH on cards c6/bs) and the JRC client's
# (VVc/VHc coherence, VVb/VHb backscatter); the configured band is tried first, then these.
COHERENCE_BANDS = ("VV", "VVc", "VH", "VHc")
BACKSCATTER_BANDS = ("VH", "VHb", "VV", "VVb")


def _first_band(series: TimeSeries, card: str, wanted: str, fallbacks: tuple[str, ...]) -> ts.Panel:
    """The panel of the first band of ``card`` with data: the configured one, else a known alias."""
    panel = None
    for band in dict.fromkeys((wanted, *fallbacks)):
        panel = ts.drop_missing(ts.build_panel(series.stats, card, (band,)), (band,))
        if len(panel.t):
            panel.values["signal"] = panel.values[band]
            return panel
    panel.values["signal"] = np.zeros(0)
    return panel


def _s1_series(series: TimeSeries, p: Mapping[str, Any]) -> tuple[ts.Panel, int]:
    """The S1 cut signal: 6-day coherence (rises after a cut), else GRD backscatter in dB."""
    c6 = _first_band(series, "c6", str(p["coherence_band"]), COHERENCE_BANDS)
    if len(c6.t):
        c6.values["signal"] = np.clip(c6.values["signal"], 0, 1)
        return c6, S1_COHERENCE
    bs = _first_band(series, "bs", str(p["backscatter_band"]), BACKSCATTER_BANDS)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10 * np.log10(bs.values["signal"])
    bs.values["signal"] = np.where(np.isfinite(db), db, np.nan)
    bs = ts.drop_missing(bs, ("signal",))
    return bs, (S1_BACKSCATTER if len(bs.t) else S1_NONE)


def run(series: TimeSeries, params: Mapping[str, Any] | None = None) -> list[MarkerResult]:
    """Detect cuts for every parcel of the batch: one result per parcel."""
    p = {**DEFAULTS, **(params or {})}
    name = str(p.get("name", NAME))
    pids = ts.batch_pids(series)
    full, s2 = _s2_series(series, p)
    s1, s1_kind = _s1_series(series, p)
    lo, hi = ts.season_bounds(
        full if len(full.t) else s1, p["season_start"], p["season_end"], ts.campaign_year(p)
    )
    s2_pos, s1_pos, full_pos = ts.align(s2, pids), ts.align(s1, pids), ts.align(full, pids)
    blue = s2.values["B02"]
    clear = np.ones(len(s2.t)) if s2.cloudy is None else 1 - np.nan_to_num(s2.cloudy, nan=0.0)
    out = _kernel(
        *ts.obs_ranges(s2, s2_pos),
        s2.t,
        s2.values["NDVI"],
        blue,
        clear,
        *ts.obs_ranges(s1, s1_pos),
        s1.t,
        s1.values["signal"] if len(s1.t) else np.zeros(0),
        _orbit_codes(s1),
        s1_kind,
        lo,
        hi,
        kernel_params(p),
    )
    slot, n_ev, ev_src, ev_t, ev_f, ev_i, counts, floats, context = out
    ev_parcel = np.repeat(np.arange(len(pids)), n_ev)
    within = np.arange(len(ev_parcel)) - np.repeat(np.cumsum(n_ev) - n_ev, n_ev)
    used = slot[:-1][ev_parcel] + within  # compact the per-parcel slots
    n_all = np.stack([ts.obs_count(full, full_pos), ts.obs_count(s2, s2_pos)])  # all, valid (any date)
    with ts.no_gc():
        return _results(
            name,
            p,
            lo,
            hi,
            pids,
            s2,
            s1,
            s1_kind,
            ev_parcel,
            ev_src[used],
            ev_t[used],
            ev_f[used],
            ev_i[used],
            counts,
            floats,
            n_all,
            _evidence(full, s2, pids, context, lo, hi),
        )


HAZE_REASON = "NDVI dip regained at the next valid observation (residual haze or shadow)"


def _by_parcel(position: np.ndarray, items: np.ndarray, n: int) -> list[tuple]:
    """``items`` grouped by their parcel ``position`` (0..n-1; -1 dropped), in their original order."""
    keep = position >= 0
    position, items = position[keep], items[keep]
    order = np.argsort(position, kind="stable")
    flat = items[order].tolist()
    ends = np.cumsum(np.bincount(position, minlength=n)).tolist()
    return [tuple(flat[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _evidence(
    full: ts.Panel, s2: ts.Panel, pids: np.ndarray, context: np.ndarray, lo: float, hi: float
) -> tuple[list[tuple[str, ...]], list[tuple[tuple[str, str], ...]]]:
    """Per parcel: the S2 observations the kernel used and those left out with the reason.

    ``context`` marks, per valid observation, 1 = used, 2 = screened as haze, 0 = outside the
    season and its context. Observations the validity policy rejected are reported with its reason.
    """
    n = len(pids)
    where = pd.Index(pids)
    s2_pos = where.get_indexer(np.repeat(s2.pids, s2.n_obs))
    s2_label = np.asarray(s2.obs_names, dtype=object)[s2.obs] if len(s2.t) else np.zeros(0, object)
    used_by = _by_parcel(s2_pos[context == 1], s2_label[context == 1], n)
    hazy_by = _by_parcel(s2_pos[context == 2], s2_label[context == 2], n)
    bad = np.zeros(len(full.t), bool) if full.valid is None else ~full.valid
    bad &= (full.t >= lo - CONTEXT_BEFORE_DAYS) & (full.t <= hi + CONTEXT_AFTER_DAYS)
    full_pos = where.get_indexer(np.repeat(full.pids, full.n_obs))[bad]
    labels = np.asarray(full.obs_names, dtype=object)[full.obs[bad]] if bad.any() else np.zeros(0, object)
    why = full.why[bad] if full.why is not None else np.full(int(bad.sum()), "", dtype=object)
    bad_by, why_by = _by_parcel(full_pos, labels, n), _by_parcel(full_pos, why, n)
    rejected = [
        tuple(zip(b, w, strict=True)) + tuple((x, HAZE_REASON) for x in h)
        if h
        else tuple(zip(b, w, strict=True))
        for b, w, h in zip(bad_by, why_by, hazy_by, strict=True)
    ]
    return used_by, rejected


def _orbit_codes(panel: ts.Panel) -> np.ndarray:
    if panel.orbit_code is None or not len(panel.t):
        return np.zeros(len(panel.t), dtype=np.int64)
    return np.maximum(panel.orbit_code, 0).astype(np.int64)


@numba.njit(cache=True)
def _median(buf: np.ndarray, n: int) -> float:
    """Median of the first n values, sorted in place (insertion sort: n is small)."""
    for a in range(1, n):
        x = buf[a]
        b = a - 1
        while b >= 0 and buf[b] > x:
            buf[b + 1] = buf[b]
            b -= 1
        buf[b + 1] = x
    return buf[n // 2] if n % 2 else 0.5 * (buf[n // 2 - 1] + buf[n // 2])


@numba.njit(cache=True)
def _haze_screen(t, v, b, c, kp):
    """Keep-mask of valid observations: False for isolated dips that are haze, not cuts."""
    m = len(t)
    keep = np.ones(m, np.bool_)
    for k in range(1, m - 1):
        a, x, z = v[k - 1], v[k], v[k + 1]
        dip = a - x
        if dip < kp.haze_min_dip or z - x < kp.haze_recovery * dip:
            continue  # not a dip, or one that stays down (a cut stays down for days)
        if t[k + 1] - t[k - 1] > kp.haze_max_span_days:
            continue  # neighbours too far apart to call the dip isolated
        blue = b[k] - max(b[k - 1], b[k + 1])  # NaN when B02 is absent: the test is then False
        hazy = blue >= kp.haze_blue_rise or c[k] < kp.haze_min_clear
        quick = t[k + 1] - t[k] <= kp.haze_quick_days and z >= a - kp.haze_full_recovery
        if not np.isfinite(blue):  # no blue band: a mostly regained dip within two weeks is haze too
            quick = quick or (
                t[k + 1] - t[k] <= kp.haze_noblue_days and z - x >= kp.haze_noblue_recovery * dip
            )
        if hazy or quick:
            keep[k] = False
    return keep


@numba.njit(cache=True)
def _noise(t, v, lo, hi):
    """The parcel's NDVI noise: robust spread of close consecutive differences in the season."""
    d = np.empty(max(len(t) - 1, 1))
    n = 0
    for k in range(len(t) - 1):
        if t[k] >= lo and t[k + 1] <= hi and t[k + 1] - t[k] <= NOISE_PAIR_MAX_DAYS:
            d[n] = abs(v[k + 1] - v[k])
            n += 1
    if n < NOISE_MIN_PAIRS:
        return np.nan
    return ROBUST_SIGMA * np.median(d[:n])


@numba.njit(cache=True)
def _greenup(t, v, lo, kp):
    """Day of the observed green-up (-inf when the parcel was green already or data are too few).

    Values are 3-point medians (one noisy value cannot fake a low or a high), from
    ``GREENUP_LOOKBACK_DAYS`` before the season start (earlier winter dates carry low-sun artefacts)
    to ``greenup_search_days`` after it. The spring high is the highest value there, the low the
    lowest before it; green-up is the first value of the window reaching ``greenup_fraction`` of the
    way. Searching from the window's start, not from the low, matters: when an early cut is the low
    and the regrowth the high, the canopy was already at that level before the cut.
    """
    m = len(t)
    if m < 3:
        return -np.inf
    s = np.empty(m)
    buf = np.empty(3)
    for k in range(m):
        if k == 0 or k == m - 1:
            s[k] = v[k]
        else:
            buf[0], buf[1], buf[2] = v[k - 1], v[k], v[k + 1]
            s[k] = _median(buf, 3)
    start, end = lo - GREENUP_LOOKBACK_DAYS, lo + kp.greenup_search_days
    k0 = 0
    while k0 < m and t[k0] < start:
        k0 += 1
    k_hi = -1
    for k in range(k0, m):
        if t[k] <= end and (k_hi < 0 or s[k] > s[k_hi]):
            k_hi = k
    if k_hi < 0:
        return -np.inf
    k_lo = k0
    for k in range(k0, k_hi + 1):
        if s[k] < s[k_lo]:
            k_lo = k
    amplitude = s[k_hi] - s[k_lo]
    if amplitude < kp.greenup_min_amplitude:
        return -np.inf
    level = s[k_lo] + kp.greenup_fraction * amplitude
    for k in range(k0, k_hi + 1):
        if s[k] >= level:
            return t[k]
    return t[k_hi]


@numba.njit(cache=True)
def _s1_anomalies(ct, cv, corb, c0, c1, lo, hi, kind):
    """Per S1 acquisition: the cut signal minus the median of recent same-orbit values (NaN: no baseline).

    Coherence rises after a cut (positive anomaly); for backscatter the absolute change is used.
    """
    out = np.full(c1 - c0, np.nan)
    buf = np.empty(S1_BASELINE_OBS)
    for i in range(c0, c1):
        if ct[i] < lo - CONTEXT_BEFORE_DAYS or ct[i] > hi + CONTEXT_AFTER_DAYS:
            continue
        nb = 0
        j = i - 1
        while j >= c0 and nb < S1_BASELINE_OBS:
            if corb[j] == corb[i] and ct[i] - ct[j] <= S1_BASELINE_DAYS:
                buf[nb] = cv[j]
                nb += 1
            j -= 1
        if nb >= 2:
            a = cv[i] - _median(buf, nb)
            out[i - c0] = a if kind == S1_COHERENCE else abs(a)
    return out


@numba.njit(cache=True, parallel=True)
def _kernel(s_start, s_end, st, sv, sb, sc, c_start, c_end, ct, cv, corb, s1_kind, lo, hi, kp):
    """Per parcel: screen haze, measure noise and green-up, find departures, fuse with S1, space them.

    Event arrays: ev_t = (start, main, end) day numbers, ev_f = (magnitude, confidence), ev_i =
    (S2 last high, S2 first low, S1) observation indices (-1 when unused). Per parcel: counts =
    (valid S2 in season, S1 in season, hazy dips removed), floats = (longest S2 gap, noise, drop
    threshold, green-up day); per valid S2 observation, context = 1 used, 2 screened as haze.
    """
    n_p = len(s_start)
    slot = np.zeros(n_p + 1, np.int64)  # each parcel writes its events in its own slot range
    for p in range(n_p):
        slot[p + 1] = slot[p] + (s_end[p] - s_start[p]) + (c_end[p] - c_start[p]) + 1
    ev_src = np.empty(slot[n_p], np.int64)
    ev_t = np.empty((slot[n_p], 3))
    ev_f = np.empty((slot[n_p], 2))
    ev_i = np.empty((slot[n_p], 3), np.int64)
    n_ev = np.zeros(n_p, np.int64)
    counts = np.zeros((n_p, 3), np.int64)
    floats = np.full((n_p, 4), np.nan)
    context = np.zeros(len(st), np.int8)  # per valid S2 observation: 1 used, 2 haze, 0 out of context
    for p in numba.prange(n_p):
        w = slot[p]
        # valid S2 observations in the season and its context (a contiguous, time-sorted range), haze screened
        a0 = s_start[p]
        while a0 < s_end[p] and st[a0] < lo - CONTEXT_BEFORE_DAYS:
            a0 += 1
        b0 = a0
        while b0 < s_end[p] and st[b0] <= hi + CONTEXT_AFTER_DAYS:
            b0 += 1
        keep = _haze_screen(st[a0:b0], sv[a0:b0], sb[a0:b0], sc[a0:b0], kp)
        for i in range(a0, b0):
            context[i] = 1 if keep[i - a0] else 2
        idx = np.flatnonzero(keep) + a0
        counts[p, 2] = b0 - a0 - len(idx)
        t = st[idx]
        v = sv[idx]
        m = len(idx)
        last = lo
        gap = 0.0
        for k in range(m):
            if t[k] >= lo and t[k] <= hi + 1:
                counts[p, 0] += 1
                gap = max(gap, t[k] - last)
                last = t[k]
        floats[p, 0] = max(gap, hi - last)
        sigma = _noise(t, v, lo, hi)
        thr = kp.min_drop
        if np.isfinite(sigma):
            thr = min(max(kp.noise_k * sigma, kp.min_drop), kp.max_drop_threshold)
        green = _greenup(t, v, lo, kp)
        floats[p, 1], floats[p, 2], floats[p, 3] = sigma, thr, green
        # S1 anomalies
        c0, c1 = c_start[p], c_end[p]
        for i in range(c0, c1):
            if ct[i] >= lo and ct[i] <= hi + 1:
                counts[p, 1] += 1
        anom = _s1_anomalies(ct, cv, corb, c0, c1, lo, hi, s1_kind)
        s1_used = np.zeros(c1 - c0, np.bool_)
        s1_gate = kp.min_rise if s1_kind == S1_COHERENCE else kp.bs_min_change_db
        # S2 departures below the recent high
        k = 1
        while k < m:
            # recent high: the highest value in the drop window before t[k], else the last one
            h = k - 1
            j = k - 1
            while j >= 0 and t[k] - t[j] <= kp.drop_window_days:
                if v[j] > v[h]:
                    h = j
                j -= 1
            if v[h] - v[k] < thr or v[h] < kp.min_high or t[h] < green:
                k += 1
                continue
            # the low: this value or a drier one a revisit later
            low = k
            j = k + 1
            while j < m and t[j] - t[k] <= DRYING_DAYS:
                if v[j] < v[low]:
                    low = j
                j += 1
            drop = v[h] - v[low]
            # last high = last value before the first low still within half a threshold of the high
            a = k - 1
            while a > h and v[a] < v[h] - 0.5 * thr:
                a -= 1
            ta, tb = t[a], t[a + 1]
            # regrowth after the low (no later value: unconfirmed, weaker)
            seen_after = False
            regrown = False
            floor = v[low]  # cut grass may sink a little longer before it regrows; a drought keeps sinking
            j = low + 1
            while j < m and t[j] - t[low] <= kp.regrowth_days:
                seen_after = True
                if t[j] - t[low] <= REGROWTH_FLOOR_DAYS:
                    floor = min(floor, v[j])
                if v[j] - floor >= kp.regrowth_share * drop:
                    regrown = True
                    break
                j += 1
            nxt = low + 1
            while nxt < m and t[nxt] - t[low] <= DRYING_DAYS:
                nxt += 1
            if seen_after and not regrown and drop < NO_REGROWTH_MIN_DROP * thr:
                k = nxt
                continue  # a small step that stays down: senescence or drought, not a cut
            main = max(0.5 * (ta + tb), tb - kp.recent_cut_days)
            conf = min(CONF_CAP, 0.5 + 0.5 * (drop - thr) / thr)
            if not seen_after:
                conf *= CONF_UNCONFIRMED
            elif not regrown:
                conf *= CONF_NO_REGROWTH  # a deep cut in a dry summer may not regrow for weeks
            src = SRC_S2
            ci = -1
            # S1 in the window: the strongest anomaly dates the cut (coherence also confirms it)
            best = -1
            for i in range(c0, c1):
                an = anom[i - c0]
                if not (an >= s1_gate) or s1_used[i - c0]:
                    continue
                if s1_kind == S1_COHERENCE:
                    ok = ct[i] > ta + 1 and ct[i] <= tb + S1_CONFIRM_AFTER_DAYS
                else:
                    ok = ct[i] > ta and ct[i] <= tb
                if ok and (best < 0 or an > anom[best - c0]):
                    best = i
            if best >= 0:
                s1_used[best - c0] = True
                ci = best
                if s1_kind == S1_COHERENCE:
                    main = min(max(ct[best] - COH_LAG_DAYS, ta), tb)
                    p1 = min(CONF_CAP, anom[best - c0] / (2 * kp.min_rise))
                    conf = 1 - (1 - conf) * (1 - p1)
                    src = SRC_BOTH
                else:
                    main = min(max(ct[best] - 0.5 * COH_PAIR_DAYS, ta), tb)
            ev_src[w] = src
            ev_t[w, 0], ev_t[w, 1], ev_t[w, 2] = ta, main, tb
            ev_f[w, 0], ev_f[w, 1] = drop, conf
            ev_i[w, 0], ev_i[w, 1], ev_i[w, 2] = idx[a], idx[a + 1], ci
            w += 1
            k = nxt
        # coherence alone, where S2 was blind after the cut
        if s1_kind == S1_COHERENCE:
            i = c0
            while i < c1:
                an = anom[i - c0]
                if not (an >= kp.min_rise) or s1_used[i - c0]:
                    i += 1
                    continue
                f = i
                mag = an
                n_hi = 0
                while i < c1 and (anom[i - c0] >= kp.min_rise) and ct[i] - ct[f] <= 2 * S1_PEAK_JOIN_DAYS:
                    mag = max(mag, anom[i - c0])
                    n_hi += 1
                    i += 1
                d = ct[f] - COH_LAG_DAYS
                if mag < kp.s1_alone_rise or n_hi < kp.s1_alone_min_obs or d < green:
                    continue
                before = -1
                after = -1
                for kk in range(m):
                    if t[kk] <= d:
                        before = kk
                    elif after < 0:
                        after = kk
                if after >= 0 and t[after] - d <= kp.s2_sees_days:
                    continue  # S2 looked soon after: its (missing) drop is the better evidence
                if before >= 0 and v[before] < kp.min_high:
                    continue  # nothing to cut
                ev_src[w] = SRC_S1
                ev_t[w, 0], ev_t[w, 1], ev_t[w, 2] = ct[f] - COH_PAIR_DAYS - COH_LAG_DAYS, d, ct[f]
                ev_f[w, 0], ev_f[w, 1] = mag, CONF_S1_ALONE * min(CONF_CAP, mag / (2 * kp.min_rise))
                ev_i[w, 0] = idx[before] if before >= 0 else -1
                ev_i[w, 1] = idx[after] if after >= 0 else -1
                ev_i[w, 2] = f
                w += 1
        # order by main date, keep the season, merge cuts closer than the spacing
        first = slot[p]
        cnt = w - first
        if cnt == 0:
            continue
        order = np.argsort(ev_t[first:w, 1]) + first
        tmp_src = ev_src[order].copy()
        tmp_t = ev_t[order].copy()
        tmp_f = ev_f[order].copy()
        tmp_i = ev_i[order].copy()
        w = first
        for r in range(cnt):
            if tmp_t[r, 1] < lo or tmp_t[r, 1] >= hi + 1:
                continue
            if w > first and tmp_t[r, 1] - ev_t[w - 1, 1] < kp.min_spacing_days:
                if tmp_f[r, 1] > ev_f[w - 1, 1]:
                    ev_src[w - 1] = tmp_src[r]
                    ev_t[w - 1] = tmp_t[r]
                    ev_f[w - 1] = tmp_f[r]
                    ev_i[w - 1] = tmp_i[r]
                continue
            ev_src[w] = tmp_src[r]
            ev_t[w] = tmp_t[r]
            ev_f[w] = tmp_f[r]
            ev_i[w] = tmp_i[r]
            w += 1
        n_ev[p] = w - first
    return slot, n_ev, ev_src, ev_t, ev_f, ev_i, counts, floats, context


def _results(
    name: str,
    p: Mapping[str, Any],
    lo: float,
    hi: float,
    pids: np.ndarray,
    s2: ts.Panel,
    s1: ts.Panel,
    s1_kind: int,
    ev_parcel: np.ndarray,
    ev_src: np.ndarray,
    ev_t: np.ndarray,
    ev_f: np.ndarray,
    ev_i: np.ndarray,
    counts: np.ndarray,
    floats: np.ndarray,
    n_all: np.ndarray,
    evidence: tuple[list[tuple[str, ...]], list[tuple[tuple[str, str], ...]]],
) -> list[MarkerResult]:
    """Assemble one MarkerResult per parcel from the kernel's flat event arrays."""
    s2_names = [str(x) for x in s2.obs_names]
    s1_names = [str(x) for x in s1.obs_names]
    s2_obs, s1_obs = s2.obs.tolist(), s1.obs.tolist()
    ev_i = ev_i.tolist()
    day = np.floor(ev_t).astype(np.int64)
    base = int(day.min()) if len(day) else 0
    table = [ts.to_date(base + d) for d in range(int(day.max()) - base + 1)] if len(day) else []
    ev_d = (day - base).tolist()  # event dates as indices into one table of date objects
    ev_mag = np.round(ev_f[:, 0], 4).tolist()
    ev_conf = np.round(ev_f[:, 1], 3).tolist()
    kinds = {SRC_S2: "mowing:s2", SRC_S1: "mowing:s1", SRC_BOTH: "mowing:s2+s1"}
    ev_kind = [kinds[x] for x in ev_src.tolist()]
    bounds = np.searchsorted(ev_parcel, np.arange(len(pids) + 1)).tolist()
    min_clear, min_s1 = int(p["min_clear_obs"]), int(p["min_s1_obs"])
    n_valid, n_s1, n_hazy = (counts[:, j].tolist() for j in range(3))
    max_gap = np.round(floats[:, 0], 1).tolist()
    noise = np.round(floats[:, 1], 4).tolist()
    thr = np.round(floats[:, 2], 4).tolist()
    green = np.floor(np.nan_to_num(floats[:, 3], nan=-np.inf, neginf=-np.inf))
    iso = {g: ts.to_date(g).isoformat() for g in np.unique(green[np.isfinite(green)]).tolist()}
    green_date = [iso.get(g) for g in green.tolist()]  # one date string per distinct day
    n_all, n_valid_any = n_all.tolist()
    n_coh = n_s1 if s1_kind == S1_COHERENCE else [0] * len(pids)
    used_s2, rejected = evidence
    window = f"{ts.to_date(lo)}..{ts.to_date(hi)}" if np.isfinite(lo) and np.isfinite(hi) else "the season"
    out = []
    for k, pid in enumerate(pids.tolist()):
        ns2, nc6 = n_valid[k], n_coh[k]
        values = {
            "n_clear_s2": ns2,
            "n_s2": n_all[k],
            "n_hazy_s2": n_hazy[k],
            "n_coherence": nc6,
            "n_backscatter": n_s1[k] if s1_kind == S1_BACKSCATTER else 0,
            "max_gap_s2": max_gap[k],
            "ndvi_noise": None if noise[k] != noise[k] else noise[k],
            "drop_threshold": thr[k],
            "greenup": green_date[k],
            # the evidence the traffic-light rule weighs (docs/markers.md)
            "valid_observations": ns2,
            "window": window,
            "max_gap_days": max_gap[k],
        }
        if ns2 < min_clear and nc6 < min_s1:
            if n_all[k] == 0 and nc6 == 0:
                reason = "no Sentinel-2 B04/B08 (or NDVI) nor Sentinel-1 coherence observation in the season"
            elif ns2 == 0 and n_valid_any[k] > 0:
                reason = (
                    f"no valid Sentinel-2 observation in the season {window} "
                    f"({n_valid_any[k]} valid outside it), {nc6} S1 coherence"
                )
            elif ns2 == 0 and n_all[k] > 0:
                reason = f"all {n_all[k]} Sentinel-2 observations cloudy or invalid, {nc6} S1 coherence"
            else:
                reason = (
                    f"too few observations in season: {ns2} valid S2 (need {min_clear}) and "
                    f"{nc6} S1 coherence (need {min_s1})"
                )
            if s1_kind == S1_BACKSCATTER and n_s1[k]:
                reason += "; S1 backscatter alone does not show cuts (speckle as large as a cut's change)"
            out.append(
                MarkerResult(
                    name,
                    pid,
                    Status.NOT_VALID,
                    reason,
                    values=values,
                    confidence=0.0,
                    obsids=used_s2[k],
                    rejected=rejected[k],
                )
            )
            continue
        events = []
        s1_used: list[str] = []
        for e in range(bounds[k], bounds[k + 1]):
            ia, ib, ic = ev_i[e]
            used = [s2_names[s2_obs[i]] for i in (ia, ib) if i >= 0]
            if ic >= 0:
                used.append(s1_names[s1_obs[ic]])
                s1_used.append(used[-1])
            d0, d1, d2 = ev_d[e]
            events.append(
                Event(table[d0], table[d1], table[d2], ev_mag[e], ev_conf[e], tuple(used), ev_kind[e])
            )
        values["n_events"] = len(events)
        values["n_observations"] = ns2 + nc6
        if events:
            conf = sum(e.confidence for e in events) / len(events)
        else:  # confidence that no cut was missed: dense S2 coverage or steady coherence
            span = NO_EVENT_ZERO_GAP - NO_EVENT_FULL_GAP
            cov_s2 = (
                min(1.0, max(0.0, 1 - (max_gap[k] - NO_EVENT_FULL_GAP) / span)) if ns2 >= min_clear else 0.0
            )
            cov_s1 = CONF_NO_EVENT_S1 if nc6 >= min_s1 else 0.0
            conf = max(cov_s2, cov_s1)
        seen = f"{ns2} valid S2 observation(s) {window} (longest gap {max_gap[k]:g} days)"
        if events:
            cuts = ", ".join(f"{e.main} (-{e.magnitude:.2f})" for e in events)
            reason = f"{len(events)} cut(s): {cuts}; {seen}"
        else:
            reason = f"no NDVI fall of {thr[k]:.2f} or more followed by regrowth; {seen}"
        out.append(
            MarkerResult(
                name,
                pid,
                Status.OK,
                reason,
                events,
                values,
                round(conf, 3),
                used_s2[k] + tuple(s1_used),
                rejected[k],
            )
        )
    return out
