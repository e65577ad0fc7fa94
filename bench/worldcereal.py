"""WorldCereal dekadal point table -> tidy cbm signatures (DN reflectance, linear S1) and crop labels,
and the crop-type marker's benchmark on those real parcels (JSON on stdout or --out):

    python bench/worldcereal.py --worldcereal ../shared/data/worldcereal-fra-2023 \
        --out bench/markers-crop.json

Source: WorldCereal/worldcereal-classification (MIT), 2023_FRA_LPIS_POLY_110.geoparquet, labels
from the French RPG 2023 (Etalab 2.0). Contains modified Copernicus Sentinel data 2022-2024.
Encodings (per the data README): S2 reflectance = DN * 1e-4, 65535 = no data; S1 dB =
20 log10(DN) - 83, stored here as linear power 10^(dB/10).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

NODATA = 65535
S2 = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B11", "B12")
# Broad groups of the CROPTYPE_INSEASON_FRANCE classes: a swap inside a group (wheat declared as
# "cereals") is often not a compliance issue and hardly separable from S2/S1 signatures.
GROUPS = {
    "wheat": "cereals",
    "barley": "cereals",
    "cereals": "cereals",
    "spring_barley": "cereals",
    "sunflower": "oilseeds",
    "rapeseed_rape": "oilseeds",
    "soy_soybeans": "oilseeds",
    "grapes": "permanent",
    "permanent_crops": "permanent",
}
TRADEOFF = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1)


def worldcereal_tidy(
    parquet: Path, mappings: Path | None = None, legends: Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tidy signatures with S2 in DN, labels) from the WorldCereal files.

    labels: pid, ewoc_code, lon, lat, crop (the fine label_full) and, with ``legends``
    (class_mappings.json), one column per WorldCereal legend (e.g. CROPTYPE_INSEASON_FRANCE).
    """
    df = pd.read_parquet(parquet)
    df["pid"] = df["feature_index"].astype("int64")
    df["obstime"] = pd.to_datetime(df["timestamp"]).dt.tz_localize("UTC")
    parts = []
    for band in S2:
        v = df[f"S2-L2A-{band}"].astype("float64")
        ok = v != NODATA
        parts.append(
            pd.DataFrame(
                {
                    "pid": df["pid"][ok],
                    "obstime": df["obstime"][ok],
                    "card": "s2",
                    "band": band,
                    "mean": v[ok],
                }
            )
        )
    for band in ("VV", "VH"):
        v = df[f"S1-SIGMA0-{band}"].astype("float64")
        ok = (v != NODATA) & (v > 0)
        db = 20 * np.log10(v[ok]) - 83
        parts.append(
            pd.DataFrame(
                {
                    "pid": df["pid"][ok],
                    "obstime": df["obstime"][ok],
                    "card": "bs",
                    "band": band,
                    "mean": 10 ** (db / 10),
                }
            )
        )
    table = pd.concat(parts, ignore_index=True)
    table["count"] = 1
    table = table.sort_values(["pid", "obstime", "card", "band"], ignore_index=True)
    labels = df.drop_duplicates("pid")[["pid", "ewoc_code", "lon", "lat"]].reset_index(drop=True)
    if mappings is not None and Path(mappings).is_file():
        m = pd.read_csv(mappings, sep=";", encoding="utf-8-sig", dtype=str)
        m["ewoc_code"] = m["ewoc_code"].str.replace("-", "").astype("int64")
        labels = labels.merge(
            m[["ewoc_code", "label_full"]].drop_duplicates("ewoc_code"), on="ewoc_code", how="left"
        )
        labels["crop"] = labels["label_full"].fillna(labels["ewoc_code"].astype(str))
        labels = labels.drop(columns="label_full")
    else:
        labels["crop"] = labels["ewoc_code"].astype(str)
    if legends is not None and Path(legends).is_file():
        for legend, mapping in json.loads(Path(legends).read_text()).items():
            labels[legend] = labels["ewoc_code"].astype(str).map(mapping)
    return table, labels


def crop_benchmark(
    worldcereal: Path, kinds: list[str], folds: int, seed: int, legend: str, min_samples: int, draws: int
) -> dict:
    """Cross-validated accuracy and recall of swapped declarations at the marker's defaults.

    Each fold's flag threshold comes from that fold's model, calibrated on its own training parcels
    (inner cross-validation): nothing is tuned on the parcels it is scored on. A swap replaces each
    parcel's class by a random other class; one draw moves the recall by a few points on a few
    hundred parcels, so it is reported over ``draws`` draws (seeds 0..draws-1): the headline is
    their mean, with the range and the seed-0 draw.
    """
    sys.path.insert(0, str(ROOT))
    from markers import crop_type
    from markers._evaluate import confusion
    from sources.table import signatures_series

    table, labels = worldcereal_tidy(
        worldcereal / "2023_FRA_LPIS_POLY_110.geoparquet",
        worldcereal / "crop_type_class_mappings.csv",
        worldcereal / "class_mappings.json",
    )
    series = signatures_series(table, scale="dn")
    truth = labels.set_index("pid")[legend]
    _, X, y, dropped = crop_type.training_set(series, truth, min_samples=min_samples)
    classes = sorted(set(y))
    swapped = []
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        swapped.append(np.array([rng.choice([c for c in classes if c != v]) for v in y]))
    group = {c: GROUPS.get(c, c) for c in classes}
    mc = crop_type.DEFAULTS["min_confidence"]
    target = crop_type.DEFAULTS["false_flags"]
    out: dict = {
        "legend": legend,
        "parcels": len(y),
        "classes": len(classes),
        "left_out": dropped,
        "folds": folds,
        "swap_draws": draws,
        "training": {"time_shifts_bins": list(crop_type.TIME_SHIFTS)},
    }
    for kind in kinds:
        t0 = time.perf_counter()
        proba, calibration = crop_type.cross_validate(X, y, kind, folds, seed)
        predicted = np.asarray(classes)[proba.argmax(axis=1)]
        matrix = confusion(pd.Series(y), pd.Series(predicted))

        out[kind] = {
            "overall_accuracy": matrix["overall_accuracy"],
            **_rates(proba, calibration, y, swapped, group, mc, target),
            "thresholds": {"min_confidence": mc, "false_flags": target},
            "tradeoff_false_flags": {
                str(t): _rates(proba, calibration, y, swapped, group, mc, t) for t in TRADEOFF
            },
            "recall_by_class": matrix["recall"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return out


def _rates(
    proba: np.ndarray,
    calibration: np.ndarray,
    y: np.ndarray,
    swapped: list[np.ndarray],
    group: dict[str, str],
    min_confidence: float,
    false_flags: float,
) -> dict:
    """Flags at each fold model's own calibrated threshold for a target false-flag rate."""
    from markers import crop_type

    classes = sorted(set(y))
    ratio = np.array([np.interp(false_flags, crop_type.CALIBRATION_GRID, c) for c in calibration])
    honest = crop_type.flags(proba, classes, y, min_confidence, ratio)
    recall, across = [], []
    for declared in swapped:
        caught = crop_type.flags(proba, classes, declared, min_confidence, ratio)
        other_group = np.array([group[a] != group[b] for a, b in zip(y, declared, strict=True)])
        recall.append(float(caught.mean()))
        across.append(float(caught[other_group].mean()))
    return {
        "false_flag_rate": round(float(honest.mean()), 4),
        "swap_recall": round(float(np.mean(recall)), 4),
        "swap_recall_range": [round(min(recall), 4), round(max(recall), 4)],
        "swap_recall_seed0": round(recall[0], 4),
        "swap_recall_across_groups": round(float(np.mean(across)), 4),
        "max_declared_ratio_by_fold": sorted({round(float(r), 4) for r in ratio}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worldcereal", type=Path, required=True)
    parser.add_argument("--kinds", nargs="+", default=["sklearn", "keras"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--legend", default="CROPTYPE_INSEASON_FRANCE")
    parser.add_argument("--min-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and the models")
    parser.add_argument("--draws", type=int, default=10, help="random swap draws")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = crop_benchmark(
        args.worldcereal, args.kinds, args.folds, args.seed, args.legend, args.min_samples, args.draws
    )
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
