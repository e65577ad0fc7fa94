"""The `cbm` command line: parse, call the pipeline, print. Plugins add commands via a hook."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cbm_core.config import PluginConfig, load_run_config
from cbm_core.errors import CbmError
from cbm_core.plugins import DISABLED_ENV, TRACE_ENV, PluginManager, load_plugins


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
def run(config: Path, force: bool, quiet: bool) -> None:
    """Run CONFIG (TOML): extract missing scenes, run markers and rules, write verdicts.

    Writes to the config's [run] out folder: verdicts.gpkg and verdicts.csv (one row per parcel
    with light and reasons), markers.parquet (every marker result), summary.json, and the
    signature store (Parquet, by default out/signatures). Re-running skips stored scenes.
    """
    from cbm_core.pipeline import Engine

    settings = load_run_config(config)
    result = Engine(plugins=_plugins(), progress=False if quiet else None).run(settings, force=force)
    summary = result.summary
    scenes = summary["scenes"]
    click.echo(
        f"{summary['parcels']} parcels; scenes: {scenes['extracted']} extracted, "
        f"{scenes['skipped_already_stored']} already stored, {len(scenes['failed'])} failed"
    )
    for obsid, reason in scenes["failed"].items():
        click.echo(f"  failed {obsid}: {reason}", err=True)
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
    try:
        _plugins().hook.cbm_cli_commands(cli=cli)
    except CbmError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    cli(prog_name="cbm")
