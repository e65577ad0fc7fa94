"""cbm-engine core: hook specifications, plugin manager, data model, pipeline, CLI and API.

Plugin authors need `impl` (the hook implementation marker) and the model classes; analysts
use the functions re-exported here (see cbm_core.api).
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
    "Event",
    "Light",
    "MarkerResult",
    "RasterWindow",
    "Scene",
    "Signatures",
    "Status",
    "TimeSeries",
    "Verdict",
    "calendar",
    "decide",
    "extract",
    "flagged_pids",
    "impl",
    "open_run",
    "plot_parcel",
    "plot_peers",
    "read_catalogue",
    "read_chips",
    "read_parcels",
    "run",
    "run_markers",
    "time_series",
    "write_chips",
    "write_report",
]


def __getattr__(name: str):
    """Load the analyst API on first use, so plugins importing `impl` stay light."""
    from cbm_core.api import ANALYST

    if name in {
        "decide",
        "extract",
        "read_catalogue",
        "read_parcels",
        "run_markers",
        "time_series",
        *ANALYST,
    }:
        from cbm_core import api

        return getattr(api, name)
    if name == "run":
        from cbm_core.pipeline import run

        return run
    raise AttributeError(f"module 'cbm_core' has no attribute {name!r}")
