"""Marker results and traffic-light verdicts of a dataset's last `cbm run`: our own columns
(markerResults, verdicts) and the JRC markers table (markers)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import pandas as pd
from fastapi import APIRouter, Query
from fastapi.responses import Response

from cbm_plugins.serve._auth import Who
from cbm_plugins.serve._http import columns
from cbm_plugins.serve._params import Aoi, Legacy, Pid, Served, Year, the_pid

router = APIRouter(tags=["results"])
VERDICT_COLUMNS = ("pid", "light", "reasons", "crop_code", "crop_name")
JRC_MARKER_COLUMNS = (
    "foi_id", "marker", "marker_type", "date_start", "date_end", "duration_days",
    "value_1", "value_2", "value_3", "practice",
)  # fmt: skip
MarkerName = Annotated[str | None, Query(max_length=64)]


@router.get("/query/markerResults")
def marker_results(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    ogc_fid: Pid = None, marker: MarkerName = None,
) -> Response:  # fmt: skip
    """Marker results of one parcel (every marker, or one): marker, pid, status, reason, events,
    values, confidence, obsids (events/values/obsids as JSON text)."""
    ds = data.lookup(who, aoi, year, parcels)
    number, _ = the_pid(ds, pid, ogc_fid)
    table = ds.table("results")
    rows = table[table["pid"] == number]
    if marker is not None:
        rows = rows[rows["marker"] == marker]
    out = {c: rows[c].to_numpy() for c in rows.columns}
    out["pid"] = ds.text_ids(rows["pid"].to_numpy())
    return columns(out)


def jrc_marker_rows(results: pd.DataFrame, text_ids: list[str]) -> dict[str, list[Any]]:
    """One JRC markers row per detected event: foi_id, marker (the event kind), marker_type (our
    marker), date_start/date_end, duration_days, value_1 (magnitude), value_2 (confidence),
    value_3 (empty), practice (the marker's status)."""
    out: dict[str, list[Any]] = {c: [] for c in JRC_MARKER_COLUMNS}
    for foi, row in zip(text_ids, results.itertuples(index=False), strict=True):
        for event in json.loads(row.events or "[]"):
            start, end = pd.Timestamp(event["start"]), pd.Timestamp(event["end"])
            values = (foi, event.get("kind", row.marker), row.marker, start.date().isoformat(),
                      end.date().isoformat(), int((end - start).days), event.get("magnitude"),
                      event.get("confidence"), None, row.status)  # fmt: skip
            for name, value in zip(JRC_MARKER_COLUMNS, values, strict=True):
                out[name].append(value)
    return out


@router.get("/query/markers")
def markers(
    who: Who, data: Served, aoi: Aoi = None, year: Year = None, parcels: Legacy = None, pid: Pid = None,
    marker: MarkerName = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:  # fmt: skip
    """Marker events in the JRC markers columns (foi_id, marker, marker_type, date_start, date_end,
    duration_days, value_1..3, practice), for one parcel or a page of the dataset."""
    ds = data.lookup(who, aoi, year, parcels)
    table = ds.table("results")
    if pid is not None:
        table = table[table["pid"] == the_pid(ds, pid, None)[0]]
    if marker is not None:
        table = table[table["marker"] == marker]
    table = (
        table[table["events"].fillna("[]") != "[]"]
        .sort_values(["pid", "marker"])
        .iloc[offset : offset + limit]
    )
    return columns(jrc_marker_rows(table, ds.text_ids(table["pid"].to_numpy())))


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
        table = table[table["pid"] == the_pid(ds, pid, ogc_fid)[0]]
    if light is not None:
        table = table[table["light"] == light]
    table = table.sort_values("pid").iloc[offset : offset + limit]
    out = {c: table[c].to_numpy() for c in VERDICT_COLUMNS if c in table.columns}
    out["pid"] = ds.text_ids(table["pid"].to_numpy())
    return columns(out)
