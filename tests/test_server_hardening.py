"""Issue 15 on `cbm serve`: logins (non-ASCII, back-off, bounded hashing), dataset enumeration,
chip folders, users files and misconfigured or unreachable stores answered as documented JSON."""

from __future__ import annotations

import base64
import os
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from test_server import ANN, BOB, PASSWORD, write_run, write_server

from cbm_core.api import run
from cbm_core.errors import ConfigError
from cbm_plugins.serve import create_app, load_server_config
from cbm_plugins.serve._throttle import FREE_FAILURES, HashPool, LoginThrottle
from cbm_plugins.serve._users import make_user, read_users, write_users

UNICODE_PASSWORD = "Grüße-2024-€"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hardened")
    run(write_run(folder), progress=False)
    return folder


def app_client(
    folder: Path, store: str = '{ plugin = "parquet", path = "out/signatures" }', **server
) -> TestClient:
    config = write_server(folder, store, **server)
    users = read_users(folder / "users.json")
    users["eve"] = make_user("eve", UNICODE_PASSWORD, ["fl"])
    write_users(folder / "users.json", users)
    return TestClient(create_app(load_server_config(config)))


def basic(user: str, password: str, encoding: str = "utf-8") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode(encoding)).decode()}


def parcel(client: TestClient, headers: dict[str, str] | None = None, auth=None, **params):
    query = {"aoi": "fl", "year": 2023, "pid": 7} | params
    return client.get("/query/parcelByID", params=query, headers=headers, auth=auth)


def test_non_ascii_passwords_log_in_as_utf8_or_latin1(folder):
    client = app_client(folder)
    assert parcel(client, basic("eve", UNICODE_PASSWORD)).status_code == 200
    users = read_users(folder / "users.json")
    users["lat"] = make_user("lat", "Grüße-2024", ["fl"])  # Latin-1 clients (no € in Latin-1)
    write_users(folder / "users.json", users)
    assert parcel(client, basic("lat", "Grüße-2024", "latin-1")).status_code == 200
    assert parcel(client, basic("eve", "Grüße-2024-e")).status_code == 401
    garbage = {"Authorization": "Basic !!not-base64!!"}
    answer = parcel(client, garbage)
    assert answer.status_code == 401 and "error" in answer.json()


def test_legacy_parcels_form_does_not_reveal_which_datasets_exist(folder):
    client = app_client(folder)
    other_aoi = client.get("/query/parcelByID", params={"parcels": "fl2023", "ogc_fid": 7}, auth=BOB)
    missing = client.get("/query/parcelByID", params={"parcels": "xx2023", "ogc_fid": 7}, auth=BOB)
    assert other_aoi.status_code == missing.status_code == 403
    assert (
        client.get("/query/parcelByID", params={"parcels": "fl2099", "ogc_fid": 7}, auth=ANN).status_code
        == 404
    )


def test_users_file_with_a_string_of_aois_is_refused(tmp_path):
    path = tmp_path / "users.json"
    write_users(path, {"ann": make_user("ann", PASSWORD, ["fl"])})
    path.write_text(path.read_text().replace('"aois": [\n        "fl"\n      ]', '"aois": "fl"'))
    assert '"aois": "fl"' in path.read_text()
    with pytest.raises(
        ConfigError, match=r'user ann: "aois" must be a non-empty list of aoi names like \["fl"\]'
    ):
        read_users(path)


def test_chip_cleanup_removes_only_its_own_folders_and_makes_none_for_zero_chips(folder):
    client = app_client(folder)
    chips = folder / "chips"
    chips.mkdir(exist_ok=True)
    unrelated = chips / "shared-analysis"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    old_ours = chips / ("A" * 24)
    old_ours.mkdir()
    (old_ours / ".aoi").write_text("fl")
    long_ago = time.time() - 2 * 3600
    for path in (unrelated, old_ours):
        os.utime(path, (long_ago, long_ago))
    before = set(chips.iterdir())
    none = client.get("/query/rawChipByLocation", auth=ANN, params={
        "aoi": "fl", "year": 2023, "lon": 5.0563, "lat": 51.2194, "start_date": "2022-01-01",
        "end_date": "2022-01-02", "band": "B04"})  # fmt: skip
    assert none.status_code == 200 and none.json()["chips"] == []
    assert set(chips.iterdir()) == before  # zero chips: no folder made (and no clean-up pass)
    one = client.get("/query/rawChipByLocation", auth=ANN, params={
        "aoi": "fl", "year": 2023, "lon": 5.0563, "lat": 51.2194, "start_date": "2023-04-05",
        "end_date": "2023-04-05", "band": "B04", "chipsize": 300})  # fmt: skip
    assert len(one.json()["chips"]) == 1
    assert unrelated.exists() and (unrelated / "notes.txt").read_text() == "keep me"
    assert not old_ours.exists()


def test_failed_logins_back_off_per_client_and_the_right_password_waits_too(folder):
    client = app_client(folder)
    for _ in range(FREE_FAILURES):
        assert parcel(client, auth=("ann", "wrong password")).status_code == 401
    refused = parcel(client, auth=("ann", "wrong password"))
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "too many failed logins" in refused.json()["error"]
    assert parcel(client, auth=ANN).status_code == 429  # the client waits, whatever it sends now


def test_back_off_per_user_spares_a_session_already_logged_in():
    clock = [1000.0]
    throttle = LoginThrottle(clock=lambda: clock[0])
    for i in range(FREE_FAILURES):
        throttle.failed(f"client:10.0.0.{i}", "user:ann")  # one guess each from many addresses
    assert throttle.wait("user:ann") == pytest.approx(1.0)
    assert throttle.wait("client:10.0.0.1") == 0.0  # each address failed once only
    throttle.failed("client:10.0.0.9", "user:ann")
    assert throttle.wait("user:ann") == pytest.approx(2.0)  # doubled
    clock[0] += 2.5
    assert throttle.wait("user:ann") == 0.0
    throttle.succeeded("client:10.0.0.7", "user:ann")
    throttle.failed("user:ann")
    assert throttle.wait("user:ann") == 0.0  # counting starts afresh after a success
    assert throttle.trusted("client:10.0.0.7", "user:ann") and not throttle.trusted(
        "client:10.0.0.8", "user:ann"
    )


def test_a_session_passes_while_its_user_name_is_backed_off_but_new_clients_wait(folder):
    client = app_client(folder)
    throttle = client.app.state.login_throttle
    for _ in range(FREE_FAILURES + 3):
        throttle.failed("user:ann")  # an attacker elsewhere guessing ann's password
    assert parcel(client, auth=ANN).status_code == 429  # a client ann never logged in from waits too
    throttle.succeeded("client:testclient", "user:other")  # (trust is per user name)
    assert parcel(client, auth=ANN).status_code == 429
    throttle.succeeded("client:testclient", "user:ann")  # ann's own session from this client
    for _ in range(FREE_FAILURES + 3):
        throttle.failed("user:ann")  # the attack goes on
    assert throttle.wait("user:ann") > 0
    assert parcel(client, auth=ANN).status_code == 200


def test_hash_pool_is_bounded():
    pool = HashPool(threads=1, queue=1)
    release = threading.Event()
    first = pool.submit(release.wait, 10)
    second = pool.submit(release.wait, 10)
    assert first is not None and second is not None
    assert pool.submit(release.wait, 10) is None  # full: answered 503 at once, no scrypt queued
    release.set()
    first.result(5)
    second.result(5)
    assert pool.submit(lambda: 1).result(5) == 1


def test_users_cli_refuses_a_broken_users_file_in_one_line(folder, tmp_path):
    from cbm_core.cli import cli

    config = write_server(tmp_path, '{ plugin = "parquet", path = "s" }')
    users = tmp_path / "users.json"
    users.write_text(users.read_text().replace('"aois": [\n        "fl"\n      ]', '"aois": "fl"', 1))
    result = CliRunner().invoke(cli, ["users", "--config", str(config), "list"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f'Error: {users}: user ann: "aois" must be')


def test_checks_in_flight_count_so_concurrent_guesses_cannot_outrun_the_back_off():
    throttle = LoginThrottle()
    assert all(throttle.begin("client:a", "user:ann") for _ in range(FREE_FAILURES))
    assert not throttle.begin("client:a", "user:ann")  # 16 guesses at once: 5 are checked, not 16
    assert not throttle.begin("client:b", "user:ann")  # the user name's share is used up too
    assert throttle.begin("client:b", "user:bob")
    throttle.end("client:a", "user:ann")
    throttle.failed("client:a", "user:ann")
    assert not throttle.begin("client:a")  # 4 in flight + 1 failure
    for _ in range(FREE_FAILURES - 1):
        throttle.end("client:a", "user:ann")
    assert throttle.begin("client:a")  # 1 failure, nothing in flight
