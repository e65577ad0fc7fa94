"""Logging for operators: levels, text and JSON lines with their fields, and the run log file."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest

from cbm_core import logs


@pytest.fixture
def restore_logging():
    """configure() changes the root logger and the environment (for worker processes): undo both,
    so that later tests see neither this test's handlers nor its level."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved = {name: os.environ.pop(name, None) for name in (logs.LEVEL_ENV, logs.FORMAT_ENV)}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_json_lines_carry_level_logger_message_and_fields(restore_logging):
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    log = logging.getLogger("cbm.test")
    log.debug("not shown at info")
    log.info("scene %s stored", "S2A_1", extra={"rows": 12, "seconds": 0.5})
    try:
        raise ValueError("bad band")
    except ValueError:
        log.exception("scene failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    assert [line["message"] for line in lines] == ["scene S2A_1 stored", "scene failed"]
    assert lines[0] | {"time": None} == {
        "time": None, "level": "info", "logger": "cbm.test", "message": "scene S2A_1 stored",
        "rows": 12, "seconds": 0.5,
    }  # fmt: skip
    assert lines[0]["time"].endswith("Z") and lines[1]["exception"] == "ValueError"
    assert "bad band" in lines[1]["traceback"]


def test_text_lines_and_levels(restore_logging):
    out = io.StringIO()
    logs.configure("warning", "text", stream=out)
    logging.getLogger("cbm.test").info("hidden")
    logging.getLogger("cbm.test").warning("claims kept", extra={"run": "host-1"})
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" WARNING cbm.test: claims kept run=host-1")
    with pytest.raises(ValueError, match="log level 'loud'"):
        logs.configure("loud")
    with pytest.raises(ValueError, match="log format 'xml'"):
        logs.configure("info", "xml")


def test_configure_twice_keeps_one_console_handler_and_tells_worker_processes(restore_logging):
    logs.configure("debug", "json", stream=io.StringIO())
    logs.configure("info", "text", stream=io.StringIO())
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_cbm", None) == "console"]
    assert len(ours) == 1
    assert (os.environ[logs.LEVEL_ENV], os.environ[logs.FORMAT_ENV]) == ("info", "text")
    assert logging.getLogger("psycopg.pool").getEffectiveLevel() == logging.WARNING  # not one line per query


def test_run_log_keeps_info_records_while_the_console_shows_warnings(restore_logging, tmp_path):
    out = io.StringIO()
    logs.configure("warning", "text", stream=out)
    with logs.run_log(tmp_path / "outputs") as path:
        logging.getLogger("cbm.test").info("scene stored")
        logging.getLogger("cbm.test").warning("scene failed")
    logging.getLogger("cbm.test").warning("after the run")
    assert path == tmp_path / "outputs" / "run.log"
    kept = path.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in kept] == ["scene stored", "scene failed"]
    assert [line.split(": ", 1)[1] for line in out.getvalue().splitlines()] == [
        "scene failed",
        "after the run",
    ]


def test_cbm_run_writes_its_log_beside_summary_json(restore_logging, demo_config):
    from click.testing import CliRunner

    from cbm_core.cli import cli

    result = CliRunner().invoke(
        cli, ["--log-level", "warning", "--log-format", "json", "run", str(demo_config)]
    )
    assert result.exit_code == 0, result.output
    out = demo_config.parent / "out"
    assert (out / "summary.json").is_file()
    records = [json.loads(line) for line in (out / logs.RUN_LOG).read_text().splitlines()]
    started, finished = records[0], records[-1]
    assert started["message"] == f"run {demo_config} started" and started["logger"] == "cbm_core.cli"
    summary = json.loads((out / "summary.json").read_text())
    assert finished["message"] == f"run {demo_config} finished"
    assert (
        finished["parcels"] == summary["parcels"] and finished["verdicts_red"] == summary["verdicts"]["red"]
    )
    assert "started" not in result.stderr  # the console shows warnings only; run.log keeps the rest
