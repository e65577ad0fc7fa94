"""Scenario generator: realistic S2/S1 parcel time series with known mowing and ploughing events.

Tests and benchmarks need ground truth that real data rarely has. Each simulated parcel-year has a
crop phenology (grassland with 0-4 cuts, winter wheat harvested then ploughed, maize ploughed in
spring then sown), reflectances derived from the canopy state, clouds labelled in SCL histograms
(plus a share of hazy observations that SCL misses, as in real L2A), S1 backscatter with speckle,
6-day coherence that rises after a cut and collapses across a ploughing, and revisit gaps.
All arrays are generated at once for the whole batch (no per-parcel Python loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from cbm_core.model import HIST_COLUMNS, SCL_CLASSES, STATS, TimeSeries

S2_BANDS = ("B02", "B03", "B04", "B08", "B11")
S1_BANDS = ("VV", "VH")
CROPS = {  # crop_name -> (crop_code, default share)
    "grassland": (1, 0.5),
    "winter_wheat": (2, 0.2),
    "maize": (3, 0.2),
    "rapeseed": (4, 0.1),
}
ORBITS = ("ASC", "DESC")
GRASS_PEAK = 0.82  # grassland NDVI at full canopy before autumn
S1_MIN_LOOKS, S1_MAX_LOOKS = 4, 100  # parcel-mean speckle looks when counted from 20 m pixels


@dataclass(frozen=True)
class Profile:
    """What makes simulated series look like a region's real ones (see PROFILES for the sources)."""

    haze_rate: float  # share of SCL-clear observations with haze SCL misses
    haze_depth: tuple[float, float]  # haze optical weight (mix with cloud reflectance), uniform range
    red_noise: float  # relative noise of red reflectance (dense canopy: tiny red, large relative error)
    grass_winter: tuple[float, float]  # grassland NDVI before green-up, uniform range per parcel
    regrowth_tau: tuple[float, float]  # days for a cut's NDVI deficit to shrink by 1/e, uniform range
    cut_depth: tuple[float, float]  # NDVI removed by a cut, uniform range
    s1_looks: float | None  # speckle looks of parcel-mean backscatter; None: one per 20 m pixel
    s1_wetness_db: float  # per-acquisition backscatter shift shared by all parcels (rain, dew)
    s1_parcel_db: float  # per-parcel backscatter offset (soil, slope, sward)
    rain_rate: float  # share of S1 acquisitions on a wet day (coherence lost)
    residue_blue: float = 0.03  # B02 added over crop residue (real stubble lies on the clear-sky line)


PROFILES: dict[str, Profile] = {
    # The original simulator: clean, quick regrowth, dormant winters; kept to compare with.
    "default": Profile(0.03, (0.15, 0.5), 0.03, (0.32, 0.32), (8, 14), (0.15, 0.4), 40.0, 0.0, 0.0, 0.08),
    # Calibrated on real series (bench/simulator.py, docs/benchmarks.md): flanders-seasons 2018/2019
    # grassland (the haze tests remove 6.1-6.3 % of the observations SCL accepts, B02 p99 0.09-0.10
    # of valid ones, real stubble on the clear-sky blue-red line, NDVI noise 0.025 on dense pairs,
    # winter NDVI 0.59-0.88, 30-50 % of a cut's deficit regrown after 3-5 weeks, S1
    # consecutive-difference spread 1.0-1.2 dB with 1.8-2.5 dB on small parcels, levels spread over
    # 1-4 dB between parcels, 34 % of April-October days with >= 1 mm rain in AgERA5), flanders-2023
    # (S1 spread 1.0-1.2 dB) and worldcereal-fra-2023 meadows (levels spread 4.8 dB).
    "flanders": Profile(
        0.06, (0.1, 0.3), 0.1, (0.6, 0.88), (15, 35), (0.12, 0.35), None, 0.4, 1.5, 0.34, 0.0
    ),
}


@dataclass
class Scenario:
    """A simulated batch: the series markers see and what really happened."""

    series: TimeSeries
    truth: pd.DataFrame  # pid, kind ("mowing" / "ploughing"), date (datetime.date)
    actual_crop: pd.Series  # by pid: what grows (differs from the declared crop_name when swapped)


def simulate(
    n_parcels: int,
    year: int = 2023,
    seed: int = 0,
    crops: dict[str, float] | None = None,
    pid_start: int = 1,
    s2_revisit: int = 5,
    s1_revisit: int = 6,
    cloudiness: float = 0.45,
    haze_rate: float | None = None,
    s1_missing: float = 0.05,
    swap_rate: float = 0.0,
    s2_bands: tuple[str, ...] = S2_BANDS,
    s1_cards: tuple[str, ...] = ("bs", "c6"),
    categorical: bool = True,
    profile: str = "default",
) -> Scenario:
    """Simulate ``n_parcels`` parcel-years; ``swap_rate`` of them declare a crop they do not grow.

    ``cloudiness`` is the mean share of cloudy S2 scenes, ``haze_rate`` the share of observations
    whose thin haze SCL misses, ``s1_missing`` the share of S1 acquisitions that are absent.
    Columns with few distinct labels are categorical when ``categorical`` (cheap and fast).
    ``profile`` names the noise, haze, regrowth and S1 behaviour (``PROFILES``); ``haze_rate``
    overrides the profile's.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown simulator profile {profile!r}; known: {', '.join(PROFILES)}")
    prof = PROFILES[profile]
    haze_rate = prof.haze_rate if haze_rate is None else haze_rate
    rng = np.random.default_rng(seed)
    n = int(n_parcels)
    pids = np.arange(pid_start, pid_start + n, dtype=np.int64)
    shares = crops or {k: v[1] for k, v in CROPS.items()}
    names = list(shares)
    p = np.array([shares[k] for k in names], dtype=float)
    crop = rng.choice(len(names), size=n, p=p / p.sum())
    actual = np.array(names, dtype=object)[crop]
    declared = actual.copy()
    swapped = rng.random(n) < swap_rate
    for i in np.flatnonzero(swapped):
        declared[i] = rng.choice([c for c in names if c != actual[i]] or names)
    y0 = pd.Timestamp(f"{year}-01-01", tz="UTC")
    day0 = (y0 - pd.Timestamp("1970-01-01", tz="UTC")).days

    # Canopy state on a daily grid, then sampled at acquisition dates ---------------------------
    doy = np.arange(0, 366, dtype=float)
    ndvi, soil, rough, truth = _phenology(rng, actual, doy, prof)

    # Sentinel-2 ----------------------------------------------------------------------------------
    s2_days = np.arange(2 + rng.integers(0, s2_revisit), 365, s2_revisit)
    scene_cloud = _scene_clouds(rng, s2_days, cloudiness)
    d2 = len(s2_days)
    v = ndvi[:, s2_days]
    s = soil[:, s2_days]
    surf = _reflectance(rng, v, s, prof.red_noise, prof.residue_blue)
    npx = rng.integers(20, 400, size=n)[:, None] * np.ones((1, d2), dtype=np.int64)
    cloudy_frac = np.where(
        rng.random((n, d2)) < scene_cloud[None, :],
        rng.uniform(0.3, 1.0, (n, d2)),
        np.where(rng.random((n, d2)) < 0.1, rng.uniform(0.0, 0.04, (n, d2)), 0.0),
    )
    haze = (cloudy_frac == 0) & (rng.random((n, d2)) < haze_rate)
    haze_frac = np.where(haze, rng.uniform(*prof.haze_depth, (n, d2)), 0.0)
    mix = np.clip(cloudy_frac + haze_frac, 0, 1)
    cloud_refl = {"B02": 0.45, "B03": 0.45, "B04": 0.46, "B08": 0.5, "B11": 0.35}
    s2_vals = {b: (1 - mix) * surf[b] + mix * cloud_refl[b] * rng.uniform(0.8, 1.1, (n, d2)) for b in surf}
    hist = np.zeros((n, d2, SCL_CLASSES), dtype=np.int64)
    n_cloud = np.rint(cloudy_frac * npx).astype(np.int64)
    n_clear = npx - n_cloud
    veg = v > 0.35
    hist[..., 4] = np.where(veg, n_clear, 0)
    hist[..., 5] = np.where(veg, 0, n_clear)
    hist[..., 9] = n_cloud // 2
    hist[..., 8] = n_cloud - n_cloud // 2 - n_cloud // 5
    hist[..., 3] = n_cloud // 5

    s2_named = {b: s2_vals[b] for b in s2_bands}
    blocks = [_block(s2_days + day0, "s2", None, s2_named, npx[:, 0] * 4, lambda d: f"S2_{_ymd(d)}")]

    # Sentinel-1: two orbits, backscatter and 6-day coherence ------------------------------------
    for k, orbit in enumerate(ORBITS):
        days = np.arange(1 + 3 * k + rng.integers(0, 3), 365, s1_revisit)
        present = rng.random(len(days)) >= s1_missing
        acq = days[present]
        if "bs" in s1_cards:
            vv, vh = _backscatter(rng, ndvi[:, acq], soil[:, acq], rough[:, acq], k, npx[:, 0], prof)
            blocks.append(
                _block(acq + day0, "bs", orbit, {"VV": vv, "VH": vh}, npx[:, 0], _s1_name(orbit, "bs"))
            )
        if "c6" in s1_cards:
            pair_ok = np.flatnonzero(present[1:] & present[:-1]) + 1
            ends = days[pair_ok]
            starts = days[pair_ok - 1]
            coh_vv = _coherence(rng, ndvi, soil, truth, starts, ends, k, n, prof.rain_rate)
            coh_vh = np.clip(coh_vv * 0.8 + rng.normal(0, 0.02, coh_vv.shape), 0, 1)
            blocks.append(
                _block(
                    ends + day0, "c6", orbit, {"VV": coh_vv, "VH": coh_vh}, npx[:, 0], _s1_name(orbit, "c6")
                )
            )

    stats = _stats_frame(pids, blocks, rng, categorical)
    scl = pd.DataFrame(
        {
            "pid": np.repeat(pids, d2),
            "obsid": np.tile([f"S2_{_ymd(d + day0)}" for d in s2_days], n),
        }
    )
    for c, col in enumerate(HIST_COLUMNS):
        scl[col] = hist[..., c].ravel()
    scl["obstime"] = pd.to_datetime(np.tile(s2_days + day0, n).astype("int64") * 86_400_000_000_000, utc=True)
    if categorical:
        scl["obsid"] = scl["obsid"].astype("category")
    parcels = _parcels(rng, pids, declared)
    truth["pid"] = pids[truth.pop("row").to_numpy()]
    truth["date"] = [(y0 + pd.Timedelta(days=float(d))).date() for d in truth.pop("doy")]
    truth = truth[["pid", "kind", "date"]].sort_values(["pid", "date"]).reset_index(drop=True)
    return Scenario(TimeSeries(stats, scl, parcels), truth, pd.Series(actual, index=pids, name="actual_crop"))


def _ymd(day: int) -> str:
    return (np.datetime64("1970-01-01") + np.timedelta64(int(day), "D")).astype(str).replace("-", "")


def _s1_name(orbit: str, card: str):
    return lambda d: f"S1_{orbit}_{_ymd(d)}_{card}"


def _phenology(
    rng: np.random.Generator, actual: np.ndarray, doy: np.ndarray, prof: Profile
) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """Daily NDVI, soil state (0 vegetated, 1 stubble/residue, 2 freshly tilled) and roughness."""
    n = len(actual)
    t = doy[None, :]
    ndvi = np.zeros((n, len(doy)))
    soil = np.zeros((n, len(doy)))
    rough = np.zeros((n, len(doy)))
    truth_rows: list[np.ndarray] = []
    truth_kind: list[str] = []
    truth_doy: list[np.ndarray] = []

    def sig(x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-x))

    # Grassland: green-up, autumn decline, slow wiggles, an occasional drought dip, 0-4 cuts.
    g = np.flatnonzero(actual == "grassland")
    if len(g):
        shift = rng.normal(0, 8, (len(g), 1))
        lo, hi = prof.grass_winter
        winter = lo if lo == hi else rng.uniform(lo, hi, (len(g), 1))
        amp = GRASS_PEAK - winter  # green-up from the winter level, autumn decline by 44 % of it
        base = winter + amp * sig((t - 85 - shift) / 12) - 0.44 * amp * sig((t - 305 - shift) / 15)
        base += 0.025 * np.sin(
            2 * np.pi * t / rng.uniform(40, 90, (len(g), 1)) + rng.uniform(0, 6, (len(g), 1))
        )
        dry = rng.random((len(g), 1)) < 0.2
        base -= (
            dry
            * rng.uniform(0.05, 0.12, (len(g), 1))
            * np.exp(-0.5 * ((t - rng.uniform(180, 230, (len(g), 1))) / 15) ** 2)
        )
        n_cuts = rng.choice(5, size=len(g), p=[0.1, 0.2, 0.3, 0.3, 0.1])
        cut = np.full((len(g), 4), np.nan)
        first = rng.uniform(115, 160, len(g))
        for k in range(4):
            gap = rng.uniform(30, 60, len(g))
            day = first if k == 0 else cut[:, k - 1] + gap
            ok = (k < n_cuts) & (day <= 290)
            cut[:, k] = np.where(ok, day, np.nan)
        drop = rng.uniform(*prof.cut_depth, (len(g), 4))
        tau = rng.uniform(*prof.regrowth_tau, (len(g), 4))
        series = base.copy()
        for k in range(4):
            m = cut[:, k : k + 1]
            after = np.nan_to_num(t - m, nan=-1.0)
            series -= np.where(after >= 0, drop[:, k : k + 1] * np.exp(-after / tau[:, k : k + 1]), 0.0)
        ndvi[g] = series
        rows, ks = np.nonzero(np.isfinite(cut))
        truth_rows.append(g[rows])
        truth_kind += ["mowing"] * len(rows)
        truth_doy.append(cut[rows, ks])

    # Winter crops: green-up, senescence, harvest (stubble), ploughing (bare), new crop emerges.
    for name, peak, senesce, harvest in (("winter_wheat", 130, 175, 200), ("rapeseed", 110, 160, 190)):
        w = np.flatnonzero(actual == name)
        if not len(w):
            continue
        sh = rng.normal(0, 6, (len(w), 1))
        hv = harvest + sh
        plough = hv + rng.uniform(20, 80, (len(w), 1))
        sow = plough + rng.uniform(10, 25, (len(w), 1))
        grow = 0.3 + 0.55 * sig((t - (peak - 40) - sh) / 10) - 0.35 * sig((t - senesce - sh) / 7)
        series = np.where(t < hv, grow, 0.22)
        series = np.where(t >= plough, 0.12, series)
        series = np.where(t >= sow, 0.12 + 0.25 * sig((t - sow - 25) / 8), series)
        state = np.where((t >= hv) & (t < plough), 1, np.where((t >= plough) & (t < sow + 30), 2, 0))
        ndvi[w], soil[w] = series, state
        rough[w] = np.where((t >= plough) & (t < sow + 60), 1.0, 0.0)
        truth_rows.append(w)
        truth_kind += ["ploughing"] * len(w)
        truth_doy.append(plough[:, 0])

    # Maize: residue over winter, spring ploughing, sowing, summer peak, autumn harvest.
    mz = np.flatnonzero(actual == "maize")
    if len(mz):
        sh = rng.normal(0, 6, (len(mz), 1))
        plough = rng.uniform(85, 120, (len(mz), 1))
        sow = plough + rng.uniform(10, 25, (len(mz), 1))
        hv = 275 + sh
        grow = 0.12 + 0.72 * sig((t - sow - 45) / 9) - 0.3 * sig((t - 250 - sh) / 7)
        series = np.where(t < plough, 0.24, np.where(t < hv, grow, 0.22))
        state = np.where(t < plough, 1, np.where(t < sow + 35, 2, np.where(t >= hv, 1, 0)))
        ndvi[mz], soil[mz] = series, state
        rough[mz] = np.where((t >= plough) & (t < sow + 50), 1.0, 0.0)
        truth_rows.append(mz)
        truth_kind += ["ploughing"] * len(mz)
        truth_doy.append(plough[:, 0])

    truth = pd.DataFrame(
        {
            "row": np.concatenate(truth_rows) if truth_rows else np.zeros(0, np.int64),
            "kind": truth_kind,
            "doy": np.concatenate(truth_doy) if truth_doy else np.zeros(0),
        }
    )
    return np.clip(ndvi, 0.03, 0.95), soil, rough, truth


def _scene_clouds(rng: np.random.Generator, days: np.ndarray, cloudiness: float) -> np.ndarray:
    """Per-scene share of cloudy parcels: a two-state weather chain, cloudier in winter."""
    season = 1 + 0.35 * np.cos(2 * np.pi * days / 365)
    out = np.zeros(len(days))
    wet = rng.random() < cloudiness
    for i in range(len(days)):
        stay = 0.6
        p_wet = np.clip(cloudiness * season[i], 0.05, 0.95)
        wet = (rng.random() < stay) if wet else (rng.random() < p_wet * (1 - stay) / (1 - p_wet + 1e-9))
        wet = bool(wet) or rng.random() < 0.05
        out[i] = rng.uniform(0.7, 1.0) if wet else rng.uniform(0.0, 0.15)
    return out


def _reflectance(
    rng: np.random.Generator, ndvi: np.ndarray, soil: np.ndarray, red_noise: float, residue_blue: float
) -> dict[str, np.ndarray]:
    """Surface reflectance consistent with the NDVI, brighter in SWIR over residue and bare soil."""
    noise = lambda: rng.normal(1, 0.03, ndvi.shape)  # noqa: E731
    b08 = (0.16 + 0.33 * ndvi) * noise()
    b04 = b08 * (1 - ndvi) / (1 + ndvi) * np.maximum(rng.normal(1, red_noise, ndvi.shape), 0.2)
    residue = soil == 1
    tilled = soil == 2
    b02 = (0.55 * b04 + 0.012 + residue_blue * residue - 0.005 * tilled) * noise()
    b03 = (0.75 * b04 + 0.03 * ndvi + 0.02) * noise()
    b11 = (0.29 - 0.13 * ndvi + 0.03 * residue + 0.06 * tilled) * noise()
    return {"B02": b02, "B03": b03, "B04": b04, "B08": b08, "B11": b11}


def _backscatter(
    rng: np.random.Generator,
    ndvi: np.ndarray,
    soil: np.ndarray,
    rough: np.ndarray,
    orbit: int,
    pixels: np.ndarray,
    prof: Profile,
) -> tuple[np.ndarray, np.ndarray]:
    """Linear gamma0 VV/VH: volume scattering grows with the canopy, roughness brightens VV.

    Speckle of a parcel mean: gamma with the profile's looks, or one look per 20 m pixel (a
    quarter of the 10 m pixels); the calibrated profile adds wet days and parcel offsets.
    """
    vv_db = -14 + 4 * ndvi + 2.5 * rough - 0.7 * orbit
    vh_db = -22 + 7 * ndvi + 1.5 * rough - 0.7 * orbit
    if prof.s1_wetness_db or prof.s1_parcel_db:
        shift = rng.normal(0, prof.s1_wetness_db, (1, ndvi.shape[1]))
        shift = shift + rng.normal(0, prof.s1_parcel_db, (ndvi.shape[0], 1))
        vv_db, vh_db = vv_db + shift, vh_db + shift
    if prof.s1_looks is None:
        looks = np.clip(pixels / 4, S1_MIN_LOOKS, S1_MAX_LOOKS).astype(float)[:, None]
    else:
        looks = np.full((ndvi.shape[0], 1), prof.s1_looks)
    speckle = lambda: rng.gamma(looks, 1 / looks, ndvi.shape)  # noqa: E731  (parcel-mean multilook)
    return 10 ** (vv_db / 10) * speckle(), 10 ** (vh_db / 10) * speckle()


def _coherence(
    rng: np.random.Generator,
    ndvi: np.ndarray,
    soil: np.ndarray,
    truth: pd.DataFrame,
    starts: np.ndarray,
    ends: np.ndarray,
    orbit: int,
    n: int,
    rain_rate: float,
) -> np.ndarray:
    """6-day VV coherence: low over growing canopy, high over bare/cut fields, lost across a change."""
    v = 0.5 * (ndvi[:, starts] + ndvi[:, ends])
    coh = 0.62 - 0.5 * v + 0.03 * orbit
    coh += 0.08 * (soil[:, ends] == 1)
    events = truth.to_numpy()
    rows = events[:, 0].astype(np.int64)
    day = events[:, 2].astype(float)
    is_cut = events[:, 1] == "mowing"
    for row, d, cut in zip(rows, day, is_cut, strict=True):
        if cut:
            after = starts - d
            lift = rng.uniform(0.18, 0.3) * np.exp(-np.maximum(after, 0) / rng.uniform(7, 11))
            coh[row] += np.where(after >= 0, lift, 0.0)
        spans = (starts < d) & (ends >= d)
        coh[row] = np.where(spans, np.minimum(coh[row], 0.18), coh[row])
    rain = rng.random(ends.shape) < rain_rate  # wet scenes decorrelate everything
    coh = np.where(rain[None, :], coh * 0.6, coh)
    return np.clip(coh + rng.normal(0, 0.04, coh.shape), 0.02, 0.98)


@dataclass
class _Block:
    """The rows of one card: a per-parcel template (same dates for every parcel) and the values."""

    day: np.ndarray  # (r,) day numbers
    obsid: np.ndarray  # (r,) labels
    band: np.ndarray
    card: str
    orbit: str | None
    mean: np.ndarray  # (n, r)
    count: np.ndarray  # (n,) pixels per parcel


def _block(
    days: np.ndarray, card: str, orbit: str | None, bands: dict[str, np.ndarray], count: np.ndarray, name
) -> _Block:
    b = len(bands)
    mean = np.stack([bands[k] for k in bands], axis=2).reshape(len(count), -1)  # (n, d * b)
    labels = np.array([name(x) for x in days], dtype=object)
    names = np.tile(np.array(list(bands), dtype=object), len(days))
    return _Block(np.repeat(days, b), np.repeat(labels, b), names, card, orbit, mean, count)


def _stats_frame(
    pids: np.ndarray, blocks: list[_Block], rng: np.random.Generator, categorical: bool
) -> pd.DataFrame:
    """Tidy statistics rows sorted by (pid, obstime, obsid, band), built parcel-major without a global sort.

    Every parcel shares the acquisition schedule, so one template permutation orders all parcels.
    """
    n = len(pids)
    day = np.concatenate([b.day for b in blocks])
    obsid = np.concatenate([b.obsid for b in blocks])
    band = np.concatenate([b.band for b in blocks])
    card = np.concatenate([np.full(len(b.day), b.card, dtype=object) for b in blocks])
    orbit = np.concatenate([np.full(len(b.day), b.orbit, dtype=object) for b in blocks])
    obs_codes, obs_labels = pd.factorize(obsid)
    band_codes, band_labels = pd.factorize(band)
    perm = np.lexsort((band_codes, obs_codes, day))
    r = len(perm)
    mean = np.concatenate([b.mean for b in blocks], axis=1)[:, perm].ravel()
    count = np.concatenate([np.repeat(b.count[:, None], len(b.day), axis=1) for b in blocks], axis=1)[:, perm]
    std = np.abs(mean) * np.repeat(rng.uniform(0.05, 0.2, n), r)

    def column(codes: np.ndarray, labels: np.ndarray) -> Any:
        tiled = np.tile(codes[perm], n)
        if categorical:
            return pd.Categorical.from_codes(tiled, categories=pd.Index(labels, dtype=str))
        return np.append(np.asarray(labels, dtype=object), None)[tiled]

    card_codes, card_labels = pd.factorize(card)
    orbit_codes, orbit_labels = pd.factorize(orbit, use_na_sentinel=True)
    out = pd.DataFrame(
        {
            "pid": np.repeat(pids, r),
            "obsid": column(obs_codes, obs_labels),
            "band": column(band_codes, band_labels),
            "count": count.ravel().astype(np.int64),
            "mean": mean,
            "std": std,
        }
    )
    for col, z in zip(STATS[3:], (-2.0, 2.0, -0.674, 0.0, 0.674), strict=True):
        out[col] = mean + z * std
    out["obstime"] = pd.to_datetime(np.tile(day[perm], n).astype("int64") * 86_400_000_000_000, utc=True)
    out["card"] = column(card_codes, card_labels)
    out["orbit"] = column(orbit_codes, orbit_labels)
    return out


def _parcels(rng: np.random.Generator, pids: np.ndarray, declared: np.ndarray) -> gpd.GeoDataFrame:
    """Square parcels of 0.5-5 ha on a jittered grid (EPSG:3035), declared crop names and codes."""
    n = len(pids)
    side = np.sqrt(rng.uniform(5_000, 50_000, n))
    cols = int(np.ceil(np.sqrt(n)))
    x = 4_000_000 + (np.arange(n) % cols) * 300.0
    y = 2_800_000 + (np.arange(n) // cols) * 300.0
    geom = shapely.box(x, y, x + side, y + side)
    codes = np.array([CROPS.get(c, (0, 0))[0] for c in declared], dtype=np.int64)
    return gpd.GeoDataFrame(
        {"pid": pids, "crop_code": codes, "crop_name": declared}, geometry=geom, crs="EPSG:3035"
    )
