"""S3 source against moto's S3 server, through a proxy that counts bytes and injects faults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from conftest import DEMO
from rasterio.transform import from_origin
from servers import band_rows, s3_client, upload_demo

import sources.s3 as s3
from cbm_core.config import PluginConfig
from cbm_core.errors import InputError
from cbm_core.model import BandRef
from cbm_core.plugins import load_plugins

pytestmark = pytest.mark.servers
BUCKET = "cbm-imagery"
BOUNDS = (643400.0, 5676000.0, 643600.0, 5676200.0)


@pytest.fixture(scope="module")
def bucket(moto):
    upload_demo(s3_client(moto.endpoint), BUCKET)
    return BUCKET


def config(proxy, **options) -> PluginConfig:
    base = {"bucket": BUCKET, "endpoint_url": proxy.endpoint, "access_key_id": "testing",
            "secret_access_key": "testing", "retries": 5}  # fmt: skip
    return PluginConfig("s3", base | options, Path("."), "[source]")


@pytest.fixture(scope="module")
def local_catalogue():
    local = PluginConfig("local", {"parcels": str(DEMO / "parcels.gpkg"), "scenes": str(DEMO / "scenes.csv")})
    return load_plugins(entry_points=False).caller("local", "cbm_source_catalogue", "test")(config=local)


def same_scenes(catalogue, reference) -> None:
    reference = reference[reference["obsid"].isin(catalogue["obsid"])].reset_index(drop=True)
    assert catalogue["obsid"].tolist() == reference["obsid"].tolist()
    assert catalogue["obstime"].tolist() == reference["obstime"].tolist()
    assert catalogue["card"].tolist() == reference["card"].tolist()
    assert [sorted(b) for b in catalogue["bands"]] == [sorted(b) for b in reference["bands"]]
    assert catalogue.geometry.intersects(reference.geometry.centroid).all()


def test_catalogue_from_listing_csv_and_stac(bucket, s3_proxy, local_catalogue):
    s2 = s3.cbm_source_catalogue(config(s3_proxy, prefix="flanders/S2/"))
    s1 = s3.cbm_source_catalogue(config(s3_proxy, prefix="flanders/S1"))
    assert len(s2) == 12 and len(s1) == 10
    same_scenes(s2, local_catalogue)
    same_scenes(s1, local_catalogue)
    from_csv = s3.cbm_source_catalogue(config(s3_proxy, prefix="flanders/", scenes="scenes.csv"))
    same_scenes(from_csv, local_catalogue)
    expected = band_rows(local_catalogue).assign(
        uri=lambda t: t["uri"].str.replace(str(DEMO) + "/", f"s3://{BUCKET}/flanders/", regex=False)
    )
    pd.testing.assert_frame_equal(band_rows(from_csv), expected)

    client = s3_client(s3_proxy.endpoint)
    for scene in local_catalogue.itertuples():
        folder = "S2" if scene.card == "s2" else "S1"
        item = {
            "type": "Feature", "stac_version": "1.0.0", "id": scene.obsid,
            "geometry": json.loads(shapely.to_geojson(scene.geometry)),
            "properties": {"datetime": scene.obstime.isoformat(), "platform": scene.sensor,
                           "constellation": "sentinel-2" if scene.card == "s2" else "sentinel-1"},
            "assets": {b: {"href": f"../{folder}/{scene.obsid}/{b}.tif", "type": "image/tiff"}
                       for b in scene.bands},
        }  # fmt: skip
        client.put_object(
            Bucket=BUCKET, Key=f"flanders/stac/{scene.obsid}.json", Body=json.dumps(item).encode()
        )
    stac = s3.cbm_source_catalogue(config(s3_proxy, prefix="flanders/stac/", catalogue="stac"))
    same_scenes(stac, local_catalogue)
    assert band_rows(stac)["uri"].tolist() == expected["uri"].tolist()


def test_windows_equal_local_reads(bucket, s3_proxy, local_catalogue):
    cfg = config(s3_proxy, prefix="flanders/", scenes="scenes.csv")
    catalogue = s3.cbm_source_catalogue(cfg)
    for obsid, band in (("S2A_MSIL2A_20230405_T31UFS", "B04"), ("S2A_MSIL2A_20230405_T31UFS", "SCL"),
                        ("S1A_IW_GRDH_20230403", "VV")):  # fmt: skip
        remote = catalogue.set_index("obsid").loc[obsid, "bands"][band]
        local = local_catalogue.set_index("obsid").loc[obsid, "bands"][band]
        got = s3.cbm_source_read_window(cfg, remote, BOUNDS, "EPSG:32631")
        want = load_plugins(entry_points=False).caller("local", "cbm_source_read_window", "t")(
            config=PluginConfig("local"), band=local, bounds=BOUNDS, crs="EPSG:32631"
        )
        np.testing.assert_array_equal(got.array, want.array)
        assert (got.transform, got.crs, got.scale, got.offset) == (
            want.transform,
            want.crs,
            want.scale,
            want.offset,
        )


def test_only_the_needed_window_is_transferred(bucket, s3_proxy, tmp_path):
    big = tmp_path / "big.tif"
    data = np.random.default_rng(0).integers(1, 10_000, (2048, 2048), dtype=np.uint16)
    with rasterio.open(big, "w", driver="COG", width=2048, height=2048, count=1, dtype="uint16",
                       crs="EPSG:32631", transform=from_origin(600000, 5700000, 10, 10), nodata=0,
                       blocksize=256, compress="deflate") as out:  # fmt: skip
        out.write(data, 1)
    s3_client(s3_proxy.endpoint).upload_file(str(big), BUCKET, "big/scene/B04.tif")
    s3_proxy.reset()
    window = s3.cbm_source_read_window(
        config(s3_proxy),
        BandRef(f"s3://{BUCKET}/big/scene/B04.tif"),
        (601000, 5690000, 601300, 5690300),
        "EPSG:32631",
    )
    np.testing.assert_array_equal(window.array, data[970:1000, 100:130])
    assert s3_proxy.bytes_served < big.stat().st_size / 10, (s3_proxy.bytes_served, big.stat().st_size)


def test_throttling_and_5xx_are_retried(bucket, s3_proxy):
    s3_proxy.fail_next = 3
    catalogue = s3.cbm_source_catalogue(config(s3_proxy, prefix="flanders/S1/"))
    assert len(catalogue) == 10 and s3_proxy.failures_sent == 3
    s3_proxy.fail_next = 2
    band = BandRef(f"s3://{BUCKET}/flanders/S2/S2B_MSIL2A_20230430_T31UFS/B08.tif")
    window = s3.cbm_source_read_window(config(s3_proxy), band, BOUNDS, "EPSG:32631")
    assert window.array.shape == (20, 20) and s3_proxy.failures_sent == 5


def test_missing_and_denied_objects_are_clear_errors(bucket, s3_proxy):
    cfg = config(s3_proxy)
    with pytest.raises(InputError, match="object not found"):
        s3.cbm_source_read_window(
            cfg, BandRef(f"s3://{BUCKET}/flanders/S2/nope/B04.tif"), BOUNDS, "EPSG:32631"
        )
    s3_proxy.denied = ("S2B_MSIL2A_20230427",)
    with pytest.raises(InputError, match="access denied"):
        s3.cbm_source_read_window(
            cfg,
            BandRef(f"s3://{BUCKET}/flanders/S2/S2B_MSIL2A_20230427_T31UFS/B04.tif"),
            BOUNDS,
            "EPSG:32631",
        )
    with pytest.raises(InputError, match="access denied"):
        s3.cbm_source_catalogue(config(s3_proxy, prefix="flanders/S2/S2B_MSIL2A_20230427"))
    with pytest.raises(InputError, match="object not found"):
        s3.cbm_source_catalogue(config(s3_proxy, prefix="flanders/", scenes="missing.csv"))
    with pytest.raises(InputError, match="bucket not found"):
        s3.cbm_source_catalogue(config(s3_proxy, bucket="no-such-bucket", prefix="x/"))


def test_parcels_from_the_bucket(bucket, s3_proxy):
    parcels = s3.cbm_source_parcels(config(s3_proxy, parcels=f"s3://{BUCKET}/flanders/parcels.gpkg"))
    assert parcels["pid"].tolist() == list(range(1, 19)) and parcels.crs.to_epsg() == 32631
