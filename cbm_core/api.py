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

from cbm_core.config import PluginConfig, Scheme
from cbm_core.model import Signatures, TimeSeries
from cbm_core.pipeline import Engine, time_series

# Analyst front doors, imported on first use (they pull in matplotlib): name -> module.
ANALYST = {
    "open_run": "cbm_core.plots",
    "plot_parcel": "cbm_core.plots",
    "plot_peers": "cbm_core.plots",
    "read_chips": "cbm_core.chips",
    "calendar": "cbm_core.chips",
    "write_chips": "cbm_core.chips",
    "write_report": "cbm_core.report",
    "flagged_pids": "cbm_core.report",
}

__all__ = [
    "decide",
    "engine",
    "extract",
    "read_catalogue",
    "read_parcels",
    "run_markers",
    "time_series",
    *ANALYST,
]

PathLike = str | os.PathLike[str]


@cache
def engine() -> Engine:
    """The process-wide engine with every installed plugin loaded (once)."""
    return Engine()


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


def _source(plugin: str, options: dict[str, Any]) -> PluginConfig:
    return PluginConfig(plugin=plugin, options=options, base_dir=Path.cwd(), where="source")


def _scheme(scheme: str | PathLike | Scheme) -> Scheme:
    return scheme if isinstance(scheme, Scheme) else engine().scheme(str(scheme), Path.cwd())


def __getattr__(name: str) -> Any:
    """Plots, chips and reports load on first use (see ANALYST)."""
    if name in ANALYST:
        import importlib

        return getattr(importlib.import_module(ANALYST[name]), name)
    raise AttributeError(f"module 'cbm_core.api' has no attribute {name!r}")
