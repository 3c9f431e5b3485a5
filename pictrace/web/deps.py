"""Dependencies shared by the routers: the running Service, and reading a query image from a request."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError
from starlette.datastructures import FormData, UploadFile

from pictrace.decode import decode_cost
from pictrace.errors import InvalidInputError, TooLargeError
from pictrace.explain import with_evidence
from pictrace.kept_queries import keep_query
from pictrace.schemas import SearchResult
from pictrace.service import Service

log = logging.getLogger(__name__)


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def admit(service: ServiceDep) -> None:
    """Route dependency: 503 before the body is read when the CPU queue is already full (it would be
    refused after the upload anyway; reading it first would only pile up bytes)."""
    service.pool.check_capacity()


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """Read an uploaded file into memory, refusing it as soon as it passes the byte cap."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            raise TooLargeError(f"upload is larger than the {max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def query_bytes(service: Service, *, upload: UploadFile | None, url: str | None) -> bytes:
    """The query image's bytes from exactly one of an upload or a user's URL (fetched SSRF-guarded)."""
    has_upload = upload is not None and bool(upload.filename or upload.size)
    url = (url or "").strip() or None
    if has_upload and url:
        raise InvalidInputError("send either a file or a URL, not both")
    if has_upload:
        assert upload is not None
        return await read_upload(upload, service.settings.max_upload_bytes)
    if url:
        return await service.fetcher.fetch_user(url)
    raise InvalidInputError("no query image: send a multipart 'file' or a 'url'")


async def run_search(service: Service, data: bytes, top_k: int | None) -> SearchResult:
    """Search on the bounded executor; OverloadedError (503) when its queue is full.

    The query's bytes are dropped with the request unless the operator set ``PICTRACE_KEEP_QUERIES``; apart
    from that, they are held in memory for a few minutes (bounded; ``PICTRACE_EXPLAIN_TTL_S=0`` keeps nothing)
    so the evidence pictures can be drawn.
    """
    async with decoding(service, data):
        result = servable(await service.pool.run(service.searcher.search_bytes, data, top_k))
    if service.settings.keep_queries:
        await service.pool.run_background(keep_query, service.settings, data, result.query.sha256)
    return with_evidence(result, service.queries.keep(data, result) if result.results else None)


@contextlib.asynccontextmanager
async def decoding(service: Service, data: bytes) -> AsyncIterator[None]:
    """Hold the pixels a decode of ``data`` will take (its header says; pictrace/pixels.py) while it runs. A body
    that is no image, or one over the pixel cap, is refused here, before it takes a worker."""
    service.pool.check_capacity()
    cost = decode_cost(
        data, max_pixels=service.settings.max_pixels, draft_min_side=service.tuning.decoding.draft_min_side
    )
    async with service.pixels.hold(cost):
        yield


def servable(result: SearchResult) -> SearchResult:
    """The result without the matches that cannot be written as UTF-8 JSON (and so as a page).

    Metadata is checked where it comes in (pictrace/metadata.py); this is the second line, for a record stored
    before those checks or written to the catalogue by other means: one bad record costs its own match, logged,
    never the whole answer.
    """
    kept = []
    for match in result.results:
        try:
            json.dumps(match.model_dump(mode="json"), ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (ValueError, TypeError, RecursionError, PydanticSerializationError) as exc:
            log.error("image %s left out of an answer: its stored record cannot be served (%s)", match.sha256, exc)
            continue
        kept.append(match)
    if len(kept) == len(result.results):
        return result
    return result.model_copy(update={"results": kept})


def parse_top_k(raw: object) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(str(raw))
    except ValueError as exc:
        raise InvalidInputError(f"top_k must be an integer between 1 and 50, got {raw!r}") from exc
    if not 1 <= value <= 50:
        raise InvalidInputError(f"top_k must be between 1 and 50, got {value}")
    return value


M = TypeVar("M", bound=BaseModel)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def json_body(request: Request, model: type[M]) -> M:
    """Validate a JSON body into ``model``; a bad body is the client's error (400), named plainly."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidInputError(f"invalid JSON body: {exc.errors()[0]['msg']}") from exc


def image_fields(form: FormData) -> tuple[UploadFile | None, str | None]:
    """The ``file`` and ``url`` fields of a form, each of the right kind or absent."""
    upload = form.get("file")
    url = form.get("url")
    if upload is not None and not isinstance(upload, UploadFile):
        raise InvalidInputError("'file' must be a file upload")
    if url is not None and not isinstance(url, str):
        raise InvalidInputError("'url' must be a text field")
    return upload, url
