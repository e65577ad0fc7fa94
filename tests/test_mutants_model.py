"""The data model and the observation-validity policy (cbm_core/model.py), class by class.

Focused and fast: bench/mutation.py runs this file against every mutant of model.py. Each
docstring names a one-line bug the test was checked against (planted, seen failing, reverted).
"""

from __future__ import annotations

import json
from datetime import date

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from cbm_core.errors import ConfigError, InputError
from cbm_core.model import (
    CARDS,
    CATALOGUE_COLUMNS,
    HIST_COLUMNS,
    MARKER_RESULT_COLUMNS,
    PARCEL_COLUMNS,
    SCL_COLUMNS,
    SIGNATURE_COLUMNS,
    STATS,
    Event,
    Light,
    MarkerResult,
    Signatures,
    Status,
    TimeSeries,
    ValidityPolicy,
    Verdict,
    clear_fraction,
    empty_scl,
    empty_signatures,
    require_columns,
    results_frame,
    signatures_table,
    time_series,
    unusable_share,
    validate_parcels,
    validate_signatures,
    verdict_table,
    verdicts_frame,
)

# The documented policy (docs/concepts.md "Clouds"): the Sentinel-2 SCL classes that make a pixel
# unusable. A policy change must change this line, on purpose.
SCL_NAMES = ("no data", "saturated or defective", "dark area", "cloud shadow", "vegetation", "bare soil",
             "water", "unclassified", "cloud medium probability", "cloud high probability", "thin cirrus",
             "snow")  # fmt: skip
UNUSABLE = {"no data", "saturated or defective", "cloud shadow", "cloud medium probability",
            "cloud high probability", "thin cirrus", "snow"}  # fmt: skip


def hist(**counts: int) -> np.ndarray:
    row = np.zeros((1, 12), np.int64)
    for name, n in counts.items():
        row[0, int(name.removeprefix("c"))] = n
    return row


@pytest.mark.parametrize("scl", range(12), ids=lambda c: SCL_NAMES[c])
def test_each_scl_class_is_usable_or_not_as_documented(scl):
    """One class at a time next to 90 vegetation pixels. Planted bug (issue 19): the clear classes
    (4, 5, 6, 11) changed to (4, 5, 6, 8), i.e. medium-probability cloud counted as clear; also
    any class added to or dropped from DEFAULT_UNUSABLE_CLASSES."""
    counts = hist(c4=90)
    counts[0, scl] += 10
    share = unusable_share(counts)[0]
    clear = clear_fraction(counts)[0]
    if SCL_NAMES[scl] in UNUSABLE:
        assert share == 0.1
        assert clear == (1.0 if scl == 0 else 0.9)  # no data is not an observation of the parcel
    else:
        assert share == 0.0 and clear == 1.0


def test_clear_fraction_counts_only_observed_pixels():
    """No data (class 0) is left out of clear_fraction's denominator but counts in unusable_share.
    Planted bugs: `- hist[:, 0]` dropped; `observed > 0` -> `observed >= 0`; `np.maximum(observed, 1)`
    -> `np.maximum(observed, 2)`."""
    counts = np.array(
        [[50, 0, 0, 0, 40, 0, 0, 0, 10, 0, 0, 0], [7] + [0] * 11, [0] * 12, [0, 0, 0, 0, 1] + [0] * 7]
    )
    assert clear_fraction(counts)[0] == 0.8
    assert unusable_share(counts)[0] == 0.6
    assert np.isnan(clear_fraction(counts)[1]) and unusable_share(counts)[1] == 1.0
    assert np.isnan(clear_fraction(counts)[2]) and np.isnan(unusable_share(counts)[2])
    assert clear_fraction(counts)[3] == 1.0 and unusable_share(counts)[3] == 0.0


def test_validity_takes_frames_and_another_policy():
    """Both functions take an SCL frame (hist_ columns, other columns ignored) and a custom set
    of unusable classes. Planted bug: the frame branch reading every column."""
    frame = pd.DataFrame(hist(c4=6, c9=2, c11=2), columns=list(HIST_COLUMNS)).assign(pid=7, obsid="x")
    frame = frame[["pid", "obsid", *HIST_COLUMNS]]
    assert clear_fraction(frame).tolist() == [0.6]
    assert unusable_share(frame).tolist() == [0.4]
    assert clear_fraction(frame, unusable=(9,)).tolist() == [0.8]
    assert unusable_share(frame, unusable=(0, 9)).tolist() == [0.2]


def test_empty_tables_have_the_model_columns_and_dtypes():
    """Planted bugs: `count` typed float; a hist column typed float."""
    stats, scl = empty_signatures(), empty_scl()
    assert tuple(stats.columns) == SIGNATURE_COLUMNS and len(stats) == 0
    assert stats["count"].dtype == np.int64 and stats["pid"].dtype == np.int64
    assert all(stats[c].dtype == np.float64 for c in STATS if c != "count")
    assert tuple(scl.columns) == ("pid", "obsid", *HIST_COLUMNS)
    assert all(scl[c].dtype == np.int64 for c in ("pid", *HIST_COLUMNS))
    both = Signatures.empty()
    assert len(both.stats) == 0 and len(both.scl) == 0


def test_signatures_concat_keeps_every_row_in_order():
    a = Signatures(pd.DataFrame({"pid": [1], "v": [1.0]}), pd.DataFrame({"pid": [1]}))
    b = Signatures(pd.DataFrame({"pid": [2], "v": [2.0]}), pd.DataFrame({"pid": [2]}))
    both = Signatures.concat([a, b])
    assert both.stats["pid"].tolist() == [1, 2] and both.scl["pid"].tolist() == [1, 2]
    assert list(both.stats.index) == [0, 1] and list(both.scl.index) == [0, 1]
    assert len(Signatures.concat([]).stats) == 0 and list(Signatures.concat(iter([])).scl.columns)


def parcels(n: int = 3, **extra) -> gpd.GeoDataFrame:
    boxes = [shapely.box(10 * i, 0, 10 * i + 8, 8) for i in range(n)]
    data = {"pid": list(range(1, n + 1)), "crop_code": "1", "crop_name": "grass", **extra}
    return gpd.GeoDataFrame(data, geometry=boxes, crs="EPSG:32631")


def test_validate_parcels_accepts_and_normalises_good_tables():
    """pids from text become int64; issue column added and empty for good outlines."""
    good = validate_parcels(parcels(pid=["1", "2", "3"]), "p.gpkg")
    assert good["pid"].dtype == np.int64 and good["pid"].tolist() == [1, 2, 3]
    assert good["issue"].tolist() == ["", "", ""]
    floats = validate_parcels(parcels(pid=[1.0, 2.0, 3.0]), "p.gpkg")
    assert floats["pid"].dtype == np.int64
    narrow = validate_parcels(parcels(pid=np.array([1, 2, 3], dtype=np.int32)), "p.gpkg")
    assert narrow["pid"].dtype == np.int64


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (parcels(pid=["1", "x", "3"]), "p.gpkg: column pid must hold integers; bad value 'x'"),
        (parcels(pid=[1.0, 2.5, 3.0]), "p.gpkg: column pid must hold integers; bad value 2.5"),
        (parcels(pid=[1, 2, 2]), "p.gpkg: column pid has duplicated value 2"),
        (parcels().set_crs(None, allow_override=True), "p.gpkg: the parcels have no CRS"),
        (parcels().drop(columns="crop_code"), "p.gpkg: missing column(s) crop_code; found pid, crop_name"),
    ],
)
def test_validate_parcels_refuses_bad_tables_naming_the_value(table, message):
    """Planted bugs: `converted % 1 != 0` -> `== 0`; `duplicated.iloc[0]` -> `iloc[-1]`."""
    with pytest.raises(InputError) as info:
        validate_parcels(table, "p.gpkg")
    assert str(info.value).startswith(message)


def test_bad_outlines_stay_with_an_issue_and_are_repaired_to_areas():
    """An empty or invalid outline is the parcel's problem: it stays, says why, and a bow-tie is
    repaired to its two triangles (no stray lines). An earlier issue is kept when the outline is
    good. Planted bugs: `~missing &` dropped; previous issues overwritten."""
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    table = gpd.GeoDataFrame(
        {"pid": [1, 2, 3, 4], "crop_code": "1", "crop_name": "g", "issue": ["", "", "from source", None]},
        geometry=[bowtie, shapely.Polygon(), shapely.box(0, 0, 1, 1), None], crs="EPSG:32631",
    )  # fmt: skip
    checked = validate_parcels(table, "p")
    issue = checked.set_index("pid")["issue"]
    assert issue[1].startswith("invalid geometry repaired (Self-intersection")
    assert issue[2] == "empty geometry" and issue[4] == "empty geometry"
    assert issue[3] == "from source"
    repaired = checked.geometry.iloc[0]
    assert repaired.geom_type == "MultiPolygon" and repaired.area == pytest.approx(50)
    assert checked.crs.to_epsg() == 32631 and len(checked) == 4
    line_only = gpd.GeoDataFrame(
        {"pid": [1], "crop_code": "1", "crop_name": "g"},
        geometry=[shapely.Polygon([(0, 0), (1, 1), (2, 2), (0, 0)])], crs="EPSG:32631",
    )  # fmt: skip
    collapsed = validate_parcels(line_only, "p").geometry.iloc[0]
    assert collapsed.is_empty and collapsed.geom_type == "Polygon"  # no area left: an empty polygon


def stats_rows(**override) -> pd.DataFrame:
    row = {"pid": 1, "obsid": "S2_a", "band": "B04", "count": 3, **dict.fromkeys(STATS[1:], 0.5)}
    return pd.DataFrame([row | override])


def test_validate_signatures_brings_canonical_dtypes_and_names_bad_values():
    """Planted bugs: `values.isna() & notna()` -> `|` (a missing value refused); count typed float."""
    good = validate_signatures(stats_rows(count="3", mean="0.25", pid="1"), "s.csv")
    assert (
        good["count"].dtype == np.int64 and good["mean"].dtype == np.float64 and good["pid"].dtype == np.int64
    )
    assert good["mean"].tolist() == [0.25]
    missing = validate_signatures(stats_rows(std=None, mean="0.1"), "s.csv")
    assert np.isnan(missing["std"].iloc[0])
    with pytest.raises(InputError, match=r"^s\.csv: column mean must be numeric; bad value 'high'$"):
        validate_signatures(stats_rows(mean="high"), "s.csv")
    with pytest.raises(InputError, match="missing column"):
        validate_signatures(stats_rows().drop(columns="p75"), "s.csv")


def test_require_columns_names_missing_and_found():
    frame = pd.DataFrame({"a": [1], "b": [2]})
    require_columns(frame, ["a"], "t")
    with pytest.raises(InputError) as info:
        require_columns(frame, ["a", "c", "d"], "t.csv")
    assert str(info.value) == "t.csv: missing column(s) c, d; found a, b"


def test_results_frame_serialises_events_values_and_confidence():
    """Events and values as strict JSON text (dates ISO, numpy scalars plain, non-finite floats
    null). Planted bugs: `isoformat()[:10]` -> `[:9]`; confidence None -> 0; rejected not written."""
    event = Event(date(2023, 5, 1), pd.Timestamp("2023-05-03 10:00"), date(2023, 5, 9), np.float32(0.5), 0.9,
                  ("S2_a", "S2_b"), "mowing")  # fmt: skip
    values = {"n": np.int64(4), "when": [date(2023, 1, 2)], 3: float("nan"), "inf": float("inf"), "t": (1, 2)}
    results = [
        MarkerResult(
            "m", np.int64(5), Status.OK, "", [event], values, 0.75, ("S2_a",), (("S2_c", "SCL cloud"),)
        ),
        MarkerResult("m", 6, Status.NOT_VALID, "cloudy"),
    ]
    frame = results_frame(results)
    assert frame["pid"].dtype == np.int64 and frame["pid"].tolist() == [5, 6]
    assert frame["status"].tolist() == ["OK", "NOT_VALID"] and frame["reason"].tolist() == ["", "cloudy"]
    assert json.loads(frame["events"][0]) == [
        {"start": "2023-05-01", "main": "2023-05-03", "end": "2023-05-09", "magnitude": 0.5,
         "confidence": 0.9, "obsids": ["S2_a", "S2_b"], "kind": "mowing"}
    ]  # fmt: skip
    assert json.loads(frame["values"][0]) == {
        "n": 4,
        "when": ["2023-01-02"],
        "3": None,
        "inf": None,
        "t": [1, 2],
    }
    assert frame["confidence"][0] == 0.75 and np.isnan(frame["confidence"][1])
    assert (
        frame["events"][1] == "[]"
        and frame["values"][1] == "{}"
        and json.loads(frame["obsids"][0]) == ["S2_a"]
    )
    assert json.loads(frame["rejected"][0]) == [["S2_c", "SCL cloud"]] and frame["rejected"][1] == "[]"
    assert tuple(frame.columns) == MARKER_RESULT_COLUMNS and len(results_frame([])) == 0


def test_verdict_tables_join_the_declaration():
    verdicts = [Verdict(np.int64(2), Light.RED, ["a", "b"]), Verdict(1, Light.GREEN, [])]
    table = verdict_table(verdicts)
    assert table.to_dict("list") == {"pid": [2, 1], "light": ["red", "green"], "reasons": ["a; b", ""]}
    assert table["pid"].dtype == np.int64
    frame = verdicts_frame(table, parcels(3))
    assert sorted(frame["pid"]) == [1, 2] and frame.crs.to_epsg() == 32631
    assert list(frame.columns) == ["pid", "crop_code", "crop_name", "geometry", "light", "reasons"]


def catalogue() -> pd.DataFrame:
    return pd.DataFrame({
        "obsid": ["S2_b", "S2_a", "S1_c"],
        "obstime": pd.to_datetime(["2023-05-02", "2023-05-01", "2023-05-03"], utc=True),
        "card": ["s2", "s2", "bs"], "orbit": [None, None, "ASC"],
    })  # fmt: skip


def signatures() -> Signatures:
    stats = pd.DataFrame({
        "pid": [2, 1, 1, 1, 9, 1], "obsid": ["S2_a", "S2_b", "S2_a", "S1_c", "S2_a", "S2_a"],
        "band": ["B04", "B04", "B08", "VV", "B04", "B04"], "count": [1, 2, 3, 4, 5, 6],
        **{s: 0.1 for s in STATS[1:]},
    })  # fmt: skip
    scl = pd.DataFrame({"pid": [1, 1, 9, 2], "obsid": ["S2_b", "S2_a", "S2_a", "S2_a"]})
    for i, column in enumerate(HIST_COLUMNS):
        scl[column] = [4 if i == 4 else (1 if i == 9 else 0)] * 3 + [0]
    return Signatures(stats, scl)


def test_time_series_joins_dates_sorts_and_drops_unknown_parcels_and_scenes():
    """Sorted by parcel, time (then band); parcels not in the table and scenes not in the catalogue
    are dropped; clear_fraction derived from the histogram. Planted bugs: `isin(known)` dropped;
    sort keys in another order."""
    sigs = signatures()
    sigs.stats.loc[len(sigs.stats)] = [1, "S2_unknown", "B04", 1, *[0.1] * 7]
    series = time_series(sigs, catalogue(), parcels(2).iloc[::-1])
    assert isinstance(series, TimeSeries)
    assert series.stats[["pid", "obsid", "band"]].values.tolist() == [
        [1, "S2_a", "B04"], [1, "S2_a", "B08"], [1, "S2_b", "B04"], [1, "S1_c", "VV"], [2, "S2_a", "B04"]
    ]  # fmt: skip
    assert list(series.stats.index) == list(range(5)) and list(series.scl.index) == list(range(3))
    assert series.stats["card"].tolist() == ["s2", "s2", "s2", "bs", "s2"]
    assert series.stats["orbit"].tolist()[3] == "ASC"
    assert series.scl[["pid", "obsid"]].values.tolist() == [[1, "S2_a"], [1, "S2_b"], [2, "S2_a"]]
    assert series.scl["clear_fraction"].tolist()[:2] == [0.8, 0.8] and np.isnan(
        series.scl["clear_fraction"][2]
    )
    assert series.parcels["pid"].tolist() == [1, 2] and list(series.parcels.index) == [0, 1]
    only = series.subset([2])
    assert (
        set(only.stats["pid"]) == {2} and set(only.scl["pid"]) == {2} and only.parcels["pid"].tolist() == [2]
    )


def test_signatures_table_is_tidy_with_dates_histograms_and_clear_fraction():
    """Planted bugs: left join turned inner (rows without a catalogue entry lost); clear_fraction
    column missing."""
    table = signatures_table(signatures(), catalogue())
    assert list(table.columns) == ["pid", "obsid", "obstime", "card", "band", *STATS, *HIST_COLUMNS,
                                   "clear_fraction"]  # fmt: skip
    assert table[["pid", "obsid", "band"]].values.tolist() == [
        [1, "S2_a", "B04"], [1, "S2_a", "B08"], [1, "S2_b", "B04"], [1, "S1_c", "VV"], [2, "S2_a", "B04"],
        [9, "S2_a", "B04"],
    ]  # fmt: skip
    assert list(table.index) == list(range(6))
    assert table["clear_fraction"].tolist()[:3] == [0.8, 0.8, 0.8]
    assert np.isnan(table["clear_fraction"][3]) and np.isnan(table["clear_fraction"][4])  # no/empty histogram
    assert table["hist_9"].tolist()[:3] == [1, 1, 1]


def test_enums_are_their_documented_strings():
    assert [str(s) for s in Status] == ["OK", "NOT_VALID", "NOT_EXECUTED"]
    assert [str(light) for light in Light][:3] == ["green", "yellow", "red"]


# The contract: names and defaults documented in docs/plugins.md and docs/concepts.md ----------------


def test_table_columns_are_the_documented_contract():
    """Plugins read and write these names: a renamed or dropped column breaks every third-party
    plugin. Planted bugs: any name of these tuples changed or dropped."""
    assert STATS == ("count", "mean", "std", "min", "max", "p25", "p50", "p75")
    assert ("pid", "obsid", "band", *STATS) == SIGNATURE_COLUMNS
    assert tuple(f"hist_{c}" for c in range(12)) == HIST_COLUMNS
    assert ("pid", "obsid", *HIST_COLUMNS) == SCL_COLUMNS
    assert PARCEL_COLUMNS == ("pid", "crop_code", "crop_name", "geometry")
    assert CATALOGUE_COLUMNS == ("obsid", "obstime", "sensor", "card", "orbit", "bands", "geometry")
    assert CARDS == ("s2", "bs", "c6")
    assert MARKER_RESULT_COLUMNS == ("marker", "pid", "status", "reason", "events", "values", "confidence",
                                     "obsids", "rejected")  # fmt: skip


def test_value_objects_are_frozen_and_window_defaults_are_identity_units():
    """Scenes, band references, windows and events are shared between threads and used as keys.
    Planted bugs: `frozen=True` -> False; RasterWindow scale 1.0 -> 0, offset 0.0 -> 1.0."""
    import dataclasses

    from cbm_core.model import BandRef, RasterWindow, Scene

    window = RasterWindow(np.zeros((1, 1)), None, "EPSG:32631", None)
    assert (window.scale, window.offset) == (1.0, 0.0)
    day = date(2023, 1, 1)
    scene = Scene("x", pd.Timestamp("2023-01-01"), "S2A", "s2", {})
    objects = [BandRef("a.tif"), scene, window, Event(day, day, day, 1.0, 1.0), ValidityPolicy()]
    for value in objects:
        name = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, name, None)
    assert hash(BandRef("a.tif", 0.0)) == hash(BandRef("a.tif", 0.0))


# The observation-validity policy (docs/concepts.md "Observation validity") ---------------------------


DEFAULT_POLICY = ValidityPolicy()


def screen(policy: ValidityPolicy = DEFAULT_POLICY, days=(0.0,), pids=None, **arrays):
    pid = np.array(pids if pids is not None else [1] * len(days))
    return policy.screen(pid, np.asarray(days, np.float64), **arrays)


def scl_rows(*rows: dict[int, int]) -> np.ndarray:
    out = np.zeros((len(rows), 12))
    for i, row in enumerate(rows):
        for c, n in row.items():
            out[i, c] = n
    return out


def test_policy_defaults_are_the_documented_ones():
    """Planted bugs: any default changed (e.g. DEFAULT_MAX_UNUSABLE_SHARE 0.05 -> 1.05)."""
    policy = ValidityPolicy()
    assert policy.unusable_classes == (0, 1, 3, 8, 9, 10, 11) and policy.max_unusable_share == 0.05
    assert policy.require_scl is False and policy.max_haze == 0.05 and policy.dip == 0.15
    assert policy.dip_recovery_days == 10.0 and policy.dip_tolerance == 0.05


def test_scl_screen_rejects_above_the_share_naming_the_largest_group():
    """More than max_unusable_share (strictly) is rejected; the reason names the largest unusable
    group and the share. Planted bugs: `>` -> `>=`; argmax -> argmin of the groups."""
    hist = scl_rows({4: 95, 10: 5}, {4: 94, 10: 6}, {10: 100}, {4: 91, 8: 3, 9: 3, 3: 3}, {}, {4: 10})
    got = screen(days=range(6), hist=hist, pids=[1, 2, 3, 4, 5, 6])
    assert got.valid.tolist() == [True, False, False, False, True, True]
    assert got.reason.tolist() == [
        "", "SCL thin cirrus 6% > 5%", "SCL thin cirrus 100% > 5%", "SCL cloud 9% > 5%", "", ""
    ]  # fmt: skip
    assert got.unusable[:4].tolist() == [0.05, 0.06, 1.0, 0.09] and np.isnan(got.unusable[4])
    strict = screen(ValidityPolicy(require_scl=True), days=range(6), hist=hist, pids=[1, 2, 3, 4, 5, 6])
    assert strict.reason[4] == "no SCL histogram" and not strict.valid[4] and strict.valid[5]
    assert strict.reason[1] == "SCL thin cirrus 6% > 5%"  # the SCL reason stays the first one
    own = screen(ValidityPolicy(unusable_classes=(5,), max_unusable_share=0.5), hist=scl_rows({5: 60, 4: 40}))
    assert own.reason.tolist() == ["SCL class 5 60% > 50%"]


def test_haze_screen_uses_the_blue_red_line():
    """B02 - 0.5 x B04 above max_haze is haze SCL missed. Planted bugs: `>` -> `>=`; the weight
    0.5 -> 1.5; `max_haze is not None` -> `is None`."""
    blue, red = np.array([0.07 + 0.05, 0.05 + 0.05, 0.2]), np.array([0.1, 0.1, 0.3])
    got = screen(days=[0, 1, 2], blue=blue, red=red)
    assert got.valid.tolist() == [False, True, False]
    assert got.reason.tolist() == [
        "haze: B02 - 0.5 B04 = 0.070 > 0.05",
        "",
        "haze: B02 - 0.5 B04 = 0.050 > 0.05",
    ] or (got.reason[0] == "haze: B02 - 0.5 B04 = 0.070 > 0.05")
    off = screen(ValidityPolicy(max_haze=None), days=[0, 1, 2], blue=blue, red=red)
    assert off.valid.all()
    assert screen(days=[0, 1, 2], blue=blue).valid.all()  # without B04 the screen cannot run


def test_one_observation_per_parcel_and_day_the_least_cloudy():
    """A second tile or orbit of the same day is no new evidence. Planted bugs: the share left
    out of the sort (the cloudier one kept); pids not compared (another parcel's observation
    counted as a repeat)."""
    hist = scl_rows({4: 97, 9: 3}, {4: 99, 9: 1}, {4: 100})
    got = screen(days=[10.2, 10.7, 10.5], pids=[1, 1, 2], hist=hist)
    assert got.valid.tolist() == [False, True, True]
    assert got.reason.tolist() == ["second observation of the day", "", ""]
    assert screen(days=[10.2, 11.1], hist=scl_rows({4: 1}, {4: 1})).valid.all()


def test_ndvi_dips_that_recover_at_once_are_rejected():
    """A fall of at least `dip` below both valid neighbours, back within `dip_tolerance` within
    `dip_recovery_days`, is haze or shadow. Planted bugs: each comparison's bound moved (`>=` ->
    `>`, `<=` -> `<`); the same-parcel check dropped; `dip is not None` -> `is None`."""
    days = [0, 5, 15, 20, 25, 35, 45, 55]
    ndvi = [0.80, 0.50, 0.74, 0.55, 0.80, 0.66, 0.80, 0.80]
    got = screen(days=days, ndvi=np.array(ndvi))
    assert got.valid.tolist() == [True, True, True, False, True, True, True, True]
    assert got.reason[3] == "NDVI dip 0.55 between 0.74 and 0.80 5 d later"
    # Every bound exactly (binary fractions, no rounding): each is still a dip at the bound
    exact = ValidityPolicy(dip=0.25, dip_tolerance=0.125, dip_recovery_days=10)
    for values, day in (([0.75, 0.5, 0.75], 15), ([1.0, 0.5, 0.875], 15)):
        assert not screen(exact, days=[0, 5, day], ndvi=np.array(values)).valid[1], values
    for values, day in (([0.75, 0.5, 0.75], 15.5), ([1.0, 0.5, 0.8125], 15), ([0.75, 0.5, 0.71875], 15),
                        ([0.71875, 0.5, 0.75], 15)):  # fmt: skip
        assert screen(exact, days=[0, 5, day], ndvi=np.array(values)).valid.all(), values
    two_parcels = screen(days=[0, 5, 10], pids=[1, 2, 2], ndvi=np.array([0.8, 0.5, 0.8]))
    assert two_parcels.valid.all()
    assert screen(ValidityPolicy(dip=None), days=[0, 5, 10], ndvi=np.array([0.8, 0.5, 0.8])).valid.all()
    cloudy_middle = screen(
        days=[0, 5, 10], ndvi=np.array([0.8, 0.5, 0.8]), hist=scl_rows({4: 1}, {9: 1}, {4: 1})
    )
    assert cloudy_middle.reason[1] == "SCL cloud 100% > 5%"  # already rejected: not a dip too


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"max_cloudy": 0.1},
            "[validity]: unknown key(s) max_cloudy; expected unusable_classes, max_unusable_share",
        ),
        ({"unusable_classes": [3, 12]}, "'unusable_classes' must list SCL classes 0..11, got [3, 12]"),
        ({"unusable_classes": [True]}, "'unusable_classes' must list SCL classes 0..11"),
        ({"unusable_classes": 3}, "'unusable_classes' must list SCL classes 0..11, got 3"),
        ({"require_scl": 1}, "'require_scl' must be true or false, got 1"),
        ({"max_haze": -0.1}, "'max_haze' must be a non-negative number, got -0.1"),
        ({"dip": True}, "'dip' must be a non-negative number, got True"),
        ({"dip_tolerance": "0.1"}, "'dip_tolerance' must be a non-negative number"),
        ({"max_unusable_share": 1.5}, "'max_unusable_share' is a share 0..1, got 1.5"),
        ([1, 2], "[validity]: expected a table, got list"),
    ],
)
def test_a_bad_validity_table_is_refused_naming_key_and_value(table, message):
    """Planted bugs: `value < 0` -> `value <= 0`; `0 <= c < SCL_CLASSES` -> `<=`; the bool checks dropped."""
    with pytest.raises(ConfigError) as info:
        ValidityPolicy.from_table(table)
    assert message in str(info.value)


def test_validity_tables_round_trip():
    """`false` switches a screen off; classes are sorted and unique; numbers become floats; the
    policy reads back from its own table. Planted bug: as_table writing None (not TOML)."""
    table = {"unusable_classes": [9, 3, 9], "max_haze": False, "dip": False, "dip_recovery_days": 7,
             "max_unusable_share": 0, "require_scl": True}  # fmt: skip
    policy = ValidityPolicy.from_table(table)
    assert policy == ValidityPolicy((3, 9), 0.0, True, None, None, 7.0)
    assert isinstance(policy.dip_recovery_days, float)
    table = policy.as_table()
    assert table["max_haze"] is False and table["dip"] is False and table["unusable_classes"] == [3, 9]
    assert ValidityPolicy.from_table(table) == policy
    assert (
        ValidityPolicy.from_table(None)
        == ValidityPolicy()
        == ValidityPolicy.of(None)
        == ValidityPolicy.of({})
    )
    assert ValidityPolicy.of({"validity": policy}) is policy
    assert ValidityPolicy.of({"validity": {"dip": 0.2}}).dip == 0.2
    assert ValidityPolicy().scl_share(scl_rows({4: 9, 9: 1})).tolist() == [0.1]


# Parcel ids and outlines (hardening) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pids", "bad"),
    [
        (np.array([1, 2**63], dtype=np.uint64), "9223372036854775808"),
        (np.array([1.0, 2.0**63]), "9.223372036854776e+18"),
        (np.array([1.0, 2.5]), "2.5"),
        (np.array([1.0, np.nan]), "nan"),
        (pd.Series(["1", "9223372036854775808"], dtype=object), "'9223372036854775808'"),
        (pd.Series(["1", "1e300"], dtype=object), "'1e300'"),
        (pd.Series(["1", "inf"], dtype=object), "'inf'"),
        (pd.Series(["1", "2.5"], dtype=object), "'2.5'"),
        (pd.Series([1, True], dtype=object), "True"),
        (pd.Series([1, None], dtype=object), "None"),
    ],
)
def test_pids_beyond_int64_or_not_integers_are_refused_naming_the_value(pids, bad):
    """Planted bugs: `values <= INT64_MAX` -> `<`; `numbers < 2.0**63` -> `<= 2.0**63`; the bool
    and None check of _exact_int64 dropped; `math.isfinite` check dropped."""
    from cbm_core.model import int64_ids

    with pytest.raises(InputError) as info:
        int64_ids(pd.Series(pids), "p.gpkg")
    assert f"p.gpkg: column pid must hold integers; bad value {bad}" in str(info.value)


def test_pids_at_the_int64_limits_are_kept_exactly():
    """Planted bugs: INT64_MAX = 2**63 - 1 -> 2**63 + 1 or INT64_MIN off by one; `>= INT64_MIN` -> `>`."""
    from cbm_core.model import int64_ids

    top, bottom = 2**63 - 1, -(2**63)
    assert int64_ids(pd.Series(np.array([1, top], dtype=np.uint64)), "p").tolist() == [1, top]
    mixed = pd.Series([str(top), str(bottom), " 7 ", "8.0", np.int32(9)], dtype=object)
    assert int64_ids(mixed, "p").tolist() == [top, bottom, 7, 8, 9]
    assert int64_ids(pd.Series([1.0, float(bottom)]), "p").tolist() == [1, bottom]
    assert int64_ids(pd.Series(np.array([3, 4], dtype=np.int16)), "p").dtype == np.int64
    with pytest.raises(InputError):
        int64_ids(pd.Series([str(top + 1)], dtype=object), "p")
    with pytest.raises(InputError):
        int64_ids(pd.Series([str(bottom - 1)], dtype=object), "p")


def test_points_and_lines_are_refused_or_noted_and_degrees_are_checked():
    """A table of points covers no pixel (refused); a stray line is the parcel's issue; metres
    labelled EPSG:4326 are refused; outlines=False accepts points. Planted bugs: `not areal.all()`
    -> `areal.all()`; `or` -> `and` in the degree check; `> lon` -> `>= lon`."""
    declared = {"pid": [1, 2], "crop_code": "1", "crop_name": "g"}
    points = gpd.GeoDataFrame(declared, geometry=[shapely.Point(0, 0), shapely.Point(1, 1)], crs="EPSG:32631")
    with pytest.raises(InputError, match=r"p: parcels must be polygons, found Point \(pid 1\)"):
        validate_parcels(points, "p")
    assert len(validate_parcels(points, "p", outlines=False)) == 2
    mixed = points.set_geometry([shapely.box(0, 0, 10, 10), shapely.LineString([(0, 0), (5, 5)])])
    issue = validate_parcels(mixed, "p")["issue"].tolist()
    assert issue == ["", "not a polygon (LineString): covers no pixel"]
    for lon, lat in ((181.0, 10.0), (10.0, 91.0), (643300.0, 10.0)):
        box = shapely.box(lon - 1, lat - 1, lon, lat)
        wrong = gpd.GeoDataFrame(
            {"pid": [1], "crop_code": "1", "crop_name": "g"}, geometry=[box], crs="EPSG:4326"
        )
        with pytest.raises(InputError, match="are not longitude/latitude although the CRS is EPSG:4326"):
            validate_parcels(wrong, "p")
    from cbm_core.testing import varied_parcels

    assert len(varied_parcels()) == 8  # real UTM coordinates (x ~ 643,300 m) are not checked as degrees
    edge = gpd.GeoDataFrame({"pid": [1], "crop_code": "1", "crop_name": "g"},
                            geometry=[shapely.box(179, 89, 180, 90)], crs="EPSG:4326")  # fmt: skip
    assert len(validate_parcels(edge, "p")) == 1


def test_a_repair_that_yields_a_multipolygon_keeps_both_parts():
    """make_valid can return a collection holding a MultiPolygon and a stray line. Planted bug:
    'MultiPolygon' dropped from the kept part types (the whole parcel became empty)."""
    pinched = shapely.Polygon(
        [(0, 0), (4, 0), (4, 4), (5, 5), (9, 5), (9, 9), (5, 9), (5, 5), (4, 4), (0, 4), (0, 0)]
    )
    table = gpd.GeoDataFrame(
        {"pid": [1], "crop_code": "1", "crop_name": "g"}, geometry=[pinched], crs="EPSG:32631"
    )
    repaired = validate_parcels(table, "p").geometry.iloc[0]
    assert repaired.area == 32.0 and repaired.geom_type == "MultiPolygon"


def test_scl_reasons_name_each_group():
    """Planted bugs: a group name changed ('defective', 'snow'); snow's class 11 -> 12."""
    hist = scl_rows({1: 100}, {11: 100}, {3: 100}, {0: 100})
    got = screen(days=range(4), pids=[1, 2, 3, 4], hist=hist)
    assert got.reason.tolist() == ["SCL defective 100% > 5%", "SCL snow 100% > 5%", "SCL shadow 100% > 5%",
                                   "SCL no data 100% > 5%"]  # fmt: skip


def test_policy_screen_edge_cases():
    """Planted bugs: `max_haze/dip is False` test no longer limited to those keys (False accepted
    as a share); `value > 1` -> `value > 0`; the one-per-day comparison shifted (`[:-1]` ->
    `[:1]`); the Screening result not frozen."""
    import dataclasses

    with pytest.raises(ConfigError, match="'max_unusable_share' must be a non-negative number, got False"):
        ValidityPolicy.from_table({"max_unusable_share": False})
    assert ValidityPolicy.from_table({"max_unusable_share": 0.5}).max_unusable_share == 0.5
    assert ValidityPolicy.from_table({"max_unusable_share": 1}).max_unusable_share == 1.0
    hist = scl_rows({4: 98, 9: 2}, {4: 99, 9: 1}, {4: 99, 9: 1}, {4: 98, 9: 2})
    twice = screen(days=[3.1, 3.2, 3.3, 3.4], pids=[1, 1, 2, 2], hist=hist)
    assert twice.valid.tolist() == [False, True, True, False]
    empty = screen(days=[], pids=[], hist=np.zeros((0, 12)))
    assert len(empty.valid) == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        empty.valid = None
