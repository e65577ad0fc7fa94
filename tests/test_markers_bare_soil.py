"""Bare-soil / ploughing marker on simulated arable and grassland parcels."""

from __future__ import annotations

import pytest

from cbm_core.model import HIST_COLUMNS, Status, TimeSeries
from markers import bare_soil
from markers._evaluate import event_scores, events_table
from markers._simulate import simulate


@pytest.fixture(scope="module")
def scenario():
    return simulate(400, seed=21)


# The default simulator profile's tilled soil is bluer than real soil (B02 - 0.5 x B04: median 0.047
# against 0.006 on the 91 SCL-clear bare observations of flanders-seasons), so the haze screen that
# holds on real data would reject simulated bare soil; it is off for these simulated parcels.
NO_HAZE = {"validity": {"max_haze": False}}


def test_ploughing_dates_match_the_truth(scenario):
    results = bare_soil.run(scenario.series, NO_HAZE)
    found = events_table(results)
    arable = scenario.actual_crop.index[scenario.actual_crop != "grassland"]
    truth = scenario.truth[scenario.truth["kind"] == "ploughing"]
    scores = event_scores(truth, found[found["kind"] == "ploughing"], 12, pids=arable)
    assert scores["f1"] > 0.85, scores
    grass = set(scenario.actual_crop.index[scenario.actual_crop == "grassland"])
    on_grass = [r for r in results if r.pid in grass and r.events]
    assert len(on_grass) < 0.05 * len(grass)  # grassland is never ploughed in the simulation


def test_bare_days_and_soil_cover_event(scenario):
    results = {r.pid: r for r in bare_soil.run(scenario.series, {"max_bare_days": 30, **NO_HAZE})}
    maize = scenario.actual_crop.index[scenario.actual_crop == "maize"]
    grass = scenario.actual_crop.index[scenario.actual_crop == "grassland"]
    assert min(results[p].values["bare_days"] for p in maize) > max(
        results[p].values["bare_days"] for p in grass
    )
    flagged = [p for p in maize if any(e.kind == "bare_soil" for e in results[p].events)]
    assert len(flagged) > 0.8 * len(maize)
    for p in flagged:
        event = next(e for e in results[p].events if e.kind == "bare_soil")
        assert event.magnitude > 30 and event.start <= event.end


def test_period_and_bad_input(scenario):
    sub = scenario.series.subset(scenario.series.parcels["pid"].to_numpy()[:5])
    short = bare_soil.run(sub, {"period_start": "06-01", "period_end": "06-03"})
    assert all(r.status == Status.NOT_VALID and "too few" in r.reason for r in short)
    cloudy = sub.scl.copy()
    cloudy[list(HIST_COLUMNS)] = 0
    cloudy["hist_8"] = 50
    overcast = bare_soil.run(TimeSeries(sub.stats, cloudy, sub.parcels), {})
    assert all(
        r.status == Status.NOT_VALID and "no valid Sentinel-2 observation" in r.reason for r in overcast
    )
    assert all(why.startswith("SCL cloud 100%") for r in overcast for _, why in r.rejected)
    no_swir = sub.stats[sub.stats["band"] != "B11"]
    missing = bare_soil.run(TimeSeries(no_swir, sub.scl, sub.parcels), {})
    assert len(missing) == 5 and all(r.status == Status.NOT_VALID for r in missing)
