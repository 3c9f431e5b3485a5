"""The one place domain errors become HTTP statuses, for the JSON API and the pages alike."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from pictrace import errors

log = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of decides its status.
STATUS_BY_ERROR: tuple[tuple[type[errors.PicTraceError], int], ...] = (
    (errors.WritesDisabledError, 403),
    (errors.AuthError, 401),
    (errors.NotFoundError, 404),
    (errors.IndexMismatchError, 409),
    (errors.InvalidInputError, 400),
    (errors.TooLargeError, 413),
    (errors.UnsupportedFormatError, 415),
    (errors.DecodeError, 422),
    (errors.FetchError, 502),
    (errors.OverloadedError, 503),
    (errors.VectorStoreUnavailableError, 503),
    (errors.NotReadyError, 503),
    (errors.IndexCorruptError, 503),
)


def status_for(exc: errors.PicTraceError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def headers_for(exc: errors.PicTraceError) -> dict[str, str]:
    if isinstance(exc, (errors.OverloadedError, errors.GroupsNotReadyError)):
        return {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, errors.AuthError) and not isinstance(exc, errors.WritesDisabledError):
        return {"WWW-Authenticate": "Bearer"}
    return {}


async def _domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.PicTraceError)
    status = status_for(exc)
    if status >= 500 and status != 503:
        log.error("unexpected domain error on %s: %s", request.url.path, exc)
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers_for(exc))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'request'}: {e.get('msg', 'invalid')}"
        for e in exc.errors()
    )
    return JSONResponse({"detail": problems or "invalid request"}, status_code=422)


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.PicTraceError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
