"""Daily weather (AgERA5 / ERA5: tmin, tmean, tmax in °C, precipitation in mm) at a point, from a
CSV of grid cells or a gridded netCDF, for the REST API's weatherTimeSeries and `cbm plot`.

Options::

    path = "agera5.csv"   # or a CF netCDF (.nc) with variables on (time, lat, lon)
    cell_size = 0.1       # degrees: a point belongs to the cell whose centre is within half of it
    cells = { "00002806639B424A" = [3.0, 50.8] }   # CSV without lon/lat: cell id column -> centre
    cell_column = "sample"                          # the CSV column the cells table keys on

CSV columns: lon, lat (or a cell id with ``cells``), date, and the variables under our names
(tmin, tmean, tmax, prec) or AgERA5-export names (tmin_c, tmean_c, tmax_c, precipitation_mm).
netCDF variables: tmin, tmean, tmax, prec (or those same alternatives); fill values are no data.
A point outside every cell has no weather (an empty table), never a neighbour's.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio

from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError, InputError

CBM_OPTIONS = frozenset({"path", "cell_size", "cells", "cell_column"})
VARIABLES = ("tmin", "tmean", "tmax", "prec")
ALIASES = {
    "tmin": ("tmin", "tmin_c", "temperature_min"),
    "tmean": ("tmean", "tmean_c", "temperature_mean"),
    "tmax": ("tmax", "tmax_c", "temperature_max"),
    "prec": ("prec", "precipitation_mm", "precipitation"),
}
COLUMNS = ("meteo_date", *VARIABLES)
DEFAULT_CELL_SIZE = 0.1  # degrees: the AgERA5 grid
EPOCH_DAY = pd.Timestamp("1970-01-01")
_CACHE: dict[tuple[str, int], Any] = {}
_LOCK = threading.Lock()


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object" if c == "meteo_date" else "float64") for c in COLUMNS})


def _alias(names: Any, variable: str, where: str) -> str:
    for name in ALIASES[variable]:
        if name in names:
            return name
    raise InputError(f"{where}: no column/variable for {variable} (one of {', '.join(ALIASES[variable])})")


def _read_csv(config: PluginConfig, path: Path) -> pd.DataFrame:
    """Cells table: lon, lat, date, tmin, tmean, tmax, prec."""
    frame = pd.read_csv(path)
    if "date" not in frame.columns:
        raise InputError(f"{path}: missing column date")
    if not {"lon", "lat"} <= set(frame.columns):
        cells = config.get("cells")
        column = str(config.get("cell_column", "sample"))
        if not isinstance(cells, dict) or column not in frame.columns:
            raise ConfigError(
                f"{config.where}: {path} has no lon/lat columns: give cells = {{id = [lon, lat]}}"
            )
        centres = {str(k): v for k, v in cells.items()}
        frame = frame[frame[column].astype(str).isin(centres)]
        frame = frame.assign(
            lon=[float(centres[str(c)][0]) for c in frame[column]],
            lat=[float(centres[str(c)][1]) for c in frame[column]],
        )
    out = pd.DataFrame({"lon": frame["lon"].astype(float), "lat": frame["lat"].astype(float),
                        "date": pd.to_datetime(frame["date"]).dt.date})  # fmt: skip
    for variable in VARIABLES:
        out[variable] = pd.to_numeric(frame[_alias(frame.columns, variable, str(path))], errors="coerce")
    return out


def _read_netcdf(path: Path) -> dict[str, Any]:
    """Grids of the four variables (time x rows x cols), the days, and the cell-centre lon/lat."""
    grids = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # the container has no grid
        with rasterio.open(path) as container:
            names = [s.rsplit(":", 1)[-1] for s in container.subdatasets]
    for variable in VARIABLES:
        name = _alias(names, variable, str(path))
        with rasterio.open(f"netcdf:{path}:{name}") as grid:
            values = grid.read().astype(np.float64)
            if grid.nodata is not None:
                values[values == grid.nodata] = np.nan
            days = [int(float(grid.tags(b)["NETCDF_DIM_time"])) for b in range(1, grid.count + 1)]
            transform, shape = grid.transform, (grid.height, grid.width)
        grids[variable] = values
    lon = transform.c + transform.a * (np.arange(shape[1]) + 0.5)
    lat = transform.f + transform.e * (np.arange(shape[0]) + 0.5)
    dates = [(EPOCH_DAY + pd.Timedelta(days=d)).date() for d in days]
    return {"grids": grids, "dates": dates, "lon": lon, "lat": lat}


def _data(config: PluginConfig) -> Any:
    path = config.path("path")
    if not path.is_file():
        raise InputError(f"{config.where}: meteo file not found: {path}")
    key = (str(path), path.stat().st_mtime_ns)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = (
                _read_netcdf(path) if path.suffix.lower() in (".nc", ".nc4") else _read_csv(config, path)
            )
        return _CACHE[key]


@impl
def cbm_source_weather(
    config: PluginConfig, point: tuple[float, float], dates: tuple[Any, Any]
) -> pd.DataFrame:
    data = _data(config)
    half = float(config.get("cell_size", DEFAULT_CELL_SIZE)) / 2
    lon, lat = point
    first, last = (pd.Timestamp(d).date() for d in dates)
    if isinstance(data, pd.DataFrame):
        near = data[((data["lon"] - lon).abs() <= half) & ((data["lat"] - lat).abs() <= half)]
        if near.empty:
            return _empty()
        centre = near.iloc[((near["lon"] - lon) ** 2 + (near["lat"] - lat) ** 2).argmin()]
        rows = near[(near["lon"] == centre["lon"]) & (near["lat"] == centre["lat"])]
        rows = rows[(rows["date"] >= first) & (rows["date"] <= last)].sort_values("date")
        out = rows[list(VARIABLES)].reset_index(drop=True)
        out.insert(0, "meteo_date", [d.isoformat() for d in rows["date"]])
        return out
    col, row = np.abs(data["lon"] - lon).argmin(), np.abs(data["lat"] - lat).argmin()
    if abs(data["lon"][col] - lon) > half or abs(data["lat"][row] - lat) > half:
        return _empty()
    keep = [i for i, d in enumerate(data["dates"]) if first <= d <= last]
    out = pd.DataFrame({"meteo_date": [data["dates"][i].isoformat() for i in keep]})
    for variable in VARIABLES:
        out[variable] = data["grids"][variable][keep, row, col]
    if out[list(VARIABLES)].isna().all(axis=None):
        return _empty()  # a cell of the grid without data: no weather here
    return out
