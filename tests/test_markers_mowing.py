"""Mowing marker: accuracy on simulated parcels, sensor fallbacks, batch consistency, bad input."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from cbm_core.model import HIST_COLUMNS, Status, TimeSeries
from markers import mowing
from markers._evaluate import event_scores, events_table
from markers._simulate import simulate


def grassland_f1(scenario, params=None) -> dict:
    results = mowing.run(scenario.series, params or {})
    grass = scenario.actual_crop.index[scenario.actual_crop == "grassland"]
    truth = scenario.truth[scenario.truth["kind"] == "mowing"]
    return event_scores(truth, events_table(results), 12, pids=grass)


@pytest.fixture(scope="module")
def scenario():
    return simulate(500, seed=11)


@pytest.fixture(scope="module")
def results(scenario):
    return mowing.run(scenario.series, {})


def test_fused_detection_reaches_target_f1(scenario):
    scores = grassland_f1(scenario)
    assert scores["f1"] >= 0.9, scores
    assert scores["mean_abs_error_days"] < 4


def test_each_sensor_alone_still_detects_cuts():
    s2_only = grassland_f1(simulate(300, seed=12, s1_cards=("bs",)))
    s1_only = grassland_f1(simulate(300, seed=12, s2_bands=("B02",)))
    assert s2_only["f1"] > 0.75, s2_only
    assert s1_only["f1"] > 0.75, s1_only


def test_one_result_per_parcel_with_traceable_events(scenario, results):
    assert [r.pid for r in results] == scenario.series.parcels["pid"].tolist()
    obsids = set(scenario.series.stats["obsid"].astype(str))
    events = [e for r in results for e in r.events]
    assert events
    for e in events:
        assert e.start <= e.main <= e.end
        assert e.obsids and set(e.obsids) <= obsids
        assert 0 < e.confidence <= 1 and e.kind.startswith("mowing:")
    for r in results:  # season window and minimum spacing
        mains = [e.main for e in r.events]
        assert all((b - a).days >= 20 for a, b in itertools.pairwise(mains))
        assert all(pd.Timestamp("2023-03-16").date() <= m <= pd.Timestamp("2023-10-27").date() for m in mains)


def test_season_and_spacing_are_configurable(scenario, results):
    narrow = mowing.run(
        scenario.series, {"season_start": "06-01", "season_end": "06-30", "min_spacing_days": 60}
    )
    for r in narrow:
        assert all(e.main.month == 6 for e in r.events)
    assert sum(len(r.events) for r in narrow) < sum(len(r.events) for r in results)


def test_batches_give_the_same_answer(scenario, results):
    some = scenario.series.parcels["pid"].to_numpy()[::17]
    alone = {r.pid: r for r in mowing.run(scenario.series.subset(some), {})}
    for r in results:
        if r.pid in alone:
            assert alone[r.pid].events == r.events and alone[r.pid].status == r.status


def test_unsorted_and_duplicated_rows_change_nothing(scenario):
    sub = scenario.series.subset(scenario.series.parcels["pid"].to_numpy()[:30])
    shuffled = pd.concat([sub.stats, sub.stats.iloc[::7]]).sample(frac=1.0, random_state=1)
    messy = TimeSeries(shuffled, sub.scl.sample(frac=1.0, random_state=2), sub.parcels)
    assert [r.events for r in mowing.run(messy, {})] == [r.events for r in mowing.run(sub, {})]


def test_nans_are_dropped_not_fatal(scenario):
    sub = scenario.series.subset(scenario.series.parcels["pid"].to_numpy()[:20])
    stats = sub.stats.copy()
    stats.loc[stats.index[::5], "mean"] = np.nan
    results = mowing.run(TimeSeries(stats, sub.scl, sub.parcels), {})
    assert len(results) == 20 and all(r.status == Status.OK for r in results)


def test_bad_input_gives_not_valid_with_reasons(scenario):
    parcels = scenario.series.parcels.iloc[:3]
    empty = TimeSeries(scenario.series.stats.iloc[0:0], scenario.series.scl.iloc[0:0], parcels)
    for r in mowing.run(empty, {}):
        assert r.status == Status.NOT_VALID and "no Sentinel-2" in r.reason

    pid = int(parcels["pid"].iloc[0])
    sub = scenario.series.subset([pid])
    clear = sub.scl.loc[sub.scl[["hist_4", "hist_5"]].sum(axis=1) == sub.scl[list(HIST_COLUMNS)].sum(axis=1)]
    in_june = clear.loc[clear["obstime"].dt.month == 6, "obsid"].iloc[0]
    one = sub.stats[sub.stats["obsid"] == in_june]
    single = mowing.run(TimeSeries(one, sub.scl, sub.parcels), {})
    assert single[0].status == Status.NOT_VALID and "too few" in single[0].reason

    cloudy = sub.scl.copy()
    cloudy[list(HIST_COLUMNS)] = 0
    cloudy["hist_9"] = 100
    no_s1 = sub.stats[sub.stats["card"] == "s2"]
    overcast = mowing.run(TimeSeries(no_s1, cloudy, sub.parcels), {})
    assert overcast[0].status == Status.NOT_VALID and "cloudy" in overcast[0].reason

    renamed = sub.stats.astype({"band": str}).replace({"band": {"B04": "RED", "B08": "NIR", "VV": "HH"}})
    unknown = mowing.run(TimeSeries(renamed, sub.scl, sub.parcels), {})
    assert unknown[0].status == Status.NOT_VALID and "B04/B08" in unknown[0].reason


def test_statuses_and_confidence_on_a_full_batch(results):
    assert Counter(r.status for r in results)[Status.OK] == len(results)
    assert all(0 <= r.confidence <= 1 for r in results)
