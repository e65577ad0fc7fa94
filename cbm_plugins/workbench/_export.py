"""`cbm workbench export`: the workbench as a static folder that opens from disk (index.html).

Data files are the served bytes wrapped in ``CBM.put(key, "<base64>")`` scripts: a page opened
from disk may load scripts but not ``fetch`` files. Parcel panels are grouped by the parcel tile
of their centre, so a 1M-parcel export makes thousands of files, not millions.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cbm_core.errors import InputError
from cbm_plugins.analyst._chips import calendar
from cbm_plugins.analyst._plots import FinishedRun, open_run
from cbm_plugins.workbench._data import TILE_ZOOM, Workbench, tile_key
from cbm_plugins.workbench._tiles import EXPORT_MAX_TILES, EXPORT_ZOOMS, backgrounds, render_tile, tiles_over

STATIC = Path(__file__).with_name("static")
CHIP_COLUMNS = 6
CHIP_COUNT = 12  # dates on a panel's chip calendar
CHIP_SIZE = 96  # pixels across a chip on the panel


def page(mode: str, base: str, static: str, title: str) -> str:
    """The workbench page: the same HTML for the server and the export, told where its data is."""
    settings = json.dumps({"mode": mode, "base": base})
    safe_title = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        (STATIC / "index.html")
        .read_text(encoding="utf-8")
        .replace("{{static}}", static)
        .replace("{{settings}}", settings.replace("</", "<\\/"))
        .replace("{{title}}", safe_title)
    )


def chip_png(run: FinishedRun, pid: int) -> bytes:
    """A parcel's chip calendar for the panel: CHIP_COUNT dates (used ones first), events marked."""
    import io

    figure = calendar(run, pid, max_chips=CHIP_COUNT, columns=CHIP_COLUMNS, size=CHIP_SIZE)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=60)
    return buffer.getvalue()


def open_any(path: str | Path) -> FinishedRun:
    """A run's configuration file, or its out folder (its summary.json names the configuration)."""
    path = Path(path)
    if path.is_dir():
        summary = path / "summary.json"
        if not summary.is_file():
            raise InputError(f"{path}: no summary.json here; give the run's configuration or out folder")
        return open_run(json.loads(summary.read_text(encoding="utf-8"))["config"])
    return open_run(path)


def export(
    run: str | Path | FinishedRun,
    out_dir: str | Path,
    *,
    chips: str = "flagged",
    chip_limit: int = 500,
    background_tiles: bool = True,
) -> dict[str, Any]:
    """Write the static workbench of a finished run to `out_dir`; return what was written.

    Parameters
    ----------
    run
        The run's configuration file or out folder (or an opened run).
    out_dir
        Folder to write (made when missing); open its index.html in a browser.
    chips
        Chip calendars for ``flagged`` parcels, ``all`` or ``none`` (each takes a second or so).
    chip_limit
        At most this many calendars; the page says which parcels have none.
    background_tiles
        Render Sentinel-2 map tiles (clearest scene, zooms 13-16) over the parcels.

    Returns
    -------
    dict
        Counts: parcels, tiles, panels, chips, background tiles, and messages about what was cut.

    Examples
    --------
    >>> export("demo/flanders.toml", "workbench/")  # doctest: +SKIP
    {'parcels': 18, 'tiles': 1, ...}
    """
    if chips not in ("flagged", "all", "none"):
        raise InputError(f"chips {chips!r}: use flagged, all or none")
    done = run if isinstance(run, FinishedRun) else open_any(run)
    bench = Workbench(done)
    bench.preload()
    out = Path(out_dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    if (out / "static").exists():
        shutil.rmtree(out / "static")
    shutil.copytree(STATIC, out / "static", ignore=shutil.ignore_patterns("index.html"))
    notes: list[str] = []
    _put(data, "index", bench.index_bytes())
    members = bench.tile_members()
    for x, y in members:
        _put(data, f"tiles/{TILE_ZOOM}/{x}/{y}", bench.tile_bytes(x, y))
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    centres = bench.parcels.geometry.representative_point().to_crs("EPSG:4326")
    for pid, point in zip(bench.parcels["pid"], centres, strict=True):
        if point is not None and not point.is_empty:
            groups[tile_key(point.x, point.y)].append(int(pid))
    for (x, y), pids in groups.items():
        _put(data, f"details/{TILE_ZOOM}/{x}/{y}", bench.panels(pids))
    lights = bench.parcels.set_index("pid")["light"]
    wanted = (
        []
        if chips == "none"
        else [int(p) for p in bench.parcels["pid"] if chips == "all" or lights[p] in ("red", "yellow")]
    )
    if len(wanted) > chip_limit:
        notes.append(f"chip calendars exported for {chip_limit} of {len(wanted)} parcels (--chip-limit)")
        wanted = wanted[:chip_limit]
    (data / "chips").mkdir(exist_ok=True)
    for pid in wanted:
        (data / "chips" / f"{pid}.png").write_bytes(chip_png(done, pid))
    layers = backgrounds(done, bench.s2_dates)
    rendered = 0
    meta = bench.meta(wanted, layers)
    if background_tiles:
        for layer in layers:
            if layer["kind"] == "xyz" or not layer.get("obsids"):
                continue
            obsid = layer["obsids"][0]
            layer["exported"] = [obsid]
            count = 0
            for z in EXPORT_ZOOMS:
                for x, y in tiles_over(meta["bounds"], z):
                    if count >= EXPORT_MAX_TILES:
                        break
                    target = data / "bg" / layer["id"] / obsid / str(z) / str(x) / f"{y}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(render_tile(done, layer["id"], obsid, z, x, y))
                    count += 1
            if count >= EXPORT_MAX_TILES:
                notes.append(f"{layer['name']}: stopped at {EXPORT_MAX_TILES} tiles")
            rendered += count
    meta["backgrounds"] = layers
    meta["notes"] = notes
    meta["detailZoom"] = TILE_ZOOM
    _put(data, "meta", meta)
    (out / "index.html").write_text(page("static", "data/", "static/", meta["title"]), encoding="utf-8")
    return {
        "parcels": int(meta["count"]),
        "tiles": len(members),
        "panels": int(sum(len(p) for p in groups.values())),
        "chips": len(wanted),
        "background_tiles": rendered,
        "notes": notes,
    }


def _put(folder: Path, key: str, value: bytes | dict | list) -> None:
    """A data file the page loads with a script tag: CBM.put(key, base64 bytes or JSON)."""
    target = folder / f"{key}.js"
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, bytes):
        payload = json.dumps(base64.b64encode(value).decode("ascii"))
    else:
        payload = json.dumps(value, separators=(",", ":"), default=_plain)
    target.write_text(f"CBM.put({json.dumps(key)},{payload});\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")
