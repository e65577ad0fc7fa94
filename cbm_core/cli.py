"""The `cbm` command line: parse, call the pipeline, print. Plugins add commands via a hook."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from cbm_core import logs
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


class RootGroup(CbmGroup):
    """`cbm` itself: asks the installed plugins for their commands (``cbm_cli_commands``) the first
    time a command is looked up, so plugin commands are there however `cbm` is invoked."""

    plugin_commands_loaded = False

    def _load_plugin_commands(self) -> None:
        if not self.plugin_commands_loaded:
            self.plugin_commands_loaded = True
            try:
                _plugins().hook.cbm_cli_commands(cli=self)
            except CbmError as exc:
                raise click.ClickException(str(exc)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_plugin_commands()
        return super().get_command(ctx, cmd_name)


log = logging.getLogger(__name__)


@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cbm-engine")
@click.option(
    "--log-level", type=click.Choice(logs.LEVELS, case_sensitive=False), envvar=logs.LEVEL_ENV,
    default=logs.DEFAULT_LEVEL, show_default=True, help="Least severe log records shown (on stderr).",
)  # fmt: skip
@click.option(
    "--log-format", type=click.Choice(logs.FORMATS, case_sensitive=False), envvar=logs.FORMAT_ENV,
    default=logs.DEFAULT_FORMAT, show_default=True, help="text for people, json: one object per line.",
)  # fmt: skip
def cli(log_level: str, log_format: str) -> None:
    """cbm-engine: Checks by Monitoring from parcels and Sentinel imagery to traffic lights.

    Parcels and scenes come from a source (local files by default), are reduced to per-parcel
    signatures by extractors, scored by markers and turned into green/yellow/red verdicts by a
    decision rule. Every step is a plugin: `cbm plugins` lists what is installed.

    \b
    Environment:
      CBM_DISABLED_PLUGINS=a,b   do not load these plugins
      CBM_TRACE_PLUGINS=1        print every hook call to stderr
      CBM_LOG_LEVEL, CBM_LOG_FORMAT   defaults of --log-level and --log-format
    """
    logs.configure(log_level, log_format)


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Extract every scene again, even those already in the store.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--cluster", "address", metavar="tcp://HOST:PORT", help="Run on this dask scheduler.")
@click.option("--workers", type=click.IntRange(min=1), help="Run on a local dask cluster of N workers.")
@click.option("--wait", is_flag=True, help="If another run holds the output folder, wait for it to finish.")
def run(config: Path, force: bool, quiet: bool, address: str | None, workers: int | None, wait: bool) -> None:
    """Run CONFIG (TOML): extract missing scenes, run markers and rules, write verdicts.

    Writes to the config's [run] out folder: verdicts.gpkg and verdicts.csv (one row per parcel
    with light and reasons), markers.parquet (every marker result), summary.json, run.log (this
    run's log records, appended) and the signature store (Parquet, by default out/signatures).
    Re-running skips stored scenes.
    With --cluster, --workers or a [cluster] table, scenes and parcel partitions run on dask.
    One run at a time per output folder (and signature-store folder): a second is refused
    naming the holder, unless --wait.
    """
    from dataclasses import replace

    from cbm_core.pipeline import Engine

    if address and workers:
        raise click.UsageError("give either --cluster (a running scheduler) or --workers (a local cluster)")
    settings = load_run_config(config)
    if address or workers:
        settings = replace(settings, cluster=replace(settings.cluster, address=address, workers=workers))
    with logs.run_log(settings.out_dir):
        log.info("run %s started", config, extra={"config": str(config), "force": force})
        try:
            engine = Engine(plugins=_plugins(), progress=False if quiet else None)
            result = engine.run(settings, force=force, wait=wait)
        except CbmError as exc:  # the user's to fix: the console shows it once, as the Error line
            log.error("run %s stopped: %s", config, exc, extra={logs.FILE_ONLY: True})
            raise
        except Exception as exc:
            log.error("run %s stopped: %s", config, exc)
            raise
        summary = result.summary
        scenes = summary["scenes"]
        for obsid, reason in scenes["failed"].items():
            log.warning("scene %s failed: %s", obsid, reason, extra={"scene": obsid})
        for unit in summary.get("cluster", {}).get("failed_units", []):
            if not unit["unit"].startswith("scene "):  # failed scenes are listed above
                log.warning("%s failed: %s", unit["unit"], unit["reason"])
        lights = summary["verdicts"]
        log.info(
            "run %s finished", config,
            extra={"parcels": summary["parcels"], "scenes_extracted": scenes["extracted"],
                   "scenes_stored_before": scenes["skipped_already_stored"],
                   "scenes_failed": len(scenes["failed"]), **{f"verdicts_{k}": v for k, v in lights.items()}},
        )  # fmt: skip
    click.echo(
        f"{summary['parcels']} parcels; scenes: {scenes['extracted']} extracted, "
        f"{scenes['skipped_already_stored']} already stored, {len(scenes['failed'])} failed"
    )
    na = f", {lights['not_applicable']} not applicable" if lights.get("not_applicable") else ""
    click.echo(f"verdicts: {lights['green']} green, {lights['yellow']} yellow, {lights['red']} red{na}")
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
    from cbm_core.model import signatures_table
    from cbm_core.pipeline import Engine

    if out.is_dir():
        raise click.ClickException(
            f"--out {out} is a folder; give the Parquet file to write, e.g. {out / 'signatures.parquet'}"
        )
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
    engine.check_bands(catalogue, jobs)
    signatures, report = engine.extract(parcels, catalogue, jobs, config)
    for obsid, reason in report.failed.items():
        click.echo(f"failed {obsid}: {reason}", err=True)
    table = signatures_table(signatures, catalogue)
    write_table(table, out)
    click.echo(f"{len(table)} signature rows from {len(report.extracted)} scene(s) written to {out}")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
def doctor(config: Path) -> None:
    """Check CONFIG end to end without running it: configuration and scheme, plugins and their
    options, parcels (CRS, geometries), catalogue, bands, band files, store (reachable, schema)
    and output folder; for a `cbm serve` configuration also its users file and datasets.

    One line per check (ok, warn, fail); exit status 1 when a check fails. Nothing is extracted
    or written.
    """
    from cbm_core.config import read_toml
    from cbm_core.doctor import FAIL, Check, check_run_config
    from cbm_core.pipeline import Engine

    data = read_toml(config)
    manager = _plugins()
    reports = [r for r in manager.hook.cbm_cli_doctor(path=config.resolve(), data=data) if r is not None]
    if reports:
        checks = [Check(status, message) for report in reports for status, message in report]
    else:
        checks = check_run_config(config, Engine(plugins=manager, progress=False))
    for check in checks:
        click.echo(f"{check.status:<4}  {check.message}")
    failed = sum(check.status == FAIL for check in checks)
    if failed:
        raise click.ClickException(f"{config}: {failed} of {len(checks)} checks failed")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins: name, version, kind, origin and the hooks they implement."""
    manager = _plugins()
    infos = [
        {**vars(i), "options": None if i.options is None else sorted(i.options)}
        for i in sorted(manager.infos.values(), key=lambda i: (i.kind, i.name))
    ]
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
@click.option("--wait", is_flag=True, help="If another run holds the output folder, wait for it to finish.")
@click.option(
    "--source",
    default="table",
    show_default=True,
    help="Source plugin reading the signatures (its cbm_source_signatures hook).",
)
def score(
    signatures: Path,
    scheme: str,
    out: Path,
    parcels_path: Path | None,
    scale: str,
    offset: float,
    wait: bool,
    source: str,
) -> None:
    """Run a scheme's markers and rule on ready-made signatures (another backend's statistics).

    Writes verdicts.gpkg/csv, markers.parquet, events.parquet/csv and summary.json to OUT, as
    `cbm run` does.
    """
    from cbm_core import runs
    from cbm_core.pipeline import Engine

    engine = Engine(plugins=_plugins(), progress=False)
    plan = engine.scheme(scheme, Path.cwd())  # a mistake in the scheme is refused before any reading
    options = {"signatures": str(signatures), "scale": scale, "offset": offset}
    if parcels_path is not None:
        options["parcels"] = str(parcels_path)
    series = engine.signatures(PluginConfig(source, options, Path.cwd(), "--signatures"))
    results, verdicts = runs.score(engine, series, plan, out, str(signatures), wait=wait)
    lights = verdicts["light"].value_counts()
    counts = {light: int(lights.get(light, 0)) for light in ("green", "yellow", "red", "not_applicable")}
    click.echo(
        f"{len(verdicts)} parcels, {len(results)} marker results; verdicts: {counts['green']} green, "
        f"{counts['yellow']} yellow, {counts['red']} red, {counts['not_applicable']} not applicable; "
        f"written to {out}"
    )


def write_table(table, out: Path) -> None:
    """Write a Parquet file through a temporary beside it, naming the file on failure."""
    import os
    import uuid

    from cbm_core.errors import InputError
    from cbm_core.locks import make_folder

    make_folder(out.parent)
    temporary = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        table.to_parquet(temporary, index=False)
        os.replace(temporary, out)
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        temporary.unlink(missing_ok=True)


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
    """Console entry point (plugin commands are added on first lookup, see CbmGroup)."""
    cli(prog_name="cbm")
