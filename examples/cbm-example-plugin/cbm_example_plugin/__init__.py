"""Green cover: is the parcel vegetated at some clear moment of the season?

An example of a third-party marker plugin. Its event is the clear observation with the highest
NDVI when that NDVI reaches `min_ndvi`; a scheme can then require the event (e.g. "declared
grassland must be green at least once") or its absence.
"""

from collections.abc import Mapping
from typing import Any

import pandas as pd

from cbm_core import Event, MarkerResult, Status, TimeSeries, impl

CBM_API_VERSION = "1.0"  # the cbm core API this plugin was written against

DEFAULTS = {"min_ndvi": 0.6, "max_cloudy": 0.1, "clear_classes": [4, 5]}


@impl
def cbm_marker_run(series: TimeSeries, params: Mapping[str, Any]) -> list[MarkerResult]:
    p = DEFAULTS | dict(params)
    hist = series.scl.set_index(["pid", "obsid"])
    total = hist.filter(like="hist_").sum(axis=1)
    clear_share = hist[[f"hist_{c}" for c in p["clear_classes"]]].sum(axis=1) / total.where(total > 0)
    clear = set(clear_share[clear_share >= 1 - p["max_cloudy"]].index)
    s2 = series.stats[series.stats["band"].isin(["B04", "B08"])]
    wide = s2.pivot_table(index=["pid", "obsid", "obstime"], columns="band", values="mean").reset_index()
    wide = wide[[(pid, obsid) in clear for pid, obsid in zip(wide["pid"], wide["obsid"], strict=True)]]
    wide["ndvi"] = (wide["B08"] - wide["B04"]) / (wide["B08"] + wide["B04"])
    results = []
    for pid in series.parcels["pid"]:
        obs = wide[wide["pid"] == pid]
        if obs.empty:
            results.append(
                MarkerResult("green_cover", int(pid), Status.NOT_VALID, reason="no clear observation")
            )
            continue
        best = obs.loc[obs["ndvi"].idxmax()]
        day = pd.Timestamp(best["obstime"]).date()
        events = []
        if best["ndvi"] >= p["min_ndvi"]:
            events.append(Event(day, day, day, float(best["ndvi"]), 1.0, (best["obsid"],), "green"))
        results.append(
            MarkerResult(
                "green_cover",
                int(pid),
                Status.OK,
                events=events,
                confidence=1.0,
                # the evidence the traffic light weighs before "no event" may count (docs/markers.md)
                values={
                    "ndvi_max": float(best["ndvi"]),
                    "valid_observations": len(obs),
                    "window": f"{obs['obstime'].min():%Y-%m-%d}..{obs['obstime'].max():%Y-%m-%d}",
                },
                obsids=tuple(obs["obsid"]),
            )
        )
    return results
