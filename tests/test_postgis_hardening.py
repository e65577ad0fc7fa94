"""Issue 15 on PostGIS: concurrent writers of one scene, misconfigured stores, a database that is down."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from conftest import DEMO
from test_postgis import config, fake_signatures

import sources.postgis as pg
from cbm_core.errors import CbmError, InputError

pytestmark = pytest.mark.servers
CBM = str(Path(sys.executable).with_name("cbm"))


def own_pool(postgres, **options):
    """A dataset with a connection pool of its own (pools are per process and connection string)."""
    cfg = config(postgres, **options)
    dsn = f"{postgres.dsn} application_name=cbm-{uuid.uuid4().hex[:8]}"
    return pg.PluginConfig("postgis", {**cfg.options, "dsn": dsn}, Path("."), "[store]")


def test_two_writers_of_the_same_scenes_take_turns_and_keep_one_copy(postgres):
    """Two runs extracting the same scenes into one store at the same moment: neither dies on the
    primary key, and each scene ends with exactly one complete copy. Planted bug: the per-scene
    lock removed (the second commit raised UniqueViolation, as in 5 of 10 probe pairs)."""
    first = own_pool(postgres)
    second = pg.PluginConfig(
        "postgis", {**first.options, "dsn": f"{postgres.dsn} application_name=cbm-b"}, Path("."), "[store]"
    )
    pg.init_database(first)
    obsids = [f"S2A_MSIL2A_202306{d:02d}_T31UFS" for d in range(1, 9)]
    for obsid in obsids:  # the scenes are known (as after `cbm db import-catalogue`) and stored once
        pg.cbm_store_write(first, fake_signatures([obsid], range(1, 301), seed=0), [obsid])
    errors: list[BaseException] = []
    for obsid in obsids:
        together = threading.Barrier(2)

        def write(cfg, seed: int, obsid: str = obsid, together: threading.Barrier = together) -> None:
            try:
                together.wait()
                pg.cbm_store_write(cfg, fake_signatures([obsid], range(1, 301), seed=seed), [obsid])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(c, s)) for c, s in ((first, 1), (second, 2))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors, errors
    stored = pg.cbm_store_read(first, None, None, None)
    assert stored.stats.groupby("obsid").size().to_dict() == dict.fromkeys(obsids, 300 * 2)
    assert not stored.stats.duplicated(["pid", "obsid", "band"]).any()
    for obsid in obsids:  # one writer's copy whole, never a mix of both
        mine = stored.stats[stored.stats["obsid"] == obsid].sort_values(["pid", "band"], ignore_index=True)
        copies = [fake_signatures([obsid], range(1, 301), seed=s).stats for s in (1, 2)]
        copies = [c.sort_values(["pid", "band"], ignore_index=True) for c in copies]
        assert any(
            (mine["mean"].fillna(-1).to_numpy() == c["mean"].fillna(-1).to_numpy()).all() for c in copies
        )
    assert pg.cbm_store_obsids(first) == set(obsids)


def test_never_initialised_store_wrong_table_and_column_are_one_line_each(postgres):
    fresh = config(postgres, schema=f"never_{uuid.uuid4().hex[:6]}")
    with pytest.raises(InputError) as info:
        pg.cbm_store_obsids(fresh)
    message = str(info.value)
    assert "\n" not in message and "does not exist" in message and "cbm db init" in message
    assert "[store]" in message and "password" not in message
    cfg = config(postgres, parcels_table="no_such_parcels")
    pg.init_database(cfg)
    with pytest.raises(
        InputError, match=r'relation "public.no_such_parcels" does not exist; .*parcels_table'
    ):
        pg.cbm_source_parcels(cfg)
    from geopandas import read_file

    cfg = config(postgres)
    pg.import_parcels(cfg, read_file(DEMO / "parcels.gpkg").assign(crop_code="x"))
    cfg = pg.PluginConfig("postgis", {**cfg.options, "crop_name_column": "cropnaam"}, Path("."), "[source]")
    with pytest.raises(InputError, match=r'column "cropnaam" does not exist; check the column options'):
        pg.cbm_source_parcels(cfg)


def test_a_database_that_is_down_answers_within_connect_timeout():
    """Before: every call waited reconnect_seconds (60 s) for the pool before its error."""
    dsn = "host=127.0.0.1 port=1 dbname=x user=u password=hunter2"
    cfg = pg.PluginConfig("postgis", {"dsn": dsn, "reconnect_seconds": 60, "connect_timeout": 1})
    started = time.monotonic()
    with pytest.raises(CbmError) as info:
        pg.cbm_store_obsids(cfg)
    assert time.monotonic() - started < 10
    assert "refused" in str(info.value) and "hunter2" not in str(info.value)


def test_two_cbm_runs_on_one_postgis_store_both_finish(postgres, tmp_path):
    """The probe of the issue: two `cbm run` at once on one PostGIS store (different output folders)."""
    from sources.local import read_catalogue_csv

    cfg = config(postgres)
    pg.init_database(cfg)
    pg.import_catalogue(cfg, read_catalogue_csv(DEMO / "scenes.csv"))  # scenes known: writers race
    store = "".join(
        f"{k} = {v!r}\n".replace("'", '"') for k, v in {**cfg.options, "plugin": "postgis"}.items()
    )
    configs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'scheme = "ndvi-drop"\n[run]\nout = "out-{name}"\n'
            f'[source]\nparcels = "{DEMO / "parcels.gpkg"}"\nscenes = "{DEMO / "scenes.csv"}"\n'
            '[[extract]]\ncard = "s2"\nplugin = "zonal"\nbands = ["B04", "B08", "SCL"]\n'
            f"[store]\n{store}"
        )
        configs.append(path)
    runs = [
        subprocess.Popen([CBM, "run", "--quiet", str(c)], stderr=subprocess.PIPE, text=True) for c in configs
    ]
    results = [(r.wait(timeout=600), r.stderr.read()) for r in runs]
    assert [code for code, _ in results] == [0, 0], results
    assert all("Traceback" not in err for _, err in results)
    stats = pg.cbm_store_read(cfg, None, None, None).stats
    assert not stats.duplicated(["pid", "obsid", "band"]).any()
    assert stats.groupby("obsid").size().eq(18 * 2).all() and stats["obsid"].nunique() == 12
    a, b = (pd.read_csv(tmp_path / f"out-{n}" / "verdicts.csv") for n in ("a", "b"))
    assert a["light"].tolist() == b["light"].tolist()


def test_schema_errors_are_not_retried_as_lost_connections(postgres, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(pg.time, "sleep", sleeps.append)
    with pytest.raises(InputError):
        pg.cbm_store_obsids(config(postgres, schema="missing_schema"))
    assert sleeps == []
    with psycopg.connect(postgres.dsn) as conn:  # the database itself is untouched
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_server_answers_json_502_for_a_misconfigured_store_and_a_fast_503_when_down(postgres, tmp_path):
    """Before: a plain-text 500 (UndefinedTable escaped), and ~59 s before the 503 of a dead database."""
    from fastapi.testclient import TestClient
    from test_server import ANN, write_server

    from cbm_plugins.serve import create_app, load_server_config

    never = config(postgres, schema=f"never_{uuid.uuid4().hex[:6]}")
    store = "{ " + ", ".join(f'{k} = "{v}"' for k, v in {**never.options, "plugin": "postgis"}.items()) + " }"
    client = TestClient(create_app(load_server_config(write_server(tmp_path, store))))
    params = {"aoi": "fl", "year": 2023, "pid": 7, "tstype": "s2"}
    answer = client.get("/query/parcelTimeSeries", params=params, auth=ANN)
    assert answer.status_code == 502 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": "the dataset's data could not be read; see the server log"}
    down = '{ plugin = "postgis", dsn = "host=127.0.0.1 port=1 dbname=x user=u" }'
    client = TestClient(create_app(load_server_config(write_server(tmp_path, down, store_timeout=1))))
    started = time.monotonic()
    answer = client.get("/query/parcelTimeSeries", params=params, auth=ANN)
    assert answer.status_code == 503 and "unavailable" in answer.json()["error"]
    assert time.monotonic() - started < 8


def test_doctor_reports_a_never_initialised_postgis_store(postgres, tmp_path):
    from click.testing import CliRunner

    from cbm_core.cli import cli

    never = config(postgres, schema=f"never_{uuid.uuid4().hex[:6]}")
    store = "".join(f'{k} = "{v}"\n' for k, v in {**never.options, "plugin": "postgis"}.items())
    path = tmp_path / "run.toml"
    path.write_text(
        f'scheme = "ndvi-drop"\n[source]\nparcels = "{DEMO / "parcels.gpkg"}"\n'
        f'scenes = "{DEMO / "scenes.csv"}"\n'
        f'[[extract]]\ncard = "s2"\nplugin = "zonal"\nbands = ["B04"]\n[store]\n{store}'
    )
    result = CliRunner().invoke(cli, ["doctor", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    store_line = next(line for line in result.output.splitlines() if line.startswith("fail  store:"))
    assert "does not exist" in store_line and "cbm db init" in store_line
