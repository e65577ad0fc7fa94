"""`cbm serve`: the JRC-compatible REST API over a run's sources and stores, and `cbm users`.

A plugin like any other: it adds its commands through the ``cbm_cli_commands`` hook. Needs the
``serve`` extra (FastAPI, uvicorn, orjson).

The server reaches data only through the plugin manager (the hooks a dataset's [source] and
[store] name), so it serves an embedded Parquet store as well as PostGIS. Every data endpoint,
chip files included, needs HTTP basic auth and the user's right to the dataset's aoi.

Inside: ``_config`` (the server TOML), ``_datasets`` (a dataset's cached reads and the per-aoi
lookup), ``_auth`` (basic auth), ``_http`` (errors, column JSON, size limits), ``_routes_*`` (one
router per group of queries), ``_app`` (the wiring), ``_cli`` (the commands), ``_users``.

Examples
--------
>>> from cbm_plugins import serve
>>> app = serve.create_app(serve.load_server_config("server.toml"))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from cbm_core import impl

# Public name -> private module; loaded on first use, so that the plugin (and `cbm`) load without
# FastAPI, which only the `serve` extra installs.
_PUBLIC = {
    "create_app": "_app",
    "LIMIT_DEFAULTS": "_config",
    "ServerConfig": "_config",
    "load_server_config": "_config",
    "TS_COLUMNS": "_routes_series",
    "main": "_cli",
}
__all__ = sorted([*_PUBLIC, "cbm_cli_commands", "cbm_cli_doctor"])


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@impl
def cbm_cli_commands(cli: click.Group) -> None:
    if importlib.util.find_spec("fastapi") is None:  # without the serve extra there is nothing to serve
        return
    from cbm_plugins.serve._cli import serve_command, users_command

    cli.add_command(serve_command)
    cli.add_command(users_command)


@impl
def cbm_cli_doctor(path: Path, data: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """`cbm doctor` on a server configuration (one with [[dataset]] tables)."""
    if "dataset" not in data:
        return None
    if importlib.util.find_spec("fastapi") is None:
        return [("fail", f"{path}: a `cbm serve` configuration, but the serve extra is not installed")]
    from cbm_plugins.serve._cli import server_checks

    return server_checks(path)
