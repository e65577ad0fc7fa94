"""FOI heterogeneity from a thematic (classified) raster: is the parcel one land cover?

A feature of interest should be homogeneous; a parcel half grassland and half arable is either
mis-delineated or mis-declared. Two tests, after JRC's FOI assessment:

* v1 (shares): the share of each class among the parcel's pixels; heterogeneous when a class
  share lies within [min_share, max_share] (default 30..70 %).
* v2 (clusters): a negative buffer first removes edge pixels; connected same-class clusters
  (4- or 8-connectivity) of at least ``min_cluster_pixels`` are counted; more than one means the
  parcel holds several distinct patches. Class 0 (no data) is ignored and FOIs with fewer than
  ``min_pixels`` pixels are not assessed.

The raster is named by the ``raster`` parameter (the thematic map the scheme is about); the
parcels' geometries come with the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.features
from rasterio.windows import from_bounds
from scipy import ndimage

from cbm_core import impl
from cbm_core.config import param_path
from cbm_core.errors import CbmError
from cbm_core.model import Event, MarkerResult, Status, TimeSeries

NAME = "heterogeneity"
DEFAULTS: dict[str, Any] = {
    "raster": None,  # thematic raster path (required)
    "classes": {},  # optional code -> name, for readable outputs
    "ignore": [0],  # class codes that are not land cover (no data)
    "min_share": 0.3,
    "max_share": 0.7,
    "buffer": -10.0,  # metres, applied before v2 (negative shrinks)
    "connectivity": 8,  # 4 or 8
    "min_cluster_pixels": 20,
    "min_pixels": 40,  # smaller FOIs are not assessed
    "map_date": None,  # date of the thematic map, used to date events; default: today
}
# The parameters a scheme may give this marker (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(DEFAULTS)


@impl
def cbm_marker_run(series: TimeSeries, params: Mapping[str, Any]) -> list[MarkerResult]:
    return run(series, params)


def assess(
    classes: np.ndarray, inside: np.ndarray, core: np.ndarray, params: Mapping[str, Any]
) -> dict[str, Any]:
    """v1 shares and v2 clusters of one parcel's pixels.

    classes: class raster window; inside: pixels of the parcel; core: pixels of the negatively
    buffered parcel (v2). Returns shares, flags and the cluster list.
    """
    p = {**DEFAULTS, **params}
    ignore = set(int(c) for c in p["ignore"])
    names = {int(k): str(v) for k, v in dict(p["classes"]).items()}
    label = lambda c: names.get(int(c), str(int(c)))  # noqa: E731
    values = classes[inside]
    values = values[~np.isin(values, list(ignore))]
    n = int(values.size)
    codes, counts = np.unique(values, return_counts=True)
    shares = {label(c): round(float(k) / n, 4) for c, k in zip(codes, counts, strict=True)} if n else {}
    v1 = any(float(p["min_share"]) <= s <= float(p["max_share"]) for s in shares.values())
    structure = ndimage.generate_binary_structure(2, 2 if int(p["connectivity"]) == 8 else 1)
    clusters = []
    for c in np.unique(classes[core]):
        if int(c) in ignore:
            continue
        labelled, count = ndimage.label(core & (classes == c), structure=structure)
        if not count:
            continue
        sizes = np.bincount(labelled.ravel())[1:]
        for size in sizes[sizes >= int(p["min_cluster_pixels"])]:
            clusters.append({"class": label(c), "pixels": int(size)})
    clusters.sort(key=lambda x: -x["pixels"])
    return {
        "n_pixels": n,
        "shares": shares,
        "v1_heterogeneous": bool(v1),
        "clusters": clusters,
        "v2_heterogeneous": len(clusters) > 1,
    }


def run(series: TimeSeries, params: Mapping[str, Any] | None = None) -> list[MarkerResult]:
    """Assess every parcel of the batch on the configured thematic raster."""
    p = {**DEFAULTS, **(params or {})}
    name = str(p.get("name", NAME))
    parcels = series.parcels
    pids = parcels["pid"].to_numpy(np.int64)
    if not p["raster"]:
        reason = 'no thematic raster configured: set raster = "path/to/classes.tif"'
        return [MarkerResult(name, int(pid), Status.NOT_VALID, reason) for pid in pids]
    when = date.fromisoformat(str(p["map_date"])) if p["map_date"] else date.today()
    try:
        dataset = rasterio.open(str(param_path(params or {}, "raster")))  # relative to the scheme file
    except rasterio.errors.RasterioIOError as exc:
        reason = f"thematic raster {p['raster']}: not readable ({exc})"
        return [MarkerResult(name, int(pid), Status.NOT_VALID, reason) for pid in pids]
    out = []
    with dataset:
        geoms = parcels.geometry
        if parcels.crs is not None and dataset.crs is not None and parcels.crs != dataset.crs:
            geoms = geoms.to_crs(dataset.crs)
        for pid, geom in zip(pids.tolist(), geoms, strict=True):
            try:
                out.append(_one(name, pid, geom, dataset, p, when))
            except (CbmError, ValueError) as exc:
                out.append(MarkerResult(name, pid, Status.NOT_VALID, f"cannot assess: {exc}"))
    return out


def _one(name: str, pid: int, geom: Any, dataset: Any, p: Mapping[str, Any], when: date) -> MarkerResult:
    if geom is None or geom.is_empty:
        return MarkerResult(name, pid, Status.NOT_VALID, "parcel has no geometry")
    bounds = geom.buffer(abs(dataset.res[0])).bounds
    window = from_bounds(*bounds, transform=dataset.transform).round_offsets().round_lengths()
    try:
        window = window.intersection(rasterio.windows.Window(0, 0, dataset.width, dataset.height))
    except rasterio.errors.WindowError:
        return MarkerResult(name, pid, Status.NOT_VALID, "parcel outside the thematic raster")
    classes = dataset.read(1, window=window)
    transform = dataset.window_transform(window)
    shape = classes.shape
    inside = rasterio.features.geometry_mask([geom], shape, transform, invert=True)
    shrunk = geom.buffer(float(p["buffer"]))
    core = (
        rasterio.features.geometry_mask([shrunk], shape, transform, invert=True)
        if not shrunk.is_empty
        else np.zeros(shape, bool)
    )
    if dataset.nodata is not None:
        valid = classes != dataset.nodata
        inside &= valid
        core &= valid
    found = assess(classes, inside, core, p)
    if found["n_pixels"] < int(p["min_pixels"]):
        reason = f"FOI too small to assess: {found['n_pixels']} class pixel(s), {p['min_pixels']} needed"
        return MarkerResult(name, pid, Status.NOT_VALID, reason, values=found)
    events = []
    if found["v1_heterogeneous"]:
        top = max(found["shares"].values())
        events.append(Event(when, when, when, top, 0.9, (), "heterogeneity_v1"))
    if found["v2_heterogeneous"]:
        events.append(Event(when, when, when, float(len(found["clusters"])), 0.9, (), "cardinality_v2"))
    confidence = min(1.0, found["n_pixels"] / (4 * int(p["min_pixels"])))
    return MarkerResult(name, pid, Status.OK, "", events, found, round(confidence, 3))
