"""The documentation site builds with warnings as errors, and its example notebook runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strict_with_generated_references(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=240,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    cli = (site / "cli" / "index.html").read_text()
    from cbm_core.cli import cli as cbm

    commands = cbm.list_commands(click.Context(cbm))
    assert {"serve", "users", "workbench", "report", "chips"} <= set(commands)
    missing = [c for c in commands if f"<code>cbm {c}</code>" not in cli]
    assert not missing, f"commands missing from the CLI reference: {missing}"
    assert "<code>cbm workbench export</code>" in cli
    assert "summary page" in cli  # `cbm report --help` says what the report holds
    gallery = (site / "gallery" / "index.html").read_text()
    for name in ("parcel", "peers", "calendar", "report-page", "workbench"):
        picture = site / "gallery" / f"{name}.png"
        assert picture.is_file() and picture.stat().st_size > 20_000, name
        assert f"{name}.png" in gallery
    notebook = (site / "notebooks" / "quickstart" / "index.html").read_text()
    assert notebook.count("<img") >= 2 and "flagged parcels" in notebook  # rendered with its outputs
    assert (site / "css" / "extra.css").is_file() and "pre-wrap" in (site / "css" / "extra.css").read_text()
    rest = (site / "rest" / "index.html").read_text()
    assert "<code>GET /query/parcelByID</code>" in rest and (site / "openapi.json").is_file()
    api = (site / "api" / "index.html").read_text()
    assert 'id="cbm_plugins.analyst._plots.plot_parcel"' in api and 'id="cbm_core.api.run"' in api
    assert api.count("Parameters:") + api.count(">Parameters<") >= 3  # numpy sections, not run-on text
    examples = api.split('doc-section-title">Examples:')[1:]
    assert len(examples) >= 5 and all('<span class="gp">&gt;&gt;&gt; </span>' in e[:400] for e in examples)
    for page in ("concepts", "analyst", "data", "plugins"):
        assert (site / page / "index.html").is_file(), page
    assert (site / "notebooks" / "quickstart.ipynb").is_file()


def test_quickstart_notebook_executes() -> None:
    path = ROOT / "docs" / "notebooks" / "quickstart.ipynb"
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the parcel plot and the calendar
    assert any("flagged parcels" in o.get("text", "") for o in outputs)
