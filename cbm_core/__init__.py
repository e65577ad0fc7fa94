"""cbm-engine core: hook specifications, plugin manager, data model, pipeline, CLI and API.

Plugin authors need `impl` (the hook implementation marker) and the model classes; analysts
use the functions re-exported here (see cbm_core.api). Plots, chips and reports come with the
analyst plugin (`from cbm_plugins import analyst`).
"""

from cbm_core.hookspecs import impl
from cbm_core.model import (
    BandRef,
    Event,
    Light,
    MarkerResult,
    RasterWindow,
    Scene,
    Signatures,
    Status,
    TimeSeries,
    Verdict,
)

__all__ = [
    "BandRef",
    "Engine",
    "Event",
    "Light",
    "MarkerResult",
    "PluginConfig",
    "RasterWindow",
    "Scene",
    "Scheme",
    "Signatures",
    "Status",
    "TimeSeries",
    "Verdict",
    "decide",
    "extract",
    "impl",
    "read_catalogue",
    "read_parcels",
    "run",
    "run_markers",
    "time_series",
]


_API = {"decide", "extract", "read_catalogue", "read_parcels", "run", "run_markers", "time_series"}


def __getattr__(name: str):
    """Load the engine and the analyst API on first use, so plugins importing `impl` stay light."""
    if name in _API:
        from cbm_core import api

        return getattr(api, name)
    if name == "Engine":
        from cbm_core.pipeline import Engine

        return Engine
    if name in ("PluginConfig", "Scheme"):
        from cbm_core import config

        return getattr(config, name)
    raise AttributeError(f"module 'cbm_core' has no attribute {name!r}")
