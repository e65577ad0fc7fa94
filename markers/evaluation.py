"""`cbm evaluate`: how well markers find known events, on reference data or on simulated parcels.

A markers-family plugin that adds its command through ``cbm_cli_commands``; the metrics and the
scenario generator are the family's private toolkit (markers._evaluate, markers._simulate).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cbm_core import impl
from cbm_core.api import engine
from cbm_core.pipeline import Engine
from markers._evaluate import evaluate_files, evaluate_simulation


@impl
def cbm_cli_commands(cli: click.Group) -> None:
    cli.add_command(evaluate)


@click.command()
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
    if n_parcels:
        quiet = Engine(plugins=engine().plugins, progress=False)
        report = evaluate_simulation(n_parcels, scheme, quiet, seed=seed, tolerance_days=tolerance)
    elif results_path and reference_path:
        report = evaluate_files(results_path, reference_path, marker, tolerance)
    else:
        raise click.UsageError("give --results and --reference, or --simulate N")
    click.echo(json.dumps(report, indent=2, default=str))
