"""The example plugin tested the way a plugin author would, with cbm-engine's fixtures."""

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
