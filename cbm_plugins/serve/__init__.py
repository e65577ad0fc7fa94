"""`cbm serve`: the JRC-compatible REST API over a run's sources and stores, and `cbm users`.

A plugin like any other: it adds its commands through the ``cbm_cli_commands`` hook. Needs the
``serve`` extra (FastAPI, uvicorn, orjson).
"""

from __future__ import annotations

import importlib.util

import click

from cbm_core import impl

__all__ = ["cbm_cli_commands"]


@impl
def cbm_cli_commands(cli: click.Group) -> None:
    if importlib.util.find_spec("fastapi") is None:  # without the serve extra there is nothing to serve
        return
    from cbm_plugins.serve._server import serve_command, users_command

    cli.add_command(serve_command)
    cli.add_command(users_command)
