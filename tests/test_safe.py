"""SAFE source: L2A products built from the demo's real pixels, on disk, zipped and on moto's S3."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import DEMO
from safe_fixture import BOA_OFFSET, build_product, zip_product
from servers import s3_client

import sources.safe as safe
from cbm_core import api
from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError
from cbm_core.pipeline import Engine
from cbm_core.plugins import load_plugins

S2 = DEMO / "S2"
NEW, OLD = "S2A_MSIL2A_20230402_T31UFS", "S2A_MSIL2A_20230405_T31UFS"  # baselines 05.09 and 03.00
BUCKET = "cbm-eodata"
BANDS = ["B01", "B04", "B08", "B11", "AOT", "SCL"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """An eodata-layout folder: one baseline 05.09 product (offset -1000), one 03.00 (none)."""
    root = tmp_path_factory.mktemp("eodata")
    build_product(S2 / NEW, root, "0509")
    build_product(S2 / OLD, root, "0300")
    build_product(S2 / "S2A_MSIL2A_20230412_T31UFS", root, "0509")  # outside the date range below
    return root


def cfg(root, **options) -> PluginConfig:
    return PluginConfig("safe", {"root": str(root), **options}, DEMO, "[source]")


def demo_catalogue():
    local = PluginConfig("local", {"parcels": str(DEMO / "parcels.gpkg"), "scenes": str(DEMO / "scenes.csv")})
    return load_plugins(entry_points=False).caller("local", "cbm_source_catalogue", "t")(config=local)


def extract(source: PluginConfig, catalogue, bands=BANDS):
    engine = Engine(plugins=load_plugins(entry_points=False), progress=False)
    parcels = engine.parcels(PluginConfig("local", {"parcels": str(DEMO / "parcels.gpkg")}))
    job = PluginConfig("s2_l2a", {"card": "s2", "bands": bands, "cache_dir": False}, DEMO, "[[extract]]")
    return engine.extract(parcels, catalogue, [job], source)


def by_date(signatures):
    stats = signatures.stats.assign(day=signatures.stats["obsid"].str.slice(11, 19))
    return stats.drop(columns="obsid").sort_values(["day", "pid", "band"], ignore_index=True)


def reference(obsids):
    catalogue = demo_catalogue()
    signatures, _ = extract(PluginConfig("local"), catalogue[catalogue["obsid"].isin(obsids)])
    return by_date(signatures)


def test_catalogue_reads_the_metadata(archive):
    catalogue = safe.cbm_source_catalogue(
        cfg(archive, start="2023-04-01", end="2023-04-05", tiles=["T31UFS"])
    )
    assert [o[:44] for o in catalogue["obsid"]] == [
        "S2A_MSIL2A_20230402T104621_N0509_R008_T31UFS",
        "S2A_MSIL2A_20230405T104621_N0300_R008_T31UFS",
    ]
    assert catalogue["obstime"].iloc[0] == pd.Timestamp("2023-04-02T10:46:21.024Z")
    assert catalogue["orbit"].tolist() == ["R008", "R008"] and set(catalogue["card"]) == {"s2"}
    new, old = catalogue["bands"]
    assert sorted(new) == sorted(BANDS)
    assert "/R10m/" in new["B04"].uri  # finest of B04 10 m and 20 m
    assert (new["B04"].scale, new["B04"].offset, new["B04"].nodata) == (1 / 10000, -BOA_OFFSET / 10000, 0.0)
    assert (old["B04"].scale, old["B04"].offset) == (1 / 10000, 0.0)  # baseline 03.00: no offset
    assert (new["AOT"].scale, new["AOT"].offset, new["SCL"].scale) == (1 / 1000, 0.0, 1.0)
    demo = demo_catalogue().set_index("obsid").loc[NEW, "geometry"]
    assert catalogue.geometry.iloc[0].intersection(demo).area / demo.area > 0.95  # MTD_TL (10 m grid)
    assert safe.cbm_source_catalogue(cfg(archive, tiles=["32ULB"])).empty
    assert len(safe.cbm_source_catalogue(cfg(archive))) == 3  # no range: every day folder
    assert safe.cbm_source_catalogue(cfg(archive, max_cloud_cover=10)).empty  # 12.5 % in the fixture


def test_unknown_option_and_bad_dates_are_refused(archive):
    with pytest.raises(ConfigError, match=r"unknown option.*bucket"):
        safe.cbm_source_catalogue(cfg(archive, bucket="x"))
    with pytest.raises(ConfigError, match="end 2023-04-01 is before start"):
        safe.cbm_source_catalogue(cfg(archive, start="2023-04-05", end="2023-04-01"))


def test_signatures_equal_the_geotiff_ones(archive):
    source = cfg(archive, start="2023-04-01", end="2023-04-05")
    signatures, report = extract(source, safe.cbm_source_catalogue(source))
    assert not report.failed and len(report.extracted) == 2
    got, want = by_date(signatures), reference([NEW, OLD])
    assert len(got) == len(want) == 2 * 18 * 5
    old = got["day"] == "20230405"
    # Baseline 03.00: the same DNs and the same arithmetic, so the same bits.
    pd.testing.assert_frame_equal(got[old], want[old], check_exact=True)
    # Baseline 05.09: DN + 1000 stored, (DN - 1000) / 10000 computed: equal to rounding.
    pd.testing.assert_frame_equal(got[~old], want[~old], check_exact=False, rtol=0, atol=1e-12)
    assert (got["count"] == want["count"]).all()


def test_zipped_products_read_the_same(archive, tmp_path):
    zipped = tmp_path / "downloads"
    zipped.mkdir()
    for safe_dir in sorted(archive.glob("Sentinel-2/MSI/L2A/2023/04/0[25]/*.SAFE")):
        zip_product(safe_dir, zipped)
    source = cfg(zipped)
    catalogue = safe.cbm_source_catalogue(source)
    assert len(catalogue) == 2 and catalogue["bands"].iloc[0]["B04"].uri.startswith("/vsizip/")
    signatures, report = extract(source, catalogue)
    assert not report.failed
    pd.testing.assert_frame_equal(by_date(signatures), reference([NEW, OLD]), check_exact=False, atol=1e-12)


@pytest.mark.servers
def test_products_on_s3_in_the_eodata_layout(archive, moto, tmp_path):
    client = s3_client(moto.endpoint)
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
    for path in sorted(archive.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"eodata/{path.relative_to(archive)}")
    zipped = zip_product(next(archive.glob("Sentinel-2/MSI/L2A/2023/04/12/*.SAFE")), tmp_path)
    client.upload_file(str(zipped), BUCKET, f"zips/{zipped.name}")
    remote = {"endpoint_url": moto.endpoint, "access_key_id": "testing", "secret_access_key": "testing"}
    source = cfg(f"s3://{BUCKET}/eodata", start="2023-04-01", end="2023-04-05", **remote)
    catalogue = safe.cbm_source_catalogue(source)
    assert len(catalogue) == 2 and catalogue["bands"].iloc[0]["B04"].uri.startswith(f"s3://{BUCKET}/eodata/")
    signatures, report = extract(source, catalogue)
    assert not report.failed
    got = by_date(signatures)
    local = cfg(archive, start="2023-04-01", end="2023-04-05")
    from_disk = by_date(extract(local, safe.cbm_source_catalogue(local))[0])
    pd.testing.assert_frame_equal(got, from_disk, check_exact=True)  # same file bytes, same bits
    with pytest.raises(ConfigError, match="give start and end"):
        safe.cbm_source_catalogue(cfg(f"s3://{BUCKET}/eodata", **remote))
    zip_source = cfg(f"s3://{BUCKET}/zips", **remote)
    zip_catalogue = safe.cbm_source_catalogue(zip_source)
    assert zip_catalogue["bands"].iloc[0]["B04"].uri.startswith(f"/vsizip//vsis3/{BUCKET}/zips/")
    zsig, zreport = extract(zip_source, zip_catalogue, ["B04", "SCL"])
    assert not zreport.failed and len(zsig.stats) == 18


def test_broken_products_fail_alone_and_are_named(archive, tmp_path):
    root = tmp_path / "broken"
    good = build_product(S2 / NEW, root, "0509", eodata=False)
    missing = build_product(S2 / OLD, root, "0510", eodata=False, omit=("B08",))
    corrupt = build_product(S2 / "S2B_MSIL2A_20230407_T31UFS", root, "0509", eodata=False, corrupt=("B04",))
    no_offset = build_product(S2 / "S2A_MSIL2A_20230412_T31UFS", root, "0400", eodata=False, offsets=False)
    old = build_product(S2 / "S2A_MSIL2A_20230415_T31UFS", root, "0213", eodata=False)  # no offsets: fine
    bad_xml = build_product(S2 / "S2A_MSIL2A_20230422_T31UFS", root, "0509", eodata=False)
    (bad_xml / "MTD_MSIL2A.xml").write_text("<n1:Level-2A_User_Product")
    source = cfg(root)
    catalogue = safe.cbm_source_catalogue(source)
    assert len(catalogue) == 6
    signatures, report = extract(source, catalogue, ["B04", "B08", "SCL"])
    name = {p: p.name.removesuffix(".SAFE") for p in (good, missing, corrupt, no_offset, old, bad_xml)}
    assert sorted(report.extracted) == sorted([name[good], name[old]])
    assert set(report.failed) == {name[missing], name[corrupt], name[no_offset], name[bad_xml]}
    assert (
        "T31UFS_20230405T104621_B08_10m.jp2: band B08 listed in MTD_MSIL2A.xml is missing"
        in (report.failed[name[missing]])
    )
    assert "T31UFS_20230407T104621_B04_10m.jp2: cannot decode" in report.failed[name[corrupt]]
    assert "processing baseline 04.00 but no BOA_ADD_OFFSET for band B04" in report.failed[name[no_offset]]
    assert "MTD_MSIL2A.xml: not valid XML" in report.failed[name[bad_xml]]
    assert len(signatures.stats) == 2 * 18 * 2 and np.isfinite(signatures.stats["mean"]).all()


def test_a_run_over_a_safe_folder_names_the_broken_scene_in_its_summary(tmp_path):
    root = tmp_path / "eodata"
    build_product(S2 / NEW, root, "0509")
    broken = build_product(S2 / OLD, root, "0509", corrupt=("B04",))
    config = tmp_path / "run.toml"
    config.write_text(f"""
scheme = "ndvi-drop"
[run]
out = "out"
[source]
plugin = "safe"
root = "{root}"
start = 2023-04-01
end = 2023-04-30
tiles = ["31UFS"]
parcels = "{DEMO / "parcels.gpkg"}"
[[extract]]
card = "s2"
plugin = "s2_l2a"
bands = ["B04", "B08", "SCL"]
cache_dir = false
""")
    result = api.run(config, progress=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    name = broken.name.removesuffix(".SAFE")
    assert summary["scenes"]["catalogue"] == 2 and summary["scenes"]["extracted"] == 1
    assert list(summary["scenes"]["failed"]) == [name]
    assert "T31UFS_20230405T104621_B04_10m.jp2: cannot decode" in summary["scenes"]["failed"][name]
    assert len(result.verdicts) == 18
