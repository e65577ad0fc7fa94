"""Traffic-light rule: each marker says pass, fail or unknown; their agreement gives the light.

Per marker (parameters in the scheme's [rule] table under `markers.<name>`):
  expect = "event" | "no_event"   what confirms the declaration (default "event")
  min_confidence = 0.5            below it an OK result counts as unknown (low confidence)
  min_events = 1                  with expect = "event": events needed to pass (e.g. 2 cuts)
  max_events = 0                  with expect = "no_event": events tolerated
  season_start / season_end       only events whose main date lies in this window count
                                  ("MM-DD" in the event's year, or a full date)
  kinds = ["mowing"]              only events of these kinds count (prefix match)
  crops = ["grassland"]           the marker judges only parcels declared with these crops
A parcel is green when every applicable marker passes, red when every applicable marker fails,
yellow otherwise: a marker could not judge (too few clear observations, low confidence) or the
markers conflict. With `red_if_any_fails = true` in the [rule] table every marker is a requirement
(e.g. "mown and not ploughed"): one confident failure is red. Every reason names the marker, the
event dates and the observations used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date
from typing import Any

import geopandas as gpd
import pandas as pd

from cbm_core import impl
from cbm_core.model import Light, Status, Verdict

CBM_OPTIONS = frozenset({"markers", "red_if_any_fails"})  # the [rule] options it reads

DEFAULT_MARKER_RULE = {"expect": "event", "min_confidence": 0.5}


@impl
def cbm_rule_decide(
    results: pd.DataFrame, parcels: gpd.GeoDataFrame, params: Mapping[str, Any]
) -> list[Verdict]:
    per_marker = params.get("markers", {})
    rules = {m: DEFAULT_MARKER_RULE | per_marker.get(m, {}) for m in results["marker"].unique()}
    applies = {m: set(map(str, r["crops"])) for m, r in rules.items() if "crops" in r}
    rows_by_pid: dict[int, list[dict[str, Any]]] = {}
    columns = list(results.columns)
    for values in zip(*(results[c].tolist() for c in columns), strict=True):
        row = dict(zip(columns, values, strict=True))
        rows_by_pid.setdefault(int(row["pid"]), []).append(row)
    pids = parcels["pid"].astype(int).tolist()
    issues = dict(zip(pids, parcels["issue"].tolist(), strict=True)) if "issue" in parcels else {}
    crops = dict(zip(pids, parcels["crop_name"].astype(str), strict=True)) if "crop_name" in parcels else {}
    verdicts = []
    for pid in pids:
        outcomes = []
        for row in rows_by_pid.get(pid, []):
            marker = row["marker"]
            if marker in applies and crops.get(pid) not in applies[marker]:
                continue  # the marker does not apply to this crop
            rule = rules[marker]
            outcomes.append((marker, *_judge(row, rule)))
        light = _combine([o for _, o, _ in outcomes], bool(params.get("red_if_any_fails", False)))
        reasons = [r for _, _, r in outcomes] or ["no marker result"]
        passed = [m for m, o, _ in outcomes if o == "pass"]
        failed = [m for m, o, _ in outcomes if o == "fail"]
        if failed and passed and light == Light.RED:
            reasons.insert(0, f"requirement(s) not met: {', '.join(failed)}")
        elif passed and failed:
            reasons.insert(
                0, f"conflicting markers: {', '.join(passed)} confirm(s), {', '.join(failed)} contradict(s)"
            )
        issue = issues.get(pid)
        if isinstance(issue, str) and issue:
            reasons.insert(0, f"parcel: {issue}")
        verdicts.append(Verdict(pid, light, reasons))
    return verdicts


def _judge(row: Mapping[str, Any], rule: Mapping[str, Any]) -> tuple[str, str]:
    """One marker's outcome for one parcel: ('pass'|'fail'|'unknown', reason naming the evidence)."""
    marker = row["marker"]
    if row["status"] != Status.OK:
        return "unknown", f"{marker}: {row['status']} ({row['reason']})"
    confidence = row["confidence"]
    if pd.notna(confidence) and confidence < rule["min_confidence"]:
        return "unknown", f"{marker}: confidence {confidence:.2f} below {rule['min_confidence']}"
    events = [e for e in json.loads(row["events"]) if _counts(e, rule)] if row["events"] != "[]" else []
    window = _window_text(rule)
    if events:
        described = ", ".join(
            f"{e.get('kind') or 'event'} {e['main']} (obs {' -> '.join(e['obsids']) or 'n/a'})"
            for e in events
        )
        found = f"{marker}: {len(events)} event(s){window}: {described}"
    else:
        values = json.loads(row["values"]) if isinstance(row.get("values"), str) else {}
        seen = values.get("n_observations", len(json.loads(row["obsids"])))
        found = f"{marker}: no event{window} in {seen} observation(s)"
    if rule["expect"] == "event":
        need = int(rule.get("min_events", 1))
        passed = len(events) >= need
        if not passed and events:
            found += f"; {need} needed"
    else:
        passed = len(events) <= int(rule.get("max_events", 0))
    return ("pass" if passed else "fail"), found


def _counts(event: Mapping[str, Any], rule: Mapping[str, Any]) -> bool:
    """Whether an event counts under the rule's kinds and season window."""
    kinds = rule.get("kinds")
    if kinds and not any(str(event.get("kind", "")).startswith(str(k)) for k in kinds):
        return False
    main = date.fromisoformat(str(event["main"])[:10])
    start, end = rule.get("season_start"), rule.get("season_end")
    if start and main < _resolve(str(start), main.year):
        return False
    return not (end and main > _resolve(str(end), main.year))


def _resolve(text: str, year: int) -> date:
    return date.fromisoformat(f"{year}-{text}" if len(text) == 5 else text[:10])


def _window_text(rule: Mapping[str, Any]) -> str:
    start, end = rule.get("season_start"), rule.get("season_end")
    return f" between {start or '...'} and {end or '...'}" if (start or end) else ""


def _combine(outcomes: list[str], red_if_any_fails: bool = False) -> Light:
    """All pass: green. All fail (or, for schemes of requirements, any fails): red. Else yellow."""
    if outcomes and all(o == "pass" for o in outcomes):
        return Light.GREEN
    if "fail" in outcomes and "unknown" not in outcomes and ("pass" not in outcomes or red_if_any_fails):
        return Light.RED
    return Light.YELLOW
