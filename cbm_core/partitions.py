"""Parcel partitions: how a series is cut into marker work units, locally or on a cluster.

Plain pid ranges for markers that judge each parcel alone; compact Z-order areas plus their
neighbours for markers that compare a parcel with the parcels around it (``context_distance``).
"""

from __future__ import annotations

from collections.abc import Iterator

import geopandas as gpd
import numpy as np

from cbm_core.config import PluginConfig
from cbm_core.model import TimeSeries


def pid_batches(series: TimeSeries, size: int) -> Iterator[TimeSeries]:
    """Contiguous slices of pid-sorted tables: no per-batch scan of the whole series."""
    pids = series.parcels["pid"].to_numpy()
    stat_pids = series.stats["pid"].to_numpy()
    scl_pids = series.scl["pid"].to_numpy()
    for start in range(0, len(pids), size):
        chunk = pids[start : start + size]
        lo, hi = chunk[0], chunk[-1]
        s = slice(np.searchsorted(stat_pids, lo, "left"), np.searchsorted(stat_pids, hi, "right"))
        c = slice(np.searchsorted(scl_pids, lo, "left"), np.searchsorted(scl_pids, hi, "right"))
        yield TimeSeries(series.stats.iloc[s], series.scl.iloc[c], series.parcels.iloc[start : start + size])


def context_distance(marker: PluginConfig) -> float:
    """How far a marker looks for neighbours (its ``context_distance`` option; 0: it does not)."""
    return float(marker.params.get("context_distance") or 0.0)


def context_groups(
    parcels: gpd.GeoDataFrame, size: int, distance: float
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(member positions, core positions): `size` parcels in Z-order of distance-sized cells
    (compact areas, so little context), plus every parcel whose centroid lies within `distance`
    of a core parcel's. Members are sorted, as the parcels are.

    Pid ranges would hide a parcel's neighbours that fall into another range.
    """
    from scipy.spatial import cKDTree

    pids = parcels["pid"].to_numpy()
    located = parcels.geometry.notna().to_numpy() & ~parcels.geometry.is_empty.to_numpy()
    xy = np.zeros((len(pids), 2))
    if located.any():
        centroids = parcels.geometry[located].centroid
        xy[located] = np.column_stack([centroids.x.to_numpy(), centroids.y.to_numpy()])
    origin = xy[located].min(axis=0) if located.any() else np.zeros(2)
    cell = np.clip(np.floor((xy - origin) / distance), 0, 2**21 - 1).astype(np.int64)
    code = np.zeros(len(pids), dtype=np.int64)
    for bit in range(21):  # interleave the bits of the cell column and row: Morton (Z) order
        code |= ((cell[:, 0] >> bit) & 1) << (2 * bit) | ((cell[:, 1] >> bit) & 1) << (2 * bit + 1)
    order = np.lexsort((pids, code))
    tree = cKDTree(xy[located])
    where = np.flatnonzero(located)
    for start in range(0, len(pids), size):
        core = order[start : start + size]
        near = tree.query_ball_point(xy[core[located[core]]], distance, return_sorted=False)
        found = [where[np.asarray(n, dtype=np.int64)] for n in near]
        yield np.union1d(core, np.concatenate([np.zeros(0, np.int64), *found])), np.sort(core)


def context_batches(
    series: TimeSeries, size: int, distance: float
) -> Iterator[tuple[TimeSeries, np.ndarray]]:
    """(batch, its core pids) of context_groups, for a pid-sorted series."""
    parcels = series.parcels
    pids = parcels["pid"].to_numpy()
    stat_pids, scl_pids = series.stats["pid"].to_numpy(), series.scl["pid"].to_numpy()
    for members, core in context_groups(parcels, size, distance):
        wanted = pids[members]
        yield (
            TimeSeries(
                series.stats.iloc[rows_of(stat_pids, wanted)],
                series.scl.iloc[rows_of(scl_pids, wanted)],
                parcels.iloc[members],
            ),
            pids[core],
        )


def rows_of(sorted_pids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions of the rows of the wanted pids in a pid-sorted column (no scan of the column)."""
    lo = np.searchsorted(sorted_pids, wanted, "left")
    n = np.searchsorted(sorted_pids, wanted, "right") - lo
    return np.repeat(lo - (np.cumsum(n) - n), n) + np.arange(n.sum())
