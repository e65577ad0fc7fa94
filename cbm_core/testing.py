"""pytest fixtures for plugin authors (loaded automatically when cbm-engine is installed).

    def test_my_marker(cbm_plugin_manager, cbm_sample_series):
        cbm_plugin_manager.register(my_marker_module, name="my_marker")
        engine = Engine(plugins=cbm_plugin_manager, progress=False)
        ...

`cbm_plugin_manager` loads the built-in plugins only: entry-point discovery is blocked, so a
test sees exactly the plugins it registers, whatever else is installed on the machine.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from cbm_core.model import HIST_COLUMNS, STATS, TimeSeries
from cbm_core.plugins import PluginManager, load_plugins


@pytest.fixture
def cbm_plugin_manager() -> PluginManager:
    """Built-in plugins only; register the plugin under test on it."""
    return load_plugins(entry_points=False)


@pytest.fixture
def cbm_sample_parcels() -> gpd.GeoDataFrame:
    """Six 100 m x 100 m grassland parcels on a Sentinel-2 UTM grid (EPSG:32631)."""
    return sample_parcels()


@pytest.fixture
def cbm_sample_series(cbm_sample_parcels: gpd.GeoDataFrame) -> TimeSeries:
    """A season of S2 observations of the sample parcels; odd pids are mown on 15 June."""
    return sample_series(cbm_sample_parcels)


def sample_parcels(count: int = 6) -> gpd.GeoDataFrame:
    """`count` square parcels in a row, pids 1..count."""
    squares = [shapely.box(643300 + 120 * i, 5676000, 643400 + 120 * i, 5676100) for i in range(count)]
    return gpd.GeoDataFrame(
        {"pid": np.arange(1, count + 1), "crop_code": "6000", "crop_name": "grassland", "issue": ""},
        geometry=squares,
        crs="EPSG:32631",
    )


def sample_series(parcels: gpd.GeoDataFrame, cut: datetime = datetime(2023, 6, 15, tzinfo=UTC)) -> TimeSeries:
    """Clear S2 observations every 5 days, April to September; NDVI falls by 0.4 after a cut on
    odd pids and recovers over 25 days. Deterministic, so tests can assert exact events."""
    dates = [datetime(2023, 4, 1, tzinfo=UTC) + timedelta(days=5 * i) for i in range(36)]
    stats_rows, scl_rows = [], []
    for pid in parcels["pid"].to_numpy():
        for day in dates:
            obsid = f"S2_{day:%Y%m%d}"
            ndvi = 0.8
            since = (day - cut).days
            if pid % 2 == 1 and 0 <= since < 25:
                ndvi = 0.4 + 0.4 * since / 25
            red = 0.05
            nir = red * (1 + ndvi) / (1 - ndvi)
            for band, value in (("B04", red), ("B08", nir)):
                stats_rows.append(
                    {
                        "pid": int(pid),
                        "obsid": obsid,
                        "band": band,
                        "count": 100,
                        "mean": value,
                        "std": 0.01,
                        "min": value - 0.02,
                        "max": value + 0.02,
                        "p25": value - 0.01,
                        "p50": value,
                        "p75": value + 0.01,
                        "obstime": pd.Timestamp(day),
                        "card": "s2",
                        "orbit": None,
                    }
                )
            scl_rows.append(
                {
                    "pid": int(pid),
                    "obsid": obsid,
                    **dict.fromkeys(HIST_COLUMNS, 0),
                    "hist_4": 100,
                    "obstime": pd.Timestamp(day),
                }
            )
    stats = pd.DataFrame(stats_rows).astype(
        {"count": "int64", **{s: "float64" for s in STATS if s != "count"}}
    )
    return TimeSeries(stats, pd.DataFrame(scl_rows), parcels.sort_values("pid", ignore_index=True))
