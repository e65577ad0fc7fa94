"""Traffic-light rule: each marker says pass, fail or unknown; their agreement gives the light.

Per marker (parameters in the scheme's [rule] table under `markers.<name>`):
  expect = "event" | "no_event"   what confirms the declaration (default "event")
  min_confidence = 0.5            below it an OK result counts as unknown
A parcel is green when every marker passes, red when every marker that could judge fails and
none passes, yellow otherwise (a marker could not judge, or markers disagree).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import geopandas as gpd
import pandas as pd

from cbm_core import impl
from cbm_core.model import Light, Status, Verdict, result_events

DEFAULT_MARKER_RULE = {"expect": "event", "min_confidence": 0.5}


@impl
def cbm_rule_decide(
    results: pd.DataFrame, parcels: gpd.GeoDataFrame, params: Mapping[str, Any]
) -> list[Verdict]:
    per_marker = params.get("markers", {})
    by_pid = dict(tuple(results.groupby("pid", sort=False)))
    issues = parcels.set_index("pid")["issue"] if "issue" in parcels else pd.Series(dtype=str)
    verdicts = []
    for pid in parcels["pid"].to_numpy():
        rows = by_pid.get(pid, results.iloc[0:0])
        outcomes = [
            _judge(row, DEFAULT_MARKER_RULE | per_marker.get(row["marker"], {})) for _, row in rows.iterrows()
        ]
        light = _combine([o for o, _ in outcomes])
        reasons = [r for _, r in outcomes] or ["no marker result"]
        issue = issues.get(pid, "")
        if issue:
            reasons.insert(0, f"parcel: {issue}")
        verdicts.append(Verdict(int(pid), light, reasons))
    return verdicts


def _judge(row: pd.Series, rule: Mapping[str, Any]) -> tuple[str, str]:
    """One marker's outcome for one parcel: ('pass'|'fail'|'unknown', reason naming the evidence)."""
    marker = row["marker"]
    if row["status"] != Status.OK:
        return "unknown", f"{marker}: {row['status']} ({row['reason']})"
    confidence = row["confidence"]
    if pd.notna(confidence) and confidence < rule["min_confidence"]:
        return "unknown", f"{marker}: confidence {confidence:.2f} below {rule['min_confidence']}"
    events = result_events(row)
    if events:
        described = ", ".join(f"{e['main']} (obs {' -> '.join(e['obsids'])})" for e in events)
        found = f"{marker}: {len(events)} event(s) on {described}"
    else:
        found = f"{marker}: no event in {len(_obsids(row))} observation(s)"
    passed = bool(events) == (rule["expect"] == "event")
    return ("pass" if passed else "fail"), found


def _combine(outcomes: list[str]) -> Light:
    if outcomes and all(o == "pass" for o in outcomes):
        return Light.GREEN
    if "fail" in outcomes and "pass" not in outcomes and "unknown" not in outcomes:
        return Light.RED
    return Light.YELLOW


def _obsids(row: pd.Series) -> list[str]:
    return json.loads(row["obsids"])
