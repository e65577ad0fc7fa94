"""Bare-soil and ploughing marker: NDVI and the bare soil index (BSI) over a period.

Ploughing turns residue or canopy into freshly tilled soil: NDVI falls below ~0.25 while BSI
(SWIR + red against NIR + blue) jumps. The marker reports, per parcel, the bare-soil periods
(consecutive clear observations that look bare), the days of bare soil within the period, and
dated ploughing events (the step into tilled soil). Schemes use it both ways: soil-cover rules
(no bare soil for more than N days) and ploughing bans (no ploughing of permanent grassland).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numba
import numpy as np

from cbm_core import impl
from cbm_core.model import Event, MarkerResult, Status, TimeSeries
from markers import _series as ts

NAME = "bare_soil"
DEFAULTS: dict[str, Any] = {
    "period_start": "01-01",  # MM-DD or a date
    "period_end": "12-31",
    "ndvi_max": 0.25,  # an observation is bare when NDVI is at most this...
    "bsi_min": 0.15,  # ...and BSI at least this (tilled soil; residue stays lower)
    "min_bsi_rise": 0.07,  # BSI step into a bare observation that dates a ploughing
    "max_step_days": 40,  # longer gaps cannot date a ploughing
    "min_spacing_days": 30,  # a second step into bare soil sooner is the same tillage (noise flicker)
    "min_clear_obs": 4,
    "visible_days": 30,  # how long tilled soil stays visibly bare (sets the confidence of "no event")
    "max_bare_days": None,  # when set, a parcel bare for longer gets a "bare_soil" event
}
# The parameters a scheme may give this marker (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(DEFAULTS)
BANDS = ("B02", "B04", "B08", "B11")


@impl
def cbm_marker_requires(params: Mapping[str, Any]) -> Mapping[str, list[str]]:
    return {"s2": list(BANDS)}


@impl
def cbm_marker_run(series: TimeSeries, params: Mapping[str, Any]) -> list[MarkerResult]:
    return run(series, params)


def run(series: TimeSeries, params: Mapping[str, Any] | None = None) -> list[MarkerResult]:
    """Bare-soil days, periods and ploughing events for every parcel of the batch."""
    p = {**DEFAULTS, **(params or {})}
    name = str(p.get("name", NAME))
    pids = ts.batch_pids(series)
    full, clear = ts.s2_panel(series, BANDS, p, indices=("NDVI", "BSI"))
    lo, hi = ts.season_bounds(full, p["period_start"], p["period_end"], ts.campaign_year(p))
    n_clear_any = ts.obs_count(clear, ts.align(clear, pids))
    clear = ts.in_window(clear, lo, hi)
    seen = ts.in_window(full, lo, hi)
    seen_pos = ts.align(seen, pids)
    seen_start, seen_end = ts.obs_ranges(seen, seen_pos)
    dropped = ts.rejected(seen)
    pos = ts.align(clear, pids)
    start, end = ts.obs_ranges(clear, pos)
    bare = (clear.values["NDVI"] <= float(p["ndvi_max"])) & (clear.values["BSI"] >= float(p["bsi_min"]))
    ev_parcel, ev_a, ev_b, n_ev, bare_days, longest, n_bare = _kernel(
        start,
        end,
        clear.t,
        clear.values["BSI"],
        bare,
        float(p["min_bsi_rise"]),
        float(p["max_step_days"]),
        float(p["min_spacing_days"]),
    )
    n_all = ts.obs_count(full, ts.align(full, pids))
    names = [str(x) for x in clear.obs_names]
    obs = clear.obs.tolist()
    t = clear.t.tolist()
    bsi, ndvi = clear.values["BSI"].tolist(), clear.values["NDVI"].tolist()
    bounds = np.searchsorted(ev_parcel[:n_ev], np.arange(len(pids) + 1)).tolist()
    ev_a, ev_b = ev_a[:n_ev].tolist(), ev_b[:n_ev].tolist()
    max_bare = p["max_bare_days"]
    out = []
    with ts.no_gc():
        for k, pid in enumerate(pids.tolist()):
            n = int(end[k] - start[k])
            window, gap = ts.evidence_window(
                seen.t[seen_start[k] : seen_end[k]], clear.t[start[k] : end[k]], lo, hi
            )
            rejected = dropped[seen_pos[k]] if seen_pos[k] >= 0 else ()
            used = tuple(names[obs[i]] for i in range(int(start[k]), int(end[k])))
            values = {
                "valid_observations": n,
                "window": window,
                "max_gap_days": gap,
                "n_clear": n,
                "n_s2": int(n_all[k]),
                "bare_days": round(float(bare_days[k]), 1),
                "longest_bare_days": round(float(longest[k]), 1),
                "n_bare_obs": int(n_bare[k]),
            }
            if n < int(p["min_clear_obs"]):
                why = (
                    "no valid Sentinel-2 observation"
                    if n_clear_any[k] == 0 and n_all[k]
                    else "too few valid Sentinel-2"
                )
                reason = f"{why}: {n} valid observation(s) in {window}, {p['min_clear_obs']} needed"
                out.append(
                    MarkerResult(
                        name,
                        pid,
                        Status.NOT_VALID,
                        reason,
                        values=values,
                        confidence=0.0,
                        obsids=used,
                        rejected=rejected,
                    )
                )
                continue
            events = []
            for e in range(bounds[k], bounds[k + 1]):
                a, b = ev_a[e], ev_b[e]
                rise = bsi[b] - bsi[a]
                events.append(
                    Event(
                        ts.to_date(t[a]),
                        ts.to_date(0.5 * (t[a] + t[b])),
                        ts.to_date(t[b]),
                        round(rise, 4),
                        round(min(0.95, rise / (2 * float(p["min_bsi_rise"]))), 3),
                        (names[obs[a]], names[obs[b]]),
                        "ploughing",
                    )
                )
            if max_bare is not None and longest[k] > float(max_bare):
                i0 = int(start[k])
                first_bare = next(i for i in range(i0, int(end[k])) if ndvi[i] <= float(p["ndvi_max"]))
                events.append(
                    Event(
                        ts.to_date(t[first_bare]),
                        ts.to_date(t[first_bare]),
                        ts.to_date(t[int(end[k]) - 1]),
                        round(float(longest[k]), 1),
                        0.9,
                        (names[obs[first_bare]],),
                        "bare_soil",
                    )
                )
            # tilled soil stays bare for weeks: only the part of a gap beyond that can hide a ploughing
            gaps = np.diff(np.concatenate([[lo], clear.t[start[k] : end[k]], [hi + 1]]))
            hidden = float(np.maximum(gaps - float(p["visible_days"]), 0).sum())
            confidence = round(max(0.0, 1 - hidden / max(hi + 1 - lo, 1.0)), 3)
            values["max_gap"] = round(float(gaps.max()), 1)
            values["n_observations"] = n
            reason = (
                f"{len(events)} event(s) in {n} valid observation(s) {window}"
                if events
                else f"no ploughing step in {n} valid observation(s) {window}; "
                f"bare {values['bare_days']:g} days, longest {values['longest_bare_days']:g}"
            )
            out.append(MarkerResult(name, pid, Status.OK, reason, events, values, confidence, used, rejected))
    return out


@numba.njit(cache=True)
def _kernel(start, end, t, bsi, bare, min_rise, max_step, min_spacing):
    """Ploughing steps (into a bare observation with a BSI rise) and bare-soil durations per parcel.

    A bare observation counts half the gap to each clear neighbour as bare days.
    """
    n_p = len(start)
    ev_parcel = np.empty(len(t) + 1, np.int64)
    ev_a = np.empty(len(t) + 1, np.int64)
    ev_b = np.empty(len(t) + 1, np.int64)
    bare_days = np.zeros(n_p)
    longest = np.zeros(n_p)
    n_bare = np.zeros(n_p, np.int64)
    n_ev = 0
    for p in range(n_p):
        run = 0.0
        for i in range(start[p], end[p]):
            if not bare[i]:
                run = 0.0
                continue
            n_bare[p] += 1
            left = 0.5 * (t[i] - t[i - 1]) if i > start[p] else 0.0
            right = 0.5 * (t[i + 1] - t[i]) if i + 1 < end[p] else 0.0
            bare_days[p] += left + right
            run += left + right if run == 0.0 else (t[i] - t[i - 1]) * 0.5 + right
            longest[p] = max(longest[p], run)
            if i > start[p] and not bare[i - 1]:
                recent = n_ev > 0 and ev_parcel[n_ev - 1] == p and t[i] - t[ev_b[n_ev - 1]] < min_spacing
                if bsi[i] - bsi[i - 1] >= min_rise and t[i] - t[i - 1] <= max_step and not recent:
                    ev_parcel[n_ev] = p
                    ev_a[n_ev] = i - 1
                    ev_b[n_ev] = i
                    n_ev += 1
    return ev_parcel, ev_a, ev_b, n_ev, bare_days, longest, n_bare
