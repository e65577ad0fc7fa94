"""PostGIS source and store against a real throwaway PostgreSQL + PostGIS cluster."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest
from click.testing import CliRunner
from conftest import DEMO
from servers import band_rows

import sources.postgis as pg
from cbm_core.cli import CbmGroup
from cbm_core.config import PluginConfig
from cbm_core.model import HIST_COLUMNS, STATS, Signatures
from cbm_core.plugins import load_plugins

pytestmark = pytest.mark.servers


def config(postgres, **options) -> PluginConfig:
    """A fresh dataset (its own signature tables) in the shared cluster."""
    name = uuid.uuid4().hex[:8]
    base = {"dsn": postgres.dsn, "signatures_table": f"sig_{name}", "hists_table": f"hist_{name}",
            "parcels_table": f"parcels_{name}"}  # fmt: skip
    return PluginConfig("postgis", base | options, Path("."), "[store]")


def fake_signatures(obsids: list[str], pids: range, bands=("B04", "B08"), seed: int = 0) -> Signatures:
    rng = np.random.default_rng(seed)
    index = pd.MultiIndex.from_product([pids, obsids, bands], names=["pid", "obsid", "band"]).to_frame(
        index=False
    )
    for name in STATS:
        index[name] = rng.integers(0, 500, len(index)) if name == "count" else rng.random(len(index))
    index.loc[index.index % 7 == 0, "mean"] = np.nan  # empty parcels have NaN statistics
    scl = pd.MultiIndex.from_product([pids, obsids], names=["pid", "obsid"]).to_frame(index=False)
    for name in HIST_COLUMNS:
        scl[name] = rng.integers(0, 3, len(scl))
    return Signatures(index, scl)


def sorted_frame(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values(keys, ignore_index=True)


def test_migrations_are_shipped_idempotent_and_keyed(postgres):
    cfg = config(postgres)
    shipped = ["001_catalogue.sql", "002_signatures.sql", "003_job_reason.sql"]
    assert [name for name, _ in pg.migrations()] == shipped
    assert pg.init_database(cfg) == shipped
    assert pg.init_database(cfg) == []
    with psycopg.connect(postgres.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i"
            " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (cfg.get("signatures_table"),),
        )
        assert cur.fetchone()[0] == ["pid", "obsid", "band"]
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'dias_catalogue'")
        columns = {r[0] for r in cur.fetchall()}
    assert {"id", "obstime", "reference", "sensor", "card", "status", "footprint"} <= columns


def test_db_commands_import_parcels_and_catalogue(postgres, tmp_path):
    cfg = config(postgres, id_column="ogc_fid", crop_name_column="cropname")
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(
        f'[source]\nplugin = "local"\nparcels = "{DEMO / "parcels.gpkg"}"\nscenes = "{DEMO / "scenes.csv"}"\n'
        "[store]\n"
        + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in {**cfg.options, "plugin": "postgis"}.items())
    )
    group = CbmGroup("cbm")
    manager = load_plugins(entry_points=False)
    manager.hook.cbm_cli_commands(cli=group)
    runner = CliRunner()
    for args in (
        ["db", "init"],
        ["db", "import-parcels", str(DEMO / "parcels.gpkg")],
        ["db", "import-catalogue"],
    ):
        result = runner.invoke(group, [*args, "--config", str(run_toml)])
        assert result.exit_code == 0, result.output
    local = PluginConfig("local", {"parcels": str(DEMO / "parcels.gpkg"), "scenes": str(DEMO / "scenes.csv")})
    expected = manager.caller("local", "cbm_source_parcels", "test")(config=local)
    parcels = pg.cbm_source_parcels(cfg)
    assert parcels["pid"].tolist() == expected["pid"].tolist()
    assert parcels.crs == expected.crs
    assert parcels.geometry.geom_equals_exact(expected.geometry, 0).all()
    reference = manager.caller("local", "cbm_source_catalogue", "test")(config=local)
    catalogue = pg.cbm_source_catalogue(cfg)  # shared by every dataset: other tests add scenes too
    catalogue = catalogue[catalogue["obsid"].isin(reference["obsid"])].reset_index(drop=True)
    assert catalogue["obsid"].tolist() == reference["obsid"].tolist()
    assert catalogue["obstime"].tolist() == reference["obstime"].tolist()
    assert catalogue["card"].tolist() == reference["card"].tolist()
    pd.testing.assert_frame_equal(band_rows(catalogue), band_rows(reference))
    bad = runner.invoke(
        group, ["db", "import-parcels", str(tmp_path / "missing.gpkg"), "--config", str(run_toml)]
    )
    assert bad.exit_code != 0 and "missing.gpkg" in bad.output


def test_store_round_trip_replaces_scenes_exactly(postgres):
    cfg = config(postgres)
    pg.init_database(cfg)
    obsids = [f"S2A_MSIL2A_2023040{i}_T31UFS" for i in range(1, 5)]
    first = fake_signatures(obsids, range(1, 51))
    assert pg.cbm_store_write(cfg, first, obsids) == len(first.stats) + len(first.scl)
    second = fake_signatures(obsids[:2], range(1, 51), seed=1)
    pg.cbm_store_write(cfg, second, obsids[:2])  # a re-run of two scenes replaces their rows
    back = pg.cbm_store_read(cfg, None, None, None)
    expected = pd.concat([second.stats, first.stats[first.stats["obsid"].isin(obsids[2:])]])
    pd.testing.assert_frame_equal(
        sorted_frame(back.stats, ["pid", "obsid", "band"]),
        sorted_frame(expected, ["pid", "obsid", "band"]).astype(back.stats.dtypes.to_dict()),
    )
    assert len(back.scl) == len(first.scl)
    assert pg.cbm_store_obsids(cfg) == set(obsids)
    some = pg.cbm_store_read(cfg, [3, 4], [obsids[3]], ["B08"])
    assert sorted(some.stats["pid"]) == [3, 4] and set(some.stats["band"]) == {"B08"}
    assert set(some.scl["obsid"]) == {obsids[3]}


def test_large_reads_stream_through_a_server_side_cursor(postgres, monkeypatch):
    cfg = config(postgres)
    pg.init_database(cfg)
    signatures = fake_signatures([f"S1A_IW_GRDH_202304{d:02d}" for d in range(1, 11)], range(1, 301))
    pg.cbm_store_write(cfg, signatures, sorted(set(signatures.stats["obsid"])))
    chunks = []
    original = pg._stream

    def counting(*args):
        for chunk in original(*args):
            chunks.append(len(chunk))
            yield chunk

    monkeypatch.setattr(pg, "FETCH_ROWS", 1000)
    monkeypatch.setattr(pg, "_stream", counting)
    back = pg.cbm_store_read(cfg, None, None, None)
    assert len(back.stats) == len(signatures.stats) == 6000
    assert max(chunks) <= 1000 and sum(chunks) == 6000 + 3000  # stats and histograms, 1000 rows at a time


def test_claims_never_give_one_scene_to_two_workers(postgres):
    cfg = config(postgres, lease_seconds=3600)
    pg.init_database(cfg)
    obsids = [f"S2B_MSIL2A_202305{d:02d}_T31UFS" for d in range(1, 31)]
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (obsid := pg.cbm_store_claim(cfg, obsids, name)) is not None:
            with lock:
                claimed.append((obsid, name))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o for o, _ in claimed) == sorted(obsids)
    assert len({w for _, w in claimed}) > 1  # the work was really shared
    stored = fake_signatures(obsids[:1], range(1, 3))
    pg.cbm_store_write(cfg, stored, obsids[:1])
    assert (
        pg.cbm_store_claim(PluginConfig("postgis", {**cfg.options, "lease_seconds": 0}), obsids[:1], "late")
        is None
    )
    expired = PluginConfig("postgis", {**cfg.options, "lease_seconds": 0})
    assert (
        pg.cbm_store_claim(expired, obsids[1:2], "rescuer") == obsids[1]
    )  # a dead worker's scene is taken over


def test_released_claims_are_claimable_at_once_and_only_the_holders_are_touched(postgres):
    cfg = config(postgres, lease_seconds=3600)
    pg.init_database(cfg)
    mine, theirs, stored = (f"S2A_MSIL2A_202309{d:02d}_T31UFS" for d in (1, 2, 3))
    for obsid, worker in ((mine, "run-a"), (theirs, "run-b"), (stored, "run-a")):
        assert pg.cbm_store_claim(cfg, [obsid], worker) == obsid
    pg.cbm_store_write(cfg, fake_signatures([stored], range(1, 3)), [stored])
    assert pg.cbm_store_release(cfg, [mine, theirs, stored], "run-a", "band file is corrupt") == 1

    def job(obsid: str) -> tuple[str, str, str | None]:
        with psycopg.connect(postgres.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT j.status, j.worker, j.reason FROM cbm_scene_jobs j"
                " JOIN dias_catalogue c ON c.id = j.catalogue_id WHERE j.dataset = %s AND c.reference = %s",
                (f"public.{cfg.get('signatures_table')}", obsid),
            )
            row = cur.fetchone()
        return row

    assert job(mine) == ("failed", "run-a", "band file is corrupt")
    assert job(theirs)[:2] == ("inprogress", "run-b")  # another run's claim is left alone
    assert job(stored)[0] == "extracted"
    assert pg.cbm_store_obsids(cfg) == {stored}  # a failed scene is not stored
    assert pg.cbm_store_claim(cfg, [theirs], "run-c") is None  # still leased
    assert pg.cbm_store_claim(cfg, [mine, theirs], "run-c") == mine  # no lease to wait for
    assert job(mine) == ("inprogress", "run-c", None)


def test_database_restart_mid_run_loses_and_duplicates_nothing(postgres):
    """A crash of the database while scenes are being written: the writer reconnects, and every
    scene comes back complete and exactly as written. The restart must come mid-load (asserted:
    the writer is still running once the restart is over, with scenes stored before it and scenes
    left after it). Planted bug: the reconnect loop of `transaction` removed (the writer failed)."""
    cfg = config(postgres)
    pg.init_database(cfg)
    obsids = [f"S2A_MSIL2A_2023{m:02d}{d:02d}_T31UFS" for m in (6, 7) for d in range(1, 21)]
    errors: list[Exception] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for obsid in obsids:
                pg.cbm_store_write(cfg, fake_signatures([obsid], range(1, 201)), [obsid])
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set() and len(pg.cbm_store_obsids(cfg)) < 5:
        time.sleep(0.01)
    before = len(pg.cbm_store_obsids(cfg))
    postgres.restart(mode="immediate")  # a crash: every connection dies mid-transaction
    writing_across_the_restart = thread.is_alive()
    thread.join(timeout=120)
    assert not errors, errors
    assert writing_across_the_restart and 5 <= before < len(obsids), "the restart did not come mid-load"
    back = pg.cbm_store_read(cfg, None, None, None)
    want = Signatures.concat(fake_signatures([obsid], range(1, 201)) for obsid in obsids)
    keys = ["pid", "obsid", "band"]
    assert back.stats.groupby("obsid").size().to_dict() == dict.fromkeys(obsids, 200 * 2)
    pd.testing.assert_frame_equal(
        sorted_frame(back.stats, keys), sorted_frame(want.stats, keys).astype(back.stats.dtypes.to_dict())
    )
    pd.testing.assert_frame_equal(
        sorted_frame(back.scl, ["pid", "obsid"]),
        sorted_frame(want.scl, ["pid", "obsid"]).astype(back.scl.dtypes.to_dict()),
    )
    assert pg.cbm_store_obsids(cfg) == set(obsids)


def test_identifiers_from_configuration_cannot_inject_sql(postgres):
    hostile = 'sig"; DROP TABLE dias_catalogue; --'
    cfg = config(postgres, signatures_table=hostile, hists_table="h'; DELETE FROM pg_class; --")
    pg.init_database(cfg)
    pg.cbm_store_write(cfg, fake_signatures(["S2A_X_20230101"], range(1, 3)), ["S2A_X_20230101"])
    assert len(pg.cbm_store_read(cfg, [1], None, None).stats) == 2
    with psycopg.connect(postgres.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT relname FROM pg_class WHERE relname IN ('dias_catalogue', %s)", (hostile,))
        assert sorted(r[0] for r in cur.fetchall()) == sorted(["dias_catalogue", hostile])


def test_unreachable_database_is_a_clear_error():
    dsn = "host=127.0.0.1 port=1 dbname=x user=u password=hunter2 connect_timeout=1"
    cfg = PluginConfig("postgis", {"dsn": dsn, "reconnect_seconds": 1})
    with pytest.raises(pg.CbmError) as info:
        pg.cbm_store_obsids(cfg)
    assert "127.0.0.1" in str(info.value) and "hunter2" not in str(info.value)
    assert "refused" in str(info.value)  # the server's own answer, not just "the pool timed out"


def own_pool(postgres, **options) -> PluginConfig:
    """A configuration with a pool of its own (pools are per process and connection string)."""
    dsn = f"{postgres.dsn} application_name=cbm-{uuid.uuid4().hex[:8]}"
    return PluginConfig("postgis", {**config(postgres).options, "dsn": dsn, **options}, Path("."), "[store]")


def backend_pid(cfg: PluginConfig) -> int:
    return pg._fetch(cfg, pg.sql.SQL("SELECT pg_backend_pid()"), None)[0][0]


def test_a_connection_the_server_dropped_is_replaced_before_use(postgres, monkeypatch):
    """An idle pooled connection killed by the server (restart, idle timeout of a firewall or
    pgbouncer) is found by the pool's check and replaced: the next transaction neither fails nor
    waits for a retry."""
    cfg = own_pool(postgres, pool_size=1, pool_check_idle=0.2)
    first = backend_pid(cfg)
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
    time.sleep(0.3)  # idle for longer than pool_check_idle
    sleeps: list[float] = []
    monkeypatch.setattr(pg.time, "sleep", sleeps.append)
    assert backend_pid(cfg) != first
    assert sleeps == []  # no retry was needed
    stats = pg.pool_stats(cfg)
    assert stats["pool_max"] == 1 and stats["requests_num"] >= 2


def test_pooled_connections_are_recycled_after_their_lifetime(postgres):
    cfg = own_pool(postgres, pool_size=1, pool_min_size=1, pool_max_lifetime=1)
    first = backend_pid(cfg)
    time.sleep(1.2)
    backend_pid(cfg)  # the expired connection is closed when it comes back to the pool
    assert backend_pid(cfg) != first


def test_retries_back_off_with_jitter():
    """Workers a failover disconnected together must not all reconnect at the same instant."""
    for attempt in range(8):
        ceiling = min(pg.FIRST_RETRY_S * 2**attempt, pg.LONGEST_RETRY_S)
        delays = [pg.retry_delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 40


def test_bulk_load_from_a_parquet_store_rebuilds_the_keys(postgres, tmp_path):
    parquet = PluginConfig("parquet", {"path": str(tmp_path / "signatures")})
    manager = load_plugins(entry_points=False)
    obsids = [f"S2A_MSIL2A_202308{d:02d}_T31UFS" for d in range(1, 6)]
    written = fake_signatures(obsids, range(1, 101))
    manager.caller("parquet", "cbm_store_write", "t")(config=parquet, signatures=written, obsids=obsids)
    cfg = config(postgres)
    pg.init_database(cfg)
    pg.cbm_store_write(cfg, fake_signatures(obsids[:1], range(1, 101), seed=9), obsids[:1])  # replaced below
    (tmp_path / "from.toml").write_text(f'[store]\nplugin = "parquet"\npath = "{tmp_path / "signatures"}"\n')
    target = tmp_path / "target.toml"
    target.write_text(
        "[store]\n" + "".join(f'{k} = "{v}"\n' for k, v in {**cfg.options, "plugin": "postgis"}.items())
    )
    group = CbmGroup("cbm")
    manager.hook.cbm_cli_commands(cli=group)
    result = CliRunner().invoke(
        group, ["db", "load-signatures", "--config", str(target), "--from", str(tmp_path / "from.toml")]
    )
    assert result.exit_code == 0, result.output
    back = pg.cbm_store_read(cfg, None, None, None)
    pd.testing.assert_frame_equal(
        sorted_frame(back.stats, ["pid", "obsid", "band"]),
        sorted_frame(written.stats, ["pid", "obsid", "band"]).astype(back.stats.dtypes.to_dict()),
    )
    with psycopg.connect(postgres.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s ORDER BY 1", (cfg.get("signatures_table"),)
        )
        definitions = [r[0] for r in cur.fetchall()]
    assert len(definitions) == 2 and any("(pid, obsid, band)" in d for d in definitions)


def test_cluster_puts_each_parcels_rows_together_and_keeps_them(postgres, tmp_path):
    cfg = config(postgres)
    pg.init_database(cfg)
    obsids = [f"S2B_MSIL2A_202309{d:02d}_T31UFS" for d in range(1, 7)]
    written = fake_signatures(obsids, range(1, 201))
    for obsid in obsids:  # scene by scene, as extraction writes: a parcel's rows end up far apart
        pg.cbm_store_write(
            cfg, Signatures(*(f[f["obsid"] == obsid] for f in (written.stats, written.scl))), [obsid]
        )
    before = pg.cbm_store_read(cfg, [17], None, None)

    def physical_pids(table: str) -> list[int]:
        with psycopg.connect(postgres.dsn) as conn, conn.cursor() as cur:
            cur.execute(pg.sql.SQL("SELECT pid FROM {} ORDER BY ctid").format(pg.sql.Identifier(table)))
            pids = [r[0] for r in cur.fetchall()]
        return pids

    assert physical_pids(cfg.get("signatures_table")) != sorted(physical_pids(cfg.get("signatures_table")))
    target = tmp_path / "store.toml"
    target.write_text(
        "[store]\n" + "".join(f'{k} = "{v}"\n' for k, v in {**cfg.options, "plugin": "postgis"}.items())
    )
    group = CbmGroup("cbm")
    load_plugins(entry_points=False).hook.cbm_cli_commands(cli=group)
    result = CliRunner().invoke(group, ["db", "cluster", "--config", str(target)])
    assert result.exit_code == 0, result.output
    assert cfg.get("signatures_table") in result.output and cfg.get("hists_table") in result.output
    for table in (cfg.get("signatures_table"), cfg.get("hists_table")):
        pids = physical_pids(table)
        assert pids == sorted(pids) and len(pids) > 0
    after = pg.cbm_store_read(cfg, [17], None, None)
    keys = ["pid", "obsid", "band"]
    pd.testing.assert_frame_equal(sorted_frame(after.stats, keys), sorted_frame(before.stats, keys))
    pd.testing.assert_frame_equal(sorted_frame(after.scl, ["obsid"]), sorted_frame(before.scl, ["obsid"]))
    assert len(pg.cbm_store_read(cfg, None, None, None).stats) == len(written.stats)
