"""Logs an operator can use: stdlib logging, configured once for the command line, the runners and
the server, as text for people or as one JSON object per line for log collectors.

Modules log through ``logging.getLogger(__name__)``; nothing here is needed to emit a record.
Fields passed with ``extra={...}`` (an access log's user, route, status...) are part of the record:
JSON lines carry them as keys, text lines append them as ``key=value``. The level and format come
from ``cbm --log-level/--log-format`` or the environment variables CBM_LOG_LEVEL and
CBM_LOG_FORMAT (which worker processes started by uvicorn or dask inherit).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from cbm_core.locks import make_folder

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
DEFAULT_LEVEL = "info"
DEFAULT_FORMAT = "text"
LEVEL_ENV = "CBM_LOG_LEVEL"
FORMAT_ENV = "CBM_LOG_FORMAT"
RUN_LOG = "run.log"  # written beside summary.json by `cbm run`
FILE_ONLY = "_file_only"  # extra={FILE_ONLY: True}: for run.log, not the console (which says it otherwise)
# Libraries that log every routine step at INFO (psycopg_pool: each connection handed out); they
# speak at WARNING unless the operator asks for debug.
CHATTY = ("psycopg.pool", "psycopg", "numba", "fsspec", "botocore", "urllib3", "asyncio")

# Attributes every LogRecord has; anything else on a record came in through `extra`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record comes (test runners and notebooks
    swap it), not to the stream that was current when logging was configured."""

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _: IO[str]) -> None:
        pass


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    """UTC time with milliseconds, ISO 8601 (sortable, unambiguous across machines)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-06-01T10:00:00.123Z INFO cbm.access: message key=value ...``, one line per record
    (a traceback, if any, follows on its own lines)."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        line = f"{line} {extra}" if extra else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's extra fields and, for
    an exception, its type and traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def _level(level: str) -> int:
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    return getattr(logging, level.upper())


def configure(level: str | None = None, fmt: str | None = None, stream: IO[str] | None = None) -> None:
    """Send every log record at `level` or above to stderr (or `stream`) in `fmt`; called again,
    it replaces its own handler (commands run in one process in tests and notebooks).

    Unset arguments come from CBM_LOG_LEVEL / CBM_LOG_FORMAT, else info / text. The choice is
    written back to those variables so that worker processes started later log the same way.
    """
    level = (level or os.environ.get(LEVEL_ENV) or DEFAULT_LEVEL).lower()
    fmt = (fmt or os.environ.get(FORMAT_ENV) or DEFAULT_FORMAT).lower()
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.setFormatter(formatter(fmt))
    handler._cbm = "console"  # type: ignore[attr-defined]
    handler.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_cbm", None) == "console"]:
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = _level(level)
    handler.setLevel(numeric)
    root.setLevel(min(numeric, logging.INFO) if _run_files(root) else numeric)  # a run log keeps INFO
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG else logging.WARNING)
    os.environ[LEVEL_ENV], os.environ[FORMAT_ENV] = level, fmt


def _run_files(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if getattr(h, "_cbm", None) == "run"]


@contextlib.contextmanager
def run_log(folder: Path) -> Iterator[Path]:
    """Also write the log records of the enclosed work to folder/run.log (appended: a re-run adds
    to it), in the configured format, at INFO or the console's level if that is lower."""
    make_folder(folder)  # one clear line when the folder cannot be made, not a traceback
    path = folder / RUN_LOG
    root = logging.getLogger()
    console = _level(os.environ.get(LEVEL_ENV) or DEFAULT_LEVEL)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(formatter((os.environ.get(FORMAT_ENV) or DEFAULT_FORMAT).lower()))
    handler.setLevel(min(console, logging.INFO))  # at least the INFO records, whatever the console shows
    handler._cbm = "run"  # type: ignore[attr-defined]
    previous = root.level
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, handler.level))
    for other in [h for h in root.handlers if getattr(h, "_cbm", None) == "console"]:
        other.setLevel(console)  # the console keeps its own level
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(previous)
