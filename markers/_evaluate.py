"""Evaluation of markers against reference data: event precision/recall/F1 and crop confusion matrices.

Event matching follows the protocol used to compare published mowing detectors: a reference event
is matched by the nearest detection of the same parcel within +-tolerance days, each reference and
each detection used at most once (greedy by distance, ties by date).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbm_core.errors import InputError
from cbm_core.model import MarkerResult, results_frame
from cbm_core.outputs import read_results
from cbm_core.pipeline import Engine
from markers._simulate import simulate

DEFAULT_TOLERANCE_DAYS = 12


def events_table(results: Iterable[MarkerResult] | pd.DataFrame, marker: str | None = None) -> pd.DataFrame:
    """Detected events (pid, date, confidence, kind) from marker results or a results_frame table."""
    frame = results if isinstance(results, pd.DataFrame) else results_frame(results)
    if marker is not None:
        frame = frame[frame["marker"] == marker]
    rows = []
    for pid, text in zip(frame["pid"].to_numpy(), frame["events"].to_numpy(), strict=True):
        for e in json.loads(text) if isinstance(text, str) else []:
            rows.append((int(pid), pd.Timestamp(e["main"]), e.get("confidence"), e.get("kind", "")))
    return pd.DataFrame(rows, columns=["pid", "date", "confidence", "kind"])


def match_events(
    reference: pd.DataFrame, detected: pd.DataFrame, tolerance_days: float = DEFAULT_TOLERANCE_DAYS
) -> pd.DataFrame:
    """One-to-one matches of detections to reference events.

    Columns pid, ref_date, det_date, error_days and the row positions ref_index / det_index.
    """
    ref = reference[["pid", "date"]].assign(date=pd.to_datetime(reference["date"]).dt.tz_localize(None))
    det = detected[["pid", "date"]].assign(date=pd.to_datetime(detected["date"]).dt.tz_localize(None))
    ref = ref.reset_index(drop=True).rename_axis("ref_i").reset_index()
    det = det.reset_index(drop=True).rename_axis("det_i").reset_index()
    pairs = ref.merge(det, on="pid", suffixes=("_ref", "_det"))
    pairs["error_days"] = (pairs["date_det"] - pairs["date_ref"]).dt.total_seconds() / 86400
    pairs = pairs[pairs["error_days"].abs() <= tolerance_days]
    pairs = pairs.assign(dist=pairs["error_days"].abs()).sort_values(["dist", "date_ref"], kind="stable")
    taken_r: set[int] = set()
    taken_d: set[int] = set()
    keep = []
    for r, d in zip(pairs["ref_i"].to_numpy(), pairs["det_i"].to_numpy(), strict=True):
        if r in taken_r or d in taken_d:
            continue
        taken_r.add(int(r))
        taken_d.add(int(d))
        keep.append((r, d))
    columns = ["pid", "ref_date", "det_date", "error_days", "ref_index", "det_index"]
    if not keep:
        return pd.DataFrame(columns=columns)
    chosen = pairs.set_index(["ref_i", "det_i"]).loc[keep].reset_index()
    renamed = {"date_ref": "ref_date", "date_det": "det_date", "ref_i": "ref_index", "det_i": "det_index"}
    return chosen.rename(columns=renamed)[columns].reset_index(drop=True)


def event_scores(
    reference: pd.DataFrame,
    detected: pd.DataFrame,
    tolerance_days: float = DEFAULT_TOLERANCE_DAYS,
    pids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Event-level precision, recall and F1 (restricted to ``pids`` when given)."""
    if pids is not None:
        keep = set(int(p) for p in pids)
        reference = reference[reference["pid"].isin(keep)]
        detected = detected[detected["pid"].isin(keep)]
    matches = match_events(reference, detected, tolerance_days)
    tp = len(matches)
    fp = len(detected) - tp
    fn = len(reference) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    mae = float(matches["error_days"].abs().mean()) if tp else float("nan")
    return {
        "tolerance_days": tolerance_days,
        "reference_events": len(reference),
        "detected_events": len(detected),
        "tp": tp,
        "fp": int(fp),
        "fn": int(fn),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "mean_abs_error_days": None if np.isnan(mae) else round(mae, 2),
    }


def confusion(truth: pd.Series, predicted: pd.Series) -> dict[str, Any]:
    """Confusion matrix (rows = truth, columns = prediction), overall accuracy and per-class recall."""
    labels = sorted(set(map(str, truth)) | set(map(str, predicted)))
    t = pd.Categorical(truth.astype(str), categories=labels)
    p = pd.Categorical(predicted.astype(str), categories=labels)
    matrix = pd.crosstab(t, p, dropna=False)
    correct = np.diag(matrix.to_numpy())
    support = matrix.sum(axis=1).to_numpy()
    predicted_n = matrix.sum(axis=0).to_numpy()
    return {
        "labels": labels,
        "matrix": matrix.to_numpy().tolist(),
        "overall_accuracy": round(float(correct.sum() / max(support.sum(), 1)), 4),
        "recall": {c: round(float(correct[i] / support[i]), 4) for i, c in enumerate(labels) if support[i]},
        "precision": {
            c: round(float(correct[i] / predicted_n[i]), 4) for i, c in enumerate(labels) if predicted_n[i]
        },
    }


def read_table(path: Path, what: str) -> pd.DataFrame:
    """A CSV or Parquet table, with a clear error when the file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq", ".geoparquet"):
        return pd.read_parquet(path)
    return pd.read_csv(path)


def evaluate_files(
    results_path: Path,
    reference_path: Path,
    marker: str | None = None,
    tolerance_days: float = DEFAULT_TOLERANCE_DAYS,
) -> dict[str, Any]:
    """Score a marker results table against a reference file.

    Reference with (pid, date): event scores of the marker's events. Reference with (pid, crop):
    confusion matrix of the marker's predicted crop (``values.predicted``) against it.
    """
    results = read_table(results_path, "marker results")
    if Path(results_path).suffix.lower() in (".parquet", ".pq"):
        results = read_results(results_path)  # events as JSON text, whichever way the file keeps them
    reference = read_table(reference_path, "reference")
    if marker is not None and marker not in set(results["marker"]):
        raise InputError(
            f"{results_path}: no results of marker {marker!r}; found {sorted(set(results['marker']))}"
        )
    if "pid" not in reference.columns:
        raise InputError(f"{reference_path}: the reference needs a pid column")
    if "date" in reference.columns:
        detected = events_table(results, marker)
        if "kind" in reference.columns and len(detected):
            kinds = set(reference["kind"].astype(str))
            detected = detected[detected["kind"].str.split(":").str[0].isin(kinds)]
        pids = results.loc[results["marker"] == marker, "pid"] if marker else results["pid"]
        return {"events": event_scores(reference, detected, tolerance_days, pids=pids.unique())}
    if "crop" in reference.columns:
        frame = results if marker is None else results[results["marker"] == marker]
        frame = frame[frame["status"] == "OK"]
        predicted = frame.set_index("pid")["values"].map(lambda v: json.loads(v).get("predicted"))
        joined = (
            reference.set_index("pid")["crop"].to_frame().join(predicted.rename("predicted"), how="inner")
        )
        joined = joined.dropna()
        return {"crops": confusion(joined["crop"], joined["predicted"]), "parcels": len(joined)}
    raise InputError(
        f"{reference_path}: the reference needs a date column (events) or a crop column (crop type)"
    )


def evaluate_simulation(
    n_parcels: int,
    scheme: Any,
    engine: Any = None,
    seed: int = 42,
    tolerance_days: float = DEFAULT_TOLERANCE_DAYS,
) -> dict[str, Any]:
    """Simulate parcel-years with known events, run a scheme, and score each marker's events.

    Mowing events are scored on the grassland parcels, ploughing events on the arable ones (the
    parcels where such events can happen), each against the simulator's truth.
    """
    engine = engine or Engine(progress=False)
    plan = engine.scheme(str(scheme), Path.cwd()) if isinstance(scheme, str | Path) else scheme
    scenario = simulate(n_parcels, seed=seed)
    results = engine.run_markers(scenario.series, plan)
    verdicts = engine.decide(results, scenario.series.parcels, plan)
    actual = scenario.actual_crop
    where = {"mowing": actual.index[actual == "grassland"], "ploughing": actual.index[actual != "grassland"]}
    report: dict[str, Any] = {"parcels": n_parcels, "seed": seed, "markers": {}}
    for name in plan.marker_names:
        detected = events_table(results, name)
        if not len(detected):
            report["markers"][name] = {"events": 0}
            continue
        kinds = detected["kind"].str.split(":").str[0]
        scores = {}
        for kind, pids in where.items():
            if (kinds == kind).any():
                truth = scenario.truth[scenario.truth["kind"] == kind]
                scores[kind] = event_scores(truth, detected[kinds == kind], tolerance_days, pids=pids)
        report["markers"][name] = scores
    report["verdicts"] = verdicts["light"].value_counts().to_dict()
    return report
