"""Mowing marker: the real-series cases (haze, green-up, cloudy gaps, sensors), real parcels, batches."""

from __future__ import annotations

import itertools
import tempfile
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbm_core.api import read_signatures
from cbm_core.model import HIST_COLUMNS, Status, TimeSeries
from markers import mowing
from markers._evaluate import event_scores, events_table
from markers._simulate import simulate

DATA = Path(__file__).parent / "data" / "flanders-grass"
YEAR = 2023


def d(mmdd: str) -> date:
    return date.fromisoformat(f"{YEAR}-{mmdd}")


def s2_rows(pid: int, obs: list[tuple], bands: tuple[str, ...] = ("B02", "B04", "B08")) -> list[dict]:
    """Tidy S2 rows from (MM-DD, NDVI[, B02][, clear share]) tuples; reflectances consistent with the NDVI.

    A clear share below 1 puts the rest of the parcel's pixels in SCL class 9 (cloud).
    """
    rows = []
    for item in obs:
        mmdd, ndvi = item[0], item[1]
        blue = item[2] if len(item) > 2 else 0.03
        clear = item[3] if len(item) > 3 else 1.0
        nir = 0.3
        red = nir * (1 - ndvi) / (1 + ndvi)
        hist = dict.fromkeys(HIST_COLUMNS, 0)
        hist["hist_4"] = round(100 * clear)
        hist["hist_9"] = 100 - hist["hist_4"]
        values = {"B02": blue, "B04": red, "B08": nir, "NDVI": ndvi}
        for band in bands:
            rows.append(
                {"pid": pid, "obstime": f"{YEAR}-{mmdd}T10:30:00Z", "card": "s2", "band": band}
                | {"mean": values[band], "count": 100}
                | hist
            )
    return rows


def s1_rows(pid: int, card: str, band: str, obs: list[tuple[str, float]], orbit: str = "A") -> list[dict]:
    return [
        {"pid": pid, "obstime": f"{YEAR}-{mmdd}T17:30:00Z", "card": card, "band": band, "mean": value}
        | {"count": 50, "orbit": orbit}
        for mmdd, value in obs
    ]


def series(rows: list[dict]) -> TimeSeries:
    """The TimeSeries `cbm score` makes of such a table (the path of scored hold-out tables)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "signatures.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        return read_signatures(path)


def every(start: str, end: str, step: int, value) -> list[tuple]:
    """(MM-DD, value) every `step` days from start to end inclusive; value may be a function of the date."""
    out, day = [], d(start)
    while day <= d(end):
        out.append((day.strftime("%m-%d"), value(day) if callable(value) else value))
        day += timedelta(days=step)
    return out


def one(rows: list[dict], params: dict | None = None):
    (result,) = mowing.run(series(rows), params or {})
    return result


# A green parcel with one cut on 06-12: 0.82 -> 0.50 and back over a month.
CUT = d("06-12")


def grass(day: date, cut: date = CUT) -> float:
    if day < cut:
        return 0.82
    return min(0.82, 0.50 + 0.32 * (day - cut).days / 30)


def around(obs: list[tuple], day: date) -> tuple[date, date]:
    """The last observation date before `day` and the first on or after it."""
    dates = [d(o[0]) for o in obs]
    return max(x for x in dates if x < day), min(x for x in dates if x >= day)


def test_a_clear_cut_is_dated_between_last_high_and_first_low():
    obs = every("03-01", "10-30", 5, grass)
    result = one(s2_rows(1, obs))
    assert result.status == Status.OK
    (event,) = result.events
    assert (event.start, event.end) == around(obs, CUT)
    assert event.start <= event.main <= event.end
    assert event.kind == "mowing:s2" and event.magnitude == pytest.approx(0.3, abs=0.03)
    assert event.confidence >= 0.9


def test_a_cut_under_a_cloudy_gap_is_dated_inside_the_gap_not_at_its_end():
    obs = [o for o in every("03-01", "10-30", 5, grass) if not d("06-01") < d(o[0]) < d("07-01")]
    cloudy = [(o[0], 0.3, 0.3, 0.2) for o in every("06-05", "06-29", 4, 0)]  # SCL says cloud
    result = one(s2_rows(1, obs + cloudy))
    (event,) = result.events
    start, end = around(obs, CUT)
    assert (event.start, event.end) == (start, end) and (end - start).days >= 30
    # a drop is still visible ~2-3 weeks after a cut: the cut is not at the gap's end
    assert event.main == end - timedelta(days=12)
    assert abs((event.main - CUT).days) <= 12 < abs((end - CUT).days)


def dipped(base: list[tuple], dip: str, low: float, back: float, *extra) -> list[tuple]:
    """The series with `low` at `dip` and `back` at the next date (the rest unchanged)."""
    after = base[[m for m, _ in base].index(dip) + 1][0]
    return [(m, low, *extra) if m == dip else (m, back) if m == after else (m, v) for m, v in base]


def test_a_hazy_single_date_dip_is_not_a_cut():
    # dips the core validity policy lets through (below its haze line, not back within 0.05 of
    # the level before), which the marker's own screen must still reject
    base = every("03-01", "10-30", 5, 0.8)
    dip = base[len(base) // 2][0]
    # blue rises with the dip (haze SCL calls clear), 80 % regained 5 days later
    result = one(s2_rows(1, dipped(base, dip, 0.5, 0.74, 0.08)))
    assert result.events == [] and result.values["n_hazy_s2"] == 1
    # the same without blue band: 80 % regained within 5 days is too quick for a cut
    result = one(s2_rows(1, dipped(base, dip, 0.5, 0.74), bands=("B04", "B08")))
    assert result.events == [] and result.values["n_hazy_s2"] == 1
    # a dip on a parcel SCL calls only partly clear (but within the policy's 5 %) is haze too
    assert one(s2_rows(1, dipped(base, dip, 0.5, 0.74, 0.03, 0.96))).events == []
    # the planted controls: without blue rise, or regained more slowly, the same dip is a cut
    assert len(one(s2_rows(1, dipped(base, dip, 0.5, 0.74, 0.03))).events) == 1
    assert len(one(s2_rows(1, dipped(base, dip, 0.5, 0.65), bands=("B04", "B08"))).events) == 1


def test_the_result_names_used_and_rejected_observations():
    base = every("03-01", "10-30", 5, 0.8)
    dip = base[len(base) // 2][0]
    cloudy = base[len(base) // 2 + 3][0]
    hazy_series = dipped(base, dip, 0.7, 0.8)
    obs = [(m, 0.3, 0.3, 0.2) if m == cloudy else o for (m, _), o in zip(base, hazy_series, strict=True)]
    result = one(s2_rows(1, obs))
    reasons = dict(result.rejected)
    hazy, clouded = (f"s2_{YEAR}{m.replace('-', '')}T103000" for m in (dip, cloudy))
    assert reasons[hazy] == mowing.HAZE_REASON and "SCL" in reasons[clouded]
    assert hazy not in result.obsids and clouded not in result.obsids and len(result.obsids) > 30
    assert result.reason.startswith("no NDVI fall of 0.08 or more followed by regrowth")


def test_a_real_cut_with_slow_recovery_survives_the_haze_screen():
    # same dip depth, blue rises a little (stubble), but NDVI stays down: a cut
    obs = [
        (m, v, 0.05 if d("06-12") <= d(m) <= d("06-20") else 0.03)
        for m, v in every("03-01", "10-30", 5, grass)
    ]
    assert len(one(s2_rows(1, obs)).events) == 1
    no_blue = one(s2_rows(1, every("03-01", "10-30", 5, grass), bands=("B04", "B08")))
    assert len(no_blue.events) == 1


def spring(day: date) -> float:
    """Dormant until April, green-up to 0.85 by mid-May, a drop in early April, a cut on 06-20."""
    if day < d("04-01"):
        return 0.30
    if day < d("04-06"):
        return 0.55  # an early flush (or frost-bitten green) that falls back: no cut
    if day < d("04-20"):
        return 0.40
    if day < d("05-15"):
        return 0.40 + 0.45 * (day - d("04-20")).days / 25
    return grass(day, d("06-20"))


def test_no_cut_before_the_observed_greenup():
    result = one(s2_rows(1, every("03-01", "10-30", 5, spring)))
    assert [e.main.month for e in result.events] == [6]
    assert d("04-20") < date.fromisoformat(result.values["greenup"]) < d("05-15")
    # the same series with the green-up test disabled reports the April drop: the test has teeth
    free = one(s2_rows(1, every("03-01", "10-30", 5, spring)), {"greenup_min_amplitude": 9.0})
    assert [e.main.month for e in free.events] == [4, 6]


def test_an_early_cut_is_not_mistaken_for_the_spring_low():
    def early(day: date) -> float:
        if day < d("04-01"):
            return 0.40  # dormant
        if day < d("04-25"):
            return 0.40 + 0.40 * (day - d("04-01")).days / 24  # green-up to 0.80
        return min(0.90, 0.50 + 0.40 * (day - d("04-25")).days / 30)  # cut, regrowth above the old peak

    result = one(s2_rows(1, every("02-01", "10-30", 5, early)))
    assert [(e.start, e.end) for e in result.events] == [around(every("02-01", "10-30", 5, 0), d("04-25"))]


def test_a_subtle_cut_on_a_quiet_parcel_is_found():
    def subtle(day: date) -> float:
        wiggle = 0.01 * np.sin(day.toordinal())
        if day < d("07-01"):
            return 0.70 + wiggle
        return min(0.70, 0.55 + 0.15 * (day - d("07-01")).days / 20) + wiggle

    obs = every("03-01", "10-30", 5, subtle)
    result = one(s2_rows(1, obs))
    assert [(e.start, e.end) for e in result.events] == [around(obs, d("07-01"))]
    assert result.values["drop_threshold"] == pytest.approx(0.08)


def test_a_slow_drought_decline_is_not_a_cut():
    def drought(day: date) -> float:
        if day < d("06-15"):
            return 0.80
        if day < d("08-15"):
            return 0.80 - 0.4 * (day - d("06-15")).days / 61  # ~0.033 per 5 days
        return 0.40 + 0.4 * min(1, (day - d("08-15")).days / 30)

    assert one(s2_rows(1, every("03-01", "10-30", 5, drought))).events == []


def test_ndvi_only_tables_give_the_same_answer():
    obs = every("03-01", "10-30", 5, grass)
    full = one(s2_rows(1, obs))
    ndvi_only = one(s2_rows(1, obs, bands=("NDVI",)))
    assert ndvi_only.status == Status.OK and ndvi_only.events == full.events


def test_coherence_confirms_and_dates_a_cut_in_a_gap():
    obs = [o for o in every("03-01", "10-30", 5, grass) if not d("06-01") < d(o[0]) < d("07-01")]
    coh = every("03-02", "10-30", 6, lambda day: 0.55 if d("06-13") <= day <= d("06-26") else 0.25)
    rows = s2_rows(1, obs) + s1_rows(1, "c6", "VV", coh)
    (event,) = one(rows).events
    assert event.kind == "mowing:s2+s1"
    first_rise = min(d(m) for m, v in coh if v > 0.5)
    assert event.main == first_rise - timedelta(days=7)  # first pair after the cut: 7.5 days back
    assert abs((event.main - CUT).days) <= 3


@pytest.mark.parametrize("band", ["VVc", "VH"])
def test_coherence_under_another_band_name_is_used(band):
    obs = [o for o in every("03-01", "10-30", 5, grass) if not d("06-01") < d(o[0]) < d("07-01")]
    coh = every("03-02", "10-30", 6, lambda day: 0.55 if d("06-13") <= day <= d("06-26") else 0.25)
    (event,) = one(s2_rows(1, obs) + s1_rows(1, "c6", band, coh)).events
    assert event.kind == "mowing:s2+s1"


def test_coherence_alone_counts_only_where_s2_was_blind():
    coh = every("03-02", "10-30", 6, lambda day: 0.55 if d("06-13") <= day <= d("06-26") else 0.25)
    blind = [o for o in every("03-01", "10-30", 5, 0.8) if not d("06-01") < d(o[0]) < d("07-10")]
    (event,) = one(s2_rows(1, blind) + s1_rows(1, "c6", "VV", coh)).events
    assert event.kind == "mowing:s1" and event.confidence < 0.7
    # S2 looked 5 days after the rise and saw a green canopy: the rise does not hold
    seen = every("03-01", "10-30", 5, 0.8)
    assert one(s2_rows(1, seen) + s1_rows(1, "c6", "VV", coh)).events == []
    # one high coherence pair alone is too fragile
    single = every("03-02", "10-30", 6, lambda day: 0.55 if d("06-13") <= day <= d("06-18") else 0.25)
    assert one(s2_rows(1, blind) + s1_rows(1, "c6", "VV", single)).events == []


def test_observations_outside_the_season_are_named_as_such():
    rows = s2_rows(1, every("03-01", "10-30", 5, grass))
    result = one(rows, {"season_start": "2024-03-16", "season_end": "2024-10-27"})
    assert result.status == Status.NOT_VALID
    assert "no valid Sentinel-2 observation in the season 2024-03-16..2024-10-27 (49 valid outside it)" in (
        result.reason
    )


def test_backscatter_only_series_are_not_valid_with_a_reason():
    vh = every("03-02", "10-30", 6, lambda day: 0.02 * (1 + 0.3 * np.sin(day.toordinal())))
    result = one(s1_rows(1, "bs", "VH", vh) + s1_rows(1, "bs", "VV", [(m, 0.1) for m, _ in vh]))
    assert result.status == Status.NOT_VALID
    assert "backscatter alone" in result.reason and result.values["n_backscatter"] == len(vh) - 4
    # with Sentinel-2 the cut is found; backscatter does not invent events
    rows = s2_rows(1, every("03-01", "10-30", 5, grass)) + s1_rows(1, "bs", "VH", vh)
    assert len(one(rows).events) == 1


def test_season_end_before_start_is_refused():
    with pytest.raises(ValueError, match="season_end"):
        mowing.run(series(s2_rows(1, every("03-01", "10-30", 5, grass))), {"season_end": "02-01"})


# Real parcels (tests/data/flanders-grass, see tests/data/README-markers.md) -----------------------------


@pytest.fixture(scope="module")
def real():
    table = read_signatures(DATA / "signatures.csv")
    out = {}
    for pids in ((2, 12), (20, 21, 22)):
        out |= {r.pid: r for r in mowing.run(table.subset(list(pids)), {})}
    return out


def test_real_grassland_first_cuts_are_found_in_may(real):
    first = {pid: real[pid].events[0] for pid in (2, 12, 20)}
    assert date(2018, 5, 6) <= first[2].start and first[2].end <= date(2018, 5, 9)  # 0.91 -> 0.74
    assert (first[12].start, first[12].end) == (date(2018, 5, 11), date(2018, 5, 24))
    assert (first[20].start, first[20].end) == (date(2019, 5, 11), date(2019, 5, 16))
    for result in real.values():
        assert all(e.main >= date(e.main.year, 4, 15) for e in result.events)


def test_real_hazy_dip_is_screened(real):
    # pid 2, 2018-06-10: NDVI 0.80 -> 0.46 -> 0.72 with B02 0.05 -> 0.12 -> 0.03 (haze SCL calls clear)
    assert real[2].values["n_hazy_s2"] >= 1
    assert not [e for e in real[2].events if date(2018, 6, 3) <= e.main <= date(2018, 6, 23)]


def test_real_winter_wheat_harvest_is_at_most_a_weak_event(real):
    # no regrowth after a harvest: the event may be reported but cannot carry a verdict alone
    assert all(e.confidence < 0.5 for e in real[21].events)


# Simulated batches: consistency, bad input ------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario():
    return simulate(500, seed=11)


@pytest.fixture(scope="module")
def results(scenario):
    return mowing.run(scenario.series, {})


def test_simulated_grassland_f1_is_a_sanity_bound(scenario, results):
    grass = scenario.actual_crop.index[scenario.actual_crop == "grassland"]
    truth = scenario.truth[scenario.truth["kind"] == "mowing"]
    scores = event_scores(truth, events_table(results), 12, pids=grass)
    assert scores["f1"] >= 0.8, scores  # the simulator is kinder than reality: a floor, not a claim
    assert scores["mean_abs_error_days"] < 4


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
        assert all(date(2023, 3, 16) <= m <= date(2023, 10, 27) for m in mains)


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
    one_obs = sub.stats[sub.stats["obsid"] == in_june]
    single = mowing.run(TimeSeries(one_obs, sub.scl, sub.parcels), {})
    assert single[0].status == Status.NOT_VALID and "too few" in single[0].reason

    cloudy = sub.scl.copy()
    cloudy[list(HIST_COLUMNS)] = 0
    cloudy["hist_9"] = 100
    no_s1 = sub.stats[sub.stats["card"] == "s2"]
    overcast = mowing.run(TimeSeries(no_s1, cloudy, sub.parcels), {})
    assert overcast[0].status == Status.NOT_VALID and "cloudy" in overcast[0].reason

    renamed = sub.stats.astype({"band": str}).replace(
        {"band": {"B04": "RED", "B08": "NIR", "VV": "HH", "VH": "HV"}}
    )
    unknown = mowing.run(TimeSeries(renamed, sub.scl, sub.parcels), {})
    assert unknown[0].status == Status.NOT_VALID and "B04/B08" in unknown[0].reason


def test_statuses_and_confidence_on_a_full_batch(results):
    assert Counter(r.status for r in results)[Status.OK] == len(results)
    assert all(0 <= r.confidence <= 1 for r in results)
