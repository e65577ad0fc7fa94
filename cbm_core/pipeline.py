"""The pipeline: parcels + scenes -> signatures -> marker results -> verdicts, by calling plugins.

The Engine only orchestrates: it asks the plugin a configuration names to do each step, keeps
one plugin's failure on one scene or parcel from spoiling the rest, and records what happened.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cbm_core import runs
from cbm_core.config import (
    PluginConfig,
    RunConfig,
    Scheme,
    jobs_by_card,
    load_scheme,
    marker_name,
)
from cbm_core.errors import CbmError, ConfigError, InputError
from cbm_core.model import (
    Light,
    MarkerResult,
    RasterWindow,
    Scene,
    Signatures,
    Status,
    TimeSeries,
    Verdict,
    results_frame,
    validate_parcels,
    validate_signatures,
    verdict_table,
    verdicts_frame,
)
from cbm_core.outputs import ExtractReport, RunResult, describe_error
from cbm_core.partitions import context_batches, context_distance, pid_batches
from cbm_core.plugins import PluginManager, load_plugins

MARKER_BATCH = 20_000  # parcels per marker call: large enough to vectorise, small enough for memory


class Engine:
    """Calls the plugins named in a configuration, step by step."""

    def __init__(self, plugins: PluginManager | None = None, progress: bool | None = None) -> None:
        self.plugins = plugins if plugins is not None else load_plugins()
        self._progress_disabled = None if progress is None else not progress

    # Sources -----------------------------------------------------------------------------------

    def parcels(
        self, source: PluginConfig, bbox: tuple[float, float, float, float] | None = None
    ) -> gpd.GeoDataFrame:
        """The declared parcels, validated (unique integer pids, CRS, repaired geometries); with a
        bbox (EPSG:4326) at least those it touches, so a worker need not hold a whole country."""
        frame = self.plugins.caller(source.plugin, "cbm_source_parcels", source.where)(
            config=source, bbox=bbox
        )
        return validate_parcels(frame, f"parcels from {source.where} plugin '{source.plugin}'")

    def signatures(self, source: PluginConfig, pids: Sequence[int] | None = None) -> TimeSeries:
        """Ready-made signatures (another backend's statistics) as a time series, all pids if None;
        the parcels validated as declared parcels are."""
        series = self.plugins.caller(source.plugin, "cbm_source_signatures", source.where)(
            config=source, pids=pids
        )
        parcels = validate_parcels(  # signatures need no outlines: a parcel may be given by a point
            series.parcels, f"parcels from {source.where} plugin '{source.plugin}'", outlines=False
        )
        return TimeSeries(series.stats, series.scl, parcels.sort_values("pid", ignore_index=True))

    def catalogue(self, source: PluginConfig) -> gpd.GeoDataFrame:
        """The scene catalogue: one row per scene, sorted by time."""
        return self.plugins.caller(source.plugin, "cbm_source_catalogue", source.where)(config=source)

    def weather(
        self, source: PluginConfig, point: tuple[float, float], dates: tuple[Any, Any]
    ) -> pd.DataFrame:
        """Daily weather at a WGS84 point (meteo_date, tmin, tmean, tmax, prec); empty without a cell."""
        caller = self.plugins.caller(source.plugin, "cbm_source_weather", source.where)
        return caller(config=source, point=point, dates=dates)

    def orthophoto(
        self, source: PluginConfig, bounds: tuple[float, float, float, float], crs: str, pixels: int
    ) -> RasterWindow:
        """An RGB orthophoto of bounds (in crs) about pixels wide, from a background source."""
        caller = self.plugins.caller(source.plugin, "cbm_source_orthophoto", source.where)
        return caller(config=source, bounds=bounds, crs=crs, pixels=pixels)

    # Extraction --------------------------------------------------------------------------------

    def extract(
        self,
        parcels: gpd.GeoDataFrame,
        catalogue: gpd.GeoDataFrame,
        jobs: Sequence[PluginConfig],
        source: PluginConfig,
        store: PluginConfig | None = None,
        force: bool = False,
    ) -> tuple[Signatures, ExtractReport]:
        """Reduce every scene of the jobs' cards to signatures.

        With a store, each scene is written as soon as it is done and scenes already stored are
        skipped (unless force); the returned Signatures then hold only this pass's scenes.
        """
        report = ExtractReport()
        read_window = _window_reader(
            self.plugins.caller(source.plugin, "cbm_source_read_window", source.where), source
        )
        write = self.plugins.caller(store.plugin, "cbm_store_write", store.where) if store else None
        done = set() if (store is None or force) else self._stored_obsids(store)
        by_card = jobs_by_card(jobs)
        scenes = catalogue[catalogue["card"].isin(list(by_card))]
        in_footprint = _parcels_in_footprints(parcels, scenes)
        parts = []
        for row in tqdm(
            scenes.itertuples(index=False),
            total=len(scenes),
            desc="extract",
            unit="scene",
            disable=self._progress_disabled,
        ):
            scene = Scene(row.obsid, row.obstime, row.sensor, row.card, row.bands, row.orbit)
            if scene.obsid in done:
                report.skipped.append(scene.obsid)
                continue
            job = by_card[scene.card]
            call = self.plugins.caller(job.plugin, "cbm_extractor_extract", job.where)
            targets = parcels.iloc[in_footprint[scene.obsid]]
            try:
                failed_before = len(report.failed_parcels)
                signatures = self._extract_scene(call, scene, targets, job, read_window, report)
                failures = report.failed_parcels[failed_before:]
                if len(targets) and len(failures) == len(targets):  # the scene, not its parcels, is at fault
                    del report.failed_parcels[failed_before:]
                    raise InputError(
                        f"extractor '{job.plugin}' failed on every parcel: {failures[0]['reason']}"
                    )
                if write is not None:
                    report.rows += write(config=store, signatures=signatures, obsids=[scene.obsid])
                else:
                    report.rows += len(signatures.stats) + len(signatures.scl)
                    parts.append(signatures)
            except ConfigError:
                raise  # the configuration is at fault, not the scene: every scene would fail alike
            except CbmError as exc:
                report.failed[scene.obsid] = str(exc)
                continue
            report.extracted.append(scene.obsid)
        return Signatures.concat(parts), report

    def _extract_scene(self, call, scene, parcels, job, read_window, report) -> Signatures:
        """One scene; if the plugin crashes, isolate the parcels it fails on and keep the rest."""
        bands = list(job.require("bands"))

        def extract(positions: np.ndarray) -> list[Signatures]:
            subset = parcels.iloc[positions]
            return [call(scene=scene, parcels=subset, bands=bands, read_window=read_window, config=job)]

        def failed(positions: np.ndarray, exc: Exception) -> list[Signatures]:
            for pid in parcels["pid"].to_numpy()[positions]:
                report.failed_parcels.append(
                    {"obsid": scene.obsid, "pid": int(pid), "reason": describe_error(exc)}
                )
            return []

        out = Signatures.concat(_isolating(extract, np.arange(len(parcels)), failed, passthrough=(CbmError,)))
        return Signatures(
            validate_signatures(out.stats, f"extractor '{job.plugin}' on {scene.obsid}"), out.scl
        )

    def _stored_obsids(self, store: PluginConfig) -> set[str]:
        return set(self.plugins.caller(store.plugin, "cbm_store_obsids", store.where)(config=store))

    def read_store(
        self,
        store: PluginConfig,
        pids: Sequence[int] | None = None,
        obsids: Sequence[str] | None = None,
        bands: Sequence[str] | None = None,
    ) -> Signatures:
        """Signatures from a store, filtered by parcel, scene and band."""
        call = self.plugins.caller(store.plugin, "cbm_store_read", store.where)
        return call(config=store, pids=pids, obsids=obsids, bands=bands)

    # Markers and rules -------------------------------------------------------------------------

    def run_markers(self, series: TimeSeries, scheme: Scheme, only: np.ndarray | None = None) -> pd.DataFrame:
        """Every marker of the scheme over every parcel it applies to: one result per marker and parcel.

        A marker with a ``context_distance`` option (one comparing neighbours, like peers) gets
        spatially compact batches plus every parcel within that distance as context.
        only: the pids to score (default all); the other parcels of the series are only context.
        Parcels declared with a crop outside the scheme's [applies_to] get no result (their
        verdict is "not applicable"). Each batch is split by campaign year, given to markers as
        params["campaign_year"], so "MM-DD" season windows fall in each parcel's own year.
        """
        applicable = scheme.applicable(series.parcels)
        if not applicable.all():
            kept = series.parcels["pid"].to_numpy()[applicable]
            only = kept if only is None else np.intersect1d(only, kept)
        results: list[MarkerResult] = []
        own = series if only is None else series.subset(only)
        for config in scheme.markers:
            call = self.plugins.caller(config.plugin, "cbm_marker_run", config.where)
            name = marker_name(config)
            if name in scheme.skipped:  # an optional marker whose bands the data lack
                reason = f"not run: {scheme.skipped[name]}"
                pids = own.parcels["pid"].to_numpy(np.int64)
                results.extend(MarkerResult(name, int(p), Status.NOT_EXECUTED, reason) for p in pids)
                continue
            context = context_distance(config)
            if context > 0:
                batches = [
                    (batch, core if only is None else np.intersect1d(core, only))
                    for batch, core in context_batches(series, MARKER_BATCH, context)
                ]
                batches = [(batch, core) for batch, core in batches if len(core)]
            else:
                batches = [(batch, None) for batch in pid_batches(own, MARKER_BATCH)]
            for batch, core in tqdm(
                batches, desc=f"marker {name}", unit="batch", disable=self._progress_disabled
            ):
                for year, pids in campaign_years(batch, core).items():
                    params = scheme.params(config)
                    if year is not None:
                        params["campaign_year"] = year
                    part = batch if core is None and len(pids) == len(batch.parcels) else None
                    if context > 0:
                        results.extend(_run_isolated(call, name, batch, params, pids))
                    else:
                        results.extend(_run_isolated(call, name, part or batch.subset(pids), params))
        return results_frame(results)

    def decide(self, results: pd.DataFrame, parcels: gpd.GeoDataFrame, scheme: Scheme) -> gpd.GeoDataFrame:
        """One verdict per parcel, with the parcel's declaration and geometry."""
        return verdicts_frame(self.judge(results, parcels, scheme), parcels)

    def judge(self, results: pd.DataFrame, parcels: gpd.GeoDataFrame, scheme: Scheme) -> pd.DataFrame:
        """The verdict table (pid, light, reasons): one row per parcel.

        A rule failing on a parcel leaves that parcel yellow with the error. Rules judge each parcel
        on its own results, so a cluster judges each marker partition where it was scored.
        """
        rule = scheme.rule
        call = self.plugins.caller(rule.plugin, "cbm_rule_decide", rule.where)
        applicable = scheme.applicable(parcels)
        outside = parcels[~applicable]
        parcels = parcels[applicable]
        pids = parcels["pid"].to_numpy()
        params = scheme.params(rule)

        def rule_on(positions: np.ndarray) -> list[Verdict]:
            if len(positions) == len(pids):
                return list(call(results=results, parcels=parcels, params=params))
            chosen = parcels.iloc[positions]
            mine = results[results["pid"].isin(chosen["pid"])]
            return list(call(results=mine, parcels=chosen, params=params))

        def failed(positions: np.ndarray, exc: Exception) -> list[Verdict]:
            reason = f"rule {rule.plugin} failed: {describe_error(exc)}"
            return [Verdict(int(p), Light.YELLOW, [reason]) for p in pids[positions]]

        verdicts = _isolating(rule_on, np.arange(len(pids)), failed, passthrough=(CbmError,))
        decided = {v.pid for v in verdicts}
        missing = [int(p) for p in parcels["pid"] if int(p) not in decided]
        verdicts.extend(Verdict(p, Light.YELLOW, [f"rule {rule.plugin} gave no verdict"]) for p in missing)
        for pid, code, name in zip(outside["pid"], outside["crop_code"], outside["crop_name"], strict=True):
            declared = " ".join(str(v) for v in (code, name) if pd.notna(v) and str(v).strip())
            reason = f"not applicable: the scheme judges {scheme.scope}; declared {declared}"
            verdicts.append(Verdict(int(pid), Light.NOT_APPLICABLE, [reason]))
        return verdict_table(verdicts)

    def run_scheme(self, config: RunConfig, check: bool = True) -> Scheme:
        """The scheme of a run configuration: its inline tables, or the recipe it names with the
        dataset's own [applies_to] crops when it gives them; with check, the configuration is
        checked (plugins, options, windows) and each marker's bands against the extracted ones.
        Reading a finished run's outputs needs no check (check=False)."""
        scheme = config.scheme or self.scheme(str(config.scheme_ref), config.base_dir)
        if config.applies_to is not None:
            scheme = replace(scheme, crop_codes=config.applies_to[0], crop_names=config.applies_to[1])
        if check and config.extract:  # the bands the run extracts: a marker needing another is refused
            available: dict[str, set[str]] = {}
            for job in config.extract:
                available.setdefault(str(job.get("card")), set()).update(map(str, job.get("bands") or []))
            self.check(config, scheme)  # plugins and their options first: a typo is named as such
            scheme = replace(
                scheme, skipped=self.missing_bands(scheme, available, "the run's [[extract]] tables")
            )
        return scheme

    def scheme(self, ref: str, base_dir: Path) -> Scheme:
        """A scheme from a recipe name (shipped by a plugin) or a TOML file path."""
        recipes: dict[str, Path] = {}
        for found in self.plugins.hook.cbm_rule_schemes():
            recipes.update(found)
        path = recipes.get(ref)
        if path is None:
            path = Path(ref) if Path(ref).is_absolute() else base_dir / ref
            if not path.is_file():
                raise ConfigError(
                    f"scheme '{ref}' is neither a recipe ({', '.join(sorted(recipes)) or 'none installed'}) "
                    f"nor a file ({path})"
                )
        scheme = load_scheme(path)
        self.check_scheme(scheme)
        return scheme

    def check_scheme(self, scheme: Scheme) -> None:
        """Fail fast on a missing or wrong-kind marker or rule plugin, an option it does not know, or
        a season window that ends before it starts."""
        for marker in scheme.markers:
            self.plugins.caller(marker.plugin, "cbm_marker_run", marker.where)
            self.plugins.check_options(marker)
            for first, last in (("season_start", "season_end"), ("period_start", "period_end")):
                _check_window(marker.get(first), marker.get(last), f"{marker.where}: {first}/{last}")
        for name, rule in (scheme.rule.get("markers") or {}).items():
            if isinstance(rule, Mapping):
                where = f"{scheme.rule.where}: markers.{name} season_start/season_end"
                _check_window(rule.get("season_start"), rule.get("season_end"), where)
        self.plugins.caller(scheme.rule.plugin, "cbm_rule_decide", scheme.rule.where)
        self.plugins.check_options(scheme.rule)

    def missing_bands(
        self, scheme: Scheme, available: Mapping[str, Collection[str]], what: str
    ) -> dict[str, str]:
        """Check every marker's bands (cbm_marker_requires) against the bands a run has per card.

        A marker needing a band that is not there is refused (ConfigError naming marker and band);
        an ``optional = true`` marker is skipped instead: returns {marker name: why it is not run}.
        """
        skipped: dict[str, str] = {}
        for marker in scheme.markers:
            info = self.plugins.infos.get(marker.plugin)
            if info is None or "cbm_marker_requires" not in info.hooks:
                continue  # a plugin that declares nothing is trusted to say NOT_VALID itself
            call = self.plugins.caller(marker.plugin, "cbm_marker_requires", marker.where)
            needs = call(params=scheme.params(marker)) or {}
            for card, bands in needs.items():
                have = set(available.get(card, ()))
                for need in bands:
                    if any(alt in have for alt in str(need).split("|")):
                        continue
                    name = marker_name(marker)
                    text = " or ".join(str(need).split("|"))
                    listed = ", ".join(sorted(have)) or "none"
                    why = f"marker '{name}' needs {card} band {text}, which {what} lack(s) (it has: {listed})"
                    if not marker.get("optional", False):
                        raise ConfigError(f"{marker.where}: {why}")
                    skipped.setdefault(name, why)
        return skipped

    def check_bands(self, catalogue: gpd.GeoDataFrame, jobs: Sequence[PluginConfig]) -> None:
        """Refuse a band that no scene of the job's card has: it would silently yield no rows."""
        for job in jobs:
            scenes = catalogue[catalogue["card"] == job.get("card")]
            if scenes.empty:
                continue
            known = sorted({band for bands in scenes["bands"] for band in bands})
            missing = [b for b in job.require("bands") if b not in known]
            if missing:
                raise ConfigError(
                    f"{job.where}: band '{missing[0]}' is in no {job.get('card')} scene of the catalogue; "
                    f"its bands: {', '.join(known)}"
                )

    # The whole run -----------------------------------------------------------------------------

    def check(self, config: RunConfig, scheme: Scheme) -> None:
        """Fail fast, before any work, when a configured plugin is missing or of the wrong kind, or
        is given an option it does not know."""
        self.plugins.caller(config.source.plugin, "cbm_source_parcels", config.source.where)
        self.plugins.caller(config.store.plugin, "cbm_store_write", config.store.where)
        for job in config.extract:
            self.plugins.caller(job.plugin, "cbm_extractor_extract", job.where)
        for table in (config.source, config.store, *config.extract):
            self.plugins.check_options(table)
        self.check_scheme(scheme)

    def run(
        self, config: RunConfig, force: bool = False, cluster: Any = None, wait: bool = False
    ) -> RunResult:
        """`cbm run`: extract what is missing, score every parcel, write verdicts and a summary.

        cluster (a ClusterConfig or a dask Client; default: the config's [cluster] table) runs the
        same work units on dask.distributed; cbm_core.runs decides which strategy runs. A run
        holding the output folder is an error, or with wait is waited for (cbm_core.locks).
        """
        return runs.run(self, config, force=force, cluster=cluster, wait=wait)

    @property
    def progress_disabled(self) -> bool | None:
        """tqdm's ``disable``: None shows bars on terminals only, True hides them."""
        return self._progress_disabled


def _check_window(first: Any, last: Any, where: str) -> None:
    """Refuse a season window ('MM-DD' or full dates) that ends before it starts."""
    if not first or not last:
        return
    a, b = str(first), str(last)
    if len(a) != len(b):
        return  # "MM-DD" against a full date: resolved per campaign year, checked by the marker
    if b < a:  # ISO dates and MM-DD compare as text
        raise ConfigError(f"{where}: the window ends ({b}) before it starts ({a})")


def campaign_years(batch: TimeSeries, core: np.ndarray | None = None) -> dict[int | None, np.ndarray]:
    """The pids of a batch (or of its core) by campaign year.

    The year is the parcel's declared ``campaign_year`` where the parcels carry one; else the
    year of the middle of the parcel's own observations (so a batch mixing two seasons is not
    judged on one window); None for a parcel without declaration nor observation.
    """
    pids = batch.parcels["pid"].to_numpy(np.int64) if core is None else np.asarray(core, np.int64)
    years = pd.Series(np.nan, index=pids)
    if "campaign_year" in batch.parcels:
        declared = pd.to_numeric(batch.parcels.set_index("pid")["campaign_year"], errors="coerce")
        years = declared.reindex(pids)
    unknown = years.index[years.isna()]
    if len(unknown) and len(batch.stats):
        stats = batch.stats[batch.stats["pid"].isin(unknown)]
        times = pd.to_datetime(stats["obstime"], utc=True)
        span = times.groupby(stats["pid"].to_numpy()).agg(["min", "max"])
        middle = (span["min"] + (span["max"] - span["min"]) / 2).dt.year
        years = years.fillna(middle.reindex(years.index).astype(float))
    groups: dict[int | None, np.ndarray] = {}
    for year, chosen in years.groupby(years.fillna(-1).to_numpy()).groups.items():
        groups[None if year == -1 else int(year)] = np.asarray(chosen, dtype=np.int64)
    return groups


def _isolating(
    run: Callable[[np.ndarray], list],
    positions: np.ndarray,
    failed: Callable[[np.ndarray, Exception], list],
    passthrough: tuple[type[Exception], ...] = (),
) -> list:
    """run(positions); when it raises, halve the positions until each failure is down to one item.

    A plugin that fails on one parcel of 20,000 then costs about 2 x log2(20,000) calls, not 20,000,
    and every other parcel keeps its result. `failed` says what a lone failing item yields;
    exceptions in `passthrough` are the user's to fix and stop the search.
    """
    try:
        return run(positions)
    except passthrough:
        raise
    except Exception as exc:
        if len(positions) <= 1:
            return failed(positions, exc)
        half = len(positions) // 2
        return _isolating(run, positions[:half], failed, passthrough) + _isolating(
            run, positions[half:], failed, passthrough
        )


def _run_isolated(
    call, name: str, batch: TimeSeries, params: dict[str, Any], keep: np.ndarray | None = None
) -> list[MarkerResult]:
    """Run a marker on a batch; parcels it raises on become NOT_EXECUTED with the error.

    keep: the pids to return results for (default all; context parcels are left out).
    """
    pids = batch.parcels["pid"].to_numpy()

    def score(positions: np.ndarray) -> list[MarkerResult]:
        series = batch if len(positions) == len(pids) else batch.subset(pids[positions])
        return list(call(series=series, params=params))

    def failed(positions: np.ndarray, exc: Exception) -> list[MarkerResult]:
        return [
            MarkerResult(name, int(p), Status.NOT_EXECUTED, reason=describe_error(exc))
            for p in pids[positions]
        ]

    by_pid = {}
    for result in _isolating(score, np.arange(len(pids)), failed):
        result.marker = name
        by_pid.setdefault(int(result.pid), result)
    return [
        by_pid.get(int(pid))
        or MarkerResult(name, int(pid), Status.NOT_EXECUTED, reason="marker returned no result")
        for pid in (pids if keep is None else keep)
    ]


def _window_reader(call, source: PluginConfig):
    """The source's read_window hook as a plain function of (band, bounds, crs) for extractors."""

    def read_window(band, bounds, crs):
        return call(config=source, band=band, bounds=bounds, crs=crs)

    return read_window


def _parcels_in_footprints(parcels: gpd.GeoDataFrame, scenes: gpd.GeoDataFrame) -> dict[str, np.ndarray]:
    """Positions of the parcels each scene's footprint touches (all parcels if no footprint)."""
    everything = np.arange(len(parcels))
    if scenes.empty or scenes.geometry.isna().all():
        return {o: everything for o in scenes["obsid"]}
    located = parcels.geometry.to_crs(scenes.crs) if parcels.crs != scenes.crs else parcels.geometry
    tree = located.sindex
    found = {}
    for obsid, footprint in zip(scenes["obsid"], scenes.geometry, strict=True):
        found[obsid] = (
            everything if footprint is None else np.sort(tree.query(footprint, predicate="intersects"))
        )
    return found
