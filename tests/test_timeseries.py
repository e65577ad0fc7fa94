"""Shared time-series preparation: panels, cloud filter, indices, orbits, gaps, composites."""

from __future__ import annotations

from datetime import date

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbm_core.model import HIST_COLUMNS, STATS, TimeSeries, ValidityPolicy
from markers import _series as ts


def tidy(rows: list[tuple]) -> pd.DataFrame:
    """Stats rows from (pid, day, band, mean[, card, orbit]) tuples, day = day of June 2023."""
    out = []
    for row in rows:
        pid, day, band, mean = row[:4]
        card = row[4] if len(row) > 4 else "s2"
        orbit = row[5] if len(row) > 5 else None
        when = pd.Timestamp(2023, 6, day, tz="UTC")
        out.append(
            {
                "pid": pid,
                "obsid": f"{card}_{day:02d}_{orbit or ''}",
                "band": band,
                "mean": mean,
                "obstime": when,
                "card": card,
                "orbit": orbit,
            }
        )
    frame = pd.DataFrame(out)
    for column in STATS:
        if column != "mean":
            frame[column] = 1 if column == "count" else frame["mean"]
    return frame


def scl_rows(entries: list[tuple[int, int, dict[int, int]]]) -> pd.DataFrame:
    rows = []
    for pid, day, hist in entries:
        row = {"pid": pid, "obsid": f"s2_{day:02d}_", "obstime": pd.Timestamp(2023, 6, day, tz="UTC")}
        row |= {c: hist.get(i, 0) for i, c in enumerate(HIST_COLUMNS)}
        rows.append(row)
    return pd.DataFrame(rows)


def test_panel_groups_bands_per_observation_and_sorts():
    stats = tidy(
        [
            (2, 5, "B08", 0.5),
            (1, 9, "B04", 0.1),
            (1, 3, "B08", 0.4),
            (1, 3, "B04", 0.05),
            (1, 9, "B08", 0.3),
            (2, 5, "B04", 0.2),
        ]
    )
    panel = ts.build_panel(stats, "s2", ("B04", "B08"))
    assert panel.pids.tolist() == [1, 2]
    assert panel.n_obs.tolist() == [2, 1]
    frame = panel.frame()
    assert frame["date"].tolist() == [date(2023, 6, 3), date(2023, 6, 9), date(2023, 6, 5)]
    assert frame["B04"].tolist() == [0.05, 0.1, 0.2]
    assert frame["B08"].tolist() == [0.4, 0.3, 0.5]


def test_panel_missing_band_is_nan_and_other_cards_ignored():
    stats = tidy([(1, 3, "B04", 0.05), (1, 3, "VV", 0.2, "bs", "ASC")])
    panel = ts.build_panel(stats, "s2", ("B04", "B08"))
    assert len(panel.t) == 1 and np.isnan(panel.values["B08"][0])
    s1 = ts.build_panel(stats, "bs", ("VV",))
    assert s1.orbit.tolist() == ["ASC"] and s1.values["VV"].tolist() == [0.2]


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(1, 28), st.floats(0.01, 0.9)), min_size=1, max_size=30),
    st.randoms(),
)
def test_panel_does_not_depend_on_row_order(entries, rnd):
    rows = [(p, d, "B04", v) for p, d, v in entries] + [(p, d, "B08", v + 0.1) for p, d, v in entries]
    rows = list({(r[0], r[1], r[2]): r for r in rows}.values())  # one value per pid, day, band
    ordered = ts.build_panel(tidy(rows), "s2", ("B04", "B08"))
    rnd.shuffle(rows)
    shuffled = ts.build_panel(tidy(rows), "s2", ("B04", "B08"))
    assert ordered.pids.tolist() == shuffled.pids.tolist()
    np.testing.assert_array_equal(ordered.t, shuffled.t)
    for band in ("B04", "B08"):
        np.testing.assert_array_equal(ordered.values[band], shuffled.values[band])


def test_cloud_fraction_from_scl_histogram_and_filter():
    stats = tidy([(1, d, b, 0.2) for d in (1, 2, 3) for b in ("B04", "B08")])
    scl = scl_rows([(1, 1, {4: 90, 9: 10}), (1, 2, {4: 100}), (1, 3, {8: 30, 10: 10, 4: 60})])
    panel = ts.attach_clouds(ts.build_panel(stats, "s2", ("B04", "B08")), scl)
    np.testing.assert_allclose(panel.cloudy, [0.1, 0.0, 0.4])
    assert ts.cloud_filter(panel, ValidityPolicy(max_unusable_share=0.05)).n_obs.tolist() == [1]
    assert ts.cloud_filter(panel, ValidityPolicy(max_unusable_share=0.2)).n_obs.tolist() == [2]
    # the class set is configurable: without 9 (cloud high), day 1 is clear
    only_8 = ValidityPolicy(unusable_classes=(8,))
    np.testing.assert_allclose(
        ts.attach_clouds(ts.build_panel(stats, "s2", ("B04", "B08")), scl, only_8).cloudy, [0.0, 0.0, 0.3]
    )
    screened = ts.screen(panel)
    assert screened.why.tolist() == ["SCL cloud 10% > 5%", "", "SCL cloud 40% > 5%"]


def test_observation_without_scl_kept_unless_required():
    stats = tidy([(1, 1, "B04", 0.1), (1, 1, "B08", 0.3)])
    panel = ts.attach_clouds(ts.build_panel(stats, "s2", ("B04", "B08")), scl_rows([]))
    assert ts.cloud_filter(panel).n_obs.tolist() == [1]
    assert ts.cloud_filter(panel, ValidityPolicy(require_scl=True)).n_obs.tolist() == [0]


def test_indices_follow_their_formulas():
    stats = tidy(
        [
            (1, 1, "B02", 0.05),
            (1, 1, "B03", 0.08),
            (1, 1, "B04", 0.06),
            (1, 1, "B08", 0.4),
            (1, 1, "B11", 0.2),
        ]
    )
    panel = ts.build_panel(stats, "s2", ("B02", "B03", "B04", "B08", "B11"))
    for name in ("NDVI", "NDWI", "BSI", "NDMI"):
        panel = ts.add_index(panel, name)
    v = {k: x[0] for k, x in panel.values.items()}
    assert v["NDVI"] == pytest.approx((0.4 - 0.06) / 0.46)
    assert v["NDWI"] == pytest.approx((0.08 - 0.4) / 0.48)
    assert v["BSI"] == pytest.approx(((0.2 + 0.06) - (0.4 + 0.05)) / (0.26 + 0.45))
    assert v["NDMI"] == pytest.approx(0.2 / 0.6)
    with pytest.raises(KeyError, match="needs band"):
        ts.add_index(panel, "VHVV")


def test_radar_ratio_and_orbit_split():
    stats = tidy(
        [
            (1, 1, "VV", 0.1, "bs", "ASC"),
            (1, 1, "VH", 0.02, "bs", "ASC"),
            (1, 4, "VV", 0.2, "bs", "DESC"),
            (1, 4, "VH", 0.05, "bs", "DESC"),
        ]
    )
    panel = ts.add_index(ts.build_panel(stats, "bs", ("VV", "VH")), "VHVV")
    np.testing.assert_allclose(panel.values["VHVV"], [0.2, 0.25])
    parts = ts.split_orbits(panel)
    assert sorted(parts) == ["ASC", "DESC"]
    assert parts["DESC"].values["VV"].tolist() == [0.2]
    assert ts.orbit_direction("ASC_88") == "ascending" and ts.orbit_direction("descending") == "descending"


def test_same_day_duplicates_keep_the_clearest():
    stats = tidy([(1, 1, "B04", 0.1), (1, 1, "B08", 0.3)])
    twin = stats.assign(obsid="s2_01_tileB", mean=stats["mean"] * 2)
    scl = pd.concat(
        [scl_rows([(1, 1, {9: 50, 4: 50})]), scl_rows([(1, 1, {4: 100})]).assign(obsid="s2_01_tileB")]
    )
    panel = ts.attach_clouds(ts.build_panel(pd.concat([stats, twin]), "s2", ("B04", "B08")), scl)
    assert panel.n_obs.tolist() == [2]
    kept = ts.dedupe_days(panel)
    assert kept.n_obs.tolist() == [1] and kept.values["B04"].tolist() == [0.2]
    # the validity policy keeps the same one (the other is cloudy anyway: two reasons, one answer)
    policy = ValidityPolicy(max_unusable_share=0.6)
    screened = ts.screen(panel, policy)
    assert screened.values["B04"][screened.valid].tolist() == [0.2]
    assert screened.why[~screened.valid].tolist() == ["second observation of the day"]


def test_gaps_include_window_edges():
    stats = tidy([(1, d, "B04", 0.1) for d in (5, 10, 30)])
    panel = ts.build_panel(stats, "s2", ("B04",))
    lo, hi = ts.day_number("2023-06-01"), ts.day_number("2023-06-30")
    gaps = ts.find_gaps(panel, lo, hi, max_gap_days=15)
    assert gaps.max_gap.tolist() == [20.0]
    assert [(ts.to_date(a), ts.to_date(b)) for a, b in gaps.gaps[0]] == [
        (date(2023, 6, 10), date(2023, 6, 30))
    ]


def test_season_bounds_month_day_and_full_dates():
    panel = ts.build_panel(tidy([(1, 5, "B04", 0.1)]), "s2", ("B04",))
    lo, hi = ts.season_bounds(panel, "03-16", "2023-10-27")
    assert (ts.to_date(lo), ts.to_date(hi)) == (date(2023, 3, 16), date(2023, 10, 27))


def test_composite_means_per_bin_and_fill():
    stats = tidy([(1, 1, "B04", 0.1), (1, 2, "B04", 0.3), (1, 21, "B04", 0.5), (2, 11, "B04", 0.7)])
    panel = ts.build_panel(stats, "s2", ("B04",))
    grid = ts.composite(panel, ("B04",), ts.day_number("2023-06-01"), 10, 3)[..., 0]
    np.testing.assert_allclose(grid[0], [0.2, np.nan, 0.5])
    filled = ts.fill_bins(grid[:, :, None])[..., 0]
    np.testing.assert_allclose(filled, [[0.2, 0.35, 0.5], [0.7, 0.7, 0.7]])


def test_batch_pids_are_the_declared_parcels():
    parcels = gpd.GeoDataFrame({"pid": [3, 1, 2], "crop_code": 1, "crop_name": "x"}, geometry=[None] * 3)
    series = TimeSeries(tidy([(1, 1, "B04", 0.1)]), scl_rows([]), parcels)
    assert ts.batch_pids(series).tolist() == [3, 1, 2]
    panel = ts.build_panel(series.stats, "s2", ("B04",))
    assert ts.align(panel, ts.batch_pids(series)).tolist() == [-1, 0, -1]
