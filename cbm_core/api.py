"""The Python API for analysts: the CLI's steps as functions on pandas/geopandas objects.

parcels = cbm.read_parcels("parcels.gpkg")
catalogue = cbm.read_catalogue("scenes.csv")
signatures = cbm.extract(parcels, catalogue, bands={"s2": ["B04", "B08", "SCL"]})
series = cbm.time_series(signatures, catalogue, parcels)
results = cbm.run_markers(series, "ndvi-drop")
verdicts = cbm.decide(results, parcels, "ndvi-drop")
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd

from cbm_core import runs
from cbm_core.config import PluginConfig, Scheme, load_run_config
from cbm_core.model import Signatures, TimeSeries, time_series
from cbm_core.outputs import RunResult
from cbm_core.pipeline import Engine

__all__ = [
    "decide",
    "engine",
    "extract",
    "read_catalogue",
    "read_parcels",
    "run",
    "run_markers",
    "time_series",
]

PathLike = str | os.PathLike[str]


@cache
def engine() -> Engine:
    """The process-wide engine with every installed plugin loaded (once)."""
    return Engine()


def run(
    config_path: PathLike, force: bool = False, progress: bool | None = None, wait: bool = False
) -> RunResult:
    """Run a configuration file end to end (the Python twin of `cbm run`).

    Parameters
    ----------
    config_path: the run configuration (TOML), as `cbm run` takes it.
    force: extract every scene again, even those already stored.
    progress: progress bars (None: on terminals only).
    wait: if another run holds the output folder, wait for it (default: refuse, naming it).

    Returns
    -------
    RunResult with parcels, catalogue, series, marker results, verdicts and the summary.

    Examples
    --------
    >>> result = run("demo/flanders.toml")  # doctest: +SKIP
    >>> result.verdicts["light"].value_counts()  # doctest: +SKIP
    """
    return Engine(progress=progress).run(load_run_config(Path(config_path)), force=force, wait=wait)


def read_parcels(path: PathLike, *, source: str = "local", **options: Any) -> gpd.GeoDataFrame:
    """Declared parcels from a file (options as in a config's [source] table, e.g. pid_column)."""
    return engine().parcels(_source(source, {"parcels": str(path), **options}))


def read_catalogue(path: PathLike, *, source: str = "local", **options: Any) -> gpd.GeoDataFrame:
    """The scene catalogue (one row per scene) from a catalogue file."""
    return engine().catalogue(_source(source, {"scenes": str(path), **options}))


def extract(
    parcels: gpd.GeoDataFrame,
    catalogue: gpd.GeoDataFrame,
    bands: Mapping[str, Sequence[str]],
    *,
    extractor: str | Mapping[str, str] = "zonal",
    source: str = "local",
    **options: Any,
) -> Signatures:
    """Signatures of the given bands per card (e.g. {"s2": ["B04", "B08", "SCL"], "bs": ["VV"]})."""
    jobs = [
        PluginConfig(
            plugin=extractor if isinstance(extractor, str) else extractor[card],
            options={"card": card, "bands": list(names), **options},
            where=f"extract({card})",
        )
        for card, names in bands.items()
    ]
    signatures, report = engine().extract(parcels, catalogue, jobs, _source(source, {}))
    if report.failed:
        obsid, reason = next(iter(report.failed.items()))
        warnings.warn(f"{len(report.failed)} scene(s) failed, first {obsid}: {reason}", stacklevel=2)
    return signatures


def run_markers(series: TimeSeries, scheme: str | PathLike | Scheme) -> pd.DataFrame:
    """Marker results (one row per marker and parcel) of a scheme's markers."""
    return engine().run_markers(series, _scheme(scheme))


def decide(
    results: pd.DataFrame, parcels: gpd.GeoDataFrame, scheme: str | PathLike | Scheme
) -> gpd.GeoDataFrame:
    """Verdicts (GeoDataFrame with light and reasons) from marker results under a scheme's rule."""
    return engine().decide(results, parcels, _scheme(scheme))


def read_signatures(
    path: PathLike,
    parcels: PathLike | None = None,
    *,
    scale: str | float = "reflectance",
    offset: float = 0.0,
    source: str = "table",
) -> TimeSeries:
    """Ready-made signatures (a tidy Parquet/CSV table, as `cbm score` reads) as a TimeSeries.

    Parameters
    ----------
    path: the table (pid, obstime, card, band, count, mean, std, min, max, p25, p50, p75, optional
        obsid, orbit, hist_0..hist_11).
    parcels: the declared parcels; default the table's pids, undeclared.
    scale, offset: Sentinel-2 reflectance = value * scale + offset ('reflectance', 'dn' or a factor).
    source: the source plugin reading it.

    Examples
    --------
    >>> series = read_signatures("signatures.csv", scale="dn", offset=-0.1)  # doctest: +SKIP
    """
    options: dict[str, Any] = {"signatures": str(path), "scale": scale, "offset": offset}
    if parcels is not None:
        options["parcels"] = str(parcels)
    return engine().signatures(_source(source, options))


def score(
    signatures: TimeSeries | PathLike,
    scheme: str | PathLike | Scheme,
    out_dir: PathLike | None = None,
    **read: Any,
) -> tuple[pd.DataFrame, gpd.GeoDataFrame]:
    """A scheme over ready-made signatures (the Python twin of `cbm score`).

    Parameters
    ----------
    signatures: a TimeSeries, or a table path read with read_signatures(path, **read).
    scheme: a recipe name, a scheme TOML path or a Scheme.
    out_dir: if given, the outputs of `cbm run` are written there.

    Returns
    -------
    (marker results, verdicts).
    """
    series = signatures if isinstance(signatures, TimeSeries) else read_signatures(signatures, **read)
    origin = "TimeSeries" if isinstance(signatures, TimeSeries) else str(signatures)
    return runs.score(engine(), series, _scheme(scheme), None if out_dir is None else Path(out_dir), origin)


def _source(plugin: str, options: dict[str, Any]) -> PluginConfig:
    return PluginConfig(plugin=plugin, options=options, base_dir=Path.cwd(), where="source")


def _scheme(scheme: str | PathLike | Scheme) -> Scheme:
    return scheme if isinstance(scheme, Scheme) else engine().scheme(str(scheme), Path.cwd())
