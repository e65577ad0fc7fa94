"""HTTP basic authentication: the dependency every data route takes."""

from __future__ import annotations

import asyncio
import binascii
import math
from base64 import b64decode
from concurrent.futures import Future
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from cbm_plugins.serve._throttle import HashPool, LoginThrottle
from cbm_plugins.serve._users import Authenticator, User

REALM = "cbm"
CHALLENGE = {"WWW-Authenticate": f'Basic realm="{REALM}"'}


class Basic(HTTPBasic):
    """HTTP basic credentials decoded as UTF-8 (RFC 7617's charset), else Latin-1.

    FastAPI's own decodes ASCII only, so a user `cbm users add` accepted with a password like
    "Grüße-2024!" could never log in.
    """

    async def __call__(self, request: Request) -> HTTPBasicCredentials:  # type: ignore[override]
        scheme, _, param = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            raise HTTPException(401, "not authenticated", headers=CHALLENGE)
        try:
            raw = b64decode(param.strip(), validate=True)
        except (ValueError, binascii.Error):
            raise HTTPException(401, "invalid authentication credentials", headers=CHALLENGE) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # what older clients send
        username, separator, password = text.partition(":")
        if not separator:
            raise HTTPException(401, "invalid authentication credentials", headers=CHALLENGE)
        return HTTPBasicCredentials(username=username, password=password)


basic = Basic(realm=REALM, scheme_name="HTTPBasic")  # the OpenAPI name clients know


async def current_user(
    request: Request, credentials: Annotated[HTTPBasicCredentials, Depends(basic)]
) -> User:
    """The user the request's credentials name (401 otherwise; 429 while backing off, see _throttle).

    A password verified before is checked on the event loop (a keyed hash); a new or wrong one
    costs a scrypt, on the bounded hash pool so that it never holds up the threads serving data.
    """
    auth: Authenticator = request.app.state.authenticator
    throttle: LoginThrottle = request.app.state.login_throttle
    client = f"client:{request.client.host if request.client else '?'}"
    name = f"user:{credentials.username}"
    _refuse_while_waiting(throttle.wait(client))  # before any check: a waiting client learns nothing
    keys = [client]
    if not throttle.trusted(client, name):  # an attack on a name from elsewhere spares its owner
        _refuse_while_waiting(throttle.wait(name))
        keys.append(name)
    found = auth.cached(credentials.username, credentials.password)
    if found is not None:
        return found
    found = await _check(request, auth, throttle, keys, credentials)
    if found is None:
        throttle.failed(client, name)
        raise HTTPException(401, "wrong user name or password", headers=CHALLENGE)
    throttle.succeeded(client, name)
    return found


async def _check(
    request: Request,
    auth: Authenticator,
    throttle: LoginThrottle,
    keys: list[str],
    credentials: HTTPBasicCredentials,
) -> User | None:
    """The scrypt check on the bounded pool; requests with the same credentials share one check."""
    checks: dict[bytes, Future] = request.app.state.login_checks
    same = auth.digest(credentials.username, credentials.password)
    future = checks.get(same)
    if future is None:
        if not throttle.begin(*keys):
            _refuse_while_waiting(1.0)  # as many checks in flight as failures are free
        pool: HashPool = request.app.state.hash_pool
        future = pool.submit(auth.check, credentials.username, credentials.password)
        if future is None:
            throttle.end(*keys)
            raise HTTPException(
                503, "too many logins being checked; try again shortly", headers={"Retry-After": "1"}
            )
        checks[same] = future

        def done(_: Future) -> None:
            checks.pop(same, None)
            throttle.end(*keys)

        future.add_done_callback(done)
    return await asyncio.wrap_future(future)


def _refuse_while_waiting(seconds: float) -> None:
    if seconds > 0:
        raise HTTPException(
            429,
            f"too many failed logins; try again in {math.ceil(seconds)} s",
            headers={"Retry-After": str(math.ceil(seconds))},
        )


Who = Annotated[User, Depends(current_user)]
