"""The workbench in a real browser (headless Debian Chromium driven by Selenium, WebGL switched off):
the static export opened from disk and the page `cbm serve` serves under uvicorn. The map draws the
parcels in their light's colour, a click shows the parcel's series and chips, filters change the
list, the keyboard walks the flagged parcels, a user of another aoi sees nothing, and missing data
or a missing background service is said in place."""

from __future__ import annotations

import base64
import dataclasses
import io
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import requests
import shapely
from click.testing import CliRunner
from conftest import DEMO
from matplotlib.image import imread
from servers import CbmServer

from cbm_core.api import run
from cbm_core.cli import cli
from cbm_plugins.analyst._plots import open_run
from cbm_plugins.serve._users import make_user, write_users
from cbm_plugins.workbench._data import TILE_EXTENT, TILE_ZOOM, WORLD, Workbench
from cbm_plugins.workbench._export import export

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PASSWORD = "correct horse"
OUTSIDE = 99  # a parcel 5 km east of the imagery: no observations, no chips
YELLOW = np.array([0xF2, 0xA9, 0x00]) / 255
GREEN = np.array([0x2E, 0x7D, 0x32]) / 255


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo (S2 + S1, ndvi-drop) run once, with one extra parcel outside every scene."""
    folder = tmp_path_factory.mktemp("workbench")
    parcels = gpd.read_file(DEMO / "parcels.gpkg", layer="parcels")
    far = shapely.box(649000, 5676000, 649100, 5676100)
    extra = gpd.GeoDataFrame({"pid": [OUTSIDE], "crop_name": ["grass"]}, geometry=[far], crs=parcels.crs)
    pd.concat([parcels, extra], ignore_index=True).to_file(folder / "parcels.gpkg", layer="parcels")
    config = folder / "run.toml"
    config.write_text(
        '[run]\nout = "out"\n'
        # the ndvi-drop recipe with thin cirrus accepted: 7 green parcels with an event, 12 yellow
        '[[marker]]\nplugin = "ndvi_drop"\nmin_drop = 0.1\nmin_valid = 3\n'
        "[validity]\nunusable_classes = [0, 1, 3, 8, 9, 11]\nmax_haze = false\ndip = false\n"
        '[rule]\nplugin = "traffic_light"\nmarkers.ndvi_drop = { expect = "event", min_confidence = 0.5 }\n'
        f'[source]\nplugin = "local"\nparcels = "{folder / "parcels.gpkg"}"\ncrop_name_column = "crop_name"\n'
        f'scenes = "{DEMO / "scenes.csv"}"\n'
        '[[extract]]\nplugin = "zonal"\ncard = "s2"\nbands = ["B04", "B08", "B11", "SCL"]\n'
        '[[extract]]\nplugin = "zonal"\ncard = "bs"\nbands = ["VV", "VH"]\n'
        '[analyst]\northophoto = "http://127.0.0.1:9/ortho/{z}/{x}/{y}.png"\n'  # a service that is not there
    )
    run(config, progress=False)
    return config


@pytest.fixture(scope="module")
def exported(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "wb"
    done = export(demo, out)
    assert done["parcels"] == 19 and done["chips"] == len(open_run(demo).verdicts.query("light != 'green'"))
    return out


@pytest.fixture(scope="module")
def server(demo: Path) -> Iterator[CbmServer]:
    folder = demo.parent
    config = folder / "server.toml"
    config.write_text(
        '[server]\nusers = "users.json"\nchip_dir = "chips"\n'
        '[[dataset]]\naoi = "fl"\nyear = 2023\n'
        'results = "out/markers.parquet"\nverdicts = "out/verdicts.csv"\n'
        f'source = {{ plugin = "local", parcels = "{folder / "parcels.gpkg"}",'
        ' crop_name_column = "crop_name",'
        f' scenes = "{DEMO / "scenes.csv"}" }}\n'
        'store = { plugin = "parquet", path = "out/signatures" }\n'
    )
    write_users(
        folder / "users.json",
        {"ann": make_user("ann", PASSWORD, ["fl"]), "bob": make_user("bob", PASSWORD, ["nl"])},
    )
    started = CbmServer(config).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium without WebGL: the map must draw on a 2-D canvas."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail(
            "chromium is not installed: apt-get install chromium chromium-driver (scripts/test.sh does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-webgl", "--disable-3d-apis",
        "--window-size=1400,900", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking",
    ):  # fmt: skip
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=webdriver.ChromeService(driver), options=options)
    chrome.execute_cdp_cmd("Network.enable", {})
    yield chrome
    chrome.quit()


def login(browser: webdriver.Chrome, user: str | None) -> None:
    """Send HTTP basic credentials with every request of the page (as a browser does once asked)."""
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})


def open_page(browser: webdriver.Chrome, url: str) -> None:
    browser.get("about:blank")
    browser.get(url)
    wait(browser, "return window.CBM && (CBM.ready || CBM.error)", "the map never finished drawing")
    error = browser.execute_script("return CBM.error")
    assert not error, error


def wait(browser: webdriver.Chrome, script: str, message: str, timeout: float = 30) -> object:
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda b: b.execute_script(script))
    except TimeoutException:
        raise AssertionError(
            f"{message} ({browser.execute_script('return document.body.innerText')[:400]})"
        ) from None


def tiles_drawn(browser: webdriver.Chrome) -> None:
    """Wait until every parcel and background tile of the view is drawn."""
    time.sleep(0.3)
    wait(
        browser,
        "return document.querySelector('.parcel-tile') && !document.querySelector("
        "'.parcel-tile:not(.leaflet-tile-loaded), img.leaflet-tile:not(.leaflet-tile-loaded)')",
        "tiles did not load",
    )


def screenshot(browser: webdriver.Chrome, element: str = "#map") -> np.ndarray:
    png = browser.find_element("css selector", element).screenshot_as_png
    return imread(io.BytesIO(png))[..., :3]


def share_near(pixels: np.ndarray, colour: np.ndarray, tolerance: float = 0.12) -> float:
    return float((np.abs(pixels - colour).max(axis=2) < tolerance).mean())


def click_parcel(browser: webdriver.Chrome, pid: int) -> None:
    """A real mouse click on the parcel's inner point on the map."""
    x, y = browser.execute_script(
        "const r = CBM.rowOf(arguments[0]);"
        "CBM.map.setView([CBM.index.lat[r], CBM.index.lon[r]], 17, {animate: false});"
        "const p = CBM.map.latLngToContainerPoint([CBM.index.lat[r], CBM.index.lon[r]]); return [p.x, p.y];",
        pid,
    )
    map_element = browser.find_element("css selector", "#map")
    size = map_element.size
    tiles_drawn(browser)
    ActionChains(browser).move_to_element_with_offset(
        map_element, int(x - size["width"] / 2), int(y - size["height"] / 2)
    ).click().perform()


def list_pids(browser: webdriver.Chrome) -> list[int]:
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#list li[data-row]')]"
        ".map(li => CBM.index.pid[+li.dataset.row])"
    )
    return [int(r) for r in rows]


# Data formats ----------------------------------------------------------------------------------------


def test_index_and_tiles_are_compact_and_decode_to_the_parcels(demo: Path) -> None:
    bench = Workbench(open_run(demo))
    data = bench.index_bytes()
    n = struct.unpack_from("<I", data)[0]
    assert n == 19 and len(data) == 4 + n * 19  # 19 bytes a parcel
    pids = np.frombuffer(data, "<i4", n, 4)
    assert list(pids) == sorted(bench.parcels["pid"])
    lights = np.frombuffer(data, "u1", n, 4 + n * 18)
    assert [bench.parcels["light"].iloc[i] for i in range(n)] == [
        ("", "green", "yellow", "red")[v] for v in lights
    ]
    (x, y), rows = next(iter(bench.tile_members().items()))
    blob = bench.tile_bytes(x, y)
    count = struct.unpack_from("<I", blob)[0]
    assert count == len(rows)
    row, _ = struct.unpack_from("<IH", blob, 4)
    points = struct.unpack_from("<H", blob, 10)[0]
    q = np.frombuffer(blob, "<i2", 2 * points, 12).reshape(-1, 2).astype(float)
    size = WORLD / 2**TILE_ZOOM
    mercator = np.c_[
        x * size - WORLD / 2 + q[:, 0] * size / TILE_EXTENT,
        WORLD / 2 - y * size - q[:, 1] * size / TILE_EXTENT,
    ]
    ring = shapely.Polygon(mercator)
    truth = bench.parcels.geometry.iloc[row]
    assert ring.symmetric_difference(truth).area < 0.02 * truth.area  # quantised and simplified, not moved


def test_panel_data_tells_valid_from_rejected_and_names_missing_data(demo: Path) -> None:
    bench = Workbench(open_run(demo))
    panels = bench.panels([4, OUTSIDE])
    s2 = panels[4]["s2"]
    assert len(s2["dates"]) == 12 and sum(s2["valid"]) == 3 and sum(s2["used"]) == 3
    assert s2["why"][0].startswith("SCL") and s2["why"][-1] == ""  # 04-02 cloudy, 04-30 valid
    assert panels[4]["markers"][0]["events"][0]["main"] == "2023-04-30"
    assert len(panels[4]["bs"]["VV"]) == 10 and panels[4]["peers"]["count"] >= 17
    assert panels[OUTSIDE]["notes"] == ["No observations of this parcel in the signature store."]
    assert panels[OUTSIDE]["s2"]["dates"] == []
    preloaded = Workbench(bench.run)
    preloaded.preload()  # what an export does: every series read and screened at once
    assert preloaded.panels([4, OUTSIDE]) == panels


# The export, opened from disk ------------------------------------------------------------------------


def test_export_draws_parcels_in_their_colours_without_webgl(browser, exported: Path) -> None:
    open_page(browser, (exported / "index.html").as_uri())
    assert browser.execute_script("return !document.createElement('canvas').getContext('webgl')")
    drawn = browser.execute_script("return CBM.drawn")
    assert drawn["yellow"] > 0 and drawn["green"] > 0
    browser.find_element("css selector", "#f-lights input[value=green]").click()  # green drawn in full too
    browser.execute_script(
        "const r = CBM.rowOf(8); CBM.map.setView([CBM.index.lat[r], CBM.index.lon[r]], 16, {animate: false})"
    )
    tiles_drawn(browser)
    pixels = screenshot(browser)
    assert pixels.std() > 0.08, "the map is blank"
    assert share_near(pixels, YELLOW) > 0.002, "no yellow parcel outline on the map"
    assert share_near(pixels, GREEN) > 0.002, "no green parcel outline on the map"


def test_clicking_a_parcel_shows_its_series_and_chips(browser, exported: Path) -> None:
    open_page(browser, (exported / "index.html").as_uri())
    click_parcel(browser, 4)
    wait(browser, "return CBM.panelPid === 4", "the panel did not open on parcel 4")
    panel = browser.find_element("css selector", "#panel")
    assert "Parcel 4" in panel.text and "GREEN" in panel.text and "ndvi_drop" in panel.text
    assert len(panel.find_elements("css selector", "svg.series circle.valid")) == 3
    assert len(panel.find_elements("css selector", "svg.series path.rejected")) == 9
    assert len(panel.find_elements("css selector", "svg.series line.event")) == 2  # one per panel
    assert "No chip calendar in this export for parcel 4" in panel.text  # green: not exported
    assert browser.execute_script("return location.hash") == "#pid=4"
    click_parcel(browser, 8)  # flagged (yellow): its calendar was exported
    wait(browser, "return CBM.panelPid === 8", "the panel did not open on parcel 8")
    wait(
        browser,
        "const i = document.querySelector('.chips img'); return i && i.complete && i.naturalWidth > 0",
        "no chips",
    )
    chips = screenshot(browser, ".chips img")
    assert chips.std() > 0.05


def test_filters_change_the_list_and_the_keyboard_walks_it(browser, exported: Path) -> None:
    open_page(browser, (exported / "index.html").as_uri())
    flagged = list_pids(browser)
    assert flagged and OUTSIDE in flagged and 4 not in flagged  # red first, green off by default
    browser.find_element("css selector", "#f-lights input[value=green]").click()
    assert len(list_pids(browser)) == 19
    reason = browser.find_element("css selector", "#f-reason")
    reason.send_keys("0 valid")
    narrowed = list_pids(browser)
    assert narrowed == [OUTSIDE]  # its reason: 0 valid Sentinel-2 observation(s)
    reason.clear()
    reason.send_keys("x")
    reason.clear()
    browser.execute_script(
        "const s = document.getElementById('f-crop'); s.value = 'grass'; s.dispatchEvent(new Event('change'))"
    )
    assert list_pids(browser) == [OUTSIDE]
    browser.execute_script(
        "const s = document.getElementById('f-crop'); s.value = ''; s.dispatchEvent(new Event('change'))"
    )
    walk = list_pids(browser)
    body = browser.find_element("css selector", "body")
    body.send_keys("n")
    wait(browser, f"return CBM.panelPid === {walk[0]}", "n did not open the first parcel")
    body.send_keys("n")
    wait(browser, f"return CBM.panelPid === {walk[1]}", "n did not open the next parcel")
    body.send_keys("p")
    wait(browser, f"return CBM.panelPid === {walk[0]}", "p did not go back")


def test_a_parcel_url_opens_its_panel_and_missing_data_says_so(browser, exported: Path) -> None:
    open_page(browser, (exported / "index.html").as_uri() + f"#pid={OUTSIDE}")
    wait(browser, f"return CBM.panelPid === {OUTSIDE}", "the link did not open the parcel")
    text = browser.find_element("css selector", "#panel").text
    assert "No observations of this parcel in the signature store." in text
    assert "No observations of this parcel to plot." in text


def test_a_missing_background_service_says_so_in_place(browser, exported: Path) -> None:
    open_page(browser, (exported / "index.html").as_uri())
    browser.execute_script(
        "CBM.map.eachLayer(l => l instanceof L.TileLayer && CBM.map.removeLayer(l));"
        "CBM.layers['Orthophoto'].addTo(CBM.map)"
    )
    wait(
        browser,
        "const m = document.querySelector('.map-message'); return m && /not available/.test(m.textContent)",
        "no message",
    )


def test_a_run_without_flagged_parcel_says_so(demo: Path, tmp_path: Path, browser) -> None:
    done = open_run(demo)
    calm = dataclasses.replace(done, verdicts=done.verdicts.assign(light="green", reasons="all fine"))
    export(calm, tmp_path / "calm", chips="none", background_tiles=False)
    open_page(browser, (tmp_path / "calm" / "index.html").as_uri())
    assert "No red or yellow parcel in this run" in browser.find_element("css selector", "#count").text
    assert list_pids(browser) == []


def test_cli_export_and_help(demo: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(
        cli,
        [
            "workbench",
            "export",
            str(demo.parent / "out"),
            str(tmp_path / "wb"),
            "--chips",
            "none",
            "--no-backgrounds",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "19 parcels" in out.output and (tmp_path / "wb" / "index.html").is_file()
    assert "opens from disk" in runner.invoke(cli, ["workbench", "--help"]).output
    bad = runner.invoke(cli, ["workbench", "export", str(tmp_path), str(tmp_path / "x")])
    assert bad.exit_code != 0 and "no summary.json" in bad.output


# Served by `cbm serve` ------------------------------------------------------------------------------


def test_served_workbench_draws_and_opens_a_parcel_with_server_rendered_chips(
    browser, server: CbmServer
) -> None:
    login(browser, "ann")
    open_page(browser, f"{server.url}/workbench/fl/2023/")
    assert browser.execute_script("return CBM.drawn.yellow") > 0
    click_parcel(browser, 8)
    wait(browser, "return CBM.panelPid === 8", "the panel did not open")
    assert len(browser.find_elements("css selector", "#panel svg.series circle.obs")) > 5
    wait(
        browser,
        "const i = document.querySelector('.chips img'); return i && i.complete && i.naturalWidth > 0",
        "no chips",
        60,
    )
    pixels = screenshot(browser)
    assert pixels.std() > 0.08
    tile = requests.get(
        f"{server.url}/workbench/fl/2023/data/bg/s2-false/S2A_MSIL2A_20230415_T31UFS/15/16844/10939.png",
        auth=("ann", PASSWORD),
        timeout=30,
    )
    assert tile.status_code == 200 and tile.content.startswith(b"\x89PNG")
    meta = requests.get(
        f"{server.url}/workbench/fl/2023/data/meta", auth=("ann", PASSWORD), timeout=30
    ).json()
    assert "Orthophoto" in [b["name"] for b in meta["backgrounds"]]  # the run's [analyst] table is served


def test_a_user_of_another_aoi_sees_nothing(browser, server: CbmServer) -> None:
    for path in (
        "",
        "data/meta",
        "data/index",
        f"data/tiles/{TILE_ZOOM}/8421/5467",
        "data/parcel/4",
        "data/chips/4.png",
    ):
        answer = requests.get(f"{server.url}/workbench/fl/2023/{path}", auth=("bob", PASSWORD), timeout=30)
        assert answer.status_code == 403, path
        assert requests.get(f"{server.url}/workbench/fl/2023/{path}", timeout=30).status_code == 401, path
    listing = requests.get(f"{server.url}/workbench/", auth=("bob", PASSWORD), timeout=30)
    assert listing.status_code == 200 and "No dataset you may read" in listing.text
    login(browser, "bob")
    browser.get(f"{server.url}/workbench/fl/2023/")
    time.sleep(0.5)
    assert "may not read" in browser.find_element("css selector", "body").text
    assert not browser.find_elements("css selector", "canvas.parcel-tile")


def test_the_panel_shows_weather_when_the_run_names_a_source(demo: Path, tmp_path: Path, browser) -> None:
    """[analyst] meteo (the real 2018 West-Flanders AgERA5 days placed on the demo's April 2023)."""
    real = pd.read_csv(Path(__file__).parent / "data" / "flanders-meteo" / "agera5-2018.csv")
    april = real[real["date"].str.startswith("2018-04")].assign(
        lon=5.05, lat=51.2, date=lambda f: f["date"].str.replace("2018", "2023")
    )
    april.to_csv(tmp_path / "meteo.csv", index=False)
    config = demo.with_name("run-meteo.toml")
    text = demo.read_text().replace(
        "[analyst]\n", f'[analyst]\nmeteo = {{ plugin = "meteo", path = "{tmp_path / "meteo.csv"}" }}\n'
    )
    config.write_text(text)
    bench = Workbench(open_run(config))
    panels = bench.panels([4, OUTSIDE])
    first, last = bench.run.period()
    shown = april[(april["date"] >= f"{first:%Y-%m-%d}") & (april["date"] <= f"{last:%Y-%m-%d}")]
    assert panels[4]["weather"]["dates"] == list(shown["date"])
    np.testing.assert_allclose(panels[4]["weather"]["prec"], shown["prec"])
    assert panels[OUTSIDE]["weather"]["dates"] == []  # outside the cells: none, never a neighbour's
    export(config, tmp_path / "wb", chips="none", background_tiles=False)
    open_page(browser, (tmp_path / "wb" / "index.html").as_uri() + "#pid=4")
    wait(browser, "return CBM.panelPid === 4", "the link did not open the parcel")
    rain = browser.find_elements("css selector", "#panel svg.series rect.rain")
    assert len(rain) == int((shown["prec"] > 0).sum()) > 0
    assert browser.find_elements("css selector", "#panel svg.series polyline.temperature")


def test_a_raster_orthophoto_gives_map_tiles_and_the_report_map_background(
    demo: Path, tmp_path: Path
) -> None:
    import rasterio
    from rasterio.transform import from_origin

    from cbm_plugins.analyst._report import _location_map
    from cbm_plugins.workbench._data import tile_key
    from cbm_plugins.workbench._tiles import render_tile

    ortho = tmp_path / "ortho.tif"
    parcel = open_run(demo).parcel(4).geometry
    x0, _, _, y1 = parcel.buffer(600).bounds
    pixels = np.zeros((3, 600, 600), dtype="uint8")
    pixels[0], pixels[1, :300], pixels[2, :, :300] = 200, 150, 90  # a pattern, not a blank
    profile = {
        "driver": "GTiff",
        "width": 600,
        "height": 600,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32631",
    }
    with rasterio.open(ortho, "w", transform=from_origin(x0, y1, 2.0, 2.0), **profile) as dst:
        dst.write(pixels)
    config = demo.with_name("run-ortho.toml")
    config.write_text(demo.read_text().replace("http://127.0.0.1:9/ortho/{z}/{x}/{y}.png", str(ortho)))
    done = open_run(config)
    centre = gpd.GeoSeries([parcel.centroid], crs=done.parcels.crs).to_crs(4326).iloc[0]
    x, y = tile_key(centre.x, centre.y, 16)
    image = imread(io.BytesIO(render_tile(done, "ortho", "ortho", 16, x, y)))
    assert image.shape == (256, 256, 4) and image[..., 3].min() == 1.0  # opaque over the orthophoto
    assert abs(float(image[128, 128, 0]) - 200 / 255) < 0.02
    words = " ".join(t.get_text() for t in _location_map(done, 4).findobj(lambda a: hasattr(a, "get_text")))
    assert "background: orthophoto" in words
