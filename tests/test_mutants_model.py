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

from cbm_core.errors import InputError
from cbm_core.model import (
    HIST_COLUMNS,
    SIGNATURE_COLUMNS,
    STATS,
    Event,
    Light,
    MarkerResult,
    Signatures,
    Status,
    TimeSeries,
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
    assert list(both.stats.index) == [0, 1]
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
    """Events and values as JSON text (dates ISO, numpy scalars plain, non-finite floats null).
    Planted bugs: `isoformat()[:10]` -> `[:9]`; NaN kept (invalid JSON); confidence None -> 0."""
    event = Event(date(2023, 5, 1), pd.Timestamp("2023-05-03 10:00"), date(2023, 5, 9), np.float32(0.5), 0.9,
                  ("S2_a", "S2_b"), "mowing")  # fmt: skip
    values = {"n": np.int64(4), "when": [date(2023, 1, 2)], 3: float("nan"), "inf": float("inf"), "t": (1, 2)}
    results = [
        MarkerResult("m", np.int64(5), Status.OK, "", [event], values, 0.75, ("S2_a",)),
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
    assert tuple(frame.columns) == (
        "marker",
        "pid",
        "status",
        "reason",
        "events",
        "values",
        "confidence",
        "obsids",
    )
    assert len(results_frame([])) == 0


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
        "pid": [2, 1, 1, 1, 9], "obsid": ["S2_a", "S2_b", "S2_a", "S1_c", "S2_a"],
        "band": ["B04", "B04", "B08", "VV", "B04"], "count": [1, 2, 3, 4, 5], **{s: 0.1 for s in STATS[1:]},
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
        [1, "S2_a", "B08"], [1, "S2_b", "B04"], [1, "S1_c", "VV"], [2, "S2_a", "B04"]]  # fmt: skip
    assert series.stats["card"].tolist() == ["s2", "s2", "bs", "s2"]
    assert series.stats["orbit"].tolist()[2] == "ASC"
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
        [1, "S2_a", "B08"], [1, "S2_b", "B04"], [1, "S1_c", "VV"], [2, "S2_a", "B04"], [9, "S2_a", "B04"]
    ]  # fmt: skip
    assert table["clear_fraction"].tolist()[:2] == [0.8, 0.8]
    assert np.isnan(table["clear_fraction"][2]) and np.isnan(table["clear_fraction"][3])  # no/empty histogram
    assert table["hist_9"].tolist()[:2] == [1, 1]


def test_enums_are_their_documented_strings():
    assert [str(s) for s in Status] == ["OK", "NOT_VALID", "NOT_EXECUTED"]
    assert [str(light) for light in Light] == ["green", "yellow", "red"]
