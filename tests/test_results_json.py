"""Marker results as JSON text: strict JSON whatever numpy types a marker puts in its values."""

from __future__ import annotations

import json
from datetime import date, datetime

import numpy as np
import pandas as pd

from cbm_core.model import Event, MarkerResult, Status, results_frame


def strict(text: str) -> object:
    """json.loads that refuses NaN and Infinity, as JavaScript, PostgreSQL and most readers do."""
    return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))


def test_results_are_strict_json_with_numpy_values_dates_and_events():
    start, main, end = date(2023, 5, 1), pd.Timestamp("2023-05-03 10:00"), datetime(2023, 5, 4, 12)
    event = Event(start, main, end, np.float64(0.25), 0.9, ("S2A_1", "S2B_2"), "cut")
    values = {
        "n_observations": np.int64(12),
        "drop": np.float32(0.5),
        "no_data": np.float64("nan"),  # a marker's undefined statistic
        "ratio": float("inf"),
        "profile": np.array([0.1, 0.2, 0.3]),
        "top3": {"maize": np.float64(0.7)},
        7: "class code as key",
        "since": pd.Timestamp("2023-02-03 10:00"),
    }
    row = results_frame([MarkerResult("m", 1, Status.OK, "", [event], values, 0.5, ("S2A_1",))]).iloc[0]
    assert strict(row["values"]) == {
        "n_observations": 12, "drop": 0.5, "no_data": None, "ratio": None, "profile": [0.1, 0.2, 0.3],
        "top3": {"maize": 0.7}, "7": "class code as key", "since": "2023-02-03",
    }  # fmt: skip
    assert strict(row["events"]) == [
        {"start": "2023-05-01", "main": "2023-05-03", "end": "2023-05-04", "magnitude": 0.25,
         "confidence": 0.9, "obsids": ["S2A_1", "S2B_2"], "kind": "cut"}
    ]  # fmt: skip
    assert strict(row["obsids"]) == ["S2A_1"]
    empty = results_frame([MarkerResult("m", 2, Status.NOT_VALID, "no data")]).iloc[0]
    assert (empty["events"], empty["values"], empty["obsids"]) == ("[]", "{}", "[]")
