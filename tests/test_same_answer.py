"""One answer whatever the source: the demo's parcels and scenes read from local files, PostGIS,
S3 and the REST API (served by `cbm serve` under uvicorn) give the same signatures, marker results
and verdicts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import DEMO
from servers import CbmServer, s3_client, upload_demo
from test_server import PASSWORD, POLYGON, write_run, write_server

import sources.postgis as pg
import sources.rest as rest
from cbm_core.api import run
from cbm_core.config import PluginConfig
from cbm_core.model import HIST_COLUMNS, SIGNATURE_COLUMNS
from cbm_core.pipeline import Engine

pytestmark = pytest.mark.servers
BANDS = '["B04", "B08", "B11", "SCL", "VV", "VH"]'


def toml_table(options: dict) -> str:
    return "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in options.items())


def run_with(folder: Path, source: str, store: str = 'plugin = "parquet"\npath = "out/signatures"'):
    folder.mkdir(parents=True, exist_ok=True)
    config = write_run(folder, store)
    text = config.read_text()
    start = text.index("[source]")
    config.write_text(text[:start] + f"[source]\n{source}\n" + text[text.index("[store]") :])
    return run(config, progress=False)


def signatures(result) -> tuple[pd.DataFrame, pd.DataFrame]:
    stats = result.series.stats[[*SIGNATURE_COLUMNS, "obstime", "card"]]
    scl = result.series.scl[["pid", "obsid", *HIST_COLUMNS, "obstime"]]
    return (
        stats.sort_values(["pid", "obsid", "band"], ignore_index=True),
        scl.sort_values(["pid", "obsid"], ignore_index=True).astype({h: "int64" for h in HIST_COLUMNS}),
    )


def assert_same(result, reference) -> None:
    for got, want in zip(signatures(result), signatures(reference), strict=True):
        pd.testing.assert_frame_equal(got, want)
    pd.testing.assert_frame_equal(
        result.results.sort_values(["marker", "pid"], ignore_index=True),
        reference.results.sort_values(["marker", "pid"], ignore_index=True),
    )
    columns = ["pid", "light", "reasons"]
    pd.testing.assert_frame_equal(  # the pid dtype follows the source (int32 in the GeoPackage)
        pd.DataFrame(result.verdicts[columns]).sort_values("pid", ignore_index=True),
        pd.DataFrame(reference.verdicts[columns]).sort_values("pid", ignore_index=True),
        check_dtype=False,
    )


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    source = f'plugin = "local"\nparcels = "{DEMO / "parcels.gpkg"}"\nscenes = "{DEMO / "scenes.csv"}"'
    result = run_with(tmp_path_factory.mktemp("local"), source)
    # April 2023 is honestly yellow everywhere (two valid dates): the comparison bites through the
    # signatures, compared exactly, which differ from parcel to parcel
    per_parcel = result.series.stats.groupby("pid")["mean"].mean()
    assert len(result.series.stats) > 0 and per_parcel.nunique() == len(result.parcels)
    return result


@pytest.fixture(scope="module")
def postgis_store(postgres, local):
    options = {"plugin": "postgis", "dsn": postgres.dsn, "parcels_table": "same_parcels",
               "signatures_table": "same_sig", "hists_table": "same_hist"}  # fmt: skip
    config = PluginConfig("postgis", options)
    pg.init_database(config)
    pg.import_parcels(config, local.parcels, replace=True)
    pg.import_catalogue(config, local.catalogue)
    return options


def test_postgis_gives_the_same_answer(postgis_store, local, tmp_path):
    table = toml_table(postgis_store)
    assert_same(run_with(tmp_path, table, table), local)


def test_s3_gives_the_same_answer(moto, local, tmp_path):
    upload_demo(s3_client(moto.endpoint), "same-answer")
    source = {"plugin": "s3", "bucket": "same-answer", "prefix": "flanders/", "scenes": "scenes.csv",
              "parcels": "s3://same-answer/flanders/parcels.gpkg", "endpoint_url": moto.endpoint,
              "access_key_id": "testing", "secret_access_key": "testing"}  # fmt: skip
    assert_same(run_with(tmp_path, toml_table(source)), local)


@pytest.fixture(scope="module")
def server(postgis_store, local, tmp_path_factory):
    """`cbm serve` over the PostGIS store that test_postgis_gives_the_same_answer filled."""
    folder = tmp_path_factory.mktemp("serve")
    run_with(folder, toml_table(postgis_store), toml_table(postgis_store))
    inline = "{ " + toml_table(postgis_store).replace("\n", ", ") + " }"
    started = CbmServer(write_server(folder, inline, max_chips=30)).start()
    yield started
    started.stop()


def test_rest_signatures_give_the_same_answer(server, local):
    config = PluginConfig("rest", {"url": server.url, "aoi": "fl", "year": 2023, "username": "ann",
                                   "password": PASSWORD, "polygon": POLYGON})  # fmt: skip
    series = rest.cbm_source_signatures(config, None)
    got = series.stats[[*SIGNATURE_COLUMNS, "obstime", "card"]].sort_values(
        ["pid", "obsid", "band"], ignore_index=True
    )
    want, want_scl = signatures(local)
    pd.testing.assert_frame_equal(got, want)
    scl = series.scl[["pid", "obsid", *HIST_COLUMNS, "obstime"]].sort_values(
        ["pid", "obsid"], ignore_index=True
    )
    pd.testing.assert_frame_equal(scl, want_scl)
    engine = Engine(progress=False)
    scheme = engine.scheme("ndvi-drop", Path("."))
    results = engine.run_markers(series, scheme)
    pd.testing.assert_frame_equal(
        results.sort_values(["marker", "pid"], ignore_index=True),
        local.results.sort_values(["marker", "pid"], ignore_index=True),
    )
    verdicts = engine.decide(results, series.parcels, scheme)
    assert (
        verdicts.sort_values("pid")["light"].tolist() == local.verdicts.sort_values("pid")["light"].tolist()
    )


def test_rest_chips_give_the_same_answer(server, local, tmp_path):
    source = {"plugin": "rest", "url": server.url, "aoi": "fl", "year": 2023, "username": "ann",
              "password": PASSWORD, "polygon": POLYGON, "start_date": "2023-04-01", "end_date": "2023-04-30",
              "chip_dir": str(tmp_path / "chips")}  # fmt: skip
    assert_same(run_with(tmp_path, toml_table(source) + f"\nbands = {BANDS}"), local)
