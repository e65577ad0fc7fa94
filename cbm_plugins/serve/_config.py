"""The server configuration (TOML): [server] options and limits, and one [[dataset]] table per aoi/year.

::

    [server]
    users = "users.json"        # managed with `cbm users`
    max_body_bytes = 65536      # request size limits (413 beyond)
    max_query_bytes = 8192
    max_polygon_vertices = 500
    max_polygon_km2 = 100
    max_parcels = 100           # parcelsByPolygon answers at most this many
    max_chipsize = 5120         # metres
    max_chips = 300             # chips per request (dates x bands): a season of S2 for 4 bands
    chip_dir = "chips"          # default: a temporary folder
    store_timeout = 3           # seconds a request waits for a database that is down (then 503)
    login_hash_threads = 1      # scrypt threads for new or wrong logins; login_hash_queue = 16 wait

    [[dataset]]
    aoi = "nld"
    year = 2019
    source = { plugin = "postgis", dsn = "..." }   # parcels, catalogue and imagery
    store = { plugin = "postgis", dsn = "..." }    # signatures
    results = "out/markers.parquet"                # optional, written by `cbm run`
    verdicts = "out/verdicts.csv"                  # optional
    meteo = { plugin = "meteo", path = "agera5.csv" }        # optional: weatherTimeSeries
    [dataset.backgrounds]                                    # optional: backgroundByLocation tms=...
    google = { plugin = "tiles", url = "https://.../{z}/{x}/{y}.png", zoom = 18, attribution = "..." }
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from cbm_core.config import RUN_KEYS, SERVER_KEYS, check_keys, check_table, plugin_config, read_toml, tables
from cbm_core.errors import ConfigError
from cbm_core.plugins import PluginManager
from cbm_plugins.serve._datasets import AOI, Dataset

CONFIG_ENV = "CBM_SERVER_CONFIG"
CHIP_DIR_ENV = "CBM_SERVER_CHIP_DIR"
LIMIT_DEFAULTS = {
    "max_body_bytes": 65_536,
    "max_query_bytes": 8_192,
    "max_polygon_vertices": 500,
    "max_polygon_km2": 100.0,
    "max_parcels": 100,
    "max_chipsize": 5120.0,
    "max_chips": 300,
    "store_timeout": 3.0,  # seconds a request waits for a dataset's database that is down (then 503)
    "login_free_failures": 5,  # failed logins of a client or user name before it must wait (1 s, 2 s, ...)
    "login_hash_threads": 1,  # threads hashing passwords of new or wrong logins (scrypt: one core each)
    "login_hash_queue": 16,  # logins waiting for one; more are answered 503 at once
}
CONNECT_TIMEOUT_OPTION = "connect_timeout"  # the option store_timeout sets on plugins that declare it
SIGNING_KEY_ENV = "CBM_SERVER_SIGNING_KEY"  # hex; `cbm serve` makes one that all its workers share


def _signing_key() -> bytes:
    text = os.environ.get(SIGNING_KEY_ENV)
    return bytes.fromhex(text) if text else secrets.token_bytes(32)


@dataclass
class ServerConfig:
    path: Path
    users: Path
    datasets: list[Dataset]
    limits: dict[str, float]
    chip_dir: Path
    signing_key: bytes = field(default_factory=_signing_key, repr=False)


def load_server_config(path: Path) -> ServerConfig:
    """Read and check a server configuration; relative paths resolve against its folder."""
    path = Path(path).resolve()
    data = read_toml(path, "server configuration")
    base = path.parent
    check_keys(data, SERVER_KEYS, str(path), "section")
    server = check_table(data.get("server", {}), f"{path} [server]")
    check_keys(server, SERVER_KEYS["server"] | set(LIMIT_DEFAULTS), f"{path} [server]")
    limits = {}
    for key, default in LIMIT_DEFAULTS.items():
        value = server.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{path} [server]: '{key}' must be a positive number, got {value!r}")
        limits[key] = type(default)(value)
    found = tables(data.get("dataset", []), f"{path} [[dataset]]")
    if not found:
        raise ConfigError(f"{path}: no [[dataset]] table (aoi, year, source, store)")
    datasets = []
    for i, table in enumerate(found):
        where = f"{path} [[dataset]] #{i + 1}"
        check_keys(table, SERVER_KEYS["dataset"], where)
        for key in ("aoi", "year", "source", "store"):
            if key not in table:
                raise ConfigError(f"{where}: missing '{key}'")
        backgrounds = table.get("backgrounds", {})
        if not isinstance(backgrounds, dict):
            raise ConfigError(f"{where}: backgrounds must be a table of name = {{ plugin = ... }}")
        if not re.match(AOI, str(table["aoi"])):
            raise ConfigError(f"{where}: aoi {table['aoi']!r} must be 1-32 letters, digits, _ or -")
        datasets.append(
            Dataset(
                aoi=str(table["aoi"]).lower(),
                year=_year(table["year"], where),
                source=plugin_config(table["source"], f"{where} source", base, keys=RUN_KEYS["source"]),
                store=plugin_config(table["store"], f"{where} store", base, keys=RUN_KEYS["store"]),
                results=base / table["results"] if "results" in table else None,
                verdicts=base / table["verdicts"] if "verdicts" in table else None,
                meteo=plugin_config(table["meteo"], f"{where} meteo", base) if "meteo" in table else None,
                backgrounds={
                    str(name).lower(): plugin_config(spec, f"{where} backgrounds.{name}", base)
                    for name, spec in backgrounds.items()
                },
            )
        )
    keys = [d.key for d in datasets]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{path}: two [[dataset]] tables have the same aoi and year")
    if "chip_dir" in server:
        chip_dir = base / server["chip_dir"]
    elif os.environ.get(CHIP_DIR_ENV):  # the folder `cbm serve` made for all its workers
        chip_dir = Path(os.environ[CHIP_DIR_ENV])
    else:
        chip_dir = Path(tempfile.mkdtemp(prefix="cbm-chips-"))
        atexit.register(shutil.rmtree, chip_dir, ignore_errors=True)
    return ServerConfig(path, base / str(server.get("users", "users.json")), datasets, limits, chip_dir)


def check_plugins(config: ServerConfig, plugins: PluginManager) -> None:
    """Refuse a dataset whose source or store plugin is missing, of the wrong kind, or given an
    option it does not know, before the server answers anything."""
    for dataset in config.datasets:
        plugins.caller(dataset.source.plugin, "cbm_source_parcels", dataset.source.where)
        plugins.caller(dataset.store.plugin, "cbm_store_read", dataset.store.where)
        plugins.check_options(dataset.source)
        plugins.check_options(dataset.store)
        if dataset.meteo is not None:
            plugins.caller(dataset.meteo.plugin, "cbm_source_weather", dataset.meteo.where)
            plugins.check_options(dataset.meteo)
        for background in dataset.backgrounds.values():
            plugins.caller(background.plugin, "cbm_source_orthophoto", background.where)
            plugins.check_options(background)


def apply_store_timeout(config: ServerConfig, plugins: PluginManager) -> None:
    """A request must not wait a run's minute for a database that is down: every dataset plugin
    that declares a `connect_timeout` option (PostGIS) gets [server] store_timeout unless its table
    sets one, so the request is answered 503 within seconds."""
    for dataset in config.datasets:
        for role in ("source", "store"):
            table = getattr(dataset, role)
            declared = plugins.infos[table.plugin].options if table.plugin in plugins.infos else None
            if (
                declared
                and CONNECT_TIMEOUT_OPTION in declared
                and CONNECT_TIMEOUT_OPTION not in table.options
            ):
                options = {**table.options, CONNECT_TIMEOUT_OPTION: config.limits["store_timeout"]}
                setattr(dataset, role, replace(table, options=options))


def _year(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise ConfigError(f"{where}: year must be a number like 2023, got {value!r}")
    return int(value)
