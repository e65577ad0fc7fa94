"""info (and its older name options): the datasets a user may read, as the JRC client's
``datas.api.get_options`` expects ({"aois": {aoi: {"year": [...], ...}}})."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from cbm_plugins.serve._auth import Who
from cbm_plugins.serve._params import Served

router = APIRouter(tags=["info"])


@router.get("/query/info")
@router.get("/query/options", include_in_schema=False)
def info(who: Who, data: Served) -> dict[str, Any]:
    """The datasets this user may read: per aoi its years, time-series types, background names
    and whether weather is served."""
    aois: dict[str, Any] = {}
    for ds in data.all:
        if not who.may_read(ds.aoi):
            continue
        entry = aois.setdefault(ds.aoi, {"description": f"cbm-engine dataset {ds.aoi}", "year": [],
                                         "backgrounds": [], "weather": False})  # fmt: skip
        entry["year"].append(str(ds.year))
        entry["backgrounds"] = sorted({*entry["backgrounds"], *ds.backgrounds})
        entry["weather"] = entry["weather"] or ds.meteo is not None
        entry["tstype"] = ["s2", "bs", "c6", "scl"]
    return {"aois": aois}
