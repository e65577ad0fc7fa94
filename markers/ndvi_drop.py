"""NDVI drops between clear Sentinel-2 observations: the simplest evidence of a cut or harvest.

NDVI comes from the parcel means of B04 and B08; an observation is clear when the share of
cloudy SCL classes among its pixels is at most `max_cloudy`. A drop of at least `min_drop`
between consecutive clear observations is an event dated between them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from cbm_core import impl
from cbm_core.model import HIST_COLUMNS, Event, MarkerResult, Status, TimeSeries

DEFAULTS = {
    "min_drop": 0.1,  # JRC marker framework default for a mowing NDVI drop
    "max_cloudy": 0.1,
    "cloud_classes": [0, 1, 3, 8, 9, 11],  # JRC's newer mask: no data, saturated, shadow, cloud, snow
    "min_clear": 3,
}
# The parameters a scheme may give this marker (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(DEFAULTS)


@impl
def cbm_marker_run(series: TimeSeries, params: Mapping[str, Any]) -> list[MarkerResult]:
    p = DEFAULTS | dict(params)
    ndvi = _clear_ndvi(series, p)
    # Whole columns to numpy once; each parcel then only slices its own rows.
    pids = ndvi["pid"].to_numpy(np.int64)
    values = ndvi["ndvi"].to_numpy(np.float64)
    days = ndvi["obstime"].to_numpy("datetime64[ns]").astype("datetime64[D]").astype(object)
    obsids = ndvi["obsid"].astype(str).to_numpy(object)
    wanted = series.parcels["pid"].to_numpy(np.int64)
    first = np.searchsorted(pids, wanted, side="left")
    last = np.searchsorted(pids, wanted, side="right")
    return [
        _assess(int(pid), values[a:b], days[a:b], obsids[a:b], p)
        for pid, a, b in zip(wanted, first, last, strict=True)
    ]


def _clear_ndvi(series: TimeSeries, p: Mapping[str, Any]) -> pd.DataFrame:
    """One row per clear observation: pid, obsid, obstime, ndvi; sorted by pid and time."""
    s2 = series.stats[(series.stats["card"] == "s2") & series.stats["band"].isin(["B04", "B08"])]
    wide = s2.pivot_table(index=["pid", "obsid", "obstime"], columns="band", values="mean", aggfunc="first")
    if wide.empty or not {"B04", "B08"} <= set(wide.columns):
        return pd.DataFrame(columns=["pid", "obsid", "obstime", "ndvi"])
    wide = wide.reset_index()
    wide["ndvi"] = (wide["B08"] - wide["B04"]) / (wide["B08"] + wide["B04"])
    hist = series.scl
    cloudy_cols = [HIST_COLUMNS[c] for c in p["cloud_classes"]]
    total = hist[list(HIST_COLUMNS)].sum(axis=1)
    cloudy = hist[cloudy_cols].sum(axis=1) / total.where(total > 0)
    clear = hist.loc[cloudy.fillna(1.0) <= p["max_cloudy"], ["pid", "obsid"]]
    wide = wide.merge(clear, on=["pid", "obsid"], how="inner")
    wide = wide[np.isfinite(wide["ndvi"])]
    return wide.sort_values(["pid", "obstime"], ignore_index=True)[["pid", "obsid", "obstime", "ndvi"]]


def _assess(
    pid: int, ndvi: np.ndarray, days: np.ndarray, obsids: np.ndarray, p: Mapping[str, Any]
) -> MarkerResult:
    """One parcel's clear observations (time order): NDVI, dates, obsids."""
    n_clear = len(ndvi)
    if n_clear < p["min_clear"]:
        return MarkerResult(
            "ndvi_drop",
            pid,
            Status.NOT_VALID,
            reason=f"{n_clear} clear Sentinel-2 observation(s), at least {p['min_clear']} needed",
            values={"clear_observations": n_clear},
            obsids=tuple(obsids),
        )
    drops = ndvi[:-1] - ndvi[1:]
    events = [
        Event(
            start=days[i],
            main=days[i + 1],
            end=days[i + 1],
            magnitude=float(drops[i]),
            confidence=float(min(1.0, drops[i] / (2 * p["min_drop"]))),
            obsids=(obsids[i], obsids[i + 1]),
            kind="ndvi_drop",
        )
        for i in np.flatnonzero(drops >= p["min_drop"])
    ]
    confidence = max((e.confidence for e in events), default=float(min(1.0, n_clear / (2 * p["min_clear"]))))
    return MarkerResult(
        "ndvi_drop",
        pid,
        Status.OK,
        events=events,
        values={"clear_observations": n_clear, "ndvi_max": float(ndvi.max()), "ndvi_min": float(ndvi.min())},
        confidence=confidence,
        obsids=tuple(obsids),
    )
