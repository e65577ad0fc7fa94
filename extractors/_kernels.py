"""Fast, exact per-parcel statistics: native rasterization to a cached pixel index + numba reductions.

Extracting a scene is two steps with very different lifetimes:

1. **Rasterize** the parcels onto the band's pixel grid. The result, a :class:`PixelIndex`, only
   depends on the parcels and the grid, and a Sentinel-2 tile repeats the same grid on every
   revisit, so it is computed once and cached in memory (LRU) and on disk (``.npz``).
2. **Reduce** each band over the index with one numba pass per band: count, mean, std (ddof=0),
   min, max and the 25/50/75 % percentiles with numpy's ``linear`` method.

Pixel rules (identical to ``rasterstats.zonal_stats`` / GDAL, which evaluate one parcel at a time):

* Default: a pixel belongs to a parcel when its centre is inside the polygon. Rings are filled
  with GDAL's scanline rule (even-odd over all rings, so holes are respected; a centre exactly on
  an edge follows GDAL's half-open convention).
* ``all_touched``: additionally every pixel whose area the polygon overlaps (positive area). GDAL's
  own all-touched mode also burns pixels merely grazed at a corner and snaps near-axis edges, so
  it can differ there; the positive-area rule is the one tested here.
* ``buffer`` (metres, in the raster CRS): applied with ``shapely.buffer`` before rasterizing; a
  negative buffer drops edge pixels mixed with the neighbouring field.
* **Overlapping parcels**: a pixel belongs to *every* parcel whose polygon contains its centre,
  exactly as per-parcel rasterstats does; parcels never compete for pixels.

The index stores, per parcel, runs of consecutive pixels on a row (CSR: ``offsets`` into
``run_start``/``run_length``, ``run_start`` a flat ``row * width + col`` pixel index). Runs are the
flat pixel indices compressed: a 5 ha field on a 10 m grid is ~25 runs instead of 500 indices,
which keeps the cache small and lets the kernels stream contiguous memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import math
import os
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import platformdirs
import rasterio.errors
import shapely
from affine import Affine
from numba import njit, prange
from pyproj import CRS, Transformer

from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError, InputError
from cbm_core.model import HIST_COLUMNS, READ_PLAN, SCL_CLASSES, STATS, BandRef, RasterWindow

log = logging.getLogger("cbm.extract")

CACHE_ENV = "CBM_CACHE_DIR"
CACHE_MAX_MB_ENV = "CBM_CACHE_MAX_MB"
# Disk the pixel-index cache may fill before the least recently used files go: a Sentinel-2 tile
# of 500 000 parcels takes ~220 MB at 10 m (bench/extract-tile.json), so ~20 tiles' worth.
DEFAULT_CACHE_MAX_MB = 5120.0
INDEX_FORMAT = 2  # bump when the PixelIndex layout or the rasterization rule changes
# Parcels per block. A Sentinel-2 tile holds at most ~1M parcels, so a tile is one block: each file
# block is decoded once (blocks of parcels overlap in rows, and a shared row was decoded twice).
# Memory stays bounded because only the file blocks under parcels are decoded (see Block.read).
DEFAULT_BLOCK_PARCELS = 1_000_000

# The options every fast extractor reads through extract_options (its CBM_OPTIONS include them).
EXTRACT_OPTIONS = frozenset({"all_touched", "buffer", "block_parcels", "cache_dir", "cache_max_mb"})

ReadWindow = Callable[[BandRef, tuple[float, float, float, float], str], RasterWindow]


# Grid and pixel index ------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a raster window: where each pixel is, in which CRS."""

    transform: Affine
    shape: tuple[int, int]  # rows, cols
    crs: str

    @classmethod
    def of(cls, window: RasterWindow) -> Grid:
        return cls(Affine(*tuple(window.transform)[:6]), tuple(window.array.shape[:2]), window.crs)

    @property
    def key(self) -> str:
        t = self.transform
        numbers = ",".join(repr(float(v)) for v in (t.a, t.b, t.c, t.d, t.e, t.f))
        return f"{numbers}|{self.shape[0]}x{self.shape[1]}|{self.crs}"

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        rows, cols = self.shape
        t = self.transform
        xs = [t.c + t.a * c + t.b * r for c in (0, cols) for r in (0, rows)]
        ys = [t.f + t.d * c + t.e * r for c in (0, cols) for r in (0, rows)]
        return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class RasterizeOptions:
    """How parcel polygons become pixels (part of the cache key)."""

    all_touched: bool = False
    buffer: float = 0.0  # metres in the raster CRS; negative shrinks

    @property
    def key(self) -> str:
        return f"touched={int(self.all_touched)}|buffer={float(self.buffer)!r}"


@dataclass(frozen=True)
class PixelIndex:
    """Which pixels of one grid belong to which parcel, as runs of consecutive pixels (CSR)."""

    grid: Grid
    pids: np.ndarray  # int64 (n,): parcels that intersect the grid, in row order of the index
    offsets: np.ndarray  # int64 (n + 1,): runs of parcel i are offsets[i]:offsets[i + 1]
    run_start: np.ndarray  # int64: flat pixel index (row * width + col) of each run's first pixel
    run_length: np.ndarray  # int32
    key: str
    # Per-index helpers computed on first use (block coverage, row-ordered stripes); not data.
    derived: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.pids)

    def pixel_counts(self) -> np.ndarray:
        """Pixels per parcel (before nodata is excluded)."""
        sums = np.concatenate([[0], np.cumsum(self.run_length, dtype=np.int64)])
        return sums[self.offsets[1:]] - sums[self.offsets[:-1]]

    def pixels(self, i: int) -> np.ndarray:
        """The flat pixel indices of the i-th parcel, ascending."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        parts = [
            np.arange(s, s + n) for s, n in zip(self.run_start[lo:hi], self.run_length[lo:hi], strict=True)
        ]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    @property
    def nbytes(self) -> int:
        return self.pids.nbytes + self.offsets.nbytes + self.run_start.nbytes + self.run_length.nbytes


# Native rasterization ------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _ifloor(v, lo, hi):
    # floor of v clamped to [lo, hi] first, so far-away coordinates cannot overflow an int.
    return math.floor(min(max(v, lo), hi))


@njit(cache=True, inline="always")
def _add_interval(row_iv, iv_a, iv_b, iv_fill, r, a, b, width, store):
    if a < 0:
        a = 0
    if b > width - 1:
        b = width - 1
    if a > b:
        return
    if store:
        k = row_iv[r] + iv_fill[r]
        iv_a[k] = a
        iv_b[k] = b
    iv_fill[r] += 1


@njit(cache=True)
def _walk_edges(
    xs,
    ys,
    c0,
    c1,
    ring_ends,
    row0,
    row1,
    width,
    all_touched,
    row_x,
    x_fill,
    xcuts,
    row_iv,
    iv_fill,
    iv_a,
    iv_b,
    store,
):
    """Visit every ring edge once: centre crossings per row and intervals to burn as a whole.

    With store=False only the per-row counts (x_fill, iv_fill) are incremented; with store=True
    the crossings and intervals are written at row_x / row_iv offsets.
    """
    for k in range(c0, c1 - 1):
        if ring_ends[k]:  # k is the last vertex of a ring: no edge to the next ring
            continue
        x1, y1, x2, y2 = xs[k], ys[k], xs[k + 1], ys[k + 1]
        if y1 == y2:
            # GDAL burns a horizontal edge lying exactly on a row centre when it runs leftwards.
            r = _ifloor(y1, row0 - 1.0, row1 + 1.0)
            if r + 0.5 == y1 and x1 > x2 and row0 <= r <= row1:
                a = _ifloor(x2 + 0.5, -1.0, width + 1.0)
                b = _ifloor(x1 + 0.5, -1.0, width + 1.0) - 1
                _add_interval(row_iv, iv_a, iv_b, iv_fill, r - row0, a, b, width, store)
            if all_touched and x1 != x2 and math.floor(y1) != y1:
                r = _ifloor(y1, row0 - 1.0, row1 + 1.0)
                if row0 <= r <= row1:
                    a = _ifloor(min(x1, x2), -1.0, width + 1.0)
                    b = -_ifloor(-max(x1, x2), -width - 1.0, 1.0) - 1
                    _add_interval(row_iv, iv_a, iv_b, iv_fill, r - row0, a, b, width, store)
            continue
        if y1 < y2:
            ylo, yhi, xlo, xhi = y1, y2, x1, x2
        else:
            ylo, yhi, xlo, xhi = y2, y1, x2, x1
        # Pixel centres: GDAL's half-open rule ylo <= y + 0.5 < yhi, same float expression.
        ra = max(row0, _ifloor(ylo - 0.5, row0 - 1.0, row1 + 1.0))
        rb = min(row1, _ifloor(yhi - 0.5, row0 - 1.0, row1 + 1.0) + 1)
        for r in range(ra, rb + 1):
            dy = r + 0.5
            if dy >= ylo and dy < yhi:
                x = (dy - ylo) * (xhi - xlo) / (yhi - ylo) + xlo
                if store:  # the clamp is monotone, so the crossings keep their order
                    xcuts[row_x[r - row0] + x_fill[r - row0]] = _ifloor(x + 0.5, -1.0, width + 1.0)
                x_fill[r - row0] += 1
        if all_touched:
            ra = max(row0, _ifloor(ylo, row0 - 1.0, row1 + 1.0))
            rb = min(row1, -_ifloor(-yhi, -row1 - 2.0, -row0 + 1.0) - 1)
            for r in range(ra, rb + 1):
                ya = max(ylo, float(r))
                yb = min(yhi, r + 1.0)
                if xlo == xhi:
                    xa = xb = xlo
                else:
                    xa = xlo if ya == ylo else xlo + (ya - ylo) * (xhi - xlo) / (yhi - ylo)
                    xb = xhi if yb == yhi else xlo + (yb - ylo) * (xhi - xlo) / (yhi - ylo)
                if xa > xb:
                    xa, xb = xb, xa
                if xa == xb:
                    if math.floor(xa) == xa:
                        continue  # runs along a pixel edge: touches no pixel's interior
                    a = b = _ifloor(xa, -1.0, width + 1.0)
                else:
                    a = _ifloor(xa, -1.0, width + 1.0)
                    b = -_ifloor(-xb, -width - 1.0, 1.0) - 1
                _add_interval(row_iv, iv_a, iv_b, iv_fill, r - row0, a, b, width, store)


@njit(cache=True)
def _sort_small(a, n):
    for i in range(1, n):
        v = a[i]
        j = i - 1
        while j >= 0 and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v


@njit(cache=True)
def _parcel_runs(xs, ys, ring_ends, c0, c1, height, width, all_touched, out_start, out_len, pos, store):
    """Rasterize one parcel (all its rings at once); return its number of runs.

    Runs are written from out_start[pos] when store is True.
    """
    if c1 - c0 < 3:
        return 0
    ymin = ys[c0]
    ymax = ys[c0]
    xmin = xs[c0]
    xmax = xs[c0]
    for k in range(c0, c1):
        ymin = min(ymin, ys[k])
        ymax = max(ymax, ys[k])
        xmin = min(xmin, xs[k])
        xmax = max(xmax, xs[k])
    if not (xmax >= 0.0 and xmin <= width and ymax >= 0.0 and ymin <= height):
        return 0
    row0 = max(0, _ifloor(ymin, -1.0, height + 1.0))
    row1 = min(height - 1, _ifloor(ymax, -1.0, height + 1.0))
    if row1 < row0:
        return 0
    nrows = row1 - row0 + 1
    x_fill = np.zeros(nrows, np.int64)
    iv_fill = np.zeros(nrows, np.int64)
    empty = np.empty(0, np.int64)
    _walk_edges(
        xs,
        ys,
        c0,
        c1,
        ring_ends,
        row0,
        row1,
        width,
        all_touched,
        empty,
        x_fill,
        empty,
        empty,
        iv_fill,
        empty,
        empty,
        False,
    )
    row_x = np.zeros(nrows + 1, np.int64)
    row_iv = np.zeros(nrows + 1, np.int64)
    widest = 0
    for r in range(nrows):
        row_x[r + 1] = row_x[r] + x_fill[r]
        row_iv[r + 1] = row_iv[r] + iv_fill[r]
        widest = max(widest, x_fill[r] // 2 + iv_fill[r])
    xcuts = np.empty(row_x[nrows], np.int64)
    iv_a = np.empty(row_iv[nrows], np.int64)
    iv_b = np.empty(row_iv[nrows], np.int64)
    x_fill[:] = 0
    iv_fill[:] = 0
    _walk_edges(
        xs,
        ys,
        c0,
        c1,
        ring_ends,
        row0,
        row1,
        width,
        all_touched,
        row_x,
        x_fill,
        xcuts,
        row_iv,
        iv_fill,
        iv_a,
        iv_b,
        True,
    )
    # Per row: pair the sorted crossings (even-odd), add the burnt intervals, merge, emit runs.
    seg_a = np.empty(widest, np.int64)
    seg_b = np.empty(widest, np.int64)
    runs = 0
    for r in range(nrows):
        nx = x_fill[r]
        cuts = xcuts[row_x[r] : row_x[r] + nx]
        if nx > 32:
            cuts.sort()
        else:
            _sort_small(cuts, nx)
        m = 0
        for i in range(0, nx - 1, 2):
            a = max(cuts[i], 0)
            b = min(cuts[i + 1] - 1, width - 1)
            if a <= b:
                seg_a[m] = a
                seg_b[m] = b
                m += 1
        for i in range(row_iv[r], row_iv[r] + iv_fill[r]):
            seg_a[m] = iv_a[i]
            seg_b[m] = iv_b[i]
            m += 1
        if m == 0:
            continue
        if m > 1:
            order = np.argsort(seg_a[:m], kind="mergesort")
            sa = seg_a[:m][order]
            sb = seg_b[:m][order]
        else:
            sa = seg_a[:1].copy()
            sb = seg_b[:1].copy()
        base = (row0 + r) * width
        a, b = sa[0], sb[0]
        for i in range(1, m + 1):
            if i < m and sa[i] <= b + 1:
                b = max(b, sb[i])
                continue
            if store:
                out_start[pos + runs] = base + a
                out_len[pos + runs] = b - a + 1
            runs += 1
            if i < m:
                a, b = sa[i], sb[i]
    return runs


@njit(parallel=True, cache=True)
def _rasterize_count(xs, ys, ring_ends, parcel_coord_off, height, width, all_touched, counts):
    empty_i64 = np.empty(0, np.int64)
    empty_i32 = np.empty(0, np.int32)
    for p in prange(len(counts)):
        counts[p] = _parcel_runs(
            xs,
            ys,
            ring_ends,
            parcel_coord_off[p],
            parcel_coord_off[p + 1],
            height,
            width,
            all_touched,
            empty_i64,
            empty_i32,
            0,
            False,
        )


@njit(parallel=True, cache=True)
def _rasterize_fill(
    xs, ys, ring_ends, parcel_coord_off, height, width, all_touched, offsets, starts, lengths
):
    for p in prange(len(offsets) - 1):
        _parcel_runs(
            xs,
            ys,
            ring_ends,
            parcel_coord_off[p],
            parcel_coord_off[p + 1],
            height,
            width,
            all_touched,
            starts,
            lengths,
            offsets[p],
            True,
        )


def _inverse_geotransform(t: Affine) -> tuple[float, ...]:
    """World -> pixel coefficients computed the way GDALInvGeoTransform does.

    A centre lying exactly on an edge (common: parcel edges on the 10 m grid seen from a 20 m
    band) is decided by the last bit, so the inverse must round exactly as GDAL's does.
    """
    if t.b == 0.0 and t.d == 0.0 and t.a != 0.0 and t.e != 0.0:
        return (-t.c / t.a, 1.0 / t.a, 0.0, -t.f / t.e, 0.0, 1.0 / t.e)
    inv = ~t
    return (inv.c, inv.a, inv.b, inv.f, inv.d, inv.e)


def rasterize(
    geoms: np.ndarray, grid: Grid, all_touched: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterize polygons (already in the grid's CRS) to CSR runs: (offsets, run_start, run_length).

    Works on shapely's coordinate arrays directly (no GeoJSON round trip): each parcel's rings are
    filled in one even-odd scanline pass, so holes and multipolygons need no special case.
    """
    geoms = np.asarray(geoms, dtype=object)
    n = len(geoms)
    coords, sizes, ring_parcel = _rings(geoms)
    # GDAL walks every ring clockwise (in world coordinates); the direction decides which
    # horizontal edges lying exactly on a row of pixel centres are burnt, so do the same.
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    ring_id = np.repeat(np.arange(len(sizes)), sizes)
    position = np.arange(len(coords))
    reverse = (_signed_areas(coords, first, sizes) > 0)[ring_id]
    mirrored = 2 * first[ring_id] + sizes[ring_id] - 1 - position
    coords = coords[np.where(reverse, mirrored, position)]
    inv = _inverse_geotransform(grid.transform)
    # The same expression as GDAL's geotransform transformer, so pixel coordinates agree bit for bit.
    xs = np.ascontiguousarray(inv[0] + coords[:, 0] * inv[1] + coords[:, 1] * inv[2])
    ys = np.ascontiguousarray(inv[3] + coords[:, 0] * inv[4] + coords[:, 1] * inv[5])
    ring_ends = np.zeros(len(coords), np.bool_)
    if len(sizes):
        ring_ends[np.cumsum(sizes) - 1] = True
    coords_per_parcel = np.bincount(ring_parcel, weights=sizes, minlength=n).astype(np.int64)
    coord_off = np.concatenate([[0], np.cumsum(coords_per_parcel)]).astype(np.int64)
    height, width = grid.shape
    counts = np.zeros(n, np.int64)
    _rasterize_count(xs, ys, ring_ends, coord_off, height, width, bool(all_touched), counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    starts = np.empty(offsets[-1], np.int64)
    lengths = np.empty(offsets[-1], np.int32)
    _rasterize_fill(xs, ys, ring_ends, coord_off, height, width, bool(all_touched), offsets, starts, lengths)
    return offsets, starts, lengths


def _rings(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every polygon ring, grouped by parcel: (xy coordinates, ring sizes, parcel of each ring).

    Polygons without holes, most parcels, come straight from shapely's flat coordinate array;
    only multipolygons and polygons with holes are split into parts and rings. Empty and
    non-polygonal parts contribute no ring.
    """
    sizes = shapely.get_num_coordinates(geoms)
    simple = (shapely.get_type_id(geoms) == 3) & (shapely.get_num_interior_rings(geoms) == 0) & (sizes > 0)
    if simple.all():
        return shapely.get_coordinates(geoms), sizes.astype(np.int64), np.arange(len(geoms))
    plain = np.flatnonzero(simple)
    complex_ = np.flatnonzero(~simple)
    parts, part_of = shapely.get_parts(geoms[complex_], return_index=True)
    polygonal = shapely.get_type_id(parts) == 3
    parts, part_of = parts[polygonal], part_of[polygonal]
    rings, ring_of = shapely.get_rings(parts, return_index=True)
    ring_sizes = shapely.get_num_coordinates(rings)
    ring_parcel = np.concatenate([plain, complex_[part_of[ring_of]][ring_sizes > 0]])
    ring_sizes = np.concatenate([sizes[plain], ring_sizes[ring_sizes > 0]]).astype(np.int64)
    coords = np.concatenate([shapely.get_coordinates(geoms[plain]), shapely.get_coordinates(rings)])
    # Reorder whole rings so each parcel's rings are contiguous, in parcel order.
    order = np.argsort(ring_parcel, kind="stable")
    old_first = np.concatenate([[0], np.cumsum(ring_sizes)[:-1]])[order]
    ring_sizes = ring_sizes[order]
    new_first = np.concatenate([[0], np.cumsum(ring_sizes)[:-1]])
    gather = np.repeat(old_first - new_first, ring_sizes) + np.arange(int(ring_sizes.sum()))
    return coords[gather], ring_sizes, ring_parcel[order]


def _signed_areas(coords: np.ndarray, first: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Shoelace area of each closed ring, positive when counter-clockwise.

    Each ring is shifted to its first vertex so the products stay small and the sign exact
    even for slivers far from the origin.
    """
    if not len(sizes):
        return np.zeros(0)
    ring_id = np.repeat(np.arange(len(sizes)), sizes)
    local = coords - coords[first][ring_id]
    x, y = local[:, 0], local[:, 1]
    cross = np.zeros(len(coords))
    cross[:-1] = x[:-1] * y[1:] - x[1:] * y[:-1]
    cross[first + sizes - 1] = 0.0  # the step from a ring's last vertex into the next ring
    return np.add.reduceat(cross, first) / 2.0


# Prepared parcels ----------------------------------------------------------------------------


@dataclass
class PreparedParcels:
    """Parcels checked once per run: pids, repaired polygons, a content fingerprint, row blocks."""

    pids: np.ndarray  # int64
    geoms: np.ndarray  # shapely geometries in `crs`, invalid ones repaired
    source: np.ndarray  # the caller's geometry objects (kept alive: their ids key the memo)
    crs: str
    fingerprint: str  # content hash: pids, WKB, CRS, blocking
    blocks: list[np.ndarray]  # positions into pids/geoms, grouped by rows (north to south)
    block_bounds: list[tuple[float, float, float, float] | None]
    repaired: list[int] = field(default_factory=list)
    _projected: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def geoms_in(self, crs: str) -> np.ndarray:
        """The geometries reprojected to another CRS (computed once per CRS)."""
        if same_crs(crs, self.crs):
            return self.geoms
        if crs not in self._projected:
            transformer = Transformer.from_crs(
                CRS.from_user_input(self.crs), CRS.from_user_input(crs), always_xy=True
            )

            def project(xy: np.ndarray) -> np.ndarray:
                x, y = transformer.transform(xy[:, 0], xy[:, 1])
                return np.column_stack([x, y])

            self._projected[crs] = shapely.transform(self.geoms, project)
        return self._projected[crs]


_PREPARED: OrderedDict[str, PreparedParcels] = OrderedDict()
_PREPARED_MAX = 8
_PREPARED_LOCK = threading.Lock()


def prepare_parcels(parcels: gpd.GeoDataFrame, block_parcels: int = DEFAULT_BLOCK_PARCELS) -> PreparedParcels:
    """Validate, repair and fingerprint a parcel table, memoised for the tables of a run.

    The pipeline hands each scene a new frame (the parcels in that scene's footprint), but the
    shapely geometries in it are the same immutable objects. So the memo key is the identity of
    the geometry objects plus the pids and CRS: a few milliseconds instead of re-hashing the WKB of
    every parcel for every scene. The memo keeps the geometries alive, so identities stay unique.
    """
    if parcels.crs is None:
        raise InputError("parcels: no CRS")
    source = np.asarray(parcels.geometry.values, dtype=object)
    identity = hashlib.blake2b(digest_size=20)
    identity.update(f"{parcels.crs.to_string()}|{block_parcels}|{len(source)}".encode())
    identity.update(parcels["pid"].to_numpy(dtype=np.int64).tobytes())
    identity.update(np.fromiter(map(id, source), dtype=np.int64, count=len(source)).tobytes())
    key = identity.hexdigest()
    with _PREPARED_LOCK:
        prepared = _PREPARED.get(key)
        if prepared is not None:
            _PREPARED.move_to_end(key)
            return prepared
    prepared = _prepare(parcels, source, block_parcels)
    with _PREPARED_LOCK:
        _PREPARED[key] = prepared
        while len(_PREPARED) > _PREPARED_MAX:
            _PREPARED.popitem(last=False)
    return prepared


def _prepare(parcels: gpd.GeoDataFrame, source: np.ndarray, block_parcels: int) -> PreparedParcels:
    pids = parcels["pid"].to_numpy(dtype=np.int64)
    geoms = source.copy()
    missing = shapely.is_missing(geoms)
    geoms[missing] = shapely.Polygon()
    invalid = ~shapely.is_valid(geoms)
    repaired: list[int] = []
    if invalid.any():
        for i in np.flatnonzero(invalid):
            geoms[i] = _polygonal(shapely.make_valid(geoms[i]))
        repaired = [int(p) for p in pids[invalid]]
        shown = ", ".join(map(str, repaired[:20])) + (" ..." if len(repaired) > 20 else "")
        log.warning(
            "%d invalid parcel geometr%s repaired with make_valid: pid %s",
            len(repaired),
            "y" if len(repaired) == 1 else "ies",
            shown,
        )
    crs = parcels.crs.to_string()
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"v{INDEX_FORMAT}|{crs}|{block_parcels}|{len(pids)}".encode())
    digest.update(pids.tobytes())
    _hash_geometries(digest, geoms)
    # Row blocks: sort by the parcel's centre y (north first) and cut every block_parcels.
    bounds = shapely.bounds(geoms)
    centre_y = np.nan_to_num((bounds[:, 1] + bounds[:, 3]) / 2.0, nan=-np.inf)
    order = np.argsort(-centre_y, kind="stable")
    step = max(1, int(block_parcels))
    blocks = [order[i : i + step] for i in range(0, len(order), step)]
    block_bounds = [_bounds_of(bounds[b]) for b in blocks]
    return PreparedParcels(pids, geoms, source, crs, digest.hexdigest(), blocks, block_bounds, repaired)


def _hash_geometries(digest: Any, geoms: np.ndarray) -> None:
    """Feed the geometries' content to a hash: type and coordinates of each polygon without
    holes (they determine it), the WKB of the rest. Much faster than hashing every WKB."""
    types = shapely.get_type_id(geoms)
    sizes = shapely.get_num_coordinates(geoms)
    simple = (types == 3) & (shapely.get_num_interior_rings(geoms) == 0)
    digest.update(types.astype(np.int8).tobytes())
    digest.update(sizes.astype(np.int64).tobytes())
    digest.update(shapely.get_coordinates(geoms[simple]).tobytes())
    digest.update(b"".join(shapely.to_wkb(geoms[~simple], byte_order=1, include_srid=False)))


def _bounds_of(bounds: np.ndarray) -> tuple[float, float, float, float] | None:
    finite = bounds[np.isfinite(bounds).all(axis=1)]
    if not len(finite):
        return None  # only empty geometries
    return (float(finite[:, 0].min()), float(finite[:, 1].min()),
            float(finite[:, 2].max()), float(finite[:, 3].max()))  # fmt: skip


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry:
    parts = [p for p in shapely.get_parts(geom) if shapely.get_type_id(p) in (3, 6)]
    if not parts:
        return shapely.Polygon()
    return shapely.union_all(parts) if len(parts) > 1 else parts[0]


_CRS_EQUAL: dict[tuple[str, str], bool] = {}


def same_crs(a: str, b: str) -> bool:
    if a == b:
        return True
    if (a, b) not in _CRS_EQUAL:
        _CRS_EQUAL[(a, b)] = CRS.from_user_input(a) == CRS.from_user_input(b)
    return _CRS_EQUAL[(a, b)]


# Index cache ---------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$CBM_CACHE_DIR, else the user's cache folder for cbm-engine as the platform defines it
    (platformdirs: $XDG_CACHE_HOME or ~/.cache on Linux, ~/Library/Caches on macOS, %LOCALAPPDATA%
    on Windows)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "pixel-index"
    return platformdirs.user_cache_path("cbm-engine", appauthor=False) / "pixel-index"


class IndexCache:
    """PixelIndex per (parcel set, block, options, grid): in-process LRU in front of .npz files.

    The folder holds at most ``max_bytes``: after each write, the least recently used files
    (by modification time, which every use refreshes) are deleted until it fits, whichever
    process wrote or used them. ``misses`` counts rasterizations, ``disk_hits`` loads from disk,
    ``hits`` in-memory reuse, ``evicted`` files deleted to stay under the cap.
    """

    def __init__(
        self, directory: Path | None, max_entries: int = 64, max_bytes: float = DEFAULT_CACHE_MAX_MB * 2**20
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.evicted = 0
        self._lru: OrderedDict[str, PixelIndex] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    def get(self, parcels: PreparedParcels, block: int, grid: Grid, options: RasterizeOptions) -> PixelIndex:
        key = hashlib.blake2b(
            f"{parcels.fingerprint}|{block}|{options.key}|{grid.key}".encode(), digest_size=20
        ).hexdigest()
        with self._lock:
            index = self._lru.get(key)
            if index is not None:
                self._lru.move_to_end(key)
                self.hits += 1
        if index is not None:
            self._touch(key)
            return index
        index = self._load(key, grid)
        if index is not None:
            self.disk_hits += 1
            self._touch(key)
        else:
            self.misses += 1
            index = build_index(parcels, parcels.blocks[block], grid, options, key)
            self._save(index)
        with self._lock:
            self._lru[key] = index
            while len(self._lru) > self.max_entries:
                self._lru.popitem(last=False)
        return index

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.npz"

    def _load(self, key: str, grid: Grid) -> PixelIndex | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["grid"]) != grid.key:
                    return None
                return PixelIndex(
                    grid, data["pids"], data["offsets"], data["run_start"], data["run_length"], key
                )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("ignoring unreadable pixel-index cache file %s (%s)", path, exc)
            return None

    def _save(self, index: PixelIndex) -> None:
        path = self._path(index.key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
            np.savez(
                tmp,
                grid=np.array(index.grid.key),
                pids=index.pids,
                offsets=index.offsets,
                run_start=index.run_start,
                run_length=index.run_length,
            )
            os.replace(tmp, path)
        except OSError as exc:  # a read-only or full cache folder slows re-runs, nothing else
            log.warning("could not write pixel-index cache %s (%s)", path, exc)
            return
        self._prune()

    def _touch(self, key: str) -> None:
        """Mark a file as just used (its modification time), so eviction takes others first."""
        path = self._path(key)
        if path is not None:
            with contextlib.suppress(OSError):  # evicted meanwhile, or a read-only folder
                os.utime(path)

    def _prune(self) -> None:
        """Delete the least recently used index files until the folder holds at most max_bytes.

        Several processes may prune at once: a file another one deleted first is skipped.
        """
        assert self.directory is not None
        files = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(".npz") and not entry.name.endswith(".tmp.npz"):
                    with contextlib.suppress(FileNotFoundError):
                        stat = entry.stat()
                        files.append((stat.st_mtime_ns, stat.st_size, entry.path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                self.evicted += 1
            total -= size


_CACHES: dict[str, IndexCache] = {}


def index_cache(directory: Path | None, max_bytes: float = DEFAULT_CACHE_MAX_MB * 2**20) -> IndexCache:
    """The process-wide cache for a folder (None: memory only), so scenes share it."""
    name = str(Path(directory).resolve()) if directory is not None else ""
    if name not in _CACHES:
        _CACHES[name] = IndexCache(directory)
    _CACHES[name].max_bytes = max_bytes  # the latest configuration's cap
    return _CACHES[name]


def build_index(
    parcels: PreparedParcels, members: np.ndarray, grid: Grid, options: RasterizeOptions, key: str = ""
) -> PixelIndex:
    """Rasterize some parcels onto a grid: rows for the parcels that intersect its footprint."""
    geoms = parcels.geoms_in(grid.crs)[members]
    footprint = shapely.box(*grid.bounds)
    shapely.prepare(footprint)
    hit = (
        shapely.intersects(footprint, geoms)
        if grid.shape[0] and grid.shape[1]
        else np.zeros(len(geoms), bool)
    )
    members, geoms = members[hit], geoms[hit]
    if options.buffer:
        if CRS.from_user_input(grid.crs).is_geographic:
            raise InputError(f"buffer: a buffer in metres needs a projected raster CRS, got {grid.crs}")
        geoms = shapely.buffer(geoms, options.buffer)
    offsets, starts, lengths = rasterize(geoms, grid, options.all_touched)
    return PixelIndex(grid, parcels.pids[members], offsets, starts, lengths, key)


# Reductions ----------------------------------------------------------------------------------

_CHUNK = 128  # parcels per parallel work item (each has its own scratch histograms)


@njit(cache=True, inline="always")
def _lerp(a, b, t):
    # numpy's _lerp: exact at both ends, same rounding as np.percentile(method="linear").
    d = b - a
    if t >= 0.5:
        return b - d * (1.0 - t)
    return a + d * t


_COARSE = 64  # coarse histogram bins per parcel in the integer kernel


@njit(parallel=True, cache=True)
def _stats_int16(flat, run_start, run_length, offsets, parcels, shift, nodata_key, out):
    """Statistics of 8/16-bit integer pixels without sorting (a radix select).

    Pass 1: moments, min, max. Pass 2: a <= 64-bin histogram of (v - min) >> s, which locates
    the bins of the six order statistics the percentiles need. Pass 3 (only when s > 0): a 2^s-bin
    histogram of the low bits inside those bins. The parcel's pixels are in cache after pass 1,
    and the per-parcel bookkeeping stays under a hundred steps, which matters for small fields.
    Percentiles interpolate like numpy's linear method, but in float64 throughout: numpy's own
    integer path subtracts in the pixel type and overflows for int16 values > 32767 apart.
    """
    n = len(parcels)  # the parcels to reduce (positions in the index), any order
    qs = (0.25, 0.5, 0.75)
    for chunk in prange((n + _CHUNK - 1) // _CHUNK):
        coarse = np.zeros(_COARSE, np.int32)
        fine = np.zeros((6, 1 << 10), np.int32)  # (max - min) >> bits < 64 keeps bits <= 10
        slot_of = np.full(_COARSE, -1, np.int64)
        ranks = np.zeros(6, np.int64)
        order = np.zeros(6, np.int64)
        bins = np.zeros(6, np.int64)
        rests = np.zeros(6, np.int64)
        values = np.zeros(6, np.int64)
        for at in range(chunk * _CHUNK, min(n, (chunk + 1) * _CHUNK)):
            p = parcels[at]
            r0, r1 = offsets[p], offsets[p + 1]
            if r0 == r1:
                out[p, 0] = 0
                out[p, 1:] = np.nan
                continue
            pivot = np.int64(flat[run_start[r0]]) + shift  # any constant works; near the data is exact
            count = 0
            s1 = 0
            s2 = 0
            mn = 1 << 20
            mx = -1
            for r in range(r0, r1):
                j0 = run_start[r]
                for j in range(j0, j0 + run_length[r]):
                    key = np.int64(flat[j]) + shift
                    if key != nodata_key:
                        d = key - pivot
                        count += 1
                        s1 += d
                        s2 += d * d
                        mn = min(mn, key)
                        mx = max(mx, key)
            out[p, 0] = count
            if count == 0:
                out[p, 1:] = np.nan
                continue
            out[p, 1] = (s1 + count * (pivot - shift)) / count  # exact integer sum, as numpy's mean
            out[p, 2] = math.sqrt(max(s2 - (s1 * 1.0) * s1 / count, 0.0) / count)
            out[p, 3] = mn - shift
            out[p, 4] = mx - shift
            for q in range(3):
                lo = math.floor((count - 1) * qs[q])
                ranks[2 * q] = lo
                ranks[2 * q + 1] = min(lo + 1, count - 1)
            for k in range(6):  # insertion sort of six ranks (not always ascending, e.g. n = 2)
                order[k] = k
                i = k
                while i > 0 and ranks[order[i - 1]] > ranks[order[i]]:
                    order[i - 1], order[i] = order[i], order[i - 1]
                    i -= 1
            bits = 0
            while ((mx - mn) >> bits) >= _COARSE:
                bits += 1
            nbins = ((mx - mn) >> bits) + 1
            for r in range(r0, r1):
                j0 = run_start[r]
                for j in range(j0, j0 + run_length[r]):
                    key = np.int64(flat[j]) + shift
                    if key != nodata_key:
                        coarse[(key - mn) >> bits] += 1
            # One walk over the coarse bins finds every wanted rank (visited in ascending order).
            cum = 0
            b = 0
            nslots = 0
            for k in range(6):
                rank = ranks[order[k]]
                while cum + coarse[b] <= rank:
                    cum += coarse[b]
                    b += 1
                bins[order[k]] = b
                rests[order[k]] = rank - cum
                if bits and slot_of[b] < 0:
                    slot_of[b] = nslots
                    nslots += 1
            if bits == 0:
                for k in range(6):
                    values[k] = mn + bins[k]
            else:
                mask = (1 << bits) - 1
                for r in range(r0, r1):
                    j0 = run_start[r]
                    for j in range(j0, j0 + run_length[r]):
                        key = np.int64(flat[j]) + shift
                        if key != nodata_key:
                            sl = slot_of[(key - mn) >> bits]
                            if sl >= 0:
                                fine[sl, (key - mn) & mask] += 1
                for k in range(6):
                    sl = slot_of[bins[k]]
                    c = 0
                    low = 0
                    while c + fine[sl, low] <= rests[k]:
                        c += fine[sl, low]
                        low += 1
                    values[k] = mn + (bins[k] << bits) + low
                for b in range(nbins):
                    if slot_of[b] >= 0:
                        fine[slot_of[b], : mask + 1] = 0
                        slot_of[b] = -1
            coarse[:nbins] = 0
            for q in range(3):
                vi = (count - 1) * qs[q]
                out[p, 5 + q] = _lerp(
                    float(values[2 * q] - shift), float(values[2 * q + 1] - shift), vi - math.floor(vi)
                )


@njit(parallel=True, cache=True)
def _stats_sorted(flat, run_start, run_length, offsets, parcels, nodata, has_nodata, longest, out):
    """Statistics of any numeric pixels: gather the valid values, sort, read ranks off the sort."""
    n = len(parcels)  # the parcels to reduce (positions in the index), any order
    qs = (0.25, 0.5, 0.75)
    for chunk in prange((n + _CHUNK - 1) // _CHUNK):
        buf = np.empty(longest, np.float64)
        for at in range(chunk * _CHUNK, min(n, (chunk + 1) * _CHUNK)):
            p = parcels[at]
            count = 0
            total = 0.0
            for r in range(offsets[p], offsets[p + 1]):
                j0 = run_start[r]
                for j in range(j0, j0 + run_length[r]):
                    v = flat[j]
                    if v != v or (has_nodata and v == nodata):
                        continue
                    buf[count] = v
                    total += buf[count]
                    count += 1
            out[p, 0] = count
            if count == 0:
                for c in range(1, 8):
                    out[p, c] = np.nan
                continue
            mean = total / count
            m2 = 0.0
            for i in range(count):
                d = buf[i] - mean
                m2 += d * d
            values = buf[:count]
            values.sort()
            out[p, 1] = mean
            out[p, 2] = math.sqrt(m2 / count)
            out[p, 3] = values[0]
            out[p, 4] = values[count - 1]
            for q in range(3):
                vi = (count - 1) * qs[q]
                lo = math.floor(vi)
                hi = min(lo + 1, count - 1)
                out[p, 5 + q] = _lerp(values[lo], values[hi], vi - lo)


@njit(parallel=True, cache=True)
def _class_hist(flat, run_start, run_length, offsets, out):
    n = len(offsets) - 1
    classes = out.shape[1]
    for p in prange(n):
        for r in range(offsets[p], offsets[p + 1]):
            j0 = run_start[r]
            for j in range(j0, j0 + run_length[r]):
                v = np.int64(flat[j])
                if 0 <= v < classes:
                    out[p, v] += 1


_RADIX_SHIFT = {
    np.dtype(np.uint8): 0,
    np.dtype(np.uint16): 0,
    np.dtype(np.int8): 128,
    np.dtype(np.int16): 32768,
}


def zonal_stats(
    array: np.ndarray,
    index: PixelIndex,
    nodata: float | None,
    parcels: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Per-parcel statistics (columns as model.STATS) in the array's own units, as float64.

    Pixels equal to nodata and NaN pixels are excluded; parcels without valid pixels get count 0
    and NaN statistics. With ``parcels`` (positions in the index) only those rows of ``out`` (all
    of the index's rows) are computed: the pipelined read reduces parcels as their rows decode.
    """
    if array.shape[:2] != index.grid.shape:
        raise ValueError(f"array shape {array.shape} does not match the index grid {index.grid.shape}")
    flat = np.ascontiguousarray(array).reshape(-1)
    if out is None:
        out = np.empty((len(index), len(STATS)), np.float64)
    parcels = np.arange(len(index), dtype=np.int64) if parcels is None else np.asarray(parcels, np.int64)
    if len(parcels) == 0:
        return out
    shift = _RADIX_SHIFT.get(flat.dtype)
    if shift is not None:
        info = np.iinfo(flat.dtype)
        usable = nodata is not None and np.isfinite(nodata) and float(nodata).is_integer()
        nodata_key = int(nodata) + shift if usable and info.min <= nodata <= info.max else -1
        _stats_int16(flat, index.run_start, index.run_length, index.offsets, parcels, shift, nodata_key, out)
        return out
    if not np.issubdtype(flat.dtype, np.number) or np.issubdtype(flat.dtype, np.complexfloating):
        raise InputError(f"cannot compute statistics of {flat.dtype} pixels")
    longest = int(index.pixel_counts()[parcels].max(initial=0))
    # Compare with nodata in the pixels' own type, as numpy's `array == nodata` does.
    has_nodata = nodata is not None and not np.isnan(nodata)
    if has_nodata and np.issubdtype(flat.dtype, np.integer):
        info = np.iinfo(flat.dtype)
        has_nodata = float(nodata).is_integer() and info.min <= nodata <= info.max
    value = float(flat.dtype.type(nodata)) if has_nodata else 0.0
    _stats_sorted(
        flat,
        index.run_start,
        index.run_length,
        index.offsets,
        parcels,
        value,
        has_nodata,
        max(longest, 1),
        out,
    )
    return out


def class_histogram(array: np.ndarray, index: PixelIndex, classes: int = SCL_CLASSES) -> np.ndarray:
    """Pixel counts per parcel and class value 0..classes-1 (other values are not counted)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    out = np.zeros((len(index), classes), np.int64)
    if len(index) and np.issubdtype(flat.dtype, np.integer):
        _class_hist(flat, index.run_start, index.run_length, index.offsets, out)
    elif len(index):
        raise InputError(f"a class band must hold integers, got {flat.dtype}")
    return out


def to_physical(stats: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """Raw statistics to physical units (value * scale + offset), applied after the reduction."""
    out = stats.copy()
    for c in (1, 3, 4, 5, 6, 7):
        out[:, c] = stats[:, c] * scale + offset
    out[:, 2] = stats[:, 2] * abs(scale)
    if scale < 0:  # a negative scale reverses the order statistics
        out[:, [3, 4]] = out[:, [4, 3]]
        out[:, [5, 7]] = out[:, [7, 5]]
    return out


def stats_frame(pids: np.ndarray, obsid: str, band: str, stats: np.ndarray) -> pd.DataFrame:
    """Tidy signature rows (model.SIGNATURE_COLUMNS) of one band of one scene."""
    columns = {"pid": np.asarray(pids, np.int64), "obsid": obsid, "band": band}
    for c, name in enumerate(STATS):
        columns[name] = stats[:, c].astype(np.int64) if name == "count" else stats[:, c]
    return pd.DataFrame(columns, copy=False)


def scl_frame(pids: np.ndarray, obsid: str, hist: np.ndarray) -> pd.DataFrame:
    """SCL rows (model.SCL_COLUMNS): pid, obsid, hist_0..hist_11; see clear_fraction()."""
    columns = {"pid": np.asarray(pids, np.int64), "obsid": obsid}
    for c, name in enumerate(HIST_COLUMNS):
        columns[name] = hist[:, c].astype(np.int64)
    return pd.DataFrame(columns, copy=False)


# Scene driver --------------------------------------------------------------------------------


@dataclass
class Block:
    """A group of parcels close in y, read and reduced together to bound memory."""

    number: int
    members: np.ndarray
    bounds: tuple[float, float, float, float]
    crs: str
    parcels: PreparedParcels
    read_window: ReadWindow
    cache: IndexCache
    options: RasterizeOptions
    _windows: dict[str, RasterWindow] = field(default_factory=dict)
    _planned: dict[int, tuple[np.ndarray, PixelIndex]] = field(default_factory=dict)  # by id(array)

    def read(self, band: str, ref: BandRef) -> RasterWindow:
        """The pixels of one band over this block (read once per block, however often used).

        Only the file blocks holding parcel pixels are decoded when the source honours the read
        plan; the other pixels are 0 and no index of this block ever points at them.
        """
        if band not in self._windows:
            token = READ_PLAN.set(_CoveragePlan(self))
            try:
                self._windows[band] = read_band(self.read_window, ref, self.bounds, self.crs)
            finally:
                READ_PLAN.reset(token)
        return self._windows[band]

    def zonal(
        self, band: str, ref: BandRef, nodata_of: Callable[[RasterWindow], float | None]
    ) -> tuple[RasterWindow, PixelIndex, np.ndarray]:
        """Read and reduce one band, pipelined: the source decodes the next row of file blocks in a
        thread while the parcels whose pixels all lie in decoded rows are reduced here.

        Returns the window (kept for later use in this block, like read), its index and the raw
        statistics (zonal_stats of the whole window, bit for bit: each parcel is reduced once,
        by the same kernel, over the same pixels). nodata_of picks the nodata from the window.
        """
        if band in self._windows:
            window = self._windows[band]
            index = self.index(window)
            return window, index, zonal_stats(window.array, index, nodata_of(window))
        plan = _CoveragePlan(self)
        outcome: dict[str, Any] = {}

        def decode() -> None:
            try:
                outcome["window"] = read_band(self.read_window, ref, self.bounds, self.crs)
            except BaseException as exc:  # handed to the reducing thread, which raises it
                outcome["error"] = exc
            finally:
                plan.finish()

        context = contextvars.copy_context()
        context.run(READ_PLAN.set, plan)
        reader = _decoder().submit(context.run, decode)
        try:
            out = plan.reduce_as_decoded(nodata_of)
        finally:
            reader.result()
        if "error" in outcome:
            raise outcome["error"]
        window = outcome["window"]
        self._windows[band] = window
        if out is None:  # the source ignored the plan: one reduction of the whole window
            index = self.index(window)
            return window, index, zonal_stats(window.array, index, nodata_of(window))
        return window, plan.index, out

    def drop(self, band: str) -> None:
        """Free a band's pixels once nothing else in this block needs them."""
        window = self._windows.pop(band, None)
        if window is not None:
            self._planned.pop(id(window.array), None)

    def index(self, window: RasterWindow) -> PixelIndex:
        """The window's pixel index (the one its read plan already looked up, if any)."""
        planned = self._planned.get(id(window.array))
        if planned is not None and planned[0] is window.array:
            return planned[1]
        return self.cache.get(self.parcels, self.number, Grid.of(window), self.options)


_DECODER: ThreadPoolExecutor | None = None
_DECODER_LOCK = threading.Lock()
DECODER_THREADS = 8  # decoding jobs in flight at once (one per extraction running in this process)


def _decoder() -> ThreadPoolExecutor:
    """The process's decoding threads, started once (a thread start costs milliseconds under load)."""
    global _DECODER
    with _DECODER_LOCK:
        if _DECODER is None:
            _DECODER = ThreadPoolExecutor(max_workers=DECODER_THREADS, thread_name_prefix="cbm-decode")
        return _DECODER


# Parcels worth a reduction call of their own while the rest decodes: each numba parallel call has
# a fixed cost, so finished parcels are reduced in a few large groups, not one per row of blocks.
MIN_STRIPE_PARCELS = 4096
STRIPES_PER_WINDOW = 6


class _CoveragePlan:
    """The extractor's side of cbm_core.model.ReadPlan for one block and band: which file blocks
    the block's pixel index touches, and a row-by-row hand-over from the decoding thread."""

    def __init__(self, block: Block) -> None:
        self.block = block
        self.frame: RasterWindow | None = None
        self.index: PixelIndex | None = None
        self.ready = 0
        self.done = False
        self._changed = threading.Condition()

    def covered(self, frame: RasterWindow, row_edges: np.ndarray, col_edges: np.ndarray) -> np.ndarray:
        index = self.block.index(frame)
        self.block._planned[id(frame.array)] = (frame.array, index)
        mask = block_coverage(index, row_edges, col_edges)
        with self._changed:
            self.frame, self.index = frame, index
            self._changed.notify_all()
        return mask

    def rows_ready(self, rows: int) -> None:
        with self._changed:
            self.ready = rows
            self._changed.notify_all()

    def finish(self) -> None:
        with self._changed:
            self.done = True
            self._changed.notify_all()

    def reduce_as_decoded(self, nodata_of: Callable[[RasterWindow], float | None]) -> np.ndarray | None:
        """Reduce stripes of parcels as their last row is decoded; None if no frame was announced."""
        with self._changed:
            self._changed.wait_for(lambda: self.frame is not None or self.done)
            if self.frame is None:
                return None
            frame, index = self.frame, self.index
        order, last_rows = row_stripes(index)
        nodata = nodata_of(frame)
        out = np.empty((len(index), len(STATS)), np.float64)
        worth = max(MIN_STRIPE_PARCELS, len(index) // STRIPES_PER_WINDOW)
        reduced, seen = 0, -1
        while reduced < len(index):
            with self._changed:
                self._changed.wait_for(lambda seen=seen: self.ready > seen or self.done)
                seen, finished = self.ready, self.done
            if finished and seen < frame.array.shape[0]:
                return out  # the read failed part-way: the caller raises its error
            upto = len(index) if finished else int(np.searchsorted(last_rows, seen, side="left"))
            if upto > reduced and (finished or upto - reduced >= worth):
                zonal_stats(frame.array, index, nodata, parcels=order[reduced:upto], out=out)
                reduced = upto
        return out


def block_coverage(index: PixelIndex, row_edges: np.ndarray, col_edges: np.ndarray) -> np.ndarray:
    """Which file blocks (rows x columns between the edges, in window pixels) hold indexed pixels."""
    key = ("coverage", row_edges.tobytes(), col_edges.tobytes())
    if key not in index.derived:
        width = index.grid.shape[1]
        mask = np.zeros((len(row_edges) - 1, len(col_edges) - 1), dtype=bool)
        if len(index.run_start):
            rows = index.run_start // width
            first = index.run_start - rows * width
            last = first + index.run_length.astype(np.int64) - 1
            block_row = np.searchsorted(row_edges, rows, side="right") - 1
            col_a = np.searchsorted(col_edges, first, side="right") - 1
            col_b = np.searchsorted(col_edges, last, side="right") - 1
            for step in range(int((col_b - col_a).max()) + 1):  # runs rarely cross a block edge
                spans = col_a + step <= col_b
                mask[block_row[spans], col_a[spans] + step] = True
        index.derived[key] = mask
    return index.derived[key]


def row_stripes(index: PixelIndex) -> tuple[np.ndarray, np.ndarray]:
    """(parcel positions ordered by their last pixel row, those rows): the parcels finished once
    rows [0, r) are decoded are a prefix of the order. Computed once per index, no copy of it."""
    if "stripes" not in index.derived:
        width = max(1, index.grid.shape[1])
        counts = np.diff(index.offsets)
        last = np.full(len(index), -1, np.int64)
        has = counts > 0
        last[has] = index.run_start[index.offsets[1:][has] - 1] // width  # runs go row by row
        order = np.argsort(last, kind="stable").astype(np.int64)
        index.derived["stripes"] = (order, last[order])
    return index.derived["stripes"]


def read_band(
    read_window: ReadWindow, ref: BandRef, bounds: tuple[float, float, float, float], crs: str
) -> RasterWindow:
    """read_window with every failure turned into an InputError that names the file."""
    try:
        window = read_window(ref, bounds, crs)
    except InputError:
        raise
    except (rasterio.errors.RasterioError, OSError, ValueError) as exc:
        raise InputError(f"{ref.uri}: cannot read the raster ({exc})") from None
    if window.array.ndim != 2:
        raise InputError(f"{ref.uri}: expected one band, got an array of shape {window.array.shape}")
    return window


def scene_blocks(
    parcels: gpd.GeoDataFrame,
    read_window: ReadWindow,
    options: RasterizeOptions,
    cache: IndexCache,
    block_parcels: int = DEFAULT_BLOCK_PARCELS,
) -> Iterator[Block]:
    """The blocks of a parcel table, each with its window bounds; windows are freed per block."""
    prepared = prepare_parcels(parcels, block_parcels)
    for number, (members, bounds) in enumerate(zip(prepared.blocks, prepared.block_bounds, strict=True)):
        if bounds is None:
            continue  # only empty geometries in this block
        yield Block(number, members, bounds, prepared.crs, prepared, read_window, cache, options)


@dataclass(frozen=True)
class ExtractOptions:
    """The options both fast extractors share (see the plugins' docstrings)."""

    rasterize: RasterizeOptions
    cache: IndexCache
    block_parcels: int


def extract_options(config: PluginConfig) -> ExtractOptions:
    """Read all_touched, buffer, block_parcels, cache_dir (False: memory only) and cache_max_mb
    (else $CBM_CACHE_MAX_MB, else DEFAULT_CACHE_MAX_MB) from a config."""
    where = f"{config.where} (plugin '{config.plugin}')"
    all_touched = config.get("all_touched", False)
    if not isinstance(all_touched, bool):
        raise ConfigError(f"{where}: option 'all_touched' must be true or false, got {all_touched!r}")
    buffer = float_option(config.get("buffer", 0.0), "buffer", where)
    block_parcels = config.get("block_parcels", DEFAULT_BLOCK_PARCELS)
    if isinstance(block_parcels, bool) or not isinstance(block_parcels, int) or block_parcels < 1:
        raise ConfigError(
            f"{where}: option 'block_parcels' must be a positive integer, got {block_parcels!r}"
        )
    cache_dir = config.get("cache_dir")
    if cache_dir is False:
        directory = None
    elif cache_dir is None:
        directory = default_cache_dir()
    else:
        directory = config.path("cache_dir")
    if config.get("cache_max_mb") is not None:
        max_mb = float_option(config.get("cache_max_mb"), "cache_max_mb", where)
    else:
        text = os.environ.get(CACHE_MAX_MB_ENV, "").strip()
        try:
            max_mb = float(text) if text else DEFAULT_CACHE_MAX_MB
        except ValueError:
            raise ConfigError(f"environment variable {CACHE_MAX_MB_ENV}: not a number: {text!r}") from None
    if not max_mb > 0:
        raise ConfigError(f"{where}: the pixel-index cache needs cache_max_mb > 0, got {max_mb:g}")
    cache = index_cache(directory, max_mb * 2**20)
    return ExtractOptions(RasterizeOptions(all_touched, buffer), cache, block_parcels)


def float_option(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: option '{name}' must be a number, got {value!r}")
    return float(value)


def names_option(value: Any, name: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: option '{name}' must be a list of names, got {value!r}")
    return list(value)
