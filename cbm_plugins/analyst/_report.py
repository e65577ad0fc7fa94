"""Parcel reports for a field visit: one HTML page and one PDF, both from the same page content.

A report opens with a summary (counts by light over the whole run, the flagged parcels with their
reason and a link, a table of contents), then gives each parcel one A4 page: declaration, verdict
and reasons, a small location map over a background, the time series, and the chips just before
and after each marker event.

The HTML comes from Jinja2 templates with autoescape (``templates/report.html.j2`` and its print
stylesheet), so an agency can translate or brand it: ``[analyst] templates = "my-templates/"`` in
the run configuration puts a folder first on the template path. The HTML is self-contained (styles
inline, figures as PNG data URIs) so it can be mailed or opened offline. The PDF lays the same
content on A4 pages with matplotlib (no browser needed). Missing data is said in words where the
plot, map or chips would be.
"""

from __future__ import annotations

import base64
import io
import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.patheffects import withStroke

from cbm_core.errors import ConfigError
from cbm_plugins.analyst._chips import _north_arrow, _scale_bar, background, draw_chip, key_chips, read_chips
from cbm_plugins.analyst._plots import (
    LIGHT_COLOURS,
    FinishedRun,
    RunLike,
    data_notes,
    observations,
    open_run,
    plot_parcel,
)

ATTRIBUTION = "Contains modified Copernicus Sentinel data."
TEMPLATES = Path(__file__).with_name("templates")
A4_INCHES = (8.27, 11.69)
MAP_BUFFER_M = 400.0  # ground around the parcel on its location map
KEY_CHIPS = 6  # chips on a parcel page: before/after pairs of up to three events
KEY_CHIP_LABEL_WIDTH = 24  # characters a line under a key chip (six chips share an A4 width)
SUMMARY_ROWS_PER_PAGE = 38  # flagged-parcel rows on one A4 summary page of the PDF
FIGURE_DPI = 110  # resolution of figures embedded in the HTML and laid on the PDF pages
NO_LIGHT_COLOUR = "#757575"


@dataclass
class ParcelPage:
    """One parcel's report content, rendered twice: HTML and PDF."""

    pid: int
    facts: list[tuple[str, str]]
    light: str
    reasons: list[str]
    notes: list[str]
    markers: list[tuple[str, str, str, str, str]]
    figures: dict[str, Figure] = field(default_factory=dict)  # location, series, chips

    @property
    def colour(self) -> str:
        return LIGHT_COLOURS.get(self.light, NO_LIGHT_COLOUR)


def flagged_pids(run: RunLike) -> list[int]:
    """Parcels whose verdict is red or yellow: the ones to look at.

    Parameters
    ----------
    run
        A finished run (configuration file, RunResult or opened run).

    Returns
    -------
    list[int]
        The pids, ascending.

    Examples
    --------
    >>> flagged_pids("demo/flanders.toml")  # doctest: +SKIP
    [1, 2, 3, 5, 7, 9, 10, 12, 14, 16, 18]
    """
    done = open_run(run)
    flagged = done.verdicts[done.verdicts["light"].isin(["red", "yellow"])]
    return sorted(int(p) for p in flagged["pid"])


def write_report(
    run: RunLike, pids: Sequence[int], out_dir: str | Path, *, name: str | None = None
) -> tuple[Path, Path]:
    """Write `<name>.html` and `<name>.pdf`: a summary page, then one A4 page per parcel.

    Parameters
    ----------
    run
        A finished run (configuration file, RunResult or opened run).
    pids
        The parcels, in report order. Empty gives the summary alone, which says that there is
        no parcel to report on.
    out_dir
        Folder to write to (made when missing).
    name
        File stem; defaults to parcel-<pid> for one parcel and parcels otherwise.

    Returns
    -------
    tuple[Path, Path]
        The HTML and the PDF.

    Examples
    --------
    >>> run = "demo/flanders.toml"
    >>> html, pdf = write_report(run, flagged_pids(run), "report/")  # doctest: +SKIP
    """
    done = open_run(run)
    environment = template_environment(done)
    for pid in pids:
        done.parcel(pid)  # fail on an unknown pid before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or (f"parcel-{int(pids[0])}" if len(pids) == 1 else "parcels")
    html_path, pdf_path = out / f"{stem}.html", out / f"{stem}.pdf"
    summary = _summary(done, pids)
    pages = [_parcel_page(done, int(pid)) for pid in pids]
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    html = environment.get_template("report.html.j2").render(
        run=str(done.config.path),
        made=made,
        summary=summary,
        parcels=[_html_parcel(page) for page in pages],
        attribution=ATTRIBUTION,
        style=environment.get_template("report.css").render(),
    )
    html_path.write_text(html, encoding="utf-8")
    with PdfPages(pdf_path) as pdf:
        for figure in _summary_pages(summary, str(done.config.path), made):
            pdf.savefig(figure)
        for page in pages:
            pdf.savefig(_a4_page(page))
    return html_path, pdf_path


def template_environment(run: RunLike) -> Environment:
    """Jinja2 with autoescape: the run's ``[analyst] templates`` folder first, then the shipped one."""
    done = open_run(run)
    options = done.config.analyst  # its keys are checked with the configuration (RUN_KEYS)
    folders = [TEMPLATES]
    if options.get("templates") is not None:
        own = options.path("templates")
        if not own.is_dir():
            raise ConfigError(f"{options.where}: templates folder {own} not found")
        folders.insert(0, own)
    return Environment(
        loader=ChoiceLoader([FileSystemLoader(str(f)) for f in folders]),
        autoescape=select_autoescape(["html", "j2", "css"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )


# Content ---------------------------------------------------------------------------------------


def _summary(done: FinishedRun, pids: Sequence[int]) -> dict[str, Any]:
    """Counts by light over the run, and the reported parcels that are flagged, with their reason."""
    lights = done.verdicts["light"].astype(str)
    counts = [
        (light, int((lights == light).sum()), LIGHT_COLOURS[light]) for light in ("red", "yellow", "green")
    ]
    rows = []
    for pid in pids:
        light, reasons = done.verdict(pid)
        parcel = done.parcel(pid)
        rows.append(
            {
                "pid": int(pid),
                "light": light,
                "colour": LIGHT_COLOURS.get(light, NO_LIGHT_COLOUR),
                "crop": _show(parcel["crop_name"])
                if _text(parcel["crop_name"])
                else _show(parcel["crop_code"]),
                "reason": reasons[0] if reasons else "",
                "flagged": light in ("red", "yellow"),
            }
        )
    return {"total": len(done.verdicts), "counts": counts, "rows": rows}


def _parcel_page(done: FinishedRun, pid: int) -> ParcelPage:
    parcel = done.parcel(pid)
    light, reasons = done.verdict(pid)
    notes = data_notes(observations(done.series([pid]), pid, done.policy), done.cards)
    found = read_chips(done, pid)
    if not found:
        notes.append("No Sentinel-2 imagery of this parcel in the run's period.")
    elif all(c.data is None for c in found):
        notes.append(f"No imagery could be shown for any of the {len(found)} Sentinel-2 dates.")
    page = ParcelPage(pid, _facts(parcel, done.parcels.crs), light, reasons, notes, _marker_rows(done, pid))
    series = plot_parcel(done, pid)
    series.set_size_inches(10, 5.6)
    page.figures = {
        "location": _location_map(done, pid),
        "series": series,
        "chips": _key_chip_figure(done, pid, found),
    }
    return page


def _facts(parcel: pd.Series, crs) -> list[tuple[str, str]]:
    """The declaration and where to find the field."""
    shape = gpd.GeoSeries([parcel.geometry], crs=crs)
    facts = [
        ("parcel id", str(int(parcel["pid"]))),
        ("declared crop code", _show(parcel["crop_code"])),
        ("declared crop", _show(parcel["crop_name"])),
    ]
    if shape.iloc[0] is not None and not shape.iloc[0].is_empty:
        metric = shape if shape.crs.is_projected else shape.to_crs(shape.estimate_utm_crs())
        centre = metric.centroid.to_crs("EPSG:4326").iloc[0]
        facts += [
            ("area", f"{metric.area.iloc[0] / 10_000:.2f} ha"),
            ("centre (WGS84 lat, lon)", f"{centre.y:.5f}, {centre.x:.5f}"),
        ]
    if parcel.get("issue"):
        facts.append(("geometry issue", str(parcel["issue"])))
    return facts


def _marker_rows(done: FinishedRun, pid: int) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for _, row in done.marker_results(pid).iterrows():
        events = json.loads(row["events"] or "[]")
        described = ", ".join(f"{e.get('kind') or 'event'} {e['main']}" for e in events) or "none"
        confidence = "" if pd.isna(row["confidence"]) else f"{row['confidence']:.2f}"
        rows.append((str(row["marker"]), str(row["status"]), described, confidence, str(row["reason"] or "")))
    return rows


def _location_map(done: FinishedRun, pid: int) -> Figure:
    """The parcel (thick) and its neighbours (in their light) over the clearest Sentinel-2 picture or
    the configured orthophoto; says so in place when there is no background."""
    fig = Figure(figsize=(3.2, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.set_xticks([])
    ax.set_yticks([])
    parcel = done.parcel(pid)
    outline = gpd.GeoSeries([parcel.geometry], crs=done.parcels.crs)
    if parcel.geometry is None or parcel.geometry.is_empty:
        ax.text(0.5, 0.5, "no geometry", ha="center", va="center", transform=ax.transAxes, color="#b71c1c")
        return fig
    picture, message = _background(done, pid)
    metric = outline if outline.crs.is_projected else outline.to_crs(outline.estimate_utm_crs())
    crs = picture.crs if picture is not None else metric.crs
    if picture is not None:
        draw_chip(ax, picture, outline, size=256, scale_bar=False)
        source = "orthophoto" if picture.kind == "rgb" else f"Sentinel-2 {picture.date:%Y-%m-%d}"
        ax.set_title(f"background: {source}", fontsize=7)
        left, right = ax.get_xlim()
        bottom, top = ax.get_ylim()
    else:
        x0, y0, x1, y1 = metric.total_bounds
        half = max(x1 - x0, y1 - y0) / 2 + MAP_BUFFER_M
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left, right, bottom, top = cx - half, cx + half, cy - half, cy + half
        ax.set_facecolor("#eeeeee")
        ax.text(
            0.5,
            0.06,
            message,
            ha="center",
            va="bottom",
            transform=ax.transAxes,
            fontsize=7,
            color="#b71c1c",
            wrap=True,
        )
    window = gpd.GeoSeries.from_xy([left, right], [bottom, top], crs=crs).to_crs(done.parcels.crs)
    near = (
        done.verdicts.cx[window.x.min() : window.x.max(), window.y.min() : window.y.max()]
        if done.verdicts.crs == done.parcels.crs
        else done.verdicts
    )
    near = near[near["pid"] != int(pid)]
    if not near.empty:
        for light, group in near.groupby("light"):
            group.to_crs(crs).boundary.plot(ax=ax, color=LIGHT_COLOURS.get(str(light), NO_LIGHT_COLOUR), lw=1)
    outline.to_crs(crs).boundary.plot(
        ax=ax, color="#ffeb3b", lw=2.4, path_effects=[withStroke(linewidth=4.5, foreground="black")]
    )
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_xlabel("")
    ax.set_ylabel("")
    _scale_bar(ax, left, right, bottom, top)
    _north_arrow(ax)
    return fig


def _background(done: FinishedRun, pid: int):
    """(picture, "") or (None, why): the configured orthophoto first, then Sentinel-2."""
    ortho = done.config.analyst.get("orthophoto")
    if ortho is not None:
        from cbm_plugins.analyst._chips import orthophoto_chip

        picture, message = orthophoto_chip(done, pid, str(ortho), MAP_BUFFER_M)
        if picture is not None:
            return picture, ""
        return None, message
    picture = background(done, pid, MAP_BUFFER_M)
    return picture, "" if picture is not None else "no background: no Sentinel-2 imagery here"


def _key_chip_figure(done: FinishedRun, pid: int, found) -> Figure:
    """The chips before and after each marker event (or the best dates), in one row."""
    chosen = key_chips(found, KEY_CHIPS)
    outline = gpd.GeoSeries([done.parcel(pid).geometry], crs=done.parcels.crs)
    if not chosen:
        fig = Figure(figsize=(10, 1.2))
        fig.text(
            0.5,
            0.5,
            "no Sentinel-2 picture of this parcel to show",
            ha="center",
            va="center",
            fontsize=12,
            color="#b71c1c",
        )
        return fig
    fig = Figure(figsize=(10, 2.5), layout="constrained")
    axes = fig.subplots(1, KEY_CHIPS, squeeze=False)[0]
    for i, (ax, (caption, chip)) in enumerate(zip(axes, chosen, strict=False)):
        draw_chip(ax, chip, outline, scale_bar=i == 0)
        label = "\n".join(textwrap.wrap(chip.label.replace(" · ", ", "), KEY_CHIP_LABEL_WIDTH)[:3])
        ax.set_title(f"{caption}\n{label}", fontsize=6.5)
    for ax in axes[len(chosen) :]:
        ax.set_axis_off()
    return fig


# HTML ------------------------------------------------------------------------------------------


def _html_parcel(page: ParcelPage) -> dict[str, Any]:
    return {
        "pid": page.pid,
        "light": page.light,
        "colour": page.colour,
        "facts": page.facts,
        "reasons": page.reasons,
        "notes": page.notes,
        "markers": page.markers,
        "figures": {key: _png(figure) for key, figure in page.figures.items()},
    }


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# PDF -------------------------------------------------------------------------------------------


def _summary_pages(summary: dict[str, Any], run: str, made: str) -> list[Figure]:
    """The summary as A4 pages: counts by light, then the reported parcels, SUMMARY_ROWS_PER_PAGE each."""
    rows = summary["rows"]
    chunks = [rows[i : i + SUMMARY_ROWS_PER_PAGE] for i in range(0, max(len(rows), 1), SUMMARY_ROWS_PER_PAGE)]
    pages = []
    for number, chunk in enumerate(chunks):
        fig = Figure(figsize=A4_INCHES)
        fig.text(0.06, 0.95, "Checks by Monitoring: parcel report", fontsize=16, weight="bold")
        fig.text(0.06, 0.925, f"run {run}, made {made}", fontsize=8, color="0.35")
        y = 0.89
        if number == 0:
            counts = ", ".join(f"{n} {light}" for light, n, _ in summary["counts"])
            fig.text(0.06, y, f"{summary['total']} parcels in the run: {counts}", fontsize=10)
            x = 0.06
            for _, n, colour in summary["counts"]:
                share = n / max(summary["total"], 1)
                fig.add_artist(
                    Rectangle((x, y - 0.03), 0.88 * share, 0.018, color=colour, transform=fig.transFigure)
                )
                x += 0.88 * share
            y -= 0.06
            if not any(r["flagged"] for r in summary["rows"]):
                fig.text(0.06, y, "No red or yellow parcel in this report.", fontsize=11, color="#b71c1c")
                y -= 0.03
        fig.text(0.06, y, "parcel", fontsize=8, weight="bold")
        fig.text(0.16, y, "light", fontsize=8, weight="bold")
        fig.text(0.25, y, "crop", fontsize=8, weight="bold")
        fig.text(0.40, y, "reason", fontsize=8, weight="bold")
        for row in chunk:
            y -= 0.021
            fig.text(0.06, y, str(row["pid"]), fontsize=8)
            fig.add_artist(
                Rectangle((0.16, y - 0.002), 0.012, 0.01, color=row["colour"], transform=fig.transFigure)
            )
            fig.text(0.177, y, row["light"] or "none", fontsize=8)
            fig.text(0.25, y, _clip(row["crop"], 22), fontsize=8)
            fig.text(0.40, y, _clip(row["reason"], 95), fontsize=7)
        fig.text(
            0.06, 0.03, f"{ATTRIBUTION}  Summary page {number + 1} of {len(chunks)}.", fontsize=7, color="0.4"
        )
        pages.append(fig)
    return pages


def _a4_page(page: ParcelPage) -> Figure:
    """One parcel on one A4 page: header band, facts and reasons beside the map, series, chips."""
    fig = Figure(figsize=A4_INCHES)
    fig.add_artist(Rectangle((0, 0.965), 1, 0.035, color=page.colour, transform=fig.transFigure))
    fig.text(
        0.05,
        0.973,
        f"Parcel {page.pid} — verdict {page.light.upper() or 'NONE'}",
        fontsize=13,
        color="white",
        weight="bold",
    )
    lines = [f"{k}: {v}" for k, v in page.facts] + ["", "Verdict reasons:"]
    lines += [f"• {_clip(r, 70)}" for r in page.reasons[:6]]
    if page.notes:
        lines += ["", *(f"! {_clip(n, 70)}" for n in page.notes[:4])]
    lines += ["", "Markers:"] + [
        _clip(f"{m}: {status}, events {events}{f', confidence {c}' if c else ''}", 70)
        for m, status, events, c, _ in page.markers[:5]
    ]
    fig.text(0.05, 0.945, "\n".join(lines[:30]), va="top", fontsize=7.5, linespacing=1.45)
    _place(fig, page.figures["location"], (0.60, 0.66, 0.36, 0.29))
    _place(fig, page.figures["series"], (0.04, 0.25, 0.92, 0.40))
    _place(fig, page.figures["chips"], (0.04, 0.05, 0.92, 0.19))
    fig.text(0.05, 0.02, ATTRIBUTION, fontsize=7, color="0.4")
    return fig


def _place(fig: Figure, figure: Figure, box: tuple[float, float, float, float]) -> None:
    """A figure rendered to pixels and fitted (aspect kept) into a box of the page."""
    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(150)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())
    ax = fig.add_axes(box)
    ax.imshow(pixels, interpolation="antialiased")
    ax.set_axis_off()
    ax.set_anchor("N")


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _text(value: Any) -> bool:
    return (
        value is not None
        and not (isinstance(value, float) and math.isnan(value))
        and str(value).strip() != ""
    )


def _show(value) -> str:
    return "—" if value is None or pd.isna(value) or not str(value).strip() else str(value)
