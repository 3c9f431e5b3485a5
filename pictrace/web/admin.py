"""Writes through the API: add, delete, reindex. Each needs the bearer token (``auth.require_writer``).

Handlers stay thin: they parse the request and call the :class:`~pictrace.ingest.Ingestor`, which does the
work on the bounded pool (so a write that arrives while the pool is full gets 503 like a search).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile

from pictrace.duplicates import group_info
from pictrace.errors import InvalidInputError, NotFoundError, PicTraceError
from pictrace.ingest import AddedImage as Added
from pictrace.metadata import check_metadata, check_text, parse_metadata
from pictrace.schemas import (
    AddedImage,
    AddedImages,
    AddedItem,
    AddImageRequest,
    Decided,
    DeletedImage,
    KeepRequest,
    NotDuplicatesRequest,
    Reindexed,
    thumbnail_url,
)
from pictrace.web.api import ERRORS
from pictrace.web.auth import require_writer
from pictrace.web.deps import (
    ServiceDep,
    admit,
    content_type,
    decoding,
    image_fields,
    json_body,
    query_bytes,
    read_upload,
)
from pictrace.web.errors import status_for

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
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The image; repeat the part to add several (answered with a list).",
                        },
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "Several images in one request: answered with one entry per file.",
                        },
                        **_FIELDS,
                    },
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
    """(bytes, url, id, metadata) from a form url or a JSON body."""
    max_meta = service.settings.max_metadata_bytes
    kind = content_type(request)
    if kind == "application/json":
        body = await json_body(request, AddImageRequest)
        metadata = _metadata(body.metadata, max_meta)
        _entry_id(body.id)
        check_text(body.url, "url")
        return await query_bytes(service, upload=None, url=body.url), body.url.strip(), body.id, metadata
    if kind == "application/x-www-form-urlencoded":
        async with request.form(max_files=0, max_fields=10) as form:
            return await _read_one(form, service)
    raise InvalidInputError(
        "send multipart/form-data (file or url), application/x-www-form-urlencoded (url) or application/json"
    )


async def _read_one(form: FormData, service: ServiceDep) -> tuple[bytes, str | None, str | None, dict[str, Any]]:
    upload, url = image_fields(form)
    if url is not None:
        check_text(url, "url")
    entry_id = _entry_id(form.get("id"))
    metadata = _metadata(form.get("metadata"), service.settings.max_metadata_bytes)
    data = await query_bytes(service, upload=upload, url=url)
    is_upload = upload is not None and bool(upload.filename or upload.size)
    return data, None if is_upload else (url or "").strip(), entry_id, metadata


def _answer(added: Added) -> AddedImage:
    return AddedImage(
        sha256=added.sha256,
        id=added.id,
        url=added.url,
        added=added.added,
        width=added.width,
        height=added.height,
        thumbnail_url=thumbnail_url(added.sha256),
    )


async def _add_several(form: FormData, parts: list[UploadFile | str], service: ServiceDep) -> AddedImages:
    """Each file on its own: one that is refused (not an image, too large, corrupt) does not fail the others."""
    if form.get("id") or form.get("url"):
        raise InvalidInputError("several files take no 'id' or 'url' (send one file to name it)")
    metadata = _metadata(form.get("metadata"), service.settings.max_metadata_bytes)
    results: list[AddedItem] = []
    for part in parts:
        name = part.filename if isinstance(part, UploadFile) else None
        try:
            if not isinstance(part, UploadFile):
                raise InvalidInputError("'file' must be a file upload")
            data = await read_upload(part, service.settings.max_upload_bytes)
            async with decoding(service, data):
                added = await service.ingestor.add_image(data, metadata=metadata)
        except PicTraceError as exc:  # answered in its entry, with the status it would have had alone
            results.append(AddedItem(filename=name, status=status_for(exc), outcome="refused", detail=str(exc)))
            continue
        outcome: Literal["added", "duplicate"] = "added" if added.added else "duplicate"
        results.append(
            AddedItem(filename=name, status=201 if added.added else 200, outcome=outcome, image=_answer(added))
        )
    return AddedImages(results=results)


@router.post(
    "/api/images",
    response_model=AddedImage | AddedImages,
    status_code=201,
    dependencies=[Depends(admit)],
    responses={
        200: {
            "model": AddedImage | AddedImages,
            "description": "Already stored: source linked; or, for several files, one entry per file",
        },
        **WRITE_ERRORS,
    },
    openapi_extra=ADD_BODY,
    summary="Add images to the gallery (needs the API token)",
)
async def add_image(request: Request, service: ServiceDep) -> JSONResponse:
    if content_type(request) == "multipart/form-data":
        most = service.tuning.ingest.max_files_per_request
        async with request.form(max_files=most, max_fields=10) as form:
            parts = form.getlist("file") + form.getlist("files")
            if len(parts) > 1 or "files" in form:
                several = await _add_several(form, parts, service)
                return JSONResponse(several.model_dump(mode="json"), status_code=200)
            data, url, entry_id, metadata = await _read_one(form, service)
    else:
        data, url, entry_id, metadata = await _read_add(request, service)
    async with decoding(service, data):
        added = await service.ingestor.add_image(data, url=url, entry_id=entry_id, metadata=metadata)
    return JSONResponse(_answer(added).model_dump(mode="json"), status_code=201 if added.added else 200)


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


# --- decisions about duplicates: kept in the catalogue, so every later ingest, reindex and restart obeys them


def _sha(raw: str) -> str:
    sha = raw.strip().lower()
    if not SHA256.fullmatch(sha):
        raise InvalidInputError(f"{raw!r} is not a sha256 (64 hex digits)")
    return sha


@router.post(
    "/api/duplicates/not-duplicates",
    response_model=Decided,
    responses={404: {"description": "No such image"}, **WRITE_ERRORS},
    summary="Two images are not the same picture: never group them again (needs the API token)",
)
async def not_duplicates(request: Request, service: ServiceDep) -> Decided:
    body = await json_body(request, NotDuplicatesRequest)
    a, b = _sha(body.sha256_a), _sha(body.sha256_b)
    if a == b:
        raise InvalidInputError("an image is always a duplicate of itself")
    for sha in (a, b):
        if not await service.pool.run(service.catalogue.has_image, sha):
            raise NotFoundError(f"no image with sha256 {sha}")
    await service.pool.run(service.catalogue.decide_distinct, a, b)
    await service.pool.run(service.duplicates.refresh)  # the answer shows the group after the decision
    try:
        group = group_info(await service.pool.run(service.duplicates.group, a))
    except NotFoundError:
        group = None
    return Decided(group=group)


@router.post(
    "/api/duplicates/keep",
    response_model=Decided,
    responses={404: {"description": "The image is in no duplicate group"}, **WRITE_ERRORS},
    summary="Keep this member of its group; optionally remove the others (needs the API token)",
)
async def keep(request: Request, service: ServiceDep) -> Decided:
    body = await json_body(request, KeepRequest)
    sha = _sha(body.sha256)
    group = await service.pool.run(service.duplicates.group, sha)  # 404 when it is in no group
    await service.pool.run(service.catalogue.decide_keep, sha)
    deleted: list[str] = []
    if body.delete_others:
        for member in group.members:
            if member.facts.sha256 != sha:
                await service.ingestor.remove_image(member.facts.sha256)
                deleted.append(member.facts.sha256)
    await service.pool.run(service.duplicates.refresh)
    try:
        after = group_info(await service.pool.run(service.duplicates.group, sha))
    except NotFoundError:
        after = None
    return Decided(group=after, deleted=deleted)
