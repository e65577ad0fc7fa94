"""What the workbench page reads, built from a finished run: compact binary parcels, one JSON per
parcel panel, chip calendars and Sentinel-2 map tiles.

Parcels travel in two compact binary forms, never as one GeoJSON:

- the *index*: one row per parcel in columns (pid int32, light uint8, crop uint16, flagging
  markers uint32 bit mask, centroid lon/lat float32): 19 bytes a parcel, 19 MB for 1M parcels,
  enough for the filters, the flagged list and the dots drawn at low zoom;
- *tiles*: the outlines of the parcels touching one Web-Mercator tile of zoom TILE_ZOOM, simplified
  and quantised to TILE_EXTENT units of that tile (int16), drawn by the page from zoom
  POLYGON_MIN_ZOOM on; a view loads only the tiles it shows.

Both go through the same code whether the page is served by `cbm serve` (binary responses) or
exported to a folder (the bytes wrapped in small ``.js`` files, so the page opens from disk, where
a browser refuses ``fetch``).
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from cbm_core.errors import CbmError
from cbm_core.model import HIST_COLUMNS, TimeSeries, ValidityPolicy, unusable_share
from cbm_plugins.analyst._plots import LIGHT_COLOURS, FinishedRun, data_notes

TILE_ZOOM = 14  # parcels are cut into tiles of this zoom (about 1.5 km wide at 50° N)
TILE_EXTENT = 4096  # quantisation units across a tile (0.6 Mercator metres at TILE_ZOOM)
POLYGON_MIN_ZOOM = 13  # below, the page draws a dot per parcel from the index
SIMPLIFY_UNITS = 0.5  # outlines simplified by half a quantisation unit: invisible at zoom 18
WORLD = 2 * math.pi * 6378137.0  # Web-Mercator world width in metres
LIGHTS = ("", "green", "yellow", "red")  # light code in the index -> light
PEER_SAMPLE = 200  # same-crop parcels sampled for a crop's peer band
INDEX_ROW_BYTES = 4 + 1 + 2 + 4 + 4 + 4


@dataclass
class Workbench:
    """The workbench data of one finished run (a `FinishedRun` of the analyst plugin)."""

    run: FinishedRun
    title: str = ""
    _tiles: dict[tuple[int, int], list[int]] | None = field(default=None, repr=False)

    # Parcels -----------------------------------------------------------------------------------

    @cached_property
    def parcels(self) -> gpd.GeoDataFrame:
        """The parcels in pid order with their light, in Web Mercator (what the map draws)."""
        parcels = self.run.parcels[["pid", "crop_code", "crop_name", "geometry"]].copy()
        parcels["pid"] = parcels["pid"].astype("int64")
        parcels = parcels.sort_values("pid", ignore_index=True)
        verdicts = self.run.verdicts[["pid", "light", "reasons"]].copy()
        verdicts["pid"] = verdicts["pid"].astype("int64")
        parcels = parcels.merge(pd.DataFrame(verdicts), on="pid", how="left")
        parcels["light"] = parcels["light"].fillna("").astype(str)
        parcels["reasons"] = parcels["reasons"].fillna("").astype(str)
        parcels["crop"] = [
            _text(name) or _text(code) or "—"
            for name, code in zip(parcels["crop_name"], parcels["crop_code"], strict=True)
        ]
        frame = gpd.GeoDataFrame(parcels, geometry="geometry", crs=self.run.parcels.crs)
        return frame.to_crs("EPSG:3857")

    @cached_property
    def crops(self) -> list[str]:
        return sorted(set(self.parcels["crop"]))

    @cached_property
    def markers(self) -> list[str]:
        return sorted(set(self.run.results["marker"].astype(str))) if len(self.run.results) else []

    @cached_property
    def flagging(self) -> np.ndarray:
        """Per parcel (pid order) the bit mask of the markers whose status is not OK."""
        mask = np.zeros(len(self.parcels), dtype=np.uint32)
        results = self.run.results
        if results.empty:
            return mask
        flagged = results[~results["status"].astype(str).str.upper().isin(["OK", "GREEN"])]
        position = pd.Series(np.arange(len(self.parcels)), index=self.parcels["pid"].to_numpy())
        for bit, marker in enumerate(self.markers[:32]):
            pids = flagged.loc[flagged["marker"].astype(str) == marker, "pid"].astype("int64")
            rows = position.reindex(pids.to_numpy()).dropna().to_numpy(int)
            mask[rows] |= np.uint32(1 << bit)
        return mask

    def index_bytes(self) -> bytes:
        """The parcel index: a uint32 row count, then the columns (see the module docstring)."""
        parcels = self.parcels
        light = np.array([LIGHTS.index(x) if x in LIGHTS else 0 for x in parcels["light"]], dtype=np.uint8)
        crop = np.array([self.crops.index(c) for c in parcels["crop"]], dtype=np.uint16)
        centres = parcels.geometry.representative_point().to_crs("EPSG:4326")
        lon = np.nan_to_num(centres.x.to_numpy(), nan=0).astype(np.float32)
        lat = np.nan_to_num(centres.y.to_numpy(), nan=0).astype(np.float32)
        columns = (
            parcels["pid"].to_numpy().astype("<i4"),
            self.flagging.astype("<u4"),
            lon.astype("<f4"),
            lat.astype("<f4"),
            crop.astype("<u2"),
            light,
        )  # 4-byte columns first so every column starts aligned for typed arrays
        return struct.pack("<I", len(parcels)) + b"".join(c.tobytes() for c in columns)

    def tile_members(self) -> dict[tuple[int, int], list[int]]:
        """Row numbers of the parcels touching each TILE_ZOOM tile."""
        if self._tiles is None:
            bounds = self.parcels.geometry.bounds.to_numpy()
            size = WORLD / 2**TILE_ZOOM
            members: dict[tuple[int, int], list[int]] = defaultdict(list)
            for row, (x0, y0, x1, y1) in enumerate(bounds):
                if not np.isfinite(x0):
                    continue
                tx0, tx1 = int((x0 + WORLD / 2) // size), int((x1 + WORLD / 2) // size)
                ty0, ty1 = int((WORLD / 2 - y1) // size), int((WORLD / 2 - y0) // size)
                for tx in range(tx0, tx1 + 1):
                    for ty in range(ty0, ty1 + 1):
                        members[(tx, ty)].append(row)
            self._tiles = dict(members)
        return self._tiles

    def tile_bytes(self, x: int, y: int) -> bytes:
        """Outlines of the parcels touching tile (TILE_ZOOM, x, y): a uint32 count, then per parcel
        its index row (uint32), ring count (uint16) and per ring a point count (uint16) and int16
        x, y pairs in TILE_EXTENT units of the tile (beyond 0..extent where a parcel spills over)."""
        rows = self.tile_members().get((x, y), [])
        size = WORLD / 2**TILE_ZOOM
        unit = size / TILE_EXTENT
        left, top = x * size - WORLD / 2, WORLD / 2 - y * size
        out = io.BytesIO()
        out.write(struct.pack("<I", len(rows)))
        geometries = self.parcels.geometry.to_numpy()
        for row in rows:
            shape = shapely.simplify(geometries[row], unit * SIMPLIFY_UNITS, preserve_topology=True)
            rings = [r for polygon in _polygons(shape) for r in (polygon.exterior, *polygon.interiors)]
            rings = [r for r in rings if len(r.coords) >= 4][:65535]
            out.write(struct.pack("<IH", row, len(rings)))
            for ring in rings:
                xy = np.asarray(ring.coords)[:, :2]
                q = np.empty_like(xy)
                q[:, 0] = (xy[:, 0] - left) / unit
                q[:, 1] = (top - xy[:, 1]) / unit
                q = np.clip(np.round(q), -32767, 32767).astype("<i2")
                keep = np.ones(len(q), dtype=bool)
                keep[1:] = np.any(q[1:] != q[:-1], axis=1)  # drop repeats after rounding
                q = q[keep][:65535]
                out.write(struct.pack("<H", len(q)))
                out.write(q.tobytes())
        return out.getvalue()

    # Panels ------------------------------------------------------------------------------------

    @cached_property
    def policy(self) -> ValidityPolicy:
        """The run's validity policy (its scheme's), the default one where the scheme is not known
        (a dataset served without its run configuration)."""
        try:
            return self.run.policy
        except (CbmError, TypeError, AttributeError):
            return ValidityPolicy()

    @cached_property
    def s2_dates(self) -> list[dict[str, Any]]:
        """The Sentinel-2 scenes with their share of parcels valid under the core's policy (the
        background layers offer them, the clearest first)."""
        scenes = self.run.catalogue[self.run.catalogue["card"] == "s2"]
        store = self.run.engine.read_store(self.run.config.store, obsids=list(scenes["obsid"]))
        share = {}
        if not store.scl.empty:
            bad = unusable_share(store.scl, self.policy.unusable_classes)
            valid = pd.Series(bad <= self.policy.max_unusable_share, index=store.scl["obsid"].astype(str))
            share = valid.groupby(level=0).mean().to_dict()
        dates = [
            {
                "obsid": str(s.obsid),
                "date": f"{pd.Timestamp(s.obstime):%Y-%m-%d}",
                "valid": round(float(share.get(str(s.obsid), 0.0)), 3),
                "bands": sorted(s.bands),
            }
            for s in scenes.itertuples(index=False)
        ]
        return sorted(dates, key=lambda d: (-d["valid"], d["date"]))

    def meta(self, chips: Iterable[int] = (), backgrounds: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """Everything the page needs before drawing: names behind the index codes, colours, the
        extent, the flagged parcels' reasons, crop peer bands, background layers."""
        parcels = self.parcels
        flagged = parcels[parcels["light"].isin(["red", "yellow"])]
        extent = self.run.parcels.to_crs("EPSG:4326").total_bounds if len(parcels) else [0, 0, 0, 0]
        return {
            "title": self.title or str(self.run.config.path),
            "count": len(parcels),
            "lights": list(LIGHTS),
            "colours": {**LIGHT_COLOURS, "": "#9e9e9e"},
            "crops": self.crops,
            "markers": self.markers,
            "bounds": [[float(extent[1]), float(extent[0])], [float(extent[3]), float(extent[2])]],
            "tileZoom": TILE_ZOOM,
            "tileExtent": TILE_EXTENT,
            "polygonMinZoom": POLYGON_MIN_ZOOM,
            "reasons": {str(int(p)): r for p, r in zip(flagged["pid"], flagged["reasons"], strict=True)},
            "chips": sorted(int(p) for p in chips),
            "backgrounds": list(backgrounds),
            "dates": self.s2_dates,
        }

    def preload(self) -> None:
        """Read every parcel's series once (an export makes every panel: one store read, one screen)."""
        self._observations = observations_all(self.run.series(list(self.parcels["pid"])), self.policy)

    def _observed(self, pids: Sequence[int]) -> dict[str, pd.DataFrame]:
        """The observations of some parcels: from the preloaded ones, or read now."""
        found = getattr(self, "_observations", None)
        if found is None:
            return observations_all(self.run.series([int(p) for p in pids]), self.policy)
        wanted = set(int(p) for p in pids)
        return {card: frame[frame["pid"].isin(wanted)] for card, frame in found.items()}

    def panels(self, pids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """The parcel panel of each pid: series (S2 NDVI valid/rejected with the reason, S1 dB,
        coherence), marker results and events, verdict and reasons, crop peers, notes on missing data."""
        pids = [int(p) for p in pids]
        observed = self._observed(pids)
        groups = {card: dict(tuple(frame.groupby("pid", sort=False))) for card, frame in observed.items()}
        results = self.run.results
        wanted = results[results["pid"].isin(pids)] if len(results) else results
        result_groups = dict(tuple(wanted.groupby("pid", sort=False))) if len(wanted) else {}
        parcels = self.parcels.set_index("pid")
        out = {}
        for pid in pids:
            obs = {card: groups[card].get(pid, observed[card].iloc[0:0]) for card in observed}
            row = parcels.loc[pid]
            marks = result_groups.get(pid, results.iloc[0:0])
            used = {o for text in marks["obsids"] for o in json.loads(text or "[]")} if len(marks) else set()
            out[pid] = {
                "pid": pid,
                "light": row["light"],
                "reasons": [r for r in str(row["reasons"]).split("; ") if r],
                "crop": row["crop"],
                "notes": data_notes(obs, self.run.cards),
                "s2": _columns(
                    obs["s2"], {"NDVI": "ndvi", "clear": "valid", "cloudy": "unusable", "why": "why"}, used
                ),
                "bs": _columns(obs["bs"], {"VV_dB": "VV", "VH_dB": "VH"}),
                "c6": _columns(obs["c6"], {"VV": "VV", "VH": "VH"}),
                "weather": self.weather(pid),
                "markers": [
                    {
                        "marker": str(m.marker),
                        "status": str(m.status),
                        "reason": str(m.reason or ""),
                        "confidence": None if pd.isna(m.confidence) else round(float(m.confidence), 3),
                        "events": [
                            {k: e.get(k) for k in ("kind", "start", "main", "end")}
                            for e in json.loads(m.events or "[]")
                        ],
                    }
                    for m in marks.itertuples(index=False)
                ],
                "peers": self.peer_band(row["crop"]),
            }
        return out

    def weather(self, pid: int) -> dict[str, list]:
        """Daily precipitation and mean temperature at the parcel when the run names a weather source
        ([analyst] meteo); empty lists without one or outside its cells."""
        if self.run.config.analyst.get("meteo") is None:
            return {"dates": [], "prec": [], "tmean": []}
        daily = self.run.weather(pid)
        if daily.empty:
            return {"dates": [], "prec": [], "tmean": []}
        return {
            "dates": [f"{pd.Timestamp(d):%Y-%m-%d}" for d in daily["meteo_date"]],
            "prec": _rounded(daily["prec"]),
            "tmean": _rounded(daily["tmean"]),
        }

    def peer_band(self, crop: str) -> dict[str, Any]:
        """The valid NDVI of (a sample of) the parcels declared with a crop: 10/50/90 % per date."""
        cache = self.__dict__.setdefault("_peer_bands", {})
        if crop not in cache:
            same = self.parcels.loc[self.parcels["crop"] == crop, "pid"].to_numpy()
            if len(same) > PEER_SAMPLE:
                same = np.sort(np.random.default_rng(0).choice(same, PEER_SAMPLE, replace=False))
            s2 = self._observed(same)["s2"]
            valid = s2[s2["clear"].astype(bool)] if len(s2) else s2
            if valid.empty:
                cache[crop] = {"count": len(same), "dates": [], "p10": [], "p50": [], "p90": []}
            else:
                q = valid.groupby("date")["NDVI"].quantile([0.1, 0.5, 0.9]).unstack()
                cache[crop] = {
                    "count": len(same),
                    "dates": [f"{d:%Y-%m-%d}" for d in q.index],
                    **{k: _rounded(q[v]) for k, v in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))},
                }
        return cache[crop]


def observations_all(series: TimeSeries, policy: ValidityPolicy) -> dict[str, pd.DataFrame]:
    """The analyst's `observations` for every parcel of a series at once (one pivot per card, one
    screen), each frame with a pid column and in (pid, date) order."""
    s2 = _wide(series.stats, "s2", ("B02", "B04", "B08"))
    with np.errstate(divide="ignore", invalid="ignore"):
        s2["NDVI"] = (s2["B08"] - s2["B04"]) / (s2["B08"] + s2["B04"])
    s2 = s2[np.isfinite(s2["NDVI"])].reset_index(drop=True)
    hist = None
    if len(series.scl):
        scl = series.scl.assign(obsid=series.scl["obsid"].astype(str)).drop_duplicates(["pid", "obsid"])
        keyed = scl.set_index(["pid", "obsid"])[list(HIST_COLUMNS)]
        hist = keyed.reindex(pd.MultiIndex.from_arrays([s2["pid"], s2["obsid"]])).to_numpy(np.float64)
    days = (s2["date"] - pd.Timestamp("1970-01-01")).dt.total_seconds().to_numpy() / 86400.0
    screened = policy.screen(
        s2["pid"].to_numpy(),
        days,
        hist,
        blue=s2["B02"].to_numpy(float),
        red=s2["B04"].to_numpy(float),
        ndvi=s2["NDVI"].to_numpy(float),
    )
    s2 = s2.assign(cloudy=screened.unusable, clear=screened.valid, why=screened.reason)
    bs = _wide(series.stats, "bs", ("VV", "VH"))
    with np.errstate(divide="ignore", invalid="ignore"):
        for band in ("VV", "VH"):
            linear = bs[band].to_numpy(float)
            bs[f"{band}_dB"] = np.where(linear > 0, 10 * np.log10(linear), np.nan)
    return {
        "s2": s2[["pid", "date", "obsid", "NDVI", "cloudy", "clear", "why"]],
        "bs": bs[["pid", "date", "obsid", "orbit", "VV_dB", "VH_dB"]],
        "c6": _wide(series.stats, "c6", ("VV", "VH"))[["pid", "date", "obsid", "orbit", "VV", "VH"]],
    }


def _wide(stats: pd.DataFrame, card: str, bands: Sequence[str]) -> pd.DataFrame:
    """A card's parcel means as one row per (pid, observation) and one column per band."""
    rows = stats[(stats["card"].astype(str) == card) & stats["band"].astype(str).isin(bands)]
    keys = ["pid", "obstime", "obsid", "orbit"]
    wide = (
        rows.assign(obsid=rows["obsid"].astype(str), orbit=rows["orbit"].astype(object).fillna(""))
        .pivot_table(index=keys, columns="band", values="mean", aggfunc="first", observed=True)
        .reset_index()
    )
    wide.columns.name = None
    wide = wide.reindex(columns=[*keys, *bands]).sort_values(["pid", "obstime"], ignore_index=True)
    wide.insert(1, "date", pd.to_datetime(wide["obstime"], utc=True).dt.tz_convert(None).dt.normalize())
    return wide.drop(columns="obstime")


def tile_key(lon: float, lat: float, zoom: int = TILE_ZOOM) -> tuple[int, int]:
    """The (x, y) of the Web-Mercator tile holding a point."""
    x = (lon + 180.0) / 360.0 * 2**zoom
    lat = max(min(lat, 85.05112878), -85.05112878)
    y = (1 - math.log(math.tan(math.radians(lat)) + 1 / math.cos(math.radians(lat))) / math.pi) / 2 * 2**zoom
    return int(x), int(y)


def _columns(frame: pd.DataFrame, names: dict[str, str], used: set[str] | None = None) -> dict[str, list]:
    """A card's observations as JSON columns: dates, obsids, the renamed values (None for NaN)."""
    out: dict[str, list] = {
        "dates": [f"{d:%Y-%m-%d}" for d in frame["date"]] if len(frame) else [],
        "obsids": [str(o) for o in frame["obsid"]] if len(frame) else [],
    }
    for column, name in names.items():
        values = frame[column] if column in frame else pd.Series([], dtype=float)
        if pd.api.types.is_bool_dtype(values):
            out[name] = [bool(v) for v in values]
        elif pd.api.types.is_numeric_dtype(values):
            out[name] = _rounded(values)
        else:
            out[name] = ["" if v is None or pd.isna(v) else str(v) for v in values]
    if used is not None:
        out["used"] = [o in used for o in out["obsids"]]
    return out


def _rounded(values: Iterable[Any]) -> list[float | None]:
    return [None if v is None or not np.isfinite(float(v)) else round(float(v), 4) for v in values]


def _polygons(shape: shapely.Geometry) -> list[shapely.Polygon]:
    if shape is None or shape.is_empty:
        return []
    if isinstance(shape, shapely.Polygon):
        return [shape]
    return [g for g in getattr(shape, "geoms", []) if isinstance(g, shapely.Polygon)]


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()
