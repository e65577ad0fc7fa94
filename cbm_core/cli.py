"""The `cbm` command line: parse, call the pipeline, print. Plugins add commands via a hook."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cbm_core.config import PluginConfig, load_run_config
from cbm_core.errors import CbmError
from cbm_core.plugins import DISABLED_ENV, TRACE_ENV, PluginManager, load_plugins

if TYPE_CHECKING:
    from cbm_core.pipeline import Engine


class CbmGroup(click.Group):
    """Turns the user's mistakes (CbmError) into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CbmError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=CbmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cbm-engine")
def cli() -> None:
    """cbm-engine: Checks by Monitoring from parcels and Sentinel imagery to traffic lights.

    Parcels and scenes come from a source (local files by default), are reduced to per-parcel
    signatures by extractors, scored by markers and turned into green/yellow/red verdicts by a
    decision rule. Every step is a plugin: `cbm plugins` lists what is installed.

    \b
    Environment:
      CBM_DISABLED_PLUGINS=a,b   do not load these plugins
      CBM_TRACE_PLUGINS=1        print every hook call to stderr
    """


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Extract every scene again, even those already in the store.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--cluster", "address", metavar="tcp://HOST:PORT", help="Run on this dask scheduler.")
@click.option("--workers", type=click.IntRange(min=1), help="Run on a local dask cluster of N workers.")
def run(config: Path, force: bool, quiet: bool, address: str | None, workers: int | None) -> None:
    """Run CONFIG (TOML): extract missing scenes, run markers and rules, write verdicts.

    Writes to the config's [run] out folder: verdicts.gpkg and verdicts.csv (one row per parcel
    with light and reasons), markers.parquet (every marker result), summary.json, and the
    signature store (Parquet, by default out/signatures). Re-running skips stored scenes.
    With --cluster, --workers or a [cluster] table, scenes and parcel partitions run on dask.
    """
    from dataclasses import replace

    from cbm_core.pipeline import Engine

    if address and workers:
        raise click.UsageError("give either --cluster (a running scheduler) or --workers (a local cluster)")
    settings = load_run_config(config)
    if address or workers:
        settings = replace(settings, cluster=replace(settings.cluster, address=address, workers=workers))
    result = Engine(plugins=_plugins(), progress=False if quiet else None).run(settings, force=force)
    summary = result.summary
    scenes = summary["scenes"]
    click.echo(
        f"{summary['parcels']} parcels; scenes: {scenes['extracted']} extracted, "
        f"{scenes['skipped_already_stored']} already stored, {len(scenes['failed'])} failed"
    )
    for obsid, reason in scenes["failed"].items():
        click.echo(f"  failed {obsid}: {reason}", err=True)
    for unit in summary.get("cluster", {}).get("failed_units", []):
        if not unit["unit"].startswith("scene "):  # failed scenes are listed above
            click.echo(f"  failed {unit['unit']}: {unit['reason']}", err=True)
    lights = summary["verdicts"]
    click.echo(f"verdicts: {lights['green']} green, {lights['yellow']} yellow, {lights['red']} red")
    click.echo(f"written to {settings.out_dir}")


@cli.command()
@click.option(
    "--parcels", "parcels_path", required=True, type=click.Path(path_type=Path), help="Parcel file."
)
@click.option(
    "--scenes", "scenes_path", required=True, type=click.Path(path_type=Path), help="Catalogue CSV."
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Signatures Parquet file to write."
)
@click.option(
    "--bands",
    "band_specs",
    multiple=True,
    metavar="CARD:B1,B2",
    help="Bands per card, e.g. s2:B04,B08,SCL (repeatable). Default: every band of every card.",
)
@click.option("--extractor", default="zonal", show_default=True, help="Extractor plugin.")
@click.option("--pid-column", default="pid", show_default=True, help="Parcel id column.")
@click.option("--source", default="local", show_default=True, help="Source plugin reading the files.")
def extract(
    parcels_path: Path,
    scenes_path: Path,
    out: Path,
    band_specs: tuple[str, ...],
    extractor: str,
    pid_column: str,
    source: str,
) -> None:
    """Reduce scenes to per-parcel signatures, written as one tidy Parquet file.

    The file has one row per parcel, scene and band (count, mean, std, min, max, p25, p50, p75 in
    physical units) with the scene's date and card and its SCL histogram (hist_0..hist_11):
    the format `cbm score` reads.
    """
    from cbm_core.pipeline import Engine, signatures_table

    requested = _parse_bands(band_specs)
    engine = Engine(plugins=_plugins())
    config = PluginConfig(
        source,
        {"parcels": str(parcels_path), "scenes": str(scenes_path), "pid_column": pid_column},
        Path.cwd(),
        "--parcels/--scenes",
    )
    parcels = engine.parcels(config)
    catalogue = engine.catalogue(config)
    bands = requested or {
        card: sorted({b for bands in group["bands"] for b in bands})
        for card, group in catalogue.groupby("card")
    }
    jobs = [
        PluginConfig(extractor, {"card": c, "bands": b}, Path.cwd(), f"--bands {c}") for c, b in bands.items()
    ]
    signatures, report = engine.extract(parcels, catalogue, jobs, config)
    for obsid, reason in report.failed.items():
        click.echo(f"failed {obsid}: {reason}", err=True)
    table = signatures_table(signatures, catalogue)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out, index=False)
    click.echo(f"{len(table)} signature rows from {len(report.extracted)} scene(s) written to {out}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins: name, version, kind, origin and the hooks they implement."""
    manager = _plugins()
    infos = [vars(i) for i in sorted(manager.infos.values(), key=lambda i: (i.kind, i.name))]
    refused = [{"name": n, "reason": r} for n, r in sorted(manager.refused.items())]
    if as_json:
        click.echo(json.dumps({"plugins": infos, "refused": refused}, indent=2))
        return
    width = max((len(i["name"]) for i in infos), default=4)
    for info in infos:
        click.echo(
            f"{info['name']:<{width}}  {info['kind']:<10} {info['version']:<10} {info['origin']:<12} "
            f"{info['description']}"
        )
        click.echo(f"{'':<{width}}  hooks: {', '.join(info['hooks'])}")
    for item in refused:
        click.echo(f"{item['name']:<{width}}  not loaded: {item['reason']}")
    click.echo(f"\n{DISABLED_ENV}=a,b blocks plugins; {TRACE_ENV}=1 traces hook calls.", err=True)


@cli.command()
def schemes() -> None:
    """List the scheme recipes installed plugins ship (usable as `scheme = "NAME"`)."""
    for found in _plugins().hook.cbm_rule_schemes():
        for name, path in sorted(found.items()):
            click.echo(f"{name:<24} {path}")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("pid", type=int)
@click.option("--out", type=click.Path(path_type=Path), help="PNG to write (default: parcel-PID.png).")
@click.option("--peers", is_flag=True, help="Compare with the parcels declared with the same crop instead.")
def plot(config: Path, pid: int, out: Path | None, peers: bool) -> None:
    """Plot parcel PID of the finished run CONFIG: NDVI (clear vs cloudy), S1 dB, coherence.

    Marker events are drawn as dated lines and spans, the verdict and its reasons in the title.
    """
    from cbm_core.plots import open_run, plot_parcel, plot_peers

    done = open_run(config, _analyst_engine())
    figure = (plot_peers if peers else plot_parcel)(done, pid)
    target = out or Path(f"parcel-{pid}{'-peers' if peers else ''}.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=110)
    click.echo(f"written to {target}")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("pid", type=int)
@click.option("--start", metavar="YYYY-MM-DD", help="First date (default: the first scene).")
@click.option("--end", metavar="YYYY-MM-DD", help="Last date (default: the last scene).")
@click.option("--kind", type=click.Choice(["falsecolour", "ndvi"]), default="falsecolour", show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write to.")
def chips(config: Path, pid: int, start: str | None, end: str | None, kind: str, out: Path) -> None:
    """Sentinel-2 image chips around parcel PID of CONFIG's run, read by windows.

    Writes per date a PNG with the parcel outline and a full-resolution GeoTIFF (physical
    values), plus calendar.png: all dates in a grid. Dates without imagery say why.
    """
    from cbm_core.chips import write_chips
    from cbm_core.plots import open_run

    written = write_chips(open_run(config, _analyst_engine()), pid, out, start, end, kind=kind)
    dates = (len(written) - 1) // 2
    click.echo(f"{dates} chip(s) and calendar.png written to {out}")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("pids", nargs=-1, type=int)
@click.option("--flagged", is_flag=True, help="Report on every red and yellow parcel.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write to.")
def report(config: Path, pids: tuple[int, ...], flagged: bool, out: Path) -> None:
    """Parcel report (HTML + PDF) for PIDS, or --flagged parcels, of CONFIG's finished run.

    One page per parcel: declaration, verdict and reasons, marker results, time-series plots and
    the chip calendar; what an inspector reads before a field visit.
    """
    from cbm_core.plots import open_run
    from cbm_core.report import flagged_pids, write_report

    if bool(pids) == flagged:
        raise click.UsageError("give parcel ids or --flagged (not both)")
    done = open_run(config, _analyst_engine())
    chosen = flagged_pids(done) if flagged else list(pids)
    if not chosen:
        click.echo("no red or yellow parcel: nothing to report")
        return
    html_path, pdf_path = write_report(done, chosen, out, name="flagged" if flagged else None)
    click.echo(f"{len(chosen)} parcel(s): {html_path} and {pdf_path}")


@cli.command()
@click.option(
    "--signatures",
    "signatures",
    required=True,
    type=click.Path(path_type=Path),
    help="Tidy signature table, Parquet or CSV (as written by `cbm extract`).",
)
@click.option("--scheme", required=True, help="Scheme recipe name (`cbm schemes`) or TOML file.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--parcels",
    "parcels_path",
    type=click.Path(path_type=Path),
    help="Declared parcels (pid, crop_code, crop_name, geometry); default: pids of the table.",
)
@click.option(
    "--scale",
    default="reflectance",
    show_default=True,
    help="S2 values in the table: 'reflectance' (0..1), 'dn' (x 1e-4) or a factor.",
)
@click.option(
    "--offset",
    default=0.0,
    show_default=True,
    help="Added to S2 reflectance after scaling (e.g. -0.1 for DN of baseline >= 04.00).",
)
def score(
    signatures: Path, scheme: str, out: Path, parcels_path: Path | None, scale: str, offset: float
) -> None:
    """Run a scheme's markers and rule on ready-made signatures (another backend's statistics).

    Writes verdicts.gpkg/csv, markers.parquet and summary.json to OUT, as `cbm run` does.
    """
    from cbm_core.pipeline import Engine
    from cbm_core.score import score as run_score

    engine = Engine(plugins=_plugins(), progress=False)
    results, verdicts = run_score(signatures, scheme, out, parcels_path, scale, offset, engine=engine)
    lights = verdicts["light"].value_counts()
    counts = {light: int(lights.get(light, 0)) for light in ("green", "yellow", "red")}
    click.echo(
        f"{len(verdicts)} parcels, {len(results)} marker results; verdicts: {counts['green']} green, "
        f"{counts['yellow']} yellow, {counts['red']} red; written to {out}"
    )


@cli.command()
@click.option(
    "--results",
    "results_path",
    type=click.Path(path_type=Path),
    help="Marker results (markers.parquet of `cbm run`/`cbm score`).",
)
@click.option(
    "--reference",
    "reference_path",
    type=click.Path(path_type=Path),
    help="Reference CSV/Parquet: pid,date[,kind] (events) or pid,crop (crop type).",
)
@click.option("--marker", help="Evaluate this marker only (its name in the results).")
@click.option("--tolerance", default=12.0, show_default=True, help="Event matching tolerance, days.")
@click.option(
    "--simulate",
    "n_parcels",
    type=int,
    help="Instead: simulate N parcel-years with known events and evaluate a scheme on them.",
)
@click.option("--scheme", default="grassland-mowing", show_default=True, help="Scheme for --simulate.")
@click.option("--seed", default=42, show_default=True, help="Random seed for --simulate.")
def evaluate(
    results_path: Path | None,
    reference_path: Path | None,
    marker: str | None,
    tolerance: float,
    n_parcels: int | None,
    scheme: str,
    seed: int,
) -> None:
    """Event precision/recall/F1 (+-12 days, one-to-one) or crop confusion matrices, as JSON."""
    from cbm_core.evaluate import evaluate_files, evaluate_simulation

    if n_parcels:
        from cbm_core.pipeline import Engine

        engine = Engine(plugins=_plugins(), progress=False)
        report = evaluate_simulation(n_parcels, scheme, engine, seed=seed, tolerance_days=tolerance)
    elif results_path and reference_path:
        report = evaluate_files(results_path, reference_path, marker, tolerance)
    else:
        raise click.UsageError("give --results and --reference, or --simulate N")
    click.echo(json.dumps(report, indent=2, default=str))


def _analyst_engine() -> Engine:
    """An engine on the CLI's plugin manager, quiet: plots and reports read, they do not extract."""
    from cbm_core.pipeline import Engine

    return Engine(plugins=_plugins(), progress=False)


def _parse_bands(specs: tuple[str, ...]) -> dict[str, list[str]]:
    bands = {}
    for spec in specs:
        card, sep, names = spec.partition(":")
        if not sep or not names:
            raise click.BadParameter(
                f"{spec!r}: expected CARD:BAND,BAND (e.g. s2:B04,B08)", param_hint="--bands"
            )
        bands[card.strip()] = [n.strip() for n in names.split(",") if n.strip()]
    return bands


_MANAGER: PluginManager | None = None


def _plugins() -> PluginManager:
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = load_plugins()
    return _MANAGER


def main() -> None:
    """Console entry point: plugins may add commands before the command line is parsed."""
    if importlib.util.find_spec("fastapi") is not None:  # the serve extra: `cbm serve`, `cbm users`
        from cbm_core.server import add_commands

        add_commands(cli)
    try:
        _plugins().hook.cbm_cli_commands(cli=cli)
    except CbmError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    cli(prog_name="cbm")
