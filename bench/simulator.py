"""Real vs simulated series: the statistics the simulator is calibrated on (JSON on stdout or --out).

    cd COPY   # a scratch copy of ../shared/data (flanders-seasons, flanders-2023, worldcereal-fra-2023)
    cbm extract --parcels flanders-seasons/parcels.gpkg --scenes flanders-seasons/scenes.csv \\
        --out seasons.parquet
    cbm extract --parcels flanders-2023/parcels.gpkg --scenes flanders-2023/scenes.csv --out april.parquet
    python bench/simulator.py --seasons seasons.parquet --seasons-parcels flanders-seasons/parcels.gpkg \\
        --april april.parquet --out bench/simulator.json \\
        --worldcereal worldcereal-fra-2023/2023_FRA_LPIS_POLY_110.geoparquet

The same measurements run on the real signatures and on simulated parcel-years of each simulator
profile ("default": the original, "flanders": calibrated on these numbers), so docs/benchmarks.md
can show them side by side: valid-observation share and gaps between valid Sentinel-2 observations
(April-October), NDVI noise of grassland (robust spread of differences <= 6 days apart), cloud
leakage (share of SCL-valid grassland observations the validity policy's haze and dip tests or the
mowing marker's haze screen remove), blue reflectance
of valid observations, winter NDVI of grassland, Sentinel-1 backscatter levels and speckle
(differences of consecutive same-orbit dB values), the share of dekads with a valid observation, and
the depth of the cuts the mowing marker finds on grassland. The project never reads ../shared at run
time: the real inputs are paths given here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from markers import _series as ts  # noqa: E402
from markers import mowing  # noqa: E402
from markers._simulate import PROFILES, simulate  # noqa: E402

GRASS_CROPS = ("Permanent grass crops",)  # flanders-seasons labels
MEADOW_CODES = (2001020021, 2001020022)  # WorldCereal EWOC: temporary and long-term meadows
SEASON = ("04-01", "10-31")
NOISE_PAIR_DAYS = 6.0
DEKAD_DAYS = 10.0


def _q(values, qs=(10, 50, 90)) -> dict:
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if not len(values):
        return {"n": 0}
    return {"n": len(values), **{f"p{q}": round(float(np.percentile(values, q)), 4) for q in qs}}


def haze_rejections(full, grass: set[int], lo: float, hi: float) -> int:
    """Grassland observations in the season SCL accepts but the validity policy rejects as haze or a dip."""
    why = np.asarray(full.why if full.why is not None else np.zeros(0), dtype=str)
    hazy = np.char.startswith(why, "haze") | np.char.startswith(why, "NDVI dip")
    hazy &= np.isin(np.repeat(full.pids, full.n_obs), list(grass))
    return int((hazy & (full.t >= lo) & (full.t <= hi)).sum())


def s2_statistics(series, grass: set[int], year: int) -> dict:
    """Validity, gaps, noise, leakage and blue level of a batch's Sentinel-2 series in the season."""
    p = dict(mowing.DEFAULTS)
    full, valid = mowing._s2_series(series, p)
    lo, hi = (ts.day_number(f"{year}-{x}") for x in SEASON)
    kp = mowing.kernel_params(p)
    share, gaps, noise, hazy, n_valid_all, blue, winter, dekads = [], [], [], 0, 0, [], [], []
    for k, pid in enumerate(valid.pids.tolist()):
        a, b = valid.offsets[k], valid.offsets[k + 1]
        t, v = valid.t[a:b], valid.values["NDVI"][a:b]
        bl = valid.values["B02"][a:b]
        clear = 1 - np.nan_to_num(valid.cloudy[a:b], nan=0.0)
        jan_feb = (t >= ts.day_number(f"{year}-01-01")) & (t < ts.day_number(f"{year}-03-01"))
        if pid in grass and jan_feb.any():
            winter.append(float(np.median(v[jan_feb])))
        keep = mowing._haze_screen(t, v, bl, clear, kp)
        ins = (t >= lo) & (t <= hi)
        if pid in grass:
            hazy += int((~keep & ins).sum())
            n_valid_all += int(ins.sum())
        if pid in grass:
            blue += list(bl[ins])
        tk, vk = t[keep & ins], v[keep & ins]
        edges = np.concatenate([[lo], tk, [hi]])
        gaps += list(np.diff(edges))
        dekads.append(len(np.unique(np.floor((tk - lo) / DEKAD_DAYS))) / np.ceil((hi - lo) / DEKAD_DAYS))
        if pid in grass:
            dt, dv = np.diff(tk), np.diff(vk)
            close = dt <= NOISE_PAIR_DAYS
            if close.sum() >= 3:
                noise.append(1.4826 * float(np.median(np.abs(dv[close]))) / np.sqrt(2))
    policy_haze = haze_rejections(full, grass, lo, hi)
    fpos = ts.align(full, valid.pids)
    for k, pos in enumerate(fpos.tolist()):
        t = full.t[full.offsets[pos] : full.offsets[pos + 1]]
        n_acq = int(((t >= lo) & (t <= hi)).sum())
        a, b = valid.offsets[k], valid.offsets[k + 1]
        n_ok = int(((valid.t[a:b] >= lo) & (valid.t[a:b] <= hi)).sum())
        if n_acq:
            share.append(n_ok / n_acq)
    return {
        "parcels": len(valid.pids),
        "valid_share": _q(share),
        "gap_days": _q(gaps, (50, 75, 90, 99)),
        "valid_dekad_share": _q(dekads),
        "grass_haze_screened_share": round((hazy + policy_haze) / max(n_valid_all + policy_haze, 1), 4),
        "grass_b02_valid": _q(blue, (50, 90, 99)),
        "grass_ndvi_noise": _q(noise),
        "grass_winter_ndvi": _q(winter),
    }


def s1_statistics(series, grass: set[int], year: int) -> dict:
    """Backscatter levels (dB) and speckle (same-orbit consecutive differences) of grassland in season."""
    out = {}
    lo, hi = (ts.day_number(f"{year}-{x}") for x in SEASON)
    for band in ("VV", "VH"):
        panel = ts.build_panel(series.stats, "bs", (band,))
        if not len(panel.t):
            return {}
        db = 10 * np.log10(panel.values[band])
        orbit = panel.orbit if panel.orbit is not None else np.full(len(panel.t), "")
        level, speckle = [], []
        for k, pid in enumerate(panel.pids.tolist()):
            if pid not in grass:
                continue
            a, b = panel.offsets[k], panel.offsets[k + 1]
            t, x, o = panel.t[a:b], db[a:b], orbit[a:b]
            ins = (t >= lo) & (t <= hi)
            level.append(float(np.median(x[ins])) if ins.any() else np.nan)
            for orb in set(o[ins].tolist()):
                y = x[ins & (o == orb)]
                if len(y) >= 4:
                    speckle.append(float(np.std(np.diff(y))))
        out[band] = {"level_db": _q(level), "diff_std_db": _q(speckle)}
    return out


def cut_depths(series, grass: set[int]) -> dict:
    """NDVI drop of the cuts the mowing marker finds on grassland."""
    results = mowing.run(series.subset(sorted(grass)), {})
    depth = [e.magnitude for r in results for e in r.events if e.kind != "mowing:s1"]
    per_parcel = [len(r.events) for r in results if r.status == "OK"]
    return {"depth": _q(depth), "cuts_per_parcel": _q(per_parcel)}


def worldcereal_statistics(path: Path) -> dict:
    """Meadows of the WorldCereal France 2023 dekadal table: valid-dekad share, S1 levels (dekadal means)."""
    frame = pd.read_parquet(path)
    frame = frame[frame["ewoc_code"].isin(MEADOW_CODES)]
    when = pd.to_datetime(frame["timestamp"])
    frame = frame[(when >= "2023-04-01") & (when <= "2023-10-31")]
    valid = frame["S2-L2A-B04"] != 65535
    share = valid.groupby(frame["sample_id"]).mean()
    out = {"meadows": int(frame["sample_id"].nunique()), "valid_dekad_share": _q(share)}
    for band in ("VV", "VH"):
        code = frame[f"S1-SIGMA0-{band}"]
        db = (20 * np.log10(code[code != 65535].astype(float)) - 83).groupby(frame["sample_id"]).median()
        out[f"{band}_level_db"] = _q(db)
    b04 = frame.loc[valid, "S2-L2A-B04"].astype(float)
    b08 = frame.loc[valid, "S2-L2A-B08"].astype(float)
    ndvi = ((b08 - b04) / (b08 + b04)).groupby(frame.loc[valid, "sample_id"])
    out["dekadal_ndvi_median"] = _q(ndvi.median())
    return out


def real_statistics(
    seasons: Path | None, seasons_parcels: Path | None, april: Path | None, worldcereal: Path | None
) -> dict:
    import geopandas as gpd

    from cbm_core.api import read_signatures

    out: dict = {}
    if seasons and seasons_parcels:
        table = read_signatures(seasons)
        crops = gpd.read_file(seasons_parcels)
        grass_all = set(crops.loc[crops["crop_name"].isin(GRASS_CROPS), "pid"].tolist())
        samples = crops.groupby("sample")["pid"].apply(list)
        for pids in samples:
            year = 2018 if min(pids) == 1 else 2019  # the package's two label years (see its README)
            sub = table.subset(pids)
            grass = grass_all & set(pids)
            out[f"flanders-seasons {year}"] = {
                "s2": s2_statistics(sub, grass, year),
                "s1": s1_statistics(sub, grass, year),
                "cuts": cut_depths(sub, grass),
            }
    if april:
        out["flanders-2023 April"] = {"s1_all_parcels": _s1_april(read_signatures(april))}
    if worldcereal:
        out["worldcereal-fra-2023 meadows"] = worldcereal_statistics(worldcereal)
    return out


def _s1_april(series) -> dict:
    """Speckle over April 2023 (all 18 parcels; 10 scenes, too few for a season)."""
    out = {}
    for band in ("VV", "VH"):
        panel = ts.build_panel(series.stats, "bs", (band,))
        db = 10 * np.log10(panel.values[band])
        diffs = []
        orbit = panel.orbit if panel.orbit is not None else np.full(len(panel.t), "")
        for k in range(len(panel.pids)):
            a, b = panel.offsets[k], panel.offsets[k + 1]
            for orb in set(orbit[a:b].tolist()):
                y = db[a:b][orbit[a:b] == orb]
                if len(y) >= 3:
                    diffs.append(float(np.std(np.diff(y))))
        out[band] = {"diff_std_db": _q(diffs)}
    return out


def simulated_statistics(n: int, seed: int) -> dict:
    out = {}
    for profile in PROFILES:
        scenario = simulate(n, year=2018, seed=seed, profile=profile)
        grass = set(scenario.actual_crop.index[scenario.actual_crop == "grassland"].tolist())
        out[f"simulated {profile}"] = {
            "s2": s2_statistics(scenario.series, grass, 2018),
            "s1": s1_statistics(scenario.series, grass, 2018),
            "cuts": cut_depths(scenario.series, grass),
            "truth_cuts_per_grass_parcel": round(
                float((scenario.truth["kind"] == "mowing").sum() / max(len(grass), 1)), 2
            ),
        }
    return out


def figure(seasons: Path, path: Path, seed: int) -> None:
    """Real grassland NDVI (valid, haze screened, cuts found) beside simulated grassland per profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cbm_core.api import read_signatures

    real = read_signatures(seasons)
    panels = [("real pid 2, 2018", real.subset([2]), 2018), ("real pid 20, 2019", real.subset([20]), 2019)]
    for profile in PROFILES:
        scenario = simulate(40, year=2018, seed=seed, profile=profile)
        grass = scenario.actual_crop.index[scenario.actual_crop == "grassland"]
        panels.append((f"simulated {profile}", scenario.series.subset([int(grass[0])]), 2018))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.1 * len(panels)), sharey=True)
    p = dict(mowing.DEFAULTS)
    kp = mowing.kernel_params(p)
    for ax, (title, series, year) in zip(axes, panels, strict=True):
        full, valid = mowing._s2_series(series, p)
        t, v = valid.t, valid.values["NDVI"]
        keep = mowing._haze_screen(t, v, valid.values["B02"], 1 - np.nan_to_num(valid.cloudy), kp)
        lo, hi = ts.day_number(f"{year}-01-01"), ts.day_number(f"{year}-11-30")
        doy = lambda x, lo=lo: x - lo + 1  # noqa: E731
        inside = (full.t >= lo) & (full.t <= hi)
        ax.plot(doy(full.t[inside]), full.values["NDVI"][inside], ".", color="0.8", label="not valid (SCL)")
        w = (t >= lo) & (t <= hi)
        ax.plot(doy(t[w & keep]), v[w & keep], "o-", ms=3, color="tab:green", label="valid")
        ax.plot(doy(t[w & ~keep]), v[w & ~keep], "x", color="tab:red", label="haze screened")
        (result,) = mowing.run(series, {})
        for e in result.events:
            a, m, b = (ts.day_number(x) for x in (e.start, e.main, e.end))
            ax.axvspan(doy(a), doy(b), color="tab:orange", alpha=0.25)
            ax.axvline(doy(m), color="tab:orange")
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylim(0, 1)
        ax.set_xlim(1, hi - lo + 1)
    axes[0].legend(fontsize=7, loc="lower left", ncol=3)
    axes[-1].set_xlabel("day of year (orange: cuts found, window last high .. first low)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seasons", type=Path, help="signatures of flanders-seasons (cbm extract)")
    parser.add_argument("--seasons-parcels", type=Path, help="flanders-seasons parcels.gpkg (crop labels)")
    parser.add_argument("--april", type=Path, help="signatures of flanders-2023 (cbm extract)")
    parser.add_argument("--worldcereal", type=Path, help="worldcereal-fra-2023 dekadal geoparquet")
    parser.add_argument("--parcels", type=int, default=2000, help="simulated parcel-years per profile")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figure", type=Path, help="PNG: real vs simulated grassland NDVI (needs --seasons)")
    args = parser.parse_args()
    if args.figure and args.seasons:
        figure(args.seasons, args.figure, args.seed)
    report = {
        "benchmark": "simulator calibration",
        "real": real_statistics(args.seasons, args.seasons_parcels, args.april, args.worldcereal),
        "simulated": simulated_statistics(args.parcels, args.seed),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
