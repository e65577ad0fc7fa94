"""Files the server makes for a request (chips, composites, backgrounds): one folder per request,
named by a random token, that records its aoi, and short-lived signed links to them.

A JRC client fetches chip and background links without credentials, so a link carries its own
proof instead: an expiry time and an HMAC of (expiry, folder) under a key all workers share. A
link cannot be widened to another folder, outlives its expiry by nothing, and the folder is
random, so links cannot be guessed. The authenticated route (basic auth + aoi check) stays.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import shutil
import time
from pathlib import Path

FILE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}(\.[A-Za-z0-9_-]{1,32})?\.(tif|png)$")
TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
STAMP = re.compile(r"^[0-9]{1,12}-[A-Za-z0-9_-]{22}$")
FOLDER_TTL = 3600.0  # seconds a request's folder is kept
LINK_TTL = 900  # seconds a signed link stays valid
UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
OWNER_FILE = ".aoi"  # in each request folder: the aoi it belongs to, and the mark that the server made it


def safe_stem(text: str) -> str:
    """A file-name stem from a scene id (.SAFE references hold dots the JRC client splits on)."""
    return UNSAFE.sub("_", text)[:200] or "_"


class Files:
    """The request folders under one root, and the key that signs links to them."""

    def __init__(self, root: Path, key: bytes) -> None:
        self.root = root
        self.key = key

    def new_folder(self, aoi: str) -> tuple[str, Path]:
        """A fresh folder for one request's files, owned by an aoi; old folders are removed."""
        self.expire()
        token = secrets.token_urlsafe(18)
        folder = self.root / token
        folder.mkdir(parents=True)
        (folder / OWNER_FILE).write_text(aoi)
        return token, folder

    def signed(self, token: str, name: str, now: float | None = None) -> str:
        """A relative link to a file that works without credentials until it expires."""
        expires = int((time.time() if now is None else now) + LINK_TTL)
        return f"/signed/{expires}-{self._mac(expires, token)}/{token}/{name}"

    def _mac(self, expires: int, token: str) -> str:
        digest = hmac.new(self.key, f"{expires}/{token}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")

    def check_signature(self, stamp: str, token: str) -> bool:
        """Whether a signed link's stamp is authentic and not expired."""
        if not STAMP.match(stamp):
            return False
        expires, mac = stamp.split("-", 1)
        return int(expires) >= time.time() and hmac.compare_digest(mac, self._mac(int(expires), token))

    def find(self, token: str, name: str) -> tuple[str, Path] | None:
        """(aoi, path) of an existing file, or None (bad names never touch the file system)."""
        if not TOKEN.match(token) or not FILE_NAME.match(name):
            return None
        folder = self.root / token
        try:
            aoi = (folder / OWNER_FILE).read_text()
        except OSError:
            return None
        path = folder / name
        return (aoi, path) if path.is_file() else None

    def discard_if_empty(self, folder: Path) -> None:
        """Remove a request folder that received no file (every window was empty)."""
        if not any(p.name != OWNER_FILE for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)

    def expire(self, ttl: float = FOLDER_TTL) -> None:
        """Remove this server's request folders older than ttl, and nothing else: the chip folder may
        be shared (`chip_dir = "shared"`), so a folder is ours only by its token name and owner file."""
        cutoff = time.time() - ttl
        for folder in self.root.iterdir():
            try:
                ours = (
                    TOKEN.match(folder.name) and (folder / OWNER_FILE).is_file() and not folder.is_symlink()
                )
                if ours and folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                continue
