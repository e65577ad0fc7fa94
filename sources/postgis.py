"""PostGIS: parcels, scene catalogue and signature store in a JRC CbM-compatible database.

Tables follow the reference schema (``dias_catalogue``; signature tables keyed (pid, obsid, band)
with obsid = dias_catalogue.id; SCL histograms as JSON), so an existing paying-agency database
plugs in as it is. Writes go through binary COPY inside one transaction per batch of scenes, and
a lost connection (database restart, failover) is retried from the start of that transaction, so
rows are never lost or duplicated. Scenes are claimed with FOR UPDATE SKIP LOCKED so any number
of workers can share one catalogue; a claim given back (the scene failed, the run stopped) leaves
the job 'failed' with its reason, claimable again at once. Two runs writing the same scene take
turns (a per-scene transaction lock): the later one replaces the earlier one's rows whole.
Options (in [source] or [store]):

dsn (or the environment variable named by dsn_env, default CBM_PG_DSN), schema, catalogue_table,
parcels_table, id_column, crop_code_column, crop_name_column, geometry_column, signatures_table,
hists_table, cards (catalogue filter), gdal (GDAL config options for reading band files),
pool_size, pool_min_size, pool_max_lifetime, pool_max_idle, pool_check_idle, prepare_threshold,
lease_seconds (after which an unfinished claim may be taken over), reconnect_seconds (how long a
transaction that lost its connection is retried, default 60) and connect_timeout (how long a caller
waits for a database that is down before the error, default reconnect_seconds; `cbm serve` uses
its [server] store_timeout so that a request gets its 503 in seconds).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import math
import os
import random
import re
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import geopandas as gpd
import numpy as np
import pandas as pd
import psycopg
import rasterio
import shapely
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from cbm_core import impl
from cbm_core.config import PluginConfig, plugin_config, read_toml
from cbm_core.errors import CbmError, ConfigError, InputError
from cbm_core.model import (
    HIST_COLUMNS,
    SCL_CLASSES,
    STATS,
    BandRef,
    RasterWindow,
    Signatures,
    TimeSeries,
    empty_scl,
    empty_signatures,
    time_series,
    validate_parcels,
)
from sources._raster import read_window

# The [source] and [store] options it reads (anything else is refused as a likely typo).
CBM_OPTIONS = frozenset(
    {"dsn", "dsn_env", "schema", "catalogue_table", "parcels_table", "signatures_table", "hists_table",
     "id_column", "crop_code_column", "crop_name_column", "geometry_column", "pool_size",
     "reconnect_seconds", "connect_timeout", "cards", "gdal", "bulk_memory", "lease_seconds",
     "pool_min_size", "pool_max_lifetime", "pool_max_idle", "pool_check_idle", "prepare_threshold"}
)  # fmt: skip

if TYPE_CHECKING:
    import click

T = TypeVar("T")
FETCH_ROWS = 50_000  # rows per round trip of a server-side cursor: bounded memory on any table size
SMALL_QUERY_PIDS = 1_000  # up to this many pids a plain cursor is faster than a server-side one
log = logging.getLogger(__name__)
SENSOR_CODE = re.compile(r"([12])\s*-?\s*([A-D])\b", re.IGNORECASE)


# Configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tables:
    """Qualified names of the tables one configuration uses."""

    schema: str
    catalogue: str
    parcels: str
    signatures: str
    hists: str
    id_column: str
    crop_code_column: str
    crop_name_column: str
    geometry_column: str

    def ident(self, name: str) -> sql.Composable:
        return sql.Identifier(self.schema, name)

    @property
    def dataset(self) -> str:
        """The key of this signature table in the job queue."""
        return f"{self.schema}.{self.signatures}"

    def placeholders(self) -> dict[str, sql.Composable]:
        """Identifiers the migration files refer to in braces."""
        return {
            "catalogue": self.ident(self.catalogue),
            "catalogue_footprint_index": sql.Identifier(f"{self.catalogue}_footprint_idx"),
            "catalogue_bands": self.ident(f"{self.catalogue}_bands"),
            "jobs": self.ident("cbm_scene_jobs"),
            "jobs_status_index": sql.Identifier("cbm_scene_jobs_status_idx"),
            "signatures": self.ident(self.signatures),
            "signatures_obsid_index": sql.Identifier(f"{self.signatures}_obsid_idx"),
            "hists": self.ident(self.hists),
            "hists_obsid_index": sql.Identifier(f"{self.hists}_obsid_idx"),
        }


def tables(config: PluginConfig) -> Tables:
    return Tables(
        schema=str(config.get("schema", "public")),
        catalogue=str(config.get("catalogue_table", "dias_catalogue")),
        parcels=str(config.get("parcels_table", "parcels")),
        signatures=str(config.get("signatures_table", "signatures")),
        hists=str(config.get("hists_table", "hists")),
        id_column=str(config.get("id_column", "pid")),
        crop_code_column=str(config.get("crop_code_column", "cropcode")),
        crop_name_column=str(config.get("crop_name_column", "cropname")),
        geometry_column=str(config.get("geometry_column", "wkb_geometry")),
    )


def dsn_of(config: PluginConfig) -> str:
    """The connection string: the dsn option, else the environment variable dsn_env names."""
    if config.get("dsn"):
        return str(config.get("dsn"))
    variable = str(config.get("dsn_env", "CBM_PG_DSN"))
    if os.environ.get(variable):
        return os.environ[variable]
    raise ConfigError(
        f'{config.where}: give dsn = "host=... dbname=..." or set the environment variable {variable}'
    )


def _safe_dsn(dsn: str) -> str:
    """The connection target without its password, for error messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable dsn)"
    return " ".join(f"{k}={v}" for k, v in params.items() if k != "password")


# Connections -----------------------------------------------------------------------------------

# Pool defaults: a handful of connections per process (each dask worker and each server worker has
# its own pool, so the database sees workers x pool_size), recycled after an hour and closed after
# ten idle minutes so that failovers, pgbouncer and firewall timeouts never leave stale sockets.
POOL_SIZE = 8
POOL_MIN_SIZE = 1
POOL_MAX_LIFETIME_S = 3600.0
POOL_MAX_IDLE_S = 600.0
RECONNECT_SECONDS = 60.0  # how long a transaction is retried across a restart or failover
FIRST_RETRY_S = 0.1
LONGEST_RETRY_S = 2.0
PROBE_TIMEOUT_S = 5  # connect_timeout of the one direct attempt that explains a pool timeout
LIBPQ_MIN_CONNECT_TIMEOUT_S = 2  # libpq treats a connect_timeout below 2 s as 2 s
# A connection idle longer than this is checked (one empty round trip) before it is handed out:
# what idle connections die of (restarts, firewall and pgbouncer idle timeouts) takes longer, and
# checking busy ones too would cost a time-series request 20 % more CPU. A connection that dies
# between checks costs its transaction one retry.
CHECK_AFTER_IDLE_S = 2.0

_POOLS: dict[tuple[int, str], ConnectionPool] = {}
_POOLS_LOCK = threading.Lock()
_RETURNED: weakref.WeakKeyDictionary[psycopg.Connection, float] = weakref.WeakKeyDictionary()


def _note_return(conn: psycopg.Connection) -> None:
    """The pool's reset callback: remember when the connection was last known to work."""
    _RETURNED[conn] = time.monotonic()


def _health_check(idle_seconds: float) -> Callable[[psycopg.Connection], None]:
    def check(conn: psycopg.Connection) -> None:
        if time.monotonic() - _RETURNED.get(conn, -math.inf) >= idle_seconds:
            ConnectionPool.check_connection(conn)  # raises for a dead one, which the pool replaces

    return check


def _pool(config: PluginConfig) -> ConnectionPool:
    """This process's pool for the configured database (psycopg_pool: connections are checked
    before use, recycled after pool_max_lifetime seconds and closed after pool_max_idle idle)."""
    dsn = dsn_of(config)
    key = (os.getpid(), dsn)  # a forked worker must not share its parent's sockets
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            size = int(config.get("pool_size", POOL_SIZE))
            prepare = config.get("prepare_threshold", 5)  # none (pgbouncer in transaction mode): never
            pool = ConnectionPool(
                dsn,
                kwargs={
                    "application_name": "cbm",
                    # one connection attempt to an unreachable host gives up in time (libpq: >= 2 s)
                    "connect_timeout": max(LIBPQ_MIN_CONNECT_TIMEOUT_S, math.ceil(_connect_timeout(config))),
                    "prepare_threshold": None if prepare in (None, "none") else int(prepare),
                },
                min_size=min(int(config.get("pool_min_size", POOL_MIN_SIZE)), size),
                max_size=size,
                max_lifetime=float(config.get("pool_max_lifetime", POOL_MAX_LIFETIME_S)),
                max_idle=float(config.get("pool_max_idle", POOL_MAX_IDLE_S)),
                reconnect_timeout=float(config.get("reconnect_seconds", RECONNECT_SECONDS)),
                check=_health_check(float(config.get("pool_check_idle", CHECK_AFTER_IDLE_S))),
                reset=_note_return,
                name=f"cbm-{_safe_dsn(dsn)}",
                open=True,
            )
            _POOLS[key] = pool
            log.debug(
                "PostGIS pool %s: psycopg %s (%s implementation, libpq %s), %d connections at most",
                pool.name, psycopg.__version__, psycopg.pq.__impl__, psycopg.pq.version(), size,
            )  # fmt: skip
        return pool


def _connect_timeout(config: PluginConfig) -> float:
    """Seconds a caller waits for a connection to a database that is down (option connect_timeout;
    default reconnect_seconds, so a run waits out a restart; `cbm serve` sets it short)."""
    return float(config.get("connect_timeout", config.get("reconnect_seconds", RECONNECT_SECONDS)))


def pool_stats(config: PluginConfig) -> dict[str, int]:
    """Counters of this process's pool for the configured database (psycopg_pool's get_stats:
    pool_size, pool_available, requests_num, requests_waiting, connections_lost, ...)."""
    return dict(_pool(config).get_stats())


@atexit.register
def _close_pools() -> None:
    """Close this process's pools at exit, so their threads do not outlive the interpreter."""
    with _POOLS_LOCK:
        pools = [pool for (pid, _), pool in _POOLS.items() if pid == os.getpid()]
        _POOLS.clear()
    for pool in pools:
        with contextlib.suppress(Exception):
            pool.close(timeout=1)


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (0-based): exponential up to LONGEST_RETRY_S,
    with "equal jitter" (half fixed, half random) so that the workers a failover disconnected at
    the same moment do not all come back at the same moment."""
    ceiling = min(FIRST_RETRY_S * 2**attempt, LONGEST_RETRY_S)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def transaction(
    config: PluginConfig, work: Callable[[psycopg.Cursor], T], single_statement: bool = False
) -> T:
    """Run work in one transaction; on a lost connection, reconnect and run it again from the start,
    with jittered backoff, for up to `reconnect_seconds` (default 60: a database restart or failover).

    Work must therefore be idempotent within its transaction (all writes here replace by key).
    Work that runs a single statement can say so: it then runs in autocommit mode, one round trip
    to the server instead of three (BEGIN, the statement, COMMIT), with the same atomicity.
    """
    deadline = time.monotonic() + float(config.get("reconnect_seconds", RECONNECT_SECONDS))
    connect = _connect_timeout(config)
    attempt = 0
    while True:
        try:
            pool = _pool(config)
            # A database that is down from the start is reported after connect_timeout; a transaction
            # that lost its connection keeps trying for reconnect_seconds (a restart, a failover).
            wait = deadline - time.monotonic() if attempt else min(connect, deadline - time.monotonic())
            with pool.connection(timeout=max(wait, 0.1)) as conn:
                if conn.autocommit != single_statement:
                    conn.autocommit = single_statement
                with conn.cursor() as cur:
                    result = work(cur)
                conn.commit()  # an error rolls back: the pool resets a connection it gets back
                return result
        except PoolTimeout:
            raise CbmError(f"PostGIS at {_safe_dsn(dsn_of(config))}: {_why_no_connection(config)}") from None
        except SCHEMA_ERRORS as exc:
            raise InputError(_schema_error(config, exc)) from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            delay = retry_delay(attempt)
            if time.monotonic() + delay > deadline:
                raise CbmError(f"PostGIS at {_safe_dsn(dsn_of(config))}: {str(exc).strip()}") from None
            log.warning("PostGIS connection lost (%s); retrying in %.2f s", str(exc).strip(), delay)
            time.sleep(delay)
            attempt += 1


# The database answers, but not with the tables or columns the configuration names.
SCHEMA_ERRORS = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.InvalidSchemaName,
    psycopg.errors.UndefinedFunction,
)


def _schema_error(config: PluginConfig, exc: psycopg.Error) -> str:
    """One line naming the missing table or column and the options that name it."""
    what = (exc.diag.message_primary or str(exc).splitlines()[0]).strip()
    names = tables(config)
    if isinstance(exc, psycopg.errors.UndefinedColumn):
        hint = (
            f"check the column options of {names.schema}.{names.parcels} (id_column, crop_code_column,"
            " crop_name_column, geometry_column)"
        )
    elif isinstance(exc, psycopg.errors.UndefinedFunction):
        hint = "is the PostGIS extension installed in this database (CREATE EXTENSION postgis)?"
    else:
        hint = (
            "a store never initialised? run `cbm db init` on this configuration; otherwise check schema,"
            " parcels_table, catalogue_table, signatures_table and hists_table"
        )
    return f"{config.where}: PostGIS at {_safe_dsn(dsn_of(config))}: {what}; {hint}"


def _why_no_connection(config: PluginConfig) -> str:
    """Why the pool gave no connection in time: the server's own answer to one direct attempt
    (the pool only knows that it timed out), or a pool whose every connection stayed busy."""
    dsn = dsn_of(config)
    probe = max(LIBPQ_MIN_CONNECT_TIMEOUT_S, min(PROBE_TIMEOUT_S, math.ceil(_connect_timeout(config))))
    try:
        with psycopg.connect(dsn, connect_timeout=probe, application_name="cbm"):
            pass
    except psycopg.Error as exc:
        return str(exc).strip()
    size = int(config.get("pool_size", POOL_SIZE))
    return f"all {size} connections of the pool stayed busy for reconnect_seconds (raise pool_size?)"


# Migrations ------------------------------------------------------------------------------------


def migrations() -> list[tuple[str, str]]:
    """The migration files shipped with the plugin, in order: (name, SQL text)."""
    folder = resources.files("sources").joinpath("sql", "postgis")
    files = sorted(f for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]


def init_database(config: PluginConfig) -> list[str]:
    """Create or upgrade the catalogue and this dataset's signature tables; return what was applied."""
    names = tables(config)

    def work(cur: psycopg.Cursor) -> list[str]:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('cbm_migrations'))")  # one migrator at a time
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(names.schema)))
        cur.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (name text NOT NULL, dataset text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (name, dataset))"
            ).format(names.ident("cbm_migrations"))
        )
        cur.execute(
            sql.SQL("SELECT name FROM {} WHERE dataset = %s").format(names.ident("cbm_migrations")),
            (names.dataset,),
        )
        done = {row[0] for row in cur.fetchall()}
        applied = []
        for name, text in migrations():
            if name in done:
                continue
            cur.execute(sql.SQL(text).format(**names.placeholders()))
            cur.execute(
                sql.SQL("INSERT INTO {} (name, dataset) VALUES (%s, %s)").format(
                    names.ident("cbm_migrations")
                ),
                (name, names.dataset),
            )
            applied.append(name)
        return applied

    return transaction(config, work)


# Parcels ---------------------------------------------------------------------------------------


@impl
def cbm_source_parcels(
    config: PluginConfig, bbox: tuple[float, float, float, float] | None = None
) -> gpd.GeoDataFrame:
    names = tables(config)
    ident = {
        "id": sql.Identifier(names.id_column),
        "code": sql.Identifier(names.crop_code_column),
        "name": sql.Identifier(names.crop_name_column),
        "geom": sql.Identifier(names.geometry_column),
        "t": names.ident(names.parcels),
    }
    text = "SELECT {id}, {code}::text, {name}::text, ST_AsBinary({geom}), ST_SRID({geom}) FROM {t}"
    params: dict[str, float] = {}
    if bbox is not None:
        # The box's edges are densified before reprojection so that the reprojected box still covers
        # every parcel the WGS84 box touches; && then uses the parcels' GiST index.
        text += (
            " WHERE {geom} && ST_Transform(ST_Segmentize("
            "ST_MakeEnvelope(%(minx)s, %(miny)s, %(maxx)s, %(maxy)s, 4326), %(step)s),"
            " (SELECT ST_SRID({geom}) FROM {t} WHERE {geom} IS NOT NULL LIMIT 1))"
        )
        minx, miny, maxx, maxy = (float(v) for v in bbox)
        step = max(maxx - minx, maxy - miny, 1e-6) / 20
        params = {"minx": minx, "miny": miny, "maxx": maxx, "maxy": maxy, "step": step}
    query = sql.SQL(text + " ORDER BY {id}").format(**ident)
    pid, code, name, wkb, srid = [], [], [], [], set()
    for chunk in _stream(config, query, params):
        for row in chunk:
            pid.append(row[0])
            code.append(row[1] or "")
            name.append(row[2] or "")
            wkb.append(bytes(row[3]) if row[3] is not None else None)
            srid.add(row[4])
    if len(srid) > 1:
        raise InputError(f"{config.where}: table {names.parcels} mixes SRIDs {sorted(srid)}")
    crs = f"EPSG:{srid.pop()}" if srid else None
    parcels = gpd.GeoDataFrame(
        {
            "pid": pd.array(pid, dtype="int64"),
            "crop_code": pd.array(code, dtype="string"),
            "crop_name": pd.array(name, dtype="string"),
        },
        geometry=shapely.from_wkb(np.array(wkb, dtype=object)),
        crs=crs or "EPSG:4326",
    )
    return validate_parcels(parcels, f"PostGIS table {names.parcels}")


def import_parcels(config: PluginConfig, parcels: gpd.GeoDataFrame, replace: bool = False) -> int:
    """Load parcels into the configured parcels table (created if needed) with COPY; return rows."""
    names = tables(config)
    parcels = validate_parcels(parcels, "parcels to import")
    srid = parcels.crs.to_epsg()
    if srid is None:
        raise InputError(f"parcels to import: CRS {parcels.crs.to_string()} has no EPSG code")
    table = names.ident(names.parcels)
    ids = {
        "t": table,
        "id": sql.Identifier(names.id_column),
        "code": sql.Identifier(names.crop_code_column),
        "name": sql.Identifier(names.crop_name_column),
        "geom": sql.Identifier(names.geometry_column),
        "index": sql.Identifier(f"{names.parcels}_{names.geometry_column}_idx"),
    }
    frame = pd.DataFrame(
        {
            "pid": parcels["pid"].astype("int64"),
            "code": parcels["crop_code"].astype("string").fillna(""),
            "name": parcels["crop_name"].astype("string").fillna(""),
            "geom": _ewkb_hex(parcels.geometry.values, srid),
        }
    )
    payload = _copy_text(frame)

    def work(cur: psycopg.Cursor) -> int:
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(names.schema)))
        if replace:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {t}").format(**ids))
        cur.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {t} ({id} bigint PRIMARY KEY, {code} text, {name} text,"
                " {geom} geometry(Geometry, {srid}) NOT NULL)"
            ).format(**ids, srid=sql.Literal(int(srid))),
        )
        cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {index} ON {t} USING gist ({geom})").format(**ids))
        cur.execute(sql.SQL("DELETE FROM {t} WHERE {id} = ANY(%s)").format(**ids), (frame["pid"].tolist(),))
        _copy(cur, sql.SQL("COPY {t} ({id}, {code}, {name}, {geom}) FROM STDIN").format(**ids), payload)
        return len(frame)

    return transaction(config, work)


def _ewkb_hex(geometries: np.ndarray, srid: int) -> list[str]:
    with_srid = shapely.set_srid(geometries, srid)
    return list(shapely.to_wkb(with_srid, hex=True, include_srid=True))


# Catalogue -------------------------------------------------------------------------------------


@impl
def cbm_source_catalogue(config: PluginConfig) -> gpd.GeoDataFrame:
    names = tables(config)
    cards = config.get("cards")
    query = sql.SQL(
        "SELECT c.reference, c.obstime, coalesce(c.sensor_name, c.sensor), c.card, c.orbit,"
        ' ST_AsBinary(c.footprint), b.band, b.uri, b.nodata, b.scale, b."offset"'
        " FROM {cat} c LEFT JOIN {bands} b ON b.catalogue_id = c.id"
        " WHERE (%(cards)s::text[] IS NULL OR c.card = ANY(%(cards)s::text[]))"
        " ORDER BY c.obstime, c.reference, b.band"
    ).format(cat=names.ident(names.catalogue), bands=names.ident(f"{names.catalogue}_bands"))
    scenes: dict[str, dict[str, Any]] = {}
    for chunk in _stream(config, query, {"cards": list(cards) if cards else None}):
        for ref, obstime, sensor, card, orbit, footprint, band, uri, nodata, scale, offset in chunk:
            scene = scenes.setdefault(
                ref,
                {
                    "obsid": ref,
                    "obstime": pd.Timestamp(obstime, tz="UTC") if obstime is not None else pd.NaT,
                    "sensor": (sensor or "").strip(),
                    "card": (card or "").strip(),
                    "orbit": orbit,
                    "bands": {},
                    "geometry": shapely.from_wkb(bytes(footprint)) if footprint is not None else None,
                },
            )
            if band is not None:  # scenes of a reference database have no band rows
                scene["bands"][band] = BandRef(uri, nodata, scale, offset)
    frame = pd.DataFrame(
        list(scenes.values()), columns=["obsid", "obstime", "sensor", "card", "orbit", "bands", "geometry"]
    )
    return gpd.GeoDataFrame(frame, geometry="geometry", crs="EPSG:4326")


def import_catalogue(config: PluginConfig, catalogue: gpd.GeoDataFrame) -> int:
    """Insert or update scenes (and their band files) in dias_catalogue; return scenes written."""
    names = tables(config)
    footprints = catalogue.geometry.to_crs("EPSG:4326") if catalogue.crs else catalogue.geometry
    rows = []
    for (_, scene), footprint in zip(catalogue.iterrows(), footprints.values, strict=True):
        polygon = (
            footprint if footprint is None or footprint.geom_type == "Polygon" else footprint.convex_hull
        )
        obstime = pd.Timestamp(scene["obstime"])
        obstime = obstime.tz_convert("UTC").tz_localize(None) if obstime.tzinfo else obstime
        rows.append((scene, obstime.to_pydatetime(), None if polygon is None else polygon.wkb))

    def work(cur: psycopg.Cursor) -> int:
        for scene, obstime, wkb in rows:
            sensor_match = SENSOR_CODE.search(str(scene.get("sensor") or ""))
            cur.execute(
                sql.SQL(
                    "INSERT INTO {cat} (reference, obstime, sensor, sensor_name, card, orbit, footprint)"
                    " VALUES (%s, %s, %s, %s, %s, %s, ST_SetSRID(ST_GeomFromWKB(%s), 4326))"
                    " ON CONFLICT (reference) DO UPDATE SET obstime = EXCLUDED.obstime,"
                    " sensor = EXCLUDED.sensor, sensor_name = EXCLUDED.sensor_name, card = EXCLUDED.card,"
                    " orbit = EXCLUDED.orbit,"
                    " footprint = EXCLUDED.footprint RETURNING id"
                ).format(cat=names.ident(names.catalogue)),
                (
                    str(scene["obsid"]),
                    obstime,
                    "".join(sensor_match.groups()).upper() if sensor_match else None,
                    scene.get("sensor"),
                    scene["card"],
                    scene.get("orbit"),
                    wkb,
                ),
            )
            scene_id = cur.fetchone()[0]
            bands = names.ident(f"{names.catalogue}_bands")
            cur.execute(sql.SQL("DELETE FROM {} WHERE catalogue_id = %s").format(bands), (scene_id,))
            for band, ref in scene["bands"].items():
                cur.execute(
                    sql.SQL(
                        'INSERT INTO {} (catalogue_id, band, uri, nodata, scale, "offset")'
                        " VALUES (%s, %s, %s, %s, %s, %s)"
                    ).format(bands),
                    (
                        scene_id,
                        band,
                        ref.uri,
                        _opt_float(ref.nodata),
                        _opt_float(ref.scale),
                        _opt_float(ref.offset),
                    ),
                )
        return len(rows)

    return transaction(config, work)


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)


@impl
def cbm_source_read_window(
    config: PluginConfig, band: BandRef, bounds: tuple[float, float, float, float], crs: str
) -> RasterWindow:
    options = {str(k): str(v) for k, v in dict(config.get("gdal", {})).items()}
    with rasterio.Env(**options):
        return read_window(band, bounds, crs)


# Signatures ------------------------------------------------------------------------------------


@impl
def cbm_store_write(config: PluginConfig, signatures: Signatures, obsids: Sequence[str]) -> int:
    names = tables(config)
    scenes = _scenes_of(signatures, obsids)
    if not scenes:
        return 0

    def work(cur: psycopg.Cursor) -> int:
        ids = _catalogue_ids(cur, names, scenes)
        _lock_scenes(cur, names, [ids[o] for o in scenes])
        _delete_scenes(cur, names, [ids[o] for o in scenes])
        return _copy_scenes(cur, names, _payload(signatures, ids, scenes), ids)

    return transaction(config, work)


def bulk_load(config: PluginConfig, obsids: Sequence[str], read: Callable[[str], Signatures]) -> int:
    """Load many whole scenes in one transaction, dropping the indexes during the load and
    rebuilding them once at the end (a sorted build instead of millions of index insertions).

    For a first load or a migration: the signature tables are locked until it finishes. read(obsid)
    returns one scene's signatures; it is called again from the start if the connection drops.
    """
    names = tables(config)
    scenes = sorted({str(o) for o in obsids})

    def work(cur: psycopg.Cursor) -> int:
        cur.execute(  # SET takes no parameters; set_config does
            "SELECT set_config('maintenance_work_mem', %s, true)", (str(config.get("bulk_memory", "512MB")),)
        )
        ids = _catalogue_ids(cur, names, scenes)
        _delete_scenes(cur, names, list(ids.values()))  # while the obsid indexes still exist
        rebuild = []
        for table in (names.signatures, names.hists):
            for name, definition, _ in _primary_keys(cur, names.schema, table):
                cur.execute(
                    sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                        names.ident(table), sql.Identifier(name)
                    )
                )
                rebuild.append(
                    sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(
                        names.ident(table), sql.Identifier(name)
                    )
                    + sql.SQL(definition)  # PRIMARY KEY (...) as PostgreSQL itself printed it
                )
            cur.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
                (names.schema, table),
            )
            for name, definition in cur.fetchall():
                cur.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(names.schema, name)))
                rebuild.append(sql.SQL(definition))  # as PostgreSQL printed it
        # One scene ahead: a thread reads and encodes the next scene while the server ingests
        # this one (psycopg releases the GIL while it sends).
        with ThreadPoolExecutor(1, thread_name_prefix="cbm-bulk") as ahead:

            def prepare(obsid: str) -> _Payload:
                return _payload(read(obsid), ids, [obsid])

            rows = 0
            pending = ahead.submit(prepare, scenes[0]) if scenes else None
            for following in [*scenes[1:], None]:
                payload = pending.result()
                pending = ahead.submit(prepare, following) if following is not None else None
                rows += _copy_scenes(cur, names, payload, ids)
        for statement in rebuild:
            cur.execute(statement)
        for table in (names.signatures, names.hists):  # fresh planner statistics, or a parcel's
            cur.execute(sql.SQL("ANALYZE {}").format(names.ident(table)))  # lookup may scan it all
        return rows

    return transaction(config, work)


def _primary_keys(cur: psycopg.Cursor, schema: str, table: str) -> list[tuple[str, str, str]]:
    """A table's primary key (none or one): constraint name, definition, index name."""
    cur.execute(
        "SELECT c.conname, pg_get_constraintdef(c.oid), i.relname FROM pg_constraint c"
        " JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace"
        " JOIN pg_class i ON i.oid = c.conindid WHERE n.nspname = %s AND t.relname = %s AND c.contype = 'p'",
        (schema, table),
    )
    return cur.fetchall()


def cluster_signatures(config: PluginConfig) -> list[str]:
    """Rewrite the signature and histogram tables in primary-key (pid) order; return the tables.

    Rows arrive scene by scene, so one parcel's rows end up in a different heap page per scene and
    band, and reading a parcel's time series touches hundreds of pages. Clustered, they sit in a
    few adjacent pages. For a store that is being served rather than filled: the tables are locked
    while they are rewritten, rows written later are appended unordered (cluster again after large
    loads), and replacing one scene's rows then scans the whole table.
    """
    names = tables(config)

    def work(cur: psycopg.Cursor) -> list[str]:
        cur.execute(  # SET takes no parameters; set_config does
            "SELECT set_config('maintenance_work_mem', %s, true)", (str(config.get("bulk_memory", "512MB")),)
        )
        done = []
        for table in (names.signatures, names.hists):
            keys = _primary_keys(cur, names.schema, table)
            if not keys:
                raise InputError(
                    f"{names.schema}.{table} has no primary key to cluster on (run `cbm db init`)"
                )
            cur.execute(sql.SQL("CLUSTER {} USING {}").format(names.ident(table), sql.Identifier(keys[0][2])))
            cur.execute(sql.SQL("ANALYZE {}").format(names.ident(table)))  # new physical order
            done.append(f"{names.schema}.{table}")
        return done

    return transaction(config, work)


def _scenes_of(signatures: Signatures, obsids: Sequence[str]) -> list[str]:
    stats, scl = signatures.stats, signatures.scl
    return sorted({str(o) for o in obsids} | set(stats["obsid"].astype(str)) | set(scl["obsid"].astype(str)))


def _lock_scenes(cur: psycopg.Cursor, names: Tables, scene_ids: list[int]) -> None:
    """Take this dataset's write lock of each scene until the transaction ends, in id order.

    Two runs writing the same scene at once (two `cbm run` on one store) would otherwise both
    delete nothing and both COPY, and the second commit would die on the primary key. Locked, the
    second writer waits for the first to commit, then replaces its rows: one complete copy of the
    scene either way. The sorted order keeps two writers of overlapping batches from deadlocking.
    """
    for scene_id in sorted(set(scene_ids)):
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"cbm-scene:{names.dataset}:{scene_id}",),
        )


def _delete_scenes(cur: psycopg.Cursor, names: Tables, scene_ids: list[int]) -> None:
    for table in (names.signatures, names.hists):
        cur.execute(sql.SQL("DELETE FROM {} WHERE obsid = ANY(%s)").format(names.ident(table)), (scene_ids,))


@dataclass(frozen=True)
class _Payload:
    """One batch of scenes in binary COPY form, built without a connection (so it can be
    prepared while the server ingests the previous batch)."""

    scenes: list[str]
    stats: io.BytesIO | None
    hists: io.BytesIO | None
    rows: int


def _payload(signatures: Signatures, ids: dict[str, int], scenes: list[str]) -> _Payload:
    stats, scl = signatures.stats, signatures.scl
    return _Payload(
        scenes,
        _copy_binary_signatures(stats, ids) if len(stats) else None,
        _binary_hists(scl, ids) if len(scl) else None,
        len(stats) + len(scl),
    )


def _copy_scenes(cur: psycopg.Cursor, names: Tables, payload: _Payload, ids: dict[str, int]) -> int:
    """COPY the rows of whole scenes (whose old rows are deleted) and mark the scenes extracted."""
    if payload.stats is not None:
        _copy(
            cur,
            sql.SQL(
                "COPY {} (pid, obsid, band, count, mean, std, min, max, p25, p50, p75) FROM STDIN BINARY"
            ).format(names.ident(names.signatures)),
            payload.stats,
        )
    if payload.hists is not None:
        _copy_hists(cur, names, payload.hists)
    scene_ids = [ids[o] for o in payload.scenes]
    cur.execute(
        sql.SQL(
            "INSERT INTO {jobs} (dataset, catalogue_id, status) SELECT %s, unnest(%s::int[]), 'extracted'"
            " ON CONFLICT (dataset, catalogue_id) DO UPDATE SET status = 'extracted', claimed_at = now(),"
            " reason = NULL"
        ).format(jobs=names.ident("cbm_scene_jobs")),
        (names.dataset, scene_ids),
    )
    return payload.rows


@impl
def cbm_store_read(
    config: PluginConfig,
    pids: Sequence[int] | None,
    obsids: Sequence[str] | None,
    bands: Sequence[str] | None,
    scl: bool = True,
) -> Signatures:
    names = tables(config)
    params = {
        "pids": None if pids is None else [int(p) for p in pids],
        "refs": None if obsids is None else [str(o) for o in obsids],
        "bands": None if bands is None else [str(b) for b in bands],
    }
    where = sql.SQL(
        " WHERE (%(pids)s::bigint[] IS NULL OR s.pid = ANY(%(pids)s::bigint[]))"
        " AND (%(refs)s::text[] IS NULL OR c.reference = ANY(%(refs)s::text[]))"
    )
    stats_query = sql.SQL(
        "SELECT s.pid, c.reference, s.band, s.count, s.mean, s.std, s.min, s.max, s.p25, s.p50, s.p75"
        " FROM {sig} s JOIN {cat} c ON c.id = s.obsid"
    ).format(sig=names.ident(names.signatures), cat=names.ident(names.catalogue))
    stats_query += where + sql.SQL(" AND (%(bands)s::text[] IS NULL OR s.band = ANY(%(bands)s::text[]))")
    hist_query = sql.SQL(
        "SELECT s.pid, c.reference, s.hist::text FROM {h} s JOIN {cat} c ON c.id = s.obsid"
    ).format(h=names.ident(names.hists), cat=names.ident(names.catalogue))
    hist_query += where
    if pids is None or len(pids) > SMALL_QUERY_PIDS:
        return Signatures(
            _stats_frame(_stream(config, stats_query, params)),
            _scl_frame(_stream(config, hist_query, params) if scl else []),
        )

    def work(cur: psycopg.Cursor) -> tuple[list[tuple], list[tuple]]:  # one round of the pool
        cur.execute(stats_query, params)
        stats = cur.fetchall()
        if not scl:
            return stats, []
        cur.execute(hist_query, params)
        return stats, cur.fetchall()

    stats, hists = transaction(config, work, single_statement=not scl)
    return Signatures(_stats_frame([stats]), _scl_frame([hists]))


@impl
def cbm_store_obsids(config: PluginConfig) -> set[str]:
    names = tables(config)
    query = sql.SQL(
        "SELECT c.reference FROM {jobs} j JOIN {cat} c ON c.id = j.catalogue_id"
        " WHERE j.dataset = %s AND j.status = 'extracted'"
    ).format(jobs=names.ident("cbm_scene_jobs"), cat=names.ident(names.catalogue))
    return {row[0] for row in _fetch(config, query, (names.dataset,))}


@impl
def cbm_store_claim(config: PluginConfig, obsids: Sequence[str], worker: str) -> str | None:
    names = tables(config)
    lease = float(config.get("lease_seconds", 3600))
    refs = [str(o) for o in obsids]
    if not refs:
        return None

    def work(cur: psycopg.Cursor) -> str | None:
        ids = _catalogue_ids(cur, names, refs)
        ident = {"jobs": names.ident("cbm_scene_jobs"), "cat": names.ident(names.catalogue)}
        cur.execute(
            sql.SQL(
                "INSERT INTO {jobs} (dataset, catalogue_id) SELECT %s, unnest(%s::int[])"
                " ON CONFLICT DO NOTHING"
            ).format(**ident),
            (names.dataset, list(ids.values())),
        )
        cur.execute(
            sql.SQL(
                "UPDATE {jobs} j SET status = 'inprogress', worker = %(worker)s, claimed_at = now(),"
                " reason = NULL"
                " FROM {cat} c WHERE c.id = j.catalogue_id AND j.dataset = %(dataset)s AND j.catalogue_id = ("
                "  SELECT q.catalogue_id FROM {jobs} q JOIN {cat} s ON s.id = q.catalogue_id"
                "  WHERE q.dataset = %(dataset)s AND q.catalogue_id = ANY(%(ids)s::int[])"
                "  AND (q.status IN ('ingested', 'failed') OR (q.status = 'inprogress'"
                "       AND q.claimed_at < now() - make_interval(secs => %(lease)s)))"
                "  ORDER BY s.obstime NULLS LAST, s.id LIMIT 1 FOR UPDATE OF q SKIP LOCKED)"
                " RETURNING c.reference"
            ).format(**ident),
            {"worker": worker, "dataset": names.dataset, "ids": list(ids.values()), "lease": lease},
        )
        row = cur.fetchone()
        return None if row is None else row[0]

    return transaction(config, work)


@impl
def cbm_store_release(config: PluginConfig, obsids: Sequence[str], worker: str, reason: str) -> int:
    names = tables(config)
    query = sql.SQL(
        "UPDATE {jobs} j SET status = 'failed', reason = %(reason)s FROM {cat} c"
        " WHERE c.id = j.catalogue_id AND j.dataset = %(dataset)s AND c.reference = ANY(%(refs)s)"
        " AND j.status = 'inprogress' AND j.worker = %(worker)s"
    ).format(jobs=names.ident("cbm_scene_jobs"), cat=names.ident(names.catalogue))
    params = {"reason": reason, "dataset": names.dataset, "refs": [str(o) for o in obsids], "worker": worker}

    def work(cur: psycopg.Cursor) -> int:
        cur.execute(query, params)
        return cur.rowcount

    return transaction(config, work)


@impl
def cbm_source_signatures(config: PluginConfig, pids: Sequence[int] | None) -> TimeSeries:
    signatures = cbm_store_read(config, pids, None, None)
    catalogue = cbm_source_catalogue(config)
    parcels = cbm_source_parcels(config)
    if pids is not None:
        parcels = parcels[parcels["pid"].isin(set(pids))]
    return time_series(signatures, catalogue, parcels)


# Scene claiming helpers --------------------------------------------------------------------------


def _catalogue_ids(cur: psycopg.Cursor, names: Tables, refs: Sequence[str]) -> dict[str, int]:
    """Catalogue ids of scene references; scenes unknown to the catalogue get a bare row."""
    cat = names.ident(names.catalogue)
    cur.execute(
        sql.SQL(
            "INSERT INTO {} (reference) SELECT r FROM unnest(%s::text[]) r ON CONFLICT (reference) DO NOTHING"
        ).format(cat),
        (list(refs),),
    )
    cur.execute(sql.SQL("SELECT reference, id FROM {} WHERE reference = ANY(%s)").format(cat), (list(refs),))
    return dict(cur.fetchall())


# COPY payloads -----------------------------------------------------------------------------------


def _copy_text(frame: pd.DataFrame) -> io.StringIO:
    """A frame as COPY text format: tab separated, backslash escapes, \\N for NULL."""
    columns = [
        [
            "\\N" if missing else _escape(str(value))
            for value, missing in zip(values.tolist(), values.isna(), strict=True)
        ]
        for _, values in frame.items()
    ]
    return io.StringIO("".join("\t".join(row) + "\n" for row in zip(*columns, strict=True)))


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _escape(text: str) -> str:
    return text.translate(_ESCAPES)


def _binary_hists(scl: pd.DataFrame, ids: dict[str, int]) -> io.BytesIO:
    """SCL class counts as fixed-width binary COPY rows for the cbm_hist_load staging table."""
    fields = [("n", ">i2"), ("l_pid", ">i4"), ("pid", ">i8"), ("l_obsid", ">i4"), ("obsid", ">i4")]
    fields += [(f, t) for c in range(SCL_CLASSES) for f, t in ((f"l_{c}", ">i4"), (f"h{c}", ">i4"))]
    record = np.zeros(len(scl), dtype=np.dtype(fields))
    record["n"], record["l_pid"], record["l_obsid"] = 2 + SCL_CLASSES, 8, 4
    record["pid"] = scl["pid"].to_numpy(dtype=np.int64)
    record["obsid"] = _scene_ids(scl["obsid"], ids)
    counts = scl[list(HIST_COLUMNS)].to_numpy(dtype=np.int64)
    for c in range(SCL_CLASSES):
        record[f"l_{c}"] = 4
        record[f"h{c}"] = counts[:, c]
    return io.BytesIO(
        b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0) + record.tobytes() + struct.pack(">h", -1)
    )


def _copy_hists(cur: psycopg.Cursor, names: Tables, payload: io.BytesIO) -> None:
    """SCL histograms as JSON objects of the non-zero classes ({"4": 187}, as the reference has them).

    The counts travel as binary COPY into a temporary table and PostgreSQL writes the JSON text
    (concatenation, twice as fast as json_build_object): no per-row work in Python.
    """
    cur.execute(
        sql.SQL("CREATE TEMP TABLE IF NOT EXISTS cbm_hist_load (pid bigint, obsid integer, {})").format(
            sql.SQL(", ").join(
                sql.SQL("{} integer").format(sql.Identifier(f"h{c}")) for c in range(SCL_CLASSES)
            )
        )
    )
    columns = sql.SQL(", ").join(sql.Identifier(f"h{c}") for c in range(SCL_CLASSES))
    _copy(cur, sql.SQL("COPY cbm_hist_load (pid, obsid, {}) FROM STDIN BINARY").format(columns), payload)
    pairs = sql.SQL(", ").join(
        sql.SQL("CASE WHEN {h} <> 0 THEN {key} || {h} END").format(
            h=sql.Identifier(f"h{c}"), key=sql.Literal(f'"{c}": ')
        )
        for c in range(SCL_CLASSES)
    )
    cur.execute(
        sql.SQL(
            "INSERT INTO {} (pid, obsid, hist) SELECT pid, obsid, ('{{' || concat_ws(', ', {}) || '}}')::json"
            " FROM cbm_hist_load"
        ).format(names.ident(names.hists), pairs)
    )
    cur.execute("TRUNCATE cbm_hist_load")


def _copy(cur: psycopg.Cursor, statement: sql.Composable, payload: io.BytesIO | io.StringIO) -> None:
    """Send a whole COPY payload built beforehand, as it is: binary payloads carry their own
    header and trailer. The payload is not consumed, so a retried transaction sends it again."""
    with cur.copy(statement) as copy:
        if isinstance(payload, io.BytesIO):
            with payload.getbuffer() as view:  # no copy; psycopg sends it in libpq-sized pieces
                copy.write(view)
        else:
            copy.write(payload.getvalue())


_FLOATS = [s for s in STATS if s != "count"]


def _scene_ids(obsids: pd.Series, ids: dict[str, int]) -> np.ndarray:
    """Catalogue ids of a column of scene references, looked up once per distinct scene."""
    codes, uniques = pd.factorize(obsids)
    return np.array([ids[str(u)] for u in uniques], dtype=np.int64)[codes]


def _copy_binary_signatures(stats: pd.DataFrame, ids: dict[str, int]) -> io.BytesIO:
    """Signature rows in PostgreSQL's binary COPY format, built with numpy (no per-row Python).

    Rows are grouped by band so that every tuple of a group has the same byte layout.
    """
    out = io.BytesIO()
    out.write(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0))
    obsid = _scene_ids(stats["obsid"], ids)
    for band, rows in stats.groupby(stats["band"].astype(str), sort=False).indices.items():
        encoded = band.encode()
        fields = [("n", ">i2"), ("l_pid", ">i4"), ("pid", ">i8"), ("l_obsid", ">i4"), ("obsid", ">i4")]
        fields += [("l_band", ">i4"), ("band", f"S{len(encoded)}"), ("l_count", ">i4"), ("count", ">i4")]
        for name in _FLOATS:
            fields += [(f"l_{name}", ">i4"), (name, ">f8")]
        record = np.zeros(len(rows), dtype=np.dtype(fields))
        record["n"] = 11
        record["l_pid"], record["l_obsid"], record["l_band"], record["l_count"] = 8, 4, len(encoded), 4
        record["pid"] = stats["pid"].to_numpy(dtype=np.int64)[rows]
        record["obsid"] = obsid[rows]
        record["band"] = encoded
        record["count"] = stats["count"].to_numpy(dtype=np.int64)[rows]
        for name in _FLOATS:
            record[f"l_{name}"] = 8
            record[name] = stats[name].to_numpy(dtype=np.float64)[rows]
        out.write(record.tobytes())
    out.write(struct.pack(">h", -1))
    out.seek(0)
    return out


# Reading -----------------------------------------------------------------------------------------


def _fetch(config: PluginConfig, query: sql.Composable, params: Any) -> list[tuple]:
    def work(cur: psycopg.Cursor) -> list[tuple]:
        cur.execute(query, params)
        return cur.fetchall()

    return transaction(config, work)


def _stream(config: PluginConfig, query: sql.Composable, params: Any) -> Iterator[list[tuple]]:
    """Rows in chunks from a server-side cursor, so memory stays flat on any table size.

    Collected per attempt: a connection lost half-way restarts the read, never yields twice.
    """

    def work(cur: psycopg.Cursor) -> list[list[tuple]]:
        chunks = []
        with cur.connection.cursor(name=f"cbm_{threading.get_ident()}_{time.monotonic_ns()}") as named:
            named.itersize = FETCH_ROWS
            named.execute(query, params)
            while rows := named.fetchmany(FETCH_ROWS):
                chunks.append(rows)
        return chunks

    yield from transaction(config, work)


def _stats_frame(chunks: Iterator[list[tuple]] | list[list[tuple]]) -> pd.DataFrame:
    """Signature rows as the model's table, built column by column with numpy (no per-cell pandas work).

    One pandas construction from whole arrays (a single chunk is not concatenated), because the
    time-series endpoint pays for it on every request.
    """
    parts: list[list[np.ndarray]] = []
    for rows in chunks:
        if rows:
            columns = list(zip(*rows, strict=True))
            parts.append(
                [np.asarray(columns[0], dtype=np.int64), np.asarray(columns[1], dtype=object),
                 np.asarray(columns[2], dtype=object),
                 np.asarray([0 if v is None else v for v in columns[3]], dtype=np.int64)]
                + [np.asarray(c, dtype=np.float64) for c in columns[4:]]  # NULL becomes NaN
            )  # fmt: skip
    if not parts:
        return empty_signatures()
    arrays = parts[0] if len(parts) == 1 else [np.concatenate(c) for c in zip(*parts, strict=True)]
    names = ["pid", "obsid", "band", *STATS]
    return pd.DataFrame(  # text as object Series: pandas would otherwise convert it to its str dtype
        {
            n: pd.Series(a, dtype=object, copy=False) if a.dtype == object else a
            for n, a in zip(names, arrays, strict=True)
        },
        copy=False,
    )


_EMPTY_SCL = empty_scl()  # what every time-series read without histograms returns; cheaper copied


def _scl_frame(chunks: Iterator[list[tuple]] | list[list[tuple]]) -> pd.DataFrame:
    """Histogram rows ({"class": pixels} JSON) as the model's hist_0..hist_11 columns."""
    pids, refs, counts = [], [], []
    for rows in chunks:
        for pid, ref, hist in rows:
            row = np.zeros(SCL_CLASSES, dtype=np.int64)
            for key, value in json.loads(hist).items():
                if 0 <= int(key) < SCL_CLASSES:
                    row[int(key)] = value
            pids.append(pid)
            refs.append(ref)
            counts.append(row)
    if not pids:
        return _EMPTY_SCL.copy(deep=False)  # copy-on-write: callers cannot change the shared one
    frame = {
        "pid": np.asarray(pids, dtype=np.int64),
        "obsid": pd.Series(np.asarray(refs, dtype=object), dtype=object),
    }
    matrix = np.vstack(counts)
    return pd.DataFrame(frame | {name: matrix[:, k] for k, name in enumerate(HIST_COLUMNS)})


# Command line -------------------------------------------------------------------------------------


def postgis_config(path: Path, dsn: str | None = None) -> PluginConfig:
    """The postgis table of a configuration file: [store], else [source], else a [postgis] table."""
    data = read_toml(Path(path))
    base = Path(path).resolve().parent
    for section in ("store", "source", "postgis"):
        table = data.get(section)
        if isinstance(table, dict) and (section == "postgis" or table.get("plugin") == "postgis"):
            options = {**table, "plugin": "postgis"} | ({"dsn": dsn} if dsn else {})
            return plugin_config(options, f"{path} [{section}]", base)
    raise ConfigError(f'{path}: no [store] or [source] table with plugin = "postgis" (or a [postgis] table)')


@impl
def cbm_cli_commands(cli: click.Group) -> None:
    import click

    @cli.group("db")
    def db() -> None:
        """Manage a PostGIS database in the JRC CbM layout (catalogue, parcels, signatures)."""

    config_option = click.option(
        "--config", "config_path", required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="TOML file whose [store] or [source] table has plugin = \"postgis\".",
    )  # fmt: skip
    dsn_option = click.option("--dsn", default=None, help="Connection string (overrides the configuration).")

    @db.command("init")
    @config_option
    @dsn_option
    def init(config_path: Path, dsn: str | None) -> None:
        """Create or upgrade the tables (catalogue, signatures, histograms, job queue)."""
        applied = init_database(postgis_config(config_path, dsn))
        click.echo(f"applied {', '.join(applied)}" if applied else "database is up to date")

    @db.command("import-parcels")
    @click.argument("file", type=click.Path(exists=True, path_type=Path))
    @config_option
    @dsn_option
    @click.option("--layer", default=None, help="Layer of a multi-layer file (GeoPackage).")
    @click.option("--pid-column", default="pid", show_default=True, help="Parcel id column in FILE.")
    @click.option("--crop-code-column", default=None, help="Crop code column in FILE.")
    @click.option("--crop-name-column", default=None, help="Crop name column in FILE.")
    @click.option("--replace", is_flag=True, help="Drop the parcels table first.")
    def import_parcels_command(
        file: Path, config_path: Path, dsn: str | None, layer: str | None, pid_column: str,
        crop_code_column: str | None, crop_name_column: str | None, replace: bool,
    ) -> None:  # fmt: skip
        """Load parcels from a vector FILE into the configured parcels table."""
        from cbm_core.plugins import load_plugins

        options = {"parcels": str(file.resolve()), "layer": layer, "pid_column": pid_column,
                   "crop_code_column": crop_code_column, "crop_name_column": crop_name_column}  # fmt: skip
        options = {k: v for k, v in options.items() if v is not None}
        reader = PluginConfig("local", options, Path.cwd(), "cbm db import-parcels")
        parcels = load_plugins().caller("local", "cbm_source_parcels", reader.where)(config=reader)
        rows = import_parcels(postgis_config(config_path, dsn), parcels, replace=replace)
        click.echo(f"imported {rows} parcels")

    @db.command("import-catalogue")
    @config_option
    @dsn_option
    def import_catalogue_command(config_path: Path, dsn: str | None) -> None:
        """Copy the scene catalogue of the configuration's [source] (local, s3, ...) into the database."""
        from cbm_core.plugins import load_plugins

        target = postgis_config(config_path, dsn)
        data = read_toml(config_path)
        if "source" not in data:
            raise ConfigError(f"{config_path}: no [source] table to read the catalogue from")
        source = plugin_config(
            data["source"], f"{config_path} [source]", config_path.resolve().parent, "local"
        )
        catalogue = load_plugins().caller(source.plugin, "cbm_source_catalogue", source.where)(config=source)
        init_database(target)
        click.echo(f"imported {import_catalogue(target, catalogue)} scenes")

    @db.command("cluster")
    @config_option
    @dsn_option
    def cluster_command(config_path: Path, dsn: str | None) -> None:
        """Rewrite the signature tables in parcel order (after loading, before serving: a parcel's
        time series then reads a few adjacent pages). Locks the tables while it runs."""
        started = time.monotonic()
        done = cluster_signatures(postgis_config(config_path, dsn))
        click.echo(f"clustered {', '.join(done)} in {time.monotonic() - started:.0f} s")

    @db.command("load-signatures")
    @config_option
    @dsn_option
    @click.option(
        "--from", "source_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Configuration whose [store] table holds the signatures to load (e.g. a Parquet store).",
    )  # fmt: skip
    def load_signatures_command(config_path: Path, dsn: str | None, source_path: Path) -> None:
        """Bulk-load every scene of another signature store (indexes rebuilt once at the end)."""
        from cbm_core.plugins import load_plugins

        target = postgis_config(config_path, dsn)
        data = read_toml(source_path)
        if "store" not in data:
            raise ConfigError(f"{source_path}: no [store] table to load signatures from")
        store = plugin_config(
            data["store"], f"{source_path} [store]", source_path.resolve().parent, "parquet"
        )
        manager = load_plugins()
        obsids = manager.caller(store.plugin, "cbm_store_obsids", store.where)(config=store)
        read = manager.caller(store.plugin, "cbm_store_read", store.where)
        init_database(target)
        rows = bulk_load(
            target, sorted(obsids), lambda o: read(config=store, pids=None, obsids=[o], bands=None)
        )
        click.echo(f"loaded {rows} rows of {len(obsids)} scenes")
