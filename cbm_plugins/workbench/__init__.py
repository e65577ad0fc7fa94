"""The inspector's workbench: a map-first web page over a finished run.

Parcels coloured by their light on a slippy map (Leaflet, vendored: nothing is fetched from the
internet), filters by light, marker, crop and reason, a flagged-parcel list walked with the
keyboard, and a parcel panel (time series with valid and rejected observations and marker events,
chip calendar, verdict reasons, peers); a link per parcel (``#pid=...``). Backgrounds: Sentinel-2
false and true colour rendered from the run's own imagery as XYZ tiles (rio-tiler), and the
orthophoto of ``[analyst] orthophoto``.

Two ways to open it: ``cbm workbench export RUN_OR_CONFIG OUT/`` writes a folder whose
index.html opens from disk; ``cbm serve`` serves it at ``/workbench/`` with the same users and
per-aoi rights as the REST API (through the ``cbm_web_routes`` hook). Needs the ``workbench``
extra (matplotlib, jinja2, rio-tiler).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import click

from cbm_core import impl

__all__ = ["cbm_cli_commands", "cbm_web_routes"]


@click.group()
def workbench() -> None:
    """The inspector's workbench: a map of the parcels by light, with each parcel's evidence.

    `cbm serve` serves it at /workbench/ (same users and aoi rights as the API); `cbm workbench
    export` writes a folder that opens from disk.
    """


@workbench.command("export")
@click.argument("run", metavar="RUN_OR_CONFIG", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--chips",
    type=click.Choice(["flagged", "all", "none"]),
    default="flagged",
    show_default=True,
    help="Parcels whose chip calendar is exported (about a second each).",
)
@click.option(
    "--chip-limit",
    type=click.IntRange(0),
    default=500,
    show_default=True,
    help="At most this many calendars.",
)
@click.option("--no-backgrounds", is_flag=True, help="Skip the Sentinel-2 background tiles.")
def export_command(run: Path, out: Path, chips: str, chip_limit: int, no_backgrounds: bool) -> None:
    """Write the workbench of a finished run (its configuration or out folder) to OUT/.

    Open OUT/index.html in a browser: parcels as compact binary tiles, one panel file per parcel
    tile, chip calendars of the flagged parcels, Sentinel-2 background tiles of the clearest scene.
    """
    _require()
    from cbm_plugins.workbench._export import export

    done = export(run, out, chips=chips, chip_limit=chip_limit, background_tiles=not no_backgrounds)
    click.echo(
        f"{done['parcels']} parcels in {done['tiles']} tile(s), {done['chips']} chip calendar(s), "
        f"{done['background_tiles']} background tile(s): open {out / 'index.html'}"
    )
    for note in done["notes"]:
        click.echo(f"note: {note}")


def _require() -> None:
    from cbm_core.errors import ConfigError

    missing = [m for m in ("matplotlib", "jinja2", "rio_tiler") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the workbench needs {', '.join(missing)}: pip install 'cbm-engine[workbench]'")


@impl
def cbm_cli_commands(cli: click.Group) -> None:
    cli.add_command(workbench)


@impl
def cbm_web_routes(app: Any) -> None:
    if importlib.util.find_spec("rio_tiler") is None or importlib.util.find_spec("matplotlib") is None:
        return  # without the workbench extra, `cbm serve` serves the API alone
    from cbm_plugins.workbench._routes import install

    install(app)
