"""Windowed raster reads shared by the file-based sources (local paths, /vsis3/, /vsizip/, http).

When the calling extractor sets a read plan (cbm_core.model.READ_PLAN), only the internal blocks
(GeoTIFF/COG tiles, JPEG2000 code-stream tiles) that hold parcel pixels are decoded, row by row.
"""

from __future__ import annotations

import math

import numpy as np
import rasterio
import rasterio.errors
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from cbm_core.errors import InputError
from cbm_core.model import READ_PLAN, BandRef, RasterWindow, ReadPlan


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
            transform = dataset.window_transform(window)
            nodata = band.nodata if band.nodata is not None else dataset.nodata
            scale = float(band.scale if band.scale is not None else (dataset.scales[0] or 1.0))
            offset = float(band.offset if band.offset is not None else (dataset.offsets[0] or 0.0))
            plan = READ_PLAN.get()
            if plan is not None and window.width and window.height:
                frame = RasterWindow(
                    np.zeros((window.height, window.width), dataset.dtypes[0]),
                    transform, file_crs, nodata, scale, offset,
                )  # fmt: skip
                _planned_read(dataset, window, frame, plan)
                return frame
            array = dataset.read(1, window=window)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"{band.uri}: not a readable raster ({exc})") from None
    return RasterWindow(array, transform, file_crs, nodata, scale, offset)


MIN_STRIPE_ROWS = 64  # fewest rows decoded per call (a strip-organised TIFF has 1-16-row blocks)


def _planned_read(
    dataset: rasterio.io.DatasetReader, window: Window, frame: RasterWindow, plan: ReadPlan
) -> None:
    """Decode only the file's internal blocks that the plan says are covered, one row of blocks at a
    time (consecutive covered blocks in one call), telling the plan as each row is done.

    The array starts as zeros (np.zeros maps untouched pages lazily, so skipped blocks cost
    neither time nor memory). Each block is decoded at most once per call.
    """
    block_rows, block_cols = dataset.block_shapes[0]
    # Striped files have blocks of a few rows: group them so a row of blocks is worth a call.
    block_rows *= max(1, -(-MIN_STRIPE_ROWS // block_rows))
    row_edges = _edges(int(window.row_off), int(window.height), block_rows)
    col_edges = _edges(int(window.col_off), int(window.width), block_cols)
    covered = np.asarray(plan.covered(frame, row_edges, col_edges), dtype=bool)
    for i in range(len(row_edges) - 1):
        r0, r1 = int(row_edges[i]), int(row_edges[i + 1])
        columns = np.flatnonzero(covered[i])
        if len(columns):
            # runs of consecutive covered blocks: one GDAL call each
            breaks = np.flatnonzero(np.diff(columns) > 1)
            for first, last in zip(np.r_[0, breaks + 1], np.r_[breaks, len(columns) - 1], strict=True):
                c0, c1 = int(col_edges[columns[first]]), int(col_edges[columns[last] + 1])
                part = Window(window.col_off + c0, window.row_off + r0, c1 - c0, r1 - r0)
                dataset.read(1, window=part, out=frame.array[r0:r1, c0:c1])  # in place, no copy
        plan.rows_ready(r1)


def _edges(start: int, length: int, block: int) -> np.ndarray:
    """Block boundaries of the file inside [start, start + length), relative to start."""
    first = (start // block) * block
    inner = np.arange(first + block, start + length, block) - start
    return np.concatenate([[0], inner[inner > 0], [length]]).astype(np.int64)


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
