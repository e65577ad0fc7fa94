"""HTTP plumbing shared by the routers: error answers, column-oriented JSON and request size limits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cbm_core.errors import CbmError, InputError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """Every error is a JSON object with an ``error`` message (never an empty body)."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _column(values: Any) -> Any:
    """A column for orjson: numeric numpy arrays as they are (NaN becomes null), others as lists."""
    array = np.asarray(values)
    if array.dtype.kind in "fiub":
        return np.ascontiguousarray(array)
    return array.tolist()


def columns(data: dict[str, Any]) -> Response:
    """A column-oriented JSON answer, serialised by orjson straight from the numpy arrays."""
    body = orjson.dumps({k: _column(v) for k, v in data.items()}, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type="application/json")


class SizeLimit:
    """ASGI middleware refusing oversized requests before any handler reads them."""

    def __init__(self, app: Any, max_body: int, max_query: int) -> None:
        self.app, self.max_body, self.max_query = app, max_body, max_query

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = None
        if len(scope.get("query_string", b"")) > self.max_query:
            refusal = error_response(414, f"query string longer than {self.max_query} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            refusal = error_response(413, f"request body larger than {self.max_body} bytes")
        elif length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            refusal = error_response(411, "a request body needs a Content-Length header")
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    details = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    return error_response(422, f"{'.'.join(first['loc'][1:]) or 'request'}: {first['msg']}", detail=details)


async def _data_error(_: Request, exc: CbmError) -> JSONResponse:
    # The details (paths, DSNs) go to the server log, not to the client.
    log.error("%s: %s", type(exc).__name__, exc)
    if isinstance(exc, InputError):
        return error_response(502, "the dataset's data could not be read; see the server log")
    return error_response(503, "the dataset's store is unavailable; try again later")


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # A bug or an error no plugin turned into a CbmError: JSON like every other answer, details logged.
    log.error("unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
    return error_response(500, "internal server error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """JSON error bodies for our errors, HTTP errors, validation errors and data-source failures."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(CbmError, _data_error)
    app.add_exception_handler(Exception, _unexpected)
