"""Query parameters shared by the routers (JRC names), and the served datasets as a dependency."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from cbm_plugins.serve._datasets import AOI, Dataset, Datasets
from cbm_plugins.serve._http import ApiError

PID_TEXT = r"^[A-Za-z0-9_.:-]{1,64}$"  # member-state ids: letters, digits and . _ : - (no quotes, slashes)

Aoi = Annotated[str | None, Query(pattern=AOI, description="Area of interest (member state or region)")]
Year = Annotated[int | None, Query(ge=1970, le=2200, description="Year of the parcel declarations")]
Legacy = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="Legacy <aoi><year>")]
Pid = Annotated[str | None, Query(pattern=PID_TEXT, description="Parcel id (text, as JRC)")]
Lon = Annotated[float, Query(ge=-180, le=180)]
Lat = Annotated[float, Query(ge=-90, le=90)]
Band = Annotated[str, Query(pattern=r"^[A-Za-z0-9_]{1,16}$")]


async def served(request: Request) -> Datasets:
    """The app's datasets (on the event loop: a sync dependency would cost a thread hop)."""
    return request.app.state.datasets


Served = Annotated[Datasets, Depends(served)]


def the_pid(ds: Dataset, pid: str | None, ogc_fid: str | None) -> tuple[int | None, bool]:
    """The integer pid of a text parcel id (None when the dataset has no such parcel), and whether
    it came in the legacy ogc_fid form."""
    if pid is None and ogc_fid is None:
        raise ApiError(400, "give pid (or the legacy ogc_fid)")
    text, legacy = (pid, False) if pid is not None else (ogc_fid, True)
    return ds.pid_of(text), legacy  # type: ignore[arg-type]


def known_pid(ds: Dataset, pid: str | None, ogc_fid: str | None) -> int:
    """The integer pid of a parcel that must exist (404 otherwise)."""
    number, _ = the_pid(ds, pid, ogc_fid)
    if number is None:
        raise ApiError(404, f"no parcel {pid if pid is not None else ogc_fid} in {ds.key}")
    return number
