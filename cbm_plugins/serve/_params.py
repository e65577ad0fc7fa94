"""Query parameters shared by the routers (JRC names), and the served datasets as a dependency."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from cbm_plugins.serve._datasets import AOI, Datasets
from cbm_plugins.serve._http import ApiError

PID_MIN, PID_MAX = -(2**63), 2**63 - 1

Aoi = Annotated[str | None, Query(pattern=AOI, description="Area of interest (member state or region)")]
Year = Annotated[int | None, Query(ge=1970, le=2200, description="Year of the parcel declarations")]
Legacy = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="Legacy <aoi><year>")]
Pid = Annotated[int | None, Query(ge=PID_MIN, le=PID_MAX, description="Parcel id")]
Lon = Annotated[float, Query(ge=-180, le=180)]
Lat = Annotated[float, Query(ge=-90, le=90)]
Band = Annotated[str, Query(pattern=r"^[A-Za-z0-9_]{1,16}$")]


async def served(request: Request) -> Datasets:
    """The app's datasets (on the event loop: a sync dependency would cost a thread hop)."""
    return request.app.state.datasets


Served = Annotated[Datasets, Depends(served)]


def the_pid(pid: int | None, ogc_fid: int | None) -> tuple[int, bool]:
    """The parcel id, and whether it came in the legacy ogc_fid form."""
    if pid is None and ogc_fid is None:
        raise ApiError(400, "give pid (or the legacy ogc_fid)")
    return (pid, False) if pid is not None else (int(ogc_fid), True)  # type: ignore[arg-type]
