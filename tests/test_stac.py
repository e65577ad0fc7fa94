"""STAC API source against a real STAC API server (rustac serve) whose items point at COGs on moto S3."""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import shapely
from conftest import DEMO
from servers import ServerError, free_port, s3_client, upload_demo, wait_for_port

import sources.stac as stac
from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError, InputError
from cbm_core.pipeline import Engine
from cbm_core.plugins import load_plugins

pytestmark = pytest.mark.servers
BUCKET = "cbm-stac"
EARTH_SEARCH = {"B01": "coastal", "B04": "red", "B08": "nir", "B11": "swir16", "AOT": "aot", "SCL": "scl"}
NO_NIR = "S2B_MSIL2A_20230407_T31UFS"  # its item lacks the nir asset
SIGNATURE = {"value": "fresh"}  # what the test signer appends; "expired" is refused by the S3 proxy


def sign(href: str) -> str:
    """A signer as `sign = "test_stac:sign"` names it: appends the current signature."""
    return f"{href}?sig={SIGNATURE['value']}"


def demo_catalogue():
    local = PluginConfig("local", {"parcels": str(DEMO / "parcels.gpkg"), "scenes": str(DEMO / "scenes.csv")})
    return load_plugins(entry_points=False).caller("local", "cbm_source_catalogue", "t")(config=local)


def items(href_base: str) -> list[dict]:
    """STAC items for the demo scenes: S2 with Earth Search and CDSE asset keys, S1 with vv/vh."""
    out = []
    for i, scene in enumerate(demo_catalogue().itertuples()):
        s2 = scene.card == "s2"
        folder = "S2" if s2 else "S1"
        base = {
            "type": "Feature", "stac_version": "1.0.0", "id": scene.obsid,
            "geometry": json.loads(shapely.to_geojson(scene.geometry)),
            "bbox": list(scene.geometry.bounds),
            "properties": {"datetime": scene.obstime.isoformat(), "platform": scene.sensor,
                           "eo:cloud_cover": 10.0 * (i % 6), "sat:relative_orbit": 8},
            "links": [],
        }  # fmt: skip

        def asset(band: str, folder: str = folder, scene=scene) -> dict:
            ref = scene.bands[band]
            info = {"nodata": 0, "scale": ref.scale if ref.scale is not None else 1.0, "offset": 0.0}
            return {"href": f"{href_base}/flanders/{folder}/{scene.obsid}/{band}.tif",
                    "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                    "raster:bands": [info]}  # fmt: skip

        if s2:
            keys = {
                k: asset(b) for b, k in EARTH_SEARCH.items() if not (scene.obsid == NO_NIR and k == "nir")
            }
            out.append({**base, "collection": "sentinel-2-l2a", "assets": keys})
            cdse = {f"{b}_{10 if b in ('B04', 'B08', 'AOT') else 20}m": asset(b) for b in EARTH_SEARCH}
            out.append({**base, "id": scene.obsid + "_cdse", "collection": "cdse-l2a", "assets": cdse})
        else:
            state = scene.orbit if isinstance(scene.orbit, str) else None  # NaN is not JSON
            out.append({**base, "collection": "sentinel-1-grd",
                        "properties": {**base["properties"], "sat:orbit_state": state},
                        "assets": {"vv": asset("VV"), "vh": asset("VH")}})  # fmt: skip
    return out


class RustacServer:
    """`rustac serve` (a STAC API server in Rust, in-memory backend) loaded with an item file."""

    def __init__(self, item_file: Path) -> None:
        self.item_file, self.port, self.process = item_file, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RustacServer:
        binary = shutil.which("rustac") or str(Path(sys.executable).with_name("rustac"))
        if not Path(binary).exists():
            raise ServerError("rustac not found: pip install rustac")
        self.process = subprocess.Popen(
            [binary, "serve", str(self.item_file), "--create-collections", "-a", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.port, process=self.process)
        except ServerError as exc:
            raise ServerError(
                f"{exc}: {self.process.stderr.read().decode(errors='replace')[-2000:]}"
            ) from None
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # rustac may ignore SIGTERM while a request is open
                self.process.kill()
                self.process.wait(timeout=10)


class ApiFaults:
    """An HTTP proxy in front of the STAC API: ``mode`` pass, hang (answers nothing for 30 s),
    loop (every search page's next link points at that same page) or auth (wants Bearer good)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.port, self.mode, self._server = upstream_port, free_port(), "pass", None
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiFaults:
        faults = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                faults.requests += 1
                if faults.mode == "hang" and "search" in self.path:
                    time.sleep(30)
                    return
                if faults.mode == "auth" and self.headers.get("Authorization") != "Bearer good":
                    self._send(401, b'{"code": "Unauthorized", "description": "token expired"}')
                    return
                conn = http.client.HTTPConnection("127.0.0.1", faults.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read().replace(
                    f"127.0.0.1:{faults.upstream_port}".encode(), f"127.0.0.1:{faults.port}".encode()
                )
                if faults.mode == "loop" and "search" in self.path and response.status == 200:
                    page = json.loads(data)
                    for link in page.get("links", []):
                        if link.get("rel") == "next":
                            link["href"] = f"{faults.url}{self.path}"
                            if self.command == "POST":
                                link["method"], link["body"] = "POST", json.loads(body or b"{}")
                    data = json.dumps(page).encode()
                self._send(response.status, data)
                conn.close()

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture(scope="module")
def api(moto, tmp_path_factory):
    upload_demo(s3_client(moto.endpoint), BUCKET)
    folder = tmp_path_factory.mktemp("stac")
    (folder / "items.json").write_text(
        json.dumps({"type": "FeatureCollection", "features": items(f"s3://{BUCKET}")})
    )
    server = RustacServer(folder / "items.json").start()
    yield server
    server.stop()


@pytest.fixture
def faults(api):
    proxy = ApiFaults(api.port).start()
    yield proxy
    proxy.stop()


def cfg(url: str, moto, **options) -> PluginConfig:
    base = {"url": url, "parcels": str(DEMO / "parcels.gpkg"), "endpoint_url": moto.endpoint, "timeout": 5,
            "access_key_id": "testing", "secret_access_key": "testing", "page_size": 4}  # fmt: skip
    return PluginConfig("stac", base | options, DEMO, "[source]")


def extract(source: PluginConfig, catalogue, card="s2", bands=("B04", "B08", "SCL")):
    engine = Engine(plugins=load_plugins(entry_points=False), progress=False)
    parcels = engine.parcels(PluginConfig("local", {"parcels": str(DEMO / "parcels.gpkg")}))
    plugin = "s2_l2a" if card == "s2" else "s1"
    job = PluginConfig(plugin, {"card": card, "bands": list(bands), "cache_dir": False}, DEMO, "[[extract]]")
    return engine.extract(parcels, catalogue, [job], source)


def tidy(signatures) -> pd.DataFrame:
    stats = signatures.stats.assign(obsid=signatures.stats["obsid"].str.removesuffix("_cdse"))
    return stats.sort_values(["obsid", "pid", "band"], ignore_index=True)


def test_search_by_collection_bbox_dates_and_cloud_cover(api, moto):
    catalogue = stac.cbm_source_catalogue(cfg(api.url, moto, start="2023-04-01", end="2023-04-15"))
    reference = demo_catalogue()
    want = reference[(reference["card"] == "s2") & (reference["obstime"] <= "2023-04-15T23:59:59Z")]
    assert catalogue["obsid"].tolist() == want["obsid"].tolist()  # 4 items a page: paging followed
    assert set(catalogue["card"]) == {"s2"} and set(catalogue["orbit"]) == {"R008"}
    first = catalogue["bands"].iloc[0]
    assert first["B04"].uri.endswith("/B04.tif") and (first["B04"].scale, first["B04"].nodata) == (
        0.0001,
        0.0,
    )
    clear = stac.cbm_source_catalogue(cfg(api.url, moto, max_cloud_cover=20))
    assert 0 < len(clear) < len(reference[reference["card"] == "s2"])
    far = stac.cbm_source_catalogue(cfg(api.url, moto, bbox=[10.0, 45.0, 10.1, 45.1]))
    assert far.empty
    s1 = stac.cbm_source_catalogue(cfg(api.url, moto, profile="earth-search-s1"))
    assert len(s1) == 10 and set(s1["card"]) == {"bs"} and sorted(s1["bands"].iloc[0]) == ["VH", "VV"]


def test_signatures_equal_the_local_geotiffs_for_every_profile(api, moto):
    reference = demo_catalogue()
    want, _ = extract(PluginConfig("local"), reference[reference["card"] == "s2"])
    for options in (
        {"profile": "earth-search-s2"},
        {"profile": "cdse-s2", "collections": ["cdse-l2a"]},
        {"profile": "custom", "card": "s2", "collections": ["sentinel-2-l2a"],
         "assets": {"B04": "red", "B08": ["B08_10m", "nir"], "SCL": "scl"}},
    ):  # fmt: skip
        source = cfg(api.url, moto, **options)
        got, report = extract(source, stac.cbm_source_catalogue(source))
        failed = {k: v for k, v in report.failed.items() if not k.startswith(NO_NIR)}
        assert not failed, options
        mask = ~want.stats["obsid"].str.startswith(NO_NIR)
        expected = want.stats[mask].sort_values(["obsid", "pid", "band"], ignore_index=True)
        got_tidy = tidy(got)
        if options["profile"] == "cdse-s2":
            got_tidy = got_tidy[~got_tidy["obsid"].str.startswith(NO_NIR)].reset_index(drop=True)
        pd.testing.assert_frame_equal(got_tidy, expected, check_exact=True)  # same bytes, same bits
    s1 = cfg(api.url, moto, profile="earth-search-s1")
    got, report = extract(s1, stac.cbm_source_catalogue(s1), card="bs", bands=("VV", "VH"))
    want, _ = extract(
        PluginConfig("local"), reference[reference["card"] == "bs"], card="bs", bands=("VV", "VH")
    )
    assert not report.failed
    pd.testing.assert_frame_equal(tidy(got), tidy(want), check_exact=True)


def test_item_without_the_asset_fails_its_scene_only(api, moto):
    source = cfg(api.url, moto)
    signatures, report = extract(source, stac.cbm_source_catalogue(source))
    assert list(report.failed) == [NO_NIR]
    assert (
        f"item {NO_NIR} (collection sentinel-2-l2a) has no asset 'nir' for band B08" in report.failed[NO_NIR]
    )
    assert len(report.extracted) == 11 and len(signatures.stats) == 11 * 18 * 2


def test_bad_configuration_is_refused(api, moto):
    with pytest.raises(ConfigError, match="unknown option"):
        stac.cbm_source_catalogue(cfg(api.url, moto, colections=["x"]))
    with pytest.raises(ConfigError, match="unknown profile 'earth'"):
        stac.cbm_source_catalogue(cfg(api.url, moto, profile="earth"))
    with pytest.raises(ConfigError, match="profile 'custom' needs"):
        stac.cbm_source_catalogue(cfg(api.url, moto, profile="custom", collections=["x"], card="s2"))


def test_api_that_times_out_is_named(faults, moto):
    faults.mode = "hang"
    started = time.perf_counter()
    with pytest.raises(InputError, match=rf"{faults.url}: search failed on page 1 \(timed out"):
        stac.cbm_source_catalogue(cfg(faults.url, moto, timeout=1, retries=0))
    assert time.perf_counter() - started < 20


def test_api_that_pages_forever_is_cut_off(faults, moto, caplog):
    faults.mode = "loop"
    with caplog.at_level(logging.WARNING, logger="cbm.source.stac"):
        catalogue = stac.cbm_source_catalogue(cfg(faults.url, moto))
    assert len(catalogue) == 4  # the first page, once
    assert "page 2 repeats items already read" in caplog.text
    faults.mode = "pass"
    with caplog.at_level(logging.WARNING, logger="cbm.source.stac"):
        capped = stac.cbm_source_catalogue(cfg(faults.url, moto, max_items=5))
    assert len(capped) == 5 and "more than max_items = 5" in caplog.text


def test_expired_tokens_are_named(faults, moto, s3_proxy, monkeypatch):
    faults.mode = "auth"
    monkeypatch.setenv("CBM_TEST_TOKEN", "expired")
    with pytest.raises(InputError, match="token missing or expired"):
        stac.cbm_source_catalogue(cfg(faults.url, moto, token_env="CBM_TEST_TOKEN"))
    monkeypatch.setenv("CBM_TEST_TOKEN", "good")  # refreshed: read at each request
    source = cfg(faults.url, moto, token_env="CBM_TEST_TOKEN", sign="test_stac:sign",
                 start="2023-04-01", end="2023-04-05")  # fmt: skip
    catalogue = stac.cbm_source_catalogue(source)
    over_http = f"{s3_proxy.endpoint}/{BUCKET}"
    http_assets = catalogue.assign(bands=[
        {b: replace(r, uri=r.uri.replace(f"s3://{BUCKET}", over_http)) for b, r in bands.items()}
        for bands in catalogue["bands"]
    ])  # fmt: skip
    s3_proxy.denied = ("sig=expired",)
    SIGNATURE["value"] = "fresh"
    first = http_assets.iloc[:1]
    _, report = extract(source, first)
    assert not report.failed
    SIGNATURE["value"] = "expired"
    _, report = extract(source, http_assets.iloc[1:])
    obsid = http_assets["obsid"].iloc[1]
    assert (
        list(report.failed) == [obsid]
        and "access denied (token or signed URL expired?)" in report.failed[obsid]
    )


def test_same_pixels_give_the_same_signatures_from_every_source(api, moto, tmp_path):
    """One scene's pixels as a local GeoTIFF, a COG on S3, a JPEG2000 in a SAFE product (baseline
    03.00: the same DNs and arithmetic) and a STAC-found asset: the same signatures, bit for bit."""
    from safe_fixture import build_product

    obsid, bands = "S2A_MSIL2A_20230405_T31UFS", ("B04", "B08", "B11", "SCL")
    build_product(DEMO / "S2" / obsid, tmp_path, "0300", eodata=False)
    remote = {"endpoint_url": moto.endpoint, "access_key_id": "testing", "secret_access_key": "testing"}
    sources = {
        "geotiff": PluginConfig("local", {"scenes": str(DEMO / "scenes.csv")}, DEMO, "[source]"),
        "cog_on_s3": PluginConfig(
            "s3", {"bucket": BUCKET, "prefix": "flanders/", "scenes": "scenes.csv", **remote}
        ),
        "jp2_in_safe": PluginConfig("safe", {"root": str(tmp_path)}, DEMO, "[source]"),
        "stac": cfg(api.url, moto),
    }
    engine = Engine(plugins=load_plugins(entry_points=False), progress=False)
    results = {}
    for name, source in sources.items():
        catalogue = engine.catalogue(source)
        one = catalogue[catalogue["obsid"].str.startswith(obsid[:19]) & (catalogue["card"] == "s2")]
        assert len(one) == 1, name
        signatures, report = extract(source, one, bands=bands)
        assert not report.failed, (name, report.failed)
        results[name] = (
            signatures.stats.drop(columns="obsid").sort_values(["pid", "band"], ignore_index=True),
            signatures.scl.drop(columns="obsid").sort_values("pid", ignore_index=True),
        )
    stats, scl = results.pop("geotiff")
    assert len(stats) == 18 * 3 and len(scl) == 18
    for name, (other_stats, other_scl) in results.items():
        pd.testing.assert_frame_equal(other_stats, stats, check_exact=True, obj=name)
        pd.testing.assert_frame_equal(other_scl, scl, check_exact=True, obj=name)
