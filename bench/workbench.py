"""Workbench benchmark: first map draw and parcel-panel time in a real browser on a 10k-parcel run.

Builds a run of simulated parcels (markers.parquet, verdicts and a Parquet signature store of
simulated S2 + S1 series: the markers run for real), exports its workbench, opens the export in
headless Chromium (Debian `chromium` + `chromium-driver`, WebGL off, as the tests) and measures:

- first draw: from navigation start to the parcel layer's first `load` (index decoded, tiles of
  the first view drawn), median of --repeats page loads;
- panel: from a click on a flagged parcel in the list to its panel drawn (series, reasons,
  markers, peers; the chip image loads after), median and p95 over --panels parcels.

Targets (issue 16): first draw <= 2 s, panel <= 300 ms. Writes bench/workbench.json.

    flock /tmp/cbm-bench.lock python bench/workbench.py [--parcels 10000] [--repeats 5] [--panels 30]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cbm_core import impl  # noqa: E402
from cbm_core.config import PluginConfig, load_run_config  # noqa: E402
from cbm_core.model import Signatures  # noqa: E402
from cbm_core.pipeline import Engine  # noqa: E402
from cbm_core.plugins import load_plugins  # noqa: E402
from markers._simulate import CROPS, simulate  # noqa: E402

TARGET_FIRST_DRAW_S = 2.0
TARGET_PANEL_MS = 300.0
SPACING_M = 120.0  # parcels of 80 x 80 m on a grid: 10k parcels cover 12 x 12 km


# A source of simulated parcels and their scenes (the signatures go to a real Parquet store) -----


def parcels_of(n: int) -> gpd.GeoDataFrame:
    rng = np.random.default_rng(0)
    names = list(CROPS)
    shares = np.array([CROPS[c][1] for c in names])
    crop = np.array(names, dtype=object)[rng.choice(len(names), size=n, p=shares / shares.sum())]
    cols = math.ceil(math.sqrt(n))
    x = 640_000 + (np.arange(n) % cols) * SPACING_M
    y = 5_670_000 + (np.arange(n) // cols) * SPACING_M
    return gpd.GeoDataFrame(
        {
            "pid": np.arange(1, n + 1, dtype=np.int64),
            "crop_code": [CROPS[c][0] for c in crop],
            "crop_name": crop,
        },
        geometry=shapely.box(x, y, x + 80, y + 80),
        crs="EPSG:32631",
    )


class Sim:
    """Source plugin: the grid parcels and one scene per simulated acquisition day and card."""

    def __init__(self, n: int, stats: pd.DataFrame) -> None:
        self.parcels = parcels_of(n)
        scenes = stats[["obsid", "obstime", "card"]].drop_duplicates("obsid")
        self.catalogue = gpd.GeoDataFrame(
            {
                "obsid": scenes["obsid"].to_numpy(),
                "obstime": pd.to_datetime(scenes["obstime"], utc=True).to_numpy(),
                "sensor": scenes["card"].map({"s2": "S2", "bs": "S1", "c6": "S1"}).to_numpy(),
                "card": scenes["card"].to_numpy(),
                "orbit": None,
                "bands": [{} for _ in range(len(scenes))],
            },
            geometry=[None] * len(scenes),
            crs="EPSG:4326",
        )


SIM: Sim | None = None  # what this module, registered as the `sim` source plugin, serves


@impl
def cbm_source_parcels(config, bbox=None) -> gpd.GeoDataFrame:
    return SIM.parcels


@impl
def cbm_source_catalogue(config) -> gpd.GeoDataFrame:
    return SIM.catalogue


@impl
def cbm_source_read_window(config, band, bounds, crs):
    raise NotImplementedError("simulated scenes have no pixels: the run extracts nothing")


def make_run(n: int, folder: Path) -> tuple[Path, Engine]:
    """A finished run of n simulated parcels in folder: store, markers, verdicts."""
    series = simulate(n, seed=1, categorical=False).series
    stats, scl = series.stats.copy(), series.scl.copy()
    day = pd.to_datetime(stats["obstime"], utc=True).dt.strftime("%Y%m%d")
    stats["obsid"] = stats["card"].astype(str) + "_" + day
    scl["obsid"] = "s2_" + pd.to_datetime(scl["obstime"], utc=True).dt.strftime("%Y%m%d")
    global SIM
    SIM = Sim(n, stats)
    plugins = load_plugins()
    plugins.register(sys.modules[__name__], "sim")
    engine = Engine(plugins, progress=False)
    store = PluginConfig("parquet", {"path": str(folder / "out" / "signatures")}, folder, "[store]")
    signatures = Signatures(
        stats.drop(columns=["obstime", "card", "orbit"]), scl.drop(columns=["obstime"], errors="ignore")
    )
    plugins.caller("parquet", "cbm_store_write", "[store]")(
        config=store, signatures=signatures, obsids=sorted(set(stats["obsid"]) | set(scl["obsid"]))
    )
    config = folder / "run.toml"
    config.write_text('scheme = "ndvi-drop"\n[run]\nout = "out"\n[source]\nplugin = "sim"\n')
    engine.run(load_run_config(config))
    return config, engine


# Browser ---------------------------------------------------------------------------------------


def browser():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-webgl", "--window-size=1400,900",
        "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)


def wait(driver, script: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(script)


def measure(url: str, repeats: int, panels: int) -> dict:
    driver = browser()
    try:
        draws = []
        for _ in range(repeats):
            driver.get("about:blank")
            driver.get(url)
            wait(driver, "return window.CBM && (CBM.ready || CBM.error)")
            error = driver.execute_script("return CBM.error")
            if error:
                raise RuntimeError(error)
            draws.append(driver.execute_script("return CBM.firstDrawMs") / 1000)
        rows = driver.find_elements("css selector", "#list li[data-row]")[:panels]
        times = []
        for row in rows:
            pid = driver.execute_script("return CBM.index.pid[+arguments[0].dataset.row]", row)
            began = time.perf_counter()
            row.click()
            wait(
                driver,
                f"return CBM.panelPid === {pid} && !!document.querySelector('#panel svg, #panel .note')",
            )
            wall = (time.perf_counter() - began) * 1000
            times.append({"in_page_ms": driver.execute_script("return CBM.panelMs"), "wall_ms": wall})
        in_page = sorted(t["in_page_ms"] for t in times)
        return {
            "first_draw_s": {"median": statistics.median(draws), "all": [round(d, 3) for d in draws]},
            "panel_ms": {
                "median": statistics.median(in_page),
                "p95": in_page[min(len(in_page) - 1, int(0.95 * len(in_page)))],
                "wall_median": statistics.median(t["wall_ms"] for t in times),
                "count": len(times),
            },
        }
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parcels", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--panels", type=int, default=30)
    args = parser.parse_args()
    from cbm_plugins.analyst._plots import open_run
    from cbm_plugins.workbench._export import export

    folder = Path(tempfile.mkdtemp(prefix="cbm-bench-workbench-"))
    began = time.perf_counter()
    config, engine = make_run(args.parcels, folder)
    run_s = time.perf_counter() - began
    began = time.perf_counter()
    written = export(open_run(config, engine), folder / "wb", chips="none", background_tiles=False)
    export_s = time.perf_counter() - began
    sizes = {p.name: p.stat().st_size for p in (folder / "wb" / "data").glob("*.js")}
    tiles = list((folder / "wb" / "data" / "tiles").rglob("*.js"))
    found = measure((folder / "wb" / "index.html").as_uri(), args.repeats, args.panels)
    result = {
        "parcels": args.parcels,
        "machine": f"{platform.machine()} {platform.system()}, {__import__('os').cpu_count()} cores",
        "browser": "headless Debian chromium, WebGL off",
        "run_s": round(run_s, 1),
        "export_s": round(export_s, 1),
        "export": written,
        "index_bytes": sizes.get("index.js"),
        "tile_files": len(tiles),
        "tile_bytes_mean": round(sum(t.stat().st_size for t in tiles) / max(len(tiles), 1)),
        **found,
        "targets": {"first_draw_s": TARGET_FIRST_DRAW_S, "panel_ms": TARGET_PANEL_MS},
        "met": {
            "first_draw": found["first_draw_s"]["median"] <= TARGET_FIRST_DRAW_S,
            "panel": found["panel_ms"]["median"] <= TARGET_PANEL_MS,
        },
    }
    (HERE / "workbench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
