"""Scale-out on dask.distributed: same results as single-process, resumable, fault tolerant.

One LocalCluster (2 worker processes x 1 thread) serves the whole module. The test plugin
"slowzonal" below wraps the zonal extractor to make scenes slow (so a worker or the run can be
killed half-way), fail, or leave a trace of every attempt, and the local source to log every
parcel read; workers import it from this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import shapely
from click.testing import CliRunner
from conftest import DEMO, write_config
from distributed import Client, LocalCluster

from cbm_core import distributed as dist
from cbm_core import impl
from cbm_core.cli import cli
from cbm_core.config import ClusterConfig, PluginConfig, RunConfig, Scheme, load_run_config
from cbm_core.errors import ConfigError, InputError
from cbm_core.model import Signatures
from cbm_core.outputs import read_results
from cbm_core.pipeline import Engine
from cbm_core.plugins import load_plugins
from extractors import zonal
from markers._simulate import simulate
from sources import local

SLOW = """
[[extract]]
card = "s2"
plugin = "slowzonal"
bands = ["B04", "B08", "SCL"]
{options}
"""
S2_SCENES = 12  # Sentinel-2 scenes in the demo catalogue


@impl
def cbm_extractor_extract(scene, parcels, bands, read_window, config):
    """The zonal extractor, slowed down, failing on one scene or killing its worker on one, and
    logging attempts as asked."""
    if config.get("trace"):
        Path(config.get("trace"), f"{scene.obsid}.{uuid.uuid4().hex}").touch()
    time.sleep(float(config.get("sleep", 0)))
    if scene.obsid == config.get("fail"):
        raise InputError(f"{scene.obsid}: band file is corrupt")
    if scene.obsid == config.get("die"):
        os._exit(1)  # the worker process dies (out of memory, a crash in a C library...)
    return zonal.cbm_extractor_extract(
        scene=scene, parcels=parcels, bands=bands, read_window=read_window, config=config
    )


@impl
def cbm_source_parcels(config, bbox=None):
    """The local source's parcels, each read logged (its bbox and the pids returned) when asked."""
    parcels = local.cbm_source_parcels(config=config, bbox=bbox)
    if config.get("trace"):
        read = {"bbox": bbox, "pids": parcels["pid"].tolist()}
        Path(config.get("trace"), f"parcels.{uuid.uuid4().hex}").write_text(json.dumps(read))
    return parcels


@impl
def cbm_source_catalogue(config):
    return local.cbm_source_catalogue(config=config)


@impl
def cbm_source_read_window(config, band, bounds, crs):
    return local.cbm_source_read_window(config=config, band=band, bounds=bounds, crs=crs)


def test_engine() -> Engine:
    """An engine with the built-ins and this module's test extractor (also used by the subprocess)."""
    plugins = load_plugins()
    plugins.register(sys.modules[__name__], "slowzonal")
    return Engine(plugins, progress=False)


test_engine.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GiB", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as connected,
    ):
        yield connected


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """Outputs of a single-process run of the demo (S2 only)."""
    folder = tmp_path_factory.mktemp("reference")
    result = Engine(progress=False).run(load_run_config(write_config(folder)))
    assert result.summary["scenes"]["extracted"] == S2_SCENES
    return outputs(load_run_config(write_config(folder)))


def outputs(config) -> dict[str, pd.DataFrame]:
    """Verdicts, marker results and stored signatures, in a canonical order."""
    engine = Engine(progress=False)
    stats = engine.read_store(config.store).stats
    return {
        "verdicts": pd.read_csv(config.out_dir / "verdicts.csv").sort_values("pid", ignore_index=True),
        "markers": read_results(config.out_dir / "markers.parquet"),
        "stats": stats.sort_values(["pid", "obsid", "band"], ignore_index=True),
    }


def assert_same(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame]) -> None:
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], obj=name)


def stored_obsids(config) -> set[str]:
    return Engine(progress=False)._stored_obsids(config.store)


def stored_scenes(config) -> int:
    return len(stored_obsids(config))


def kill_one_worker(client: Client) -> None:
    pids = client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)


def start_driver(config_path: Path, client: Client) -> subprocess.Popen:
    """`test_engine().run(config)` on the test cluster in another process, to be killed half-way."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from test_distributed import test_engine; from cbm_core.config import *; "
        f"test_engine().run(load_run_config({str(config_path)!r}), "
        f"cluster=ClusterConfig(address={client.scheduler.address!r}))"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])


def kill_driver_half_way(config: RunConfig, client: Client) -> None:
    """Start `cbm run` on the configuration in a subprocess and kill it once two scenes are stored."""
    driver = start_driver(config.path, client)
    try:
        wait_until(lambda: stored_scenes(config) >= 2)
    finally:
        driver.kill()
        driver.wait()
    assert stored_scenes(config) < S2_SCENES, "the run was not interrupted half-way"


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_same_results_as_single_process(client, reference, tmp_path) -> None:
    config = load_run_config(write_config(tmp_path, "[cluster]\npartition_size = 5\n"))
    result = Engine(progress=False).run(config, cluster=client)
    assert result.summary["scenes"]["extracted"] == S2_SCENES
    assert result.summary["cluster"]["workers"] == 2
    assert result.summary["cluster"]["dashboard"].startswith("http")
    assert result.summary["cluster"]["failed_units"] == []
    assert_same(outputs(config), reference)
    again = Engine(progress=False).run(config, cluster=client)  # resumes: nothing left to extract
    assert again.summary["scenes"]["skipped_already_stored"] == S2_SCENES
    assert_same(outputs(config), reference)


def test_cli_runs_on_a_cluster_and_prints_the_dashboard(client, reference, tmp_path) -> None:
    config = write_config(tmp_path)
    out = CliRunner().invoke(cli, ["run", str(config), "--cluster", client.scheduler.address])
    assert out.exit_code == 0, out.output
    assert f"dask dashboard: {client.dashboard_link}" in out.stderr
    assert f"{S2_SCENES} extracted" in out.stdout
    assert_same(outputs(load_run_config(config)), reference)
    both = CliRunner().invoke(cli, ["run", str(config), "--cluster", "tcp://x:1", "--workers", "2"])
    assert both.exit_code == 2 and "either --cluster" in both.output


def test_local_workers_started_for_a_run_give_the_same_results(reference, tmp_path) -> None:
    """`cbm run --workers N`: the engine's own LocalCluster, its workers spawned with the heap setting."""
    config = load_run_config(write_config(tmp_path))
    with dist.connect(ClusterConfig(workers=1, memory_limit="2GiB")) as own:
        Engine(progress=False).run(config, cluster=own)
        environ = own.run(lambda: {k: os.environ.get(k) for k in dist.WORKER_ENVIRON})
    assert_same(outputs(config), reference)
    assert list(environ.values()) == [{k: str(v) for k, v in dist.WORKER_ENVIRON.items()}]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("nodes = 3", "unknown key 'nodes'"),
        ('address = "tcp://x:1"\nworkers = 2', "either address"),
        ("workers = 0", "'workers' must be at least 1"),
        ('retries = "2"', "'retries' has the wrong type"),
    ],
)
def test_bad_cluster_table_is_a_config_error(tmp_path, table, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(write_config(tmp_path, f"[cluster]\n{table}\n"))


def test_killed_worker_mid_run_loses_nothing(client, reference, tmp_path) -> None:
    config = load_run_config(write_config(tmp_path, SLOW.format(options="sleep = 0.4")))
    done: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: done.update(r=test_engine().run(config, cluster=client)))
    runner.start()
    wait_until(lambda: stored_scenes(config) >= 2)
    kill_one_worker(client)
    runner.join(120)
    summary = done["r"].summary
    assert summary["scenes"]["extracted"] == S2_SCENES and not summary["scenes"]["failed"]
    assert_same(outputs(config), reference)
    wait_until(lambda: len(client.scheduler_info()["workers"]) == 2)  # the nanny restarted it


def test_killed_run_resumes_without_gaps_or_duplicates(client, reference, tmp_path) -> None:
    config = load_run_config(write_config(tmp_path, SLOW.format(options="sleep = 0.4")))
    kill_driver_half_way(config, client)
    assert not list((config.store.path("path")).rglob("*.tmp"))
    result = test_engine().run(config, cluster=client)
    assert (
        result.summary["scenes"]["extracted"] + result.summary["scenes"]["skipped_already_stored"]
        == S2_SCENES
    )
    assert_same(outputs(config), reference)


def test_scene_failing_every_retry_is_recorded(client, tmp_path) -> None:
    trace = tmp_path / "attempts"
    trace.mkdir()
    bad = "S2A_MSIL2A_20230402_T31UFS"
    options = f'fail = "{bad}"\ntrace = "{trace}"\n[cluster]\nretries = 1'
    config = load_run_config(write_config(tmp_path, SLOW.format(options=options)))
    result = test_engine().run(config, cluster=client)
    scenes = result.summary["scenes"]
    assert scenes["failed"] == {bad: f"{bad}: band file is corrupt"}
    assert scenes["extracted"] == S2_SCENES - 1
    assert result.summary["cluster"]["failed_units"] == [
        {"unit": f"scene {bad}", "reason": scenes["failed"][bad]}
    ]
    assert len(list(trace.glob(f"{bad}.*"))) == 2  # tried, then retried once
    assert (config.out_dir / "verdicts.csv").is_file()  # the run finished


def test_scene_whose_worker_dies_on_every_attempt_is_recorded(client, tmp_path) -> None:
    """A scene that kills its worker process every time is failed with that reason ("died on
    every attempt"), the other scenes are extracted, and the nanny brings the worker back. The
    scheduler gives up after its first lost worker (allowed-failures 0) to keep the test short.
    Planted bug: the KilledWorker branch of the failure reason removed (the reason became the
    bare exception text)."""
    bad = "S2A_MSIL2A_20230405_T31UFS"
    allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    try:
        options = f'die = "{bad}"\n[cluster]\nretries = 0'
        config = load_run_config(write_config(tmp_path, SLOW.format(options=options)))
        result = test_engine().run(config, cluster=client)
    finally:
        client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", allowed))
    scenes = result.summary["scenes"]
    assert scenes["failed"][bad].startswith("the worker running it died on every attempt")
    # A scene waiting on the same worker when it died may fail with it (dask counts it as suspect)
    assert all(why.startswith("the worker running it died") for why in scenes["failed"].values())
    assert scenes["extracted"] + len(scenes["failed"]) == S2_SCENES and bad not in stored_obsids(config)
    assert (config.out_dir / "verdicts.csv").is_file()  # the run finished
    wait_until(lambda: len(client.scheduler_info()["workers"]) == 2)


def test_marker_partition_failure_is_recorded(client, tmp_path) -> None:
    config = load_run_config(write_config(tmp_path, "[cluster]\nretries = 0\npartition_size = 10\n"))
    engine = Engine(progress=False)
    broken = replace(config, store=PluginConfig("nosuchstore", {}, config.base_dir, "[store]"))
    results, verdicts, failed = dist.score_partitions(
        client, engine, dist.plugin_spec(engine), broken, engine.parcels(config.source),
        engine.catalogue(config.source), engine.scheme("ndvi-drop", config.base_dir), config.cluster, "t",
    )  # fmt: skip
    assert sorted(f["unit"] for f in failed) == ["markers pid 1-10", "markers pid 11-18"]
    assert "no plugin named 'nosuchstore'" in failed[0]["reason"]
    assert list(results["pid"]) == list(range(1, 19))
    assert set(results["status"]) == {"NOT_EXECUTED"}
    assert set(results["reason"]) == {f["reason"] for f in failed}
    assert list(verdicts["pid"]) == list(range(1, 19)) and set(verdicts["light"]) == {"yellow"}
    assert all("nosuchstore" in reasons for reasons in verdicts["reasons"])  # the failure, named per parcel


@pytest.mark.parametrize(
    ("parcels", "threads", "size"),
    [(1_000_000, 2, 20_000), (10_000, 2, 2_500), (10_000, 8, 1_000), (50, 2, 1_000)],
)
def test_small_runs_still_spread_over_every_worker(parcels, threads, size) -> None:
    assert dist.partition_size(parcels, 20_000, threads) == size


def test_peers_partitions_keep_neighbours_together(client, tmp_path) -> None:
    """Partitions smaller than the area: peers on the cluster (signatures from a Parquet store)
    equals one call over all parcels, and so do the verdicts."""
    series = simulate(600, seed=33, swap_rate=0.08).series
    store = PluginConfig("parquet", {"path": str(tmp_path / "store")}, tmp_path, "[store]")
    engine = Engine(progress=False)
    scenes = series.stats[["obsid", "obstime", "card", "orbit"]].drop_duplicates("obsid")
    signatures = Signatures(
        series.stats.drop(columns=["obstime", "card", "orbit"]), series.scl.drop(columns="obstime")
    )
    engine.plugins.caller("parquet", "cbm_store_write", "[store]")(
        config=store, signatures=signatures, obsids=scenes["obsid"].tolist()
    )
    marker = PluginConfig("peers", {"plugin": "peers", "context_distance": 2000.0}, tmp_path, "[[marker]]")
    scheme = Scheme((marker,), PluginConfig("traffic_light"))
    config = replace(load_run_config(write_config(tmp_path, "")), store=store)
    options = ClusterConfig(partition_size=100)  # 600 parcels on a 25 x 24 grid of 300 m: 6 areas
    results, verdicts, failed = dist.score_partitions(
        client, engine, dist.plugin_spec(engine), config, series.parcels, scenes, scheme, options, "peers"
    )
    assert not failed and len(dist.partitions(series.parcels, scheme, 100)) == 6
    whole = engine.run_markers(series, scheme).set_index("pid").sort_index()
    pd.testing.assert_frame_equal(results.set_index("pid").sort_index(), whole)
    want = engine.judge(whole.reset_index(), series.parcels, scheme).set_index("pid").sort_index()
    pd.testing.assert_frame_equal(verdicts.set_index("pid").sort_index(), want)


@pytest.fixture
def tiny_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a worker may still hold a handle


def test_disk_full_store_fails_scenes_cleanly(client, tmp_path, tiny_disk) -> None:
    config = load_run_config(write_config(tmp_path, f'[store]\npath = "{tiny_disk}"\n'))
    result = Engine(progress=False).run(config, cluster=client)
    failed = result.summary["scenes"]["failed"]
    assert failed and all("No space left on device" in r for r in failed.values())
    assert result.summary["scenes"]["extracted"] + len(failed) == S2_SCENES
    left = [f for f in tiny_disk.rglob("*") if f.is_file() and f.suffix != ".parquet"]
    assert [f.name for f in left] == [".cbm-run.lock"]  # no temporary left; the run lock stays
    stats = Engine(progress=False).read_store(config.store).stats  # every file left is whole
    assert set(stats["obsid"]) == stored_obsids(config) and not set(failed) & stored_obsids(config)


# PostGIS: one catalogue shared by several runs -------------------------------------------------


@pytest.fixture(scope="module")
def postgres():
    from servers import PostgresCluster, started

    server = started(lambda: PostgresCluster().start())
    yield server
    server.stop()


def postgis_config(
    tmp_path: Path,
    postgres,
    options: str = "",
    lease: float = 3600,
    schema: str | None = None,
    more: str = "",
):
    """A demo run storing signatures in a PostGIS schema (a fresh one unless given)."""
    from sources.postgis import init_database

    schema = schema or f"t{uuid.uuid4().hex[:8]}"
    store = f'[store]\nplugin = "postgis"\ndsn = "{postgres.dsn}"\nschema = "{schema}"\n'
    store += f"lease_seconds = {lease}\n{more}"
    config = load_run_config(write_config(tmp_path, SLOW.format(options=options) + store))
    init_database(config.store)
    return config


def test_postgis_runs_sharing_a_catalogue_never_extract_a_scene_twice(
    client, reference, postgres, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(dist, "CLAIM_POLL", 0.2)
    trace = tmp_path / "attempts"
    trace.mkdir()
    first = postgis_config(tmp_path, postgres, f'sleep = 0.3\ntrace = "{trace}"')
    second = replace(first, out_dir=tmp_path / "b" / "out")  # same store, another run
    results: dict[str, Any] = {}
    runs = [
        threading.Thread(target=lambda c=c: results.update({c.out_dir: test_engine().run(c, cluster=client)}))
        for c in (first, second)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(120)
    attempts = sorted(f.name.split(".")[0] for f in trace.iterdir())
    assert attempts == sorted(set(attempts)) and len(attempts) == S2_SCENES  # each scene exactly once
    extracted = [r.summary["scenes"]["extracted"] for r in results.values()]
    assert sum(extracted) == S2_SCENES and all(extracted), extracted  # both runs did a share
    for config in (first, second):
        assert_same(outputs(config), reference)


def test_postgis_killed_run_resumes_after_its_claims_lapse(
    client, reference, postgres, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(dist, "CLAIM_POLL", 0.2)
    config = postgis_config(tmp_path, postgres, "sleep = 0.4", lease=2)
    kill_driver_half_way(config, client)
    result = test_engine().run(config, cluster=client)
    scenes = result.summary["scenes"]
    assert not scenes["failed"] and scenes["extracted"] + scenes["skipped_already_stored"] == S2_SCENES
    assert_same(outputs(config), reference)


def test_postgis_failing_scene_is_released_for_the_next_run(client, reference, postgres, tmp_path) -> None:
    bad = "S2A_MSIL2A_20230402_T31UFS"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = postgis_config(tmp_path / "a", postgres, f'fail = "{bad}"\n[cluster]\nretries = 0')
    assert test_engine().run(first, cluster=client).summary["scenes"]["failed"] == {
        bad: f"{bad}: band file is corrupt"
    }
    # Unreleased, the scene would stay leased for an hour and this run would give up after 5 s.
    schema = first.store.get("schema")
    second = postgis_config(tmp_path / "b", postgres, schema=schema, more="[cluster]\nclaim_wait = 5\n")
    scenes = test_engine().run(second, cluster=client).summary["scenes"]
    assert scenes["failed"] == {} and scenes["extracted"] == 1
    assert_same(outputs(second), reference)


def jobs(config) -> list[tuple[str, str | None]]:
    """(status, reason) of every scene job of a PostGIS store."""
    import psycopg

    with psycopg.connect(config.store.get("dsn")) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT status, reason FROM "{config.store.get("schema")}".cbm_scene_jobs')
        rows = cur.fetchall()
    return rows


def test_postgis_interrupted_run_releases_its_claims(client, reference, postgres, tmp_path) -> None:
    config = postgis_config(tmp_path, postgres, "sleep = 0.4")  # a one-hour lease
    driver = start_driver(config.path, client)
    try:
        wait_until(lambda: stored_scenes(config) >= 2)
        driver.send_signal(signal.SIGINT)  # Ctrl-C
        driver.wait(60)
    finally:
        driver.kill()
        driver.wait()
    assert stored_scenes(config) < S2_SCENES, "the run was not interrupted half-way"
    statuses = jobs(config)
    released = [reason for status, reason in statuses if status == "failed"]
    assert "inprogress" not in {status for status, _ in statuses} and released
    assert all(re.fullmatch(r"run \S+ stopped before storing it \(KeyboardInterrupt\)", r) for r in released)
    rerun = replace(config, cluster=replace(config.cluster, claim_wait=5))  # no lease to wait for
    scenes = test_engine().run(rerun, cluster=client).summary["scenes"]
    assert not scenes["failed"] and scenes["extracted"] + scenes["skipped_already_stored"] == S2_SCENES
    assert_same(outputs(config), reference)


# A real scheduler restarted mid-run ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """A dask CLI process in its own process group (a worker's nanny has children), logging to a file."""
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}  # slowzonal
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], env=env, stdout=out, stderr=out, start_new_session=True
        )


def start_cluster(port: int, log: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """A scheduler on port and one single-threaded worker, once the worker has joined."""
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start(
        ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], log
    )
    worker = start(
        [
            "distributed.cli.dask_worker",
            address,
            "--nthreads",
            "1",
            "--no-dashboard",
            "--memory-limit",
            "2GiB",
        ],
        log,
    )
    with Client(address, timeout="30s") as probe:
        probe.wait_for_workers(1, timeout=60)
    return scheduler, worker


def stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def cli_driver(config: Path, address: str) -> subprocess.Popen:
    """`cbm run CONFIG --cluster ADDRESS` with this module's test plugins loaded."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import cbm_core.cli as c; from test_distributed import test_engine; "
        "c._MANAGER = test_engine().plugins; "
        f"c.cli(['run', {str(config)!r}, '--cluster', {address!r}, '--quiet'], prog_name='cbm')"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], stderr=subprocess.PIPE, text=True
    )


def test_scheduler_restarted_mid_run_then_rerun_matches_single_process(reference, tmp_path) -> None:
    config_path = write_config(tmp_path, SLOW.format(options="sleep = 0.4"))
    config = load_run_config(config_path)
    port, log = free_port(), tmp_path / "dask.log"
    address = f"tcp://127.0.0.1:{port}"
    processes: list[subprocess.Popen] = []
    try:
        processes += start_cluster(port, log)
        driver = cli_driver(config_path, address)
        processes.append(driver)
        wait_until(lambda: stored_scenes(config) >= 2)
        stop(processes[0])  # the scheduler dies half-way
        _, err = driver.communicate(timeout=120)
        assert driver.returncode == 1 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert errors == [f"Error: {dist.SCHEDULER_LOST}"], err
        assert stored_scenes(config) < S2_SCENES, "the run was not interrupted half-way"
        for process in processes[:2]:  # the old worker goes too: a fresh cluster on the same port
            stop(process)
        processes += start_cluster(port, log)
        again = cli_driver(config_path, address)
        processes.append(again)
        _, err = again.communicate(timeout=180)
        assert again.returncode == 0, err
        summary = json.loads((config.out_dir / "summary.json").read_text())
        assert summary["scenes"]["extracted"] + summary["scenes"]["skipped_already_stored"] == S2_SCENES
        assert_same(outputs(config), reference)
    finally:
        for process in processes:
            stop(process)


# Bounded memory: an extraction unit reads only the parcels of its scene's footprint -------------


def half_footprint_catalogue(tmp_path: Path) -> tuple[Path, shapely.Geometry]:
    """The demo catalogue with every scene's footprint cut to the western half of the parcels."""
    parcels = local.read_parcel_file(DEMO / "parcels.gpkg").to_crs("EPSG:4326")
    minx, miny, maxx, maxy = parcels.total_bounds
    west = shapely.box(minx - 1e-4, miny - 1e-4, (minx + maxx) / 2, maxy + 1e-4)
    rows = pd.read_csv(DEMO / "scenes.csv", dtype=str, keep_default_na=False)
    rows["path"] = [str(DEMO / p) for p in rows["path"]]
    rows["footprint"] = west.wkt
    rows.to_csv(tmp_path / "scenes.csv", index=False)
    return tmp_path / "scenes.csv", west


def test_extraction_unit_reads_only_the_parcels_of_its_footprint(client, tmp_path) -> None:
    scenes, west = half_footprint_catalogue(tmp_path)
    trace = tmp_path / "reads"
    trace.mkdir()
    source = f'[source]\nplugin = "slowzonal"\nparcels = "{DEMO / "parcels.gpkg"}"\nscenes = "{scenes}"\n'
    config = load_run_config(write_config(tmp_path, f'{source}trace = "{trace}"\n'))
    result = test_engine().run(config, cluster=client)
    assert result.summary["scenes"]["extracted"] == S2_SCENES
    everything = local.read_parcel_file(DEMO / "parcels.gpkg").to_crs("EPSG:4326")
    inside = set(everything["pid"][everything.intersects(west)])
    reads = [json.loads(f.read_text()) for f in trace.iterdir()]
    unit_reads = [r for r in reads if r["bbox"] is not None]  # the driver reads all (bbox None)
    assert 1 <= len(unit_reads) <= 2, reads  # once per worker process: the footprint is cached
    for read in unit_reads:
        assert read["bbox"] == pytest.approx(west.bounds)
        assert inside <= set(read["pids"]) < set(everything["pid"])
    alone = replace(
        config, out_dir=tmp_path / "alone", store=replace(config.store, options={"path": "alone"})
    )
    test_engine().run(alone)  # single-process: reads all parcels
    pd.testing.assert_frame_equal(outputs(config)["stats"], outputs(alone)["stats"])
    assert set(outputs(config)["stats"]["pid"]) == inside


def test_postgis_source_reads_only_the_parcels_a_bbox_touches(postgres, tmp_path) -> None:
    from sources import postgis as pg

    config = postgis_config(tmp_path, postgres)
    parcels = local.read_parcel_file(DEMO / "parcels.gpkg")
    pg.import_parcels(config.store, parcels)
    _, west = half_footprint_catalogue(tmp_path)
    wgs84 = parcels.to_crs("EPSG:4326")
    inside = set(wgs84["pid"][wgs84.intersects(west)])
    got = pg.cbm_source_parcels(config.store, bbox=west.bounds)
    assert inside <= set(got["pid"]) < set(parcels["pid"])
    assert got.crs == parcels.crs and got["pid"].is_monotonic_increasing
    assert len(pg.cbm_source_parcels(config.store)) == len(parcels)
