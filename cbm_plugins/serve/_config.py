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
    max_chips = 24              # chips per request (dates x bands)
    chip_dir = "chips"          # default: a temporary folder

    [[dataset]]
    aoi = "nld"
    year = 2019
    source = { plugin = "postgis", dsn = "..." }   # parcels, catalogue and imagery
    store = { plugin = "postgis", dsn = "..." }    # signatures
    results = "out/markers.parquet"                # optional, written by `cbm run`
    verdicts = "out/verdicts.csv"                  # optional
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cbm_core.config import plugin_config, read_toml
from cbm_core.errors import ConfigError
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
    "max_chips": 24,
}


@dataclass
class ServerConfig:
    path: Path
    users: Path
    datasets: list[Dataset]
    limits: dict[str, float]
    chip_dir: Path


def load_server_config(path: Path) -> ServerConfig:
    """Read and check a server configuration; relative paths resolve against its folder."""
    path = Path(path).resolve()
    data = read_toml(path, "server configuration")
    base = path.parent
    server = data.get("server", {})
    unknown = set(server) - {"users", "chip_dir", *LIMIT_DEFAULTS}
    if unknown:
        raise ConfigError(f"{path} [server]: unknown option(s) {', '.join(sorted(unknown))}")
    limits = {k: type(v)(server.get(k, v)) for k, v in LIMIT_DEFAULTS.items()}
    tables = data.get("dataset", [])
    if not tables:
        raise ConfigError(f"{path}: no [[dataset]] table (aoi, year, source, store)")
    datasets = []
    for i, table in enumerate(tables):
        where = f"{path} [[dataset]] #{i + 1}"
        for key in ("aoi", "year", "source", "store"):
            if key not in table:
                raise ConfigError(f"{where}: missing '{key}'")
        if not re.match(AOI, str(table["aoi"])):
            raise ConfigError(f"{where}: aoi {table['aoi']!r} must be 1-32 letters, digits, _ or -")
        datasets.append(
            Dataset(
                aoi=str(table["aoi"]).lower(),
                year=int(table["year"]),
                source=plugin_config(table["source"], f"{where} source", base),
                store=plugin_config(table["store"], f"{where} store", base),
                results=base / table["results"] if "results" in table else None,
                verdicts=base / table["verdicts"] if "verdicts" in table else None,
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
