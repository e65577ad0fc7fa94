"""The Parquet signature store keeps its documented promises (sources/parquet.py, docs/deploy.md).

Each docstring names the one-line bug the test was checked against (planted, seen failing, reverted).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import sources.parquet as store
from cbm_core.config import PluginConfig
from cbm_core.errors import InputError
from cbm_core.model import HIST_COLUMNS, STATS, Signatures


def signatures(obsids: list[str], pids, bands=("B04", "B08"), seed: int = 0) -> Signatures:
    """Signatures whose every value depends on the seed, so a stale value cannot pass for a new one."""
    rng = np.random.default_rng(seed)
    stats = pd.MultiIndex.from_product([list(pids), obsids, list(bands)], names=["pid", "obsid", "band"])
    stats = stats.to_frame(index=False)
    for name in STATS:
        stats[name] = rng.integers(1, 500, len(stats)) if name == "count" else rng.random(len(stats))
    scl = pd.MultiIndex.from_product([list(pids), obsids], names=["pid", "obsid"]).to_frame(index=False)
    for name in HIST_COLUMNS:
        scl[name] = rng.integers(0, 50, len(scl))
    return Signatures(stats, scl)


def tidy(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values(keys, ignore_index=True)


def same(got: pd.DataFrame, want: pd.DataFrame, keys: list[str]) -> None:
    pd.testing.assert_frame_equal(tidy(got, keys), tidy(want, keys).astype(got.dtypes.to_dict()))


@pytest.fixture
def cfg(tmp_path: Path) -> PluginConfig:
    return PluginConfig("parquet", {"path": str(tmp_path / "signatures")})


def test_writing_a_scene_again_replaces_it(cfg):
    """Docstring and docs/deploy.md: "writing a scene again replaces it". Planted bug: skip the
    write when the scene's file exists (the stale values stayed)."""
    obsids = ["S2A_20230405", "S2A_20230415"]
    first = signatures(obsids, range(1, 11))
    assert store.cbm_store_write(cfg, first, obsids) == len(first.stats) + len(first.scl)
    again = signatures(obsids[:1], range(3, 8), bands=("B04",), seed=1)  # fewer parcels and bands
    store.cbm_store_write(cfg, again, obsids[:1])
    back = store.cbm_store_read(cfg, None, None, None)
    kept = first.stats[first.stats["obsid"] == obsids[1]]
    same(back.stats, pd.concat([again.stats, kept]), ["pid", "obsid", "band"])
    same(back.scl, pd.concat([again.scl, first.scl[first.scl["obsid"] == obsids[1]]]), ["pid", "obsid"])
    assert store.cbm_store_obsids(cfg) == set(obsids)


def test_a_scene_without_rows_is_stored_and_empties_the_old_one(cfg):
    """A scene that covers no parcel is still "done" (a re-run must not extract it again), and
    rewriting a scene with no rows leaves none of the old ones. Planted bugs: scenes without rows
    skipped by the loop; `empty_scl()` default replaced by a `continue`."""
    store.cbm_store_write(cfg, signatures(["S2_a"], range(1, 4)), ["S2_a"])
    store.cbm_store_write(cfg, Signatures.empty(), ["S2_a", "S2_b"])
    assert store.cbm_store_obsids(cfg) == {"S2_a", "S2_b"}
    back = store.cbm_store_read(cfg, None, None, None)
    assert len(back.stats) == 0 and len(back.scl) == 0
    assert list(back.stats.columns) == ["pid", "obsid", "band", *STATS]


def test_reads_filter_by_parcel_scene_and_band_and_keep_dtypes(cfg):
    """Filters combine (AND) and dtypes are the model's. Planted bugs: `&` -> `|` between the
    filters; the band filter applied to the SCL table; `.exists()` check on obsids dropped."""
    obsids = ["S2_a", "S2_b", "S2_c"]
    data = signatures(obsids, range(1, 6))
    store.cbm_store_write(cfg, data, obsids)
    some = store.cbm_store_read(cfg, [2, 4], ["S2_b", "S2_missing"], ["B08"])
    want = data.stats.query("pid in [2, 4] and obsid == 'S2_b' and band == 'B08'")
    same(some.stats, want, ["pid", "obsid", "band"])
    same(some.scl, data.scl.query("pid in [2, 4] and obsid == 'S2_b'"), ["pid", "obsid"])
    assert some.stats["count"].dtype == np.int64 and some.stats["mean"].dtype == np.float64
    assert some.scl["hist_4"].dtype == np.int64
    by_band = store.cbm_store_read(cfg, None, None, ["B04"])
    assert set(by_band.stats["band"]) == {"B04"} and len(by_band.stats) == 15
    assert len(by_band.scl) == 15  # SCL has no band: every parcel and scene
    none = store.cbm_store_read(cfg, None, ["S2_missing"], None)
    assert len(none.stats) == 0 and len(none.scl) == 0


def test_an_empty_store_reads_as_empty(tmp_path):
    """A store folder that does not exist yet is an empty store, not an error."""
    cfg = PluginConfig("parquet", {"path": str(tmp_path / "nothing")})
    assert store.cbm_store_obsids(cfg) == set()
    back = store.cbm_store_read(cfg, None, None, None)
    assert len(back.stats) == 0 and list(back.scl.columns) == ["pid", "obsid", *HIST_COLUMNS]


def test_scene_names_unsafe_for_file_systems_round_trip(cfg):
    """File names are made safe, distinct obsids never share a file, and the obsid comes back from
    the file's metadata. Planted bugs: the hash suffix dropped (the two scenes overwrote each other);
    obsids read from the file name."""
    obsids = ["S2/A:2023*04?05", "S2_A_2023_04_05_"]
    assert store.scene_file(obsids[0]) != store.scene_file(obsids[1])
    assert "/" not in store.scene_file(obsids[0]) and store.scene_file(obsids[0]).endswith(".parquet")
    data = signatures(obsids, range(1, 3))
    store.cbm_store_write(cfg, data, obsids)
    assert store.cbm_store_obsids(cfg) == set(obsids)
    first = store.cbm_store_read(cfg, None, obsids[:1], None).stats
    same(first, data.stats[data.stats["obsid"] == obsids[0]], ["pid", "obsid", "band"])


def test_a_failed_write_leaves_no_partial_scene_and_names_the_folder(cfg, tmp_path):
    """Files are written to a temporary name and renamed: a failure leaves neither a partial file
    nor a temporary one, and the error names the folder. Planted bug: the temporary file not
    removed on failure."""
    root = tmp_path / "signatures"
    (root / "stats").mkdir(parents=True)
    target = root / "stats" / store.scene_file("S2_a")
    target.mkdir()  # a directory where the scene file must go: the rename fails
    with pytest.raises(InputError, match=f"cannot write signatures to {root / 'stats'}"):
        store.cbm_store_write(cfg, signatures(["S2_a"], range(1, 3)), ["S2_a"])
    assert sorted(p.name for p in (root / "stats").iterdir()) == [target.name]


def test_a_very_long_scene_id_is_stored_under_a_bounded_file_name(cfg):
    """A 400-character obsid: the file name keeps 120 readable characters and the hash. Bug found
    by this test (fixed): the name exceeded the 255-byte limit and the write failed with a raw
    OSError from the clean-up of a temporary file that never existed."""
    obsid = "S2" * 200
    store.cbm_store_write(cfg, signatures([obsid], range(1, 3)), [obsid])
    assert store.cbm_store_obsids(cfg) == {obsid}
    assert len(store.scene_file(obsid)) == 120 + 1 + 8 + len(".parquet")
    assert store.scene_file(obsid) != store.scene_file(obsid + "x")
    assert len(store.cbm_store_read(cfg, None, [obsid], None).stats) == 4


def test_the_plugin_declares_the_option_it_reads():
    """Planted bug: CBM_OPTIONS {"path"} misspelt (every store configuration refused)."""
    from cbm_core.errors import ConfigError
    from cbm_core.plugins import load_plugins

    plugins = load_plugins(entry_points=False)
    plugins.check_options(PluginConfig("parquet", {"path": "x"}, where="[store]"))
    with pytest.raises(ConfigError, match="pathh"):
        plugins.check_options(PluginConfig("parquet", {"pathh": "x"}, where="[store]"))
