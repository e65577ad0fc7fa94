"""Verdicts an agency can trust, on the real demo data.

April 2023 (demo/flanders-2023): the 30 April scene is thin cirrus (SCL 10) over the whole patch;
it used to carry all 7 greens of the demo. Two full seasons (demo/flanders-seasons): grassland
mowing only on grassland, each parcel in its own campaign year, and `cbm score` on a tidy table
without declarations (how the hidden mowing hold-out is scored).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import cbm_core as cbm
from cbm_core.api import score
from cbm_core.cli import cli
from cbm_core.config import load_run_config
from cbm_core.errors import ConfigError, InputError
from cbm_core.model import DEFAULT_MAX_UNUSABLE_SHARE, signatures_table, unusable_share
from cbm_core.pipeline import Engine
from sources.table import signatures_series
from tests.conftest import ROOT

APRIL = ROOT / "demo" / "flanders-2023"
SEASONS = ROOT / "demo" / "flanders-seasons"
CIRRUS = "S2B_MSIL2A_20230430_T31UFS"  # SCL class 10 over the whole patch
GRASS = "9120"  # WorldCereal code of "Permanent grass crops" in flanders-seasons
SEASON_COLUMNS = 'crop_code_column = "crop_code"\ncampaign_year_column = "campaign_year"\n'


def config(folder: Path, name: str, scheme: str, data: Path, extra: str = "", s2: str = "") -> Path:
    """A run configuration over a bundled demo folder, writing into folder/name."""
    bands = s2 or '["B04", "B08", "B11", "SCL"]'
    text = f"""{scheme}
{extra}
[run]
out = "{folder / name}"

[source]
plugin = "local"
parcels = "{data / "parcels.gpkg"}"
layer = "parcels"
crop_name_column = "crop_name"
scenes = "{data / "scenes.csv"}"
{SEASON_COLUMNS if data == SEASONS else ""}

[store]
plugin = "parquet"
path = "{folder / "store"}"

[[extract]]
card = "s2"
plugin = "s2_l2a"
bands = {bands}

[[extract]]
card = "bs"
plugin = "s1"
bands = ["VV", "VH"]
"""
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def results_of(run) -> pd.DataFrame:
    return run.results.assign(
        obsids=run.results["obsids"].map(json.loads),
        events=run.results["events"].map(json.loads),
        rejected=run.results["rejected"].map(json.loads),
    )


def used_observations(results: pd.DataFrame) -> set[tuple[int, str]]:
    """(pid, obsid) of every Sentinel-2 observation a marker used or an event rests on."""
    used = set()
    for pid, obsids, events in zip(results["pid"], results["obsids"], results["events"], strict=True):
        used |= {(int(pid), o) for o in obsids}
        used |= {(int(pid), o) for e in events for o in e["obsids"]}
    return {(p, o) for p, o in used if o.startswith("S2")}


def unusable(run) -> dict[tuple[int, str], float]:
    """The unusable SCL share of every stored S2 observation, computed here from the histograms."""
    scl = run.series.scl
    share = unusable_share(scl)
    return {(int(p), str(o)): float(s) for p, o, s in zip(scl["pid"], scl["obsid"], share, strict=True)}


@pytest.fixture(scope="module")
def april(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("april")
    runs = {}
    for scheme in ("ndvi-drop", "grassland-mowing"):
        runs[scheme] = cbm.run(config(folder, scheme, f'scheme = "{scheme}"', APRIL), progress=False)
    runs["folder"] = folder
    return runs


@pytest.mark.parametrize("scheme", ["ndvi-drop", "grassland-mowing"])
def test_april_no_verdict_rests_on_a_rejected_observation_and_no_red_without_evidence(april, scheme):
    run = april[scheme]
    results = results_of(run)
    shares = unusable(run)
    used = used_observations(results)
    assert used, "the markers used some observations"
    assert all(shares[u] <= DEFAULT_MAX_UNUSABLE_SHARE for u in used)  # every one valid by its SCL
    assert not any(o == CIRRUS for _, o in used)
    # the markers say why they left the cirrus scene out, for every parcel that has it
    for rejected in results["rejected"]:
        reasons = dict(map(tuple, rejected))
        if CIRRUS in reasons:
            assert reasons[CIRRUS] == "SCL thin cirrus 100% > 5%"
    lights = run.verdicts.set_index("pid")["light"]
    # two valid dates in April: nothing can be confirmed or rejected, and every reason says so
    assert (lights == "yellow").all(), lights.value_counts().to_dict()
    assert all("insufficient evidence" in r for r in run.verdicts["reasons"])


def test_april_reasons_name_what_is_missing(april):
    reasons = april["ndvi-drop"].verdicts.set_index("pid")["reasons"]
    assert reasons[4] == (
        "ndvi_drop: insufficient evidence: "
        "2 valid Sentinel-2 observation(s) in 2023-04-02..2023-04-30; 3 needed"
    )
    mowing = april["grassland-mowing"].verdicts.set_index("pid")["reasons"]
    # bare_soil is optional in the recipe: the April data have no B02, so it says so instead of "cloudy"
    assert "bare_soil: NOT_EXECUTED (not run: marker 'bare_soil' needs s2 band B02" in mowing[4]


def test_april_greens_came_from_the_cirrus_scene(april, tmp_path):
    """The planted bug: count thin cirrus as usable (as ndvi_drop used to) and the greens come back,
    every one dated on 30 April; the default policy gives none."""
    scheme = tmp_path / "cirrus-ok.toml"
    recipe = (ROOT / "cbm_plugins" / "schemes" / "ndvi-drop.toml").read_text()
    scheme.write_text(
        recipe.replace("unusable_classes = [0, 1, 3, 8, 9, 10, 11]", "unusable_classes = [0, 1, 3, 8, 9, 11]")
    )
    path = config(april["folder"], "cirrus-ok", f'scheme = "{scheme}"', APRIL)
    run = cbm.run(path, progress=False)
    greens = run.verdicts[run.verdicts["light"] == "green"]
    assert len(greens) >= 5
    events = results_of(run).explode("events").dropna(subset=["events"])
    assert {e["main"] for e in events["events"] if e["magnitude"] >= 0.1} == {"2023-04-30"}


@pytest.fixture(scope="module")
def seasons(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("seasons")
    extra = '[applies_to]\ncrop_codes = ["9120"]\n'
    bands = '["B02", "B04", "B08", "B11", "SCL"]'
    path = config(folder, "mowing", 'scheme = "grassland-mowing"', SEASONS, extra, bands)
    return {"run": cbm.run(path, progress=False), "folder": folder}


def test_seasons_mowing_judges_grassland_only_each_in_its_campaign_year(seasons):
    run = seasons["run"]
    verdicts = pd.read_csv(seasons["folder"] / "mowing" / "verdicts.csv", dtype={"crop_code": str})
    grass = verdicts["crop_code"] == GRASS
    assert (verdicts.loc[~grass, "light"] == "not_applicable").all() and (~grass).sum() == 18
    assert verdicts.loc[grass, "light"].isin(["green", "yellow", "red"]).all()
    assert {"campaign_year", "crop_code", "crop_name"} <= set(verdicts.columns)
    results = results_of(run)
    assert set(results["pid"]) == set(verdicts.loc[grass, "pid"])  # no marker ran on other crops
    mowing = results[results["marker"] == "mowing"].set_index("pid")
    years = verdicts.set_index("pid")["campaign_year"]
    for pid, values in mowing["values"].items():
        window = json.loads(values)["window"]
        assert window == f"{years[pid]}-03-16..{years[pid]}-10-27", (pid, window)
    shares = unusable(run)
    decided = set(verdicts.loc[verdicts["light"].isin(["green", "red"]), "pid"])
    for pid, obsid in used_observations(results[results["pid"].isin(decided)]):
        assert shares[(pid, obsid)] <= DEFAULT_MAX_UNUSABLE_SHARE, (pid, obsid)
    counts = verdicts["light"].value_counts().to_dict()
    assert counts.get("green", 0) >= 6, counts  # grassland in Flanders is mown


def test_seasons_events_table_beside_markers(seasons):
    out = seasons["folder"] / "mowing"
    events = pd.read_parquet(out / "events.parquet")
    assert list(events.columns) == [
        "pid", "marker", "kind", "start", "main", "end", "magnitude", "confidence", "obsids",
    ]  # fmt: skip
    assert (events["start"] <= events["main"]).all() and (events["main"] <= events["end"]).all()
    assert len(pd.read_csv(out / "events.csv")) == len(events) > 0
    assert set(events["kind"]) >= {"mowing:s2"}


def test_cbm_score_on_an_undeclared_tidy_table_assesses_every_parcel(seasons, tmp_path):
    """The hold-out's path: tidy table (S2 0-1 reflectance, B04/B08 and NDVI, no B11, SCL histogram
    columns; S1), no declarations, grassland-mowing: every parcel assessed, events written."""
    run = seasons["run"]
    stored = Engine(progress=False).read_store(load_run_config(Path(run.summary["config"])).store)
    table = signatures_table(stored, run.catalogue)
    table = table[table["band"].isin(["B04", "B08", "VV", "VH"])]
    ndvi = table[table["band"].isin(["B04", "B08"])].pivot_table(
        index=["pid", "obsid"], columns="band", values="mean"
    )
    extra = table[table["band"] == "B08"].set_index(["pid", "obsid"])
    extra = extra.assign(band="NDVI", mean=((ndvi["B08"] - ndvi["B04"]) / (ndvi["B08"] + ndvi["B04"])))
    table = pd.concat([table, extra.reset_index()], ignore_index=True).drop(
        columns=["obsid", "clear_fraction"]
    )
    table.to_csv(tmp_path / "table.csv", index=False)
    out = CliRunner().invoke(
        cli,
        [
            "score",
            "--signatures",
            str(tmp_path / "table.csv"),
            "--scheme",
            "grassland-mowing",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert out.exit_code == 0, out.output
    verdicts = pd.read_csv(tmp_path / "o" / "verdicts.csv")
    assert len(verdicts) == 30 and not (verdicts["light"] == "not_applicable").any()
    results = pd.read_parquet(tmp_path / "o" / "markers.parquet")
    mowing = results[results["marker"] == "mowing"]
    assert len(mowing) == 30 and (mowing["status"] == "OK").sum() >= 20
    years = {
        int(p): json.loads(v)["window"][:4] for p, v in zip(mowing["pid"], mowing["values"], strict=True)
    }
    assert {years[p] for p in range(1, 15)} == {"2018"} and {years[p] for p in range(15, 31)} == {"2019"}
    events = pd.read_csv(tmp_path / "o" / "events.csv")
    assert (events["marker"] == "mowing").sum() > 0
    bare = results[results["marker"] == "bare_soil"]
    assert bare["reason"].str.contains("needs s2 band B02").all()  # optional, and said so


def test_bad_input_is_refused_before_any_work(tmp_path):
    # a scheme naming a band nobody extracts: refused naming marker and band, nothing written
    path = config(tmp_path, "noB08", 'scheme = "ndvi-drop"', APRIL, s2='["B04", "SCL"]')
    with pytest.raises(
        ConfigError, match=r"marker 'ndvi_drop' needs s2 band B08, which the run's \[\[extract\]\]"
    ):
        cbm.run(path, progress=False)
    assert not (tmp_path / "noB08").exists()
    # a season window that ends before it starts
    scheme = tmp_path / "backwards-scheme.toml"
    scheme.write_text(
        '[[marker]]\nplugin = "ndvi_drop"\nseason_start = "10-01"\nseason_end = "03-01"\n'
        '[rule]\nplugin = "traffic_light"\n'
    )
    path = config(tmp_path, "backwards", f'scheme = "{scheme}"', APRIL)
    with pytest.raises(
        ConfigError, match=r"season_start/season_end: the window ends \(03-01\) before it starts \(10-01\)"
    ):
        cbm.run(path, progress=False)
    assert not (tmp_path / "backwards").exists()


def test_bad_tables_for_score(tmp_path):
    rows = pd.DataFrame(
        {"pid": [1, 1, 1, 1], "obstime": ["2019-05-06"] * 4, "card": ["s2"] * 4,
         "band": ["B04", "B08", "B04", "B08"], "mean": [0.05, 0.4, 0.05, 0.4]}
    )  # fmt: skip
    assert len(score(signatures_series(rows), "ndvi-drop")[1]) == 1  # repeated rows: harmless
    with pytest.raises(
        InputError, match=r"parcel 1 has band B04 twice for observation s2_20190506T000000 \(2019-05-06\)"
    ):
        signatures_series(rows.assign(mean=[0.05, 0.4, 0.06, 0.4]))
    # no valid observation in the window: every parcel says so, with the window
    cloudy = rows.iloc[:2].assign(**{f"hist_{c}": 100 if c == 9 else 0 for c in range(12)})
    _, verdicts = score(signatures_series(cloudy), "ndvi-drop")
    assert verdicts["reasons"].iloc[0] == (
        "ndvi_drop: insufficient evidence: "
        "0 valid Sentinel-2 observation(s) in 2019-05-06..2019-05-06; 3 needed"
    )
