"""Sentinel-1 signatures: CARD-BS backscatter (VV, VH) and CARD-COH6 coherence, fast and exact.

Backscatter is reduced as linear power: averaging dB values would average a logarithm and bias
the mean low, so dB is for display only. Files stored in dB are converted per pixel to linear
before the reduction (option ``db_input``). Coherence (0-1) is reduced as stored. Pixel rules,
caching and streaming are those of :mod:`extractors._kernels`; the orbit direction stays on the
scene (``Scene.orbit``, carried by the catalogue), so signatures need no column for it.

Options (``[[extract]]`` table):

* ``bands``: the scene's band names, e.g. ``["VV", "VH"]`` (CARD-BS) or ``["VV"]`` (CARD-COH6).
* ``db_input``: true if the backscatter files hold dB (10·log10 of power); default false.
* ``all_touched``, ``buffer`` (metres; CbM practice is about -10 for S1), ``block_parcels``,
  ``cache_dir``: as for the ``s2_l2a`` extractor.

Nodata: NaN pixels and the band's nodata value are excluded.
"""

from __future__ import annotations

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
    extract_options,
    scene_blocks,
    stats_frame,
    to_physical,
    zonal_stats,
)

CBM_API_VERSION = "1.0"
CBM_OPTIONS = EXTRACT_OPTIONS | {"db_input"}  # the [[extract]] options it reads
CARDS = {"bs": "CARD-BS backscatter", "c6": "CARD-COH6 coherence"}


@impl
def cbm_extractor_extract(
    scene: Scene,
    parcels: gpd.GeoDataFrame,
    bands: Sequence[str],
    read_window: Callable[[BandRef, tuple[float, float, float, float], str], RasterWindow],
    config: PluginConfig,
) -> Signatures:
    if scene.card not in CARDS:
        raise InputError(
            f"scene {scene.obsid}: the s1 extractor reads cards {', '.join(CARDS)}, not '{scene.card}'"
        )
    options = extract_options(config)
    db_input = config.get("db_input", False)
    if not isinstance(db_input, bool):
        raise ConfigError(f"{config.where}: option 'db_input' must be true or false, got {db_input!r}")
    bands = [b for b in bands if b in scene.bands]  # a band the scene lacks is skipped, as by `zonal`
    linearize = db_input and scene.card == "bs"
    parts: list[pd.DataFrame] = []
    for block in scene_blocks(parcels, read_window, options.rasterize, options.cache, options.block_parcels):
        for band in bands:
            if linearize:  # per-pixel conversion first: the whole window, then one reduction
                window = block.read(band, scene.bands[band])
                index = block.index(window)
                stats = zonal_stats(db_to_linear(window), index, None) if len(index) else None
            else:  # decoding the next rows of file blocks while the finished ones are reduced
                window, index, raw = block.zonal(band, scene.bands[band], lambda w: w.nodata)
                stats = to_physical(raw, window.scale, window.offset)
            if len(index):
                parts.append(stats_frame(index.pids, scene.obsid, band, stats))
            block.drop(band)
    stats = pd.concat(parts, ignore_index=True) if parts else empty_signatures()
    return Signatures(stats, empty_scl())


def db_to_linear(window: RasterWindow) -> np.ndarray:
    """Physical dB values (DN * scale + offset) to linear power per pixel; NaN where no data."""
    values = window.array.astype(np.float64) * window.scale + window.offset
    if window.nodata is not None and not np.isnan(window.nodata):
        values[window.array == window.nodata] = np.nan
    return np.power(10.0, values / 10.0)
