"""`cbm doctor CONFIG`: check a configuration end to end without running it.

Each check reads what a run would read (configuration and scheme, parcels, catalogue, band files,
store, output folder) and reports one line: ok, warn (a run would go on, probably not as meant) or
fail (a run would stop). Nothing is extracted and nothing is written, so it is safe on a production
store. Configurations of another kind (a `cbm serve` configuration) are checked by the plugin that
reads them, through the ``cbm_cli_doctor`` hook.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbm_core.config import RunConfig, load_run_config
from cbm_core.errors import CbmError
from cbm_core.locks import LOCK_FILE
from cbm_core.runs import run_folders

OK, WARN, FAIL = "ok", "warn", "fail"
MISSING_FILES_SHOWN = 3  # band files named in a failure; the rest are counted
TRIAL_PARCELS = 3  # parcels each extractor is tried on


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    status: str  # ok, warn or fail
    message: str


def check_run_config(path: Path, engine: Any) -> list[Check]:
    """Every check of a run configuration, in the order a run meets them; stops at the first
    failure that leaves nothing to check further (an unreadable configuration)."""
    checks: list[Check] = []
    try:
        config = load_run_config(path)
        scheme = config.scheme or engine.scheme(str(config.scheme_ref), config.base_dir)
        engine.check(config, scheme)
    except CbmError as exc:
        return [Check(FAIL, f"configuration: {exc}")]
    markers = ", ".join(scheme.marker_names)
    checks.append(Check(OK, f"configuration {config.path}: plugins and options known; markers {markers}"))
    parcels = _step(checks, "parcels", lambda: engine.parcels(config.source))
    catalogue = _step(checks, "catalogue", lambda: engine.catalogue(config.source))
    if parcels is not None:
        issues = int((parcels["issue"] != "").sum())
        note = f"; {issues} with a geometry issue (yellow, reason given)" if issues else ""
        checks.append(
            Check(WARN if issues else OK, f"parcels: {len(parcels)} in {parcels.crs.to_string()}{note}")
        )
    if catalogue is not None:
        checks.extend(_catalogue_checks(engine, config, catalogue, parcels))
    if catalogue is not None and parcels is not None and not any(c.status == FAIL for c in checks):
        checks.extend(_trial_extraction(engine, config, catalogue, parcels))
    checks.extend(_store_checks(engine, config))
    checks.extend(_output_check(folder, what) for folder, what in run_folders(config))
    return checks


def _step(checks: list[Check], what: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except CbmError as exc:
        checks.append(Check(FAIL, f"{what}: {exc}"))
        return None


def _catalogue_checks(engine: Any, config: RunConfig, catalogue: Any, parcels: Any) -> list[Check]:
    checks = []
    cards = sorted(set(catalogue["card"]))
    checks.append(
        Check(
            OK if len(catalogue) else WARN,
            f"catalogue: {len(catalogue)} scenes, cards {', '.join(cards) or 'none'}",
        )
    )
    try:
        engine.check_bands(catalogue, config.extract)
        for job in config.extract:
            if job.get("card") not in cards:
                checks.append(Check(WARN, f"{job.where}: no {job.get('card')} scene in the catalogue"))
        checks.append(Check(OK, "bands: every extracted band is in the catalogue"))
    except CbmError as exc:
        checks.append(Check(FAIL, f"bands: {exc}"))
    uris = [ref.uri for bands in catalogue["bands"] for ref in bands.values()]
    local = [u for u in uris if "://" not in u and not u.startswith("/vsi")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        shown = ", ".join(missing[:MISSING_FILES_SHOWN])
        more = f" and {len(missing) - MISSING_FILES_SHOWN} more" if len(missing) > MISSING_FILES_SHOWN else ""
        checks.append(Check(FAIL, f"band files: {len(missing)} of {len(local)} missing: {shown}{more}"))
    elif local:
        checks.append(Check(OK, f"band files: all {len(local)} local files present"))
    if parcels is not None and len(parcels) and catalogue.geometry.notna().any():
        footprints = catalogue[catalogue.geometry.notna()]
        located = parcels.to_crs(footprints.crs) if parcels.crs != footprints.crs else parcels
        covered = located.geometry.intersects(footprints.geometry.union_all())
        share = float(covered.mean())
        status = OK if share == 1.0 else (FAIL if share == 0.0 else WARN)
        checks.append(
            Check(
                status,
                f"CRS and footprints: {covered.sum()} of {len(parcels)} parcels inside a scene footprint",
            )
        )
    return checks


def _trial_extraction(engine: Any, config: RunConfig, catalogue: Any, parcels: Any) -> list[Check]:
    """Each extractor on a few parcels of its card's first scene, in memory (nothing is stored):
    catches option values and readers that only fail once extraction starts."""
    checks = []
    for job in config.extract:
        scenes = catalogue[catalogue["card"] == job.get("card")].head(1)
        if scenes.empty:
            continue
        sample = parcels.head(TRIAL_PARCELS)
        try:
            signatures, report = engine.extract(sample, scenes, [job], config.source)
        except CbmError as exc:
            checks.append(Check(FAIL, f"{job.where}: trial extraction: {exc}"))
            continue
        obsid = scenes["obsid"].iloc[0]
        if report.failed:
            checks.append(Check(FAIL, f"{job.where}: trial extraction of {obsid}: {report.failed[obsid]}"))
        else:
            rows = len(signatures.stats)
            checks.append(
                Check(OK if rows else WARN, f"{job.where}: trial extraction of {obsid}: {rows} rows")
            )
    return checks


def _store_checks(engine: Any, config: RunConfig) -> list[Check]:
    try:
        stored = engine.plugins.caller(config.store.plugin, "cbm_store_obsids", config.store.where)(
            config=config.store
        )
    except CbmError as exc:
        return [Check(FAIL, f"store: {exc}")]
    return [Check(OK, f"store ({config.store.plugin}): reachable, {len(stored)} scenes stored")]


def _output_check(folder: Path, what: str = "output folder") -> Check:
    """Whether a folder a run writes can be made and written (tried with a temporary folder in its
    nearest existing parent, removed at once), and whether a run holds it now."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return Check(FAIL, f"{what} {folder}: {existing} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cbm-doctor-", dir=existing))
    except OSError as exc:
        return Check(FAIL, f"{what} {folder}: cannot write in {existing} ({exc.strerror or exc})")
    lock = folder / LOCK_FILE
    if lock.exists():
        with open(lock, encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
            except BlockingIOError:
                return Check(WARN, f"{what} {folder}: a run holds it now ({handle.read().strip()})")
    return Check(OK, f"{what} {folder}: writable")
