"""Machine-learning crop-type marker: flags parcels whose declared crop disagrees with a confident model.

Features are fixed-grid composites (default 36 x 10 days from 1 October of the previous year) of
S2 bands, indices, red-edge ratios and S1 backscatter (dB, and the VH/VV ratio), gaps filled by
interpolation, so that parcels with different acquisition dates share one layout. Two model
kinds: a scikit-learn soft-voting ensemble of extremely randomised trees and a logistic regression
on the composites plus per-channel percentiles (the default, robust on a few hundred samples), and
a small TensorFlow/Keras 1-D CNN, both trained on the parcels plus copies shifted by 5 and 10 days
either way (few parcels: the model must not learn exact dates). A parcel is flagged when its
declared crop is much less likely than the predicted one: p(declared) / p(predicted) at most a
threshold that training calibrates on out-of-fold predictions of the training parcels, for a
target false-flag rate, so that no threshold is tuned on the parcels a model is judged on. A
model file (folder or .zip) holds the model plus spec.json: the feature spec, the classes, the
per-channel normalisation, that calibration and the library versions; a model whose spec does not
match what this code computes is refused with the reason instead of silently predicting garbage.

`cbm train` (added to the command line by this plugin) fits and writes such a model.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbm_core import impl
from cbm_core.config import param_path
from cbm_core.errors import CbmError, InputError
from cbm_core.model import Event, MarkerResult, Status, TimeSeries
from markers import _series as ts

NAME = "crop_type"
# Format 3: the scikit-learn model in skops format (format 2 was a joblib pickle, which runs any
# code it holds when opened, so it is refused rather than read).
MODEL_FORMAT = 3
CNN_EXTRA = "pip install 'cbm-engine[cnn]'"  # TensorFlow: ~1 GB, so not part of the ml extra
# Types a model file may hold beyond skops' own safe defaults (builtins, numpy arrays and dtypes,
# scikit-learn estimators): what `cbm train` writes, nothing else. skops refuses to build any other.
TRUSTED_SKLEARN_TYPES = ("sklearn.tree._tree.Tree", "sklearn.utils._bunch.Bunch")
# The Keras objects the CNN is made of, as (module, class) in the .keras file's config.json;
# anything else (a Lambda layer, custom code, another module) is refused before Keras reads it.
TRUSTED_KERAS_TYPES = frozenset(
    {("keras", "Sequential"), ("keras", "DTypePolicy"), ("keras.optimizers", "Adam")}
    | {("keras.initializers", name) for name in ("GlorotUniform", "Zeros")}
    | {
        ("keras.layers", name)
        for name in ("InputLayer", "Conv1D", "MaxPooling1D", "Flatten", "Dropout", "Dense")
    }
)
KERAS_FILES = frozenset({"metadata.json", "config.json", "model.weights.h5"})
FEATURE_SPEC_VERSION = 2
# Normalised differences of composited S2 bands (a - b) / (a + b): water and red-edge chlorophyll
# separate cereals, oilseeds and legumes better than NDVI alone.
BAND_RATIOS: dict[str, list[str]] = {"NDWI": ["B03", "B08"], "NDRE1": ["B08", "B05"], "NDRE2": ["B08", "B06"]}
DEFAULT_SPEC: dict[str, Any] = {
    "version": FEATURE_SPEC_VERSION,
    "start": "10-01",  # bins start on this day of the year before the season year
    "step_days": 10,
    "bins": 36,
    "s2": ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B11", "B12"],
    "indices": ["NDVI", "NDMI"],
    "band_ratios": BAND_RATIOS,
    "s1": ["VV", "VH"],  # composites of 10 log10(linear backscatter)
    "s1_ratio": True,  # and VH - VV in dB (volume scattering, high over broad-leaved canopies)
    "min_s2_obs": 4,
}
# Training-time augmentation: each training parcel is added again with its profile moved by these
# many bins (fractions interpolate between bins): -10, -5, +5 and +10 days. Sowing and growth vary
# by days to weeks between parcels and years; on a few hundred parcels the models otherwise tie a
# class to exact bins.
TIME_SHIFTS: tuple[float, ...] = (-1.0, -0.5, 0.5, 1.0)
CALIBRATION_GRID = [round(0.005 * k, 3) for k in range(1, 61)]  # false-flag rates 0.5 % .. 30 %
DEFAULTS: dict[str, Any] = {
    "model": None,  # path of the model folder or .zip (required; relative to the scheme's folder)
    "crop_column": "crop_name",
    "min_confidence": 0.2,  # probability the prediction needs before it may contradict a declaration
    "false_flags": 0.05,  # target share of honest declarations flagged: picks the model's calibrated
    # p(declared) / p(predicted) threshold
    "max_declared_ratio": None,  # or that threshold directly
    "max_declared_prob": None,  # optional extra cap on p(declared)
    "year": None,  # season year; default: the year of the batch's median observation
}
# The parameters a scheme may give this marker (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(DEFAULTS) | {"feature_spec"}


class ModelSpecError(CbmError):
    """A model file that this code cannot use (other format or feature spec, missing parts)."""


# Features -----------------------------------------------------------------------------------


def season_start(series: TimeSeries, spec: Mapping[str, Any], year: int | None) -> float:
    """Day number of the first bin: spec start (MM-DD) in the year before the season year."""
    if year is None:
        t = ts.days_column(series.stats["obstime"]) if len(series.stats) else np.array([0.0])
        year = ts.to_date(float(np.median(t))).year
    return ts.day_number(f"{int(year) - 1}-{spec['start']}")


def channel_names(spec: Mapping[str, Any]) -> list[str]:
    """Feature channels in array order."""
    ratios = list(spec.get("band_ratios", {}))
    s1 = [f"S1_{b}" for b in spec["s1"]] + (["S1_VHVV"] if spec.get("s1_ratio") else [])
    return [*spec["s2"], *spec["indices"], *ratios, *s1]


def make_spec(
    s2: Sequence[str] | None = None, s1: Sequence[str] | None = None, indices: Sequence[str] | None = None
) -> dict[str, Any]:
    """The default spec for other bands, keeping only the ratios those bands can compute."""
    s2 = list(DEFAULT_SPEC["s2"] if s2 is None else s2)
    s1 = list(DEFAULT_SPEC["s1"] if s1 is None else s1)
    ratios = {k: v for k, v in BAND_RATIOS.items() if set(v) <= set(s2)}
    return {
        **DEFAULT_SPEC,
        "s2": s2,
        "s1": s1,
        "indices": list(DEFAULT_SPEC["indices"] if indices is None else indices),
        "band_ratios": ratios,
        "s1_ratio": {"VV", "VH"} <= set(s1),
    }


def _check_spec(spec: Mapping[str, Any]) -> None:
    for name, bands in spec.get("band_ratios", {}).items():
        if not set(bands) <= set(spec["s2"]):
            raise InputError(f"feature spec: band ratio {name} needs {', '.join(bands)}, not all in s2")
    if spec.get("s1_ratio") and not {"VV", "VH"} <= set(spec["s1"]):
        raise InputError("feature spec: s1_ratio needs S1 bands VV and VH")


def features(
    series: TimeSeries, spec: Mapping[str, Any], params: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(pids, X of shape (parcels, bins, channels) with NaN rows for invalid parcels, reasons).

    Raises InputError when a band the spec needs is absent from the whole batch.
    """
    params = {**DEFAULTS, **(params or {})}
    _check_spec(spec)
    pids = ts.batch_pids(series)
    present = ts.present(series.stats["band"]) if len(series.stats) else set()
    needed = set(spec["s2"]) | set(spec["s1"])
    missing = sorted(needed - present)
    if missing:
        raise InputError(
            f"the signatures lack band(s) {', '.join(missing)} that the model's feature spec needs "
            f"(present: {', '.join(sorted(present)) or 'none'})"
        )
    start = season_start(series, spec, params.get("year"))
    step, n_bins = float(spec["step_days"]), int(spec["bins"])
    end = start + step * n_bins - 1
    _, s2 = ts.s2_panel(series, tuple(spec["s2"]), params, indices=tuple(spec["indices"]))
    s2 = ts.in_window(s2, start, end)
    x2 = ts.fill_bins(ts.composite(s2, [*spec["s2"], *spec["indices"]], start, step, n_bins))
    s1 = ts.build_panel(series.stats, "bs", tuple(spec["s1"]))
    s1 = ts.in_window(s1, start, end)
    with np.errstate(divide="ignore", invalid="ignore"):
        s1.values = {b: 10 * np.log10(np.where(v > 0, v, np.nan)) for b, v in s1.values.items()}
    x1 = ts.fill_bins(ts.composite(s1, list(spec["s1"]), start, step, n_bins))
    s2_names = [*spec["s2"], *spec["indices"]]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = [
            (x2[..., s2_names.index(a)] - x2[..., s2_names.index(b)])
            / (x2[..., s2_names.index(a)] + x2[..., s2_names.index(b)])
            for a, b in spec.get("band_ratios", {}).values()
        ]
    x2 = np.concatenate([x2, *(r[..., None] for r in ratios)], axis=2)
    if spec.get("s1_ratio"):
        vhvv = x1[..., list(spec["s1"]).index("VH")] - x1[..., list(spec["s1"]).index("VV")]
        x1 = np.concatenate([x1, vhvv[..., None]], axis=2)
    X = np.full((len(pids), n_bins, len(channel_names(spec))), np.nan)
    p2, p1 = ts.align(s2, pids), ts.align(s1, pids)
    n_s2 = ts.obs_count(s2, p2)
    X[p2 >= 0, :, : x2.shape[2]] = x2[p2[p2 >= 0]]
    X[p1 >= 0, :, x2.shape[2] :] = x1[p1[p1 >= 0]]
    reasons = []
    for k in range(len(pids)):
        if n_s2[k] < int(spec.get("min_s2_obs", 4)):
            reasons.append(
                f"{int(n_s2[k])} clear Sentinel-2 observation(s) in the model's window "
                f"{ts.to_date(start)}..{ts.to_date(end)}, {spec.get('min_s2_obs', 4)} needed"
            )
            X[k] = np.nan
        else:
            reasons.append("")
    return pids, X, reasons


# Models -------------------------------------------------------------------------------------


def shifted(X: np.ndarray, bins: float) -> np.ndarray:
    """X moved ``bins`` bins later (negative: earlier) along the time axis, edge bins repeated."""

    def whole(k: int) -> np.ndarray:
        out = np.roll(X, k, axis=1)
        if k > 0:
            out[:, :k] = X[:, :1]
        elif k < 0:
            out[:, k:] = X[:, -1:]
        return out

    lo = int(np.floor(bins))
    w = bins - lo
    return whole(lo) if w == 0 else (1 - w) * whole(lo) + w * whole(lo + 1)


@dataclass
class CropModel:
    """A fitted crop-type model with everything needed to use it correctly later."""

    kind: str  # "sklearn" or "keras"
    model: Any
    spec: dict[str, Any]
    classes: list[str]
    mean: np.ndarray  # per channel
    std: np.ndarray
    # p(declared) / p(predicted) thresholds for the false-flag rates of CALIBRATION_GRID, from
    # out-of-fold predictions of the training parcels (None: not calibrated)
    calibration: np.ndarray | None = None
    time_shifts: tuple[float, ...] = ()  # the training augmentation (a record, not needed to predict)

    def prepare(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean) / self.std
        if self.kind == "sklearn":  # the time profile plus its distribution: robust to shifted calendars
            with warnings.catch_warnings():  # parcels without S1 give all-NaN channels
                warnings.simplefilter("ignore", RuntimeWarning)
                summary = [
                    *np.nanpercentile(Z, [10, 25, 50, 75, 90], axis=1),
                    np.nanstd(Z, axis=1),
                    np.nan_to_num(Z, nan=-np.inf).argmax(axis=1).astype(float),
                ]
            Z = np.concatenate([Z.reshape(len(Z), -1), *summary], axis=1)
        Z = np.nan_to_num(Z, nan=0.0, posinf=0.0, neginf=0.0)  # missing S1 -> the training mean
        return Z if self.kind == "sklearn" else Z.astype(np.float32)

    def n_features(self) -> int:
        """Model inputs per parcel: bins x channels, plus 7 summaries per channel for sklearn."""
        n = len(self.mean) * int(self.spec["bins"])
        return n + 7 * len(self.mean) if self.kind == "sklearn" else n

    def max_declared_ratio(self, false_flags: float) -> float:
        """The calibrated threshold for a target false-flag rate (interpolated on the grid)."""
        if self.calibration is None:
            raise ModelSpecError("the model has no calibration: give max_declared_ratio explicitly")
        return float(np.interp(false_flags, CALIBRATION_GRID, self.calibration))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (columns in ``classes`` order) for feature arrays from features()."""
        if not len(X):
            return np.zeros((0, len(self.classes)))
        Z = self.prepare(X)
        if self.kind == "sklearn":
            return self.model.predict_proba(Z)
        return np.asarray(self.model.predict(Z, verbose=0, batch_size=1024))

    def save(self, path: Path) -> Path:
        """Write the model folder (or a .zip of it when path ends with .zip)."""
        path = Path(path)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            if self.kind == "sklearn":
                import skops.io

                skops.io.dump(self.model, folder / "model.skops", compression=zipfile.ZIP_DEFLATED)
            else:
                self.model.save(folder / "model.keras")
            meta = {
                "format": MODEL_FORMAT,
                "kind": self.kind,
                "feature_spec": self.spec,
                "classes": self.classes,
                "norm": {"mean": self.mean.tolist(), "std": self.std.tolist()},
                "n_features": self.n_features(),
                "calibration": None
                if self.calibration is None
                else {"false_flags": CALIBRATION_GRID, "max_declared_ratio": self.calibration.tolist()},
                "training": {"time_shifts_bins": list(self.time_shifts)},
                "versions": _versions(self.kind),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            (folder / "spec.json").write_text(json.dumps(meta, indent=2))
            if path.suffix.lower() == ".zip":
                path.parent.mkdir(parents=True, exist_ok=True)
                with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
                    for item in folder.iterdir():
                        archive.write(item, item.name)
            else:
                if path.exists():
                    shutil.rmtree(path)
                shutil.copytree(folder, path)
        return path


def _versions(kind: str) -> dict[str, str]:
    import importlib.metadata as md

    names = ["cbm-engine", "numpy", "scikit-learn"] + (
        ["tensorflow-cpu", "tensorflow"] if kind == "keras" else []
    )
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def load_model(path: Path, expected_spec: Mapping[str, Any] | None = None) -> CropModel:
    """Read a model folder or zip, refusing one made for another format or feature spec."""
    path = Path(path)
    if not path.exists():
        raise ModelSpecError(f"model file not found: {path}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = path
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise ModelSpecError(f"{path}: not a model folder or .zip")
            with zipfile.ZipFile(path) as archive:
                archive.extractall(tmp)
            folder = Path(tmp)
        spec_file = folder / "spec.json"
        if not spec_file.is_file():
            raise ModelSpecError(f"{path}: no spec.json (not a cbm crop-type model)")
        meta = json.loads(spec_file.read_text())
        if meta.get("format") == 2:
            raise ModelSpecError(
                f"{path}: model format 2 holds a pickle (model.joblib) that could run any code when "
                f"opened; retrain it with `cbm train` (format {MODEL_FORMAT})"
            )
        if meta.get("format") != MODEL_FORMAT:
            raise ModelSpecError(
                f"{path}: model format {meta.get('format')}, this cbm reads format {MODEL_FORMAT}"
            )
        spec = meta.get("feature_spec", {})
        if spec.get("version") != FEATURE_SPEC_VERSION:
            raise ModelSpecError(
                f"{path}: made for feature spec version {spec.get('version')}, this marker computes version "
                f"{FEATURE_SPEC_VERSION}; retrain the model with `cbm train`"
            )
        if expected_spec is not None:
            diff = sorted(k for k in set(spec) | set(expected_spec) if spec.get(k) != expected_spec.get(k))
            if diff:
                shown = ", ".join(
                    f"{k}: model {spec.get(k)!r} vs configured {expected_spec.get(k)!r}" for k in diff
                )
                raise ModelSpecError(f"{path}: the model was made for another feature spec ({shown})")
        n_channels = len(channel_names(spec))
        kind = meta.get("kind")
        shell = CropModel(
            kind,
            None,
            spec,
            list(meta["classes"]),
            np.array(meta["norm"]["mean"]),
            np.array(meta["norm"]["std"]),
        )
        calibration = meta.get("calibration")
        if calibration is not None:
            if calibration.get("false_flags") != CALIBRATION_GRID:
                raise ModelSpecError(f"{path}: calibration made on another grid of false-flag rates")
            shell.calibration = np.array(calibration["max_declared_ratio"], dtype=float)
        shell.time_shifts = tuple(meta.get("training", {}).get("time_shifts_bins", ()))
        if meta.get("n_features") != shell.n_features() or len(shell.mean) != n_channels:
            raise ModelSpecError(f"{path}: spec.json is inconsistent with its feature spec")
        if kind == "sklearn":
            model = _load_sklearn(path, folder / "model.skops")
            if getattr(model, "n_features_in_", meta["n_features"]) != meta["n_features"]:
                raise ModelSpecError(
                    f"{path}: the model expects {model.n_features_in_} features, spec says "
                    f"{meta['n_features']}"
                )
        elif kind == "keras":
            model = _load_keras(path, folder / "model.keras")
            shape = tuple(model.input_shape[1:])
            if shape != (int(spec["bins"]), n_channels):
                raise ModelSpecError(
                    f"{path}: the network takes inputs {shape}, spec says {(spec['bins'], n_channels)}"
                )
        else:
            raise ModelSpecError(f"{path}: unknown model kind {kind!r}")
    shell.model = model
    return shell


def _load_sklearn(path: Path, file: Path) -> Any:
    """The scikit-learn model of a model file, refusing types beyond TRUSTED_SKLEARN_TYPES."""
    import skops.io

    if not file.is_file():
        raise ModelSpecError(f"{path}: no model.skops in the model file")
    try:
        untrusted = skops.io.get_untrusted_types(file=file)
    except Exception as exc:  # not a skops file: a zip error, a bad schema...
        raise ModelSpecError(f"{path}: model.skops is not a readable skops file ({exc})") from None
    foreign = sorted(set(untrusted) - set(TRUSTED_SKLEARN_TYPES))
    if foreign:
        raise ModelSpecError(
            f"{path}: refused: model.skops holds type(s) a crop-type model never has: {', '.join(foreign)}"
        )
    return skops.io.load(file, trusted=list(TRUSTED_SKLEARN_TYPES))


def _keras() -> Any:
    """The keras module, or a one-line error saying which extra installs it."""
    try:
        return importlib.import_module("keras")
    except ImportError as exc:
        raise CbmError(f"the keras CNN crop-type model needs TensorFlow: {CNN_EXTRA} ({exc})") from None


def _load_keras(path: Path, file: Path) -> Any:
    """The CNN of a model file, read in Keras' safe mode after checking that its config names
    only TRUSTED_KERAS_TYPES (no Lambda layers, no custom or foreign classes)."""
    if not zipfile.is_zipfile(file):
        raise ModelSpecError(f"{path}: no model.keras (a Keras v3 zip) in the model file")
    with zipfile.ZipFile(file) as archive:
        extra = sorted(set(archive.namelist()) - KERAS_FILES)
        if extra:
            raise ModelSpecError(f"{path}: refused: model.keras holds unexpected file(s) {', '.join(extra)}")
        config = json.loads(archive.read("config.json"))
    found: set[tuple[str, str]] = set()
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                found.add((str(item.get("module")), str(item["class_name"])))
                if item.get("registered_name") is not None:  # a custom object registered by name
                    found.add(("registered", str(item["registered_name"])))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    foreign = sorted(f"{module}.{name}" for module, name in found - TRUSTED_KERAS_TYPES)
    if foreign:
        raise ModelSpecError(
            f"{path}: refused: model.keras holds type(s) a crop-type model never has: {', '.join(foreign)}"
        )
    return _keras().saving.load_model(file, compile=False, safe_mode=True)


def fit(
    X: np.ndarray,
    y: Sequence[str],
    kind: str = "sklearn",
    spec: Mapping[str, Any] | None = None,
    seed: int = 0,
    epochs: int = 80,
    calibration_folds: int = 5,
    time_shifts: Sequence[float] = TIME_SHIFTS,
) -> CropModel:
    """Fit a model on feature arrays from features() (rows with NaN features must be removed first).

    The training parcels are augmented with copies moved by ``time_shifts`` bins. With
    calibration_folds, the flag threshold is calibrated on out-of-fold predictions of these same
    parcels (k extra fits, each augmenting only its own training part), so it never depends on
    parcels the model is later judged on.
    """
    spec = dict(spec or DEFAULT_SPEC)
    y = np.asarray([str(v) for v in y])
    classes = sorted(set(y))
    mean = np.nanmean(X, axis=(0, 1))
    std = np.nanstd(X, axis=(0, 1))
    std = np.where(std > 0, std, 1.0)
    shell = CropModel(kind, None, spec, classes, mean, std, time_shifts=tuple(time_shifts))
    Z = shell.prepare(np.concatenate([X, *(shifted(X, s) for s in time_shifts)]))
    target = np.tile(np.searchsorted(classes, y), 1 + len(time_shifts))
    if kind == "sklearn":
        model = _fit_sklearn(Z, target, seed)
    elif kind == "keras":
        model = _fit_keras(Z, target, len(classes), seed, epochs)
    else:
        raise InputError(f"unknown model kind {kind!r}: use 'sklearn' or 'keras'")
    shell.model = model
    if calibration_folds:
        proba, _ = cross_validate(
            X,
            y,
            kind,
            calibration_folds,
            seed + 1,
            epochs,
            spec,
            calibration_folds=0,
            time_shifts=time_shifts,
        )
        shell.calibration = calibrate(proba, classes, y)
    return shell


def _fit_sklearn(Z: np.ndarray, target: np.ndarray, seed: int) -> Any:
    """Soft vote of randomised trees (non-linear, confident) and a ridge-like logistic regression
    (smooth probabilities): their average ranks the declared class better than either alone."""
    from sklearn.ensemble import ExtraTreesClassifier, VotingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    trees = ExtraTreesClassifier(
        n_estimators=500, class_weight="balanced_subsample", random_state=seed, n_jobs=2
    )
    linear = make_pipeline(
        StandardScaler(), LogisticRegression(C=0.05, max_iter=2000, class_weight="balanced")
    )
    return VotingClassifier([("trees", trees), ("linear", linear)], voting="soft").fit(Z, target)


def declared_ratio(proba: np.ndarray, classes: Sequence[str], declared: Sequence[str]) -> np.ndarray:
    """p(declared) / p(most likely class); 0 for a declared crop that is not a class of the model."""
    classes = list(classes)
    col = np.array([classes.index(d) if d in classes else -1 for d in declared], dtype=np.int64)
    p_decl = np.where(col >= 0, proba[np.arange(len(proba)), np.maximum(col, 0)], 0.0)
    return p_decl / np.maximum(proba.max(axis=1), 1e-12)


def calibrate(proba: np.ndarray, classes: Sequence[str], truth: Sequence[str]) -> np.ndarray:
    """Thresholds of p(declared)/p(predicted) flagging each CALIBRATION_GRID share of honest parcels."""
    ratio = declared_ratio(proba, classes, truth)
    return np.quantile(ratio, CALIBRATION_GRID)


def _fit_keras(Z: np.ndarray, target: np.ndarray, n_classes: int, seed: int, epochs: int) -> Any:
    """A small 1-D CNN over the time axis: enough for a few hundred parcels, fast on CPU."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(shape=Z.shape[1:]),
            keras.layers.Conv1D(32, 5, padding="same", activation="relu"),
            keras.layers.Conv1D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling1D(2),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(n_classes, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    counts = np.bincount(target, minlength=n_classes)
    weights = {c: float(len(target) / (n_classes * max(n, 1))) for c, n in enumerate(counts)}
    model.fit(Z, target, epochs=epochs, batch_size=32, verbose=0, class_weight=weights)
    return model


def cross_validate(
    X: np.ndarray,
    y: Sequence[str],
    kind: str = "sklearn",
    folds: int = 5,
    seed: int = 0,
    epochs: int = 80,
    spec: Mapping[str, Any] | None = None,
    calibration_folds: int = 5,
    time_shifts: Sequence[float] = TIME_SHIFTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold class probabilities (columns = sorted classes of y) by stratified k-fold, and for
    each parcel the calibration of the fold model that predicted it (NaN without calibration_folds).
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray([str(v) for v in y])
    classes = sorted(set(y))
    proba = np.zeros((len(y), len(classes)))
    calibration = np.full((len(y), len(CALIBRATION_GRID)), np.nan)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(X, y):
        model = fit(X[train], y[train], kind, spec, seed, epochs, calibration_folds, time_shifts)
        cols = np.searchsorted(classes, model.classes)
        proba[np.ix_(test, cols)] = model.predict_proba(X[test])
        if model.calibration is not None:
            calibration[test] = model.calibration
    return proba, calibration


def flags(
    proba: np.ndarray,
    classes: Sequence[str],
    declared: Sequence[str],
    min_confidence: float,
    max_declared_ratio: float | np.ndarray,
    max_declared_prob: float | None = None,
) -> np.ndarray:
    """True where a confident prediction contradicts the declared crop (the marker's flag).

    The ratio p(declared)/p(predicted) rather than p(declared) alone: it does not depend on how
    many classes share the remaining probability, so one threshold suits every crop.
    """
    ratio = declared_ratio(proba, classes, declared)
    flagged = (ratio < 1.0) & (proba.max(axis=1) >= min_confidence) & (ratio <= max_declared_ratio)
    if max_declared_prob is not None:
        flagged &= ratio * proba.max(axis=1) <= max_declared_prob
    return flagged


# The marker ---------------------------------------------------------------------------------

_CACHE: dict[tuple[str, float], CropModel] = {}


def _cached(path: Path, expected: Mapping[str, Any] | None) -> CropModel:
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime if Path(path).exists() else 0.0)
    if key not in _CACHE or expected is not None:
        _CACHE[key] = load_model(path, expected)
    return _CACHE[key]


@impl
def cbm_marker_run(series: TimeSeries, params: Mapping[str, Any]) -> list[MarkerResult]:
    return run(series, params)


def run(series: TimeSeries, params: Mapping[str, Any] | None = None) -> list[MarkerResult]:
    """Predict each parcel's crop; flag a confident prediction that contradicts the declaration."""
    p = {**DEFAULTS, **(params or {})}
    name = str(p.get("name", NAME))
    pids = ts.batch_pids(series)

    def all_invalid(reason: str) -> list[MarkerResult]:
        return [MarkerResult(name, int(pid), Status.NOT_VALID, reason) for pid in pids]

    if not p["model"]:
        return all_invalid('no model configured: set model = "path/to/model" (made by `cbm train`)')
    try:
        model = _cached(param_path(params or {}, "model"), p.get("feature_spec"))
        pids, X, reasons = features(series, model.spec, p)
        if p["max_declared_ratio"] is None:
            max_ratio = model.max_declared_ratio(float(p["false_flags"]))
        else:
            max_ratio = float(p["max_declared_ratio"])
    except CbmError as exc:
        return all_invalid(str(exc))
    max_prob = None if p["max_declared_prob"] is None else float(p["max_declared_prob"])
    column = str(p["crop_column"])
    declared_by_pid = (
        series.parcels.set_index("pid")[column].astype(str) if column in series.parcels else None
    )
    valid = np.array([not r for r in reasons], dtype=bool)
    proba = np.zeros((len(pids), len(model.classes)))
    proba[valid] = model.predict_proba(X[valid])
    start = season_start(series, model.spec, p.get("year"))
    end = start + float(model.spec["step_days"]) * int(model.spec["bins"]) - 1
    out = []
    for k, pid in enumerate(pids.tolist()):
        if not valid[k]:
            out.append(MarkerResult(name, pid, Status.NOT_VALID, reasons[k]))
            continue
        declared = None if declared_by_pid is None else declared_by_pid.get(pid)
        order = np.argsort(proba[k])[::-1]
        best = model.classes[order[0]]
        p_best = float(proba[k, order[0]])
        values = {
            "predicted": best,
            "probability": round(p_best, 4),
            "declared": declared,
            "top3": {model.classes[i]: round(float(proba[k, i]), 4) for i in order[:3]},
        }
        if declared is None or declared not in model.classes:
            reason = f"declared crop {declared!r} is not a class of the model ({len(model.classes)} classes)"
            out.append(MarkerResult(name, pid, Status.NOT_VALID, reason, values=values, confidence=p_best))
            continue
        p_decl = float(proba[k, model.classes.index(declared)])
        values["declared_probability"] = round(p_decl, 4)
        values["declared_ratio"] = round(p_decl / max(p_best, 1e-12), 4)
        events = []
        if flags(
            proba[k : k + 1], model.classes, [declared], float(p["min_confidence"]), max_ratio, max_prob
        )[0]:
            events.append(
                Event(
                    ts.to_date(start),
                    ts.to_date(0.5 * (start + end)),
                    ts.to_date(end),
                    round(p_best - p_decl, 4),
                    round(p_best, 3),
                    (),
                    "crop_mismatch",
                )
            )
        out.append(MarkerResult(name, pid, Status.OK, "", events, values, round(max(p_best, 1 - p_decl), 3)))
    return out


# `cbm train` --------------------------------------------------------------------------------


def training_set(
    series: TimeSeries,
    labels: pd.Series,
    spec: Mapping[str, Any] | None = None,
    min_samples: int = 1,
    params: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(pids, X, y, dropped counts): valid parcels with a label of a class that has min_samples."""
    spec = dict(spec or DEFAULT_SPEC)
    pids, X, reasons = features(series, spec, params)
    y = labels.reindex(pids).astype(object).to_numpy()
    ok = np.array([not r for r in reasons]) & pd.notna(y)
    counts = pd.Series(y[ok]).value_counts()
    keep_classes = set(counts[counts >= min_samples].index)
    rare = ok & ~np.isin(y, list(keep_classes))
    dropped = {
        "no_label": int((pd.isna(y)).sum()),
        "not_valid": int(sum(bool(r) for r in reasons)),
        "rare_class": int(rare.sum()),
    }
    ok &= ~rare
    return pids[ok], X[ok], np.array([str(v) for v in y[ok]]), dropped


@impl
def cbm_cli_commands(cli: Any) -> None:
    import click

    @cli.command("train")
    @click.option(
        "--signatures",
        "signatures",
        required=True,
        type=click.Path(path_type=Path),
        help="Tidy signature table (Parquet/CSV, as for `cbm score`).",
    )
    @click.option(
        "--labels",
        required=True,
        type=click.Path(path_type=Path),
        help="CSV/Parquet with pid and crop columns (the true crops).",
    )
    @click.option(
        "--out", required=True, type=click.Path(path_type=Path), help="Model folder or .zip to write."
    )
    @click.option("--kind", type=click.Choice(["sklearn", "keras"]), default="sklearn", show_default=True)
    @click.option(
        "--scale", default="reflectance", show_default=True, help="S2 values: reflectance, dn or a factor."
    )
    @click.option("--offset", default=0.0, show_default=True, help="Added to S2 reflectance after scaling.")
    @click.option(
        "--min-samples",
        default=8,
        show_default=True,
        help="Classes with fewer labelled parcels are left out.",
    )
    @click.option("--epochs", default=80, show_default=True, help="Keras training epochs.")
    @click.option(
        "--cv", "folds", default=0, show_default=True, help="Also report k-fold cross-validated accuracy."
    )
    @click.option(
        "--s2-bands",
        default=",".join(DEFAULT_SPEC["s2"]),
        show_default=True,
        help="S2 bands of the features.",
    )
    @click.option(
        "--s1-bands", default=",".join(DEFAULT_SPEC["s1"]), show_default=True, help="S1 backscatter bands."
    )
    @click.option(
        "--indices", default=",".join(DEFAULT_SPEC["indices"]), show_default=True, help="Spectral indices."
    )
    @click.option("--seed", default=0, show_default=True)
    def train(
        signatures: Path,
        labels: Path,
        out: Path,
        kind: str,
        scale: str,
        offset: float,
        min_samples: int,
        epochs: int,
        folds: int,
        s2_bands: str,
        s1_bands: str,
        indices: str,
        seed: int,
    ) -> None:
        """Fit a crop-type model on labelled signatures and write it with its feature spec."""
        from cbm_core.api import read_signatures
        from markers._evaluate import confusion, read_table

        series = read_signatures(signatures, scale=scale, offset=offset)
        table = read_table(labels, "labels")
        if not {"pid", "crop"} <= set(table.columns):
            raise InputError(f"{labels}: needs columns pid and crop")
        truth = table.drop_duplicates("pid").set_index("pid")["crop"]
        names = lambda text: [b.strip() for b in text.split(",") if b.strip()]  # noqa: E731
        spec = make_spec(names(s2_bands), names(s1_bands), names(indices))
        _, X, y, dropped = training_set(series, truth, spec, min_samples=min_samples)
        if len(set(y)) < 2:
            raise InputError(f"{labels}: fewer than two classes with {min_samples}+ usable parcels")
        report: dict[str, Any] = {"parcels": len(y), "classes": len(set(y)), "left_out": dropped}
        if folds:
            proba, _ = cross_validate(X, y, kind, folds, seed, epochs, spec, calibration_folds=0)
            classes = sorted(set(y))
            report["cv"] = confusion(pd.Series(y), pd.Series(np.asarray(classes)[proba.argmax(axis=1)]))
        model = fit(X, y, kind, spec, seed=seed, epochs=epochs)
        report["model"] = str(model.save(out))
        click.echo(json.dumps(report, indent=2))
