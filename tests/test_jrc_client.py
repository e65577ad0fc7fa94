"""The unchanged JRC client (PyPI cbm 0.0.18, in its own virtualenv .venv-jrc, which
scripts/test.sh makes) against `cbm serve` under uvicorn: parcel info, polygon, peers, time
series s2/bs/c6/scl, NDVI, S2 and S1 plots with points on them, chips by location and parcel,
backgrounds and weather."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from servers import CbmServer, TileServer
from test_jrc_api import write_jrc_server
from test_server import PASSWORD, write_run

from cbm_core.api import run

ROOT = Path(__file__).resolve().parents[1]
CLIENT_PYTHON = Path(os.environ.get("CBM_JRC_PYTHON", ROOT / ".venv-jrc" / "bin" / "python"))

pytestmark = [
    pytest.mark.servers,
    pytest.mark.skipif(
        not CLIENT_PYTHON.exists(), reason="no JRC client virtualenv (scripts/test.sh makes .venv-jrc)"
    ),
]


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jrc-client")
    run(write_run(folder), progress=False)
    tiles = TileServer().start()
    server = CbmServer(write_jrc_server(folder, tiles.template)).start()
    work = folder / "client"
    work.mkdir()
    try:
        # the client checks PyPI for updates on import: through a closed port, it fails at once
        env = {**os.environ, "MPLBACKEND": "Agg", "NO_PROXY": "127.0.0.1,localhost",
               "HTTPS_PROXY": "http://127.0.0.1:9"}  # fmt: skip
        env.pop("PYTHONPATH", None)  # the client's environment only
        done = subprocess.run(
            [str(CLIENT_PYTHON), str(ROOT / "tests" / "jrc_client_calls.py"), server.url, "root", PASSWORD],
            cwd=work, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        yield json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
        tiles.stop()


def test_every_client_call_works(calls):
    failed = {name: call["error"] + "\n" + call["trace"] for name, call in calls.items() if not call["ok"]}
    assert not failed, "\n\n".join(f"{name}: {error}" for name, error in failed.items())
    assert len(calls) == 22


def test_answers_and_figures_are_not_empty(calls):
    assert set(json.loads(json.dumps(calls["datas.api.get_options"]["options"]))["aois"]) == {"fl", "be"}
    assert calls["get.parcel_info.by_pid"]["columns"]["pid"] == 1
    assert calls["get.parcel_info.by_polygon"]["columns"]["pid"] == 18
    assert calls["get.parcels_list.peers"]["columns"]["pids"] >= 1
    for tstype, rows in (("s2", 48), ("bs", 20), ("scl", 12)):
        assert calls[f"get.time_series.by_pid[{tstype}]"]["columns"]["date_part"] == rows, tstype
    assert calls["get.time_series.weather"]["columns"]["meteo_date"] == 334
    for name in ("ndvi", "s2", "s1", "weather"):
        shown = calls[f"show.time_series.{name}"]
        assert shown["figure"] and sum(shown["points"]) > 0, name
    ndvi = calls["show.time_series.ndvi"]["lines"]
    assert 0 < ndvi["Cloud free"] < ndvi["All observations"] == 12  # the SCL histograms filter the dates
    assert calls["show.time_series.s2"]["lines"]["B08 Cloud free"] == ndvi["Cloud free"]
    assert calls["show.time_series.s1"]["lines"]["VV mean"] == 10  # VVb rows found: the S1 names match
    assert calls["get.chip_images.by_location"]["listed"] == calls["get.chip_images.by_location"]["files"] > 0
    assert calls["get.chip_images.by_location"]["dates"][0].startswith("2023040")
    assert calls["get.chip_images.by_pid[B08]"]["files"] > 0
    assert calls["get.background.by_pid"]["files"] == ["chipsize_extend_256_400", "google.tif"]
    for name in ("show.parcel_info.by_pid", "show.background.by_pid", "show.chip_images.by_pid[ndvi]"):
        assert calls[name]["figure"] and sum(calls[name]["images"]) > 0, name
