"""parcelTimeSeries: the signatures of one parcel (the hottest route: plain numpy, no pandas masks).

JRC conventions by default, so that the JRC client and its plots work unchanged: ``scl=True``
(every S2 row carries its SCL histogram), S1 band names VVb/VHb (backscatter) and VVc/VHc
(coherence), the SCL band as SC, S2 values in DN (reflectance x 10000), date_part as a float.
``bandnames=cbm`` and ``values=reflectance`` give the engine's own names and values.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from fastapi import APIRouter, Query
from fastapi.responses import Response

from cbm_core.model import HIST_COLUMNS
from cbm_plugins.serve._auth import Who
from cbm_plugins.serve._http import columns
from cbm_plugins.serve._params import Aoi, Legacy, Pid, Served, Year, the_pid

TS_COLUMNS = ("date_part", "band", "count", "mean", "std", "min", "p25", "p50", "p75", "max")
VALUE_COLUMNS = ("mean", "std", "min", "p25", "p50", "p75", "max")
DN_PER_REFLECTANCE = 10_000.0  # S2 L2A quantification value: DN = reflectance x 10000 (BOA offset removed)
SCL_BAND = "SCL"
JRC_SUFFIX = {"bs": "b", "c6": "c"}  # VV -> VVb (backscatter), VVc (coherence)
JRC_BANDS = {SCL_BAND: "SC"}

router = APIRouter(tags=["time series"])


CLASS_NAMES = np.array([str(c) for c in range(len(HIST_COLUMNS))], dtype=object)  # hist keys


def hist_dicts(counts: np.ndarray) -> list[dict[str, int]]:
    """SCL histograms as {"class": pixels} dicts of the non-zero classes (numpy, no per-cell loop)."""
    rows, cols = np.nonzero(counts)
    cuts = np.searchsorted(rows, np.arange(1, len(counts)))
    keys = np.split(CLASS_NAMES[cols], cuts)
    values = np.split(counts[rows, cols], cuts)
    return [dict(zip(k.tolist(), v.tolist(), strict=True)) for k, v in zip(keys, values, strict=True)]


def class_stats(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of the SCL class values of each histogram (the JRC SC band): count, mean, std,
    min, p25, p50, p75, max of the classes of a parcel's pixels (histograms with pixels only)."""
    total = counts.sum(axis=1).astype(np.float64)
    classes = np.arange(counts.shape[1], dtype=np.float64)
    safe = np.where(total > 0, total, 1)
    mean = counts @ classes / safe
    present = counts > 0
    cumulative = np.cumsum(counts, axis=1) / safe[:, None]
    out = {
        "count": total.astype(np.int64), "mean": mean,
        "std": np.sqrt(np.maximum(counts @ classes**2 / safe - mean**2, 0)),
        "min": present.argmax(axis=1).astype(np.float64),
        "max": (counts.shape[1] - 1 - present[:, ::-1].argmax(axis=1)).astype(np.float64),
    }  # fmt: skip
    for name, q in (("p25", 0.25), ("p50", 0.5), ("p75", 0.75)):
        out[name] = (cumulative >= q).argmax(axis=1).astype(np.float64)
    return out


def store_band(band: str, tstype: str) -> str:
    """Our band name for a requested one (JRC VVb/VHc/SC or ours)."""
    if tstype in JRC_SUFFIX and band[-1:] == JRC_SUFFIX[tstype] and band[:-1] in ("VV", "VH"):
        return band[:-1]
    return SCL_BAND if band == JRC_BANDS[SCL_BAND] else band


def jrc_names(bands: np.ndarray, tstype: str) -> np.ndarray:
    """JRC band names: S1 bands get their card's suffix, SCL becomes SC."""
    suffix = JRC_SUFFIX.get(tstype, "")
    names = {b: (f"{b}{suffix}" if suffix else JRC_BANDS.get(b, b)) for b in set(bands.tolist())}
    return np.asarray([names[b] for b in bands.tolist()], dtype=object)


def answer(data: dict[str, Any], tsformat: str) -> Response:
    if tsformat == "csv":
        frame = pd.DataFrame(
            {k: [json.dumps(v) if isinstance(v, dict) else v for v in vs] for k, vs in data.items()}
        )
        return Response(frame.to_csv(index=False), media_type="text/csv")
    return columns(data)


@router.get("/query/parcelTimeSeries")
def parcel_time_series(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    ogc_fid: Pid = None, tstype: Literal["s2", "bs", "c6", "scl"] = "s2",
    band: Annotated[str, Query(pattern=r"^[A-Za-z0-9_]{0,16}$")] = "",
    scl: bool = True, ref: bool = False, tsformat: Literal["json", "csv"] = "json",
    bandnames: Literal["jrc", "cbm"] = "jrc", values: Literal["dn", "reflectance"] = "dn",
    ptype: Annotated[str, Query(max_length=8)] = "",
) -> Response:  # fmt: skip
    """Signatures of one parcel: date_part (epoch s), band, count, mean, std, min, p25, p50, p75, max
    [, hist with scl=True (S2 only), reference with ref=True]; tstype=scl gives date_part and hist.
    Extra columns: obsid, orbit. An unknown parcel: empty columns."""
    ds = data.lookup(who, aoi, year, parcels)
    number, _ = the_pid(ds, pid, ogc_fid)
    if number is None:  # as JRC: an unknown parcel has no rows
        return answer({c: [] for c in (TS_COLUMNS if tstype != "scl" else ("date_part", "hist"))}, tsformat)
    scenes = ds.scene_facts()
    card = "s2" if tstype == "scl" else tstype
    sc_band = tstype == "s2" and bandnames == "jrc" and band in ("", "SC", "SCL")
    wants_hists = tstype == "scl" or (tstype == "s2" and (scl or sc_band))  # JRC: no S1 histograms
    signatures = ds.hook(ds.store, "cbm_store_read")(
        config=ds.store, pids=[number], obsids=None,
        bands=[store_band(band, tstype)] if band and tstype != "scl" else None, scl=wants_hists,
    )  # fmt: skip
    scl_rows = signatures.scl
    counts = scl_rows[list(HIST_COLUMNS)].to_numpy(np.int64) if wants_hists else None
    if tstype == "scl":
        at = scenes.index.get_indexer(pd.Index(scl_rows["obsid"].to_numpy(), dtype=object))
        found = np.flatnonzero(at >= 0)
        epoch = scenes["epoch"].to_numpy()[at[found]]
        order = found[np.argsort(epoch, kind="stable")]
        return answer({
            "date_part": np.sort(epoch, kind="stable").astype(np.float64),
            "hist": hist_dicts(counts[order]), "obsid": scl_rows["obsid"].to_numpy()[order],
        }, tsformat)  # fmt: skip
    stats = signatures.stats
    obsid, bands = stats["obsid"].to_numpy(), stats["band"].to_numpy()
    columns_ = {name: stats[name].to_numpy() for name in ("count", *VALUE_COLUMNS)}
    if sc_band and not (bands == SCL_BAND).any():  # the JRC SC band, from the histograms
        with_pixels = counts.sum(axis=1) > 0
        derived = class_stats(counts[with_pixels])
        obsid = np.concatenate([obsid, scl_rows["obsid"].to_numpy()[with_pixels]])
        bands = np.concatenate([bands, np.full(int(with_pixels.sum()), SCL_BAND, dtype=object)])
        columns_ = {name: np.concatenate([values, derived[name]]) for name, values in columns_.items()}
    at = scenes.index.get_indexer(pd.Index(obsid, dtype=object))  # as object: no str dtype inference
    keep = np.flatnonzero(at >= 0)
    keep = keep[scenes["card"].to_numpy()[at[keep]] == card]
    epoch = scenes["epoch"].to_numpy()[at[keep]]
    order = np.lexsort((bands[keep], epoch))
    rows = keep[order]
    bands = bands[rows]
    out: dict[str, Any] = {"date_part": epoch[order].astype(np.float64)}
    out["band"] = jrc_names(bands, tstype) if bandnames == "jrc" else bands
    out["count"] = columns_["count"][rows]
    scale = card == "s2" and values == "dn"
    reflectance = bands != SCL_BAND
    for name in VALUE_COLUMNS:
        column = columns_[name][rows]
        out[name] = np.where(reflectance, column * DN_PER_REFLECTANCE, column) if scale else column
    out["obsid"] = obsid[rows]
    out["orbit"] = scenes["orbit"].to_numpy()[at[rows]]
    if ref:
        out["reference"] = out["obsid"]
    if wants_hists and scl:
        by_obsid = dict(zip(scl_rows["obsid"].tolist(), hist_dicts(counts), strict=True))
        out["hist"] = [by_obsid.get(o, {}) for o in out["obsid"].tolist()]
    return answer(out, tsformat)
