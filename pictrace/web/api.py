"""The JSON API. Handlers are thin: they read the request, call the pipeline, and return its models."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.datastructures import UploadFile

from pictrace.duplicates import group_info
from pictrace.errors import InvalidInputError, NotFoundError
from pictrace.explain import explain_match, explain_pair
from pictrace.features.thumbnail import media_type
from pictrace.schemas import (
    DuplicateGroupInfo,
    DuplicatePage,
    Health,
    ImageCounts,
    LegacySimilarImages,
    SearchRequest,
    SearchResult,
)
from pictrace.web.deps import (
    FORM_TYPES,
    ServiceDep,
    admit,
    content_type,
    image_fields,
    json_body,
    parse_top_k,
    query_bytes,
    run_search,
)

router = APIRouter()


def form_body(properties: dict[str, Any], required: list[str], *content_types: str) -> dict[str, Any]:
    """OpenAPI requestBody for routes that read their form themselves (to stream and cap it)."""
    schema = {"type": "object", "required": required, "properties": properties}
    return {"requestBody": {"required": True, "content": {t: {"schema": schema} for t in content_types}}}


SEARCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The query image."},
                        "url": {"type": "string", "description": "Or: an http(s) URL of the query image."},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": 50, "default": 5},
                    },
                }
            },
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["url"],
                    "properties": {
                        "url": {"type": "string"},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": 50, "default": 5},
                    },
                }
            },
            "application/json": {"schema": SearchRequest.model_json_schema()},
        },
    }
}

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad request or refused URL"},
    413: {"description": "Body or image too large"},
    415: {"description": "Not an image in an accepted format"},
    422: {"description": "Corrupt image or invalid parameters"},
    502: {"description": "The URL could not be fetched"},
    503: {"description": "Busy: retry after the Retry-After header"},
}


async def _read_query(request: Request, service: ServiceDep) -> tuple[bytes, int | None]:
    """Accept a multipart `file`, a form `url`, or a JSON body `{"url", "top_k"}`."""
    kind = content_type(request)
    if kind == "application/json":
        body = await json_body(request, SearchRequest)
        return await query_bytes(service, upload=None, url=body.url), body.top_k
    if kind in FORM_TYPES:
        async with request.form(max_files=1, max_fields=10) as form:
            upload, url = image_fields(form)
            top_k = parse_top_k(form.get("top_k") or request.query_params.get("top_k"))
            return await query_bytes(service, upload=upload, url=url), top_k
    raise InvalidInputError(
        "send multipart/form-data (file or url), application/x-www-form-urlencoded (url) or application/json"
    )


@router.post(
    "/api/search",
    response_model=SearchResult,
    dependencies=[Depends(admit)],
    responses=ERRORS,
    openapi_extra=SEARCH_BODY,
    summary="Find gallery images that show the same picture or thing",
)
async def search(request: Request, service: ServiceDep) -> SearchResult:
    data, top_k = await _read_query(request, service)
    return await run_search(service, data, top_k)


@router.get("/api/health", response_model=Health, summary="Service status and index counts")
async def health(service: ServiceDep) -> Health:
    indexed, failed = await asyncio.to_thread(service.catalogue.counts)
    return Health(
        status="ok",
        model=service.embedder.name,
        images=ImageCounts(indexed=indexed, pending=service.ingestor.progress.pending, failed=failed),
    )


@router.get(
    "/api/images/{sha256}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/webp": {}, "image/jpeg": {}}}, 404: {"description": "No such image"}},
    summary="A small WebP (JPEG in older catalogues) of a gallery image, served by PicTrace itself",
)
async def thumbnail(sha256: str, service: ServiceDep) -> Response:
    data = await asyncio.to_thread(service.catalogue.thumbnail, sha256.lower())
    # WebP since the compact catalogue, JPEG in older ones (or rows written before)
    return Response(data, media_type=media_type(data), headers={"Cache-Control": "public, max-age=86400"})


@router.get(
    "/api/images/{sha256}/original",
    response_class=FileResponse,
    responses={404: {"description": "No local file for this image"}},
    summary="The original file of a gallery image that is a local file (a folder's, or a db.json path)",
)
async def original(sha256: str, service: ServiceDep) -> FileResponse:
    path = await asyncio.to_thread(service.catalogue.local_path, sha256.lower())
    # a gallery file deleted from disk, or an image added through the API (no file): 404, not a 500
    if not path.is_absolute() or not await asyncio.to_thread(path.is_file):
        raise NotFoundError(f"no local file for image {sha256}")
    folder = service.settings.db
    if await asyncio.to_thread(folder.is_dir):
        # a symlink in the folder may have been re-pointed outside it since it was indexed
        real, root = await asyncio.to_thread(lambda: (path.resolve(), folder.resolve()))
        if not real.is_relative_to(root):
            raise NotFoundError(f"no local file for image {sha256}")
    return FileResponse(path)


async def legacy_answer(service: ServiceDep, data: bytes) -> LegacySimilarImages:
    """The original's answer: the URLs of the top 5 matches, best first."""
    result = await run_search(service, data, 5)
    return LegacySimilarImages(similar_images=[m.url for m in result.results])


# --- compatibility with the original PicTrace ----------------------------------------------------------


@router.post(
    "/upload/",
    response_model=LegacySimilarImages,
    responses=ERRORS,
    dependencies=[Depends(admit)],
    tags=["compatibility"],
    openapi_extra=form_body({"file": {"type": "string", "format": "binary"}}, ["file"], "multipart/form-data"),
    summary="Original PicTrace API: search by uploaded file",
)
async def legacy_upload(request: Request, service: ServiceDep) -> LegacySimilarImages:
    async with request.form(max_files=1, max_fields=5) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInputError("missing multipart field 'file'")
        data = await query_bytes(service, upload=upload, url=None)
    return await legacy_answer(service, data)


@router.post(
    "/upload_from_url/",
    response_model=LegacySimilarImages,
    responses=ERRORS,
    dependencies=[Depends(admit)],
    tags=["compatibility"],
    openapi_extra=form_body(
        {"image_url": {"type": "string"}}, ["image_url"], "application/x-www-form-urlencoded", "multipart/form-data"
    ),
    summary="Original PicTrace API: search by image URL",
)
async def legacy_upload_from_url(request: Request, service: ServiceDep) -> LegacySimilarImages:
    async with request.form(max_files=0, max_fields=5) as form:
        url = form.get("image_url")
        if not isinstance(url, str) or not url.strip():
            raise InvalidInputError("missing form field 'image_url'")
    data = await query_bytes(service, upload=None, url=url)
    return await legacy_answer(service, data)


# --- evidence -----------------------------------------------------------------------------------------------


@router.get(
    "/api/explain/{query_id}/{sha256}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "Query | gallery with matched keypoints | SSIM map"},
        404: {"description": "The query is no longer kept, or the image is not among its results"},
        503: {"description": "Busy: retry after the Retry-After header"},
    },
    summary="The evidence picture of one match of a recent query",
)
async def explain(query_id: str, sha256: str, service: ServiceDep) -> Response:
    kept = service.queries.get(query_id)
    png = await service.pool.run(
        explain_match, service.catalogue, kept, sha256.lower(), service.settings, service.tuning
    )
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})


@router.get(
    "/api/explain/pair/{sha_a}/{sha_b}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "Image a | image b with the keypoints that agree"},
        404: {"description": "The two images are not in one duplicate group"},
        503: {"description": "Busy: retry after the Retry-After header"},
    },
    summary="The evidence picture of two members of one duplicate group (drawn from stored data)",
)
async def explain_duplicate_pair(sha_a: str, sha_b: str, service: ServiceDep) -> Response:
    png = await service.pool.run(
        explain_pair,
        service.catalogue,
        service.duplicates,
        sha_a.lower(),
        sha_b.lower(),
        service.settings,
        service.tuning,
    )
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})


# --- duplicates ---------------------------------------------------------------------------------------------


@router.get(
    "/api/duplicates",
    response_model=DuplicatePage,
    responses={422: {"description": "Invalid parameters"}, 503: ERRORS[503]},
    summary="Every group of duplicates in the gallery, largest first, a page at a time",
)
async def duplicates(
    service: ServiceDep,
    tier: Annotated[Literal["exact", "copy"] | None, Query(description="Only groups of this tier.")] = None,
    min_size: Annotated[int, Query(ge=2, le=10_000, description="Only groups of at least this many.")] = 2,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DuplicatePage:
    """Each group with its keeper, its size and its first few members (the rest: the group's own endpoint).
    Until the groups are first computed after a start: 503 with Retry-After."""
    total, groups = await service.pool.run(
        service.duplicates.page, tier=tier, min_size=min_size, offset=offset, limit=limit
    )
    return DuplicatePage(total=total, offset=offset, limit=limit, groups=[group_info(g) for g in groups])


@router.get(
    "/api/duplicates/{group_id}",
    response_model=DuplicateGroupInfo,
    responses={404: {"description": "No such group"}, 503: ERRORS[503]},
    summary="One group of duplicates, by its id or by any member's sha256, its members a page at a time",
)
async def duplicate_group(
    group_id: str,
    service: ServiceDep,
    offset: Annotated[int, Query(ge=0, description="The first member shown (0: the keeper).")] = 0,
    limit: Annotated[int, Query(ge=1, le=500, description="Members shown.")] = 100,
) -> DuplicateGroupInfo:
    return group_info(
        await service.pool.run(service.duplicates.group, group_id.strip().lower(), offset=offset, limit=limit)
    )
