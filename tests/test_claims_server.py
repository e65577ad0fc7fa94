"""`cbm serve`: who may read what, and the documented error answers (docs/rest-api.md), over HTTP.

The application runs in-process (ASGI through the test client); the tests use only the HTTP
interface and the public configuration format, so they hold whatever the server's modules look
like inside. No `cbm run` is needed: parcels, scenes and chips come from the demo data. Each
docstring names the one-line bug the test was checked against (planted, seen failing, reverted).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import DEMO
from fastapi.testclient import TestClient

from cbm_plugins import serve
from cbm_plugins.serve import create_app, load_server_config
from cbm_plugins.serve._users import make_user, write_users

PASSWORD = "correct horse"
ANN, BOB, ROOT_USER = ("ann", PASSWORD), ("bob", PASSWORD), ("root", PASSWORD)
FL = {"aoi": "fl", "year": 2023}
AT_FL = {"lon": 5.0563, "lat": 51.2194}  # inside the demo scenes
LOCAL = f'{{ plugin = "local", parcels = "{DEMO / "parcels.gpkg"}", scenes = "{DEMO / "scenes.csv"}" }}'


def dataset(aoi: str, source: str, store: str) -> str:
    return f'[[dataset]]\naoi = "{aoi}"\nyear = 2023\nsource = {source}\nstore = {store}\n'


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("claims-server")
    (folder / "broken.gpkg").write_bytes(b"not a geopackage")
    broken = f'{{ plugin = "local", parcels = "{folder / "broken.gpkg"}", scenes = "{DEMO / "scenes.csv"}" }}'
    nowhere = "host=127.0.0.1 port=1 dbname=x user=u connect_timeout=1"
    down = f'{{ plugin = "postgis", dsn = "{nowhere}", reconnect_seconds = 0 }}'
    (folder / "server.toml").write_text(
        '[server]\nusers = "users.json"\nchip_dir = "chips"\nmax_body_bytes = 2000\nmax_query_bytes = 600\n'
        + dataset("fl", LOCAL, '{ plugin = "parquet", path = "signatures" }')
        + dataset("broken", broken, '{ plugin = "parquet", path = "signatures" }')
        + dataset("down", LOCAL, down)
    )  # fmt: skip
    write_users(folder / "users.json", {
        "ann": make_user("ann", PASSWORD, ["fl", "broken", "down"]),
        "bob": make_user("bob", PASSWORD, ["nl"]), "root": make_user("root", PASSWORD, ["*"]),
        "flo": make_user("flo", PASSWORD, ["fl"]),
    })  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def client(folder) -> TestClient:
    return TestClient(create_app(load_server_config(folder / "server.toml")))


def get(client: TestClient, path: str, auth=ANN, **params):
    return client.get(path, params=params, auth=auth)


def test_the_plugin_adds_its_commands():
    assert serve.cbm_cli_commands is not None


def test_datasets_are_found_by_aoi_and_year_and_guarded_per_aoi(client):
    """A user reads only the datasets of his aois; asking for an unknown dataset of an aoi he may
    not read is 403 like a known one (no probing which datasets exist). Planted bugs: the per-aoi
    check removed; the 404 branch not asking may_read (404 told bob fl/2019 does not exist); the
    legacy <aoi><year> split dropped (ann's own fl2019 answered 403)."""
    path, pid = "/query/parcelByID", {"pid": 7}
    assert get(client, path, **FL, **pid).json()["pid"] == ["7"]  # JRC: pids are text
    assert get(client, path, aoi="FL", year=2023, **pid).status_code == 200  # aois are case-insensitive
    assert get(client, path, auth=ROOT_USER, **FL, **pid).status_code == 200  # '*' reads every aoi
    denied = get(client, path, auth=BOB, **FL, **pid)
    assert denied.status_code == 403 and denied.json() == {"error": "user bob may not read dataset fl2023"}
    assert get(client, path, auth=BOB, aoi="fl", year=2019, **pid).status_code == 403
    missing = get(client, path, aoi="fl", year=2019, **pid)
    assert missing.status_code == 404 and missing.json() == {"error": "no dataset fl2019"}
    assert get(client, path, parcels="fl2023", **pid).status_code == 200  # legacy parcels=<aoi><year>
    assert get(client, path, auth=BOB, parcels="fl2023", **pid).status_code == 403
    assert get(client, path, parcels="xx2023", **pid).status_code == 403  # legacy form: never reveals
    no_year = get(client, path, aoi="fl", **pid)
    assert no_year.status_code == 400 and "give aoi and year" in no_year.json()["error"]
    assert get(client, path, year=2023, **pid).status_code == 400  # a year alone names nothing
    assert get(client, path, **pid).status_code == 400
    assert get(client, path, parcels="fl2019", **pid).status_code == 404  # legacy form, ann's own aoi
    assert get(client, path, **FL, parcels="xx2023", **pid).status_code == 200  # aoi and year win
    for endpoint in ("/query/parcelTimeSeries", "/query/markerResults", "/query/verdicts"):
        assert get(client, endpoint, auth=BOB, **FL, **pid).status_code == 403, endpoint


def test_chips_without_aoi_come_only_from_a_dataset_the_user_may_read(client):
    """Old clients send no aoi: the server picks the first dataset the user may read that has
    scenes at the point. Planted bug (issue 19): that fallback's `may_read` check replaced by
    True (bob, who may read only nl, got fl's chips with 200). Chip answers link to signed URLs (the
    JRC client sends no credentials; a forged signature is refused); the same chip through
    /chips/{token}/{name} needs basic auth and the chip's aoi."""
    dates = {"start_date": "2023-04-05", "end_date": "2023-04-05", "band": "B04", "chipsize": 100}
    mine = get(client, "/query/rawChipByLocation", **AT_FL, **dates)
    assert mine.status_code == 200 and mine.json()["obsids"] == ["S2A_MSIL2A_20230405_T31UFS"]
    theirs = get(client, "/query/rawChipByLocation", auth=BOB, **AT_FL, **dates)
    assert theirs.status_code == 404
    assert theirs.json() == {"error": "no dataset you may read has scenes at this location"}
    far = get(client, "/query/rawChipByLocation", auth=("flo", PASSWORD), lon=-70.0, lat=-30.0, **dates)
    assert far.status_code == 404  # flo may read fl, but it has no scene there
    batch = {**AT_FL, "tiles": ["S2A_MSIL2A_20230405_T31UFS"], "bands": ["B04"], "chipsize": 100}
    assert client.post("/query/rawChipsBatch", json=batch, auth=ANN).status_code == 200
    assert client.post("/query/rawChipsBatch", json=batch, auth=BOB).status_code == 404
    signed = mine.json()["chips"][0].replace("http://testserver", "")  # /signed/{stamp}/{token}/{name}
    _, _, stamp, token, name = signed.split("/")
    assert get(client, signed, auth=None).status_code == 200  # the JRC client fetches without credentials
    forged = signed.replace(stamp, stamp[:-1] + ("A" if stamp[-1] != "A" else "B"))
    assert get(client, forged, auth=None).status_code == 403
    link = f"/chips/{token}/{name}"  # the same chip through basic auth: per aoi
    assert get(client, link).status_code == 200
    assert get(client, link, auth=BOB).status_code == 403
    assert get(client, link, auth=ROOT_USER).status_code == 200
    assert get(client, link, auth=None).status_code == 401
    assert get(client, link.replace(token, "A" * 32)).status_code == 404  # expired or never made


def test_unknown_users_cost_as_much_time_as_wrong_passwords(client):
    """docs/rest-api.md: a wrong user name takes as long as a wrong password (a scrypt each), so
    user names cannot be enumerated by timing; a verified password skips the scrypt. Planted bug:
    the dummy hash for unknown users removed (they were answered ~50x faster)."""

    users = ("ann", "bob", "root", "flo")

    def fastest(*logins) -> list[tuple[float, int]]:
        """The quickest of four tries of each login, tried in turn (load bursts hit all alike).
        Each round comes from another client address and uses other names, so that the failed-login
        back-off (five failures per address or name, docs/rest-api.md) never answers instead."""
        best = [(float("inf"), 0)] * len(logins)
        for attempt, user in enumerate(users):
            asking = TestClient(client.app, client=(f"192.0.2.{attempt + 1}", 50000))
            for i, (name, password) in enumerate(logins):
                name = name.format(n=attempt, user=user)
                start = time.perf_counter()  # a dataset that does not exist: no data read after the login
                answer = get(asking, "/query/parcelByID", auth=(name, password), aoi="fl", year=2019, pid=7)
                best[i] = (min(best[i][0], time.perf_counter() - start), answer.status_code)
        return best

    (unknown, unknown_status), (wrong, wrong_status) = fastest(
        ("nobody{n}", PASSWORD), ("{user}", "wrong password")
    )
    assert unknown_status == wrong_status == 401
    assert unknown > 0.25 * wrong, (unknown, wrong)  # without the dummy hash: ~0.02
    get(client, "/query/parcelByID", **FL, pid=7)  # verified once
    [(known, status)] = fastest(("ann", PASSWORD))
    assert status == 404 and known < 0.5 * wrong, (known, wrong)


def test_data_errors_are_502_and_store_outages_503_without_details(client):
    """docs/rest-api.md: unreadable dataset data -> 502, an unavailable store -> 503, neither
    leaking paths or DSNs. Planted bug: the InputError branch dropped (502 became 503)."""
    broken = get(client, "/query/parcelByID", aoi="broken", year=2023, pid=7)
    assert broken.status_code == 502
    assert broken.json() == {"error": "the dataset's data could not be read; see the server log"}
    down = get(client, "/query/parcelTimeSeries", aoi="down", year=2023, pid=7)
    assert down.status_code == 503
    assert down.json() == {"error": "the dataset's store is unavailable; try again later"}


def test_size_limits_answer_411_413_414_before_any_handler(client):
    """A body needs a Content-Length (411), no bigger than max_body_bytes (413); a query string
    no longer than max_query_bytes (414). Planted bugs: `>` -> `>=` in either limit; the 411
    branch removed (a chunked body of any size went through)."""
    batch = {**AT_FL, **FL, "tiles": ["S2A_MSIL2A_20230405_T31UFS"], "bands": ["B04"], "chipsize": 100}
    chunked = client.post("/query/rawChipsBatch", content=iter([b'{"lon": 5.0}']), auth=ANN,
                          headers={"content-type": "application/json"})  # fmt: skip
    assert chunked.status_code == 411
    assert chunked.json() == {"error": "a request body needs a Content-Length header"}
    body = b"x" * 2000
    at_limit = client.post(
        "/query/rawChipsBatch", content=body, auth=ANN, headers={"content-type": "text/plain"}
    )
    assert at_limit.status_code == 422  # read, then refused as not JSON
    over = client.post("/query/rawChipsBatch", content=body + b"x", auth=ANN)
    assert over.status_code == 413 and over.json() == {"error": "request body larger than 2000 bytes"}
    lying = client.post("/query/rawChipsBatch", json=batch, auth=ANN, headers={"content-length": "-1"})
    assert lying.status_code == 413
    query = "aoi=fl&year=2023&pid=7&x="
    assert client.get(f"/query/parcelByID?{query}{'a' * (600 - len(query))}", auth=ANN).status_code == 200
    long = client.get(f"/query/parcelByID?{query}{'a' * (601 - len(query))}", auth=ANN)
    assert long.status_code == 414 and long.json() == {"error": "query string longer than 600 bytes"}
    assert client.get("/health").status_code == 200


# The users file (cbm_plugins/serve/_users.py), as `cbm users` and the server read it -------------


def test_users_are_stored_as_documented_salted_scrypt_hashes(tmp_path):
    """docs/rest-api.md: salted scrypt, n = 2^14; only the owner may read the file. Planted bugs:
    n 2^14 -> 2^15, r 8 -> 9, a 17-byte salt, a 33-byte key, the owner-only mode, the folder not
    created."""
    import json
    import stat

    from cbm_plugins.serve._users import read_users

    path = tmp_path / "new" / "folder" / "users.json"
    write_users(path, {"ann": make_user("ann", "8 chars!", ["fl"])})
    stored = json.loads(path.read_text())["users"]["ann"]
    assert (stored["n"], stored["r"], stored["p"]) == (2**14, 8, 1)
    assert len(bytes.fromhex(stored["salt"])) == 16 and len(bytes.fromhex(stored["hash"])) == 32
    assert stored["aois"] == ["fl"] and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_users(path)["ann"].aois == ("fl",)
    assert make_user("bob", "8 chars!", ["fl"]).salt != read_users(path)["ann"].salt
    with pytest.raises(Exception, match="8 characters"):
        make_user("eve", "7 chars", ["fl"])


@pytest.mark.parametrize("aois", [[], [""], ["fl", 3], "fl"])
def test_a_users_file_with_bad_aois_is_refused(tmp_path, aois):
    """Planted bugs: the empty-name and non-text checks of the aoi list dropped."""
    import json

    from cbm_core.errors import ConfigError
    from cbm_plugins.serve._users import read_users

    path = tmp_path / "users.json"
    write_users(path, {"ann": make_user("ann", PASSWORD, ["fl"])})
    data = json.loads(path.read_text())
    data["users"]["ann"]["aois"] = aois
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match='"aois" must be a non-empty list of aoi names'):
        read_users(path)


def test_a_missing_users_file_lets_nobody_in_until_it_appears(tmp_path):
    """Planted bug: the stamp of a missing file equal to a real one (the users never re-read)."""
    from cbm_plugins.serve._users import Authenticator

    auth = Authenticator(tmp_path / "users.json")
    assert auth.check("ann", PASSWORD) is None
    write_users(tmp_path / "users.json", {"ann": make_user("ann", PASSWORD, ["fl"])})
    assert auth.check("ann", PASSWORD).name == "ann"
