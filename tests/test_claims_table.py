"""The claims table of docs/testing.md names tests that exist: a renamed or deleted test must
take its row with it (or the claim loses its proof without anyone noticing)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"`((?:tests|examples)/[\w./-]+\.py)(?:::(\w+))?`")


def test_every_test_named_in_the_claims_table_exists():
    text = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    table = text.split("## Claims and the tests that prove them", 1)[1]
    references = REFERENCE.findall(table)
    assert len(references) >= 40
    missing = []
    for path, name in references:
        source = ROOT / path
        if not source.is_file() or (name and not re.search(rf"^def {name}\(", source.read_text(), re.M)):
            missing.append(f"{path}::{name}" if name else path)
    assert not missing, f"docs/testing.md names tests that do not exist: {missing}"
