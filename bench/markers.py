"""Marker throughput and quality benchmark (JSON on stdout or --out).

    python bench/markers.py                       # 10k, 100k and 1M simulated parcel-years
    python bench/markers.py --sizes 10000 --markers mowing
    python bench/markers.py crop --worldcereal ../shared/data/worldcereal-fra-2023

Throughput: parcel-years of simulated S2 (B02 B03 B04 B08 B11 + SCL) and S1 (backscatter and
6-day coherence, two orbits) are generated in batches of the engine's marker batch size; only the
marker calls are timed (simulation is not). Each size runs in a fresh process so its peak RSS is
its own. Event F1 (+-12 days, one-to-one) of the mowing and ploughing markers is measured against
the simulator's truth on the same parcels. `crop` reports the crop-type marker's cross-validated
accuracy on the real WorldCereal parcels and its detection of deliberately swapped declarations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cbm_core.evaluate import event_scores, events_table  # noqa: E402
from cbm_core.pipeline import MARKER_BATCH  # noqa: E402
from cbm_core.simulate import simulate  # noqa: E402

TRUTH = {"mowing": ("mowing", "grassland"), "bare_soil": ("ploughing", "arable")}
# Broad groups of the CROPTYPE_INSEASON_FRANCE classes: a swap inside a group (wheat declared as
# "cereals") is often not a compliance issue and hardly separable from S2/S1 signatures.
GROUPS = {
    "wheat": "cereals",
    "barley": "cereals",
    "cereals": "cereals",
    "spring_barley": "cereals",
    "sunflower": "oilseeds",
    "rapeseed_rape": "oilseeds",
    "soy_soybeans": "oilseeds",
    "grapes": "permanent",
    "permanent_crops": "permanent",
}


def one_size(n: int, markers: list[str], batch: int, seed: int) -> dict:
    """Run the markers over n simulated parcel-years, batch by batch; time only the marker calls."""
    import importlib

    modules = {m: importlib.import_module(f"markers.{m}") for m in markers}
    warm = simulate(200, seed=seed + 999)
    for module in modules.values():  # compile numba kernels outside the timing
        module.run(warm.series, {})
    seconds = dict.fromkeys(markers, 0.0)
    cpu = dict.fromkeys(markers, 0.0)
    detected = {m: [] for m in markers}
    truth, grass, arable = [], [], []
    rows = 0
    for start in range(0, n, batch):
        size = min(batch, n - start)
        scenario = simulate(size, seed=seed + start, pid_start=start + 1)
        rows += len(scenario.series.stats)
        for name, module in modules.items():
            t0, c0 = time.perf_counter(), time.process_time()
            results = module.run(scenario.series, {})
            seconds[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            if name in TRUTH:
                detected[name].append(events_table(results))
        truth.append(scenario.truth)
        actual = scenario.actual_crop
        grass.append(actual.index[actual == "grassland"].to_numpy())
        arable.append(actual.index[actual != "grassland"].to_numpy())
    truth_all = pd.concat(truth, ignore_index=True)
    where = {"grassland": np.concatenate(grass), "arable": np.concatenate(arable)}
    report = {"parcels": n, "signature_rows": rows, "markers": {}}
    for name in markers:
        entry = {
            "seconds": round(seconds[name], 3),
            "parcels_per_s": round(n / max(seconds[name], 1e-9)),
            "cpu_seconds": round(cpu[name], 3),  # all threads; wall time suffers when others load the machine
        }
        if name in TRUTH:
            kind, crop = TRUTH[name]
            found = pd.concat(detected[name], ignore_index=True)
            found = found[found["kind"].str.startswith(kind)]
            ref = truth_all[truth_all["kind"] == kind]
            entry["events"] = event_scores(ref, found, 12, pids=where[crop])
        report["markers"][name] = entry
    report["peak_rss_mb"] = _peak_rss_mb()
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    return report


def throughput(sizes: list[int], markers: list[str], batch: int, seed: int) -> dict:
    """Each size in its own process (clean peak memory), then the growth from the smallest size."""
    runs = []
    for n in sizes:
        cmd = [
            sys.executable,
            __file__,
            "one",
            str(n),
            "--markers",
            *markers,
            "--batch",
            str(batch),
            "--seed",
            str(seed),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(json.loads(done.stdout))
        print(f"{n}: {json.dumps(runs[-1]['markers'])[:300]}", file=sys.stderr)
    growth = {}
    for name in markers:
        base = runs[0]["markers"][name]["seconds"] / runs[0]["parcels"]
        growth[name] = {
            str(r["parcels"]): round(r["markers"][name]["seconds"] / r["parcels"] / base, 3) for r in runs
        }
    return {
        "benchmark": "markers",
        "machine": _machine(),
        "batch_parcels": batch,
        "sizes": runs,
        "time_per_parcel_relative_to_smallest": growth,
    }


def crop(worldcereal: Path, kinds: list[str], folds: int, seed: int, legend: str, min_samples: int) -> dict:
    """Cross-validated accuracy on WorldCereal and recall of swapped declarations at the marker's defaults.

    Each fold's flag threshold comes from that fold's model, calibrated on its own training parcels
    (inner cross-validation): nothing is tuned on the parcels it is scored on.
    """
    sys.path.append(
        str(Path(__file__).resolve().parent)
    )  # after the project root: bench/markers.py is not the markers package
    from worldcereal import worldcereal_tidy

    from cbm_core.evaluate import confusion
    from cbm_core.score import signatures_series
    from markers import crop_type

    table, labels = worldcereal_tidy(
        worldcereal / "2023_FRA_LPIS_POLY_110.geoparquet",
        worldcereal / "crop_type_class_mappings.csv",
        worldcereal / "class_mappings.json",
    )
    series = signatures_series(table, scale="dn")
    truth = labels.set_index("pid")[legend]
    _, X, y, dropped = crop_type.training_set(series, truth, min_samples=min_samples)
    classes = sorted(set(y))
    rng = np.random.default_rng(seed)
    swapped = np.array([rng.choice([c for c in classes if c != v]) for v in y])
    mc = crop_type.DEFAULTS["min_confidence"]
    target = crop_type.DEFAULTS["false_flags"]
    group = {c: GROUPS.get(c, c) for c in classes}
    across = np.array([group[a] != group[b] for a, b in zip(y, swapped, strict=True)])
    out = {
        "legend": legend,
        "parcels": len(y),
        "classes": len(classes),
        "left_out": dropped,
        "folds": folds,
        "swaps_across_groups": int(across.sum()),
    }
    for kind in kinds:
        t0 = time.perf_counter()
        proba, calibration = crop_type.cross_validate(X, y, kind, folds, seed)
        predicted = np.asarray(classes)[proba.argmax(axis=1)]
        matrix = confusion(pd.Series(y), pd.Series(predicted))

        out[kind] = {
            "overall_accuracy": matrix["overall_accuracy"],
            **_flag_rates(proba, calibration, classes, y, swapped, across, mc, target),
            "thresholds": {"min_confidence": mc, "false_flags": target},
            "tradeoff_false_flags": {
                str(t): _flag_rates(proba, calibration, classes, y, swapped, across, mc, t)
                for t in (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1)
            },
            "recall_by_class": matrix["recall"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return out


def _flag_rates(
    proba: np.ndarray,
    calibration: np.ndarray,
    classes: list[str],
    y: np.ndarray,
    swapped: np.ndarray,
    across: np.ndarray,
    min_confidence: float,
    false_flags: float,
) -> dict:
    """Flags at each fold model's own calibrated threshold for a target false-flag rate."""
    from markers import crop_type

    ratio = np.array([np.interp(false_flags, crop_type.CALIBRATION_GRID, c) for c in calibration])
    honest = crop_type.flags(proba, classes, y, min_confidence, ratio)
    caught = crop_type.flags(proba, classes, swapped, min_confidence, ratio)
    return {
        "false_flag_rate": round(float(honest.mean()), 4),
        "swap_recall": round(float(caught.mean()), 4),
        "swap_recall_across_groups": round(float(caught[across].mean()), 4),
        "max_declared_ratio_by_fold": sorted({round(float(r), 4) for r in ratio}),
    }


def _peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM; ru_maxrss would inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _machine() -> dict:
    import numba

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--markers", nargs="+", default=["mowing", "bare_soil"])
    parser.add_argument("--batch", type=int, default=MARKER_BATCH)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path)
    one = sub.add_parser("one", help="(internal) one size in this process")
    one.add_argument("n", type=int)
    one.add_argument("--markers", nargs="+", default=["mowing", "bare_soil"])
    one.add_argument("--batch", type=int, default=MARKER_BATCH)
    one.add_argument("--seed", type=int, default=42)
    c = sub.add_parser("crop", help="crop-type marker on the WorldCereal parcels")
    c.add_argument("--worldcereal", type=Path, required=True)
    c.add_argument("--kinds", nargs="+", default=["sklearn", "keras"])
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--legend", default="CROPTYPE_INSEASON_FRANCE")
    c.add_argument("--min-samples", type=int, default=8)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.command == "one":
        print(json.dumps(one_size(args.n, args.markers, args.batch, args.seed)))
        return
    if args.command == "crop":
        report = crop(args.worldcereal, args.kinds, args.folds, args.seed, args.legend, args.min_samples)
    else:
        report = throughput(args.sizes, args.markers, args.batch, args.seed)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
