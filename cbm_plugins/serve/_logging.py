"""The access log of `cbm serve`: one record per request on the logger ``cbm.access``.

Each record says who asked (the HTTP basic-auth user name, whether or not the password was
right: the status tells), for which dataset (aoi, year), on which route (the route's template,
e.g. /chips/{token}/{name}, so tokens stay out of the log), the status and the duration. Never
the password, the Authorization header, or the query values that carry data (parcel ids,
coordinates, polygons): they identify farmers' parcels. The record's fields are keys of the JSON
line (``cbm --log-format json``) or ``key=value`` pairs of the text line.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ACCESS = logging.getLogger("cbm.access")
QUIET_ROUTES = frozenset({"/health"})  # load balancers poll it: logged at DEBUG only
MAX_FIELD = 64  # characters kept of a user name or dataset name (they come from the client)
MAX_PATH = 200
MAX_QUERY = 4096  # bytes of the query string looked at for aoi and year (oversized ones get a 414)


def _clean(text: str, limit: int) -> str:
    """Client-supplied text made safe for a log line: no control characters, bounded length."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _user(scope: Scope) -> str:
    """The user name of a basic-auth header ("-" without one); the password is never decoded out."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "basic":
                return "-"
            try:
                user = base64.b64decode(token, validate=True).split(b":", 1)[0]
            except (binascii.Error, ValueError):
                return "-"
            return _clean(user.decode("utf-8", "replace"), MAX_FIELD) or "-"
    return "-"


def _dataset(scope: Scope) -> dict[str, str]:
    """aoi and year of the query (the legacy form names both in `parcels`): which dataset, not data."""
    query = parse_qs(scope.get("query_string", b"")[:MAX_QUERY].decode("latin-1"))
    aoi = (query.get("aoi") or query.get("parcels") or ["-"])[0]
    year = (query.get("year") or ["-"])[0]
    return {"aoi": _clean(aoi, MAX_FIELD), "year": _clean(year, 8)}


class AccessLog:
    """ASGI middleware: one ``cbm.access`` record per HTTP request, written when the answer is sent
    (or when the app failed: status 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app answers

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")  # set by the router on a match: the template, not the values
            path = getattr(route, "path", None) or _clean(scope.get("path", ""), MAX_PATH)
            fields: dict[str, Any] = {
                "method": scope.get("method", "-"),
                "route": path,
                "status": status,
                "user": _user(scope),
                **_dataset(scope),
                "duration_ms": round(1000 * (time.perf_counter() - started), 2),
            }
            level = logging.DEBUG if path in QUIET_ROUTES and status < 400 else logging.INFO
            ACCESS.log(level, "request", extra=fields)
