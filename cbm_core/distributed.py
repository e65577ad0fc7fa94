"""`cbm run` on a dask.distributed cluster: the same work units as single-process, on many machines.

Two kinds of unit, both idempotent so any of them may run twice (a killed worker, a re-run):

* one scene: a worker reads the catalogue once (cached per process) and only the parcels within
  the scene's footprint (the last few footprints cached), extracts the scene and writes it to the
  store itself, so signatures never travel through the scheduler and a worker's memory is bounded
  by one footprint's parcels, not the country's;
* one marker partition: a contiguous pid range (or, when a marker compares neighbours, a compact
  area with its surroundings as context), read from the store on the worker, scored and judged
  by the scheme's rule there; only the small result and verdict tables come back, so a
  worker's memory is bounded by the partition size, not the country, and the driver's serial
  share stays small.

The driver keeps a bounded number of units in flight. When the store can claim scenes
(cbm_store_claim, e.g. PostGIS with SKIP LOCKED), the driver claims each scene before submitting
it, so several runs sharing one catalogue never extract the same scene; scenes another run holds
are waited for, then taken over when that run's lease expires. A unit that fails every retry is
recorded with its reason and the run goes on; its claim is given back (cbm_store_release), as are
all this run's unfinished claims when the run stops early (lost scheduler, Ctrl-C, an error), so a
re-run takes those scenes at once instead of waiting for the lease.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cbm_core.config import ClusterConfig, PluginConfig, RunConfig, Scheme, jobs_by_card
from cbm_core.errors import CbmError, ConfigError
from cbm_core.model import (
    MarkerResult,
    Signatures,
    Status,
    results_frame,
    time_series,
    verdict_table,
    verdicts_frame,
)
from cbm_core.outputs import ExtractReport, RunResult, describe_error, run_summary, write_outputs
from cbm_core.partitions import context_distance, context_groups
from cbm_core.plugins import load_plugins

if TYPE_CHECKING:
    from cbm_core.pipeline import Engine

log = logging.getLogger(__name__)
CLAIM_CHUNK = 64  # scenes offered per claim call: one round trip, whatever the catalogue size
CLAIM_POLL = 5.0  # seconds between looks at scenes another run is extracting
SCENE_COLUMNS = ["obsid", "obstime", "card", "orbit"]  # what marker units need of the catalogue
WORKER_ENVIRON = {"MALLOC_MMAP_THRESHOLD_": 64 * 2**20}  # see worker_environment()
MIN_PARTITION = 1000  # parcels: smaller marker units cost more in overhead than they gain in balance
PARCEL_CACHE = 2  # footprints whose parcels a worker keeps: units in a row often share a tile
SCHEDULER_LOST = (
    "the dask scheduler dropped this run's work (restarted or unreachable); "
    "run again to resume: stored scenes are skipped"
)

# The driver's Engine class and the plugins registered by hand in the driver (not built-in, not
# entry points) as (name, module) pairs that workers import and register too, so a worker runs
# exactly the driver's engine and plugins.
PluginSpec = tuple[type, tuple[tuple[str, str], ...]]
Box = tuple[float, float, float, float]


class UnitFailed(Exception):
    """A unit's own failure (a scene every parcel of which failed): raised so dask retries it."""


def run_distributed(
    engine: Engine, config: RunConfig, cluster: ClusterConfig | Any, force: bool = False
) -> RunResult:
    """Engine.run on a cluster: a ClusterConfig (address or local workers) or a connected Client."""
    started = time.perf_counter()
    options = cluster if isinstance(cluster, ClusterConfig) else config.cluster
    scheme = engine.run_scheme(config)
    engine.check(config, scheme)
    spec = plugin_spec(engine)
    parcels = engine.parcels(config.source)
    catalogue = engine.catalogue(config.source)
    engine.check_bands(catalogue, config.extract)
    with connect(cluster) as client, scheduler_lost_is_an_error(client):
        link = client.dashboard_link
        log.info("dask dashboard: %s", link, extra={"dashboard": link})
        run_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        report, failed_units = extract_scenes(client, engine, spec, config, catalogue, options, run_id, force)
        results, table, marker_failures = score_partitions(
            client, engine, spec, config, parcels, catalogue, scheme, options, run_id
        )
        failed_units += marker_failures
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        address = client.scheduler.address
    verdicts = verdicts_frame(table, parcels)
    summary = run_summary(
        config, scheme, parcels, catalogue, report, results, verdicts, started, engine.plugins
    )
    summary["cluster"] = {
        "scheduler": address,
        "dashboard": link,
        "workers": workers,
        "run_id": run_id,
        "failed_units": failed_units,
    }
    write_outputs(config.out_dir, verdicts, results, summary)
    series = time_series(Signatures.empty(), catalogue, parcels)  # a country's series stays in the store
    return RunResult(parcels, catalogue, series, results, verdicts, summary)


@contextlib.contextmanager
def connect(cluster: ClusterConfig | Any) -> Iterator[Any]:
    """A Client to the scheduler at an address, to a new local cluster, or the one given."""
    from distributed import Client, LocalCluster

    if not isinstance(cluster, ClusterConfig):
        yield cluster
        return
    if cluster.address:
        try:
            client = Client(cluster.address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise CbmError(f"cannot reach the dask scheduler at {cluster.address}: {exc}") from None
        with client:
            yield client
        return
    with worker_environment():
        local = LocalCluster(
            n_workers=cluster.workers,
            threads_per_worker=cluster.threads_per_worker,
            memory_limit=cluster.memory_limit,
            processes=True,
        )
    with local, Client(local) as client:
        yield client


def worker_environment() -> contextlib.AbstractContextManager:
    """Dask configuration for the worker processes of clusters started here (set before they spawn).

    glibc serves allocations above a moving threshold with fresh mmaps, so every marker batch's
    large arrays fault their pages in again; a fixed 64 MiB threshold reuses heap memory instead:
    marker partitions ran 20 % faster (bench/scale.py, 100k parcels) at the same peak memory.
    """
    import dask

    return dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENVIRON.items()})


@contextlib.contextmanager
def scheduler_lost_is_an_error(client: Any) -> Iterator[None]:
    """Turn the errors a vanished scheduler raises into one CbmError saying to run again.

    Depending on when the scheduler goes, the client cancels the futures (see _unit_error) or a
    call raises CommClosedError, OSError, TimeoutError or CancelledError; such errors seen while
    the client is connected are not the scheduler's and pass unchanged.
    """
    from distributed.comm.core import CommClosedError

    try:
        yield
    except (OSError, TimeoutError, CancelledError, CbmError) as exc:
        if not isinstance(exc, CommClosedError) and client.status == "running":
            raise
        client_log = logging.getLogger("distributed.client")
        level = client_log.level
        client_log.setLevel(logging.CRITICAL)  # its reconnect loop, cut short, logs a stray traceback
        try:
            client.close()
        finally:
            client_log.setLevel(level)
        raise CbmError(SCHEDULER_LOST) from None


def plugin_spec(engine: Engine) -> PluginSpec:
    """The driver's engine class and hand-registered plugins (by importable module name), for the
    workers to build the same engine."""
    extras = []
    for name, info in sorted(engine.plugins.infos.items()):
        if info.origin in ("built-in", "entry point"):
            continue
        if info.module == "__main__":
            raise ConfigError(
                f"plugin '{name}' is defined in __main__, which dask workers cannot import: "
                "move it to a module (or publish it as a `cbm` entry point)"
            )
        extras.append((name, info.module))
    return type(engine), tuple(extras)


# Worker side -------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_ENGINES: dict[PluginSpec, Engine] = {}
_CATALOGUE: dict[str, gpd.GeoDataFrame] = {}  # one entry: the last run configuration's catalogue
_PARCELS: OrderedDict[tuple[str, Box | None], gpd.GeoDataFrame] = OrderedDict()  # LRU by footprint


def worker_engine(spec: PluginSpec) -> Engine:
    """This process's Engine with the driver's plugins, loaded once."""
    with _LOCK:
        if spec not in _ENGINES:
            engine_class, extras = spec
            plugins = load_plugins()
            for name, module in extras:
                if name not in plugins.infos:
                    plugins.register(importlib.import_module(module), name)
            _ENGINES[spec] = engine_class(plugins, progress=False)
        return _ENGINES[spec]


def _source_key(config: RunConfig) -> str:
    """A run configuration's source: its file (path + mtime) and source options."""
    stamp = config.path.stat().st_mtime_ns if config.path.exists() else 0
    return f"{config.path}:{stamp}:{sorted(config.source.options.items())!r}"


def worker_catalogue(engine: Engine, config: RunConfig) -> gpd.GeoDataFrame:
    """The catalogue, read once per worker process and run configuration."""
    key = _source_key(config)
    with _LOCK:
        if key not in _CATALOGUE:
            _CATALOGUE.clear()  # keep one: a worker serving runs one after another stays bounded
            _CATALOGUE[key] = engine.catalogue(config.source)
        return _CATALOGUE[key]


def scene_parcels(engine: Engine, config: RunConfig, bbox: Box | None) -> gpd.GeoDataFrame:
    """The parcels a footprint's bbox (EPSG:4326; None: all) touches, the last PARCEL_CACHE kept."""
    key = (_source_key(config), bbox)
    with _LOCK:
        if key in _PARCELS:
            _PARCELS.move_to_end(key)
            return _PARCELS[key]
        _PARCELS[key] = parcels = engine.parcels(config.source, bbox)
        while len(_PARCELS) > PARCEL_CACHE:
            _PARCELS.popitem(last=False)
        return parcels


def footprint_bbox(scene: gpd.GeoDataFrame) -> Box | None:
    """The EPSG:4326 bounds of a one-scene catalogue's footprint; None when it has none."""
    footprints = (
        scene.geometry if scene.crs is None or scene.crs.to_epsg() == 4326 else scene.to_crs(4326).geometry
    )
    footprint = footprints.iloc[0]
    if footprint is None or footprint.is_empty:
        return None
    return tuple(float(v) for v in footprint.bounds)


def extract_unit(spec: PluginSpec, config: RunConfig, obsid: str) -> dict[str, Any]:
    """Extract one scene and write it to the store; raise UnitFailed so dask retries a failure."""
    engine = worker_engine(spec)
    catalogue = worker_catalogue(engine, config)
    scene = catalogue[catalogue["obsid"] == obsid]
    if scene.empty:
        raise UnitFailed(f"scene {obsid} is not in the catalogue any more")
    parcels = scene_parcels(engine, config, footprint_bbox(scene))
    _, report = engine.extract(parcels, scene, config.extract, config.source, config.store, force=True)
    if obsid in report.failed:
        raise UnitFailed(report.failed[obsid])
    return {"rows": report.rows, "failed_parcels": report.failed_parcels}


def marker_unit(
    spec: PluginSpec,
    store: PluginConfig,
    scheme: Scheme,
    parcels: gpd.GeoDataFrame,
    only: np.ndarray | None,
    scenes: pd.DataFrame,
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Every marker over one partition, its signatures read from the store here on the worker,
    then the rule's verdicts on those results.

    only: the pids to score and judge when the others are context for markers comparing
    neighbours. Results and verdicts come back as tables (built here, in parallel; cheap to send).
    """
    engine = worker_engine(spec)
    stored = engine.read_store(store, pids=parcels["pid"].tolist())
    series = time_series(stored, scenes, parcels)
    results = engine.run_markers(series, scheme, only)
    judged = engine.judge(results, parcels if only is None else parcels[parcels["pid"].isin(only)], scheme)
    by_marker = dict(tuple(results.groupby("marker", sort=False)))
    return {name: by_marker[name].reset_index(drop=True) for name in scheme.marker_names}, judged


# Driver side -------------------------------------------------------------------------------------


class SceneQueue:
    """Scenes this run may extract: all pending ones, or with a claiming store those it wins."""

    def __init__(self, pending: Sequence[str], claim: Callable[..., str | None] | None, store, run_id: str):
        self.pending = deque(pending)
        self.held: list[str] = []  # claimed by another run (or finished by it meanwhile)
        self.claimed: set[str] = set()  # claimed by this run and not stored or given back yet
        self.claim, self.store, self.run_id = claim, store, run_id

    def take(self) -> str | None:
        if self.claim is None:
            return self.pending.popleft() if self.pending else None
        while self.pending:
            chunk = [self.pending[i] for i in range(min(CLAIM_CHUNK, len(self.pending)))]
            won = self.claim(config=self.store, obsids=chunk, worker=self.run_id)
            if won is not None:
                self.pending.remove(won)
                self.claimed.add(won)
                return won
            self.held.extend(self.pending.popleft() for _ in chunk)
        return None

    def recheck(self, stored: set[str]) -> list[str]:
        """Requeue held scenes not stored yet (their claim may have lapsed); return those now stored."""
        done = [o for o in self.held if o in stored]
        self.pending.extend(o for o in self.held if o not in stored)
        self.held = []
        return done


def extract_scenes(
    client: Any,
    engine: Engine,
    spec: PluginSpec,
    config: RunConfig,
    catalogue: gpd.GeoDataFrame,
    options: ClusterConfig,
    run_id: str,
    force: bool,
) -> tuple[ExtractReport, list[dict[str, str]]]:
    """Extract every scene not yet stored, one unit per scene, a bounded number in flight."""
    from distributed import as_completed

    report = ExtractReport()
    cards = jobs_by_card(config.extract)
    wanted = [o for o, c in zip(catalogue["obsid"], catalogue["card"], strict=True) if c in cards]
    stored = set() if force else engine._stored_obsids(config.store)
    report.skipped = [o for o in wanted if o in stored]
    store = config.store
    hooks = engine.plugins.infos[store.plugin].hooks
    can_claim = not force and "cbm_store_claim" in hooks
    claim = engine.plugins.caller(store.plugin, "cbm_store_claim", store.where) if can_claim else None
    queue = SceneQueue([o for o in wanted if o not in stored], claim, store, run_id)
    release = (
        engine.plugins.caller(store.plugin, "cbm_store_release", store.where)
        if can_claim and "cbm_store_release" in hooks
        else None
    )

    def give_back(obsids: Sequence[str], reason: str) -> None:
        """Release claims so a re-run takes these scenes now; if the store is down, they lapse."""
        queue.claimed.difference_update(obsids)
        if release is None or not obsids:
            return
        try:
            release(config=store, obsids=list(obsids), worker=run_id, reason=reason)
        except CbmError as exc:
            log.warning("claims kept until their lease ends (%s)", exc, extra={"run_id": run_id})

    window = 2 * max(1, sum(client.nthreads().values()))
    flying: dict[Any, str] = {}
    finished = as_completed()
    failed_units: list[dict[str, str]] = []
    bar = tqdm(total=len(queue.pending), desc="extract", unit="scene", disable=engine.progress_disabled)

    def fill() -> None:
        while len(flying) < window and (obsid := queue.take()) is not None:
            future = client.submit(
                extract_unit, spec, config, obsid, key=f"extract-{run_id}-{obsid}", retries=options.retries
            )
            flying[future] = obsid
            finished.add(future)

    deadline = None
    try:
        fill()
        with bar:
            while flying or queue.held:
                if not flying:  # all that is left is being extracted by another run
                    deadline = deadline or time.monotonic() + options.claim_wait
                    if time.monotonic() >= deadline:
                        for obsid in queue.held:
                            reason = f"claimed by another run and not stored within {options.claim_wait:g} s"
                            report.failed[obsid] = reason
                            failed_units.append({"unit": f"scene {obsid}", "reason": reason})
                        break
                    time.sleep(min(CLAIM_POLL, options.claim_wait))
                    done = queue.recheck(engine._stored_obsids(store))
                    report.skipped += done
                    bar.update(len(done))
                    fill()
                    continue
                future = next(finished)
                obsid = flying.pop(future)
                if future.status == "finished":
                    out = future.result()
                    queue.claimed.discard(obsid)  # stored by the unit
                    report.extracted.append(obsid)
                    report.rows += out["rows"]
                    report.failed_parcels += out["failed_parcels"]
                else:
                    reason = _unit_error(future)
                    give_back([obsid], reason)
                    report.failed[obsid] = reason
                    failed_units.append({"unit": f"scene {obsid}", "reason": reason})
                future.release()
                bar.update()
                fill()
    except BaseException as exc:  # lost scheduler, Ctrl-C, a bug: free what this run still holds
        why = describe_error(exc) if str(exc) else type(exc).__name__
        give_back(sorted(queue.claimed), f"run {run_id} stopped before storing it ({why})")
        raise
    return report, failed_units


def partition_size(parcels: int, largest: int, threads: int) -> int:
    """Parcels per marker unit: at most `largest` (the memory bound), and small enough that a small
    run still gives every worker thread two units (a 10k-parcel run is not one unit on one worker),
    but not below MIN_PARTITION, where per-unit overheads would dominate."""
    return min(largest, max(MIN_PARTITION, math.ceil(parcels / (2 * threads))))


def partitions(parcels: gpd.GeoDataFrame, scheme: Scheme, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(member positions, core positions) of pid-sorted parcels: contiguous pid ranges, or, when a
    marker compares neighbours (context_distance), compact areas plus their surroundings."""
    distance = max(context_distance(m) for m in scheme.markers)
    if distance > 0:
        return list(context_groups(parcels, size, distance))
    return [(np.arange(s, min(s + size, len(parcels))),) * 2 for s in range(0, len(parcels), size)]


def score_partitions(
    client: Any,
    engine: Engine,
    spec: PluginSpec,
    config: RunConfig,
    parcels: gpd.GeoDataFrame,
    catalogue: gpd.GeoDataFrame,
    scheme: Scheme,
    options: ClusterConfig,
    run_id: str,
) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, str]]]:
    """Score and judge parcel partitions: marker results, the verdict table and the failed units."""
    from distributed import as_completed

    ordered = parcels.sort_values("pid", ignore_index=True)
    threads = max(1, sum(client.nthreads().values()))
    units = partitions(ordered, scheme, partition_size(len(ordered), options.partition_size, threads))
    pids = ordered["pid"].to_numpy()
    scenes = client.scatter(pd.DataFrame(catalogue[SCENE_COLUMNS]), broadcast=True, hash=False)
    parts: dict[int, dict[str, pd.DataFrame]] = {}
    judged: dict[int, pd.DataFrame] = {}
    failed_units: list[dict[str, str]] = []
    window = 2 * threads
    todo = deque(range(len(units)))
    flying: dict[Any, int] = {}
    finished = as_completed()

    def fill() -> None:
        while len(flying) < window and todo:
            index = todo.popleft()
            members, core = units[index]
            only = None if len(members) == len(core) else pids[core]
            future = client.submit(
                marker_unit, spec, config.store, scheme, ordered.iloc[members], only, scenes,
                key=f"markers-{run_id}-{index}", retries=options.retries,
            )  # fmt: skip
            flying[future] = index
            finished.add(future)

    fill()
    with tqdm(total=len(units), desc="markers", unit="partition", disable=engine.progress_disabled) as bar:
        while flying:
            future = next(finished)
            index = flying.pop(future)
            if future.status == "finished":
                parts[index], judged[index] = future.result()
            else:
                core = ordered.iloc[units[index][1]]
                reason = _unit_error(future)
                first, last = core["pid"].iloc[0], core["pid"].iloc[-1]
                failed_units.append({"unit": f"markers pid {first}-{last}", "reason": reason})
                parts[index] = {
                    name: results_frame(
                        MarkerResult(name, int(p), Status.NOT_EXECUTED, reason=reason) for p in core["pid"]
                    )
                    for name in scheme.marker_names
                }
                judged[index] = engine.judge(pd.concat(parts[index].values()), core, scheme)
            future.release()
            bar.update()
            fill()
    frames = [parts[i][name] for name in scheme.marker_names for i in range(len(units))]
    results = pd.concat(frames, ignore_index=True) if frames else results_frame([])
    table = (
        pd.concat([judged[i] for i in range(len(units))], ignore_index=True) if units else verdict_table([])
    )
    return results, table, failed_units


def _unit_error(future: Any) -> str:
    """Why a unit failed after its retries; a lost scheduler stops the run (it can be resumed)."""
    if future.status == "cancelled":
        raise CbmError(SCHEDULER_LOST)
    exc = future.exception()
    if type(exc).__name__ == "KilledWorker":
        return f"the worker running it died on every attempt ({exc})"
    if isinstance(exc, UnitFailed | CbmError):
        return str(exc)
    return describe_error(exc)
