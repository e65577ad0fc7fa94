"""The example plugin tested the way a plugin author would, with cbm-engine's fixtures: the easy
sample series, then the realistic one (clouds, shadow, snow, a gap, unjudgeable parcels)."""

import json

import cbm_example_plugin

from cbm_core import Engine, PluginConfig, Scheme


def test_every_sample_parcel_is_green_once(cbm_plugin_manager, cbm_sample_series):
    cbm_plugin_manager.register(cbm_example_plugin, name="green_cover")
    engine = Engine(plugins=cbm_plugin_manager, progress=False)
    scheme = Scheme((PluginConfig("green_cover", {"min_ndvi": 0.7}),), PluginConfig("traffic_light"))
    results = engine.run_markers(cbm_sample_series, scheme)
    assert (results["status"] == "OK").all()
    verdicts = engine.decide(results, cbm_sample_series.parcels, scheme)
    assert set(verdicts["light"]) == {"green"}


def test_too_high_a_threshold_finds_no_green(cbm_plugin_manager, cbm_sample_series):
    cbm_plugin_manager.register(cbm_example_plugin, name="green_cover")
    engine = Engine(plugins=cbm_plugin_manager, progress=False)
    scheme = Scheme((PluginConfig("green_cover", {"min_ndvi": 0.95}),), PluginConfig("traffic_light"))
    verdicts = engine.decide(engine.run_markers(cbm_sample_series, scheme), cbm_sample_series.parcels, scheme)
    assert set(verdicts["light"]) == {"red"}


def run_green_cover(manager, series, **params):
    if "green_cover" not in manager.infos:
        manager.register(cbm_example_plugin, name="green_cover")
    engine = Engine(plugins=manager, progress=False)
    scheme = Scheme((PluginConfig("green_cover", params),), PluginConfig("traffic_light"))
    results = engine.run_markers(series, scheme)
    return results.set_index("pid"), engine.decide(results, series.parcels, scheme).set_index("pid")


def test_parcels_no_clear_observation_sees_are_not_valid_and_yellow(cbm_plugin_manager, cbm_realistic_series):
    """The hard paths: a parcel under cloud all season and one too small to hold a pixel cannot
    be judged (NOT_VALID, so yellow), whatever their shapes; every other parcel is green."""
    results, verdicts = run_green_cover(cbm_plugin_manager, cbm_realistic_series)
    scenario = cbm_realistic_series.parcels.set_index("pid")["scenario"]
    unjudged = scenario[scenario.isin(["never clear", "no pixels"])].index
    assert (results.loc[unjudged, "status"] == "NOT_VALID").all()
    assert (results.loc[unjudged, "reason"] == "no clear observation").all()
    assert (verdicts.loc[unjudged, "light"] == "yellow").all()
    judged = scenario.index.difference(unjudged)
    assert (results.loc[judged, "status"] == "OK").all() and (verdicts.loc[judged, "light"] == "green").all()


def test_only_clear_observations_are_used(cbm_plugin_manager, cbm_realistic_series):
    """Cloudy, hazy (shadow and medium-probability cloud) and snowy dates are left out: a result's
    observations are exactly the parcel's clear ones; a laxer max_cloudy lets the hazy ones in."""
    scl = cbm_realistic_series.scl
    clear = scl[scl["clear_fraction"] == 1.0]
    results, _ = run_green_cover(cbm_plugin_manager, cbm_realistic_series)
    for pid in (1, 2, 3, 4, 5, 6):
        used = set(json.loads(results.loc[pid, "obsids"]))
        assert used == set(clear.loc[clear["pid"] == pid, "obsid"]), pid
        assert len(used) < len(scl[scl["pid"] == pid])  # some dates really were cloudy
    lax, _ = run_green_cover(cbm_plugin_manager, cbm_realistic_series, max_cloudy=0.5)
    assert len(json.loads(lax.loc[1, "obsids"])) > len(json.loads(results.loc[1, "obsids"]))
