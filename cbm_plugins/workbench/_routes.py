"""The workbench in `cbm serve`: /workbench/ lists the datasets a user may read, and
/workbench/{aoi}/{year}/ is the page with its data routes, under the REST API's users and per-aoi
rights (a dataset of another aoi answers 403, as the API does). The page's code and the vendored
map library are static files without data, served without a login."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated

import pandas as pd
from fastapi import APIRouter, FastAPI
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, ORJSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from cbm_core.config import PluginConfig, RunConfig, load_run_config
from cbm_core.errors import CbmError
from cbm_core.pipeline import Engine
from cbm_plugins.analyst._plots import FinishedRun
from cbm_plugins.serve._auth import Who
from cbm_plugins.serve._datasets import AOI, Dataset
from cbm_plugins.serve._params import Served
from cbm_plugins.workbench._data import Workbench
from cbm_plugins.workbench._export import STATIC, chip_png, page
from cbm_plugins.workbench._tiles import backgrounds, render_tile

router = APIRouter(prefix="/workbench", tags=["workbench"], include_in_schema=False)
Aoi = Annotated[str, PathParam(pattern=AOI)]
Year = Annotated[int, PathParam(ge=1970, le=2200)]
Obsid = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]
Layer = Annotated[str, PathParam(pattern=r"^[a-z0-9-]{1,16}$")]
TILE_CACHE = "public, max-age=3600"  # background tiles of a scene never change
_benches: dict[tuple[str, int, int], Workbench] = {}
_lock = threading.Lock()


def install(app: FastAPI) -> None:
    """Mount the page's static files and add the workbench routes to `cbm serve`'s app."""
    app.mount("/workbench/static", StaticFiles(directory=STATIC), name="workbench-static")
    app.include_router(router)


def bench_of(ds: Dataset) -> Workbench:
    """The dataset's workbench data, rebuilt when its results or verdicts file changes."""
    stamp = sum(p.stat().st_mtime_ns for p in (ds.results, ds.verdicts) if p is not None and p.exists())
    key = (ds.key, ds.year, stamp)
    with _lock:
        if key not in _benches:
            catalogue = ds.catalogue().reset_index(drop=True)
            cards = sorted(set(catalogue["card"].astype(str)))
            original = _run_config(ds)
            config = RunConfig(
                path=original.path if original else Path(f"dataset {ds.aoi} {ds.year}"),
                out_dir=ds.results.parent if ds.results is not None else Path("."),
                source=ds.source,
                store=ds.store,
                extract=original.extract if original else tuple(_job(catalogue, c) for c in cards),
                scheme=original.scheme if original else None,
                scheme_ref=original.scheme_ref if original else None,
                # the run's [analyst] table: its orthophoto and weather source serve the page too
                **({"analyst": original.analyst} if original else {}),
            )
            verdicts = ds.table("verdicts")
            run = FinishedRun(
                config,
                Engine(plugins=ds.plugins, progress=False),
                ds.parcels().reset_index(drop=True),
                catalogue,
                ds.table("results"),
                verdicts,
            )
            for old in [k for k in _benches if k[:2] == key[:2]]:
                del _benches[old]
            _benches[key] = Workbench(run, title=f"{ds.aoi} {ds.year}")
        return _benches[key]


def _job(catalogue: pd.DataFrame, card: str) -> PluginConfig:
    """An extraction job naming a card and its bands (for a dataset served without its run's
    configuration: what the plots and the validity policy read of the jobs)."""
    bands = sorted(
        {b for refs in catalogue.loc[catalogue["card"].astype(str) == card, "bands"] for b in refs}
    )
    return PluginConfig("zonal", {"card": card, "bands": bands}, where=f"[dataset] {card}")


def _run_config(ds: Dataset) -> RunConfig | None:
    """The configuration of the run that made the dataset's results (its summary.json names it),
    for the run's validity policy; None when it cannot be read (the default policy then)."""
    if ds.results is None:
        return None
    summary = ds.results.parent / "summary.json"
    try:
        return load_run_config(Path(json.loads(summary.read_text(encoding="utf-8"))["config"]))
    except (CbmError, OSError, KeyError, ValueError, TypeError):
        return None


@router.get("/", response_class=HTMLResponse)
def datasets(who: Who, data: Served) -> HTMLResponse:
    """The datasets this user may open."""
    readable = [d for d in data.all if who.may_read(d.aoi)]
    items = "".join(f'<li><a href="{d.aoi}/{d.year}/">{d.aoi} {d.year}</a></li>' for d in readable)
    body = f"<ul>{items}</ul>" if items else "<p>No dataset you may read.</p>"
    return HTMLResponse(
        f"<!DOCTYPE html><meta charset='utf-8'><title>cbm workbench</title><h1>Workbench</h1>{body}"
    )


@router.get("/{aoi}/{year}/", response_class=HTMLResponse)
def workbench_page(who: Who, data: Served, aoi: Aoi, year: Year) -> HTMLResponse:
    ds = data.lookup(who, aoi, year, None)
    return HTMLResponse(page("server", "data/", "/workbench/static/", f"{ds.aoi} {ds.year}"))


@router.get("/{aoi}/{year}/data/meta")
async def meta(who: Who, data: Served, aoi: Aoi, year: Year) -> ORJSONResponse:
    ds = data.lookup(who, aoi, year, None)

    def build() -> dict:
        bench = bench_of(ds)
        found = bench.meta(backgrounds=backgrounds(bench.run, bench.s2_dates))
        return {**found, "detailZoom": found["tileZoom"], "chips": [], "notes": []}

    return ORJSONResponse(await run_in_threadpool(build))


@router.get("/{aoi}/{year}/data/index")
async def parcel_index(who: Who, data: Served, aoi: Aoi, year: Year) -> Response:
    ds = data.lookup(who, aoi, year, None)
    body = await run_in_threadpool(lambda: bench_of(ds).index_bytes())
    return Response(body, media_type="application/octet-stream")


@router.get("/{aoi}/{year}/data/tiles/{z}/{x}/{y}")
async def parcel_tile(who: Who, data: Served, aoi: Aoi, year: Year, z: int, x: int, y: int) -> Response:
    ds = data.lookup(who, aoi, year, None)
    body = await run_in_threadpool(lambda: bench_of(ds).tile_bytes(x, y))
    return Response(body, media_type="application/octet-stream")


@router.get("/{aoi}/{year}/data/parcel/{pid}")
async def parcel_panel(who: Who, data: Served, aoi: Aoi, year: Year, pid: int) -> ORJSONResponse:
    ds = data.lookup(who, aoi, year, None)

    def build() -> dict:
        bench = bench_of(ds)
        bench.run.parcel(pid)  # an unknown pid: 400 with the reason (InputError)
        return bench.panels([pid])[pid]

    return ORJSONResponse(await run_in_threadpool(build))


@router.get("/{aoi}/{year}/data/chips/{pid}.png")
async def parcel_chips(who: Who, data: Served, aoi: Aoi, year: Year, pid: int) -> Response:
    ds = data.lookup(who, aoi, year, None)
    body = await run_in_threadpool(lambda: chip_png(bench_of(ds).run, pid))
    return Response(body, media_type="image/png")


@router.get("/{aoi}/{year}/data/bg/{layer}/{obsid}/{z}/{x}/{y}.png")
async def background_tile(
    who: Who, data: Served, aoi: Aoi, year: Year, layer: Layer, obsid: Obsid, z: int, x: int, y: int
) -> Response:
    ds = data.lookup(who, aoi, year, None)
    body = await run_in_threadpool(lambda: render_tile(bench_of(ds).run, layer, obsid, z, x, y))
    return Response(body, media_type="image/png", headers={"Cache-Control": TILE_CACHE})
