"""parcelTimeSeries: the signatures of one parcel (the hottest route: plain numpy, no pandas masks)."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import pandas as pd
from fastapi import APIRouter, Query
from fastapi.responses import Response

from cbm_core.model import HIST_COLUMNS
from cbm_plugins.serve._auth import Who
from cbm_plugins.serve._http import columns
from cbm_plugins.serve._params import Aoi, Legacy, Pid, Served, Year, the_pid

TS_COLUMNS = ("date_part", "band", "count", "mean", "std", "min", "p25", "p50", "p75", "max")

router = APIRouter(tags=["time series"])


def scl_hists(scl: pd.DataFrame, scenes: pd.DataFrame) -> pd.DataFrame:
    """SCL histograms as {"class": pixels} dicts (non-zero classes), with each scene's epoch."""
    counts = scl[list(HIST_COLUMNS)].to_numpy(np.int64)
    hists = [{str(c): int(n) for c, n in enumerate(row) if n} for row in counts]
    epoch = scenes["epoch"].reindex(scl["obsid"].to_numpy()).to_numpy()
    frame = pd.DataFrame({"obsid": scl["obsid"].to_numpy(), "epoch": epoch, "hist": hists})
    return frame[frame["epoch"].notna()].astype({"epoch": "int64"})


@router.get("/query/parcelTimeSeries")
def parcel_time_series(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    ogc_fid: Pid = None, tstype: Literal["s2", "bs", "c6", "scl"] = "s2",
    band: Annotated[str, Query(pattern=r"^[A-Za-z0-9_]{0,16}$")] = "",
    scl: bool = False, ptype: Annotated[str, Query(max_length=8)] = "",
) -> Response:  # fmt: skip
    """Signatures of one parcel: date_part (epoch s), band, count, mean, std, min, p25, p50, p75, max
    [, hist]; tstype=scl gives date_part and hist. Extra columns: obsid, orbit."""
    ds = data.lookup(who, aoi, year, parcels)
    pid, _ = the_pid(pid, ogc_fid)
    scenes = ds.scene_facts()
    card = "s2" if tstype == "scl" else tstype
    wants_hists = tstype == "scl" or scl
    signatures = ds.hook(ds.store, "cbm_store_read")(
        config=ds.store, pids=[pid], obsids=None, bands=[band] if band and tstype != "scl" else None,
        scl=wants_hists,
    )  # fmt: skip
    hists = scl_hists(signatures.scl, scenes) if wants_hists else None
    if tstype == "scl":
        order = np.argsort(hists["epoch"].to_numpy(), kind="stable")
        return columns({
            "date_part": hists["epoch"].to_numpy()[order], "hist": [hists["hist"].iloc[i] for i in order],
            "obsid": hists["obsid"].to_numpy()[order],
        })  # fmt: skip
    stats = signatures.stats
    obsid = stats["obsid"].to_numpy()
    at = scenes.index.get_indexer(pd.Index(obsid, dtype=object))  # as object: no str dtype inference
    keep = np.flatnonzero(at >= 0)
    keep = keep[scenes["card"].to_numpy()[at[keep]] == card]
    epoch, band = scenes["epoch"].to_numpy()[at[keep]], stats["band"].to_numpy()[keep]
    order = np.lexsort((band, epoch))
    rows = keep[order]
    out = {"date_part": epoch[order], "band": band[order]}
    for name in TS_COLUMNS[2:]:
        out[name] = stats[name].to_numpy()[rows]
    out["obsid"] = obsid[rows]
    out["orbit"] = scenes["orbit"].to_numpy()[at[rows]]
    if hists is not None:
        lookup = dict(zip(hists["obsid"], hists["hist"], strict=True))
        out["hist"] = [lookup.get(o) for o in out["obsid"]]
    return columns(out)
