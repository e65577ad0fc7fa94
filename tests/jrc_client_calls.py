"""Calls of the unchanged JRC client (PyPI cbm 0.0.18) against a running `cbm serve`.

Run by tests/test_jrc_client.py with the Python of the client's own virtualenv (.venv-jrc): it
imports only the client. Arguments: URL USER PASSWORD; the current folder is the client's
working folder (it writes config/ and temp/ there). Prints one JSON object: per call whether it
worked and what it returned (sizes, figure contents), so that the test can check the answers.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import matplotlib

matplotlib.use("Agg")  # no display

URL, USER, PASSWORD = sys.argv[1:4]
AOI, YEAR, PID = "fl", 2023, "7"
BE, BE_YEAR, BE_PID = "be", 2018, "BE18-9B424A-001"
LON, LAT = 5.0563, 51.2194
POLYGON = "5.050_51.214-5.062_51.214-5.062_51.223-5.050_51.223"
results: dict[str, dict] = {}


def call(name: str, function, check=lambda value: {}) -> None:
    try:
        value = function()
        results[name] = {"ok": True, **check(value)}
    except Exception as exc:  # the point: record what breaks, keep going
        results[name] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc()[-1500:],
        }


def figure(fig) -> dict:
    """What a figure shows: per axes the number of plotted points and of images."""
    if not hasattr(fig, "axes"):
        return {"figure": False, "returned": str(fig)[:200]}
    points = [sum(len(line.get_xdata()) for line in ax.get_lines()) for ax in fig.axes]
    images = [len(ax.get_images()) for ax in fig.axes]
    lines = {str(line.get_label()): len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines()}
    return {"figure": True, "points": points, "images": images, "lines": lines}


def columns(answer) -> dict:
    data = json.loads(answer) if isinstance(answer, (bytes, str)) else answer
    return {"columns": {k: len(v) if isinstance(v, list) else v for k, v in (data or {}).items()}}


os.makedirs("config", exist_ok=True)
import cbm  # noqa: E402 - after the folder the client's configuration goes into
from cbm.datas import api  # noqa: E402

cbm.set_api_account(URL, USER, PASSWORD)

call("datas.api.get_options", api.get_options, lambda v: {"options": json.loads(v)})
call("get.parcel_info.by_pid", lambda: cbm.get.parcel_info.by_pid(AOI, YEAR, PID), columns)
call("get.parcel_info.by_location", lambda: cbm.get.parcel_info.by_location(AOI, YEAR, LON, LAT), columns)
call("get.parcel_info.by_polygon", lambda: cbm.get.parcel_info.by_polygon(AOI, YEAR, POLYGON), columns)
call("get.parcels_list.peers", lambda: cbm.get.parcels_list.peers(AOI, YEAR, PID, 2000, 10), columns)
for tstype in ("s2", "bs", "c6", "scl"):
    call(
        f"get.time_series.by_pid[{tstype}]",
        lambda t=tstype: cbm.get.time_series.by_pid(AOI, YEAR, PID, t),
        columns,
    )
call("get.time_series.weather", lambda: cbm.get.time_series.weather(BE, BE_YEAR, BE_PID), columns)
call("show.time_series.ndvi", lambda: cbm.show.time_series.ndvi(AOI, YEAR, PID, view=False), figure)
call(
    "show.time_series.s2",
    lambda: cbm.show.time_series.s2(AOI, YEAR, PID, bands=["B04", "B08"], view=False),
    figure,
)
call("show.time_series.s1", lambda: cbm.show.time_series.s1(AOI, YEAR, PID, "bs", view=False), figure)
call(
    "show.time_series.weather", lambda: cbm.show.time_series.weather(BE, BE_YEAR, BE_PID, view=False), figure
)


def chips_listed(folder: str, band: str) -> dict:
    import pandas as pd

    table = pd.read_csv(os.path.join(folder, "chip_images", f"images_list.{band}.csv"), index_col=0)
    files = [f for f in os.listdir(os.path.join(folder, "chip_images")) if f.endswith(".tif")]
    return {"listed": len(table), "files": len(files), "dates": table["dates"].tolist()[:3]}


where = os.path.join("temp", f"{LON}_{LAT}".replace(".", "_"))
call("get.chip_images.by_location",
     lambda: cbm.get.chip_images.by_location(LON, LAT, "2023-04-01", "2023-04-30", "B08", 200),
     lambda _: chips_listed(where, "B08"))  # fmt: skip
for band in ("B04", "B08"):
    call(f"get.chip_images.by_pid[{band}]",
         lambda b=band: cbm.get.chip_images.by_pid(AOI, str(YEAR), PID, "2023-04-01", "2023-04-30", b, 300),
         lambda _, b=band: chips_listed(os.path.join("temp", AOI, str(YEAR), PID), b))  # fmt: skip
call("show.chip_images.by_pid[ndvi]",
     # the client joins year into a path here: it needs the year as text, as its own examples give it
     lambda: cbm.show.chip_images.by_pid(AOI, str(YEAR), PID, "2023-04-01", "2023-04-30", ["B04", "B08"], 300,
                                         view=False), figure)  # fmt: skip
call(
    "get.background.by_pid",
    lambda: cbm.get.background.by_pid(AOI, YEAR, PID, 256, 400, ["Google"]),
    lambda _: {"files": sorted(os.listdir(os.path.join("temp", AOI, str(YEAR), PID, "backgrounds")))},
)
call(
    "get.background.by_location",
    lambda: cbm.get.background.by_location(AOI, YEAR, LON, LAT, 256, 400, ["Google"]),
)
call(
    "show.parcel_info.by_pid",
    lambda: cbm.show.parcel_info.by_pid(AOI, YEAR, PID, tms="Google", view=False),
    figure,
)
call("show.background.by_pid",
     lambda: cbm.show.background.by_pid(AOI, YEAR, PID, 256, 400, ["Google"], view=False),
     figure)  # fmt: skip
print(json.dumps(results))
