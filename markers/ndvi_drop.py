"""NDVI drops between valid Sentinel-2 observations: the simplest evidence of a cut or harvest.

NDVI comes from the parcel means of B04 and B08; which observations are valid is the scheme's
validity policy (cbm_core.model.ValidityPolicy: SCL classes, haze, NDVI dips, one per day). A drop
of at least `min_drop` between consecutive valid observations is an event dated between them.
Every result reports its evidence (valid observations in the window, the longest gap between them)
and, for a parcel without event, the largest drop seen, so that a rule can tell "no cut" from "not
enough looks" and a reader can check the numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cbm_core import impl
from cbm_core.model import Event, MarkerResult, Status, TimeSeries
from markers import _series as ts

NAME = "ndvi_drop"
DEFAULTS: dict[str, Any] = {
    "min_drop": 0.1,  # JRC marker framework default for a mowing NDVI drop
    "min_valid": 3,  # valid observations in the window below which the marker says nothing
    "season_start": None,  # window ("MM-DD" in the campaign year, or a date); None: all observations
    "season_end": None,
}
# The parameters a scheme may give this marker (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(DEFAULTS)


@impl
def cbm_marker_requires(params: Mapping[str, Any]) -> Mapping[str, list[str]]:
    return {"s2": ["B04", "B08"]}


@impl
def cbm_marker_run(series: TimeSeries, params: Mapping[str, Any]) -> list[MarkerResult]:
    return run(series, params)


def run(series: TimeSeries, params: Mapping[str, Any] | None = None) -> list[MarkerResult]:
    """NDVI drop events of every parcel of the batch, with the evidence behind them."""
    p = {**DEFAULTS, **(params or {})}
    name = str(p.get("name", NAME))
    pids = ts.batch_pids(series)
    full, _ = ts.s2_panel(series, ("B04", "B08"), p, indices=("NDVI",))
    lo, hi = ts.season_bounds(full, p["season_start"], p["season_end"], ts.campaign_year(p))
    full = ts.in_window(full, lo, hi)
    pos = ts.align(full, pids)
    start, end = ts.obs_ranges(full, pos)
    names = full.obs_names
    dropped = ts.rejected(full)
    min_drop, min_valid = float(p["min_drop"]), int(p["min_valid"])
    out = []
    with ts.no_gc():
        for k, pid in enumerate(pids.tolist()):
            a, b = int(start[k]), int(end[k])
            ok = np.flatnonzero(full.valid[a:b]) + a
            t, ndvi = full.t[ok], full.values["NDVI"][ok]
            obsids = tuple(str(names[i]) for i in full.obs[ok])
            window, gap = ts.evidence_window(full.t[a:b], t, lo, hi)
            values: dict[str, Any] = {"valid_observations": len(ok), "window": window, "max_gap_days": gap}
            rejected = dropped[pos[k]] if pos[k] >= 0 else ()
            if len(ok) < min_valid:
                reason = f"{len(ok)} valid Sentinel-2 observation(s) in {window}; {min_valid} needed"
                out.append(
                    MarkerResult(
                        name, pid, Status.NOT_VALID, reason, values=values, obsids=obsids, rejected=rejected
                    )
                )
                continue
            drops = ndvi[:-1] - ndvi[1:]
            events = [
                Event(
                    start=ts.to_date(t[i]),
                    main=ts.to_date(t[i + 1]),
                    end=ts.to_date(t[i + 1]),
                    magnitude=round(float(drops[i]), 4),
                    confidence=round(float(min(1.0, drops[i] / (2 * min_drop))), 3),
                    obsids=(obsids[i], obsids[i + 1]),
                    kind="ndvi_drop",
                )
                for i in np.flatnonzero(drops >= min_drop)
            ]
            biggest = int(np.argmax(drops))
            values |= {
                "ndvi_max": round(float(ndvi.max()), 4),
                "ndvi_min": round(float(ndvi.min()), 4),
                "largest_drop": round(float(drops[biggest]), 4),
            }
            largest = (
                f"largest NDVI drop {drops[biggest]:.2f} "
                f"({ts.to_date(t[biggest])} -> {ts.to_date(t[biggest + 1])})"
            )
            if events:
                reason = f"{largest} >= {min_drop:.2f} in {len(ok)} valid observation(s) {window}"
            else:
                reason = f"{largest} < {min_drop:.2f} in {len(ok)} valid observation(s) {window}"
            confidence = max((e.confidence for e in events), default=None)
            out.append(
                MarkerResult(name, pid, Status.OK, reason, events, values, confidence, obsids, rejected)
            )
    return out
