"""Hook specifications: the whole contract between the core and its plugins.

Naming convention: ``cbm_<family>_<action>``. The family (source, extractor, store, marker,
rule, cli) is what ``cbm plugins`` reports as a plugin's kind. Operation hooks are
``firstresult``: the pipeline calls the one plugin a configuration names, never all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    import geopandas as gpd
    import pandas as pd

    from cbm_core.config import PluginConfig
    from cbm_core.model import BandRef, MarkerResult, RasterWindow, Scene, Signatures, TimeSeries, Verdict

PROJECT = "cbm"
hookspec = pluggy.HookspecMarker(PROJECT)
impl = pluggy.HookimplMarker(PROJECT)

# Every hook argument, explained once. docs/plugins.md's hook table is generated from these and
# the hooks' docstrings; a test fails when a hook argument is missing here.
ARGUMENTS: dict[str, str] = {
    "config": "the plugin's table of the run configuration ([source], [store], [[extract]]): a PluginConfig",
    "bbox": "(minx, miny, maxx, maxy) in EPSG:4326, or None for every parcel",
    "band": "the BandRef (file, scale, offset, nodata) of one band of a scene",
    "bounds": "(minx, miny, maxx, maxy) of the window to read, in crs",
    "crs": "the CRS of bounds, as an authority string (e.g. EPSG:32631)",
    "pids": "the parcel ids wanted, or None for all",
    "scene": "the Scene to reduce: obsid, time, sensor, card, bands, orbit",
    "parcels": "a GeoDataFrame of declared parcels (pid, crop_code, crop_name, geometry)",
    "bands": "band names to reduce (SCL gives a class histogram), or None for all",
    "read_window": "a function (band, bounds, crs) -> RasterWindow: the configured source's reader",
    "signatures": "per-parcel statistics and SCL histograms of complete scenes",
    "obsids": "scene ids, or None for all",
    "worker": "the id of the worker claiming or releasing scenes",
    "reason": "why the scenes are given back (recorded with the claim)",
    "scl": "False when the caller needs no SCL histograms (a cheaper read)",
    "series": "a TimeSeries of a batch of parcels, sorted by parcel and time",
    "params": "the marker's or rule's parameters from the scheme",
    "results": "the marker results table (one row per marker and parcel)",
    "cli": "the click group of the `cbm` command",
    "path": "a configuration file handed to `cbm doctor`",
    "data": "that file's TOML, parsed",
    "pixels": "the width and height, in pixels, of the image wanted",
    "point": "(lon, lat) in EPSG:4326",
    "dates": "(first, last) day wanted, both included (datetime.date)",
    "app": "the FastAPI application `cbm serve` runs: add routers (and static mounts) to it",
}

# Sources -------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cbm_source_parcels(
    config: PluginConfig, bbox: tuple[float, float, float, float] | None = None
) -> gpd.GeoDataFrame:
    """Return the parcels (pid, crop_code, crop_name, geometry); bbox (EPSG:4326): at least those it hits."""


@hookspec(firstresult=True)
def cbm_source_catalogue(config: PluginConfig) -> gpd.GeoDataFrame:
    """Return the scene catalogue: one row per scene with its band -> BandRef mapping."""


@hookspec(firstresult=True)
def cbm_source_read_window(
    config: PluginConfig, band: BandRef, bounds: tuple[float, float, float, float], crs: str
) -> RasterWindow:
    """Read the pixels of one band file covering bounds (in crs), on the file's own grid."""


@hookspec(firstresult=True)
def cbm_source_orthophoto(
    config: PluginConfig, bounds: tuple[float, float, float, float], crs: str, pixels: int
) -> RasterWindow:
    """Return an orthophoto of bounds: a RasterWindow whose array is RGB (3 x rows x cols, uint8)."""


@hookspec(firstresult=True)
def cbm_source_weather(
    config: PluginConfig, point: tuple[float, float], dates: tuple[Any, Any]
) -> pd.DataFrame:
    """Return daily weather at point: meteo_date, tmin, tmean, tmax, prec (empty where no data cell)."""


@hookspec(firstresult=True)
def cbm_source_signatures(config: PluginConfig, pids: Sequence[int] | None) -> TimeSeries:
    """Return ready-made signatures (from another backend) as a time series, all pids if None."""


# Extractors ----------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cbm_extractor_extract(
    scene: Scene,
    parcels: gpd.GeoDataFrame,
    bands: Sequence[str],
    read_window: Callable[[BandRef, tuple[float, float, float, float], str], RasterWindow],
    config: PluginConfig,
) -> Signatures:
    """Reduce the bands of one scene to per-parcel statistics (and the SCL class histogram)."""


# Signature stores ----------------------------------------------------------------------------


@hookspec(firstresult=True)
def cbm_store_write(config: PluginConfig, signatures: Signatures, obsids: Sequence[str]) -> int:
    """Store the complete signatures of these scenes, replacing any earlier rows; return rows."""


@hookspec(firstresult=True)
def cbm_store_read(
    config: PluginConfig,
    pids: Sequence[int] | None,
    obsids: Sequence[str] | None,
    bands: Sequence[str] | None,
    scl: bool = True,
) -> Signatures:
    """Read stored signatures by parcel, scene and band (None: all); scl=False: histograms not needed."""


@hookspec(firstresult=True)
def cbm_store_obsids(config: PluginConfig) -> set[str]:
    """Return the scenes whose signatures are completely stored, so re-runs skip them."""


@hookspec(firstresult=True)
def cbm_store_claim(config: PluginConfig, obsids: Sequence[str], worker: str) -> str | None:
    """Atomically claim one of obsids that no other worker holds, so parallel workers never share a scene."""


@hookspec(firstresult=True)
def cbm_store_release(config: PluginConfig, obsids: Sequence[str], worker: str, reason: str) -> int:
    """Give back scenes this worker claimed but did not store, so a re-run need not wait for the lease."""


# Markers -------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cbm_marker_requires(params: Mapping[str, Any]) -> Mapping[str, Sequence[str]]:
    """Name the bands a marker needs per card, e.g. {"s2": ["B04", "B08"]} ("B04|NDVI": either one)."""


@hookspec(firstresult=True)
def cbm_marker_run(series: TimeSeries, params: Mapping[str, Any]) -> list[MarkerResult]:
    """Detect a practice in the time series of a batch of parcels: one result per parcel."""


# Decision rules ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cbm_rule_decide(
    results: pd.DataFrame, parcels: gpd.GeoDataFrame, params: Mapping[str, Any]
) -> list[Verdict]:
    """Turn the marker results of each declared parcel into a green/yellow/red verdict."""


@hookspec
def cbm_rule_schemes() -> Mapping[str, Path]:
    """Name scheme recipes (TOML files of markers and rule) that configs may refer to by name."""


# Command line --------------------------------------------------------------------------------


@hookspec
def cbm_cli_commands(cli: click.Group) -> None:
    """Add commands to the ``cbm`` command line."""


@hookspec
def cbm_cli_doctor(path: Path, data: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """Check a configuration file of a kind this plugin reads: (ok|warn|fail, message) lines, else None."""


@hookspec
def cbm_web_routes(app: Any) -> None:
    """Add web pages or routes to the application ``cbm serve`` runs (after the REST API's)."""
