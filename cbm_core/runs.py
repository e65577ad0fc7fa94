"""The one place that decides how a run runs: in this process, or as work units on dask.

Both strategies drive the engine through its public methods and write the same outputs
(cbm_core.outputs), so a run's files do not depend on where it ran.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import pandas as pd

from cbm_core.config import ClusterConfig, RunConfig, Scheme
from cbm_core.distributed import run_distributed
from cbm_core.locks import folder_lock, folder_locks
from cbm_core.model import TimeSeries, time_series
from cbm_core.outputs import RunResult, run_summary, write_outputs

if TYPE_CHECKING:
    from cbm_core.pipeline import Engine


def run(
    engine: Engine, config: RunConfig, force: bool = False, cluster: Any = None, wait: bool = False
) -> RunResult:
    """Run a configuration: on dask when cluster (a ClusterConfig or a dask Client; default the
    config's [cluster] table) asks for it, else in this process.

    The run holds the lock of its output folder and of a folder store (cbm_core.locks): a second
    run on them is refused naming the holder, or with wait queues behind it.
    """
    cluster = config.cluster if cluster is None else cluster
    scheme = engine.run_scheme(config)
    engine.check(config, scheme)  # a mistake in the configuration is refused before any folder is made
    with folder_locks(run_folders(config), wait=wait):
        if not isinstance(cluster, ClusterConfig) or cluster.enabled:
            return run_distributed(engine, config, cluster, force)
        return run_local(engine, config, force)


def run_folders(config: RunConfig) -> list[tuple[Path, str]]:
    """The folders a run writes: its output folder, and its store's folder when the store keeps
    signatures in one (a `path` option, as the Parquet store)."""
    folders = [(config.out_dir, "output folder")]
    if config.store.get("path") is not None:
        folders.append((config.store.path("path"), "signature store"))
    return folders


def run_local(engine: Engine, config: RunConfig, force: bool = False) -> RunResult:
    """Extract what is missing, score every parcel, decide, and write the outputs, in this process."""
    started = time.perf_counter()
    scheme = engine.run_scheme(config)
    engine.check(config, scheme)
    parcels = engine.parcels(config.source)
    catalogue = engine.catalogue(config.source)
    engine.check_bands(catalogue, config.extract)
    _, report = engine.extract(parcels, catalogue, config.extract, config.source, config.store, force=force)
    stored = engine.read_store(config.store, pids=None)
    series = time_series(stored, catalogue, parcels)
    results = engine.run_markers(series, scheme)
    verdicts = engine.decide(results, parcels, scheme)
    summary = run_summary(
        config, scheme, parcels, catalogue, report, results, verdicts, started, engine.plugins
    )
    write_outputs(config.out_dir, verdicts, results, summary)
    return RunResult(parcels, catalogue, series, results, verdicts, summary)


def score(
    engine: Engine,
    series: TimeSeries,
    scheme: Scheme,
    out_dir: Path | None = None,
    origin: str = "",
    wait: bool = False,
) -> tuple[pd.DataFrame, gpd.GeoDataFrame]:
    """`cbm score`: a scheme's markers and rule over ready-made signatures, no extraction.

    Returns (marker results, verdicts); with ``out_dir`` also writes the outputs of `cbm run`,
    holding the folder's lock as a run does.
    """
    bands: dict[str, set[str]] = {}  # a marker needing a band the signatures lack is refused now
    pairs = series.stats[["card", "band"]].drop_duplicates() if len(series.stats) else None
    for card, band in pairs.itertuples(index=False) if pairs is not None else []:
        bands.setdefault(str(card), set()).add(str(band))
    scheme = replace(scheme, skipped=engine.missing_bands(scheme, bands, f"the signatures {origin}".strip()))
    if out_dir is None:
        return _score(engine, series, scheme, None, origin)
    with folder_lock(Path(out_dir), wait=wait):
        return _score(engine, series, scheme, Path(out_dir), origin)


def _score(
    engine: Engine, series: TimeSeries, scheme: Scheme, out_dir: Path | None, origin: str
) -> tuple[pd.DataFrame, gpd.GeoDataFrame]:
    started = time.perf_counter()
    bands: dict[str, set[str]] = {}
    pairs = series.stats[["card", "band"]].drop_duplicates() if len(series.stats) else []
    for card, band in pairs.itertuples(index=False) if len(pairs) else []:
        bands.setdefault(str(card), set()).add(str(band))
    scheme = replace(scheme, skipped=engine.missing_bands(scheme, bands, f"the signatures {origin}".strip()))
    results = engine.run_markers(series, scheme)
    verdicts = engine.decide(results, series.parcels, scheme)
    if out_dir is not None:
        status = results.groupby(["marker", "status"]).size()
        summary = {
            "signatures": origin or "TimeSeries",
            "scheme": scheme.marker_names,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 3),
            "parcels": len(series.parcels),
            "markers": {
                m: {s: int(n) for (mm, s), n in status.items() if mm == m} for m in scheme.marker_names
            },
            "verdicts": verdicts["light"].value_counts().to_dict(),
        }
        write_outputs(Path(out_dir), verdicts, results, summary)
    return results, verdicts
