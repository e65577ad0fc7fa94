"""`cbm serve`: query names, shapes, legacy forms, auth, limits and fuzzing (in-process ASGI),
plus a PostGIS-backed server under uvicorn that survives a database restart."""

from __future__ import annotations

import base64
import io
import os
import stat
from pathlib import Path

import hypothesis
import numpy as np
import pandas as pd
import pytest
import requests
import schemathesis
from click.testing import CliRunner
from conftest import DEMO
from fastapi.testclient import TestClient
from servers import CbmServer

import sources.postgis as pg
from cbm_core.api import run
from cbm_core.cli import CbmGroup
from cbm_core.config import PluginConfig
from cbm_plugins import serve
from cbm_plugins.serve import create_app, load_server_config
from cbm_plugins.serve._users import Authenticator, make_user, read_users, write_users

PASSWORD = "correct horse"
ANN, BOB, ROOT_USER = ("ann", PASSWORD), ("bob", PASSWORD), ("root", PASSWORD)
POLYGON = "5.050_51.214-5.062_51.214-5.062_51.223-5.050_51.223"


def write_run(folder: Path, store: str = 'plugin = "parquet"\npath = "out/signatures"') -> Path:
    config = folder / "run.toml"
    config.write_text(
        f'scheme = "ndvi-drop"\n[run]\nout = "out"\n'
        f'[source]\nplugin = "local"\nparcels = "{DEMO / "parcels.gpkg"}"\nscenes = "{DEMO / "scenes.csv"}"\n'
        f"[store]\n{store}\n"
        '[[extract]]\nplugin = "zonal"\ncard = "s2"\nbands = ["B04", "B08", "B11", "SCL"]\n'
        '[[extract]]\nplugin = "zonal"\ncard = "bs"\nbands = ["VV", "VH"]\n'
    )
    return config


def write_server(folder: Path, store: str, **server: object) -> Path:
    settings = "".join(f"{k} = {v!r}\n" for k, v in server.items())
    config = folder / "server.toml"
    config.write_text(
        f'[server]\nusers = "users.json"\nchip_dir = "chips"\n{settings}'
        '[[dataset]]\naoi = "fl"\nyear = 2023\n'
        'results = "out/markers.parquet"\nverdicts = "out/verdicts.csv"\n'
        f'source = {{ plugin = "local", parcels = "{DEMO / "parcels.gpkg"}",'
        f' scenes = "{DEMO / "scenes.csv"}" }}\n'
        f"store = {store}\n"
    )
    write_users(folder / "users.json", {
        "ann": make_user("ann", PASSWORD, ["fl"]), "bob": make_user("bob", PASSWORD, ["nl"]),
        "root": make_user("root", PASSWORD, ["*"]),
    })  # fmt: skip
    return config


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    result = run(write_run(folder), progress=False)
    config = write_server(folder, '{ plugin = "parquet", path = "out/signatures" }', max_chips=8)
    client = TestClient(create_app(load_server_config(config)))
    return client, result


def get(client, path: str, auth=ANN, **params):
    return client.get(path, params=params, auth=auth)


def test_parcel_queries_have_the_reference_shapes(served):
    client, _ = served
    by_id = get(client, "/query/parcelByID", aoi="fl", year=2023, pid=7, withGeometry="True").json()
    assert list(by_id) == ["pid", "cropname", "cropcode", "srid", "area", "clon", "clat", "geom"]
    assert (
        by_id["pid"] == ["7"]
        and by_id["srid"] == [32631]
        and all(isinstance(v, list) for v in by_id.values())
    )
    assert isinstance(by_id["area"][0], int) and by_id["area"][0] == pytest.approx(52465, rel=0.01)
    in_wgs84 = get(client, "/query/parcelByID", aoi="fl", year=2023, pid=7, wgs84="True").json()
    assert in_wgs84["srid"] == [32631]  # as JRC: the parcels' own srid
    at = get(
        client, "/query/parcelByLocation", aoi="fl", year=2023, lon=by_id["clon"][0], lat=by_id["clat"][0]
    ).json()
    assert at["pid"] == ["7"]
    assert get(client, "/query/parcelByID", aoi="fl", year=2023, pid=999).json()["pid"] == []
    inside = get(client, "/query/parcelsByPolygon", aoi="fl", year=2023, polygon=POLYGON).json()
    assert inside == {"pid": [str(p) for p in range(1, 19)]}
    peers = get(client, "/query/parcelPeers", aoi="fl", year=2023, pid=7, distance=200, max=3).json()
    assert list(peers) == ["pids", "distance"] and len(peers["pids"]) <= 3 and "7" not in peers["pids"]
    assert peers["distance"] == sorted(peers["distance"]) and max(peers["distance"]) <= 200


def test_legacy_forms_of_older_notebooks(served):
    client, _ = served
    legacy = get(client, "/query/parcelByID", parcels="fl2023", ogc_fid=7).json()
    assert legacy["ogc_fid"] == ["7"] and "pid" not in legacy
    series = get(client, "/query/parcelTimeSeries", parcels="fl2023", ogc_fid=7, tstype="s2").json()
    modern = get(client, "/query/parcelTimeSeries", aoi="fl", year=2023, pid=7, tstype="s2").json()
    assert series == modern and len(series["date_part"]) > 0


def test_time_series_match_the_store(served):
    client, result = served
    stats = result.series.stats
    expected = stats[(stats["pid"] == 7) & (stats["card"] == "bs")].sort_values(["obstime", "band"])
    got = get(client, "/query/parcelTimeSeries", aoi="fl", year=2023, pid=7, tstype="bs").json()
    assert list(got)[:10] == ["date_part", "band", "count", "mean", "std", "min", "p25", "p50", "p75", "max"]
    assert got["obsid"] == expected["obsid"].tolist() and got["band"] == (expected["band"] + "b").tolist()
    ours = get(client, "/query/parcelTimeSeries", aoi="fl", year=2023, pid=7, tstype="bs", bandnames="cbm")
    assert ours.json()["band"] == expected["band"].tolist()
    np.testing.assert_array_equal(got["mean"], expected["mean"].to_numpy())
    assert got["date_part"][0] == int(expected["obstime"].iloc[0].timestamp())
    one = get(
        client, "/query/parcelTimeSeries", aoi="fl", year=2023, pid=7, tstype="s2", band="B08", scl="true"
    )
    assert set(one.json()["band"]) == {"B08"} and all(isinstance(h, dict) for h in one.json()["hist"])
    scl = get(client, "/query/parcelTimeSeries", aoi="fl", year=2023, pid=7, tstype="scl").json()
    hist = result.series.scl[result.series.scl["pid"] == 7].iloc[0]
    assert scl["hist"][0] == {str(c): int(hist[f"hist_{c}"]) for c in range(12) if hist[f"hist_{c}"]}


def test_marker_results_and_verdicts(served):
    client, result = served
    markers = get(client, "/query/markerResults", aoi="fl", year=2023, pid=7).json()
    assert markers["pid"] == ["7"] and markers["marker"] == ["ndvi_drop"]
    verdicts = get(client, "/query/verdicts", aoi="fl", year=2023, light="red").json()
    expected = [str(p) for p in sorted(result.verdicts[result.verdicts["light"] == "red"]["pid"])]
    assert verdicts["pid"] == expected and set(verdicts["light"]) <= {"red"}


def test_chips_are_native_crops_and_need_the_aoi(served):
    client, _ = served
    answer = get(client, "/query/rawChipByLocation", aoi="fl", year=2023, lon=5.0563, lat=51.2194,
                 start_date="2023-04-05", end_date="2023-04-05", band="B04", chipsize=300).json()  # fmt: skip
    assert answer["dates"] == ["20230405T000000"] and answer["obsids"] == ["S2A_MSIL2A_20230405_T31UFS"]
    link = answer["chips"][0]
    assert link.startswith("/signed/")  # relative, as JRC: the client prefixes its base URL
    import rasterio

    with (
        rasterio.open(io.BytesIO(client.get(link).content)) as chip,  # a signed link needs no credentials
        rasterio.open(DEMO / "S2/S2A_MSIL2A_20230405_T31UFS/B04.tif") as full,
    ):
        window = full.window(*chip.bounds)
        np.testing.assert_array_equal(chip.read(1), full.read(1, window=window))
        assert chip.scales == full.scales and chip.crs == full.crs
    stamp, token, name = link.split("/")[2:]
    forged = f"/signed/{int(stamp.split('-')[0]) + 3600}-{stamp.split('-')[1]}/{token}/{name}"
    assert client.get(forged).status_code == 403  # a later expiry breaks the signature
    assert client.get(f"/signed/{stamp}/{'A' * 24}/{name}").status_code == 403  # another folder too
    authenticated = f"/chips/{token}/{name}"
    assert get(client, authenticated).status_code == 200
    assert get(client, authenticated, auth=BOB).status_code == 403
    assert get(client, authenticated, auth=None).status_code == 401
    assert get(client, authenticated.replace(".B04.tif", ".B08.tif")).status_code == 404
    assert get(client, "/chips/../../etc/passwd").status_code == 404
    too_many = get(client, "/query/rawChipByLocation", aoi="fl", year=2023, lon=5.0563, lat=51.2194,
                   start_date="2023-04-01", end_date="2023-04-30", band="B04")  # fmt: skip
    assert too_many.status_code == 400 and "shorten" in too_many.json()["error"]
    huge = get(client, "/query/rawChipByLocation", aoi="fl", year=2023, lon=5.0563, lat=51.2194,
               start_date="2023-04-05", end_date="2023-04-05", chipsize=99999)  # fmt: skip
    assert huge.status_code == 400 and "chipsize" in huge.json()["error"]
    batch = {"aoi": "fl", "year": 2023, "lon": 5.0563, "lat": 51.2194,
             "tiles": ["S2A_MSIL2A_20230405_T31UFS"], "bands": ["B04", "B08"], "chipsize": 200}  # fmt: skip
    ok = client.post("/query/rawChipsBatch", json=batch, auth=ANN).json()
    assert ok["bands"] == ["B04", "B08"]
    big_batch = client.post("/query/rawChipsBatch", json={**batch, "tiles": batch["tiles"] * 5}, auth=ANN)
    assert big_batch.status_code == 400
    assert client.post("/query/rawChipsBatch", json=batch, auth=BOB).status_code == 403


def test_authentication_and_authorization(served):
    client, _ = served
    path = "/query/parcelByID"
    params = {"aoi": "fl", "year": 2023, "pid": 7}
    missing = client.get(path, params=params)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Basic")
    assert client.get(path, params=params, auth=("ann", "wrong password")).status_code == 401
    assert client.get(path, params=params, auth=("nobody", PASSWORD)).status_code == 401
    other = client.get(path, params=params, auth=BOB)
    assert other.status_code == 403 and "error" in other.json()
    assert client.get(path, params=params, auth=ROOT_USER).status_code == 200
    assert client.get(path, params={**params, "year": 2019}, auth=ANN).status_code == 404
    garbage = {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:").decode()}
    assert client.get(path, params=params, headers=garbage).status_code == 401
    for endpoint in ("/query/markerResults", "/query/verdicts", "/query/parcelTimeSeries"):
        assert client.get(endpoint, params=params, auth=BOB).status_code == 403


def test_only_verified_passwords_skip_the_hash_until_the_users_file_changes(tmp_path):
    path = tmp_path / "users.json"
    write_users(path, {"ann": make_user("ann", PASSWORD, ["fl"])})
    auth = Authenticator(path)
    assert auth.cached("ann", PASSWORD) is None  # not verified yet: the server must pay the scrypt
    assert auth.check("ann", "wrong password") is None and auth.cached("ann", "wrong password") is None
    assert auth.check("ann", PASSWORD).name == "ann"
    assert auth.cached("ann", PASSWORD).name == "ann"
    assert auth.cached("ann", PASSWORD + "!") is None and auth.cached("bob", PASSWORD) is None
    write_users(path, {"ann": make_user("ann", "another password", ["fl", "nl"])})
    assert auth.cached("ann", PASSWORD) is None and auth.check("ann", PASSWORD) is None
    assert auth.check("ann", "another password").aois == ("fl", "nl")


def test_bad_input_gets_clear_4xx_json(served):
    client, _ = served
    cases = [
        ("/query/parcelByID", {"aoi": "fl", "year": 2023, "pid": "7 OR 1=1"}, 422),
        ("/query/parcelByID", {"aoi": "fl'; DROP TABLE parcels;--", "year": 2023, "pid": 7}, 422),
        ("/query/parcelByID", {"aoi": "fl", "year": 2023}, 400),
        ("/query/parcelByID", {"pid": 7}, 400),
        ("/query/parcelByID", {"aoi": "fl", "year": 2023, "pid": "it's"}, 422),
        ("/query/parcelByID", {"aoi": "fl", "year": 2023, "pid": "7/../8"}, 422),
        ("/query/parcelByID", {"aoi": "fl", "year": 2023, "pid": "pärcel"}, 422),
        ("/query/parcelTimeSeries", {"aoi": "fl", "year": 2023, "pid": 7, "tstype": "s3"}, 422),
        ("/query/parcelTimeSeries", {"aoi": "fl", "year": 2023, "pid": 7, "band": "B04' OR '1'='1"}, 422),
        ("/query/parcelByLocation", {"aoi": "fl", "year": 2023, "lon": "nan", "lat": 51}, 422),
        ("/query/parcelsByPolygon", {"aoi": "fl", "year": 2023, "polygon": "0_0-10_0-10_10-0_10"}, 400),
        ("/query/parcelsByPolygon", {"aoi": "fl", "year": 2023, "polygon": "1_2-3"}, 400),
        (
            "/query/parcelsByPolygon",
            {"aoi": "fl", "year": 2023, "polygon": "-".join(["5.05_51.21"] * 600)},
            400,
        ),
        ("/query/parcelsByPolygon", {"aoi": "fl", "year": 2023, "polygon": "x" * 9000}, 414),
    ]
    for path, params, status in cases:
        response = client.get(path, params=params, auth=ANN)
        assert response.status_code == status, (path, params, response.text)
        assert "error" in response.json()
    huge = client.get("/query/parcelByID", params={"aoi": "fl", "year": 2023, "pid": 2**70}, auth=ANN)
    assert huge.status_code == 200 and huge.json()["pid"] == []  # a text id no parcel has, as JRC
    body = client.post("/query/rawChipsBatch", content=b"{" + b" " * 70_000 + b"}", auth=ANN,
                       headers={"content-type": "application/json"})  # fmt: skip
    assert body.status_code == 413
    assert client.post("/query/rawChipsBatch", content=b"not json", auth=ANN,
                       headers={"content-type": "application/json"}).status_code == 422  # fmt: skip
    assert client.get("/no/such/query", auth=ANN).json() == {"error": "Not Found"}


def test_openapi_schema_fuzzed_with_injection_strings(served):
    client, _ = served
    spec = client.get("/openapi.json").json()
    assert {"/query/parcelTimeSeries", "/query/rawChipsBatch", "/query/verdicts"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBasic"]["scheme"] == "basic"
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    auth = {"Authorization": "Basic " + base64.b64encode(f"{ANN[0]}:{ANN[1]}".encode()).decode()}

    settings = hypothesis.settings(
        max_examples=15, deadline=None, suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate], database=None,
    )  # fmt: skip
    for operation in schema.get_all_operations():

        @settings
        @hypothesis.given(case=operation.ok().as_strategy())
        def fuzz(case):
            response = case.call(headers=auth)
            assert response.status_code < 500, (case.path, case.query, case.body, response.text)
            if "json" in str(response.headers.get("content-type")):
                response.json()

        fuzz()
    injections = ["' OR '1'='1", "1; DROP TABLE dias_catalogue; --", '") UNION SELECT * FROM pg_user --']
    for path, item in spec["paths"].items():
        if "get" not in item or "{" in path:
            continue
        for parameter in item["get"].get("parameters", []):
            for text in injections:
                params = {"aoi": "fl", "year": 2023, "pid": 7, parameter["name"]: text}
                response = client.get(path, params=params, auth=ANN)
                assert response.status_code < 500, (path, parameter["name"], response.text)
                if response.status_code == 200:  # taken as a literal value: no rows, or ignored (ptype)
                    without = client.get(
                        path, params={k: v for k, v in params.items() if v != text}, auth=ANN
                    )
                    rows = response.json()
                    assert rows == without.json() or not any(rows.values()), (path, parameter["name"], rows)


def test_users_command_hashes_passwords(tmp_path):
    config = write_server(tmp_path, '{ plugin = "parquet", path = "x" }')
    group = CbmGroup("cbm")
    serve.cbm_cli_commands(cli=group)
    runner = CliRunner()
    users = ["users", "--config", str(config)]
    added = runner.invoke(group, [*users, "add", "eve", "--aoi", "fl", "--aoi", "nl", "--password-stdin"],
                          input="a long secret\n")  # fmt: skip
    assert added.exit_code == 0, added.output
    users_file = tmp_path / "users.json"
    assert "a long secret" not in users_file.read_text()
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600
    assert read_users(users_file)["eve"].aois == ("fl", "nl")
    listed = runner.invoke(group, ["users", "--config", str(config), "list"])
    assert "eve\tfl,nl" in listed.output
    short = runner.invoke(group, [*users, "add", "x", "--aoi", "fl", "--password-stdin"], input="short\n")
    assert short.exit_code != 0 and "8 characters" in short.output
    assert runner.invoke(group, ["users", "--config", str(config), "remove", "eve"]).exit_code == 0
    assert "eve" not in read_users(users_file)
    assert runner.invoke(group, ["users", "--config", str(config), "remove", "eve"]).exit_code != 0


@pytest.mark.servers
def test_postgis_backed_server_survives_a_database_restart(postgres, tmp_path):
    store = {
        "plugin": "postgis",
        "dsn": postgres.dsn,
        "signatures_table": "srv_sig",
        "hists_table": "srv_hist",
    }
    pg.init_database(PluginConfig("postgis", store))
    store_toml = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in store.items())
    run(write_run(tmp_path, store_toml), progress=False)
    inline = "{ " + ", ".join(f"{k} = {v!r}".replace("'", '"') for k, v in store.items()) + " }"
    server = CbmServer(write_server(tmp_path, inline)).start()
    try:
        url = f"{server.url}/query/parcelTimeSeries"
        params = {"aoi": "fl", "year": 2023, "pid": 7, "tstype": "s2"}
        before = requests.get(url, params=params, auth=ANN, timeout=30)
        assert before.status_code == 200 and len([b for b in before.json()["band"] if b != "SC"]) == 36
        postgres.restart(mode="immediate")
        after = requests.get(url, params=params, auth=ANN, timeout=60)
        assert after.status_code == 200 and after.json() == before.json()
        frame = pd.DataFrame(after.json())
        assert not frame.duplicated(["obsid", "band"]).any()
    finally:
        server.stop()
