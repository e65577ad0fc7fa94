"""Scheme recipes shipped with cbm-engine: every TOML file in cbm_plugins/schemes, by file stem."""

from __future__ import annotations

from pathlib import Path

from cbm_core import impl

SCHEMES = Path(__file__).resolve().parent / "schemes"


@impl
def cbm_rule_schemes() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SCHEMES.glob("*.toml"))}
