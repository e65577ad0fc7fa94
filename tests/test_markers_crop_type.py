"""Crop-type marker: features, scikit-learn and Keras models, model files and their spec checks."""

from __future__ import annotations

import json
import pickle
import sys
import zipfile
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cbm_core.api import read_signatures
from cbm_core.config import parse_scheme, read_toml
from cbm_core.model import Status, TimeSeries
from cbm_core.pipeline import Engine
from markers import _series as ts
from markers import crop_type as ct
from markers._simulate import simulate

DATA = Path(__file__).parent / "data"
SIM_SPEC = ct.make_spec(["B02", "B03", "B04", "B08", "B11"], ["VV", "VH"], ["NDVI"])
REAL_SPEC = ct.make_spec(["B04", "B08", "B11"], ["VV", "VH"], ["NDVI", "NDMI"])


@pytest.fixture(scope="module")
def train_scenario():
    return simulate(160, seed=41)


@pytest.fixture(scope="module")
def model(train_scenario):
    _, X, y, _ = ct.training_set(train_scenario.series, train_scenario.actual_crop, SIM_SPEC)
    return ct.fit(X, y, "sklearn", SIM_SPEC)


def test_features_share_one_grid(train_scenario):
    pids, X, reasons = ct.features(train_scenario.series, SIM_SPEC)
    assert X.shape == (160, 36, len(ct.channel_names(SIM_SPEC)))
    assert ct.channel_names(SIM_SPEC)[-4:] == ["NDWI", "S1_VV", "S1_VH", "S1_VHVV"]  # no red edge in sim
    assert not any(reasons) and np.isfinite(X).all()
    ndvi = X[:, :, ct.channel_names(SIM_SPEC).index("NDVI")]
    grass = train_scenario.actual_crop.reindex(pids).to_numpy() == "grassland"
    maize = train_scenario.actual_crop.reindex(pids).to_numpy() == "maize"
    mid_may = int((ts.day_number("2023-05-15") - ts.day_number("2022-10-01")) // 10)
    assert ndvi[grass, mid_may].mean() > ndvi[maize, mid_may].mean() + 0.3  # maize is not up yet


def test_time_shifted_training_copies():
    """Augmentation moves whole profiles along the grid, repeating the edge bin, never wrapping."""
    X = np.arange(10, dtype=float).reshape(2, 5, 1) ** 2
    later, earlier = ct.shifted(X, 1), ct.shifted(X, -1)
    np.testing.assert_array_equal(later[:, 1:], X[:, :-1])
    np.testing.assert_array_equal(later[:, 0], X[:, 0])
    np.testing.assert_array_equal(earlier[:, :-1], X[:, 1:])
    np.testing.assert_array_equal(earlier[:, -1], X[:, -1])
    np.testing.assert_allclose(ct.shifted(X, 0.5)[:, 1:], 0.5 * (X[:, 1:] + X[:, :-1]))  # 5 days later
    np.testing.assert_array_equal(ct.shifted(X, 0), X)


def test_marker_flags_swapped_declarations(model):
    scenario = simulate(200, seed=42, swap_rate=0.15)
    proba = model.predict_proba(ct.features(scenario.series, SIM_SPEC)[1])
    predicted = np.asarray(model.classes)[proba.argmax(axis=1)]
    assert (predicted == scenario.actual_crop.to_numpy()).mean() > 0.9
    declared = scenario.series.parcels["crop_name"].to_numpy()
    flagged = ct.flags(proba, model.classes, declared, 0.2, model.max_declared_ratio(0.05))
    swapped = declared != scenario.actual_crop.to_numpy()
    assert flagged[swapped].mean() > 0.8 and flagged[~swapped].mean() < 0.05


def test_model_file_round_trip_and_marker(tmp_path, model):
    scenario = simulate(60, seed=43, swap_rate=0.2)
    for target in (tmp_path / "folder-model", tmp_path / "model.zip"):
        model.save(target)
        again = ct.load_model(target)
        assert again.classes == model.classes and again.spec == SIM_SPEC
        np.testing.assert_allclose(again.calibration, model.calibration)
        X = ct.features(scenario.series, SIM_SPEC)[1]
        np.testing.assert_allclose(again.predict_proba(X), model.predict_proba(X))
    assert zipfile.ZipFile(tmp_path / "model.zip").namelist().count("spec.json") == 1
    meta = json.loads((tmp_path / "folder-model" / "spec.json").read_text())
    assert meta["versions"]["scikit-learn"] and meta["feature_spec"]["version"] == ct.FEATURE_SPEC_VERSION
    assert (
        meta["training"]["time_shifts_bins"] == list(ct.TIME_SHIFTS) and again.time_shifts == ct.TIME_SHIFTS
    )
    results = ct.run(scenario.series, {"model": str(tmp_path / "model.zip")})
    assert len(results) == 60 and all(r.status == Status.OK for r in results)
    swapped = scenario.series.parcels["crop_name"].to_numpy() != scenario.actual_crop.to_numpy()
    flagged = np.array([bool(r.events) for r in results])
    assert flagged[swapped].mean() > 0.7 and flagged[~swapped].mean() < 0.1
    event = next(r.events[0] for r in results if r.events)
    assert event.kind == "crop_mismatch" and event.start < event.end
    assert all("predicted" in r.values and "declared_probability" in r.values for r in results)


def test_foreign_models_are_refused_without_crashing(tmp_path, model, train_scenario):
    sub = train_scenario.series.subset(train_scenario.series.parcels["pid"].to_numpy()[:4])
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "spec.json").read_text())
    meta["feature_spec"]["version"] = 99
    (tmp_path / "m" / "spec.json").write_text(json.dumps(meta))
    for params, words in (
        ({"model": str(tmp_path / "m")}, "feature spec version 99"),
        ({"model": str(tmp_path / "missing")}, "not found"),
        ({}, "no model configured"),
    ):
        results = ct.run(sub, params)
        assert len(results) == 4 and all(r.status == Status.NOT_VALID and words in r.reason for r in results)
    model.save(tmp_path / "ok.zip")
    other = {**SIM_SPEC, "bins": 18}
    refused = ct.run(sub, {"model": str(tmp_path / "ok.zip"), "feature_spec": other})
    assert all("another feature spec" in r.reason and "bins" in r.reason for r in refused)
    no_swir = TimeSeries(sub.stats[sub.stats["band"] != "B11"], sub.scl, sub.parcels)
    assert all("lack band(s) B11" in r.reason for r in ct.run(no_swir, {"model": str(tmp_path / "ok.zip")}))
    unknown_crop = TimeSeries(sub.stats, sub.scl, sub.parcels.assign(crop_name="hops"))
    assert all(
        "'hops' is not a class" in r.reason for r in ct.run(unknown_crop, {"model": str(tmp_path / "ok.zip")})
    )


class OpensAFile:
    """A pickle payload: unpickling it creates a file (a stand-in for any code a pickle can run)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


class NotAModel:
    """A type no crop-type model holds (skops would have to import and build it)."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_model_files_holding_foreign_types_are_refused_unopened(tmp_path, model, train_scenario):
    sub = train_scenario.series.subset(train_scenario.series.parcels["pid"].to_numpy()[:3])
    # an old-format (joblib) model file: a pickle, never opened
    model.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "spec.json").read_text())
    (tmp_path / "old" / "spec.json").write_text(json.dumps({**meta, "format": 2}))
    (tmp_path / "old" / "model.joblib").write_bytes(pickle.dumps(OpensAFile(tmp_path / "opened")))
    with pytest.raises(ct.ModelSpecError, match=r"format 2 holds a pickle .* retrain it with `cbm train`"):
        ct.load_model(tmp_path / "old")
    assert not (tmp_path / "opened").exists()
    # a skops file with a type outside the trusted list
    import skops.io

    model.save(tmp_path / "foreign")
    skops.io.dump({"model": NotAModel()}, tmp_path / "foreign" / "model.skops")
    with pytest.raises(ct.ModelSpecError) as info:
        ct.load_model(tmp_path / "foreign")
    assert "refused" in str(info.value) and "test_markers_crop_type.NotAModel" in str(info.value)
    assert "\n" not in str(info.value)
    results = ct.run(sub, {"model": str(tmp_path / "foreign")})
    assert all(r.status == Status.NOT_VALID and "NotAModel" in r.reason for r in results)


@pytest.fixture(scope="module")
def net(tmp_path_factory, train_scenario):
    """A Keras CNN trained briefly and its model file."""
    _, X, y, _ = ct.training_set(train_scenario.series, train_scenario.actual_crop, SIM_SPEC)
    model = ct.fit(X, y, "keras", SIM_SPEC, epochs=8)
    path = model.save(tmp_path_factory.mktemp("net") / "net.zip")
    return model, path, X, y


def test_keras_model_trains_saves_and_loads(net):
    model, path, X, y = net
    again = ct.load_model(path)
    proba = again.predict_proba(X[:20])
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(proba, model.predict_proba(X[:20]), atol=1e-6)
    assert (np.asarray(again.classes)[model.predict_proba(X).argmax(axis=1)] == y).mean() > 0.7


def test_keras_model_with_a_lambda_layer_is_refused(net, tmp_path):
    _, path, _, _ = net
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "m")
    inner = tmp_path / "m" / "model.keras"
    with zipfile.ZipFile(inner) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    parts["config.json"] = parts["config.json"].replace(b'"Flatten"', b'"Lambda"', 1)
    with zipfile.ZipFile(inner, "w") as archive:
        for name, data in parts.items():
            archive.writestr(name, data)
    with pytest.raises(ct.ModelSpecError, match=r"refused: model.keras holds .*keras.layers.Lambda"):
        ct.load_model(tmp_path / "m")


def test_cnn_without_tensorflow_says_which_extra_to_install(net, monkeypatch, train_scenario):
    _, path, X, y = net
    monkeypatch.setitem(sys.modules, "keras", None)  # what `import keras` sees without the cnn extra
    with pytest.raises(ct.CbmError, match=r"needs TensorFlow: pip install 'cbm-engine\[cnn\]'"):
        ct.fit(X, y, "keras", SIM_SPEC, epochs=1, calibration_folds=0)
    sub = train_scenario.series.subset(train_scenario.series.parcels["pid"].to_numpy()[:3])
    ct._CACHE.clear()
    results = ct.run(sub, {"model": str(path)})
    assert all(r.status == Status.NOT_VALID and "cbm-engine[cnn]" in r.reason for r in results)


def test_real_worldcereal_parcels_cross_validate():
    series = read_signatures(DATA / "worldcereal_fra2023_subset.parquet", scale="dn")
    labels = pd.read_csv(DATA / "worldcereal_fra2023_labels.csv").set_index("pid")["crop"]
    _, X, y, dropped = ct.training_set(series, labels, REAL_SPEC)
    assert len(y) >= 85 and dropped["no_label"] == 0
    proba, calibration = ct.cross_validate(X, y, "sklearn", folds=3, spec=REAL_SPEC, calibration_folds=3)
    classes = sorted(set(y))
    accuracy = (np.asarray(classes)[proba.argmax(axis=1)] == y).mean()
    assert accuracy > 0.85
    # each fold's threshold comes from its own training parcels and holds on the unseen ones
    ratio = np.array([np.interp(0.05, ct.CALIBRATION_GRID, c) for c in calibration])
    assert len(np.unique(ratio)) == 3 and np.all(np.diff(calibration, axis=1) >= 0)
    assert ct.flags(proba, classes, y, 0.2, ratio).mean() < 0.12


def test_cbm_train_command(tmp_path):
    group = click.Group()
    ct.cbm_cli_commands(cli=group)
    out = CliRunner().invoke(
        group,
        [
            "train",
            "--signatures",
            str(DATA / "worldcereal_fra2023_subset.parquet"),
            "--labels",
            str(DATA / "worldcereal_fra2023_labels.csv"),
            "--out",
            str(tmp_path / "wc.zip"),
            "--scale",
            "dn",
            "--s2-bands",
            "B04,B08,B11",
            "--cv",
            "3",
        ],
    )
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["classes"] == 3 and report["cv"]["overall_accuracy"] > 0.85
    assert ct.load_model(tmp_path / "wc.zip").spec["s2"] == ["B04", "B08", "B11"]
    bad = CliRunner().invoke(
        group,
        [
            "train",
            "--signatures",
            str(DATA / "worldcereal_fra2023_subset.parquet"),
            "--labels",
            str(DATA / "worldcereal_fra2023_labels.csv"),
            "--out",
            str(tmp_path / "x.zip"),
            "--scale",
            "dn",
        ],
    )
    assert bad.exit_code != 0 and "lack band(s)" in str(bad.exception)


def test_model_path_resolves_against_the_scheme_file(tmp_path, monkeypatch, model):
    """A relative `model` in a scheme file means next to that file, whatever the working directory."""
    folder = tmp_path / "schemes"
    folder.mkdir()
    model.save(folder / "crop.zip")
    (folder / "crops.toml").write_text(
        '[[marker]]\nplugin = "crop_type"\nmodel = "crop.zip"\n\n[rule]\nplugin = "traffic_light"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    scenario = simulate(12, seed=44)
    engine = Engine(progress=False)
    results = engine.run_markers(scenario.series, engine.scheme(str(folder / "crops.toml"), Path.cwd()))
    assert len(results) == 12 and results["status"].eq(str(Status.OK)).all(), results["reason"].iloc[0]
    params = parse_scheme(read_toml(folder / "crops.toml"), folder, "crops.toml").markers[0].params
    assert params.path("model") == folder / "crop.zip"
    assert pickle.loads(pickle.dumps(params)).path("model") == folder / "crop.zip"  # for dask workers
    plain = ct.run(scenario.series, {"model": "crop.zip"})  # a plain dict: the working directory
    assert all("model file not found: crop.zip" in r.reason for r in plain)
