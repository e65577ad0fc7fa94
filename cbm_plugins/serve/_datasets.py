"""The datasets a server serves: one aoi/year each, its source and store plugins, cached reads, and
the lookup that checks a user's right to the dataset's aoi."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from cbm_core.config import PluginConfig
from cbm_core.errors import ConfigError
from cbm_core.outputs import read_results
from cbm_core.plugins import PluginManager
from cbm_plugins.serve._files import Files
from cbm_plugins.serve._http import ApiError
from cbm_plugins.serve._users import User

AOI = r"^[A-Za-z0-9_-]{1,32}$"
LEGACY_KEY = re.compile(r"^(.+?)(\d{4})$")  # parcels=<aoi><year>
PID_MIN, PID_MAX = -(2**63), 2**63 - 1
EPOCH = pd.Timestamp(0, tz="UTC")
EXTENT_MARGIN = 0.05  # degrees (~5 km) around a dataset's parcels that still count as its area
CATALOGUE_TTL = 300.0  # seconds before a dataset's scene list is read again (new scenes appear)


@dataclass
class Dataset:
    """One aoi/year: where its parcels, scenes and signatures come from, with cached lookups.

    The reads go through the plugin manager (the hooks the [source] and [store] tables name), so a
    dataset is served the same from an embedded Parquet store as from PostGIS.
    """

    aoi: str
    year: int
    source: PluginConfig
    store: PluginConfig
    results: Path | None = None
    verdicts: Path | None = None
    meteo: PluginConfig | None = None
    backgrounds: dict[str, PluginConfig] = field(default_factory=dict)
    plugins: PluginManager | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _parcels: gpd.GeoDataFrame | None = field(default=None, repr=False)
    _codes: dict[str, int] | None = field(default=None, repr=False)
    _extent: tuple[float, float, float, float] | None = field(default=None, repr=False)
    _catalogue: tuple[float, gpd.GeoDataFrame, pd.DataFrame] | None = field(default=None, repr=False)
    _files: dict[Path, tuple[int, pd.DataFrame]] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        return f"{self.aoi}{self.year}".lower()

    def hook(self, plugin: PluginConfig, name: str) -> Callable[..., Any]:
        """The hook `name` of the plugin a [source] or [store] table names."""
        if self.plugins is None:
            raise RuntimeError(f"dataset {self.key} is not attached to a plugin manager")
        return self.plugins.caller(plugin.plugin, name, plugin.where)

    def parcels(self) -> gpd.GeoDataFrame:
        """Every parcel, indexed by pid, with its spatial index built once."""
        with self._lock:
            if self._parcels is None:
                frame = self.hook(self.source, "cbm_source_parcels")(config=self.source)
                frame.index = frame["pid"].to_numpy()
                frame.sindex  # noqa: B018 - build the spatial index once, under the lock
                if "parcel_code" in frame.columns:
                    self._codes = dict(
                        zip(frame["parcel_code"].astype(str), frame["pid"].tolist(), strict=True)
                    )
                self._parcels = frame
            return self._parcels

    def extent(self) -> tuple[float, float, float, float]:
        """The parcels' bounds in WGS84 (minx, miny, maxx, maxy)."""
        if self._extent is None:
            frame = self.parcels()
            self._extent = tuple(
                gpd.GeoSeries([shapely.box(*frame.total_bounds)], crs=frame.crs).to_crs(4326).total_bounds
            )
        return self._extent

    def near(self, lon: float, lat: float) -> bool:
        """Whether a WGS84 point lies within the parcels' extent, widened by EXTENT_MARGIN degrees."""
        minx, miny, maxx, maxy = self.extent()
        return (
            minx - EXTENT_MARGIN <= lon <= maxx + EXTENT_MARGIN
            and miny - EXTENT_MARGIN <= lat <= maxy + EXTENT_MARGIN
        )

    def pid_of(self, text: str) -> int | None:
        """The integer pid of a text parcel id (None when there is no such parcel id).

        The API speaks JRC text ids; the engine keys parcels by int64. A source that keeps the
        member state's own ids (a ``parcel_code`` column) is looked up by them; otherwise the text
        is the decimal integer pid.
        """
        self.parcels()
        if self._codes is not None:
            return self._codes.get(text)
        if not (text.isascii() and text.lstrip("-").isdigit()):
            return None
        number = int(text)
        return number if PID_MIN <= number <= PID_MAX else None

    def text_ids(self, pids: Any) -> list[str]:
        """The text ids the API answers with for some integer pids."""
        frame = self.parcels()
        if self._codes is not None:
            return frame["parcel_code"].reindex(np.asarray(pids, dtype=np.int64)).astype(str).tolist()
        return [str(p) for p in np.asarray(pids).tolist()]

    def parcel(self, pid: int) -> pd.Series:
        """One parcel's row (404 when the dataset has no such parcel)."""
        frame = self.parcels()
        if pid not in frame.index:
            raise ApiError(404, f"no parcel {pid} in {self.key}")
        return frame.loc[pid]

    def catalogue(self) -> gpd.GeoDataFrame:
        """The dataset's scenes indexed by obsid, re-read every CATALOGUE_TTL seconds."""
        with self._lock:
            if self._catalogue is None or time.monotonic() - self._catalogue[0] > CATALOGUE_TTL:
                try:
                    frame = self.hook(self.source, "cbm_source_catalogue")(config=self.source)
                except ConfigError as exc:  # e.g. a parcels-only source (weather, backgrounds)
                    print(f"cbm serve: dataset {self.key}: {exc}", file=sys.stderr)
                    raise ApiError(404, f"dataset {self.key} has no scene catalogue") from None
                frame.index = frame["obsid"].to_numpy()
                epoch = (pd.to_datetime(frame["obstime"], utc=True) - EPOCH) // pd.Timedelta(seconds=1)
                meta = pd.DataFrame({"epoch": epoch, "card": frame["card"], "orbit": frame["orbit"]})
                self._catalogue = (time.monotonic(), frame, meta)
            return self._catalogue[1]

    def scene_facts(self) -> pd.DataFrame:
        """epoch, card and orbit per obsid: the small lookup every time-series request needs."""
        self.catalogue()
        return self._catalogue[2]  # type: ignore[index]

    def table(self, what: str) -> pd.DataFrame:
        """The dataset's marker results or verdicts file (re-read when it changes)."""
        path = self.results if what == "results" else self.verdicts
        if path is None or not path.exists():
            raise ApiError(
                404, f"dataset {self.key} has no {what} (run `cbm run` and set '{what}' in the config)"
            )
        stamp = path.stat().st_mtime_ns
        with self._lock:
            cached = self._files.get(path)
            if cached is None or cached[0] != stamp:
                if path.suffix == ".parquet":  # markers.parquet's lists and structs as JSON text
                    frame = read_results(path) if what == "results" else pd.read_parquet(path)
                else:
                    frame = pd.read_csv(path)
                self._files[path] = cached = (stamp, frame)
            return cached[1]


class Datasets:
    """The served datasets by key, the request limits and the chip folder: every data route finds its
    dataset here."""

    def __init__(
        self, datasets: Sequence[Dataset], plugins: PluginManager, limits: dict[str, float], files: Files
    ) -> None:
        self.all = list(datasets)
        self.limits = limits
        self.files = files
        self._by_key = {d.key: d for d in self.all}
        for found in self.all:
            found.plugins = plugins

    def lookup(self, who: User, aoi: str | None, year: int | None, parcels: str | None) -> Dataset:
        """The dataset named by aoi + year, or by the legacy parcels=<aoi><year> form, if `who` may read
        it (403 otherwise; 404 only for datasets of an aoi the user may read, so that the answer
        does not reveal which datasets of other areas exist)."""
        if parcels is not None and aoi is None:
            key = parcels.lower()
            aoi = LEGACY_KEY.match(key).group(1) if LEGACY_KEY.match(key) else key  # <aoi><year>
        elif aoi is not None and year is not None:
            key = f"{aoi}{year}".lower()
        else:
            raise ApiError(400, "give aoi and year (or the legacy parcels=<aoi><year>)")
        found = self._by_key.get(key)
        if found is None and who.may_read(aoi):  # a missing dataset of another aoi is a 403 as well
            raise ApiError(404, f"no dataset {key}")
        if found is None or not who.may_read(found.aoi):
            raise ApiError(403, f"user {who.name} may not read dataset {key}")
        return found

    def covering(self, who: User, lon: float, lat: float) -> Dataset:
        """For clients that send no aoi: the first dataset `who` may read with parcels around and
        scenes at a location."""
        point = shapely.Point(lon, lat)
        for found in self.all:
            if who.may_read(found.aoi) and found.near(lon, lat):
                scenes = found.catalogue()
                if scenes.geometry.isna().all() or scenes.geometry.intersects(point).any():
                    return found
        raise ApiError(404, "no dataset you may read has scenes at this location")

    def with_parcels_at(self, who: User, lon: float, lat: float) -> Dataset:
        """For clients that send no aoi: the first dataset `who` may read with parcels around a point."""
        for found in self.all:
            if who.may_read(found.aoi) and found.near(lon, lat):
                return found
        raise ApiError(404, "no dataset you may read covers this location")
