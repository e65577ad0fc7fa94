"""Plots of a finished run: what an inspector looks at before deciding on a parcel.

Everything here reads a run's outputs (the configuration's out folder: signature store,
markers.parquet, verdicts.gpkg) and the catalogue through the configured plugins, so a plot
shows exactly what the markers and the rule saw. Figures are built without pyplot so that
batch reports do not accumulate global state.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from cbm_core.config import RunConfig, load_run_config, plugin_config
from cbm_core.errors import InputError
from cbm_core.model import HIST_COLUMNS, TimeSeries, ValidityPolicy, time_series
from cbm_core.outputs import RunResult, read_results
from cbm_core.pipeline import Engine

LIGHT_COLOURS = {"green": "#2e7d32", "yellow": "#f2a900", "red": "#c62828"}
CARD_TITLES = {"s2": "Sentinel-2 NDVI", "bs": "Sentinel-1 backscatter (dB)", "c6": "Sentinel-1 coherence",
               "weather": "Daily precipitation (mm) and temperature (°C)"}  # fmt: skip
WEATHER_HEIGHT = 0.6  # the weather panel's height relative to a series panel
EVENT_COLOURS = ("#6a1b9a", "#00838f", "#ef6c00", "#283593", "#ad1457")


@dataclass
class FinishedRun:
    """A run's outputs and the plugins that read its sources: the input of plots, chips, reports."""

    config: RunConfig
    engine: Engine
    parcels: gpd.GeoDataFrame
    catalogue: gpd.GeoDataFrame
    results: pd.DataFrame
    verdicts: gpd.GeoDataFrame

    @property
    def cards(self) -> list[str]:
        """The cards the run extracts (S2 first), which decide the panels of a parcel plot."""
        configured = {str(job.get("card")) for job in self.config.extract}
        return [c for c in ("s2", "bs", "c6") if c in configured] or ["s2"]

    def parcel(self, pid: int) -> pd.Series:
        """The declared parcel; an unknown pid is the user's mistake, said plainly."""
        rows = self.parcels[self.parcels["pid"] == int(pid)]
        if rows.empty:
            raise InputError(
                f"parcel {pid} is not among the {len(self.parcels)} parcels of {self.config.path}"
            )
        return rows.iloc[0]

    def series(self, pids: Sequence[int]) -> TimeSeries:
        """The stored signatures of some parcels as a time series."""
        stored = self.engine.read_store(self.config.store, pids=[int(p) for p in pids])
        return time_series(stored, self.catalogue, self.parcels[self.parcels["pid"].isin(pids)])

    def verdict(self, pid: int) -> tuple[str, list[str]]:
        """(light, reasons) of a parcel; ('', [...]) when the run gave it none."""
        rows = self.verdicts[self.verdicts["pid"] == int(pid)]
        if rows.empty:
            return "", ["no verdict in this run's verdicts.gpkg"]
        row = rows.iloc[0]
        return str(row["light"]), [r for r in str(row["reasons"]).split("; ") if r]

    def marker_results(self, pid: int) -> pd.DataFrame:
        """The marker results of a parcel (one row per marker)."""
        return self.results[self.results["pid"] == int(pid)].reset_index(drop=True)

    @property
    def policy(self) -> ValidityPolicy:
        """The run's observation-validity policy (its scheme's [validity] table): the one markers used."""
        return self.engine.run_scheme(self.config, check=False).validity

    def used_by_marker(self, pid: int) -> dict[str, set[str]]:
        """Per marker, the observations it based its result on (its `obsids`)."""
        return {
            str(row["marker"]): set(_json_list(row["obsids"]))
            for _, row in self.marker_results(pid).iterrows()
        }

    def used_obsids(self, pid: int) -> set[str]:
        """The observations the markers based their results on (their `obsids`)."""
        return {o for text in self.marker_results(pid)["obsids"] for o in _json_list(text)}

    def events(self, pid: int) -> list[dict[str, Any]]:
        """Every marker event of a parcel, decoded, with the marker's name and dates as Timestamps."""
        found = []
        for _, row in self.marker_results(pid).iterrows():
            for event in _json_list(row["events"]):
                found.append(
                    {
                        **event,
                        "marker": row["marker"],
                        **{k: pd.Timestamp(event[k]) for k in ("start", "main", "end")},
                    }
                )
        return found

    def weather(self, pid: int) -> pd.DataFrame:
        """Daily weather at the parcel over the run's period from the [analyst] meteo source
        (meteo_date, tmin, tmean, tmax, prec); empty without one or outside its cells."""
        table = self.config.analyst.get("meteo")
        if table is None:
            return pd.DataFrame()
        source = plugin_config(table, f"{self.config.analyst.where} meteo", self.config.base_dir)
        centre = (
            gpd.GeoSeries([self.parcel(pid).geometry], crs=self.parcels.crs).to_crs(4326).iloc[0].centroid
        )
        first, last = self.period()
        return self.engine.weather(source, (centre.x, centre.y), (first.date(), last.date()))

    def period(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        """First and last scene date of the catalogue (naive UTC), the x range of every plot."""
        times = _naive(self.catalogue["obstime"])
        if times.empty:
            raise InputError(f"{self.config.path}: the scene catalogue is empty")
        return times.min(), times.max()


RunLike = str | os.PathLike | RunResult | FinishedRun


def open_run(run: RunLike, engine: Engine | None = None) -> FinishedRun:
    """A finished run from its configuration file (or a RunResult, or an already opened run).

    Raises InputError naming the missing file when the run has not been made yet.
    """
    if isinstance(run, FinishedRun):
        return run
    if isinstance(run, RunResult):
        config = load_run_config(Path(run.summary["config"]))
        return FinishedRun(
            config, engine or Engine(progress=False), run.parcels, run.catalogue, run.results, run.verdicts
        )
    config = load_run_config(Path(run))
    engine = engine or Engine(progress=False)
    out = config.out_dir
    for name in ("markers.parquet", "verdicts.gpkg"):
        if not (out / name).is_file():
            raise InputError(f"{out / name} not found: run `cbm run {config.path}` first")
    return FinishedRun(
        config,
        engine,
        engine.parcels(config.source),
        engine.catalogue(config.source),
        read_results(out / "markers.parquet"),
        gpd.read_file(out / "verdicts.gpkg", layer="verdicts"),
    )


def observations(
    series: TimeSeries, pid: int, policy: ValidityPolicy | None = None
) -> dict[str, pd.DataFrame]:
    """One parcel's observations per card, in the units inspectors read.

    s2: date, obsid, NDVI, cloudy (unusable SCL share; NaN without SCL), clear (valid under the
    validity policy, the markers' own), why (the policy's reason for a rejection, "" when valid).
    bs: date, obsid, orbit, VV_dB, VH_dB (dB of the parcel mean of linear backscatter).
    c6: date, obsid, orbit, VV, VH (coherence 0..1).
    Cards without rows give empty frames.
    """
    policy = policy or ValidityPolicy()
    one = series.subset([int(pid)])
    out: dict[str, pd.DataFrame] = {}
    s2 = _card_frame(one, "s2", ("B02", "B04", "B08"))
    with np.errstate(divide="ignore", invalid="ignore"):
        s2["NDVI"] = (s2["B08"] - s2["B04"]) / (s2["B08"] + s2["B04"])
    s2 = s2[np.isfinite(s2["NDVI"])].reset_index(drop=True)
    scl = one.scl.assign(obsid=one.scl["obsid"].astype(str)).drop_duplicates("obsid").set_index("obsid")
    hist = scl.reindex(s2["obsid"])[list(HIST_COLUMNS)].to_numpy(np.float64) if len(scl) else None
    days = (s2["date"] - pd.Timestamp("1970-01-01")).dt.total_seconds().to_numpy() / 86400.0
    screened = policy.screen(
        np.full(len(s2), int(pid)),
        days,
        hist,
        blue=s2["B02"].to_numpy(float),
        red=s2["B04"].to_numpy(float),
        ndvi=s2["NDVI"].to_numpy(float),
    )
    s2 = s2.assign(cloudy=screened.unusable, clear=screened.valid, why=screened.reason)
    out["s2"] = _dated(s2)[["date", "obsid", "NDVI", "cloudy", "clear", "why"]]
    bs = _dated(_card_frame(one, "bs", ("VV", "VH")))
    with np.errstate(divide="ignore", invalid="ignore"):
        for band in ("VV", "VH"):
            linear = bs[band].to_numpy(float)
            bs[f"{band}_dB"] = np.where(linear > 0, 10 * np.log10(linear), np.nan)
    out["bs"] = bs.reindex(columns=["date", "obsid", "orbit", "VV_dB", "VH_dB"])
    c6 = _dated(_card_frame(one, "c6", ("VV", "VH")))
    out["c6"] = c6.reindex(columns=["date", "obsid", "orbit", "VV", "VH"])
    return out


def data_notes(obs: dict[str, pd.DataFrame], cards: Sequence[str]) -> list[str]:
    """What an inspector must know about missing data, in words (empty when nothing is missing)."""
    if all(obs[c].empty for c in cards):
        return ["No observations of this parcel in the signature store."]
    notes = []
    s2 = obs["s2"]
    if "s2" in cards and s2.empty:
        notes.append("No Sentinel-2 observation of this parcel.")
    elif "s2" in cards and not s2["clear"].any():
        notes.append(f"No valid Sentinel-2 observation: the validity policy rejects all {len(s2)}.")
    for card in ("bs", "c6"):
        if card in cards and obs[card].empty:
            notes.append(f"No {CARD_TITLES[card]} observation of this parcel.")
    return notes


def plot_parcel(run: RunLike, pid: int) -> Figure:
    """A parcel's time series (one panel per extracted card) with marker events and the verdict.

    The S2 panel shows the observations the run's validity policy accepts and those it rejects
    (grouped by reason), and rings the ones each marker used.
    """
    done = open_run(run)
    parcel = done.parcel(pid)
    obs = observations(done.series([pid]), pid, done.policy)
    weather = done.weather(pid)
    cards = done.cards
    if not weather.empty:  # rain and temperature right under the NDVI: a cut often follows a dry spell
        below = cards.index("s2") + 1 if "s2" in cards else 0
        cards = [*cards[:below], "weather", *cards[below:]]
    ratios = [WEATHER_HEIGHT if c == "weather" else 1 for c in cards]
    fig = Figure(figsize=(10, 2.2 + 2.3 * sum(ratios)), layout="constrained")
    axes = fig.subplots(len(cards), 1, sharex=True, squeeze=False, height_ratios=ratios)[:, 0]
    for ax, card in zip(axes, cards, strict=True):
        ax.set_title(CARD_TITLES[card], loc="left", fontsize=10)
        if card == "weather":
            _draw_weather(ax, weather)
        elif obs[card].empty:
            _say(ax, f"no {CARD_TITLES[card]} observations of this parcel")
        elif card == "s2":
            _draw_s2(ax, obs["s2"], done.used_by_marker(pid))
        elif card == "bs":
            _draw_lines(ax, obs["bs"], {"VV_dB": "VV", "VH_dB": "VH"}, "dB")
        else:
            _draw_lines(ax, obs["c6"], {"VV": "VV", "VH": "VH"}, "coherence")
    _draw_events(axes, done.events(pid))
    _date_axis(axes, done.period())
    light, reasons = done.verdict(pid)
    _title(fig, parcel, light, reasons)
    return fig


def plot_peers(run: RunLike, pid: int) -> Figure:
    """A parcel's clear NDVI and VV backscatter against the other parcels declared with the same crop.

    Peers share the crop code (or the crop name when codes are empty); the band is their 10-90 %
    range per date, the dashed line their median.
    """
    done = open_run(run)
    parcel = done.parcel(pid)
    peers, label = _peers(done.parcels, parcel)
    series = done.series([int(pid), *peers])
    policy = done.policy
    per_pid = {int(p): observations(series, p, policy) for p in [int(pid), *peers]}
    fig = Figure(figsize=(10, 6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, card, column, unit in (
        (axes[0], "s2", "NDVI", "NDVI (valid only)"),
        (axes[1], "bs", "VV_dB", "VV dB"),
    ):
        ax.set_title(f"{unit}: parcel {pid} vs {label}", loc="left", fontsize=10)
        mine = per_pid[int(pid)][card]
        if card == "s2":
            mine = mine[mine["clear"]]
        others = pd.concat([per_pid[p][card] for p in peers], ignore_index=True) if peers else mine.iloc[0:0]
        if card == "s2" and not others.empty:
            others = others[others["clear"]]
        if not others.empty:
            spread = others.groupby("date")[column].quantile([0.1, 0.5, 0.9]).unstack()
            ax.fill_between(spread.index, spread[0.1], spread[0.9], color="0.8", label="peers 10-90 %")
            ax.plot(spread.index, spread[0.5], "--", color="0.35", label="peers median")
        if not mine.empty:
            ax.plot(mine["date"], mine[column], "o-", color="#1565c0", label=f"parcel {pid}")
        if mine.empty and others.empty:
            _say(ax, "no observations of this parcel or its peers")
        elif mine.empty:
            _say(ax, f"no {'valid ' if card == 's2' else ''}observations of parcel {pid}")
        elif others.empty:
            _say(ax, "no peer observations", y=0.15)
        ax.set_ylabel(unit.split(" (")[0])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", fontsize=8)
    _draw_events(axes, done.events(pid))
    _date_axis(axes, done.period())
    light, reasons = done.verdict(pid)
    _title(fig, parcel, light, reasons)
    return fig


# Drawing helpers ---------------------------------------------------------------------------


REJECT_STYLES = {"SCL": "x", "haze": "^", "NDVI dip": "v", "second": "."}  # reason prefix -> marker


def _draw_s2(ax: Axes, s2: pd.DataFrame, used: dict[str, set[str]]) -> None:
    """Valid observations joined by a line, rejected ones grouped by the policy's reason, and a ring
    per marker around the observations it used (all valid: markers read the same policy)."""
    valid, rejected = s2[s2["clear"]], s2[~s2["clear"]]
    if not valid.empty:
        ax.plot(valid["date"], valid["NDVI"], "o-", color="#2e7d32", label=f"valid ({len(valid)})")
    for kind, group in rejected.groupby(rejected["why"].map(_reason_kind), sort=True):
        ax.plot(
            group["date"],
            group["NDVI"],
            REJECT_STYLES.get(kind.split(" ")[0], "x"),
            color="0.45",
            label=f"rejected: {kind} ({len(group)})",
        )
    for k, (marker, obsids) in enumerate(sorted(used.items())):
        marked = s2[s2["obsid"].isin(obsids)]
        if not marked.empty:
            ax.plot(
                marked["date"],
                marked["NDVI"],
                "o",
                ms=10 + 4 * k,
                mfc="none",
                mec=EVENT_COLOURS[k % len(EVENT_COLOURS)],
                label=f"used by {marker} ({len(marked)})",
            )
    if valid.empty:
        _say(ax, f"no valid observation: the validity policy rejects all {len(s2)}", y=0.85)
    ax.set_ylim(min(-0.1, float(s2["NDVI"].min()) - 0.05), 1.0)
    ax.set_ylabel("NDVI")
    ax.legend(loc="lower left", fontsize=7, ncol=2)


def _reason_kind(reason: str) -> str:
    """A rejection reason without its numbers ('SCL thin cirrus 100% > 5%' -> 'SCL thin cirrus')."""
    if reason.startswith("SCL "):
        return reason.rsplit(" ", 3)[0]
    for prefix in ("haze", "NDVI dip"):
        if reason.startswith(prefix):
            return prefix
    return reason


def _draw_lines(ax: Axes, frame: pd.DataFrame, columns: dict[str, str], unit: str) -> None:
    drawn = False
    for (column, label), colour in zip(columns.items(), ("#1565c0", "#e65100"), strict=True):
        values = frame[["date", column]].dropna()
        if not values.empty:
            ax.plot(values["date"], values[column], "o-", ms=4, color=colour, label=label)
            drawn = True
    if not drawn:
        _say(ax, f"no valid {unit} values")
        return
    ax.set_ylabel(unit)
    ax.legend(loc="lower left", fontsize=8)


def _draw_weather(ax: Axes, weather: pd.DataFrame) -> None:
    """Precipitation as bars, the daily mean temperature as a line within its min-max band."""
    days = pd.to_datetime(weather["meteo_date"])
    ax.bar(days, weather["prec"], width=1.0, color="#1e88e5", label="precipitation")
    ax.set_ylabel("mm")
    hot = ax.twinx()
    hot.fill_between(days, weather["tmin"], weather["tmax"], color="#e53935", alpha=0.15, lw=0)
    hot.plot(days, weather["tmean"], color="#e53935", lw=1, label="mean temperature")
    hot.set_ylabel("°C")


def _draw_events(axes: Sequence[Axes], events: list[dict[str, Any]]) -> None:
    """Events as shaded spans (start..end) with a line on the main date, labelled on the top panel."""
    markers = sorted({e["marker"] for e in events})
    for event in events:
        colour = EVENT_COLOURS[markers.index(event["marker"]) % len(EVENT_COLOURS)]
        for ax in axes:
            if event["end"] > event["start"]:
                ax.axvspan(event["start"], event["end"], color=colour, alpha=0.12, lw=0)
            ax.axvline(event["main"], color=colour, ls="--", lw=1.2)
        kind = event.get("kind") or event["marker"]
        axes[0].annotate(
            f"{kind} {event['main']:%d %b}",
            (event["main"], 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color=colour,
        )


def _date_axis(axes: Sequence[Axes], period: tuple[pd.Timestamp, pd.Timestamp]) -> None:
    first, last = period
    pad = max(pd.Timedelta(days=2), (last - first) * 0.03)
    locator = AutoDateLocator()
    for ax in axes:
        ax.set_xlim(first - pad, last + pad)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))


def _title(fig: Figure, parcel: pd.Series, light: str, reasons: list[str]) -> None:
    declared = " / ".join(str(v) for v in (parcel["crop_code"], parcel["crop_name"]) if _text(v)) or "no crop"
    head = f"Parcel {int(parcel['pid'])} — declared {declared} — verdict {light.upper() or 'NONE'}"
    body = "\n".join(textwrap.shorten(r, 140) for r in reasons[:4])
    fig.suptitle(
        f"{head}\n{body}",
        fontsize=10,
        ha="left",
        x=0.01,
        bbox={"boxstyle": "round", "fc": LIGHT_COLOURS.get(light, "#9e9e9e"), "alpha": 0.25, "ec": "none"},
    )


def _say(ax: Axes, message: str, y: float = 0.5) -> None:
    """A message in place of missing data, so a panel is never silently empty."""
    ax.text(0.5, y, message, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="#b71c1c")


def _peers(parcels: gpd.GeoDataFrame, parcel: pd.Series) -> tuple[list[int], str]:
    others = parcels[parcels["pid"] != parcel["pid"]]
    for column in ("crop_code", "crop_name"):
        if _text(parcel[column]):
            same = others[others[column].astype("string") == str(parcel[column])]
            return [int(p) for p in same["pid"]], f"{len(same)} peers declared {parcel[column]!s}"
    return [int(p) for p in others["pid"]], f"all {len(others)} other parcels (no crop declared)"


def _text(value: Any) -> bool:
    return value is not None and not pd.isna(value) and str(value).strip() != ""


def _card_frame(one: TimeSeries, card: str, bands: Sequence[str]) -> pd.DataFrame:
    """One parcel's observations of a card as a table: date (UTC day), obsid, orbit, one column per
    band (the parcel mean; NaN where a band is missing), in time order."""
    rows = one.stats[(one.stats["card"].astype(str) == card) & one.stats["band"].astype(str).isin(bands)]
    keys = ["obstime", "obsid", "orbit"]
    wide = (
        rows.assign(obsid=rows["obsid"].astype(str), orbit=rows["orbit"].astype(object).fillna(""))
        .pivot_table(index=keys, columns="band", values="mean", aggfunc="first", observed=True)
        .reset_index()
        .sort_values("obstime", ignore_index=True)
    )
    wide.columns.name = None
    wide = wide.reindex(columns=[*keys, *bands])
    wide.insert(0, "date", pd.to_datetime(wide["obstime"], utc=True).dt.tz_convert(None).dt.normalize())
    return wide.drop(columns="obstime")


def _dated(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(date=pd.to_datetime(frame["date"])) if len(frame) else frame


def _naive(times: pd.Series) -> pd.Series:
    times = pd.to_datetime(times, utc=True)
    return times.dt.tz_convert(None)


def _json_list(value: Any) -> list:
    """A list column of markers.parquet: a list (structured Parquet) or its JSON text."""
    if isinstance(value, str):
        return json.loads(value or "[]")
    return [] if value is None else list(value)
