"""`cbm serve` and `cbm users`: the commands this plugin adds."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from cbm_core import logs
from cbm_core.errors import CbmError, InputError
from cbm_plugins.serve._config import (
    CHIP_DIR_ENV,
    CONFIG_ENV,
    SIGNING_KEY_ENV,
    check_plugins,
    load_server_config,
)
from cbm_plugins.serve._users import ALL_AOIS, make_user, read_users, write_users

log = logging.getLogger(__name__)


@click.command("serve")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="Worker processes.")
def serve_command(config: Path, host: str, port: int, workers: int) -> None:
    """Serve the CbM RESTful API for the datasets of CONFIG (TOML) with uvicorn."""
    import uvicorn

    from cbm_core.plugins import load_plugins

    settings = load_server_config(config)  # fail here, with a clear message, not in a worker
    check_plugins(settings, load_plugins())
    if not settings.users.exists():
        log.warning("no users file %s: add users with `cbm users add`", settings.users)
    os.environ[CONFIG_ENV] = str(settings.path)
    os.environ[CHIP_DIR_ENV] = str(settings.chip_dir)  # one chip folder shared by every worker
    os.environ[SIGNING_KEY_ENV] = settings.signing_key.hex()  # links signed by one worker, served by any
    logs.configure()  # `cbm serve` configured it already; the standalone entry point (main) has not
    # uvicorn logs through the root logger in our format (log_config=None: no handlers of its own);
    # the access log is AccessLog's, one record per request with the fields operators need.
    uvicorn.run(
        "cbm_plugins.serve._app:create_app_from_env", factory=True, host=host, port=port, workers=workers,
        log_config=None, log_level=os.environ[logs.LEVEL_ENV], access_log=False,
        limit_concurrency=512, timeout_keep_alive=30, server_header=False,
    )  # fmt: skip


@click.group("users")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Server configuration whose [server] users file to edit.",
)
@click.pass_context
def users_command(ctx: click.Context, config_path: Path) -> None:
    """Manage the users of `cbm serve` (passwords are stored salted and hashed)."""
    ctx.obj = load_server_config(config_path).users


@users_command.command("add")
@click.argument("name")
@click.option(
    "--aoi", "aois", multiple=True, required=True, help="Dataset area the user may read ('*': all)."
)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.pass_obj
def users_add(path: Path, name: str, aois: tuple[str, ...], password_stdin: bool) -> None:
    """Add or replace user NAME (the password is asked for, or read from stdin)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    users = read_users(path)
    users[name] = make_user(name, password, [a.lower() if a != ALL_AOIS else a for a in aois])
    write_users(path, users)
    click.echo(f"user {name} may read {', '.join(users[name].aois)}")


@users_command.command("remove")
@click.argument("name")
@click.pass_obj
def users_remove(path: Path, name: str) -> None:
    """Remove user NAME."""
    users = read_users(path)
    if name not in users:
        raise InputError(f"no user {name} in {path}")
    del users[name]
    write_users(path, users)
    click.echo(f"removed {name}")


@users_command.command("list")
@click.pass_obj
def users_list(path: Path) -> None:
    """List users and the areas they may read."""
    for name, found in sorted(read_users(path).items()):
        click.echo(f"{name}\t{','.join(found.aois)}")


def main() -> None:
    """`cbm serve` on its own (the test harness runs it so as not to depend on the full CLI)."""
    try:
        serve_command(standalone_mode=False)
    except CbmError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


def server_checks(path: Path) -> list[tuple[str, str]]:
    """`cbm doctor` of a server configuration: the configuration, its users file and each dataset's
    parcels, store and result files, read as the server would read them."""
    from cbm_core.plugins import load_plugins

    try:
        settings = load_server_config(path)
        plugins = load_plugins()
        check_plugins(settings, plugins)
    except CbmError as exc:
        return [("fail", f"configuration: {exc}")]
    checks = [
        (
            "ok",
            f"configuration {settings.path}: {len(settings.datasets)} dataset(s), plugins and options known",
        )
    ]
    try:
        users = read_users(settings.users)
        checks.append(
            ("ok", f"users file {settings.users}: {len(users)} user(s)")
            if users
            else ("warn", f"users file {settings.users}: no users yet (add them with `cbm users add`)")
        )
    except CbmError as exc:
        checks.append(("fail", f"users file: {exc}"))
    for dataset in settings.datasets:
        name = f"dataset {dataset.key}"
        try:
            parcels = plugins.caller(dataset.source.plugin, "cbm_source_parcels", dataset.source.where)(
                config=dataset.source
            )
            checks.append(("ok", f"{name}: {len(parcels)} parcels"))
        except CbmError as exc:
            checks.append(("fail", f"{name} parcels: {exc}"))
        try:
            stored = plugins.caller(dataset.store.plugin, "cbm_store_obsids", dataset.store.where)(
                config=dataset.store
            )
            checks.append(
                ("ok" if stored else "warn", f"{name} store: reachable, {len(stored)} scenes stored")
            )
        except CbmError as exc:
            checks.append(("fail", f"{name} store: {exc}"))
        for what, file in (("results", dataset.results), ("verdicts", dataset.verdicts)):
            if file is not None and not file.is_file():
                checks.append(("warn", f"{name} {what}: {file} not found (run `cbm run` first)"))
    return checks
