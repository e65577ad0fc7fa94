"""Benchmark: bulk load of signatures into PostGIS through the store's binary COPY path.

Builds (or extends) a signature store of PARCELS x SCENES x BANDS rows in a throwaway
PostgreSQL + PostGIS cluster: the first scenes one per store write with the indexes live (the way
extraction writes), the rest with bulk_load (indexes rebuilt once, as `cbm db load-signatures`),
and reports rows/s of both as JSON. The cluster folder can be kept (--data-dir) so that
bench/api.py serves the same store. Time-boxed: bulk-loads only the scenes that fit in --time-limit.

    .venv/bin/python bench/db.py --parcels 250000 --scenes 25 --data-dir /tmp/cbm-bench-pg
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers import PostgresCluster  # noqa: E402

import sources.postgis as pg  # noqa: E402
from cbm_core.config import PluginConfig  # noqa: E402
from cbm_core.model import HIST_COLUMNS, STATS, Signatures  # noqa: E402

BANDS = ("B02", "B03", "B04", "B05", "B08", "B8A", "B11", "B12")
BULK_SETTINGS = ("shared_buffers=2GB", "max_wal_size=8GB", "checkpoint_timeout=30min", "wal_level=minimal",
                 "max_wal_senders=0", "maintenance_work_mem=512MB")  # fmt: skip


def scene_names(count: int) -> list[str]:
    start = pd.Timestamp("2023-03-01", tz="UTC")
    return [f"S2A_MSIL2A_{(start + pd.Timedelta(days=5 * i)):%Y%m%d}_T31UFS_{i:04d}" for i in range(count)]


def scene_signatures(
    obsid: str, parcels: int, bands: tuple[str, ...], rng: np.random.Generator
) -> Signatures:
    rows = parcels * len(bands)
    stats = pd.DataFrame({
        "pid": np.repeat(np.arange(1, parcels + 1, dtype=np.int64), len(bands)),
        "obsid": obsid,
        "band": np.tile(np.array(bands, dtype=object), parcels),
    })  # fmt: skip
    for name in STATS:
        stats[name] = rng.integers(1, 400, rows) if name == "count" else rng.random(rows)
    scl = pd.DataFrame({"pid": np.arange(1, parcels + 1, dtype=np.int64), "obsid": obsid})
    for name in HIST_COLUMNS:
        scl[name] = rng.integers(0, 50, parcels) if name in ("hist_4", "hist_8") else 0
    return Signatures(stats, scl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parcels", type=int, default=250_000)
    parser.add_argument("--scenes", type=int, default=25)
    parser.add_argument("--bands", type=int, default=len(BANDS))
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="keep the cluster here (reused if present)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=1200.0, help="seconds before no new scene is started"
    )
    parser.add_argument("--incremental-scenes", type=int, default=2, help="scenes written one by one first")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args()

    bands = BANDS[: args.bands]
    cluster = PostgresCluster(
        settings=BULK_SETTINGS, **({"root": args.data_dir, "keep": True} if args.data_dir else {})
    )
    cluster.start()
    try:
        config = PluginConfig(
            "postgis", {"dsn": cluster.dsn, "signatures_table": "bench_sig", "hists_table": "bench_hist"}
        )
        pg.init_database(config)
        names = scene_names(args.scenes)
        catalogue = gpd.GeoDataFrame(
            {"obsid": names, "obstime": [pd.Timestamp(n.split("_")[2], tz="UTC") for n in names],
             "sensor": "Sentinel-2A MSI", "card": "s2", "orbit": "R008", "bands": [{} for _ in names]},
            geometry=[None] * len(names), crs="EPSG:4326",
        )  # fmt: skip
        pg.import_catalogue(config, catalogue)
        todo = [o for o in names if o not in pg.cbm_store_obsids(config)]
        rng = np.random.default_rng(0)
        timings, started = [], time.perf_counter()
        for obsid in todo[: args.incremental_scenes]:  # scene by scene, indexes live: what extraction does
            signatures = scene_signatures(obsid, args.parcels, bands, rng)
            t0 = time.perf_counter()
            pg.cbm_store_write(config, signatures, [obsid])
            timings.append((len(signatures.stats), time.perf_counter() - t0))
            print(
                f"{obsid}: {timings[-1][0] / timings[-1][1]:,.0f} stats rows/s (incremental)", file=sys.stderr
            )
        bulk = todo[args.incremental_scenes :]
        budget = max(0.0, args.time_limit - (time.perf_counter() - started))
        per_scene = max(t for _, t in timings) / 2 if timings else 1.0  # bulk is at least twice as fast
        fitting = bulk[: max(0, int(budget / per_scene))] if bulk else []
        generated, generating = [0], [0.0]

        def read(obsid: str) -> Signatures:
            t0 = time.perf_counter()
            signatures = scene_signatures(obsid, args.parcels, bands, rng)
            generating[0] += time.perf_counter() - t0
            generated[0] += len(signatures.stats)
            print(f"{obsid}: generated", file=sys.stderr)
            return signatures

        t0 = time.perf_counter()
        if fitting:
            pg.bulk_load(config, fitting, read)
        bulk_seconds = time.perf_counter() - t0
        total = pg._fetch(config, pg.sql.SQL("SELECT count(*) FROM bench_sig"), ())[0][0]
        rates = [rows / seconds for rows, seconds in timings]
        report = {
            "benchmark": "postgis bulk load through binary COPY",
            "parcels": args.parcels,
            "bands": len(bands),
            "signature_rows_in_store": int(total),
            "incremental_scenes": len(timings),
            "incremental_stats_rows_per_s": round(statistics.median(rates)) if rates else None,
            "bulk_scenes": len(fitting),
            "bulk_scenes_skipped_by_time_limit": len(bulk) - len(fitting),
            "bulk_stats_rows": generated[0],
            "bulk_seconds_total_including_index_rebuild": round(bulk_seconds, 1),
            "bulk_seconds_generating_test_data": round(
                generating[0], 1
            ),  # overlapped with COPY: not subtracted
            "bulk_stats_rows_per_s_including_generation": round(generated[0] / bulk_seconds)
            if fitting
            else None,
            "target_rows_per_s": 500_000,
            "machine_cpus": os.cpu_count(),
        }
        print(json.dumps(report, indent=2))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
