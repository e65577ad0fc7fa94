"""Image chips around a parcel: what the field looked like on each date, read by windows.

Pixels come through the configured source's `cbm_source_read_window` hook, so chips work on
whatever the run reads (local COGs, /vsis3/ URLs, ...). Each chip keeps the physical values on
the finest band's grid (for GeoTIFFs) and a display image (for PNGs and the calendar).
A date whose pixels cannot be shown keeps its place with a message saying why.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from affine import Affine
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patheffects import withStroke
from rasterio.warp import Resampling, reproject

from cbm_core.errors import CbmError, InputError
from cbm_core.model import DEFAULT_UNUSABLE_CLASSES, HIST_COLUMNS, BandRef, RasterWindow
from cbm_plugins.analyst._plots import RunLike, open_run

# SWIR-NIR-red false colour (as demo/flanders-2023/overview.png): vegetation green, bare soil
# and stubble brown-pink; fixed stretches keep dates comparable.
KINDS = {"falsecolour": ("B11", "B08", "B04"), "ndvi": ("B04", "B08")}
STRETCH = {"B11": (0.0, 0.40), "B08": (0.0, 0.50), "B04": (0.0, 0.15)}
MIN_MARGIN_M = 30.0


@dataclass
class Chip:
    """One dated image fragment around a parcel (or the reason there is none)."""

    date: pd.Timestamp
    obsid: str
    kind: str
    bands: tuple[str, ...]
    data: np.ndarray | None  # (bands, rows, cols) physical values, NaN = nodata
    transform: Affine | None
    crs: str
    cloudy: float | None  # the parcel's cloudy SCL share on that date, if extracted
    message: str = ""  # why there is no image

    @property
    def image(self) -> np.ndarray | None:
        """Display values: RGB in 0..1 (falsecolour) or NDVI (ndvi)."""
        if self.data is None:
            return None
        if self.kind == "ndvi":
            red, nir = self.data
            with np.errstate(divide="ignore", invalid="ignore"):
                return (nir - red) / (nir + red)
        rgb = [
            np.clip((b - lo) / (hi - lo), 0, 1)
            for b, (lo, hi) in zip(self.data, map(STRETCH.get, self.bands), strict=True)
        ]
        return np.nan_to_num(np.dstack(rgb), nan=1.0)

    @property
    def label(self) -> str:
        cloud = "" if self.cloudy is None or math.isnan(self.cloudy) else f" · {self.cloudy:.0%} cloudy"
        return f"{self.date:%Y-%m-%d}{cloud}"

    @property
    def stem(self) -> str:
        return f"{self.date:%Y%m%d}_{self.obsid}"


def read_chips(
    run: RunLike,
    pid: int,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    *,
    kind: str = "falsecolour",
    margin: float = 0.25,
) -> list[Chip]:
    """Sentinel-2 chips of a parcel for the scenes between start and end (inclusive dates).

    The window is the parcel's bounding box grown by `margin` of its size (at least 30 m).
    Scenes whose footprint misses the parcel are left out; scenes that cover it but cannot be
    read give a chip with a message.
    """
    if kind not in KINDS:
        raise InputError(f"chip kind {kind!r}: use one of {', '.join(KINDS)}")
    done = open_run(run)
    parcel = done.parcel(pid)
    outline = gpd.GeoSeries([parcel.geometry], crs=done.parcels.crs)
    scenes = _scenes(done.catalogue, outline, start, end)
    cloudy = _cloudy(done, pid, list(scenes["obsid"]))
    bounds, crs = _window_bounds(outline, margin)
    read = done.engine.plugins.caller(
        done.config.source.plugin, "cbm_source_read_window", done.config.source.where
    )
    bands = KINDS[kind]
    found = []
    for scene in scenes.itertuples(index=False):
        date = pd.Timestamp(scene.obstime).tz_convert(None)
        chip = Chip(date, scene.obsid, kind, bands, None, None, "", cloudy.get(scene.obsid))
        missing = [b for b in bands if b not in scene.bands]
        if missing:
            chip.message = f"no imagery: the scene has no {', '.join(missing)}"
        else:
            try:
                windows = [
                    read(config=done.config.source, band=scene.bands[b], bounds=bounds, crs=crs)
                    for b in bands
                ]
                chip.data, chip.transform, chip.crs, chip.message = _stack(
                    windows, [scene.bands[b] for b in bands]
                )
            except CbmError as exc:
                chip.message = f"no imagery: {exc}"
        found.append(chip)
    return found


def calendar(
    run: RunLike,
    pid: int,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    *,
    kind: str = "falsecolour",
    found: Sequence[Chip] | None = None,
    max_chips: int = 24,
    columns: int = 4,
) -> Figure:
    """A grid of dated chips with the parcel outline; dates without a picture say why.

    With more than `max_chips` scenes the clearest ones (by the parcel's SCL) are shown, in date
    order, and the title says how many were left out. `found` reuses chips already read.
    """
    done = open_run(run)
    parcel = done.parcel(pid)
    found = list(found) if found is not None else read_chips(done, pid, start, end, kind=kind)
    shown = _clearest(found, max_chips)
    span = _span(start or (found[0].date if found else None), end or (found[-1].date if found else None))
    title = f"Parcel {pid}: Sentinel-2 {'NDVI' if kind == 'ndvi' else 'false colour (B11 B08 B04)'}, {span}"
    if len(shown) < len(found):
        title += f"\n{len(shown)} clearest of {len(found)} scenes shown"
    if not shown:
        fig = Figure(figsize=(8, 2.5), layout="constrained")
        ax = fig.subplots()
        ax.set_axis_off()
        ax.text(
            0.5,
            0.5,
            "no Sentinel-2 imagery of this parcel in this period",
            ha="center",
            va="center",
            fontsize=13,
            color="#b71c1c",
        )
        fig.suptitle(title, fontsize=11)
        return fig
    columns = min(columns, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig = Figure(figsize=(2.6 * columns, 2.75 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    outline = gpd.GeoSeries([parcel.geometry], crs=done.parcels.crs)
    for ax, chip in zip(axes, shown, strict=False):
        draw_chip(ax, chip, outline)
    for ax in axes[len(shown) :]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return fig


def draw_chip(ax: Axes, chip: Chip, outline: gpd.GeoSeries) -> None:
    """One chip on an axis: image, parcel outline, date and cloud share; or its message."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(chip.label, fontsize=9)
    if chip.data is None:
        ax.set_facecolor("#eeeeee")
        ax.text(
            0.5,
            0.5,
            "\n".join(textwrap.wrap(chip.message, 26)[:6]),
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
            color="#b71c1c",
        )
        return
    rows, cols = chip.data.shape[1:]
    left, top = chip.transform @ (0, 0)
    right, bottom = chip.transform @ (cols, rows)
    extent = (left, right, bottom, top)
    if chip.kind == "ndvi":
        ax.imshow(chip.image, extent=extent, cmap="RdYlGn", vmin=-0.2, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(chip.image, extent=extent, interpolation="nearest")
    edge = outline.to_crs(chip.crs).boundary
    edge.plot(
        ax=ax, color="#ffeb3b", linewidth=1.5, path_effects=[withStroke(linewidth=3, foreground="black")]
    )
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)


def write_chips(
    run: RunLike,
    pid: int,
    out_dir: str | Path,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    *,
    kind: str = "falsecolour",
) -> list[Path]:
    """Write one PNG and one full-resolution GeoTIFF per chip plus calendar.png; return the paths."""
    done = open_run(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    found = read_chips(done, pid, start, end, kind=kind)
    outline = gpd.GeoSeries([done.parcel(pid).geometry], crs=done.parcels.crs)
    written = []
    for chip in found:
        if chip.data is None:
            continue
        tif = out / f"{chip.stem}.tif"
        _write_geotiff(tif, chip)
        png = out / f"{chip.stem}.png"
        fig = Figure(figsize=(4, 4.2), layout="constrained")
        draw_chip(fig.subplots(), chip, outline)
        fig.savefig(png, dpi=100)
        written += [tif, png]
    cal = out / "calendar.png"
    calendar(done, pid, start, end, kind=kind, found=found).savefig(cal, dpi=100)
    return [*written, cal]


# Helpers -------------------------------------------------------------------------------------


def _scenes(catalogue: gpd.GeoDataFrame, outline: gpd.GeoSeries, start, end) -> pd.DataFrame:
    """S2 scenes in the date range whose footprint (when known) touches the parcel."""
    scenes = catalogue[catalogue["card"] == "s2"]
    times = pd.to_datetime(scenes["obstime"], utc=True).dt.tz_convert(None).dt.normalize()
    keep = np.ones(len(scenes), dtype=bool)
    first, last = _day(start, "start"), _day(end, "end")
    if first is not None:
        keep &= (times >= first).to_numpy()
    if last is not None:
        keep &= (times <= last).to_numpy()
    scenes = scenes[keep]
    if scenes.crs is not None and not scenes.geometry.isna().all():
        shape = outline.to_crs(scenes.crs).iloc[0]
        touches = scenes.geometry.isna() | scenes.geometry.intersects(shape)
        scenes = scenes[touches.to_numpy()]
    return scenes


def _day(value: str | pd.Timestamp | None, which: str) -> pd.Timestamp | None:
    """A start/end option as a naive UTC day; None stays None (open range)."""
    if value is None:
        return None
    try:
        day = pd.Timestamp(value)
    except (ValueError, TypeError):
        raise InputError(f"{which} date {value!r}: not a date (use YYYY-MM-DD)") from None
    return (day.tz_convert(None) if day.tzinfo else day).normalize()


def _span(start: str | pd.Timestamp | None, end: str | pd.Timestamp | None) -> str:
    first, last = _day(start, "start"), _day(end, "end")
    first_text = "first scene" if first is None else f"{first:%Y-%m-%d}"
    last_text = "last scene" if last is None else f"{last:%Y-%m-%d}"
    return f"{first_text} – {last_text}"


def _cloudy(done, pid: int, obsids: list[str]) -> dict[str, float]:
    """The parcel's cloudy SCL share per scene, from the stored histograms."""
    if not obsids:
        return {}
    scl = done.engine.read_store(done.config.store, pids=[int(pid)], obsids=obsids).scl
    if scl.empty:
        return {}
    hist = scl[list(HIST_COLUMNS)].to_numpy(float)
    total = hist.sum(axis=1)
    bad = hist[:, list(DEFAULT_UNUSABLE_CLASSES)].sum(axis=1)
    share = np.where(total > 0, bad / np.maximum(total, 1), np.nan)
    return dict(zip(scl["obsid"], share, strict=True))


def _window_bounds(outline: gpd.GeoSeries, margin: float) -> tuple[tuple[float, float, float, float], str]:
    """Bounds around the parcel in a metric CRS (the parcels' own, or the local UTM zone)."""
    metric = outline if outline.crs.is_projected else outline.to_crs(outline.estimate_utm_crs())
    x0, y0, x1, y1 = metric.total_bounds
    grow = max(MIN_MARGIN_M, margin * max(x1 - x0, y1 - y0))
    return (x0 - grow, y0 - grow, x1 + grow, y1 + grow), metric.crs.to_string()


def _stack(
    windows: list[RasterWindow], refs: list[BandRef]
) -> tuple[np.ndarray | None, Affine | None, str, str]:
    """Bands in physical units on the finest band's grid; (None, ..., message) if nothing valid."""
    finest = min(range(len(windows)), key=lambda i: abs(windows[i].transform.a))
    target = windows[finest]
    shape = target.array.shape
    if 0 in shape:
        return None, None, "", "no imagery: the parcel is outside this scene's rasters"
    layers = []
    for window, ref in zip(windows, refs, strict=True):
        values = window.array.astype("float64")
        if window.nodata is not None and not math.isnan(window.nodata):
            values[window.array == window.nodata] = np.nan
        values = values * window.scale + window.offset
        if window is not target:
            if 0 in values.shape:
                return None, None, "", f"no imagery: {ref.uri} does not cover the parcel"
            resampled = np.full(shape, np.nan)
            reproject(
                values,
                resampled,
                src_transform=window.transform,
                src_crs=window.crs,
                dst_transform=target.transform,
                dst_crs=target.crs,
                src_nodata=np.nan,
                dst_nodata=np.nan,
                resampling=Resampling.nearest,
            )
            values = resampled
        layers.append(values)
    data = np.stack(layers).astype("float32")
    if np.isnan(data).all():
        return None, None, "", "no imagery: only nodata pixels around the parcel"
    return data, target.transform, target.crs, ""


def _clearest(found: list[Chip], limit: int) -> list[Chip]:
    if len(found) <= limit:
        return found
    score = [(c.data is None, 1.0 if c.cloudy is None or math.isnan(c.cloudy) else c.cloudy) for c in found]
    keep = sorted(range(len(found)), key=lambda i: score[i])[:limit]
    return [found[i] for i in sorted(keep)]


def _write_geotiff(path: Path, chip: Chip) -> None:
    data = chip.data if chip.kind != "ndvi" else chip.image[np.newaxis].astype("float32")
    names = chip.bands if chip.kind != "ndvi" else ("NDVI",)
    profile = {
        "driver": "GTiff",
        "height": data.shape[1],
        "width": data.shape[2],
        "count": data.shape[0],
        "dtype": "float32",
        "crs": chip.crs,
        "transform": chip.transform,
        "nodata": float("nan"),
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
        dst.update_tags(
            OBSID=chip.obsid,
            DATE=f"{chip.date:%Y-%m-%d}",
            UNITS="reflectance" if chip.kind != "ndvi" else "NDVI",
        )
