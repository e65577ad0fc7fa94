"""The analyst's evidence: time-series plots, image chips and parcel reports of a finished run.

A plugin like any other: it adds `cbm plot`, `cbm chips` and `cbm report` through the
``cbm_cli_commands`` hook, and reads runs through the core's public engine. Needs the
``analyst`` extra (matplotlib).

Examples
--------
>>> from cbm_plugins import analyst
>>> run = analyst.open_run("demo/flanders.toml")  # doctest: +SKIP
>>> analyst.plot_parcel(run, 4).savefig("parcel-4.png")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from cbm_core import impl
from cbm_plugins.analyst._commands import COMMANDS

# Public name -> private module; loaded on first use, so that the plugin (and `cbm`) load
# without matplotlib, which only the `analyst` extra installs.
_PUBLIC = {
    "calendar": "_chips",
    "read_chips": "_chips",
    "write_chips": "_chips",
    "open_run": "_plots",
    "plot_parcel": "_plots",
    "plot_peers": "_plots",
    "flagged_pids": "_report",
    "write_report": "_report",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@impl
def cbm_cli_commands(cli: click.Group) -> None:
    for command in COMMANDS:
        cli.add_command(command)
