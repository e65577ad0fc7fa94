"""Users of `cbm serve`: salted scrypt password hashes and the areas (aoi) each may query.

The users file is JSON, written atomically with owner-only permissions. Verifying a password
costs one scrypt (tens of milliseconds, on purpose); a server keeps a keyed digest of passwords it
has already verified so that only the first request of a user pays it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from cbm_core.errors import ConfigError, InputError

SCRYPT = {"n": 2**14, "r": 8, "p": 1}
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
ALL_AOIS = "*"


@dataclass(frozen=True)
class User:
    """One account: who, which areas, and the salted hash of the password."""

    name: str
    aois: tuple[str, ...]
    salt: str
    hash: str
    n: int = SCRYPT["n"]
    r: int = SCRYPT["r"]
    p: int = SCRYPT["p"]

    def may_read(self, aoi: str) -> bool:
        return ALL_AOIS in self.aois or aoi.lower() in (a.lower() for a in self.aois)


def hash_password(
    password: str, salt: bytes, n: int = SCRYPT["n"], r: int = SCRYPT["r"], p: int = SCRYPT["p"]
) -> str:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32
    ).hex()


def make_user(name: str, password: str, aois: list[str]) -> User:
    if not NAME.match(name):
        raise InputError(f"user name {name!r}: use 1-64 letters, digits or . _ @ -")
    if len(password) < 8:
        raise InputError("password: at least 8 characters")
    if not aois:
        raise InputError("give at least one --aoi (or --aoi '*' for every dataset)")
    salt = secrets.token_bytes(16)
    return User(name, tuple(aois), salt.hex(), hash_password(password, salt))


def verify(user: User, password: str) -> bool:
    expected = hash_password(password, bytes.fromhex(user.salt), user.n, user.r, user.p)
    return hmac.compare_digest(expected, user.hash)


def read_users(path: Path) -> dict[str, User]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {
            name: User(name=name, **{**fields, "aois": _aois(fields["aois"], path, name)})
            for name, fields in data["users"].items()
        }
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a cbm users file ({exc})") from None


def _aois(value: object, path: Path, name: str) -> tuple[str, ...]:
    """A user's aois: a list of names (a bare string would become one aoi per letter: "fl" -> f, l)."""
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise ConfigError(
            f'{path}: user {name}: "aois" must be a non-empty list of aoi names like ["fl"] '
            f'(or ["{ALL_AOIS}"]), got {value!r}'
        )
    return tuple(value)


def write_users(path: Path, users: dict[str, User]) -> None:
    """Replace the users file atomically; only its owner may read it (it holds password hashes)."""
    data = {"users": {n: {k: v for k, v in vars(u).items() if k != "name"} for n, u in sorted(users.items())}}
    for fields in data["users"].values():
        fields["aois"] = list(fields["aois"])
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    os.replace(temporary, path)


class Authenticator:
    """Checks HTTP basic credentials against the users file, re-read whenever it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key = secrets.token_bytes(32)  # keys the cache of verified passwords; never leaves memory
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}
        self._verified: dict[str, bytes] = {}

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            self._users = read_users(self.path)
            self._verified = {}
            self._stamp = stamp

    def cached(self, name: str, password: str) -> User | None:
        """The user if this very password was verified before, else None: a keyed hash and a file
        stat, cheap enough to run on the server's event loop (check() may cost a scrypt)."""
        with self._lock:
            self._refresh()
            user = self._users.get(name)
            verified = self._verified.get(name)
        if (
            user is not None
            and verified is not None
            and hmac.compare_digest(verified, self._digest(name, password))
        ):
            return user
        return None

    def check(self, name: str, password: str) -> User | None:
        """The user if the password is right, else None (same work whether or not the user exists)."""
        found = self.cached(name, password)
        if found is not None:
            return found
        with self._lock:
            user = self._users.get(name)
        if user is None:
            hash_password(password, b"\0" * 16)  # as slow as a real check: no user enumeration by timing
            return None
        if not verify(user, password):
            return None
        with self._lock:
            if self._users.get(name) is user:
                self._verified[name] = self._digest(name, password)
        return user

    def digest(self, name: str, password: str) -> bytes:
        """A keyed digest of credentials (the key never leaves memory): safe to hold as a dict key."""
        return self._digest(name, password)

    def _digest(self, name: str, password: str) -> bytes:
        return hmac.new(self._key, f"{name}\0{password}".encode(), hashlib.sha256).digest()
