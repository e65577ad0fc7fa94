"""Scale-out benchmark: `cbm run` marker scoring on dask over 10k -> 100k -> 1M simulated parcels.

Each measurement is a fresh process (so peak memory is its own) running the real distributed
pipeline (cbm_core.distributed) on a LocalCluster of 1 or 2 single-threaded workers. Parcels come
from a source plugin and signatures from a store plugin defined here, both backed by the scenario
simulator: each marker partition simulates its own pids on the worker, as a store would read
them, so the benchmark measures the scale-out and the marker, not a disk. Reports time and peak
memory (driver and per worker) per size, the growth exponent of time with parcel count (slope of
log time on log size; 1 is linear) and the parallel efficiency t(1 worker) / (2 t(2 workers)).

    python bench/scale.py [--sizes 10000 100000 1000000] [--workers 1 2] [--time-box 900]

A size whose time, extrapolated linearly from the previous size, exceeds --time-box seconds is
recorded as skipped rather than run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cbm_core import impl  # noqa: E402
from cbm_core.model import Signatures  # noqa: E402
from markers._simulate import CROPS, simulate  # noqa: E402

PARTITION = 10_000  # parcels per marker unit: 10 units at 100k keep 2 workers evenly busy


# Plugins: parcels, catalogue and signatures from the simulator ------------------------------------


@impl
def cbm_source_parcels(config) -> gpd.GeoDataFrame:
    """n square parcels on a grid, crops drawn with the simulator's default shares."""
    n = int(config.require("parcels"))
    rng = np.random.default_rng(0)
    names = list(CROPS)
    shares = np.array([CROPS[c][1] for c in names])
    crop = np.array(names, dtype=object)[rng.choice(len(names), size=n, p=shares / shares.sum())]
    cols = math.ceil(math.sqrt(n))
    x = 4_000_000 + (np.arange(n) % cols) * 300.0
    y = 2_800_000 + (np.arange(n) // cols) * 300.0
    return gpd.GeoDataFrame(
        {
            "pid": np.arange(1, n + 1, dtype=np.int64),
            "crop_code": [CROPS[c][0] for c in crop],
            "crop_name": crop,
        },
        geometry=shapely.box(x, y, x + 150, y + 150),
        crs="EPSG:3035",
    )


@impl
def cbm_source_catalogue(config) -> gpd.GeoDataFrame:
    """One S2 scene a day (named by date, see scene_ids): covers any revisit the simulator draws."""
    days = pd.date_range("2023-01-01", "2023-12-31", freq="D", tz="UTC")
    return gpd.GeoDataFrame(
        {
            "obsid": [f"sim_{d:%Y%m%d}" for d in days],
            "obstime": days,
            "sensor": "S2",
            "card": "s2",
            "orbit": None,
            "bands": [{} for _ in days],
        },
        geometry=[None] * len(days),
        crs="EPSG:4326",
    )


def scene_ids(obstime: pd.Series) -> np.ndarray:
    """Scene ids from observation dates, so the catalogue matches whatever the simulator names them."""
    codes, days = pd.factorize(obstime)
    return np.array([f"sim_{d:%Y%m%d}" for d in days], dtype=object)[codes]


@impl
def cbm_store_read(config, pids, obsids, bands) -> Signatures:
    """The signatures of a contiguous pid range, simulated (seeded by the range start)."""
    start, n = int(min(pids)), len(pids)
    series = simulate(n, pid_start=start, seed=start, s2_bands=("B04", "B08"), s1_cards=(), categorical=False)
    stats, scl = series.series.stats, series.series.scl
    stats["obsid"] = scene_ids(stats["obstime"])
    scl["obsid"] = scene_ids(scl["obstime"])
    return Signatures(stats.drop(columns=["obstime", "card", "orbit"]), scl.drop(columns=["obstime"]))


@impl
def cbm_store_write(config, signatures, obsids) -> int:
    raise NotImplementedError("the simulated store is read-only: the benchmark configures no extraction")


@impl
def cbm_store_obsids(config) -> set[str]:
    return set()


# One measurement (a child process) ---------------------------------------------------------------


def measure(size: int, workers: int) -> dict:
    """Run the pipeline once on a fresh LocalCluster; time the marker stage and the whole run."""
    from distributed import Client, LocalCluster

    import cbm_core.distributed as dist
    from cbm_core.config import load_run_config
    from cbm_core.pipeline import Engine
    from cbm_core.plugins import load_plugins

    plugins = load_plugins()
    plugins.register(__import__("scale"), "sim")  # by module name, so the workers can import it
    folder = Path(tempfile.mkdtemp(prefix="cbm-scale-"))
    config_path = folder / "run.toml"
    config_path.write_text(
        f'scheme = "ndvi-drop"\n[run]\nout = "out"\n[source]\nplugin = "sim"\nparcels = {size}\n'
        f'[store]\nplugin = "sim"\n[cluster]\npartition_size = {PARTITION}\n'
    )
    stage: dict[str, float] = {}
    score = dist.score_partitions

    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return score(*args, **kwargs)
        finally:
            stage["markers"] = time.perf_counter() - began

    dist.score_partitions = timed
    with (
        dist.worker_environment(),  # as `cbm run --workers N` starts its workers
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        began = time.perf_counter()
        result = Engine(plugins, progress=False).run(load_run_config(config_path), cluster=client)
        total = time.perf_counter() - began
        worker_kib = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert len(result.results) == size and not result.summary["cluster"]["failed_units"]
    scored = result.summary["markers"]["ndvi_drop"].get("OK", 0)
    assert scored > size // 2, f"most parcels should be scored: {result.summary['markers']}"
    return {
        "parcels": size,
        "workers": workers,
        "seconds_markers": round(stage["markers"], 2),
        "seconds_total": round(total, 2),
        "peak_mib_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_mib_per_worker": max(round(k / 1024) for k in worker_kib.values()),
        "statuses": result.summary["markers"],
    }


# The whole benchmark -----------------------------------------------------------------------------


def growth_exponent(runs: list[dict], key: str) -> float | None:
    """Least-squares slope of log(time) on log(parcels)."""
    if len(runs) < 2:
        return None
    x = np.log([r["parcels"] for r in runs])
    y = np.log([r[key] for r in runs])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--time-box", type=float, default=900.0, help="skip a run predicted longer (s)")
    parser.add_argument("--out", type=Path, default=HERE / "scale.json")
    parser.add_argument("--one", type=int, nargs=2, metavar=("SIZE", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    runs: list[dict] = []
    skipped: list[dict] = []
    for workers in args.workers:
        previous = None
        for size in sorted(args.sizes):
            if previous is not None:
                predicted = previous["seconds_total"] * size / previous["parcels"]
                if predicted > args.time_box:
                    skipped.append(
                        {"parcels": size, "workers": workers, "predicted_seconds": round(predicted)}
                    )
                    print(f"skip {size} parcels x {workers} workers: ~{predicted:.0f} s", file=sys.stderr)
                    continue
            child = subprocess.run(
                [sys.executable, __file__, "--one", str(size), str(workers)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            previous = json.loads(child.stdout.strip().splitlines()[-1])
            runs.append(previous)
            print(json.dumps(previous), file=sys.stderr)
    by = {(r["parcels"], r["workers"]): r for r in runs}
    report = {
        "command": "python " + " ".join([str(Path(__file__).relative_to(HERE.parent)), *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "system": platform.platform(),
        },
        "partition_size": PARTITION,
        "runs": runs,
        "skipped": skipped,
        "growth_exponent": {
            f"{w}_workers": {
                key: growth_exponent([r for r in runs if r["workers"] == w], key)
                for key in ("seconds_markers", "seconds_total")
            }
            for w in args.workers
        },
        "parallel_efficiency_2_workers": {
            str(size): {
                key: round(by[(size, 1)][key] / (2 * by[(size, 2)][key]), 3)
                for key in ("seconds_markers", "seconds_total")
            }
            for size in args.sizes
            if (size, 1) in by and (size, 2) in by
        },
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
