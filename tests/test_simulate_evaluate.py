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
from markers._evaluate import confusion, evaluate_files, event_scores, match_events
from markers._simulate import simulate


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
