"""Scheme recipes, the traffic-light rule's options, and scoring ready-made signatures."""

from __future__ import annotations

import json

import geopandas as gpd
import pandas as pd
import pytest
from click.testing import CliRunner

from cbm_core.api import read_signatures, score
from cbm_core.cli import cli
from cbm_core.errors import InputError
from cbm_core.model import Event, MarkerResult, Status, results_frame
from cbm_core.pipeline import Engine
from cbm_plugins import traffic_light
from cbm_plugins.recipes import cbm_rule_schemes
from markers._simulate import simulate
from sources.table import series_table, signatures_series

RECIPES = ("grassland-mowing", "crop-declaration", "ploughing-ban", "soil-cover", "foi-heterogeneity")


def cut(day: str, kind: str = "mowing:s2") -> Event:
    when = pd.Timestamp(day).date()
    return Event(when, when, when, 0.3, 0.9, ("S2_a", "S2_b"), kind)


SEEN = {"valid_observations": 20, "window": "2023-03-16..2023-10-27", "max_gap_days": 15.0}  # evidence


def decide(results: list[MarkerResult], rule: dict, crops=("grassland",)) -> list:
    parcels = gpd.GeoDataFrame(
        {"pid": range(1, len(crops) + 1), "crop_code": 1, "crop_name": list(crops)},
        geometry=[None] * len(crops),
    )
    return traffic_light.cbm_rule_decide(results=results_frame(results), parcels=parcels, params=rule)


def test_recipes_parse_into_schemes():
    engine = Engine(progress=False)
    found = cbm_rule_schemes()
    for name in RECIPES:
        assert name in found
        scheme = engine.scheme(name, found[name].parent)
        for marker in scheme.markers:
            engine.plugins.caller(marker.plugin, "cbm_marker_run", marker.where)


def test_min_events_season_and_kinds():
    results = [
        MarkerResult(
            "mowing", 1, Status.OK, events=[cut("2023-02-01"), cut("2023-06-01")], values=SEEN, confidence=0.9
        )
    ]
    rule = {"markers": {"mowing": {"min_events": 2}}}
    assert decide(results, rule)[0].light == "green"
    seasonal = {"markers": {"mowing": {"min_events": 2, "season_start": "03-16", "season_end": "10-27"}}}
    verdict = decide(results, seasonal)[0]
    assert verdict.light == "red"
    assert "1 event(s) between 03-16 and 10-27" in verdict.reasons[0] and "2 needed" in verdict.reasons[0]
    assert "mowing:s2 2023-06-01 0.30 (2023-06-01; obs S2_a -> S2_b)" in verdict.reasons[0]
    kinds = {"markers": {"mowing": {"kinds": ["ploughing"], "expect": "no_event"}}}
    assert decide(results, kinds)[0].light == "green"


def test_conflicts_low_confidence_and_crop_scope():
    mowed = MarkerResult("mowing", 1, Status.OK, events=[cut("2023-06-01")], values=SEEN, confidence=0.9)
    ploughed = MarkerResult(
        "bare_soil", 1, Status.OK, events=[cut("2023-05-01", "ploughing")], values=SEEN, confidence=0.9
    )
    rule = {"markers": {"bare_soil": {"expect": "no_event"}}}
    verdict = decide([mowed, ploughed], rule)[0]
    assert verdict.light == "yellow" and verdict.reasons[0].startswith("conflicting markers: mowing")
    strict = decide([mowed, ploughed], rule | {"red_if_any_fails": True})[0]
    assert strict.light == "red" and strict.reasons[0] == "requirement(s) not met: bare_soil"
    unsure = MarkerResult("mowing", 1, Status.OK, events=[cut("2023-06-01")], confidence=0.3)
    assert decide([unsure], {})[0].light == "yellow"
    cloudy = MarkerResult("mowing", 1, Status.NOT_VALID, reason="too few observations in season: 2 clear S2")
    verdict = decide([cloudy], {})[0]
    assert verdict.light == "yellow" and "too few observations" in verdict.reasons[0]
    scoped = {"markers": {"mowing": {"crops": ["grassland"]}, "bare_soil": {"expect": "no_event"}}}
    arable = [
        MarkerResult("mowing", 1, Status.OK, values=SEEN, confidence=0.9),
        MarkerResult("bare_soil", 1, Status.OK, values=SEEN, confidence=0.9),
    ]
    assert decide(arable, scoped, crops=("maize",))[0].light == "green"  # mowing does not apply to maize
    assert decide(arable, scoped, crops=("grassland",))[0].light == "yellow"


def test_lights_rest_on_evidence_and_valid_observations():
    """No red from absence of evidence, no green from a rejected observation; reasons say what is missing."""
    rule = {"markers": {"ndvi_drop": {"expect": "event", "min_valid": 6, "max_gap_days": 30}}}
    few = {"valid_observations": 3, "window": "2023-04-01..2023-04-30", "max_gap_days": 12.0}
    nothing = MarkerResult(
        "ndvi_drop", 1, Status.OK, "largest NDVI drop 0.09 (2023-04-05 -> 2023-04-15) < 0.10", values=few
    )
    verdict = decide([nothing], rule)[0]
    assert verdict.light == "yellow"
    assert verdict.reasons[0] == (
        "ndvi_drop: no event in 3 valid observations 2023-04-01..2023-04-30 (longest gap 12 d); "
        "largest NDVI drop 0.09 (2023-04-05 -> 2023-04-15) < 0.10; "
        "insufficient evidence: 3 valid observations in 2023-04-01..2023-04-30; 6 needed"
    )
    assert decide([MarkerResult("ndvi_drop", 1, Status.OK, values=SEEN)], rule)[0].light == "red"
    gappy = SEEN | {"max_gap_days": 45.0}
    verdict = decide([MarkerResult("ndvi_drop", 1, Status.OK, values=gappy)], rule)[0]
    assert verdict.light == "yellow" and "45 days without a valid observation" in verdict.reasons[0]
    unknown = MarkerResult("ndvi_drop", 1, Status.OK, values={})
    assert decide([unknown], rule)[0].light == "yellow"  # a marker that reports no evidence cannot give red
    # an event resting on an observation the policy rejected confirms nothing
    cirrus = MarkerResult(
        "ndvi_drop",
        1,
        Status.OK,
        events=[cut("2023-04-30")],
        values=few,
        confidence=0.9,
        obsids=("S2_a",),
        rejected=(("S2_b", "SCL thin cirrus 100% > 5%"),),
    )
    verdict = decide([cirrus], rule)[0]
    assert verdict.light == "yellow"
    assert "event 2023-04-30 ignored: it rests on S2_b (SCL thin cirrus 100% > 5%)" in verdict.reasons[0]
    assert (
        decide([MarkerResult(**{**cirrus.__dict__, "rejected": (), "obsids": ("S2_a", "S2_b")})], rule)[
            0
        ].light
        == "green"
    )
    # a prohibited practice: no ploughing seen on too few looks is no green either
    ban = {"markers": {"bare_soil": {"expect": "no_event", "kinds": ["ploughing"]}}}
    assert decide([MarkerResult("bare_soil", 1, Status.OK, values=few)], ban)[0].light == "yellow"
    assert decide([MarkerResult("bare_soil", 1, Status.OK, values=SEEN)], ban)[0].light == "green"


@pytest.fixture(scope="module")
def scenario():
    return simulate(80, seed=51)


def test_score_reads_dn_csv_and_writes_outputs(tmp_path, scenario):
    table = series_table(scenario.series)
    s2 = table["card"] == "s2"
    for column in ("mean", "min", "max", "p25", "p50", "p75", "std"):
        table.loc[s2, column] = table.loc[s2, column] * 10_000 + 1000  # DN of processing baseline >= 04.00
    table = table.drop(columns="obsid")  # synthesized from card, date and orbit
    table.to_csv(tmp_path / "sig.csv", index=False)
    series = read_signatures(tmp_path / "sig.csv", scale="dn", offset=-0.1)
    back = series.stats[series.stats["card"] == "s2"]["mean"].to_numpy()
    original = scenario.series.stats[scenario.series.stats["card"] == "s2"]["mean"].to_numpy()
    assert sorted(back.round(6)) == pytest.approx(sorted(original.round(6)), abs=1e-6)
    assert series.stats["obsid"].str.match(r"^(s2|bs|c6)_2023\d{4}T000000").all()
    with pytest.raises(InputError, match="digital numbers"):
        read_signatures(tmp_path / "sig.csv")
    results, verdicts = score(series, "grassland-mowing", tmp_path / "out")
    assert len(results) == 2 * 80 and len(verdicts) == 80
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "verdicts.csv",
        "markers.parquet",
        "summary.json",
    }
    grass = set(scenario.actual_crop.index[scenario.actual_crop == "grassland"])
    lights = verdicts.set_index("pid")["light"]
    assert (lights[list(grass)] == "green").mean() > 0.8


def test_cbm_score_command(tmp_path, scenario):
    series_table(scenario.series).to_parquet(tmp_path / "sig.parquet")
    scenario.series.parcels.to_file(tmp_path / "parcels.gpkg")
    out = CliRunner().invoke(
        cli,
        [
            "score",
            "--signatures",
            str(tmp_path / "sig.parquet"),
            "--scheme",
            "grassland-mowing",
            "--out",
            str(tmp_path / "o"),
            "--parcels",
            str(tmp_path / "parcels.gpkg"),
        ],
    )
    assert out.exit_code == 0, out.output
    verdicts = pd.read_csv(tmp_path / "o" / "verdicts.csv")
    assert len(verdicts) == 80 and set(verdicts["crop_name"]) == set(scenario.series.parcels["crop_name"])
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["parcels"] == 80 and set(summary["markers"]) == {"mowing", "bare_soil"}


def test_bad_signature_tables():
    good = pd.DataFrame(
        {"pid": [1], "obstime": ["2023-06-01"], "card": ["s2"], "band": ["B04"], "mean": [0.1]}
    )
    assert len(signatures_series(good).stats) == 1
    with pytest.raises(InputError, match="missing column"):
        signatures_series(good.drop(columns="card"))
    with pytest.raises(InputError, match="unknown card"):
        signatures_series(good.assign(card="s3"))
    with pytest.raises(InputError, match="not a date"):
        signatures_series(good.assign(obstime="yesterday"))
