"""HTTP basic authentication: the dependency every data route takes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.concurrency import run_in_threadpool

from cbm_plugins.serve._users import Authenticator, User

REALM = "cbm"
basic = HTTPBasic(realm=REALM)


async def current_user(
    request: Request, credentials: Annotated[HTTPBasicCredentials, Depends(basic)]
) -> User:
    """The user the request's credentials name (401 otherwise).

    A password verified before is checked on the event loop (a keyed hash); a new or wrong one
    costs a scrypt, in a worker thread so that it does not hold up other requests.
    """
    auth: Authenticator = request.app.state.authenticator
    found = auth.cached(credentials.username, credentials.password)
    if found is None:
        found = await run_in_threadpool(auth.check, credentials.username, credentials.password)
    if found is None:
        raise HTTPException(
            401, "wrong user name or password", headers={"WWW-Authenticate": f'Basic realm="{REALM}"'}
        )
    return found


Who = Annotated[User, Depends(current_user)]
