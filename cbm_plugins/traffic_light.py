"""Traffic-light rule: each marker says pass, fail or unknown; their agreement gives the light.

Lights rest on evidence. Green needs every applicable marker to pass: an expected event of enough
confidence whose observations are all valid under the scheme's validity policy (or, for a
practice that must not happen, enough valid observations and no such event). Red needs positive
evidence: enough valid observations across the marker's window and no expected event, or a
confident event of a prohibited practice on valid observations. Everything else is yellow and
says what is missing ("insufficient evidence: 3 valid observations in 2023-04-01..2023-04-30; 6
needed"). Markers report their evidence in their values: `valid_observations`, `window`,
`max_gap_days` (see docs/markers.md).

Per marker (parameters in the scheme's [rule] table under `markers.<name>`):
  expect = "event" | "no_event"   what confirms the declaration (default "event")
  min_confidence = 0.5            below it an OK result counts as unknown (low confidence)
  min_events = 1                  with expect = "event": events needed to pass (e.g. 2 cuts)
  max_events = 0                  with expect = "no_event": events tolerated
  min_valid = 6                   valid observations in the marker's window needed to judge the
                                  absence of an event (either way); 0 leaves it to the marker
  max_gap_days                    and no stretch without a valid observation longer than this
  season_start / season_end       only events whose main date lies in this window count
                                  ("MM-DD" in the parcel's campaign year, else the event's year)
  kinds = ["mowing"]              only events of these kinds count (prefix match)
  crops = ["grassland"]           the marker judges only parcels declared with these crops
A parcel is green when every applicable marker passes, red when every applicable marker fails,
yellow otherwise. With `red_if_any_fails = true` in the [rule] table every marker is a requirement
(e.g. "mown and not ploughed"): one confident, evidenced failure is red. Every reason names the
marker, the numbers and the dates; product ids stay in the obsids column of markers.parquet.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date
from typing import Any

import geopandas as gpd
import pandas as pd

from cbm_core import impl
from cbm_core.config import check_keys, check_table
from cbm_core.errors import ConfigError
from cbm_core.model import Light, Status, Verdict

CBM_OPTIONS = frozenset({"markers", "red_if_any_fails"})  # the [rule] options it reads

# Six valid looks before "no event" means something: about one every three weeks over a four-month
# mowing window, so a cut (visible ~3 weeks, Sinergise) cannot fall between two of them unseen.
DEFAULT_MIN_VALID = 6
DEFAULT_MARKER_RULE = {"expect": "event", "min_confidence": 0.5, "min_valid": DEFAULT_MIN_VALID}
MARKER_RULE_KEYS = frozenset(
    {"expect", "min_confidence", "min_events", "max_events", "min_valid", "max_gap_days"}
    | {"season_start", "season_end", "kinds", "crops"}
)


@impl
def cbm_rule_decide(
    results: pd.DataFrame, parcels: gpd.GeoDataFrame, params: Mapping[str, Any]
) -> list[Verdict]:
    per_marker = params.get("markers", {})
    if not isinstance(per_marker, Mapping):
        raise ConfigError(f"[rule] markers: expected a table of marker rules, got {per_marker!r}")
    for name, rule in per_marker.items():  # a misspelt key would silently keep its default
        check_keys(check_table(rule, f"[rule] markers.{name}"), MARKER_RULE_KEYS, f"[rule] markers.{name}")
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
    years = _campaign_years(parcels, pids)
    verdicts = []
    for pid in pids:
        outcomes = []
        for row in rows_by_pid.get(pid, []):
            marker = row["marker"]
            if marker in applies and crops.get(pid) not in applies[marker]:
                continue  # the marker does not apply to this crop
            rule = rules[marker]
            outcomes.append((marker, *_judge(row, rule, years.get(pid))))
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


def _judge(row: Mapping[str, Any], rule: Mapping[str, Any], year: int | None = None) -> tuple[str, str]:
    """One marker's outcome for one parcel: ('pass'|'fail'|'unknown', reason naming the evidence)."""
    marker = row["marker"]
    if row["status"] == Status.NOT_VALID:
        return "unknown", f"{marker}: insufficient evidence: {row['reason'] or row['status']}"
    if row["status"] != Status.OK:  # the marker did not run on this parcel: nothing was judged
        return "unknown", f"{marker}: {row['status']} ({row['reason']})"
    confidence = row["confidence"]
    if pd.notna(confidence) and confidence < rule["min_confidence"]:
        return "unknown", f"{marker}: confidence {confidence:.2f} below {rule['min_confidence']}"
    values = _decoded(row.get("values"), {})
    rejected = {str(o): str(why) for o, why in _decoded(row.get("rejected"), [])}
    events, resting = [], []
    for event in _decoded(row["events"], []):
        if not _counts(event, rule, year):
            continue
        bad = [o for o in event.get("obsids") or [] if o in rejected]
        (resting if bad else events).append((event, bad))
    window = _window_text(rule)
    if events:
        described = ", ".join(_describe(e) for e, _ in events)
        found = f"{marker}: {len(events)} event(s){window}: {described}"
    else:
        found = f"{marker}: no event{window}{_evidence_text(values)}" + (
            f"; {row['reason']}" if row.get("reason") else ""
        )
    for event, bad in resting:  # an event on a rejected observation is no evidence, either way
        found += f"; event {event['main']} ignored: it rests on {bad[0]} ({rejected[bad[0]]})"
    if rule["expect"] == "event":
        need = int(rule.get("min_events", 1))
        if len(events) >= need:
            return "pass", found
        if events:
            found += f"; {need} needed"
    elif len(events) > int(rule.get("max_events", 0)):
        return "fail", found
    missing = _missing_evidence(values, rule)
    if missing:
        return "unknown", f"{found}; insufficient evidence: {missing}"
    return ("fail" if rule["expect"] == "event" else "pass"), found


def _missing_evidence(values: Mapping[str, Any], rule: Mapping[str, Any]) -> str:
    """What the marker's evidence lacks before the absence of an event can be judged ('' if nothing)."""
    n = values.get("valid_observations")
    window = values.get("window", "the window")
    need = int(rule.get("min_valid", DEFAULT_MIN_VALID))
    if need == 0:  # the scheme relies on the marker's own gate (e.g. a crop model's minimum series)
        return ""
    if n is None:
        return "the marker reports no count of valid observations"
    if int(n) < need:
        return f"{int(n)} valid observations in {window}; {need} needed"
    gap, most = values.get("max_gap_days"), rule.get("max_gap_days")
    if most is not None and gap is not None and float(gap) > float(most):
        return (
            f"{float(gap):.0f} days without a valid observation in {window}; at most {float(most):g} allowed"
        )
    return ""


def _evidence_text(values: Mapping[str, Any]) -> str:
    """' in 33 valid observations 2018-03-16..2018-10-27 (longest gap 12 d)', or '' when not reported."""
    n, window, gap = values.get("valid_observations"), values.get("window"), values.get("max_gap_days")
    if n is None:
        return ""
    text = f" in {int(n)} valid observations" + (f" {window}" if window else "")
    return text + (f" (longest gap {float(gap):.0f} d)" if gap is not None and gap == gap else "")


def _describe(event: Mapping[str, Any]) -> str:
    magnitude = event.get("magnitude")
    size = f" {float(magnitude):.2f}" if magnitude is not None else ""
    obs = " -> ".join(event.get("obsids") or []) or "n/a"
    span = (
        f"{event['start']} -> {event['end']}"
        if event.get("start") != event.get("end")
        else f"{event['main']}"
    )
    return f"{event.get('kind') or 'event'} {event['main']}{size} ({span}; obs {obs})"


def _decoded(value: Any, default: Any) -> Any:
    """A JSON text column of the results table (or its already decoded value)."""
    if isinstance(value, str):
        return json.loads(value) if value else default
    return default if value is None else value


def _campaign_years(parcels: gpd.GeoDataFrame, pids: list[int]) -> dict[int, int]:
    """Each declared parcel's campaign year (column campaign_year), where known."""
    if "campaign_year" not in parcels:
        return {}
    years = pd.to_numeric(parcels["campaign_year"], errors="coerce")
    return {p: int(y) for p, y in zip(pids, years, strict=True) if pd.notna(y)}


def _counts(event: Mapping[str, Any], rule: Mapping[str, Any], year: int | None = None) -> bool:
    """Whether an event counts under the rule's kinds and season window (in the campaign year)."""
    kinds = rule.get("kinds")
    if kinds and not any(str(event.get("kind", "")).startswith(str(k)) for k in kinds):
        return False
    main = date.fromisoformat(str(event["main"])[:10])
    start, end = rule.get("season_start"), rule.get("season_end")
    year = main.year if year is None else year
    if start and main < _resolve(str(start), year):
        return False
    return not (end and main > _resolve(str(end), year))


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
