"""Image chips around a parcel: what the field looked like on each date, read by windows.

Pixels come through the configured source's `cbm_source_read_window` hook, so chips work on
whatever the run reads (local COGs, /vsis3/ URLs, ...). Each chip keeps the physical values on
the finest band's grid (for GeoTIFFs) and a display image (for PNGs and the calendar).
A date whose pixels cannot be shown keeps its place with a message saying why.

What an inspector reads on a chip: the parcel centred in a square window (its bounding box plus a
buffer in metres), its outline, a scale bar, a north arrow on single chips, and a colour bar on
index chips. The calendar ranks dates by the parcel's valid share under the core's validity
policy (unusable SCL classes, `cbm_core.model`), keeps every observation a marker used, and marks
the used observations and the marker event dates.
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
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.patheffects import withStroke
from rasterio.transform import from_bounds
from rasterio.warp import Resampling, reproject

from cbm_core.errors import CbmError, InputError
from cbm_core.model import BandRef, RasterWindow
from cbm_plugins.analyst._plots import RunLike, _reason_kind, observations, open_run

# SWIR-NIR-red false colour (as demo/flanders-2023/overview.png): vegetation green, bare soil
# and stubble brown-pink; fixed stretches keep dates comparable.
KINDS = {"falsecolour": ("B11", "B08", "B04"), "ndvi": ("B04", "B08")}
STRETCH = {"B11": (0.0, 0.40), "B08": (0.0, 0.50), "B04": (0.0, 0.15)}
DEFAULT_SIZE_PX = 128  # chip width and height in display pixels, as the JRC chip services
DEFAULT_BUFFER_M = 50.0  # ground around the parcel's bounding box, so its edges never touch the border
NDVI_RANGE = (-0.2, 1.0)  # fixed colour scale, so NDVI chips of different dates compare
USED_COLOUR = "#6a1b9a"  # frame of an observation a marker used (as the ring on the parcel plot)
EVENT_COLOUR = "#d50000"  # frame and label of a marker event date
NODATA_GREY = 0.85  # outside the imagery: grey, not white, so it is not read as cloud
NDVI_CMAP = colormaps["RdYlGn"].with_extremes(bad=str(NODATA_GREY))
SCALE_BAR_SHARE = 0.3  # a scale bar spans at most this share of the chip width
BACKGROUND_TRIES = 3  # scenes tried for a location map's background before saying there is none


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
    cloudy: float | None  # the parcel's unusable SCL share on that date, if extracted
    message: str = ""  # why there is no image
    bounds: tuple[float, float, float, float] | None = None  # the centred square shown, in `crs`
    used: bool = False  # a marker based its result on this observation
    events: tuple[str, ...] = ()  # labels of the marker events dated on (or nearest to) this chip
    why: str | None = None  # the validity policy's reason ("" valid; None: no signatures of this date)

    @property
    def valid_share(self) -> float | None:
        """Share of the parcel's pixels in a usable SCL class (None when SCL was not extracted)."""
        return None if self.cloudy is None or math.isnan(self.cloudy) else 1.0 - self.cloudy

    @property
    def valid(self) -> bool | None:
        """Valid under the run's validity policy, the markers' own (None: no signatures of this date)."""
        return None if self.why is None else self.why == ""

    @property
    def image(self) -> np.ndarray | None:
        """Display values: RGB in 0..1 (falsecolour) or NDVI (ndvi)."""
        if self.data is None:
            return None
        if self.kind == "ndvi":
            red, nir = self.data
            with np.errstate(divide="ignore", invalid="ignore"):
                return (nir - red) / (nir + red)
        if self.kind == "rgb":  # an orthophoto, already 0..1
            return np.nan_to_num(np.dstack(list(self.data)), nan=NODATA_GREY)
        rgb = [
            np.clip((b - lo) / (hi - lo), 0, 1)
            for b, (lo, hi) in zip(self.data, map(STRETCH.get, self.bands), strict=True)
        ]
        return np.nan_to_num(np.dstack(rgb), nan=NODATA_GREY)

    @property
    def label(self) -> str:
        share = self.valid_share
        valid = "" if share is None else f" · {share:.0%} valid"
        rejected = f" · rejected: {_reason_kind(self.why)}" if self.why else ""
        return f"{self.date:%Y-%m-%d}{valid}{rejected}"

    def display(self, size: int = DEFAULT_SIZE_PX) -> np.ndarray | None:
        """The display image resampled to size x size pixels over the centred square `bounds`."""
        image = self.image
        if image is None or self.bounds is None:
            return image
        layers = image[np.newaxis] if image.ndim == 2 else np.moveaxis(image, -1, 0)
        target = np.full((layers.shape[0], size, size), np.nan)
        reproject(
            layers.astype("float64"),
            target,
            src_transform=self.transform,
            src_crs=self.crs,
            dst_transform=from_bounds(*self.bounds, size, size),
            dst_crs=self.crs,
            src_nodata=np.nan,
            dst_nodata=np.nan,
            resampling=Resampling.nearest,
        )
        if image.ndim == 2:
            return target[0]
        return np.nan_to_num(np.moveaxis(target, 0, -1), nan=NODATA_GREY)

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
    buffer: float = DEFAULT_BUFFER_M,
) -> list[Chip]:
    """Sentinel-2 chips of a parcel for the scenes between start and end (inclusive dates).

    Parameters
    ----------
    run
        A finished run: its configuration file, RunResult or opened run.
    pid
        The parcel.
    start, end
        First and last day (YYYY-MM-DD); None for the run's first or last scene.
    kind
        ``falsecolour`` (B11 B08 B04) or ``ndvi``.
    buffer
        Metres of ground around the parcel's bounding box; the window is the square around it,
        centred on the parcel.

    Returns
    -------
    list[Chip]
        One chip per scene whose footprint touches the parcel, in date order; a scene that covers
        it but cannot be read gives a chip with a message instead of pixels. Each chip knows its
        valid share, whether a marker used it and the marker events of its date.

    Examples
    --------
    >>> chips = read_chips("demo/flanders.toml", 7, "2023-04-05", "2023-04-15")  # doctest: +SKIP
    >>> [c.label for c in chips[:1]]  # doctest: +SKIP
    ['2023-04-05 · 100% valid']
    """
    if kind not in KINDS:
        raise InputError(f"chip kind {kind!r}: use one of {', '.join(KINDS)}")
    if not (buffer >= 0 and math.isfinite(buffer)):
        raise InputError(f"chip buffer {buffer!r}: give metres >= 0")
    done = open_run(run)
    parcel = done.parcel(pid)
    outline = gpd.GeoSeries([parcel.geometry], crs=done.parcels.crs)
    scenes = _scenes(done.catalogue, outline, start, end)
    screened = _screened(done, pid)
    bounds, crs = _window_bounds(outline, buffer)
    used = done.used_obsids(pid)
    read = done.engine.plugins.caller(
        done.config.source.plugin, "cbm_source_read_window", done.config.source.where
    )
    bands = KINDS[kind]
    found = []
    for scene in scenes.itertuples(index=False):
        date = pd.Timestamp(scene.obstime).tz_convert(None)
        share, why = screened.get(str(scene.obsid), (None, None))
        chip = Chip(date, scene.obsid, kind, bands, None, None, crs, share, bounds=bounds, why=why)
        chip.used = scene.obsid in used
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
        chip.crs = chip.crs or crs
        found.append(chip)
    _mark_events(found, done.events(pid))
    return found


def _mark_events(found: list[Chip], events: list[dict]) -> None:
    """Attach each marker event to the chip of its main date (or the nearest date with a picture)."""
    for event in events:
        main = pd.Timestamp(event["main"]).normalize()
        pictured = [c for c in found if c.data is not None] or found
        if not pictured:
            return
        nearest = min(pictured, key=lambda c: abs(c.date.normalize() - main))
        nearest.events = (*nearest.events, f"{event.get('kind') or event['marker']} {main:%d %b}")


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
    size: int = DEFAULT_SIZE_PX,
    buffer: float = DEFAULT_BUFFER_M,
) -> Figure:
    """A grid of dated chips with the parcel outline; dates without a picture say why.

    Parameters
    ----------
    run, pid, start, end, kind, buffer
        As for `read_chips`.
    found
        Chips already read (skips reading them again).
    max_chips
        With more scenes, the observations a marker used and then the ones with the highest
        valid share are shown (in date order); the title says how many were left out.
    columns
        Chips per row.
    size
        Pixels across each chip.

    Returns
    -------
    matplotlib.figure.Figure
        Chips a marker used are framed in purple, marker event dates in red and named; index chips
        share one colour bar; the first chip carries a scale bar.

    Examples
    --------
    >>> calendar("demo/flanders.toml", 4, max_chips=12).savefig("calendar.png")  # doctest: +SKIP
    """
    done = open_run(run)
    parcel = done.parcel(pid)
    found = list(found) if found is not None else read_chips(done, pid, start, end, kind=kind, buffer=buffer)
    shown = rank_chips(found, max_chips)
    span = _span(start or (found[0].date if found else None), end or (found[-1].date if found else None))
    title = f"Parcel {pid}: Sentinel-2 {'NDVI' if kind == 'ndvi' else 'false colour (B11 B08 B04)'}, {span}"
    if len(shown) < len(found):
        title += (
            f"\n{len(shown)} of {len(found)} scenes: used by a marker first, then the highest valid share"
        )
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
    fig = Figure(
        figsize=(2.3 * columns + (0.8 if kind == "ndvi" else 0), 2.45 * rows + 0.7), layout="constrained"
    )
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    outline = gpd.GeoSeries([parcel.geometry], crs=done.parcels.crs)
    drawn = None
    for i, (ax, chip) in enumerate(zip(axes, shown, strict=False)):
        image = draw_chip(ax, chip, outline, size=size, scale_bar=i == 0)
        drawn = drawn or image
    for ax in axes[len(shown) :]:
        ax.set_axis_off()
    if kind == "ndvi" and drawn is not None:
        fig.colorbar(drawn, ax=list(axes), shrink=0.6, label="NDVI")
    fig.suptitle(title, fontsize=11)
    return fig


def rank_chips(found: Sequence[Chip], limit: int) -> list[Chip]:
    """At most `limit` chips in date order: pictures before messages, the observations a marker
    used first, then by the parcel's valid share (unknown counts as 0), earlier dates on ties."""
    if len(found) <= limit:
        return list(found)

    def score(i: int) -> tuple:
        chip = found[i]
        return (chip.data is None, not chip.used, -(chip.valid_share or 0.0), i)

    keep = sorted(range(len(found)), key=score)[:limit]
    return [found[i] for i in sorted(keep)]


def draw_chip(
    ax: Axes,
    chip: Chip,
    outline: gpd.GeoSeries,
    *,
    size: int = DEFAULT_SIZE_PX,
    scale_bar: bool = True,
    north_arrow: bool = False,
):
    """One chip on an axis: the centred image, parcel outline, date and valid share, scale bar,
    north arrow, frames for used observations and event dates; or its message.

    Returns the image artist (for a colour bar), None for a chip without picture.
    """
    ax.set_xticks([])
    ax.set_yticks([])
    title = chip.label
    if chip.events:
        title += "\n" + ", ".join(chip.events)
    ax.set_title(title, fontsize=8, color=EVENT_COLOUR if chip.events else "black")
    frame = EVENT_COLOUR if chip.events else USED_COLOUR if chip.used else None
    if frame:
        for spine in ax.spines.values():
            spine.set_edgecolor(frame)
            spine.set_linewidth(3)
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
        return None
    if chip.bounds is not None:
        left, bottom, right, top = chip.bounds
    else:
        rows, cols = chip.data.shape[1:]
        left, top = chip.transform @ (0, 0)
        right, bottom = chip.transform @ (cols, rows)
    extent = (left, right, bottom, top)
    if chip.kind == "ndvi":
        image = ax.imshow(
            chip.display(size),
            extent=extent,
            cmap=NDVI_CMAP,
            vmin=NDVI_RANGE[0],
            vmax=NDVI_RANGE[1],
            interpolation="nearest",
        )
    else:
        image = ax.imshow(chip.display(size), extent=extent, interpolation="nearest")
    edge = outline.to_crs(chip.crs).boundary
    edge.plot(
        ax=ax, color="#ffeb3b", linewidth=1.5, path_effects=[withStroke(linewidth=3, foreground="black")]
    )
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    if chip.used:
        ax.text(
            0.98,
            0.98,
            "used",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=7,
            color="white",
            bbox={"fc": USED_COLOUR, "ec": "none", "pad": 1.5},
        )
    if scale_bar:
        _scale_bar(ax, left, right, bottom, top)
    if north_arrow:
        _north_arrow(ax)
    return image


def _scale_bar(ax: Axes, left: float, right: float, bottom: float, top: float) -> None:
    """A black-and-white bar of a round length (metres: the chip grid is metric) at bottom left."""
    width = right - left
    length = nice_length(width * SCALE_BAR_SHARE)
    x0, y0 = left + 0.05 * width, bottom + 0.06 * (top - bottom)
    height = 0.025 * (top - bottom)
    for i, colour in enumerate(("black", "white")):
        ax.add_patch(Rectangle((x0 + i * length / 2, y0), length / 2, height, fc=colour, ec="black", lw=0.6))
    label = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    ax.text(
        x0 + length / 2,
        y0 + 1.6 * height,
        label,
        ha="center",
        va="bottom",
        fontsize=7,
        path_effects=[withStroke(linewidth=2, foreground="white")],
    )


def nice_length(limit: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above `limit` (a scale bar's length); 1 below 1."""
    if limit < 1:
        return 1.0
    power = 10 ** math.floor(math.log10(limit))
    return max(step * power for step in (1, 2, 5) if step * power <= limit)


def _north_arrow(ax: Axes) -> None:
    """North is up: the chip grid is the parcels' projected (or local UTM) grid."""
    ax.annotate(
        "N",
        xy=(0.93, 0.93),
        xytext=(0.93, 0.78),
        xycoords="axes fraction",
        ha="center",
        va="center",
        fontsize=8,
        fontweight="bold",
        arrowprops={"arrowstyle": "-|>", "color": "black", "lw": 1.2},
        path_effects=[withStroke(linewidth=2, foreground="white")],
    )


def write_chips(
    run: RunLike,
    pid: int,
    out_dir: str | Path,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    *,
    kind: str = "falsecolour",
    size: int = DEFAULT_SIZE_PX,
    buffer: float = DEFAULT_BUFFER_M,
) -> list[Path]:
    """Write one PNG and one full-resolution GeoTIFF per chip plus calendar.png; return the paths.

    Parameters
    ----------
    run, pid, start, end, kind, buffer
        As for `read_chips`.
    out_dir
        Folder to write to (made when missing).
    size
        Pixels across each chip (the PNG shows them; the GeoTIFF keeps the native grid).

    Returns
    -------
    list[Path]
        The GeoTIFF and PNG of each date with a picture, then calendar.png.

    Examples
    --------
    >>> write_chips("demo/flanders.toml", 7, "chips/", size=256, buffer=30)  # doctest: +SKIP
    """
    if size < 16 or size > 4096:
        raise InputError(f"chip size {size}: give 16..4096 pixels")
    done = open_run(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    found = read_chips(done, pid, start, end, kind=kind, buffer=buffer)
    outline = gpd.GeoSeries([done.parcel(pid).geometry], crs=done.parcels.crs)
    written = []
    for chip in found:
        if chip.data is None:
            continue
        tif = out / f"{chip.stem}.tif"
        _write_geotiff(tif, chip)
        png = out / f"{chip.stem}.png"
        fig = Figure(figsize=(4.6 if kind == "ndvi" else 4, 4.3), layout="constrained")
        ax = fig.subplots()
        image = draw_chip(ax, chip, outline, size=size, north_arrow=True)
        if kind == "ndvi":
            fig.colorbar(image, ax=ax, shrink=0.8, label="NDVI")
        fig.savefig(png, dpi=max(100, size / 3.5))
        written += [tif, png]
    cal = out / "calendar.png"
    calendar(done, pid, start, end, kind=kind, found=found, size=size).savefig(cal, dpi=100)
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


def _screened(done, pid: int) -> dict[str, tuple[float | None, str]]:
    """Per S2 observation of the parcel: its unusable SCL share and the validity policy's reason
    ("" when valid), screened over the parcel's whole series exactly as the markers screen it."""
    s2 = observations(done.series([int(pid)]), pid, done.policy)["s2"]
    return {
        str(o): (None if not np.isfinite(c) else float(c), str(w))
        for o, c, w in zip(s2["obsid"], s2["cloudy"], s2["why"], strict=True)
    }


def _window_bounds(outline: gpd.GeoSeries, buffer: float) -> tuple[tuple[float, float, float, float], str]:
    """The square centred on the parcel's bounding box, `buffer` metres beyond its longer side, in a
    metric CRS (the parcels' own, or the local UTM zone)."""
    metric = outline if outline.crs.is_projected else outline.to_crs(outline.estimate_utm_crs())
    x0, y0, x1, y1 = metric.total_bounds
    half = max(x1 - x0, y1 - y0) / 2 + buffer
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - half, cy - half, cx + half, cy + half), metric.crs.to_string()


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


def key_chips(found: Sequence[Chip], limit: int = 6) -> list[tuple[str, Chip]]:
    """The chips that show each marker event: the last usable picture before its date and the first
    on or after it (usable = valid under the policy or used by a marker), as (caption, chip) pairs.

    Without an event: the best `limit` chips by `rank_chips`, captioned with their date.
    """
    pictured = [c for c in found if c.data is not None]
    usable = [c for c in pictured if c.valid or c.used] or pictured
    pairs: list[tuple[str, Chip]] = []
    for chip in found:
        for label in chip.events:
            main = chip.date
            before = [c for c in usable if c.date < main]
            after = [c for c in usable if c.date >= main] or [chip]
            if before:
                pairs.append((f"before {label}", before[-1]))
            pairs.append((f"after {label}", after[0]))
    if not pairs:
        pairs = [(f"{c.date:%d %b}", c) for c in rank_chips(pictured, limit)]
    return pairs[:limit]


def background(run: RunLike, pid: int, buffer: float) -> Chip | None:
    """A false-colour picture around the parcel for a location map: the scene where the parcel's
    valid share is highest (a few are tried when reading fails); None without any imagery."""
    done = open_run(run)
    outline = gpd.GeoSeries([done.parcel(pid).geometry], crs=done.parcels.crs)
    scenes = _scenes(done.catalogue, outline, None, None)
    if scenes.empty:
        return None
    screened = _screened(done, pid)

    def rank(scene) -> tuple[bool, float]:  # valid scenes first, then the least cloudy
        share, why = screened.get(str(scene.obsid), (None, None))
        return (why != "", 1.0 if share is None else share)

    order = sorted(scenes.itertuples(index=False), key=rank)
    bounds, crs = _window_bounds(outline, buffer)
    read = done.engine.plugins.caller(
        done.config.source.plugin, "cbm_source_read_window", done.config.source.where
    )
    bands = KINDS["falsecolour"]
    for scene in order[:BACKGROUND_TRIES]:
        if any(b not in scene.bands for b in bands):
            continue
        try:
            windows = [
                read(config=done.config.source, band=scene.bands[b], bounds=bounds, crs=crs) for b in bands
            ]
            data, transform, chip_crs, _ = _stack(windows, [scene.bands[b] for b in bands])
        except CbmError:
            continue
        if data is not None:
            date = pd.Timestamp(scene.obstime).tz_convert(None)
            return Chip(
                date,
                scene.obsid,
                "falsecolour",
                bands,
                data,
                transform,
                chip_crs,
                screened.get(str(scene.obsid), (None, None))[0],
                bounds=bounds,
                why=screened.get(str(scene.obsid), (None, None))[1],
            )
    return None


ORTHO_PIXELS = 512  # orthophoto pixels across a location map


def orthophoto_chip(run: RunLike, pid: int, source: str, buffer: float) -> tuple[Chip | None, str]:
    """The configured orthophoto (any raster GDAL opens: a file, a /vsicurl/ COG, a WMS XML) around
    the parcel, as an RGB chip; (None, why) when it cannot be read, so the map says so in place."""
    done = open_run(run)
    outline = gpd.GeoSeries([done.parcel(pid).geometry], crs=done.parcels.crs)
    bounds, crs = _window_bounds(outline, buffer)
    transform = from_bounds(*bounds, ORTHO_PIXELS, ORTHO_PIXELS)
    try:
        with rasterio.open(source) as src:
            count = min(src.count, 3)
            target = np.zeros((count, ORTHO_PIXELS, ORTHO_PIXELS), dtype="float64")
            reproject(
                rasterio.band(src, list(range(1, count + 1))),
                target,
                dst_transform=transform,
                dst_crs=crs,
                dst_nodata=np.nan,
                resampling=Resampling.bilinear,
            )
            top = 255.0 if src.dtypes[0] == "uint8" else float(np.nanmax(target)) or 1.0
    except (rasterio.errors.RasterioError, OSError) as exc:
        return None, f"orthophoto {source} not available: {' '.join(str(exc).split())[:120]}"
    if count < 3:
        target = np.repeat(target[:1], 3, axis=0)
    date = pd.Timestamp.now().normalize()
    chip = Chip(date, "orthophoto", "rgb", ("R", "G", "B"), np.clip(target / top, 0, 1), transform, crs, None)
    chip.bounds = bounds
    return chip, ""
