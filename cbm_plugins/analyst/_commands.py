"""`cbm plot`, `cbm chips` and `cbm report`: the analyst plugin's commands.

The commands are listed even without the ``analyst`` extra; they load matplotlib when run and
say which extra to install when it is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import click

from cbm_core.api import engine
from cbm_core.errors import ConfigError
from cbm_core.pipeline import Engine

COMMANDS: list[click.Command] = []


def _open(config: Path) -> Any:
    """The finished run of CONFIG, read by a quiet engine (plots and reports read, never extract)."""
    if importlib.util.find_spec("matplotlib") is None or importlib.util.find_spec("jinja2") is None:
        raise ConfigError(
            "plots, chips and reports need matplotlib and jinja2: pip install 'cbm-engine[analyst]'"
        )
    from cbm_plugins.analyst._plots import open_run

    return open_run(config, Engine(plugins=engine().plugins, progress=False))


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("pid", type=int)
@click.option("--out", type=click.Path(path_type=Path), help="PNG to write (default: parcel-PID.png).")
@click.option("--peers", is_flag=True, help="Compare with the parcels declared with the same crop instead.")
def plot(config: Path, pid: int, out: Path | None, peers: bool) -> None:
    """Plot parcel PID of the finished run CONFIG: NDVI (clear vs cloudy), S1 dB, coherence.

    Marker events are drawn as dated lines and spans, the verdict and its reasons in the title.
    """
    done = _open(config)
    from cbm_plugins.analyst._plots import plot_parcel, plot_peers

    figure = (plot_peers if peers else plot_parcel)(done, pid)
    target = out or Path(f"parcel-{pid}{'-peers' if peers else ''}.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=110)
    click.echo(f"written to {target}")


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("pid", type=int)
@click.option("--start", metavar="YYYY-MM-DD", help="First date (default: the first scene).")
@click.option("--end", metavar="YYYY-MM-DD", help="Last date (default: the last scene).")
@click.option("--kind", type=click.Choice(["falsecolour", "ndvi"]), default="falsecolour", show_default=True)
@click.option(
    "--size", type=click.IntRange(16, 4096), default=128, show_default=True, help="Pixels across a chip."
)
@click.option(
    "--buffer",
    type=click.FloatRange(0),
    default=50.0,
    show_default=True,
    help="Metres of ground around the parcel's bounding box.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write to.")
def chips(
    config: Path, pid: int, start: str | None, end: str | None, kind: str, size: int, buffer: float, out: Path
) -> None:
    """Sentinel-2 image chips around parcel PID of CONFIG's run, read by windows.

    Writes per date a PNG (parcel centred with its outline, scale bar, north arrow, colour bar
    for NDVI) and a full-resolution GeoTIFF (physical values), plus calendar.png: the dates in a
    grid, observations a marker used framed in purple, marker event dates in red. Dates without
    imagery say why.
    """
    done = _open(config)
    from cbm_plugins.analyst._chips import write_chips

    written = write_chips(done, pid, out, start, end, kind=kind, size=size, buffer=buffer)
    dates = (len(written) - 1) // 2
    click.echo(f"{dates} chip(s) and calendar.png written to {out}")


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("pids", nargs=-1, type=int)
@click.option("--flagged", is_flag=True, help="Report on every red and yellow parcel.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write to.")
def report(config: Path, pids: tuple[int, ...], flagged: bool, out: Path) -> None:
    """Field-visit report (HTML + PDF) on PIDS, or on the --flagged parcels, of CONFIG's run.

    A summary page (parcels by light, the reported parcels with their reason and a link, a
    table of contents), then one A4 page per parcel: declaration, verdict and reasons, a location
    map over a Sentinel-2 (or the configured orthophoto) background, the time series with the
    marker events, and the chips before and after each event. The HTML is self-contained and
    prints one page per parcel; the PDF has the same pages. `[analyst] templates = "folder/"` in
    CONFIG overrides the Jinja2 templates (report.html.j2, report.css).
    """
    if bool(pids) == flagged:
        raise click.UsageError("give parcel ids or --flagged (not both)")
    done = _open(config)
    from cbm_plugins.analyst._report import flagged_pids, write_report

    chosen = flagged_pids(done) if flagged else list(pids)
    html_path, pdf_path = write_report(done, chosen, out, name="flagged" if flagged else None)
    if not chosen:
        click.echo(f"no red or yellow parcel: the summary says so in {html_path} and {pdf_path}")
        return
    click.echo(f"{len(chosen)} parcel(s): {html_path} and {pdf_path}")


COMMANDS.extend([plot, chips, report])
