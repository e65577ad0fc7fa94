"""Marker results and traffic-light verdicts of a dataset's last `cbm run`."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from cbm_plugins.serve._auth import Who
from cbm_plugins.serve._http import columns
from cbm_plugins.serve._params import Aoi, Legacy, Pid, Served, Year, the_pid

router = APIRouter(tags=["results"])
VERDICT_COLUMNS = ("pid", "light", "reasons", "crop_code", "crop_name")


@router.get("/query/markerResults")
def marker_results(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    ogc_fid: Pid = None, marker: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:  # fmt: skip
    """Marker results of one parcel (every marker, or one): marker, pid, status, reason, events,
    values, confidence, obsids (events/values/obsids as JSON text)."""
    ds = data.lookup(who, aoi, year, parcels)
    pid, _ = the_pid(pid, ogc_fid)
    table = ds.table("results")
    rows = table[table["pid"] == pid]
    if marker is not None:
        rows = rows[rows["marker"] == marker]
    return columns({c: rows[c].to_numpy() for c in rows.columns})


@router.get("/query/verdicts")
def verdicts(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    ogc_fid: Pid = None, light: Literal["green", "yellow", "red"] | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000, offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:  # fmt: skip
    """Traffic-light verdicts: pid, light, reasons (and the declaration), by parcel or by light."""
    ds = data.lookup(who, aoi, year, parcels)
    table = ds.table("verdicts")
    if pid is not None or ogc_fid is not None:
        table = table[table["pid"] == the_pid(pid, ogc_fid)[0]]
    if light is not None:
        table = table[table["light"] == light]
    table = table.sort_values("pid").iloc[offset : offset + limit]
    return columns({c: table[c].to_numpy() for c in VERDICT_COLUMNS if c in table.columns})
