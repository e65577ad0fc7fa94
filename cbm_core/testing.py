"""pytest fixtures for plugin authors (loaded automatically when cbm-engine is installed).

    def test_my_marker(cbm_plugin_manager, cbm_realistic_series):
        cbm_plugin_manager.register(my_marker_module, name="my_marker")
        engine = Engine(plugins=cbm_plugin_manager, progress=False)
        ...

`cbm_plugin_manager` loads the built-in plugins only: entry-point discovery is blocked, so a
test sees exactly the plugins it registers, whatever else is installed on the machine.

`cbm_sample_series` is the easy case (every observation clear, square parcels). The hard paths a
marker must survive are in `cbm_realistic_series`: cloudy and partly cloudy dates whose
reflectances look like a crop failure, cloud shadow and snow, a month without acquisitions, a
parcel no clear observation ever sees, a parcel too small to hold a pixel, and parcels of several
shapes (a strip, an L, one with a hole, two parts, a repaired bow-tie). Each parcel's `scenario`
column says what a sound marker should conclude (REALISTIC_SCENARIOS).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from cbm_core.model import HIST_COLUMNS, STATS, TimeSeries, clear_fraction, validate_parcels
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


# Realistic series ---------------------------------------------------------------------------------

REALISTIC_SCENARIOS = {
    1: ("square", "mown"),  # a cut on 15 June, clear before and after
    2: ("strip", "not mown"),  # 10 m x 400 m: few pixels, still clear
    3: ("L-shape", "mown"),  # the cut is followed by a cloudy week and the July gap
    4: ("ring", "not mown"),  # a field with a hole (farmyard); its cloudy dates look like a cut
    5: ("two parts", "mown"),  # one parcel in two pieces
    6: ("bow-tie", "not mown"),  # an invalid outline, repaired (see the parcel's `issue`)
    7: ("square", "never clear"),  # every observation cloudy: a marker must say NOT_VALID
    8: ("tiny", "no pixels"),  # 5 m x 5 m: no pixel centre inside, count 0 and NaN statistics
}
_CLOUDY_DAYS = {10, 30, 55, 80, 130}  # days after 1 April fully under cloud (SCL 8/9)
_HAZY_DAYS = {20, 70, 95}  # partly cloudy: 30 % medium-probability cloud, 10 % shadow
_SNOW_DAYS = {0}  # late snow on the first acquisition
_GAP = range(100, 130)  # no acquisition from 10 July to 8 August (an orbit or ground-segment gap)


@pytest.fixture
def cbm_varied_parcels() -> gpd.GeoDataFrame:
    """Eight parcels of different shapes and sizes (REALISTIC_SCENARIOS), validated like a source's."""
    return varied_parcels()


@pytest.fixture
def cbm_realistic_series(cbm_varied_parcels: gpd.GeoDataFrame) -> TimeSeries:
    """A season of S2 observations of the varied parcels with clouds, shadow, snow and a gap."""
    return realistic_series(cbm_varied_parcels)


def varied_parcels() -> gpd.GeoDataFrame:
    """Parcels 1..8 of REALISTIC_SCENARIOS on a Sentinel-2 UTM grid (EPSG:32631), crop grassland."""
    x, y = 643300, 5676000
    ring = shapely.box(x + 600, y, x + 700, y + 100).difference(shapely.box(x + 630, y + 30, x + 670, y + 70))
    shapes = [
        shapely.box(x, y, x + 100, y + 100),
        shapely.box(x + 150, y, x + 160, y + 400),
        shapely.Polygon([(x + 200, y), (x + 300, y), (x + 300, y + 40), (x + 240, y + 40),
                         (x + 240, y + 140), (x + 200, y + 140)]),
        ring,
        shapely.MultiPolygon(
            [shapely.box(x + 800, y, x + 860, y + 60), shapely.box(x + 900, y, x + 960, y + 60)]
        ),
        shapely.Polygon([(x + 1000, y), (x + 1100, y + 100), (x + 1100, y), (x + 1000, y + 100)]),
        shapely.box(x + 1200, y, x + 1300, y + 100),
        shapely.box(x + 1402, y + 2, x + 1407, y + 7),
    ]  # fmt: skip
    pids = np.arange(1, len(shapes) + 1)
    parcels = gpd.GeoDataFrame(
        {"pid": pids, "crop_code": "6000", "crop_name": "grassland",
         "scenario": [REALISTIC_SCENARIOS[p][1] for p in pids],
         "shape": [REALISTIC_SCENARIOS[p][0] for p in pids]},
        geometry=shapes, crs="EPSG:32631",
    )  # fmt: skip
    return validate_parcels(parcels, "cbm_core.testing.varied_parcels")


def realistic_series(
    parcels: gpd.GeoDataFrame, cut: datetime = datetime(2023, 6, 15, tzinfo=UTC), seed: int = 19
) -> TimeSeries:
    """S2 observations every 5 days, April to September, with the hard cases of REALISTIC_SCENARIOS.

    Clear NDVI is 0.8 with noise of 0.02; a cut drops it by 0.45, regrown over 25 days. Under
    cloud, red and NIR are both bright (NDVI near 0.05); partly cloudy dates mix 40 % of that in.
    The SCL histograms say which is which, as they would from a real scene. Deterministic.
    """
    rng = np.random.default_rng(seed)
    start = datetime(2023, 4, 1, tzinfo=UTC)
    days = [d for d in range(0, 183, 5) if d not in _GAP]
    stats_rows, scl_rows = [], []
    areas = dict(zip(parcels["pid"], parcels.geometry.area, strict=True))
    scenarios = dict(zip(parcels["pid"], parcels.get("scenario", ["mown"] * len(parcels)), strict=True))
    for pid in parcels["pid"].to_numpy():
        pixels = int(areas[pid] // 100)  # 10 m pixels
        scenario = scenarios[pid]
        for day in days:
            when = start + timedelta(days=day)
            obsid = f"S2B_MSIL2A_{when:%Y%m%d}_T31UFS"
            since = (when - cut).days
            ndvi = 0.8 + rng.normal(0, 0.02)
            if scenario == "mown" and 0 <= since < 25:
                ndvi -= 0.45 * (1 - since / 25)
            hist = np.zeros(12, np.int64)
            cloudy = day in _CLOUDY_DAYS or scenario == "never clear"
            if cloudy:
                hist[9], hist[8] = pixels * 7 // 10, pixels - pixels * 7 // 10
                ndvi = 0.05
            elif day in _HAZY_DAYS:
                hist[8], hist[3] = pixels * 3 // 10, pixels // 10
                hist[4] = pixels - hist[8] - hist[3]
                ndvi = 0.6 * ndvi + 0.4 * 0.05
            elif day in _SNOW_DAYS:
                hist[11] = pixels
                ndvi = -0.1
            else:
                hist[4] = pixels
            red = 0.35 if cloudy else 0.05
            nir = red * (1 + ndvi) / (1 - ndvi)
            for band, value in (("B04", red), ("B08", nir)):
                stats_rows.append(_stats_row(int(pid), obsid, band, pixels, value, when))
            counts = dict(zip(HIST_COLUMNS, hist.tolist(), strict=True))
            scl_rows.append({"pid": int(pid), "obsid": obsid, **counts, "obstime": pd.Timestamp(when)})
    stats = pd.DataFrame(stats_rows).astype(
        {"count": "int64", **{s: "float64" for s in STATS if s != "count"}}
    )
    scl = pd.DataFrame(scl_rows)
    scl = scl.assign(clear_fraction=clear_fraction(scl))
    return TimeSeries(stats, scl, parcels.sort_values("pid", ignore_index=True))


def _stats_row(pid: int, obsid: str, band: str, pixels: int, value: float, when: datetime) -> dict:
    """A signature row; a parcel without pixels has count 0 and NaN statistics, as extractors give."""
    spread = (0.01, 0.02) if pixels else (np.nan, np.nan)
    value = value if pixels else np.nan
    return {"pid": pid, "obsid": obsid, "band": band, "count": pixels, "mean": value, "std": spread[0],
            "min": value - spread[1], "max": value + spread[1], "p25": value - spread[0], "p50": value,
            "p75": value + spread[0], "obstime": pd.Timestamp(when), "card": "s2", "orbit": None}  # fmt: skip
