"""The traffic-light rule (docs/markers.md "Decision rules"), judged through the engine.

Every test builds marker results by hand and asks `Engine.judge` for the verdict, so the tests
hold for any rule implementation that keeps the documented behaviour. Each docstring names the
one-line bug it was checked against (planted, seen failing, reverted).
"""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from cbm_core.config import PluginConfig, Scheme
from cbm_core.model import Event, MarkerResult, Status, results_frame
from cbm_core.pipeline import Engine
from cbm_core.plugins import load_plugins
from cbm_core.testing import sample_parcels

MAY = date(2023, 5, 10)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(plugins=load_plugins(entry_points=False), progress=False)


def cut(day: date = MAY, kind: str = "mowing", obsids: tuple[str, ...] = ("S2_a", "S2_b")) -> Event:
    return Event(day, day, day, 0.3, 0.9, obsids, kind)


WINDOW = "2023-04-01..2023-09-30"


def ok(marker: str, pid: int, *events: Event, confidence: float | None = 0.9, seen: int = 12) -> MarkerResult:
    """An OK result whose evidence (`seen` valid observations in the window) suffices by default."""
    return MarkerResult(
        marker, pid, Status.OK, events=list(events), confidence=confidence,
        values={"valid_observations": seen, "window": WINDOW, "max_gap_days": 20}, obsids=("S2_a", "S2_b"),
    )  # fmt: skip


def judge(engine: Engine, results: list[MarkerResult], parcels=None, **rule) -> pd.DataFrame:
    parcels = sample_parcels(2) if parcels is None else parcels
    markers = tuple(PluginConfig(m) for m in sorted({r.marker for r in results}))
    scheme = Scheme(markers, PluginConfig("traffic_light", rule))
    return engine.judge(results_frame(results), parcels, scheme).set_index("pid")


def light(engine: Engine, results: list[MarkerResult], pid: int = 1, **rule) -> str:
    return judge(engine, results, **rule).loc[pid, "light"]


def test_one_failed_and_one_undecided_marker_is_yellow_not_red(engine):
    """docs/markers.md: red only when every applicable marker fails; a marker that could not judge
    makes the parcel yellow. Planted bug: `"unknown" not in outcomes` dropped from the red condition
    (the parcel turned red)."""
    failed = ok("mowing", 1)  # OK but no event where one is expected: a confident failure
    undecided = MarkerResult("bare_soil", 1, Status.NOT_VALID, reason="2 clear observations")
    verdict = judge(engine, [failed, undecided]).loc[1]
    assert verdict["light"] == "yellow"
    assert "bare_soil" in verdict["reasons"] and "2 clear observations" in verdict["reasons"]
    low = ok("bare_soil", 1, cut(), confidence=0.2)  # low confidence counts as undecided too
    assert light(engine, [failed, low]) == "yellow"
    assert light(engine, [failed, low], red_if_any_fails=True) == "yellow"  # "and none is unknown"


def test_lights_follow_agreement_of_the_markers(engine):
    """Green when all pass, red when all fail, yellow on conflict. Planted bugs: `all(...)` ->
    `any(...)` in the green test (conflict turned green); `"pass" not in outcomes` dropped (conflict
    turned red)."""
    passed, failed = ok("mowing", 1, cut()), ok("bare_soil", 1)
    assert light(engine, [passed, ok("bare_soil", 1, cut())]) == "green"
    assert light(engine, [ok("mowing", 1), failed]) == "red"
    conflict = judge(engine, [passed, failed]).loc[1]
    assert conflict["light"] == "yellow"
    assert conflict["reasons"].startswith("conflicting markers: mowing confirm(s), bare_soil contradict(s)")
    required = judge(engine, [passed, failed], red_if_any_fails=True).loc[1]
    assert required["light"] == "red"
    assert required["reasons"].startswith("requirement(s) not met: bare_soil")


def test_a_parcel_without_results_is_yellow_and_says_so(engine):
    """An empty outcome list must not be green (`all([])` is True). Planted bug: the `outcomes and`
    guard dropped (parcel 2, with no results, turned green)."""
    verdicts = judge(engine, [ok("mowing", 1, cut())])
    assert verdicts.loc[1, "light"] == "green"
    assert verdicts.loc[2, "light"] == "yellow" and verdicts.loc[2, "reasons"] == "no marker result"


def test_not_executed_is_undecided_whatever_its_events(engine):
    """A marker that did not run cannot confirm anything. Planted bug: `!=` -> `==` on the status."""
    broken = MarkerResult("mowing", 1, Status.NOT_EXECUTED, reason="plugin error", events=[cut()])
    verdict = judge(engine, [broken]).loc[1]
    assert verdict["light"] == "yellow" and verdict["reasons"].startswith("mowing: ")
    assert "plugin error" in verdict["reasons"]


def test_min_confidence_is_inclusive_and_missing_confidence_is_trusted(engine):
    """Below min_confidence an OK result is undecided; at it, it counts. Planted bugs: `<` -> `<=`;
    the `pd.notna` guard dropped (NaN confidence compared as undecided)."""
    rule = {"markers": {"mowing": {"min_confidence": 0.6}}}
    assert light(engine, [ok("mowing", 1, cut(), confidence=0.6)], **rule) == "green"
    low = judge(engine, [ok("mowing", 1, cut(), confidence=0.59)], **rule).loc[1]
    assert low["light"] == "yellow" and low["reasons"] == "mowing: confidence 0.59 below 0.6"
    assert light(engine, [ok("mowing", 1, cut(), confidence=None)]) == "green"
    assert light(engine, [ok("mowing", 1, cut(), confidence=0.5)]) == "green"  # default 0.5 inclusive
    assert light(engine, [ok("mowing", 1, cut(), confidence=0.49)]) == "yellow"


def test_min_and_max_events(engine):
    """`min_events` passes at exactly that many events, `max_events` tolerates exactly that many.
    Planted bugs: `>=` -> `>`, `<=` -> `<`, default max_events 0 -> 1."""
    two = [cut(date(2023, 5, 10)), cut(date(2023, 7, 1))]
    need_two = {"markers": {"mowing": {"min_events": 2}}}
    assert light(engine, [ok("mowing", 1, *two)], **need_two) == "green"
    short = judge(engine, [ok("mowing", 1, two[0])], **need_two).loc[1]
    assert short["light"] == "red" and "; 2 needed" in short["reasons"]
    ban = {"markers": {"bare_soil": {"expect": "no_event"}}}
    assert light(engine, [ok("bare_soil", 1)], **ban) == "green"
    assert light(engine, [ok("bare_soil", 1, cut(kind="bare"))], **ban) == "red"
    one_ok = {"markers": {"bare_soil": {"expect": "no_event", "max_events": 1}}}
    assert light(engine, [ok("bare_soil", 1, cut(kind="bare"))], **one_ok) == "green"
    assert light(engine, [ok("bare_soil", 1, *two)], **one_ok) == "red"


def test_season_window_bounds_are_inclusive_and_full_dates_work(engine):
    """Only events whose main date lies in [season_start, season_end] count ("MM-DD" in the
    event's year, or a full date). Planted bugs: `<` -> `<=` at either bound; `len(text) == 5`
    -> `== 4`."""
    window = {"markers": {"mowing": {"season_start": "05-10", "season_end": "06-30"}}}
    for day, expected in ((date(2023, 5, 10), "green"), (date(2023, 6, 30), "green"),
                          (date(2023, 5, 9), "red"), (date(2023, 7, 1), "red")):  # fmt: skip
        assert light(engine, [ok("mowing", 1, cut(day))], **window) == expected, day
    full = {"markers": {"mowing": {"season_start": "2023-05-10", "season_end": "2023-06-30"}}}
    assert light(engine, [ok("mowing", 1, cut(date(2023, 6, 30)))], **full) == "green"
    assert light(engine, [ok("mowing", 1, cut(date(2023, 7, 1)))], **full) == "red"
    only_end = {"markers": {"mowing": {"season_end": "06-30"}}}
    assert light(engine, [ok("mowing", 1, cut(date(2023, 1, 2)))], **only_end) == "green"
    reason = judge(engine, [ok("mowing", 1, seen=7)], **window).loc[1, "reasons"]
    assert reason.startswith("mowing: no event between 05-10 and 06-30")
    open_end = judge(engine, [ok("mowing", 1)], **only_end).loc[1, "reasons"]
    assert open_end.startswith("mowing: no event between ... and 06-30")


def test_kinds_match_by_prefix(engine):
    """`kinds` keeps events whose kind starts with a listed kind. Planted bug: `startswith` ->
    `==` (the "mowing:s2+s1" event stopped counting)."""
    kinds = {"markers": {"mowing": {"kinds": ["mowing"]}}}
    assert light(engine, [ok("mowing", 1, cut(kind="mowing:s2+s1"))], **kinds) == "green"
    assert light(engine, [ok("mowing", 1, cut(kind="grazing"))], **kinds) == "red"


def test_crops_limit_which_parcels_a_marker_judges(engine):
    """A marker with `crops` judges only parcels declared with one of them. Planted bugs: `not in`
    -> `in`; the `marker in applies` guard dropped."""
    parcels = sample_parcels(2).assign(crop_name=["grassland", "maize"])
    results = [ok("mowing", p) for p in (1, 2)] + [ok("bare_soil", p, cut(kind="bare")) for p in (1, 2)]
    verdicts = judge(engine, results, parcels, markers={"mowing": {"crops": ["grassland"]}})
    assert verdicts.loc[1, "light"] == "yellow"  # mowing fails, bare_soil passes: conflict
    assert verdicts.loc[2, "light"] == "green"  # mowing does not apply to maize
    assert "mowing" not in verdicts.loc[2, "reasons"]


def test_reasons_name_the_evidence_and_the_parcel_issue(engine):
    """Reasons name marker, kind, date and observations; a parcel's geometry issue comes first.
    Planted bug: the issue reason appended instead of inserted first."""
    parcels = sample_parcels(2).assign(issue=["invalid geometry repaired (Self-intersection)", ""])
    results = [ok("mowing", 1, cut(obsids=("S2_a", "S2_b"))), ok("mowing", 2, cut(obsids=()))]
    verdicts = judge(engine, results, parcels)
    first = verdicts.loc[1, "reasons"]
    assert first.startswith("parcel: invalid geometry repaired (Self-intersection); mowing: 1 event(s): ")
    assert "mowing 2023-05-10" in first and "obs S2_a -> S2_b" in first
    assert "obs n/a" in verdicts.loc[2, "reasons"]


def test_reasons_of_open_windows_unnamed_kinds_and_timed_bounds(engine):
    """A window open at one end says "...", an event without a kind is an "event", and a bound
    given as a TOML datetime counts by its date. Planted bugs: `start or end` -> `end` (a window
    with only a start lost its text); `end or '...'` -> `end`; `e.get('kind') or 'event'` ->
    `e.get('kind')`; `text[:10]` -> `text[:11]`."""
    only_start = {"markers": {"mowing": {"season_start": "05-10"}}}
    reason = judge(engine, [ok("mowing", 1)], **only_start).loc[1, "reasons"]
    assert reason.startswith("mowing: no event between 05-10 and ...")
    unnamed = judge(engine, [ok("mowing", 1, cut(kind=""))]).loc[1, "reasons"]
    assert unnamed.startswith("mowing: 1 event(s): event 2023-05-10")
    timed = {"markers": {"mowing": {"season_end": "2023-06-30 12:00:00"}}}
    assert light(engine, [ok("mowing", 1, cut(date(2023, 6, 30)))], **timed) == "green"


def test_a_parcel_issue_must_be_text_to_be_a_reason(engine):
    """A missing issue read from a file is NaN, not a problem of the parcel. Planted bug:
    `isinstance(issue, str) and issue` -> `issue` (NaN is truthy: "parcel: nan")."""
    parcels = sample_parcels(2).assign(issue=[float("nan"), "empty geometry"])
    verdicts = judge(engine, [ok("mowing", 1, cut()), ok("mowing", 2, cut())], parcels)
    assert not verdicts.loc[1, "reasons"].startswith("parcel:")
    assert verdicts.loc[2, "reasons"].startswith("parcel: empty geometry; ")


def test_no_event_is_red_or_green_only_on_enough_valid_observations(engine):
    """Lights rest on evidence: the absence of an event judges a parcel only when the marker saw
    at least `min_valid` valid observations (default 6) and no longer gap than `max_gap_days`;
    otherwise yellow, saying what is missing. Planted bugs: `int(n) < need` -> `<=`; the gap test
    dropped."""
    assert light(engine, [ok("mowing", 1, seen=6)]) == "red"
    few = judge(engine, [ok("mowing", 1, seen=5)]).loc[1]
    assert few["light"] == "yellow" and f"5 valid observations in {WINDOW}; 6 needed" in few["reasons"]
    ban = {"markers": {"bare_soil": {"expect": "no_event"}}}
    assert light(engine, [ok("bare_soil", 1, seen=5)], **ban) == "yellow"
    assert light(engine, [ok("bare_soil", 1, seen=6)], **ban) == "green"
    gappy = {"markers": {"mowing": {"max_gap_days": 19}}}
    assert light(engine, [ok("mowing", 1)], **gappy) == "yellow"  # the marker reports a 20-day gap
    assert light(engine, [ok("mowing", 1)], markers={"mowing": {"max_gap_days": 20}}) == "red"
    unknown = MarkerResult("mowing", 1, Status.OK, confidence=0.9)  # reports no evidence at all
    assert light(engine, [unknown]) == "yellow"
    assert light(engine, [unknown], markers={"mowing": {"min_valid": 0}}) == "red"  # the marker's own gate
    assert light(engine, [ok("mowing", 1, cut(), seen=1)]) == "green"  # an event needs no count


def test_the_rule_declares_the_options_it_reads():
    """A scheme's [rule] table may hold `markers` and `red_if_any_fails`, nothing else. Planted
    bug: either name dropped from CBM_OPTIONS (every scheme using it refused)."""
    from cbm_core.errors import ConfigError

    plugins = load_plugins(entry_points=False)
    plugins.check_options(
        PluginConfig("traffic_light", {"markers": {}, "red_if_any_fails": True}, where="[rule]")
    )
    with pytest.raises(ConfigError, match="red_if_any_fail"):
        plugins.check_options(PluginConfig("traffic_light", {"red_if_any_fail": True}, where="[rule]"))


def test_evidence_details_in_reasons(engine):
    """What the rule says about its evidence. Planted bugs: `row['reason'] or row['status']` ->
    `row['reason']` (an empty reason said nothing); the marker's own reason dropped from "no
    event"; `magnitude is not None` -> `is None` (a null magnitude broke the rule); `start !=
    end` -> `==` (a span shown as one day)."""
    silent = MarkerResult("mowing", 1, Status.NOT_VALID)
    assert "NOT_VALID" in judge(engine, [silent]).loc[1, "reasons"]
    told = MarkerResult("mowing", 1, Status.OK, reason="season too short", confidence=0.9,
                        values={"valid_observations": 12, "window": WINDOW})  # fmt: skip
    told_reason = judge(engine, [told]).loc[1, "reasons"]
    assert told_reason.startswith("mowing: no event") and "season too short" in told_reason
    span = Event(date(2023, 5, 8), date(2023, 5, 10), date(2023, 5, 12), float("nan"), 0.9, ("S2_a",), "mow")
    reason = judge(engine, [ok("mowing", 1, span)]).loc[1, "reasons"]
    assert "mow 2023-05-10 (2023-05-08 -> 2023-05-12; obs S2_a)" in reason
    assert "nan" not in reason and "None" not in reason


def test_events_resting_on_rejected_observations_are_ignored(engine):
    """An event whose observations the validity policy rejected is no evidence. Planted bug: the
    observations of events not checked against the rejected ones (`event.get('obsids') or []` ->
    `[]`)."""
    result = ok("mowing", 1, cut(obsids=("S2_a", "S2_c")))
    result.rejected = (("S2_c", "SCL cloud 100% > 5%"),)
    verdict = judge(engine, [result]).loc[1]
    assert verdict["light"] == "red"
    assert "event 2023-05-10 ignored: it rests on S2_c (SCL cloud 100% > 5%)" in verdict["reasons"]


def test_a_failure_beside_a_marker_short_of_evidence_is_yellow(engine):
    """ "Insufficient evidence" is undecided, like NOT_VALID. Planted bug: that outcome's label
    misspelt (it no longer counted as unknown: the parcel turned red)."""
    assert light(engine, [ok("mowing", 1), ok("bare_soil", 1, seen=2)]) == "yellow"


def test_the_gap_limit_needs_the_marker_to_report_its_gap(engine):
    """Planted bug: `gap is not None` dropped (a marker without max_gap_days broke the rule)."""
    evidence = {"valid_observations": 9, "window": WINDOW}  # no max_gap_days
    plain = MarkerResult("mowing", 1, Status.OK, confidence=0.9, values=evidence)
    assert light(engine, [plain], markers={"mowing": {"max_gap_days": 10}}) == "red"


def test_season_days_resolve_in_the_campaign_year(engine):
    """ "MM-DD" bounds fall in the parcel's campaign year when the parcel table has one. Planted
    bug: the campaign_year column name misspelt (the event's own year was used)."""
    window = {"markers": {"mowing": {"season_start": "05-01", "season_end": "06-30"}}}
    last_year = [ok("mowing", 1, cut(date(2022, 5, 10)))]
    assert light(engine, last_year, **window) == "green"  # no campaign year: the event's year
    parcels = sample_parcels(2).assign(campaign_year=[2023, None])
    assert judge(engine, last_year, parcels, **window).loc[1, "light"] == "red"
