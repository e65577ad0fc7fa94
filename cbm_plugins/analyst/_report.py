"""Parcel reports: what an inspector reads before a field visit, as one HTML page and one PDF.

The HTML is self-contained (styles inline, figures as base64 PNG data URIs) so it can be mailed
or opened offline; the PDF holds the same content page by page (matplotlib, no browser needed).
Missing data is said in words where the plot or chips would be, never left as an empty space.
"""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import geopandas as gpd
import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cbm_core.errors import InputError
from cbm_plugins.analyst._chips import calendar, read_chips
from cbm_plugins.analyst._plots import (
    LIGHT_COLOURS,
    FinishedRun,
    RunLike,
    data_notes,
    observations,
    open_run,
    plot_parcel,
    plot_peers,
)

ATTRIBUTION = "Contains modified Copernicus Sentinel data."
REPORT_CHIPS = 12  # calendar size in reports: the clearest scenes of the run's period

STYLE = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 24px auto; max-width: 1100px; color: #212121; }
header { border-bottom: 3px solid #37474f; margin-bottom: 16px; }
section.parcel { page-break-before: always; margin-bottom: 40px; }
section.parcel:first-of-type { page-break-before: auto; }
h2 { display: flex; align-items: center; gap: 12px; }
.light { display: inline-block; padding: 4px 14px; border-radius: 14px; color: white; font-size: 0.8em; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #cfd8dc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eceff1; }
.note { background: #fff3e0; border-left: 5px solid #ef6c00; padding: 8px 12px; margin: 8px 0; }
img { max-width: 100%; display: block; margin: 8px 0 20px; border: 1px solid #eceff1; }
footer { color: #616161; font-size: 0.85em; border-top: 1px solid #cfd8dc; margin-top: 24px; }
"""


@dataclass
class ParcelPage:
    """One parcel's report content, rendered twice: HTML and PDF."""

    pid: int
    facts: list[tuple[str, str]]
    light: str
    reasons: list[str]
    notes: list[str]
    markers: pd.DataFrame
    figures: list[tuple[str, Figure]]


def flagged_pids(run: RunLike) -> list[int]:
    """Parcels whose verdict is red or yellow: the ones to look at."""
    done = open_run(run)
    flagged = done.verdicts[done.verdicts["light"].isin(["red", "yellow"])]
    return sorted(int(p) for p in flagged["pid"])


def write_report(
    run: RunLike, pids: Sequence[int], out_dir: str | Path, *, name: str | None = None
) -> tuple[Path, Path]:
    """Write `<name>.html` and `<name>.pdf` for the parcels (in the given order); return both paths.

    The name defaults to parcel-<pid> for one parcel and parcels for several.
    """
    done = open_run(run)
    if not pids:
        raise InputError("no parcels to report on")
    for pid in pids:
        done.parcel(pid)  # fail on an unknown pid before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or (f"parcel-{int(pids[0])}" if len(pids) == 1 else "parcels")
    html_path, pdf_path = out / f"{stem}.html", out / f"{stem}.pdf"
    sections = []
    with PdfPages(pdf_path) as pdf:
        for pid in pids:
            page = _parcel_page(done, int(pid))
            sections.append(_html_section(page))
            pdf.savefig(_text_page(page))
            for _, figure in page.figures:
                pdf.savefig(figure)
    html_path.write_text(_html_document(done, sections, len(pids)), encoding="utf-8")
    return html_path, pdf_path


def _parcel_page(done: FinishedRun, pid: int) -> ParcelPage:
    parcel = done.parcel(pid)
    light, reasons = done.verdict(pid)
    notes = data_notes(observations(done.series([pid]), pid), done.cards)
    found = read_chips(done, pid)
    if not found:
        notes.append("No Sentinel-2 imagery of this parcel in the run's period.")
    elif all(c.data is None for c in found):
        notes.append(f"No imagery could be shown for any of the {len(found)} Sentinel-2 dates.")
    figures = [
        ("Time series with marker events", plot_parcel(done, pid)),
        ("Compared with parcels declared with the same crop", plot_peers(done, pid)),
        ("Image chips (clearest dates)", calendar(done, pid, found=found, max_chips=REPORT_CHIPS)),
    ]
    return ParcelPage(
        pid, _facts(parcel, done.parcels.crs), light, reasons, notes, done.marker_results(pid), figures
    )


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


def _html_section(page: ParcelPage) -> str:
    colour = LIGHT_COLOURS.get(page.light, "#757575")
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in page.facts)
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in page.reasons)
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in page.notes)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in _marker_cells(row)) + "</tr>"
        for _, row in page.markers.iterrows()
    )
    markers = (
        "<table><tr><th>marker</th><th>status</th><th>events</th><th>confidence</th><th>reason</th></tr>"
        f"{rows}</table>"
        if rows
        else '<p class="note">No marker result for this parcel.</p>'
    )
    figures = "".join(
        f'<h3>{html.escape(t)}</h3><img alt="{html.escape(t)}" src="data:image/png;base64,{_png(fig)}">'
        for t, fig in page.figures
    )
    return (
        f'<section class="parcel" id="parcel-{page.pid}">'
        f'<h2>Parcel {page.pid} <span class="light" style="background:{colour}">'
        f"{html.escape(page.light.upper() or 'NO VERDICT')}</span></h2>"
        f"<table>{facts}</table><h3>Verdict reasons</h3><ul>{reasons}</ul>{notes}"
        f"<h3>Marker results</h3>{markers}{figures}</section>"
    )


def _html_document(done: FinishedRun, sections: list[str], count: int) -> str:
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    source = html.escape(str(done.config.path))
    parcels = f"{count} parcel{'s' if count != 1 else ''}"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>cbm parcel report ({parcels})</title><style>{STYLE}</style></head>"
        f"<body><header><h1>Checks by Monitoring: parcel report</h1>"
        f"<p>{parcels} from run <code>{source}</code>, made {made}.</p></header>"
        f"{''.join(sections)}<footer><p>{ATTRIBUTION} Verdicts are machine suggestions for the "
        "inspector; the reasons name the evidence behind them.</p></footer></body></html>"
    )


def _text_page(page: ParcelPage) -> Figure:
    """The HTML's text part as an A4 PDF page."""
    fig = Figure(figsize=(8.27, 11.69))
    lines = [f"Parcel {page.pid} — verdict {page.light.upper() or 'NONE'}", ""]
    lines += [f"{k}: {v}" for k, v in page.facts] + ["", "Verdict reasons:"]
    lines += [f"  • {r}" for r in page.reasons]
    if page.notes:
        lines += ["", "Data notes:"] + [f"  ! {n}" for n in page.notes]
    lines += ["", "Marker results:"]
    for _, row in page.markers.iterrows():
        marker, status, events, confidence, reason = _marker_cells(row)
        lines.append(f"  {marker}: {status}, events {events}, confidence {confidence} {reason}")
    wrapped = [c for line in lines for c in textwrap.wrap(line, 95, subsequent_indent="      ") or [""]]
    fig.text(0.06, 0.95, "\n".join(wrapped), va="top", family="DejaVu Sans", fontsize=9, linespacing=1.5)
    fig.text(0.06, 0.03, ATTRIBUTION, fontsize=7, color="0.4")
    band = Rectangle((0.0, 0.975), 1.0, 0.025, transform=fig.transFigure)
    band.set_color(LIGHT_COLOURS.get(page.light, "#757575"))
    fig.add_artist(band)
    return fig


def _marker_cells(row: pd.Series) -> tuple[str, str, str, str, str]:
    events = json.loads(row["events"] or "[]")
    described = ", ".join(f"{e.get('kind') or 'event'} {e['main']}" for e in events) or "none"
    confidence = "" if pd.isna(row["confidence"]) else f"{row['confidence']:.2f}"
    return str(row["marker"]), str(row["status"]), described, confidence, str(row["reason"] or "")


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _show(value) -> str:
    return "—" if value is None or pd.isna(value) or not str(value).strip() else str(value)
