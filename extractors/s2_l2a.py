"""Sentinel-2 L2A signatures, fast and exact: cached native rasterization + numba reductions.

Statistics equal ``rasterstats.zonal_stats`` (pixel centre in polygon) on the same pixels; see
:mod:`extractors._kernels` for the pixel rules. Each band is read on its own grid (10, 20 or 60 m), so
mixed resolutions need no resampling; one pixel index per grid serves every band and every
revisit on that grid.

Options (``[[extract]]`` table):

* ``bands``: any of B01-B12, B8A, AOT, WVP, SCL, and index names (``NDVI``...); bands a scene
  lacks are skipped, as by the reference ``zonal`` extractor.
* ``indices``: index bands computed per pixel before the reduction, from physical reflectances:
  NDVI (B08, B04), NDWI (B03, B08), NDRE (B8A, B05), NDMI (B8A, B11); pixels where either
  input is nodata are left out.
* ``boa_offset``: the processing-baseline >= 04.00 ``BOA_ADD_OFFSET`` in DN (normally -1000), so
  reflectance = (DN + boa_offset) * scale. Precedence: this option, if set, for the reflectance
  bands; else the band's offset from the catalogue (BandRef.offset); else the file's offset tag
  (physical = DN * scale + offset). Harmonised products (offset already removed) need neither.
* ``all_touched`` (false), ``buffer`` (metres, negative shrinks), ``block_parcels`` (parcels per
  streamed block, bounding memory), ``cache_dir`` (pixel-index cache; default $CBM_CACHE_DIR,
  else the platform's user cache folder; false: memory only), ``cache_max_mb`` (disk the cache
  may fill, default $CBM_CACHE_MAX_MB or 5120; the least recently used indexes go first).

Nodata: the band's nodata, else 0 (the L2A fill value), is excluded. SCL gives no statistics row
but the per-parcel count of each class 0-11 (class 0, no data, included); its clear-sky fraction
is ``cbm_core.model.clear_fraction(hist)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd

from cbm_core import impl
from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError, InputError
from cbm_core.model import BandRef, RasterWindow, Scene, Signatures, empty_scl, empty_signatures
from extractors._kernels import (
    EXTRACT_OPTIONS,
    Block,
    Grid,
    class_histogram,
    extract_options,
    float_option,
    names_option,
    scene_blocks,
    scl_frame,
    stats_frame,
    to_physical,
    zonal_stats,
)

CBM_API_VERSION = "1.0"
CBM_OPTIONS = EXTRACT_OPTIONS | {"boa_offset", "indices"}  # the [[extract]] options it reads
REFLECTANCE = {*(f"B{i:02d}" for i in range(1, 13)), "B8A"}
CLASS_BAND = "SCL"
L2A_NODATA = 0
INDICES = {  # name: (a, b) -> (a - b) / (a + b)
    "NDVI": ("B08", "B04"),
    "NDWI": ("B03", "B08"),
    "NDRE": ("B8A", "B05"),
    "NDMI": ("B8A", "B11"),
}


@impl
def cbm_extractor_extract(
    scene: Scene,
    parcels: gpd.GeoDataFrame,
    bands: Sequence[str],
    read_window: Callable[[BandRef, tuple[float, float, float, float], str], RasterWindow],
    config: PluginConfig,
) -> Signatures:
    where = f"{config.where} (plugin '{config.plugin}')"
    if scene.card != "s2":
        raise InputError(
            f"scene {scene.obsid}: the s2_l2a extractor reads Sentinel-2 scenes, not card '{scene.card}'"
        )
    options = extract_options(config)
    boa = config.get("boa_offset")
    boa_offset = None if boa is None else float_option(boa, "boa_offset", where)
    requested = names_option(config.get("indices"), "indices", where)
    unknown = [i for i in requested if i not in INDICES]
    if unknown:
        raise ConfigError(f"{where}: unknown index {', '.join(unknown)} (known: {', '.join(INDICES)})")
    wanted = list(dict.fromkeys([*bands, *requested]))
    # Like the reference extractor, a band the scene lacks is skipped, not an error.
    plain = [b for b in wanted if b not in INDICES and b in scene.bands]
    indices = [b for b in wanted if b in INDICES and all(s in scene.bands for s in INDICES[b])]
    uses = Counter(plain) + Counter(s for i in indices for s in INDICES[i])

    stats_parts: list[pd.DataFrame] = []
    scl_parts: list[pd.DataFrame] = []
    blocks = scene_blocks(parcels, read_window, options.rasterize, options.cache, options.block_parcels)
    for block in blocks:
        left = Counter(uses)

        def done(band: str, block: Block = block, left: Counter = left) -> None:
            left[band] -= 1
            if left[band] == 0:
                block.drop(band)

        for band in plain:
            if band == CLASS_BAND:
                window = block.read(band, scene.bands[band])
                index = block.index(window)
                if len(index):
                    scl_parts.append(scl_frame(index.pids, scene.obsid, class_histogram(window.array, index)))
            else:  # decoding the next rows of file blocks while the finished ones are reduced
                window, index, raw = block.zonal(band, scene.bands[band], _nodata)
                if len(index):
                    scale, offset = _calibration(band, window, boa_offset)
                    stats_parts.append(
                        stats_frame(index.pids, scene.obsid, band, to_physical(raw, scale, offset))
                    )
            done(band)
        for name in indices:
            a_band, b_band = INDICES[name]
            a = block.read(a_band, scene.bands[a_band])
            b = block.read(b_band, scene.bands[b_band])
            if Grid.of(a) != Grid.of(b):
                raise InputError(
                    f"scene {scene.obsid}: {name} needs {a_band} and {b_band} on one grid; "
                    f"{scene.bands[a_band].uri} and {scene.bands[b_band].uri} differ"
                )
            index = block.index(a)
            if len(index):
                values = normalized_difference(
                    _reflectance(a, a_band, boa_offset), _reflectance(b, b_band, boa_offset)
                )
                stats_parts.append(
                    stats_frame(index.pids, scene.obsid, name, zonal_stats(values, index, None))
                )
            done(a_band)
            done(b_band)
    stats = pd.concat(stats_parts, ignore_index=True) if stats_parts else empty_signatures()
    scl = pd.concat(scl_parts, ignore_index=True) if scl_parts else empty_scl()
    return Signatures(stats, scl)


def _nodata(window: RasterWindow) -> float:
    return L2A_NODATA if window.nodata is None else window.nodata


def _calibration(band: str, window: RasterWindow, boa_offset: float | None) -> tuple[float, float]:
    """(scale, offset) so that physical = DN * scale + offset, with the documented precedence."""
    if boa_offset is not None and band in REFLECTANCE:
        return window.scale, boa_offset * window.scale
    return window.scale, window.offset


def _reflectance(window: RasterWindow, band: str, boa_offset: float | None) -> np.ndarray:
    """Physical values per pixel (float32), NaN where the band has no data."""
    scale, offset = _calibration(band, window, boa_offset)
    nodata = L2A_NODATA if window.nodata is None else window.nodata
    values = window.array.astype(np.float32) * np.float32(scale) + np.float32(offset)
    values[window.array == nodata] = np.nan
    return values


def normalized_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a - b) / (a + b) per pixel; NaN where an input is NaN or the sum is 0."""
    total = a + b
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a - b) / total
    out[total == 0] = np.nan
    return out
