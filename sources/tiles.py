"""Orthophoto backgrounds from XYZ / WMTS tile services (national orthophotos, Esri- or
Google-style templates), for the REST API's backgroundByLocation and backgroundByParcelID.

Options::

    url = "https://tiles.example/ortho/{z}/{x}/{y}.jpg"   # also WMTS {TileMatrix}/{TileRow}/{TileCol}
    zoom = 18                 # the deepest level the service has (Web Mercator, GoogleMapsCompatible)
    attribution = "© ..."     # stored in the image's metadata
    cache = "tile-cache"      # folder of fetched tiles (default: a folder in the temporary directory)
    timeout = 10              # seconds per tile request
    max_tiles = 64            # tiles per image: a larger extent is drawn from a coarser level

The image is the mosaic of the tiles covering the bounds at the level whose pixels are closest to
(not coarser than) the requested resolution, cropped to the bounds, in EPSG:3857.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import rasterio
import requests
from affine import Affine
from pyproj import Transformer
from rasterio.io import MemoryFile

from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError, InputError
from cbm_core.model import RasterWindow

CBM_OPTIONS = frozenset({"url", "zoom", "attribution", "cache", "timeout", "max_tiles"})
WEB_MERCATOR = "EPSG:3857"
HALF_WORLD = 20_037_508.342789244  # metres from the Web Mercator origin to the edge of the world
TILE = 256  # pixels per tile side
DEFAULT_ZOOM = 18
DEFAULT_MAX_TILES = 64
DEFAULT_TIMEOUT = 10.0
WMTS_NAMES = {"{TileMatrix}": "{z}", "{TileCol}": "{x}", "{TileRow}": "{y}"}


def _template(config: PluginConfig) -> str:
    url = str(config.require("url"))
    for wmts, xyz in WMTS_NAMES.items():
        url = url.replace(wmts, xyz)
    if not all(part in url for part in ("{z}", "{x}", "{y}")) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{config.where}: url must be an http(s) template with {{z}}, {{x}} and {{y}}")
    return url


def _cache(config: PluginConfig, url: str) -> Path:
    if config.get("cache") is not None:
        folder = config.path("cache")
    else:
        folder = Path(tempfile.gettempdir()) / "cbm-tiles" / hashlib.sha256(url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _tile(config: PluginConfig, url: str, z: int, x: int, y: int) -> np.ndarray:
    """One tile as RGB (3 x 256 x 256), from the cache or the service (blank where it has none)."""
    path = _cache(config, url) / f"{z}-{x}-{y}"
    if not path.exists():
        try:
            response = requests.get(
                url.format(z=z, x=x, y=y), timeout=float(config.get("timeout", DEFAULT_TIMEOUT))
            )
        except requests.RequestException as exc:
            raise InputError(f"{config.where}: tile service unreachable ({type(exc).__name__})") from None
        if response.status_code == 404:
            return np.zeros((3, TILE, TILE), np.uint8)
        if response.status_code != 200:
            raise InputError(f"{config.where}: tile {z}/{x}/{y} answered HTTP {response.status_code}")
        path.write_bytes(response.content)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # tiles carry no grid
            with MemoryFile(path.read_bytes()) as memory, memory.open() as image:
                pixels = image.read()
    except rasterio.errors.RasterioError:
        path.unlink(missing_ok=True)
        raise InputError(f"{config.where}: tile {z}/{x}/{y} is not an image") from None
    if pixels.shape[0] == 1:
        pixels = np.repeat(pixels, 3, axis=0)
    return pixels[:3].astype(np.uint8)


@impl
def cbm_source_orthophoto(
    config: PluginConfig, bounds: tuple[float, float, float, float], crs: str, pixels: int
) -> RasterWindow:
    url = _template(config)
    minx, miny, maxx, maxy = Transformer.from_crs(crs, WEB_MERCATOR, always_xy=True).transform_bounds(*bounds)
    minx, miny, maxx, maxy = (float(np.clip(v, -HALF_WORLD, HALF_WORLD)) for v in (minx, miny, maxx, maxy))
    if not (np.isfinite([minx, miny, maxx, maxy]).all() and maxx > minx and maxy > miny):
        raise InputError(f"{config.where}: the area lies outside the Web Mercator world (|lat| > 85°)")
    wanted = max(maxx - minx, maxy - miny) / max(int(pixels), 1)  # metres per pixel
    level = math.ceil(math.log2(2 * HALF_WORLD / (TILE * max(wanted, 1e-6))))
    z = int(min(max(level, 0), int(config.get("zoom", DEFAULT_ZOOM))))
    while True:  # the finest level within max_tiles: a larger extent gets a coarser (upsampled) image
        size = 2 * HALF_WORLD / 2**z / TILE  # metres per pixel at level z
        count = 2**z
        col0, col1 = (int((v + HALF_WORLD) / (size * TILE)) for v in (minx, maxx))
        row0, row1 = (int((HALF_WORLD - v) / (size * TILE)) for v in (maxy, miny))
        col0, row0 = max(col0, 0), max(row0, 0)
        col1, row1 = min(col1, count - 1), min(row1, count - 1)
        if (col1 - col0 + 1) * (row1 - row0 + 1) <= int(config.get("max_tiles", DEFAULT_MAX_TILES)) or z == 0:
            break
        z -= 1
    mosaic = np.zeros((3, (row1 - row0 + 1) * TILE, (col1 - col0 + 1) * TILE), np.uint8)
    for row in range(row0, row1 + 1):
        for col in range(col0, col1 + 1):
            top, left = (row - row0) * TILE, (col - col0) * TILE
            mosaic[:, top : top + TILE, left : left + TILE] = _tile(config, url, z, col, row)
    origin_x, origin_y = -HALF_WORLD + col0 * TILE * size, HALF_WORLD - row0 * TILE * size
    first_col, first_row = int((minx - origin_x) / size), int((origin_y - maxy) / size)
    last_col, last_row = math.ceil((maxx - origin_x) / size), math.ceil((origin_y - miny) / size)
    array = mosaic[:, first_row:last_row, first_col:last_col]
    transform = Affine(size, 0, origin_x + first_col * size, 0, -size, origin_y - first_row * size)
    return RasterWindow(array=array, transform=transform, crs=WEB_MERCATOR, nodata=None)
