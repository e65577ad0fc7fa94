"""Background map tiles (XYZ, 256 px PNG) rendered from the run's own imagery with rio-tiler.

Sentinel-2 false colour (B11 B08 B04) and true colour (B04 B03 B02) of one scene, with the fixed
stretches of the chips so dates compare; an orthophoto when the run configures one as a raster
(``[analyst] orthophoto``; a ``{z}/{x}/{y}`` URL template is handed to the page as is). Pixels
outside the imagery are transparent.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from rio_tiler.errors import NoOverviewWarning, TileOutsideBounds
from rio_tiler.io import Reader
from rio_tiler.models import ImageData

from cbm_core.errors import InputError
from cbm_plugins.analyst._plots import FinishedRun

LAYERS = {
    "s2-false": (("B11", 0.0, 0.40), ("B08", 0.0, 0.50), ("B04", 0.0, 0.15)),
    "s2-true": (("B04", 0.0, 0.15), ("B03", 0.0, 0.15), ("B02", 0.0, 0.15)),
}
LAYER_NAMES = {"s2-false": "Sentinel-2 false colour", "s2-true": "Sentinel-2 true colour"}
TILE_SIZE = 256
MIN_ZOOM, MAX_ZOOM = 10, 18  # tiles rendered on request; an export renders EXPORT_ZOOMS
EXPORT_ZOOMS = (13, 14, 15, 16)
EXPORT_MAX_TILES = 3000  # tiles one export renders per layer before saying it stopped
EMPTY_PNG = ImageData(np.zeros((4, 1, 1), dtype="uint8")).render(img_format="PNG", add_mask=False)


def backgrounds(run: FinishedRun, dates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The background layers a run offers: S2 false and true colour (the clearest scene by default;
    a layer the imagery lacks bands for says which), and the orthophoto when configured."""
    found = []
    for layer, bands in LAYERS.items():
        needed = [b for b, _, _ in bands]
        usable = [d for d in dates if all(b in d["bands"] for b in needed)]
        entry = {
            "id": layer,
            "name": LAYER_NAMES[layer],
            "kind": "s2",
            "obsids": [d["obsid"] for d in usable],
        }
        if not usable:
            entry["message"] = (
                f"{LAYER_NAMES[layer]} needs {', '.join(needed)}: this run's Sentinel-2 scenes lack them"
            )
        found.append(entry)
    ortho = run.config.analyst.get("orthophoto")
    if ortho is not None:
        url = str(ortho)
        if "{z}" in url:
            found.append({"id": "ortho", "name": "Orthophoto", "kind": "xyz", "url": url})
        else:
            found.append({"id": "ortho", "name": "Orthophoto", "kind": "raster", "obsids": ["ortho"]})
    return found


def render_tile(run: FinishedRun, layer: str, obsid: str, z: int, x: int, y: int) -> bytes:
    """One 256 px PNG tile of a layer on a scene (transparent outside the imagery)."""
    with warnings.catch_warnings():
        # a run's chips and small scenes often have no overviews: zoomed-out tiles read more pixels
        warnings.simplefilter("ignore", NoOverviewWarning)
        return _render(run, layer, obsid, z, x, y)


def _render(run: FinishedRun, layer: str, obsid: str, z: int, x: int, y: int) -> bytes:
    if not MIN_ZOOM <= z <= MAX_ZOOM:
        return EMPTY_PNG
    if layer == "ortho":
        return _ortho_tile(run, z, x, y)
    if layer not in LAYERS:
        raise InputError(f"background layer {layer!r}: use one of {', '.join([*LAYERS, 'ortho'])}")
    scenes = run.catalogue[run.catalogue["obsid"].astype(str) == obsid]
    if scenes.empty:
        raise InputError(f"scene {obsid!r} is not in the run's catalogue")
    refs = scenes.iloc[0]["bands"]
    layers, masks = [], []
    for band, low, high in LAYERS[layer]:
        if band not in refs:
            raise InputError(f"scene {obsid} has no {band}")
        ref = refs[band]
        try:
            with Reader(str(ref.uri)) as reader:
                image = reader.tile(x, y, z, tilesize=TILE_SIZE, indexes=1, resampling_method="nearest")
        except TileOutsideBounds:
            return EMPTY_PNG
        values = image.data[0].astype("float64") * ref.scale + ref.offset
        layers.append(np.clip((values - low) / (high - low) * 255, 0, 255))
        masks.append(~np.ma.getmaskarray(image.array[0]))
    alpha = np.logical_and.reduce(masks).astype("uint8") * 255
    rgba = np.stack([*layers, alpha]).astype("uint8")
    return ImageData(rgba).render(img_format="PNG", add_mask=False)


def _ortho_tile(run: FinishedRun, z: int, x: int, y: int) -> bytes:
    source = str(run.config.analyst.path("orthophoto"))
    try:
        with Reader(source) as reader:
            indexes = tuple(range(1, min(reader.dataset.count, 3) + 1))
            image = reader.tile(x, y, z, tilesize=TILE_SIZE, indexes=indexes)
    except TileOutsideBounds:
        return EMPTY_PNG
    data = image.data
    if data.dtype != np.uint8:
        top = float(np.nanmax(data)) or 1.0
        data = np.clip(data / top * 255, 0, 255).astype("uint8")
    if data.shape[0] < 3:
        data = np.repeat(data[:1], 3, axis=0)
    alpha = (~np.ma.getmaskarray(image.array[0])).astype("uint8") * 255
    return ImageData(np.concatenate([data, alpha[None]])).render(img_format="PNG", add_mask=False)


def tiles_over(bounds: list[list[float]], zoom: int) -> list[tuple[int, int]]:
    """The (x, y) of the tiles of a zoom over [[south, west], [north, east]] (WGS84)."""
    (south, west), (north, east) = bounds

    def key(lon: float, lat: float) -> tuple[int, int]:
        n = 2**zoom
        lat = max(min(lat, 85.0511), -85.0511)
        tx = int((lon + 180.0) / 360.0 * n)
        ty = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)
        return tx, ty

    x0, y0 = key(west, north)
    x1, y1 = key(east, south)
    return [(tx, ty) for tx in range(x0, x1 + 1) for ty in range(y0, y1 + 1)]
