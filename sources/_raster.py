"""Windowed raster reads shared by the file-based sources (local paths, /vsis3/, http)."""

from __future__ import annotations

import math

import rasterio
import rasterio.errors
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from cbm_core.errors import InputError
from cbm_core.model import BandRef, RasterWindow


def read_window(band: BandRef, bounds: tuple[float, float, float, float], crs: str) -> RasterWindow:
    """Read the pixels of `band` that cover `bounds` (given in `crs`) on the file's own grid.

    The window is snapped outwards to whole pixels and clipped to the raster, so the result
    may be empty (0 rows or columns) when the bounds miss the raster.
    """
    try:
        with rasterio.open(band.uri) as dataset:
            if dataset.crs is None:
                raise InputError(f"{band.uri}: the raster has no CRS")
            file_crs = dataset.crs.to_string()
            if rasterio.crs.CRS.from_user_input(crs) != dataset.crs:
                bounds = transform_bounds(crs, dataset.crs, *bounds, densify_pts=21)
            window = _snapped_window(dataset, bounds)
            array = dataset.read(1, window=window)
            transform = dataset.window_transform(window)
            nodata = band.nodata if band.nodata is not None else dataset.nodata
            scale = band.scale if band.scale is not None else (dataset.scales[0] or 1.0)
            offset = band.offset if band.offset is not None else (dataset.offsets[0] or 0.0)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"{band.uri}: not a readable raster ({exc})") from None
    return RasterWindow(array, transform, file_crs, nodata, float(scale), float(offset))


def raster_footprint(uri: str) -> tuple[tuple[float, float, float, float], str]:
    """The bounds and CRS of a raster file, read from its header only."""
    try:
        with rasterio.open(uri) as dataset:
            return tuple(dataset.bounds), (dataset.crs.to_string() if dataset.crs else "")
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"{uri}: not a readable raster ({exc})") from None


def _snapped_window(dataset: rasterio.io.DatasetReader, bounds: tuple[float, float, float, float]) -> Window:
    raw = from_bounds(*bounds, transform=dataset.transform)
    col0 = max(0, math.floor(raw.col_off + 1e-9))
    row0 = max(0, math.floor(raw.row_off + 1e-9))
    col1 = min(dataset.width, math.ceil(raw.col_off + raw.width - 1e-9))
    row1 = min(dataset.height, math.ceil(raw.row_off + raw.height - 1e-9))
    return Window(col0, row0, max(0, col1 - col0), max(0, row1 - row0))
