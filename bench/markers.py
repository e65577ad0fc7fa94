"""Marker throughput and quality benchmark (JSON on stdout or --out).

    python bench/markers.py                       # 10k, 100k and 1M simulated parcel-years
    python bench/markers.py --sizes 10000 --markers mowing

Throughput: parcel-years of simulated S2 (B02 B03 B04 B08 B11 + SCL) and S1 (backscatter and
6-day coherence, two orbits) are generated in batches of the engine's marker batch size; only the
marker calls are timed (simulation is not). Each size runs in a fresh process so its peak RSS is
its own. Event F1 (+-12 days, one-to-one) of the mowing and ploughing markers is measured against
the simulator's truth on the same parcels.

Quality by simulator profile (``--quality-parcels``, default 20 000 parcel-years per profile): the
mowing marker's event scores on grassland with S2 + coherence and with S2 + GRD backscatter only,
on the original simulator ("default") and on the one calibrated on real series ("flanders", see
bench/simulator.py), beside the naive rule (clear NDVI drop >= 0.1 from above 0.4, detections 15
days apart) on the same series (valid = the core validity policy's). Neither profile predicts field
accuracy: no marker parameter is chosen on these runs.
The crop-type marker's benchmark on real parcels is bench/worldcereal.py.
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

from cbm_core.pipeline import MARKER_BATCH  # noqa: E402
from markers import _series as ts  # noqa: E402
from markers._evaluate import event_scores, events_table  # noqa: E402
from markers._simulate import simulate  # noqa: E402

TRUTH = {"mowing": ("mowing", "grassland"), "bare_soil": ("ploughing", "arable")}


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


NAIVE_DROP, NAIVE_FROM, NAIVE_SPACING = 0.1, 0.4, 15.0  # the naive peer of issue 13


def naive_cuts(series, season: tuple[str, str] = ("03-16", "10-27")) -> pd.DataFrame:
    """The naive rule: a valid NDVI drop >= 0.1 from above 0.4, dated mid-way, 15 days apart."""
    from markers import mowing

    _, s2 = mowing._s2_series(series, mowing.DEFAULTS)
    lo, hi = ts.season_bounds(s2, *season)
    rows = []
    for k, pid in enumerate(s2.pids.tolist()):
        t = s2.t[s2.offsets[k] : s2.offsets[k + 1]]
        v = s2.values["NDVI"][s2.offsets[k] : s2.offsets[k + 1]]
        last = -np.inf
        for i in np.flatnonzero((v[:-1] > NAIVE_FROM) & (v[:-1] - v[1:] >= NAIVE_DROP)) + 1:
            if lo <= t[i] <= hi + 1 and t[i] - last >= NAIVE_SPACING:
                rows.append((pid, ts.to_date(0.5 * (t[i - 1] + t[i]))))
                last = t[i]
    return pd.DataFrame(rows, columns=["pid", "date"])


def quality(n: int, seed: int) -> dict:
    """Mowing event scores on each simulator profile and sensor set, beside the naive rule."""
    from markers import mowing
    from markers._simulate import PROFILES

    out: dict = {}
    for profile in PROFILES:
        for sensors, cards in (("s2+coherence", ("bs", "c6")), ("s2+backscatter", ("bs",))):
            scenario = simulate(n, seed=seed, profile=profile, s1_cards=cards)
            grass = scenario.actual_crop.index[scenario.actual_crop == "grassland"]
            truth = scenario.truth[scenario.truth["kind"] == "mowing"]
            found = events_table(mowing.run(scenario.series, {}))
            out[f"{profile} {sensors}"] = {
                "mowing": event_scores(truth, found, 12, pids=grass),
                "naive": event_scores(truth, naive_cuts(scenario.series), 12, pids=grass),
            }
            print(f"quality {profile} {sensors}: {out[f'{profile} {sensors}']}", file=sys.stderr)
    return {"parcels": n, "seed": seed, "profiles": out}


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
    parser.add_argument("--quality-parcels", type=int, default=20_000, help="0: skip the profile scores")
    parser.add_argument("--out", type=Path)
    one = sub.add_parser("one", help="(internal) one size in this process")
    one.add_argument("n", type=int)
    one.add_argument("--markers", nargs="+", default=["mowing", "bare_soil"])
    one.add_argument("--batch", type=int, default=MARKER_BATCH)
    one.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if args.command == "one":
        print(json.dumps(one_size(args.n, args.markers, args.batch, args.seed)))
        return
    report = throughput(args.sizes, args.markers, args.batch, args.seed)
    if args.quality_parcels:
        report["mowing_quality"] = quality(args.quality_parcels, args.seed)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
