"""`cbm serve` under uvicorn: one access-log line per request, with who/what/how long and never the
password or the query values that carry data."""

from __future__ import annotations

import json
import time

import pytest
import requests
from servers import CbmServer
from test_server import PASSWORD, write_server

from cbm_plugins.serve import _logging


def access_lines(server: CbmServer, count: int, timeout: float = 10.0) -> list[dict]:
    """The server's cbm.access JSON lines, once `count` of them are there (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
        access = [line for line in lines if line.get("logger") == "cbm.access"]
        if len(access) >= count or time.monotonic() > deadline:
            return access
        time.sleep(0.1)


def test_one_request_one_access_line_without_the_password(tmp_path):
    config = write_server(tmp_path, '{ plugin = "parquet", path = "out/signatures" }')
    server = CbmServer(config, env={"CBM_LOG_FORMAT": "json", "CBM_LOG_LEVEL": "info"}).start()
    try:
        url = f"{server.url}/query/parcelByID"
        answer = requests.get(url, params={"aoi": "fl", "year": 2023, "pid": 987654}, auth=("ann", PASSWORD))
        assert answer.status_code == 200
        (line,) = access_lines(server, 1)
        time.sleep(0.5)  # nothing else comes for that request
        assert len(access_lines(server, 1)) == 1
        assert line["message"] == "request" and line["level"] == "info"
        assert {k: line[k] for k in ("method", "route", "status", "user", "aoi", "year")} == {
            "method": "GET", "route": "/query/parcelByID", "status": 200, "user": "ann", "aoi": "fl",
            "year": "2023",
        }  # fmt: skip
        assert 0 < line["duration_ms"] < 30_000
        denied = requests.get(url, params={"aoi": "fl", "year": 2023, "pid": 987654}, auth=("ann", "hunter2"))
        assert denied.status_code == 401
        assert [(a["user"], a["status"]) for a in access_lines(server, 2)] == [("ann", 200), ("ann", 401)]
    finally:
        text = server.log.read_text()
        server.stop()
    assert PASSWORD not in text and "hunter2" not in text and "987654" not in text


@pytest.mark.parametrize(
    "header, user",
    [(b"Basic YW5uOnNlY3JldA==", "ann"), (b"Basic !!!", "-"), (b"Bearer abc", "-"), (None, "-")],
)
def test_user_names_come_from_basic_auth_only(header, user):
    scope = {"headers": [] if header is None else [(b"authorization", header)]}
    assert _logging._user(scope) == user
