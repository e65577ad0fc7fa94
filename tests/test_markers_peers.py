"""Peers-outlier marker: swapped declarations stand out against same-crop neighbours."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbm_core import pipeline
from cbm_core.config import PluginConfig, Scheme
from cbm_core.model import Status, TimeSeries, results_frame
from cbm_core.pipeline import Engine
from markers import peers
from markers._simulate import simulate


def test_swapped_declarations_are_outliers():
    scenario = simulate(600, seed=31, swap_rate=0.08)
    results = peers.run(scenario.series, {})
    swapped = scenario.series.parcels["crop_name"].to_numpy() != scenario.actual_crop.to_numpy()
    ok = np.array([r.status == Status.OK for r in results])
    flagged = np.array([bool(r.events) for r in results])
    assert ok.mean() > 0.9
    assert flagged[swapped & ok].mean() > 0.75
    assert flagged[~swapped & ok].mean() < 0.05
    crops = dict(zip(scenario.series.parcels["pid"], scenario.series.parcels["crop_name"], strict=True))
    for r in results[:50]:
        if r.status == Status.OK:
            assert r.pid not in r.values["peer_pids"]
            assert all(crops[p] == crops[r.pid] for p in r.values["peer_pids"])
            assert r.values["max_peer_distance"] <= 2000


def test_too_few_peers_and_no_observation():
    scenario = simulate(40, seed=32)
    lonely = peers.run(scenario.series, {"distance": 1.0})
    assert all(r.status == Status.NOT_VALID and "within 1 m" in r.reason for r in lonely)
    empty = TimeSeries(
        scenario.series.stats.iloc[0:0], scenario.series.scl.iloc[0:0], scenario.series.parcels
    )
    assert all(
        r.status == Status.NOT_VALID and "0 valid Sentinel-2 observation(s)" in r.reason
        for r in peers.run(empty, {})
    )
    nowhere = TimeSeries(
        scenario.series.stats, scenario.series.scl, scenario.series.parcels.assign(geometry=None)
    )
    assert all(r.reason == "parcel has no geometry" for r in peers.run(nowhere, {}))


def test_engine_batches_keep_neighbours_together(monkeypatch):
    """Batches smaller than the area: with context_distance the engine's batched results equal a
    single call on all parcels; plain pid batches cut neighbours off."""
    scenario = simulate(600, seed=33, swap_rate=0.08)
    whole = results_frame(peers.run(scenario.series, {})).set_index("pid")
    monkeypatch.setattr(pipeline, "MARKER_BATCH", 100)  # 600 parcels on a 25 x 24 grid of 300 m
    engine = Engine(progress=False)
    rule = PluginConfig("traffic_light")

    def batched(options: dict) -> pd.DataFrame:
        scheme = Scheme((PluginConfig("peers", {"plugin": "peers", **options}),), rule)
        return engine.run_markers(scenario.series, scheme).set_index("pid").loc[whole.index]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_context = batched({"context_distance": 2000.0})
    assert not [w for w in caught if "context_distance" in str(w.message)]
    assert with_context["marker"].eq("peers").all() and len(with_context) == 600
    pd.testing.assert_frame_equal(with_context.drop(columns="marker"), whole.drop(columns="marker"))
    with pytest.warns(UserWarning, match="no context_distance: batches cut neighbourhoods"):
        cut_off = batched({})
    assert (cut_off["values"] != whole["values"]).sum() > 100  # the old behaviour: peers lost at batch edges


def test_schemes_without_context_are_warned_about():
    """The check is the marker's own: the shipped recipe passes, a too-small context is named."""
    engine = Engine(progress=False)
    scheme = engine.scheme("crop-declaration", Path.cwd())
    assert [peers.context_problem(m.params) for m in scheme.markers if m.plugin == "peers"] == [None]
    assert "no context_distance" in peers.context_problem({"name": "nearby"})
    small = peers.context_problem({"distance": 2000.0, "context_distance": 500.0})
    assert "context_distance 500 is below distance 2000" in small
    scenario = simulate(30, seed=34)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(peers.run(scenario.series, {})) == 30  # a direct call on all parcels cuts nothing
    assert not caught
