"""Scenario generator and evaluation (event matching, confusion matrices, `cbm evaluate`)."""

from __future__ import annotations

import json
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cbm_core.cli import cli
from cbm_core.model import HIST_COLUMNS
from markers import _series as ts
from markers import mowing
from markers._evaluate import confusion, evaluate_files, event_scores, events_table, match_events
from markers._simulate import PROFILES, simulate


@pytest.fixture(scope="module")
def scenario():
    return simulate(300, seed=7, swap_rate=0.1)


def test_simulation_is_tidy_sorted_and_reproducible(scenario):
    stats = scenario.series.stats
    pid = stats["pid"].to_numpy()
    t = stats["obstime"].to_numpy()
    assert np.all((pid[1:] > pid[:-1]) | ((pid[1:] == pid[:-1]) & (t[1:] >= t[:-1])))
    assert set(stats["card"].astype(str)) == {"s2", "bs", "c6"}
    s2 = stats[stats["card"] == "s2"]
    assert s2["mean"].between(0, 1).all()
    c6 = stats[stats["card"] == "c6"]
    assert c6["mean"].between(0, 1).all() and set(c6["orbit"].astype(str)) == {"ASC", "DESC"}
    again = simulate(300, seed=7, swap_rate=0.1)
    pd.testing.assert_frame_equal(again.series.stats, stats)
    assert not simulate(300, seed=8).series.stats["mean"].equals(stats["mean"])


# What bench/simulator.py measured on real grassland (flanders-seasons 2018/2019, flanders-2023,
# worldcereal-fra-2023): the calibrated profile must land in these ranges, the original need not.
REAL = {
    "winter_ndvi": (0.59, 0.88),  # Jan-Feb NDVI of grassland, p10..p90
    "ndvi_noise": (0.02, 0.035),  # robust spread of valid NDVI 1-6 days apart (dense 2018 series)
    "haze_share": (0.045, 0.08),  # grass observations SCL accepts that the haze tests remove (6.1-6.3 %)
    "s1_speckle_db": (0.9, 1.3),  # median spread of consecutive same-orbit VH dB differences
    "s1_level_spread_db": 1.0,  # at least this spread (p90 - p10) of VH levels between parcels
}


def grass_statistics(scenario) -> dict:
    """The calibration statistics (as bench/simulator.py measures them) of a scenario's grassland."""
    grass = set(scenario.actual_crop.index[scenario.actual_crop == "grassland"].tolist())
    full, valid = mowing._s2_series(scenario.series, mowing.DEFAULTS)
    kp = mowing.kernel_params(mowing.DEFAULTS)
    lo, hi = ts.day_number("2023-04-01"), ts.day_number("2023-10-31")
    winter, noise, hazy, n_valid = [], [], 0, 0
    for k, pid in enumerate(valid.pids.tolist()):
        if pid not in grass:
            continue
        a, b = valid.offsets[k], valid.offsets[k + 1]
        t, v = valid.t[a:b], valid.values["NDVI"][a:b]
        early = v[t < ts.day_number("2023-03-01")]
        if len(early):
            winter.append(np.median(early))
        keep = mowing._haze_screen(t, v, valid.values["B02"][a:b], 1 - valid.cloudy[a:b], kp)
        season = (t >= lo) & (t <= hi)
        hazy += int((~keep & season).sum())
        n_valid += int(season.sum())
        close = np.diff(t[keep & season]) <= 6
        noise.append(1.4826 / np.sqrt(2) * np.median(np.abs(np.diff(v[keep & season])[close])))
    why = np.asarray(full.why, dtype=str)
    policy = (np.char.startswith(why, "haze") | np.char.startswith(why, "NDVI dip")) & np.isin(
        np.repeat(full.pids, full.n_obs), list(grass)
    )
    policy &= (full.t >= lo) & (full.t <= hi)
    hazy, n_valid = hazy + int(policy.sum()), n_valid + int(policy.sum())
    vh = ts.build_panel(scenario.series.stats, "bs", ("VH",))
    db = 10 * np.log10(vh.values["VH"])
    speckle, level = [], []
    for k, pid in enumerate(vh.pids.tolist()):
        if pid in grass:
            a, b = vh.offsets[k], vh.offsets[k + 1]
            orbit = vh.orbit[a:b]
            speckle.append(np.std(np.diff(db[a:b][orbit == orbit[0]])))
            level.append(np.median(db[a:b]))
    return {
        "winter_ndvi": np.median(winter),
        "ndvi_noise": np.median(noise),
        "haze_share": hazy / n_valid,
        "s1_speckle_db": np.median(speckle),
        "s1_level_spread_db": np.percentile(level, 90) - np.percentile(level, 10),
    }


def test_the_calibrated_profile_matches_the_real_series_and_the_original_does_not():
    calibrated = grass_statistics(simulate(400, seed=3, profile="flanders"))
    for key in ("winter_ndvi", "ndvi_noise", "haze_share", "s1_speckle_db"):
        low, high = REAL[key]
        assert low <= calibrated[key] <= high, (key, calibrated[key])
    assert calibrated["s1_level_spread_db"] >= REAL["s1_level_spread_db"]
    original = grass_statistics(simulate(400, seed=3, profile="default"))
    assert original["winter_ndvi"] < REAL["winter_ndvi"][0]  # dormant winters, not Flanders grass
    assert original["haze_share"] < REAL["haze_share"][0]
    assert original["s1_level_spread_db"] < REAL["s1_level_spread_db"]


def test_profiles_are_named_and_the_original_is_the_default():
    assert set(PROFILES) == {"default", "flanders"}
    with pytest.raises(ValueError, match="unknown simulator profile 'alps'"):
        simulate(10, profile="alps")
    a = simulate(50, seed=1)
    b = simulate(50, seed=1, profile="default")
    pd.testing.assert_frame_equal(a.series.stats, b.series.stats)
    c = simulate(50, seed=1, profile="flanders")
    assert not c.series.stats["mean"].equals(a.series.stats["mean"])


def test_calibrated_cuts_regrow_slower_and_are_harder_to_find():
    # regrowth: 30-50 % of a cut's NDVI deficit back after 3-5 weeks on real Flanders grassland
    for profile, (low, high) in (("flanders", (15, 35)), ("default", (8, 14))):
        assert PROFILES[profile].regrowth_tau == (low, high)
    scenario = simulate(600, seed=4, profile="flanders")
    grass = scenario.actual_crop.index[scenario.actual_crop == "grassland"]
    truth = scenario.truth[scenario.truth["kind"] == "mowing"]
    marker = event_scores(truth, events_table(mowing.run(scenario.series, {})), 12, pids=grass)
    assert 0.7 <= marker["f1"] <= 0.95, marker  # harder than the original (0.90), still useful


def test_scl_histograms_label_clouds(scenario):
    scl = scenario.series.scl
    hist = scl[list(HIST_COLUMNS)].to_numpy()
    cloudy = hist[:, [3, 8, 9]].sum(axis=1) / hist.sum(axis=1)
    assert 0.2 < (cloudy > 0.1).mean() < 0.8  # a realistic share of cloudy observations
    s2 = scenario.series.stats
    b02 = s2[(s2["band"] == "B02")].set_index(["pid", "obsid"])["mean"]
    frac = pd.Series(cloudy, index=pd.MultiIndex.from_arrays([scl["pid"], scl["obsid"].astype(str)]))
    b02.index = pd.MultiIndex.from_arrays(
        [b02.index.get_level_values(0), b02.index.get_level_values(1).astype(str)]
    )
    joined = pd.concat([b02, frac.rename("cloudy")], axis=1, join="inner")
    assert (
        joined.loc[joined["cloudy"] > 0.5, "mean"].median()
        > 2 * joined.loc[joined["cloudy"] == 0, "mean"].median()
    )


def test_truth_events_follow_the_crops(scenario):
    truth = scenario.truth.merge(scenario.actual_crop.rename_axis("pid").reset_index(), on="pid")
    assert set(truth.loc[truth["kind"] == "mowing", "actual_crop"]) == {"grassland"}
    assert "grassland" not in set(truth.loc[truth["kind"] == "ploughing", "actual_crop"])
    cuts = truth[truth["kind"] == "mowing"].sort_values(["pid", "date"])
    gaps = cuts.groupby("pid")["date"].diff().dropna()
    assert (gaps >= timedelta(days=30)).all()
    swapped = scenario.series.parcels["crop_name"].to_numpy() != scenario.actual_crop.to_numpy()
    assert 0.03 < swapped.mean() < 0.2


def frame(events: list[tuple[int, str]]) -> pd.DataFrame:
    return pd.DataFrame({"pid": [p for p, _ in events], "date": pd.to_datetime([d for _, d in events])})


def test_matching_is_one_to_one_and_nearest():
    ref = frame([(1, "2023-06-01"), (1, "2023-06-10"), (2, "2023-07-01")])
    det = frame([(1, "2023-06-09"), (1, "2023-06-30"), (2, "2023-07-14"), (3, "2023-07-01")])
    matches = match_events(ref, det, 12)
    assert len(matches) == 1  # 06-09 goes to the nearer 06-10; 06-01 is then left unmatched
    assert matches.iloc[0]["ref_date"] == pd.Timestamp("2023-06-10")
    scores = event_scores(ref, det, 12)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 3, 2)
    assert scores["f1"] == pytest.approx(2 * 0.25 * (1 / 3) / (0.25 + 1 / 3), abs=1e-4)
    assert event_scores(ref, det, 13)["tp"] == 2  # 2023-07-14 is 13 days from 07-01


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(0, 200)), max_size=15),
    st.lists(st.tuples(st.integers(1, 3), st.integers(0, 200)), max_size=15),
)
def test_matching_properties(refs, dets):
    start = date(2023, 1, 1)
    ref = frame([(p, str(start + timedelta(days=d))) for p, d in refs])
    det = frame([(p, str(start + timedelta(days=d))) for p, d in dets])
    matches = match_events(ref, det, 12)
    assert len(matches) <= min(len(ref), len(det))
    assert (matches["error_days"].abs() <= 12).all()
    scores = event_scores(ref, det, 12)
    assert scores["tp"] + scores["fn"] == len(ref) and scores["tp"] + scores["fp"] == len(det)
    # the matching is maximal: no unmatched reference could still pair with an unmatched detection
    free_ref = ref.drop(index=matches["ref_index"].astype(int))
    free_det = det.drop(index=matches["det_index"].astype(int))
    pairs = free_ref.merge(free_det, on="pid")
    assert not ((pairs["date_x"] - pairs["date_y"]).abs() <= pd.Timedelta(days=12)).any()


def test_confusion_matrix():
    out = confusion(pd.Series(["a", "a", "b", "c"]), pd.Series(["a", "b", "b", "b"]))
    assert out["labels"] == ["a", "b", "c"]
    assert out["matrix"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert out["overall_accuracy"] == 0.5
    assert out["recall"] == {"a": 0.5, "b": 1.0, "c": 0.0}


def test_evaluate_files_events_and_crops(tmp_path):
    results = pd.DataFrame(
        {
            "marker": ["m", "m", "c"],
            "pid": [1, 2, 1],
            "status": ["OK", "OK", "OK"],
            "reason": "",
            "events": [json.dumps([{"main": "2023-06-05", "kind": "mowing:s2"}]), "[]", "[]"],
            "values": ["{}", "{}", json.dumps({"predicted": "maize"})],
            "confidence": 0.9,
            "obsids": "[]",
        }
    )
    results.to_parquet(tmp_path / "markers.parquet")
    pd.DataFrame({"pid": [1, 2], "date": ["2023-06-01", "2023-08-01"]}).to_csv(
        tmp_path / "ref.csv", index=False
    )
    events = evaluate_files(tmp_path / "markers.parquet", tmp_path / "ref.csv", marker="m")["events"]
    assert (events["tp"], events["fn"], events["fp"]) == (1, 1, 0)
    pd.DataFrame({"pid": [1], "crop": ["wheat"]}).to_csv(tmp_path / "crops.csv", index=False)
    crops = evaluate_files(tmp_path / "markers.parquet", tmp_path / "crops.csv", marker="c")["crops"]
    assert crops["overall_accuracy"] == 0.0 and crops["matrix"] == [[0, 0], [1, 0]]


def test_cbm_evaluate_simulated_scheme():
    out = CliRunner().invoke(cli, ["evaluate", "--simulate", "300", "--seed", "3"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["markers"]["mowing"]["mowing"]["f1"] > 0.8
    assert report["markers"]["bare_soil"]["ploughing"]["f1"] > 0.8
    assert sum(report["verdicts"].values()) == 300


def test_cbm_evaluate_needs_inputs():
    out = CliRunner().invoke(cli, ["evaluate"])
    assert out.exit_code != 0 and "--simulate" in out.output
