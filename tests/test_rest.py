"""REST source: a client of `cbm serve` (uvicorn, loopback) behind a fault-injecting proxy."""

from __future__ import annotations

import pandas as pd
import pytest
from servers import CbmServer, FaultProxy
from test_server import PASSWORD, POLYGON, write_run, write_server

import sources.rest as rest
from cbm_core.api import run
from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError, InputError

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rest")
    result = run(write_run(folder), progress=False)
    server = CbmServer(write_server(folder, '{ plugin = "parquet", path = "out/signatures" }')).start()
    proxy = FaultProxy(server.port).start()
    yield proxy, result
    proxy.stop()
    server.stop()


def config(proxy, **options) -> PluginConfig:
    base = {"url": proxy.endpoint, "aoi": "fl", "year": 2023, "username": "ann", "password": PASSWORD}
    return PluginConfig("rest", base | options, where="[source]")


def test_parcels_by_ids_and_by_polygon(api):
    proxy, result = api
    some = rest.cbm_source_parcels(config(proxy, pids=[3, 7]))
    assert some["pid"].tolist() == [3, 7] and some.crs == result.parcels.crs
    expected = result.parcels.set_index("pid").loc[[3, 7]].geometry.values
    assert all(a.equals_exact(b, 0) for a, b in zip(some.geometry.values, expected, strict=True))
    assert rest.cbm_source_parcels(config(proxy, polygon=POLYGON))["pid"].tolist() == list(range(1, 19))
    with pytest.raises(InputError, match="polygon holds"):
        rest.cbm_source_parcels(config(proxy, polygon=POLYGON, polygon_limit=10))


def test_retries_5xx_and_throttling(api):
    proxy, _ = api
    proxy.reset()
    proxy.fail_next = 2
    series = rest.cbm_source_signatures(config(proxy, pids=[7], tstypes=["bs"], workers=1), None)
    assert proxy.failures_sent == 2 and set(series.stats["card"]) == {"bs"} and len(series.stats) == 20


def test_credentials_and_aoi_are_checked(api):
    proxy, _ = api
    with pytest.raises(ConfigError, match="401"):
        rest.cbm_source_parcels(config(proxy, pids=[7], password="wrong password"))
    with pytest.raises(ConfigError, match="403"):
        rest.cbm_source_parcels(config(proxy, pids=[7], username="bob"))
    with pytest.raises(ConfigError, match="pids"):
        rest.cbm_source_parcels(config(proxy))
    with pytest.raises(InputError, match="404"):
        rest.cbm_source_parcels(config(proxy, pids=[7], year=1999))


def test_reference_servers_without_scene_ids(monkeypatch):
    """A JRC server sends no obsid/orbit columns: scenes are named by card and time, so SCL still joins S2."""
    answers = {
        "parcelByID": {"pid": [5], "cropname": ["grass"], "cropcode": ["6000"], "srid": [32631],
                       "geom": ['{"type":"Polygon","coordinates":[[[643500,5676000],[643600,5676000],'
                                '[643600,5676100],[643500,5676000]]]}']},
        "s2": {"date_part": [1680652800], "band": ["B04"], "count": [10], "mean": [0.05], "std": [0.01],
               "min": [0.03], "p25": [0.04], "p50": [0.05], "p75": [0.06], "max": [0.07]},
        "scl": {"date_part": [1680652800], "hist": ['{"4": 10}']},
    }  # fmt: skip
    monkeypatch.setattr(rest, "query", lambda cfg, name, params=None, body=None: answers.get(
        params.get("tstype", name), {}))  # fmt: skip
    series = rest.cbm_source_signatures(
        PluginConfig("rest", {"url": "http://x", "aoi": "a", "year": 1, "pids": [5]}), None
    )
    assert series.stats["obsid"].tolist() == ["s2_20230405T000000"]
    assert series.stats["obstime"].iloc[0] == pd.Timestamp("2023-04-05", tz="UTC")
    assert series.scl["hist_4"].tolist() == [10] and series.scl["obsid"].tolist() == ["s2_20230405T000000"]


def test_values_are_sent_as_encoded_parameters_never_pasted(api):
    """docs/rest-api.md: values travel as parameters. An aoi of `nl&aoi=fl` is one value, refused
    by the server's aoi pattern (422), not a second aoi. Planted bug: the query string pasted
    together with an f-string (the server read aoi=fl and answered 200)."""
    proxy, _ = api
    with pytest.raises(InputError, match="422"):
        rest.cbm_source_parcels(config(proxy, pids=[7], aoi="nl&aoi=fl"))
    with pytest.raises(InputError, match="422"):
        rest.cbm_source_parcels(config(proxy, pids=[7], aoi="fl' OR '1'='1"))
