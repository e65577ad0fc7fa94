"""The JRC drop-in routes of `cbm serve` in process: JRC time-series conventions, text parcel ids,
chips (signed links, onlylist, .SAFE references, S1 batches, composites), orthophoto backgrounds
from a tile server the test starts, weather from AgERA5 CSV and netCDF, info, markers; and the
bad-input and cross-aoi cases (clear 4xx, never another aoi's data, never 5xx)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import hypothesis
import numpy as np
import pandas as pd
import pytest
import rasterio
import schemathesis
from conftest import DEMO
from fastapi.testclient import TestClient
from servers import TileServer
from test_server import PASSWORD, write_run

from cbm_core.api import run
from cbm_plugins.serve import create_app, load_server_config
from cbm_plugins.serve._users import make_user, write_users

METEO = Path(__file__).parent / "data" / "flanders-meteo"
ANN, BOB, ROOT_USER = ("ann", PASSWORD), ("bob", PASSWORD), ("root", PASSWORD)
FL = {"aoi": "fl", "year": 2023}
BE = {"aoi": "be", "year": 2018}
AT_DEMO = {"lon": 5.0563, "lat": 51.2194}
CODE = "BE18-9B424A-001"  # the text id of parcel 1 of the Flanders meteo fixture


def write_jrc_server(folder: Path, tiles: str, meteo: str = "agera5-2018.nc") -> Path:
    """Two datasets: the demo (fl 2023, signatures and results of a run, backgrounds from the tile
    server, a meteo grid that does not reach it) and the Flanders meteo fixture (be 2018, text ids)."""
    config = folder / "server.toml"
    background = (
        f'{{ plugin = "tiles", url = "{tiles}", zoom = 17, cache = "tiles", attribution = "test tiles" }}'
    )
    config.write_text(
        '[server]\nusers = "users.json"\nchip_dir = "chips"\n'
        '[[dataset]]\naoi = "fl"\nyear = 2023\n'
        'results = "out/markers.parquet"\nverdicts = "out/verdicts.csv"\n'
        f'source = {{ plugin = "local", parcels = "{DEMO / "parcels.gpkg"}",'
        f' scenes = "{DEMO / "scenes.csv"}" }}\n'
        'store = { plugin = "parquet", path = "out/signatures" }\n'
        f'meteo = {{ plugin = "meteo", path = "{METEO / meteo}" }}\n'
        f"backgrounds = {{ google = {background} }}\n"
        '[[dataset]]\naoi = "be"\nyear = 2018\n'
        f'source = {{ plugin = "local", parcels = "{METEO / "parcels.gpkg"}",'
        ' parcel_code_column = "parcel_code" }\n'
        'store = { plugin = "parquet", path = "be/signatures" }\n'
        f'meteo = {{ plugin = "meteo", path = "{METEO / meteo}" }}\n'
        f"backgrounds = {{ google = {background} }}\n"
    )
    write_users(folder / "users.json", {
        "ann": make_user("ann", PASSWORD, ["fl"]), "bob": make_user("bob", PASSWORD, ["be"]),
        "root": make_user("root", PASSWORD, ["*"]),
    })  # fmt: skip
    return config


@pytest.fixture(scope="module")
def tiles():
    server = TileServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def jrc(tmp_path_factory, tiles):
    folder = tmp_path_factory.mktemp("jrc")
    result = run(write_run(folder), progress=False)
    client = TestClient(create_app(load_server_config(write_jrc_server(folder, tiles.template))))
    return client, result


def get(client, path: str, auth=ANN, **params):
    return client.get(path, params=params, auth=auth)


def test_time_series_follow_the_jrc_conventions(jrc):
    client, result = jrc
    stats = result.series.stats
    s2 = get(client, "/query/parcelTimeSeries", **FL, pid="7").json()  # the JRC client's call
    assert all(isinstance(h, dict) for h in s2["hist"]) and len(s2["hist"]) == len(s2["band"])
    assert all(isinstance(d, float) for d in s2["date_part"])
    frame = pd.DataFrame({k: v for k, v in s2.items() if k != "hist"})
    expected = stats[(stats["pid"] == 7) & (stats["band"] == "B08")].sort_values("obstime")
    np.testing.assert_allclose(frame[frame["band"] == "B08"]["mean"], expected["mean"] * 10_000)  # DN
    sc = frame[frame["band"] == "SC"]  # the SCL class statistics, derived from the histograms
    assert len(sc) == 12 and sc["min"].between(0, 11).all() and (sc["min"] <= sc["p50"]).all()
    ours = get(client, "/query/parcelTimeSeries", **FL, pid="7", values="reflectance", bandnames="cbm").json()
    assert "SC" not in ours["band"] and "SCL" not in ours["band"]  # ours: SCL as histograms only
    np.testing.assert_allclose(
        pd.DataFrame(ours).query("band == 'B08'")["mean"], expected["mean"].to_numpy()
    )  # fmt: skip
    bs = get(client, "/query/parcelTimeSeries", **FL, pid="7", tstype="bs").json()
    assert set(bs["band"]) == {"VVb", "VHb"} and "hist" not in bs  # JRC: S1 series carry no histograms
    only = get(client, "/query/parcelTimeSeries", **FL, pid="7", tstype="bs", band="VHb").json()
    assert set(only["band"]) == {"VHb"} and len(only["band"]) == len(bs["band"]) // 2
    csv = get(client, "/query/parcelTimeSeries", **FL, pid="7", tsformat="csv", ref="True")
    table = pd.read_csv(io.StringIO(csv.text))
    assert csv.headers["content-type"].startswith("text/csv") and len(table) == len(s2["band"])
    assert (table["reference"] == table["obsid"]).all() and json.loads(table["hist"].iloc[0]) == s2["hist"][0]
    empty = get(client, "/query/parcelTimeSeries", **FL, pid="NO-SUCH-PARCEL").json()
    assert empty["date_part"] == [] and empty["band"] == []


def test_text_parcel_ids_map_to_the_member_state_codes(jrc):
    client, _ = jrc
    one = get(client, "/query/parcelByID", auth=BOB, **BE, pid=CODE, withGeometry="True").json()
    assert one["pid"] == [CODE] and one["cropname"] and isinstance(one["area"][0], int)
    assert get(client, "/query/parcelByID", auth=BOB, **BE, pid="1").json()["pid"] == []  # codes, not ints
    peers = get(client, "/query/parcelPeers", auth=BOB, **BE, pid=CODE, distance=5000, max=10000).json()
    assert all(p.startswith("BE18-") for p in peers["pids"]) and CODE not in peers["pids"]
    unknown = get(client, "/query/parcelPeers", auth=BOB, **BE, pid="BE18-NONE").json()
    assert unknown == {"pids": [], "distance": []}  # as JRC: empty columns, not 404
    for bad in ("it's", "a/b", "pärcel", "x" * 65, '"1"'):
        answer = get(client, "/query/parcelByID", auth=BOB, **BE, pid=bad)
        assert answer.status_code == 422 and "pid" in answer.json()["error"], bad


def test_peers_are_by_polygon_distance(jrc):
    client, result = jrc
    peers = get(client, "/query/parcelPeers", **FL, pid="7", distance=2000, max=10000).json()
    parcels = result.parcels.set_index("pid")
    target = parcels.geometry.loc[7]
    for pid, distance in zip(peers["pids"], peers["distance"], strict=True):
        assert distance == pytest.approx(parcels.geometry.loc[int(pid)].distance(target), abs=0.01)
    assert any(d < parcels.geometry.loc[int(p)].centroid.distance(target.centroid)
               for p, d in zip(peers["pids"], peers["distance"], strict=True))  # fmt: skip


def test_weather_from_agera5_csv_and_netcdf(jrc, tiles, tmp_path):
    client, _ = jrc
    reference = pd.read_csv(METEO / "agera5-2018.csv")
    weather = get(client, "/query/weatherTimeSeries", auth=BOB, **BE, pid=CODE).json()
    assert list(weather) == ["meteo_date", "tmin", "tmax", "tmean", "prec"]
    assert weather["meteo_date"] == reference["date"].tolist()
    np.testing.assert_allclose(weather["prec"], reference["prec"], atol=1e-4)
    from_csv = TestClient(
        create_app(load_server_config(write_jrc_server(tmp_path, tiles.template, "agera5-2018.csv")))
    )
    same = get(from_csv, "/query/weatherTimeSeries", auth=BOB, **BE, pid=CODE).json()
    np.testing.assert_allclose(same["tmax"], weather["tmax"], atol=1e-4)
    assert same["meteo_date"] == weather["meteo_date"]
    no_cell = get(client, "/query/weatherTimeSeries", **FL, pid="7")  # the grid does not reach Mol
    assert no_cell.status_code == 404 and "meteo cell" in no_cell.json()["error"]
    assert get(client, "/query/weatherTimeSeries", **BE, pid=CODE).status_code == 403  # ann: fl only


def test_backgrounds_from_a_tile_service(jrc, tiles):
    client, _ = jrc
    answer = get(client, "/query/backgroundByParcelID", **FL, pid="7", chipsize=128, extend=300, tms="Google")
    url = answer.text
    assert (
        answer.status_code == 200
        and url.startswith("http://testserver/signed/")
        and url.endswith("/google.tif")
    )
    served = tiles.served
    image = client.get(url.removeprefix("http://testserver"))  # no credentials, as the JRC client
    with rasterio.open(io.BytesIO(image.content)) as tif:
        assert (tif.count, tif.width, tif.height) == (3, 128, 128) and tif.crs.to_epsg() == 32631
        assert tif.tags()["attribution"] == "test tiles"
        pixels = tif.read()
        assert pixels[2].min() == 128 and pixels[:2].max() > 0  # the tile server's colours
    again = get(client, "/query/backgroundByLocation", **AT_DEMO, chipsize=128, extend=300, tms="google")
    assert again.status_code == 200 and tiles.served == served  # every tile came from the cache
    outside = get(client, "/query/backgroundByLocation", lon=12.5, lat=41.9, tms="google")
    assert outside.status_code == 404 and "no dataset" in outside.json()["error"]
    assert get(client, "/query/backgroundByParcelID", auth=BOB, **FL, pid="7").status_code == 403
    unknown = get(client, "/query/backgroundByParcelID", **FL, pid="7", tms="bing")
    assert unknown.status_code == 404 and "google" in unknown.json()["error"]
    huge = get(client, "/query/backgroundByParcelID", **FL, pid="7", chipsize=100_000)
    assert huge.status_code == 422
    widest = get(client, "/query/backgroundByParcelID", **FL, pid="7", chipsize=2048, extend=5000)
    assert widest.status_code == 200  # more tiles than max_tiles at full zoom: drawn from a coarser level


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # a PNG read from memory
def test_chips_for_a_season_and_jrc_scene_references(jrc):
    client, _ = jrc
    listed = get(client, "/query/rawChipByLocation", **AT_DEMO, start_date="2023-01-01",
                 end_date="2023-12-31", band="B04", onlylist="True").json()  # fmt: skip
    assert len(listed["dates"]) == 12 and "chips" not in listed and listed["dates"][0] == "20230402T000000"
    season = get(client, "/query/rawChipByLocation", **AT_DEMO, start_date="2023-01-01",
                 end_date="2023-12-31", band="B04", chipsize=200).json()  # fmt: skip
    assert len(season["chips"]) == 12 and all(c.startswith("/signed/") for c in season["chips"])
    safe = "S2A_MSIL2A_20230405T105031_N0509_R051_T31UFS_20230405T170000.SAFE"
    batch = {"lon": AT_DEMO["lon"], "lat": AT_DEMO["lat"], "tiles": [safe], "bands": ["B04", "B08"],
             "chipsize": 200}  # fmt: skip
    chips = client.post("/query/rawChipsBatch", json=batch, auth=ANN).json()
    assert chips["obsids"] == ["S2A_MSIL2A_20230405_T31UFS"] * 2 and chips["bands"] == ["B04", "B08"]
    wrong = client.post("/query/rawChipsBatch", json={**batch, "tiles": [safe.replace("T31UFS", "T32ULB")]},
                        auth=ANN)  # fmt: skip
    assert wrong.status_code == 404 and "T32ULB" in wrong.json()["error"]
    too_many = client.post("/query/rawChipsBatch", json={**batch, "tiles": [safe] * 250}, auth=ANN)
    assert too_many.status_code == 400 and "500" in too_many.json()["error"]  # 500 chips: a clear 400
    s1 = {
        "lon": AT_DEMO["lon"],
        "lat": AT_DEMO["lat"],
        "dates": ["2023-04-01", "2023-04-10"],
        "chipsize": 200,
    }
    radar = client.post("/query/rawS1ChipsBatch", json=s1, auth=ANN).json()
    assert set(radar["bands"]) == {"VV", "VH"} and set(radar["cards"]) == {"bs"} and len(radar["dates"]) == 6
    s1_safe = "S1A_IW_GRDH_1SDV_20230405T054012_20230405T054037_047949_05C2F4_9A1B.SAFE"
    by_reference = client.post("/query/rawChipsBatch", json={**batch, "tiles": [s1_safe], "bands": ["VV"]},
                               auth=ANN).json()  # fmt: skip
    assert by_reference["obsids"] == ["S1A_IW_GRDH_20230405"]
    assert (
        client.post("/query/rawS1ChipsBatch", json={**s1, "aoi": "fl", "year": 2023}, auth=BOB).status_code
        == 403
    )
    composite = get(client, "/query/chipsByParcelID", **FL, pid="7", start_date="2023-04-05",
                    end_date="2023-04-05", bands="B08_B04_B04", lut="2_98", chipsize=300).json()  # fmt: skip
    with rasterio.open(io.BytesIO(client.get(composite["chips"][0]).content)) as png:
        assert png.driver == "PNG" and png.count == 3 and png.read().max() == 255
    assert get(client, "/query/chipsByLocation", **AT_DEMO, start_date="2023-04-05", end_date="2023-04-05",
               lut="9_1").status_code == 400  # fmt: skip
    other = get(client, "/query/rawChipByParcelID", auth=BOB, **FL, pid="7", start_date="2023-04-05",
                end_date="2023-04-05")  # fmt: skip
    assert other.status_code == 403
    # without aoi (as the JRC client asks) a user finds only the datasets of their own aois
    days = {"start_date": "2023-04-05", "end_date": "2023-04-05"}
    for path in ("/query/rawChipByLocation", "/query/chipsByLocation"):
        blind = get(client, path, auth=BOB, **AT_DEMO, **days)
        assert blind.status_code == 404 and "chips" not in blind.json(), path
    blind_background = get(client, "/query/backgroundByLocation", auth=BOB, **AT_DEMO)
    assert blind_background.status_code == 404
    no_imagery = get(client, "/query/rawChipByParcelID", auth=BOB, **BE, pid=CODE, **days)
    assert no_imagery.status_code == 404 and "no scene catalogue" in no_imagery.json()["error"]


def test_info_and_markers(jrc):
    client, result = jrc
    info = get(client, "/query/info").json()
    assert set(info["aois"]) == {"fl"} and info["aois"]["fl"]["year"] == ["2023"]
    assert info["aois"]["fl"]["backgrounds"] == ["google"] and info["aois"]["fl"]["weather"] is True
    assert set(get(client, "/query/info", auth=ROOT_USER).json()["aois"]) == {"fl", "be"}
    markers = get(client, "/query/markers", **FL).json()
    assert list(markers) == ["foi_id", "marker", "marker_type", "date_start", "date_end", "duration_days",
                             "value_1", "value_2", "value_3", "practice"]  # fmt: skip
    events = result.results[result.results["events"] != "[]"]
    assert len(markers["foi_id"]) >= len(events) and set(markers["foi_id"]) == {str(p) for p in events["pid"]}
    assert get(client, "/query/markers", auth=BOB, **FL).status_code == 403


JRC_ROUTES = ("backgroundByLocation", "backgroundByParcelID", "weatherTimeSeries", "chipsByLocation",
              "chipsByParcelID", "rawS1ChipsBatch", "rawChipsBatch", "markers", "info", "parcelTimeSeries",
              "parcelPeers")  # fmt: skip


def test_jrc_routes_fuzzed_never_answer_5xx(jrc):
    client, _ = jrc
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    auth = {"Authorization": "Basic " + base64.b64encode(f"{ANN[0]}:{ANN[1]}".encode()).decode()}
    settings = hypothesis.settings(
        max_examples=12, deadline=None, suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate], database=None,
    )  # fmt: skip
    for operation in schema.get_all_operations():
        operation = operation.ok()
        if operation.path.rsplit("/", 1)[-1] not in JRC_ROUTES:
            continue

        @settings
        @hypothesis.given(case=operation.as_strategy())
        def fuzz(case):
            if isinstance(case.query, dict) and "aoi" not in case.query:
                case.query = {**case.query, "aoi": "fl", "year": 2023}
            response = case.call(headers=auth)
            assert response.status_code < 500, (case.path, case.query, case.body, response.text)

        fuzz()
