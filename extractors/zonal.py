"""Reference zonal statistics: one parcel at a time, pixel centre in polygon, as rasterstats.

Simple and obviously correct rather than fast: it is the yardstick the fast extractors are
tested against, and a fallback for any sensor. Statistics are computed on the stored values and
converted to physical units afterwards (value * scale + offset).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from rasterio.features import geometry_mask
from rasterio.windows import from_bounds

from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.model import (
    HIST_COLUMNS,
    SCL_CLASSES,
    STATS,
    BandRef,
    RasterWindow,
    Scene,
    Signatures,
    empty_scl,
    empty_signatures,
)

CBM_OPTIONS: frozenset[str] = frozenset()  # the reference extractor has no options

CLASS_BANDS = {"SCL"}


@impl
def cbm_extractor_extract(
    scene: Scene,
    parcels: gpd.GeoDataFrame,
    bands: Sequence[str],
    read_window: Callable[[BandRef, tuple[float, float, float, float], str], RasterWindow],
    config: PluginConfig,
) -> Signatures:
    stats_rows: list[dict] = []
    scl_rows: list[dict] = []
    wanted = [b for b in bands if b in scene.bands]
    for band in wanted:
        crs = parcels.crs.to_string()
        window = read_window(scene.bands[band], tuple(parcels.total_bounds), crs)
        if window.array.size == 0:
            continue
        local = parcels if parcels.crs == window.crs else parcels.to_crs(window.crs)
        for pid, geom in zip(local["pid"].to_numpy(), local.geometry.values, strict=True):
            values = _parcel_values(window, geom)
            if values is None:
                continue
            if band in CLASS_BANDS:
                hist = np.bincount(values.astype(np.int64), minlength=SCL_CLASSES)[:SCL_CLASSES]
                scl_rows.append(
                    {
                        "pid": int(pid),
                        "obsid": scene.obsid,
                        **dict(zip(HIST_COLUMNS, hist.tolist(), strict=False)),
                    }
                )
            else:
                stats_rows.append(
                    {"pid": int(pid), "obsid": scene.obsid, "band": band, **_stats(values, window)}
                )
    stats = pd.DataFrame(stats_rows) if stats_rows else empty_signatures()
    scl = pd.DataFrame(scl_rows) if scl_rows else empty_scl()
    return Signatures(
        stats.astype(empty_signatures().dtypes.to_dict()), scl.astype(empty_scl().dtypes.to_dict())
    )


def _parcel_values(window: RasterWindow, geom: shapely.Geometry) -> np.ndarray | None:
    """Valid pixel values whose centre lies in the parcel; None if the parcel misses the window."""
    if geom is None or geom.is_empty:
        return None
    height, width = window.array.shape
    left, top = window.transform @ (0, 0)
    right, bottom = window.transform @ (width, height)
    minx, miny, maxx, maxy = geom.bounds
    if (
        maxx <= min(left, right)
        or minx >= max(left, right)
        or maxy <= min(top, bottom)
        or miny >= max(top, bottom)
    ):
        return None
    sub = from_bounds(minx, miny, maxx, maxy, transform=window.transform).round_offsets().round_lengths()
    row0, col0 = max(0, sub.row_off), max(0, sub.col_off)
    row1 = min(height, sub.row_off + sub.height + 1)
    col1 = min(width, sub.col_off + sub.width + 1)
    pixels = window.array[row0:row1, col0:col1]
    if pixels.size == 0:
        return np.empty(0, dtype=window.array.dtype)
    transform = window.transform @ window.transform.translation(col0, row0)
    inside = ~geometry_mask([geom], out_shape=pixels.shape, transform=transform, all_touched=False)
    values = pixels[inside]
    if window.nodata is not None and not np.isnan(window.nodata):
        values = values[values != window.nodata]
    if np.issubdtype(values.dtype, np.floating):
        values = values[~np.isnan(values)]
    return values


def _stats(values: np.ndarray, window: RasterWindow) -> dict[str, float]:
    if values.size == 0:
        return {"count": 0} | {s: np.nan for s in STATS if s != "count"}
    data = values.astype(np.float64)
    p25, p50, p75 = np.percentile(data, [25, 50, 75])
    raw = {
        "mean": data.mean(),
        "std": data.std(),
        "min": data.min(),
        "max": data.max(),
        "p25": p25,
        "p50": p50,
        "p75": p75,
    }
    scale, offset = window.scale, window.offset
    physical = {k: (v * abs(scale) if k == "std" else v * scale + offset) for k, v in raw.items()}
    if scale < 0:  # a negative scale swaps the order statistics
        physical["min"], physical["max"] = physical["max"], physical["min"]
        physical["p25"], physical["p75"] = physical["p75"], physical["p25"]
    return {"count": int(values.size), **physical}
