"""WorldCereal dekadal point table -> tidy cbm signatures (DN reflectance, linear S1) and crop labels.

Source: WorldCereal/worldcereal-classification (MIT), 2023_FRA_LPIS_POLY_110.geoparquet, labels
from the French RPG 2023 (Etalab 2.0). Contains modified Copernicus Sentinel data 2022-2024.
Encodings (per the data README): S2 reflectance = DN * 1e-4, 65535 = no data; S1 dB =
20 log10(DN) - 83, stored here as linear power 10^(dB/10).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

NODATA = 65535
S2 = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B11", "B12")


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
