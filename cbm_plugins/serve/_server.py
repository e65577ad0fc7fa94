"""`cbm serve`: the CbM RESTful query API (same query names, parameters and column-oriented JSON as
the JRC reference server) over any configured source and signature store, plus marker results
and verdicts.

The server reaches data only through the plugin manager (the hooks a dataset's [source] and
[store] name), so it serves an embedded Parquet store as well as PostGIS. Every data endpoint,
chip files included, needs HTTP basic auth and the user's right to the dataset's aoi. Server
configuration (TOML)::

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

import atexit
import gc
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import click
import geopandas as gpd
import numpy as np
import orjson
import pandas as pd
import rasterio
import shapely
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Field
from pyproj import Transformer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cbm_core.config import PluginConfig, plugin_config, read_toml
from cbm_core.errors import CbmError, ConfigError, InputError
from cbm_core.model import HIST_COLUMNS
from cbm_core.plugins import PluginManager, load_plugins
from cbm_plugins.serve._users import ALL_AOIS, Authenticator, User, make_user, read_users, write_users

CONFIG_ENV = "CBM_SERVER_CONFIG"
CHIP_DIR_ENV = "CBM_SERVER_CHIP_DIR"
AOI = r"^[A-Za-z0-9_-]{1,32}$"
CHIP_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}\.tif$")
TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
PID_MIN, PID_MAX = -(2**63), 2**63 - 1
EPOCH = pd.Timestamp(0, tz="UTC")
CATALOGUE_TTL = 300.0  # seconds before a dataset's scene list is read again (new scenes appear)
TS_COLUMNS = ("date_part", "band", "count", "mean", "std", "min", "p25", "p50", "p75", "max")
LIMIT_DEFAULTS = {
    "max_body_bytes": 65_536,
    "max_query_bytes": 8_192,
    "max_polygon_vertices": 500,
    "max_polygon_km2": 100.0,
    "max_parcels": 100,
    "max_chipsize": 5120.0,
    "max_chips": 24,
}


# Configuration -----------------------------------------------------------------------------------


@dataclass
class Dataset:
    """One aoi/year: where its parcels, scenes and signatures come from, with cached lookups."""

    aoi: str
    year: int
    source: PluginConfig
    store: PluginConfig
    results: Path | None = None
    verdicts: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _parcels: gpd.GeoDataFrame | None = field(default=None, repr=False)
    _catalogue: tuple[float, gpd.GeoDataFrame, pd.DataFrame] | None = field(default=None, repr=False)
    _files: dict[Path, tuple[int, pd.DataFrame]] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        return f"{self.aoi}{self.year}".lower()


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


# Errors ------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# Column-oriented JSON -----------------------------------------------------------------------------


def _column(values: Any) -> Any:
    """A column for orjson: numeric numpy arrays as they are (NaN becomes null), others as lists."""
    array = np.asarray(values)
    if array.dtype.kind in "fiub":
        return np.ascontiguousarray(array)
    return array.tolist()


def columns(data: dict[str, Any]) -> Response:
    """A column-oriented JSON answer, serialised by orjson straight from the numpy arrays."""
    body = orjson.dumps({k: _column(v) for k, v in data.items()}, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type="application/json")


# The application --------------------------------------------------------------------------------


class ChipsBatch(BaseModel):
    """rawChipsBatch request body (JSON)."""

    lon: float = Field(ge=-180, le=180)
    lat: float = Field(ge=-90, le=90)
    tiles: list[Annotated[str, Field(max_length=120)]] = Field(max_length=1000)
    bands: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,16}$")]] = Field(min_length=1, max_length=32)
    chipsize: float = Field(default=1280, gt=0)
    aoi: Annotated[str | None, Field(pattern=AOI)] = None
    year: int | None = Field(default=None, ge=1970, le=2200)
    parcels: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")] = None


class SizeLimit:
    """ASGI middleware refusing oversized requests before any handler reads them."""

    def __init__(self, app: Any, max_body: int, max_query: int) -> None:
        self.app, self.max_body, self.max_query = app, max_body, max_query

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = None
        if len(scope.get("query_string", b"")) > self.max_query:
            refusal = _error(414, f"query string longer than {self.max_query} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            refusal = _error(413, f"request body larger than {self.max_body} bytes")
        elif length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            refusal = _error(411, "a request body needs a Content-Length header")
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(config: ServerConfig, plugins: PluginManager | None = None) -> FastAPI:
    """The FastAPI application serving the datasets of a server configuration."""
    manager = plugins if plugins is not None else load_plugins()
    auth = Authenticator(config.users)
    limits = config.limits
    by_key = {d.key: d for d in config.datasets}
    config.chip_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI(
        title="cbm-engine CbM RESTful API",
        version="1.0",
        description="JRC CbM-compatible queries (column-oriented JSON) plus marker results and verdicts.",
    )
    basic = HTTPBasic(realm="cbm")

    def hook(plugin: PluginConfig, name: str) -> Callable[..., Any]:
        return manager.caller(plugin.plugin, name, plugin.where)

    # Size limits ---------------------------------------------------------------------------

    app.add_middleware(
        SizeLimit, max_body=int(limits["max_body_bytes"]), max_query=int(limits["max_query_bytes"])
    )

    # Errors --------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        return _error(422, f"{'.'.join(first['loc'][1:]) or 'request'}: {first['msg']}", detail=details)

    @app.exception_handler(CbmError)
    async def data_error(_: Request, exc: CbmError) -> JSONResponse:
        print(f"cbm serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        if isinstance(exc, InputError):
            return _error(502, "the dataset's data could not be read; see the server log")
        return _error(503, "the dataset's store is unavailable; try again later")

    # Authentication and datasets -----------------------------------------------------------

    async def user(credentials: Annotated[HTTPBasicCredentials, Depends(basic)]) -> User:
        # A password verified before is checked on the event loop (a keyed hash); a new or wrong one
        # costs a scrypt, in a worker thread so that it does not hold up other requests.
        found = auth.cached(credentials.username, credentials.password)
        if found is None:
            found = await run_in_threadpool(auth.check, credentials.username, credentials.password)
        if found is None:
            raise HTTPException(
                401, "wrong user name or password", headers={"WWW-Authenticate": 'Basic realm="cbm"'}
            )
        return found

    def dataset(who: User, aoi: str | None, year: int | None, parcels: str | None) -> Dataset:
        """The dataset named by aoi + year, or by the legacy parcels=<aoi><year> form."""
        if parcels is not None and aoi is None:
            key = parcels.lower()
        elif aoi is not None and year is not None:
            key = f"{aoi}{year}".lower()
        else:
            raise ApiError(400, "give aoi and year (or the legacy parcels=<aoi><year>)")
        found = by_key.get(key)
        if found is None and (aoi is None or who.may_read(aoi)):
            raise ApiError(404, f"no dataset {key}")
        if found is None or not who.may_read(found.aoi):
            raise ApiError(403, f"user {who.name} may not read dataset {key}")
        return found

    # Cached reads ------------------------------------------------------------------------------

    def parcels_of(ds: Dataset) -> gpd.GeoDataFrame:
        with ds._lock:
            if ds._parcels is None:
                frame = hook(ds.source, "cbm_source_parcels")(config=ds.source)
                frame.index = frame["pid"].to_numpy()
                frame.sindex  # noqa: B018 - build the spatial index once, under the lock
                ds._parcels = frame
            return ds._parcels

    def catalogue_of(ds: Dataset) -> gpd.GeoDataFrame:
        """The dataset's scenes indexed by obsid, re-read every CATALOGUE_TTL seconds."""
        with ds._lock:
            if ds._catalogue is None or time.monotonic() - ds._catalogue[0] > CATALOGUE_TTL:
                frame = hook(ds.source, "cbm_source_catalogue")(config=ds.source)
                frame.index = frame["obsid"].to_numpy()
                epoch = (pd.to_datetime(frame["obstime"], utc=True) - EPOCH) // pd.Timedelta(seconds=1)
                meta = pd.DataFrame({"epoch": epoch, "card": frame["card"], "orbit": frame["orbit"]})
                ds._catalogue = (time.monotonic(), frame, meta)
            return ds._catalogue[1]

    def scene_facts(ds: Dataset) -> pd.DataFrame:
        """epoch, card and orbit per obsid: the small lookup every time-series request needs."""
        catalogue_of(ds)
        return ds._catalogue[2]  # type: ignore[index]

    def table_of(ds: Dataset, path: Path | None, what: str) -> pd.DataFrame:
        if path is None or not path.exists():
            raise ApiError(
                404, f"dataset {ds.key} has no {what} (run `cbm run` and set '{what}' in the config)"
            )
        stamp = path.stat().st_mtime_ns
        with ds._lock:
            cached = ds._files.get(path)
            if cached is None or cached[0] != stamp:
                frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
                ds._files[path] = cached = (stamp, frame)
            return cached[1]

    def parcel_row(ds: Dataset, pid: int) -> pd.Series:
        frame = parcels_of(ds)
        if pid not in frame.index:
            raise ApiError(404, f"no parcel {pid} in {ds.key}")
        return frame.loc[pid]

    def describe(ds: Dataset, rows: gpd.GeoDataFrame, geometry: bool, wgs84: bool, legacy: bool) -> Response:
        crs = rows.crs
        srid = crs.to_epsg() if crs is not None else None
        in_wgs84 = rows.geometry.to_crs("EPSG:4326") if len(rows) else rows.geometry
        centroids = rows.geometry.centroid.to_crs("EPSG:4326") if len(rows) else rows.geometry
        data: dict[str, Any] = {
            ("ogc_fid" if legacy else "pid"): rows["pid"].to_numpy(),
            "cropname": rows["crop_name"].astype(str).to_numpy(),
            "cropcode": rows["crop_code"].astype(str).to_numpy(),
            "srid": [4326 if wgs84 else srid] * len(rows),
            "area": rows.geometry.to_crs("EPSG:3035").area.round(2).to_numpy() if len(rows) else [],
            "clon": centroids.x.round(6).to_numpy() if len(rows) else [],
            "clat": centroids.y.round(6).to_numpy() if len(rows) else [],
        }
        if geometry:
            shapes = in_wgs84 if wgs84 else rows.geometry
            data["geom"] = [shapely.to_geojson(g) for g in shapes.values]
        return columns(data)

    # Parcel queries ----------------------------------------------------------------------------

    Aoi = Annotated[str | None, Query(pattern=AOI, description="Area of interest (member state or region)")]
    Year = Annotated[int | None, Query(ge=1970, le=2200, description="Year of the parcel declarations")]
    Legacy = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="Legacy <aoi><year>")]
    Pid = Annotated[int | None, Query(ge=PID_MIN, le=PID_MAX, description="Parcel id")]
    Lon = Annotated[float, Query(ge=-180, le=180)]
    Lat = Annotated[float, Query(ge=-90, le=90)]
    Who = Annotated[User, Depends(user)]

    def the_pid(pid: int | None, ogc_fid: int | None) -> tuple[int, bool]:
        if pid is None and ogc_fid is None:
            raise ApiError(400, "give pid (or the legacy ogc_fid)")
        return (pid, False) if pid is not None else (int(ogc_fid), True)  # type: ignore[arg-type]

    @app.get("/query/parcelByLocation", tags=["parcels"])
    def parcel_by_location(
        who: Who, lon: Lon, lat: Lat, aoi: Aoi = None, year: Year = None, parcels: Legacy = None,
        ptype: Annotated[str, Query(max_length=8)] = "", withGeometry: bool = False, wgs84: bool = False,
    ) -> Response:  # fmt: skip
        """The parcel at a WGS84 location: pid, cropname, cropcode, srid, area (m², EPSG:3035), clon, clat."""
        ds = dataset(who, aoi, year, parcels)
        frame = parcels_of(ds)
        point = gpd.GeoSeries([shapely.Point(lon, lat)], crs="EPSG:4326").to_crs(frame.crs).iloc[0]
        hits = frame.iloc[np.sort(frame.sindex.query(point, predicate="intersects"))[:1]]
        return describe(ds, hits, withGeometry, wgs84, legacy=parcels is not None)

    @app.get("/query/parcelByID", tags=["parcels"])
    def parcel_by_id(
        who: Who, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
        ogc_fid: Pid = None, ptype: Annotated[str, Query(max_length=8)] = "", withGeometry: bool = False,
        wgs84: bool = False,
    ) -> Response:  # fmt: skip
        """One parcel by id: pid, cropname, cropcode, srid, area, clon, clat [, geom as GeoJSON]."""
        ds = dataset(who, aoi, year, parcels)
        pid, legacy = the_pid(pid, ogc_fid)
        frame = parcels_of(ds)
        rows = frame.loc[[pid]] if pid in frame.index else frame.iloc[:0]
        return describe(ds, rows, withGeometry, wgs84, legacy=legacy or parcels is not None)

    @app.get("/query/parcelsByPolygon", tags=["parcels"])
    def parcels_by_polygon(
        who: Who, polygon: Annotated[str, Query(max_length=8000, description="lon_lat-lon_lat-... (WGS84)")],
        aoi: Aoi = None, year: Year = None, parcels: Legacy = None, only_ids: bool = True,
        withGeometry: bool = False, wgs84: bool = False,
    ) -> Response:  # fmt: skip
        """Parcels intersecting a polygon (at most max_parcels): pid [, details and geometry]."""
        ds = dataset(who, aoi, year, parcels)
        shape = _polygon(polygon, int(limits["max_polygon_vertices"]), float(limits["max_polygon_km2"]))
        frame = parcels_of(ds)
        local = gpd.GeoSeries([shape], crs="EPSG:4326").to_crs(frame.crs).iloc[0]
        hits = frame.iloc[np.sort(frame.sindex.query(local, predicate="intersects"))]
        hits = hits.sort_values("pid").iloc[: int(limits["max_parcels"])]
        if only_ids and not withGeometry:
            return columns({"ogc_fid" if parcels is not None else "pid": hits["pid"].to_numpy()})
        return describe(ds, hits, withGeometry, wgs84, legacy=parcels is not None)

    @app.get("/query/parcelPeers", tags=["parcels"])
    def parcel_peers(
        who: Who, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
        ogc_fid: Pid = None, distance: Annotated[float, Query(gt=0, le=50_000)] = 2000,
        max: Annotated[int, Query(ge=1, le=100)] = 10,
    ) -> Response:  # fmt: skip
        """Parcels of the same crop (area > 3000 m²) within distance metres, nearest first: pids, distance."""
        ds = dataset(who, aoi, year, parcels)
        pid, _ = the_pid(pid, ogc_fid)
        row = parcel_row(ds, pid)
        frame = parcels_of(ds)
        projected = frame.crs is not None and frame.crs.is_projected
        geoms = frame.geometry if projected else frame.geometry.to_crs("EPSG:3035")
        target = geoms.loc[pid]
        near = frame.iloc[frame.sindex.query(target.buffer(distance))] if projected else frame
        same = near[(near["crop_name"] == row["crop_name"]) & (near["pid"] != pid)]
        large = same.geometry.to_crs("EPSG:3035").area > 3000
        dist = geoms.loc[same.index].centroid.distance(target.centroid)
        chosen = dist[large & (dist <= distance)].sort_values(kind="stable").iloc[:max]
        return columns({"pids": chosen.index.to_numpy(np.int64), "distance": chosen.round(2).to_numpy()})

    # Time series -------------------------------------------------------------------------------

    @app.get("/query/parcelTimeSeries", tags=["time series"])
    def parcel_time_series(
        who: Who, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
        ogc_fid: Pid = None, tstype: Literal["s2", "bs", "c6", "scl"] = "s2",
        band: Annotated[str, Query(pattern=r"^[A-Za-z0-9_]{0,16}$")] = "",
        scl: bool = False, ptype: Annotated[str, Query(max_length=8)] = "",
    ) -> Response:  # fmt: skip
        """Signatures of one parcel: date_part (epoch s), band, count, mean, std, min, p25, p50, p75, max
        [, hist]; tstype=scl gives date_part and hist. Extra columns: obsid, orbit."""
        ds = dataset(who, aoi, year, parcels)
        pid, _ = the_pid(pid, ogc_fid)
        scenes = scene_facts(ds)
        card = "s2" if tstype == "scl" else tstype
        wants_hists = tstype == "scl" or scl
        signatures = hook(ds.store, "cbm_store_read")(
            config=ds.store, pids=[pid], obsids=None, bands=[band] if band and tstype != "scl" else None,
            scl=wants_hists,
        )  # fmt: skip
        hists = _hists(signatures.scl, scenes) if wants_hists else None
        if tstype == "scl":
            order = np.argsort(hists["epoch"].to_numpy(), kind="stable")
            return columns({
                "date_part": hists["epoch"].to_numpy()[order], "hist": [hists["hist"].iloc[i] for i in order],
                "obsid": hists["obsid"].to_numpy()[order],
            })  # fmt: skip
        # Plain numpy on positions (no pandas reindex or masks): this is the hottest endpoint.
        stats = signatures.stats
        obsid = stats["obsid"].to_numpy()
        at = scenes.index.get_indexer(pd.Index(obsid, dtype=object))  # as object: no str dtype inference
        keep = np.flatnonzero(at >= 0)
        keep = keep[scenes["card"].to_numpy()[at[keep]] == card]
        epoch, band = scenes["epoch"].to_numpy()[at[keep]], stats["band"].to_numpy()[keep]
        order = np.lexsort((band, epoch))
        rows = keep[order]
        data = {"date_part": epoch[order], "band": band[order]}
        for name in TS_COLUMNS[2:]:
            data[name] = stats[name].to_numpy()[rows]
        data["obsid"] = obsid[rows]
        data["orbit"] = scenes["orbit"].to_numpy()[at[rows]]
        if hists is not None:
            lookup = dict(zip(hists["obsid"], hists["hist"], strict=True))
            data["hist"] = [lookup.get(o) for o in data["obsid"]]
        return columns(data)

    # Chips -------------------------------------------------------------------------------------

    def make_chips(
        ds: Dataset, lon: float, lat: float, bands: Sequence[str], chipsize: float,
        scenes: pd.DataFrame, base_url: str,
    ) -> Response:  # fmt: skip
        if chipsize > limits["max_chipsize"]:
            raise ApiError(
                400, f"chipsize {chipsize} m is larger than the limit {limits['max_chipsize']:g} m"
            )
        point = shapely.Point(lon, lat)
        if scenes.geometry.notna().any():
            scenes = scenes[scenes.geometry.isna() | scenes.geometry.intersects(point)]
        wanted = [(s, b) for s in scenes.itertuples(index=False) for b in bands if b in s.bands]
        if len(wanted) > limits["max_chips"]:
            raise ApiError(
                400,
                f"{len(wanted)} chips selected, over the limit {int(limits['max_chips'])}: shorten the dates",
            )
        token = secrets.token_urlsafe(18)
        folder = config.chip_dir / token
        folder.mkdir(parents=True)
        (folder / ".aoi").write_text(ds.aoi)
        _expire_chips(config.chip_dir)
        bounds, crs = _square(lon, lat, chipsize)
        reader = hook(ds.source, "cbm_source_read_window")
        out: dict[str, list] = {
            "dates": [],
            "chips": [],
            "obsids": [],
            "bands": [],
            "cards": [],
            "orbits": [],
        }
        for scene, band in wanted:
            window = reader(config=ds.source, band=scene.bands[band], bounds=bounds, crs=crs)
            if window.array.size == 0:
                continue
            name = f"{scene.obsid}.{band}.tif"
            if not CHIP_NAME.match(name):
                raise ApiError(500, f"scene {scene.obsid!r} has a name that cannot be a file name")
            _write_chip(folder / name, window)
            out["dates"].append(pd.Timestamp(scene.obstime).isoformat())
            out["chips"].append(f"{base_url}chips/{token}/{name}")
            out["obsids"].append(scene.obsid)
            out["bands"].append(band)
            out["cards"].append(scene.card)
            out["orbits"].append(scene.orbit)
        return columns(out)

    def chip_dataset(
        who: User, aoi: str | None, year: int | None, parcels: str | None, lon: float, lat: float
    ):
        if aoi is not None or parcels is not None:
            return dataset(who, aoi, year, parcels)
        point = shapely.Point(lon, lat)
        for ds in config.datasets:  # old clients send no aoi: the first readable dataset covering the point
            if who.may_read(ds.aoi):
                scenes = catalogue_of(ds)
                if scenes.geometry.isna().all() or scenes.geometry.intersects(point).any():
                    return ds
        raise ApiError(404, "no dataset you may read has scenes at this location")

    def path_prefix(request: Request) -> str:
        return str(request.url_for("chip_file", token="T", name="N.tif")).split("chips/T/")[0]

    @app.get("/query/rawChipByLocation", tags=["chips"])
    def raw_chip_by_location(
        request: Request, who: Who, lon: Lon, lat: Lat, start_date: date, end_date: date,
        band: Annotated[str, Query(pattern=r"^[A-Za-z0-9_]{1,16}$")] = "B08",
        chipsize: Annotated[float, Query(gt=0)] = 1280, aoi: Aoi = None, year: Year = None,
        parcels: Legacy = None, plevel: Annotated[str, Query(max_length=16)] = "LEVEL2A",
    ) -> Response:  # fmt: skip
        """GeoTIFF chips (native grid, no resampling) of one band around a location: dates, chips
        (links needing the same credentials). Extra columns: obsids, bands, cards, orbits."""
        ds = chip_dataset(who, aoi, year, parcels, lon, lat)
        scenes = catalogue_of(ds)
        times = pd.to_datetime(scenes["obstime"], utc=True)
        start, end = (
            pd.Timestamp(start_date, tz="UTC"),
            pd.Timestamp(end_date, tz="UTC") + pd.Timedelta(days=1),
        )
        selected = scenes[(times >= start) & (times < end)]
        return make_chips(ds, lon, lat, [band], chipsize, selected, path_prefix(request))

    @app.get("/query/rawChipByParcelID", tags=["chips"])
    def raw_chip_by_parcel_id(
        request: Request, who: Who, start_date: date, end_date: date, aoi: Aoi = None, year: Year = None,
        parcels: Legacy = None, pid: Pid = None, ogc_fid: Pid = None,
        band: Annotated[str, Query(pattern=r"^[A-Za-z0-9_]{1,16}$")] = "B08",
        chipsize: Annotated[float, Query(gt=0)] = 1280,
    ) -> Response:  # fmt: skip
        """As rawChipByLocation, centred on a parcel."""
        ds = dataset(who, aoi, year, parcels)
        pid, _ = the_pid(pid, ogc_fid)
        centre = gpd.GeoSeries([parcel_row(ds, pid).geometry], crs=parcels_of(ds).crs)
        centre = centre.representative_point().to_crs("EPSG:4326").iloc[0]
        scenes = catalogue_of(ds)
        times = pd.to_datetime(scenes["obstime"], utc=True)
        start, end = (
            pd.Timestamp(start_date, tz="UTC"),
            pd.Timestamp(end_date, tz="UTC") + pd.Timedelta(days=1),
        )
        return make_chips(
            ds,
            centre.x,
            centre.y,
            [band],
            chipsize,
            scenes[(times >= start) & (times < end)],
            path_prefix(request),
        )

    @app.post("/query/rawChipsBatch", tags=["chips"])
    def raw_chips_batch(request: Request, who: Who, batch: Annotated[ChipsBatch, Body()]) -> Response:
        """Chips of the listed scenes (tiles = scene references) and bands around a location."""
        ds = chip_dataset(who, batch.aoi, batch.year, batch.parcels, batch.lon, batch.lat)
        if len(batch.tiles) * len(batch.bands) > limits["max_chips"]:
            raise ApiError(400, f"{len(batch.tiles)} tiles x {len(batch.bands)} bands is more than "
                                f"{int(limits['max_chips'])} chips")  # fmt: skip
        scenes = catalogue_of(ds)
        unknown = [t for t in batch.tiles if t not in scenes.index]
        if unknown:
            raise ApiError(404, f"unknown tile(s) in {ds.key}: {', '.join(unknown[:5])}")
        selected = scenes.loc[batch.tiles]
        return make_chips(
            ds, batch.lon, batch.lat, batch.bands, batch.chipsize, selected, path_prefix(request)
        )

    @app.get("/chips/{token}/{name}", name="chip_file", tags=["chips"], response_class=FileResponse)
    def chip_file(who: Who, token: str, name: str) -> FileResponse:
        """A chip GeoTIFF made by a chip query; readable only by users of the same aoi."""
        if not TOKEN.match(token) or not CHIP_NAME.match(name):
            raise ApiError(404, "no such chip")
        folder = config.chip_dir / token
        try:
            aoi = (folder / ".aoi").read_text()
        except OSError:
            raise ApiError(404, "no such chip (chips expire after an hour)") from None
        if not who.may_read(aoi):
            raise ApiError(403, f"user {who.name} may not read chips of {aoi}")
        if not (folder / name).is_file():
            raise ApiError(404, "no such chip")
        return FileResponse(folder / name, media_type="image/tiff", filename=name)

    # Marker results and verdicts ---------------------------------------------------------------

    @app.get("/query/markerResults", tags=["results"])
    def marker_results(
        who: Who, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
        ogc_fid: Pid = None, marker: Annotated[str | None, Query(max_length=64)] = None,
    ) -> Response:  # fmt: skip
        """Marker results of one parcel (every marker, or one): marker, pid, status, reason, events,
        values, confidence, obsids (events/values/obsids as JSON text)."""
        ds = dataset(who, aoi, year, parcels)
        pid, _ = the_pid(pid, ogc_fid)
        table = table_of(ds, ds.results, "results")
        rows = table[table["pid"] == pid]
        if marker is not None:
            rows = rows[rows["marker"] == marker]
        return columns({c: rows[c].to_numpy() for c in rows.columns})

    @app.get("/query/verdicts", tags=["results"])
    def verdicts(
        who: Who, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
        ogc_fid: Pid = None, light: Literal["green", "yellow", "red"] | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000, offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Response:  # fmt: skip
        """Traffic-light verdicts: pid, light, reasons (and the declaration), by parcel or by light."""
        ds = dataset(who, aoi, year, parcels)
        table = table_of(ds, ds.verdicts, "verdicts")
        if pid is not None or ogc_fid is not None:
            table = table[table["pid"] == the_pid(pid, ogc_fid)[0]]
        if light is not None:
            table = table[table["light"] == light]
        table = table.sort_values("pid").iloc[offset : offset + limit]
        wanted = [c for c in ("pid", "light", "reasons", "crop_code", "crop_name") if c in table.columns]
        return columns({c: table[c].to_numpy() for c in wanted})

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


# Helpers -----------------------------------------------------------------------------------------


def _polygon(text: str, max_vertices: int, max_km2: float) -> shapely.Polygon:
    """Parse lon_lat-lon_lat-... into a valid WGS84 polygon within the size limits (else 400)."""
    parts = [p for p in text.strip().split("-") if p]
    if len(parts) > max_vertices:
        raise ApiError(400, f"polygon has {len(parts)} vertices, more than the limit {max_vertices}")
    try:
        points = [tuple(float(v) for v in p.split("_")) for p in parts]
    except ValueError:
        raise ApiError(400, "polygon: expected lon_lat-lon_lat-... with decimal degrees") from None
    if len(points) < 3 or any(len(p) != 2 or not all(math.isfinite(v) for v in p) for p in points):
        raise ApiError(400, "polygon: expected at least 3 lon_lat pairs")
    if any(not (-180 <= x <= 180 and -90 <= y <= 90) for x, y in points):
        raise ApiError(400, "polygon: coordinates outside WGS84 range")
    shape = shapely.make_valid(shapely.Polygon(points))
    if shape.is_empty or shape.area == 0:
        raise ApiError(400, "polygon: empty or degenerate")
    area = gpd.GeoSeries([shape], crs="EPSG:4326").to_crs("EPSG:3035").area.iloc[0] / 1e6
    if area > max_km2:
        raise ApiError(400, f"polygon covers {area:.1f} km², more than the limit {max_km2:g} km²")
    return shape


def _square(lon: float, lat: float, size: float) -> tuple[tuple[float, float, float, float], str]:
    """A size x size metre square centred on a WGS84 point, in its UTM zone."""
    zone = int((lon + 180) // 6) % 60 + 1
    crs = f"EPSG:{32600 + zone if lat >= 0 else 32700 + zone}"
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    half = size / 2
    return (x - half, y - half, x + half, y + half), crs


def _write_chip(path: Path, window: Any) -> None:
    """A window as a GeoTIFF on its own grid, with the nodata, scale and offset it was read with."""
    array = window.array
    profile = {
        "driver": "GTiff", "height": array.shape[0], "width": array.shape[1], "count": 1,
        "dtype": array.dtype, "crs": window.crs, "transform": window.transform, "nodata": window.nodata,
        "compress": "deflate",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as out:
        out.write(array, 1)
        out.scales = (window.scale,)
        out.offsets = (window.offset,)


def _expire_chips(root: Path, ttl: float = 3600.0) -> None:
    cutoff = time.time() - ttl
    for folder in root.iterdir():
        try:
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def _hists(scl: pd.DataFrame, scenes: pd.DataFrame) -> pd.DataFrame:
    """SCL histograms as {"class": pixels} dicts (non-zero classes), with each scene's epoch."""
    counts = scl[list(HIST_COLUMNS)].to_numpy(np.int64)
    hists = [{str(c): int(n) for c, n in enumerate(row) if n} for row in counts]
    epoch = scenes["epoch"].reindex(scl["obsid"].to_numpy()).to_numpy()
    frame = pd.DataFrame({"obsid": scl["obsid"].to_numpy(), "epoch": epoch, "hist": hists})
    return frame[frame["epoch"].notna()].astype({"epoch": "int64"})


# Command line ------------------------------------------------------------------------------------


def create_app_from_env() -> FastAPI:
    """uvicorn factory (one per worker process): the configuration path comes from CBM_SERVER_CONFIG.

    The objects made so far (modules, the app) live as long as the worker: gc.freeze() takes them
    out of the garbage collector's full passes, which otherwise scan them all and stall every
    request in flight for 50-250 ms now and then.
    """
    app = create_app(load_server_config(Path(os.environ[CONFIG_ENV])))
    gc.collect()
    gc.freeze()
    return app


@click.command("serve")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="Worker processes.")
def serve_command(config: Path, host: str, port: int, workers: int) -> None:
    """Serve the CbM RESTful API for the datasets of CONFIG (TOML) with uvicorn."""
    import uvicorn

    settings = load_server_config(config)  # fail here, with a clear message, not in a worker
    if not settings.users.exists():
        click.echo(f"warning: no users file {settings.users}: add users with `cbm users add`", err=True)
    os.environ[CONFIG_ENV] = str(settings.path)
    os.environ[CHIP_DIR_ENV] = str(settings.chip_dir)  # one chip folder shared by every worker
    uvicorn.run(
        "cbm_plugins.serve._server:create_app_from_env", factory=True, host=host, port=port, workers=workers,
        log_level="warning", limit_concurrency=512, timeout_keep_alive=30, server_header=False,
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
