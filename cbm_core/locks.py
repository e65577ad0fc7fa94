"""One run at a time per output folder and per signature-store folder.

Two runs writing the same folder would interleave their files (verdicts of one, summary of the
other). A run therefore holds an exclusive lock on each folder it writes: the operating system's
flock on ``.cbm-run.lock``, released by the kernel even when the process is killed (no stale lock
to clean by hand). The lock file records the holder (pid, host, start time) so a refused run can
say who holds it; ``wait=True`` queues behind the holder instead.

Once the lock is held nobody else writes there, so temporaries a killed run left behind (hidden
files named with a uuid4 hex: ``.<uuid>.gpkg``, ``.X.parquet.<uuid>.tmp``) are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from cbm_core.errors import CbmError, InputError

LOCK_FILE = ".cbm-run.lock"
# A writer's temporary: hidden, named with a uuid4 hex, maybe after the target's name and before a suffix.
TEMPORARY = re.compile(r"^\.(?:.+\.)?[0-9a-f]{32}(?:\.[A-Za-z0-9_-]+)?$")
WAIT_POLL_SECONDS = 0.5


class FolderBusy(CbmError):
    """Another run holds the lock of an output or store folder."""


def make_folder(folder: Path, what: str = "output folder") -> Path:
    """Create a folder (and its parents), turning the OS's refusal into one line naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {what} {folder}: {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise InputError(f"cannot create {what} {folder}: a file of that name exists")
    return folder


@contextlib.contextmanager
def folder_lock(folder: Path, wait: bool = False, what: str = "output folder") -> Iterator[None]:
    """Hold the run lock of one folder (created if needed) for the duration of the block."""
    make_folder(folder, what)
    path = folder / LOCK_FILE
    try:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the whole block)
    except OSError as exc:
        raise InputError(f"cannot lock {what} {folder}: {exc.strerror or exc}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise FolderBusy(
                    f"{what} {folder} is in use by another run ({_holder(path)}); "
                    "wait for it to finish, or run with --wait to queue behind it"
                ) from None
            fcntl.flock(handle, fcntl.LOCK_EX)  # queue: the kernel wakes us when the holder ends
        handle.seek(0)
        handle.truncate()
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        handle.write(json.dumps(holder))
        handle.flush()
        try:
            remove_temporaries(folder)
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def folder_locks(folders: Sequence[tuple[Path, str]], wait: bool = False) -> Iterator[None]:
    """Hold the locks of several folders (each once, in a fixed order so two runs cannot deadlock)."""
    unique: dict[Path, str] = {}
    for folder, what in folders:
        unique.setdefault(Path(os.path.abspath(folder)), what)
    with contextlib.ExitStack() as stack:
        for folder in sorted(unique):
            stack.enter_context(folder_lock(folder, wait, unique[folder]))
        yield


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries dead writers left in a folder and its subfolders (we hold its lock)."""
    removed = []
    for root, _, files in os.walk(folder):
        for name in files:
            if TEMPORARY.match(name):
                path = Path(root) / name
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def _holder(path: Path) -> str:
    """Who holds a lock, from what it wrote in the lock file."""
    for _ in range(3):  # the holder writes right after locking: give it a moment
        try:
            holder = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            holder = {}
        if holder:
            return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
        time.sleep(WAIT_POLL_SECONDS / 5)
    return "holder unknown"
