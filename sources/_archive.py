"""Helpers the archive sources (SAFE products, STAC APIs) share.

A scene whose product is broken (metadata without a required field, an item without the asset a
band needs) must not stop the catalogue of thousands of good scenes, and must not vanish silently
either. So the catalogue keeps the scene and gives the broken band a *problem reference*: a BandRef
whose URI carries the reason. Reading it raises an InputError with that reason, which the engine
records in the run summary against the scene (``report.failed[obsid]``) while the run goes on.
A band the extractor never asks for is never read, so its problem costs nothing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd

from cbm_core.errors import ConfigError, InputError
from cbm_core.model import BandRef

PROBLEM_SCHEME = "cbm-problem:"


def problem_band(reason: str) -> BandRef:
    """A band reference that fails with `reason` when it is read."""
    return BandRef(PROBLEM_SCHEME + reason)


def raise_if_problem(band: BandRef) -> None:
    if band.uri.startswith(PROBLEM_SCHEME):
        raise InputError(band.uri[len(PROBLEM_SCHEME) :])


def date_option(value: Any, name: str, where: str, end: bool = False) -> pd.Timestamp | None:
    """A start/end option (TOML date, datetime or ISO text) as a UTC timestamp; an end date
    without a time includes that whole day."""
    if value is None:
        return None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        stamp = pd.Timestamp(value, tz="UTC")
        return stamp + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1) if end else stamp
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: option '{name}' must be a date (YYYY-MM-DD), got {value!r}") from None
    if isinstance(value, str) and len(value.strip()) == 10 and end:
        stamp = stamp + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def names_list(value: Any, name: str, where: str) -> list[str]:
    """A list-of-names option (one name may be given as text)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: option '{name}' must be a list of names, got {value!r}")
    return list(value)
