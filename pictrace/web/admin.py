"""Writes through the API: add, delete, reindex. Each needs the bearer token (``auth.require_writer``).

Handlers stay thin: they parse the request and call the :class:`~pictrace.ingest.Ingestor`, which does the
work on the bounded pool (so a write that arrives while the pool is full gets 503 like a search).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pictrace.errors import InvalidInputError, NotFoundError
from pictrace.metadata import check_metadata, check_text, parse_metadata
from pictrace.schemas import AddedImage, AddImageRequest, DeletedImage, Reindexed
from pictrace.web.api import ERRORS
from pictrace.web.auth import require_writer
from pictrace.web.deps import (
    FORM_TYPES,
    ServiceDep,
    admit,
    content_type,
    decoding,
    image_fields,
    json_body,
    query_bytes,
)

router = APIRouter(dependencies=[Depends(require_writer)], tags=["writes"])

SHA256 = re.compile(r"[0-9a-f]{64}")

WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    401: {"description": "Missing or wrong bearer token"},
    403: {"description": "Writes are disabled: no PICTRACE_API_TOKEN configured"},
}

_FIELDS = {
    "url": {"type": "string", "description": "http(s) URL of the image, instead of a file."},
    "id": {"type": "string", "maxLength": 256, "description": "Your identifier for the image."},
    "metadata": {"type": "string", "description": "A JSON object, returned with search results."},
}
ADD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}, **_FIELDS},
                }
            },
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "required": ["url"], "properties": _FIELDS}
            },
            "application/json": {"schema": AddImageRequest.model_json_schema()},
        },
    }
}


def _metadata(raw: object, max_bytes: int) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        return parse_metadata(raw, max_bytes)
    return check_metadata(raw, max_bytes)


def _entry_id(raw: object) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or len(raw) > 256:
        raise InvalidInputError("id must be text of at most 256 characters")
    check_text(raw, "id")
    return raw


async def _read_add(request: Request, service: ServiceDep) -> tuple[bytes, str | None, str | None, dict[str, Any]]:
    """(bytes, url, id, metadata) from a multipart file or url, a form url, or a JSON body."""
    max_meta = service.settings.max_metadata_bytes
    kind = content_type(request)
    if kind == "application/json":
        body = await json_body(request, AddImageRequest)
        metadata = _metadata(body.metadata, max_meta)
        _entry_id(body.id)
        check_text(body.url, "url")
        return await query_bytes(service, upload=None, url=body.url), body.url.strip(), body.id, metadata
    if kind in FORM_TYPES:
        async with request.form(max_files=1, max_fields=10) as form:
            upload, url = image_fields(form)
            if url is not None:
                check_text(url, "url")
            entry_id = _entry_id(form.get("id"))
            metadata = _metadata(form.get("metadata"), max_meta)
            data = await query_bytes(service, upload=upload, url=url)
            is_upload = upload is not None and bool(upload.filename or upload.size)
            return data, None if is_upload else (url or "").strip(), entry_id, metadata
    raise InvalidInputError(
        "send multipart/form-data (file or url), application/x-www-form-urlencoded (url) or application/json"
    )


@router.post(
    "/api/images",
    response_model=AddedImage,
    status_code=201,
    dependencies=[Depends(admit)],
    responses={200: {"model": AddedImage, "description": "Already stored: source linked"}, **WRITE_ERRORS},
    openapi_extra=ADD_BODY,
    summary="Add an image to the gallery (needs the API token)",
)
async def add_image(request: Request, service: ServiceDep) -> JSONResponse:
    data, url, entry_id, metadata = await _read_add(request, service)
    async with decoding(service, data):
        added = await service.ingestor.add_image(data, url=url, entry_id=entry_id, metadata=metadata)
    body = AddedImage(
        sha256=added.sha256,
        id=added.id,
        url=added.url,
        added=added.added,
        width=added.width,
        height=added.height,
        thumbnail_url=f"/api/images/{added.sha256}/thumbnail",
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=201 if added.added else 200)


@router.delete(
    "/api/images/{sha256}",
    response_model=DeletedImage,
    responses={404: {"description": "No such image"}, **WRITE_ERRORS},
    summary="Remove an image from the gallery and the index (needs the API token)",
)
async def delete_image(sha256: str, service: ServiceDep) -> DeletedImage:
    sha = sha256.strip().lower()
    if not SHA256.fullmatch(sha):
        raise NotFoundError(f"no image with sha256 {sha256!r} (expected 64 hex digits)")
    await service.ingestor.remove_image(sha)
    return DeletedImage(sha256=sha)


@router.post(
    "/api/reindex",
    response_model=Reindexed,
    responses=WRITE_ERRORS,
    summary="Rebuild the vector index from the catalogue (needs the API token)",
)
async def reindex(service: ServiceDep) -> Reindexed:
    return Reindexed(vectors=await service.ingestor.reindex())
