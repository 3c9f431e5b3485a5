"""The HTML pages (Jinja): search form, results, gallery status, duplicates. Errors are shown as readable messages."""

from __future__ import annotations

import asyncio
import math

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.datastructures import UploadFile
from starlette.templating import Jinja2Templates

from pictrace.duplicates import GroupTier, group_info
from pictrace.errors import AuthError, GroupsNotReadyError, InvalidInputError, PicTraceError
from pictrace.matching.verdict import Verdict
from pictrace.schemas import SearchResult, thumbnail_url
from pictrace.web.auth import check_token
from pictrace.web.deps import ServiceDep, query_bytes, run_search
from pictrace.web.errors import headers_for, status_for

router = APIRouter(include_in_schema=False)

GALLERY_PAGE_SIZE = 48


def templates(request: Request) -> Jinja2Templates:
    engine: Jinja2Templates = request.app.state.templates
    return engine


async def _status(service: ServiceDep) -> dict[str, object]:
    indexed, failed = await asyncio.to_thread(service.catalogue.counts)
    progress = service.ingestor.progress
    return {
        "indexed": indexed,
        "failed": failed,
        "pending": progress.pending,
        "running": progress.running,
        "total": progress.total,
        "done": progress.done,
    }


@router.get("/", response_class=HTMLResponse)
async def home(request: Request, service: ServiceDep) -> HTMLResponse:
    return templates(request).TemplateResponse(request, "index.html", {"status": await _status(service)})


@router.post("/search", response_class=HTMLResponse)
async def search_page(request: Request, service: ServiceDep) -> HTMLResponse:
    status = await _status(service)
    query_url = ""
    try:
        async with request.form(max_files=1, max_fields=5) as form:
            upload = form.get("file")
            raw_url = form.get("url")
            query_url = raw_url.strip() if isinstance(raw_url, str) else ""
            if upload is not None and not isinstance(upload, UploadFile):
                raise InvalidInputError("the file field must be a file")
            data = await query_bytes(service, upload=upload, url=query_url or None)
        result = await run_search(service, data, None)
    except PicTraceError as exc:
        failed: dict[str, object] = {"status": status, "error": str(exc), "query_url": query_url}
        return templates(request).TemplateResponse(
            request, "index.html", failed, status_code=status_for(exc), headers=headers_for(exc)
        )
    answered: dict[str, object] = {"status": status, "result": result, "query_url": query_url, **sections(result)}
    return templates(request).TemplateResponse(request, "results.html", answered)


SECTIONS: tuple[tuple[Verdict, str, str], ...] = (
    ("exact", "Exact", "The same file, or the same pixels."),
    ("copy", "Copies", "The same picture, edited: cropped, resized, rotated, mirrored, recoloured, captioned."),
    ("similar", "Similar", "The same thing or scene in another picture."),
)


def sections(result: SearchResult) -> dict[str, object]:
    """Results grouped into the three sections the page shows, each best first."""
    grouped = {key: [m for m in result.results if m.verdict == key] for key, _, _ in SECTIONS}
    return {
        "sections": [(key, title, help_text, grouped[key]) for key, title, help_text in SECTIONS],
        "counts": {key: len(matches) for key, matches in grouped.items()},
    }


def shows_details(request: Request, service: ServiceDep) -> bool:
    """Whether this request may see where the gallery's images come from and why entries failed.

    Off by default: source URLs and failure reasons name the operator's hosts, often internal ones
    (``http://10.0.0.5/...``, "cannot connect to 10.0.0.5:80"). The operator sees them with the API token
    (``Authorization: Bearer``), or opens them to all with ``PICTRACE_GALLERY_PUBLIC_DETAILS``.
    """
    if service.settings.gallery_public_details:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    try:
        check_token(service.settings.api_token, token.strip())
    except AuthError:
        return False
    return True


def _servable(*texts: str) -> bool:
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@router.get("/gallery", response_class=HTMLResponse)
async def gallery_page(request: Request, service: ServiceDep, page: int = 1) -> HTMLResponse:
    """Indexed images, a page at a time, with the ingest's progress and its failures (their details: see
    ``shows_details``)."""
    status = await _status(service)
    details = shows_details(request, service)
    size = GALLERY_PAGE_SIZE
    pages = max(1, math.ceil(int(str(status["indexed"])) / size))
    page = min(max(1, page), pages)
    offset = (page - 1) * size
    images = await asyncio.to_thread(service.catalogue.list_images, offset, size)
    failures = await asyncio.to_thread(service.catalogue.failures)
    tiles = []
    for im in images:
        if not _servable(im.entry_id, im.url, im.location):  # stored before the checks: left out, not a 500
            continue
        original = im.location if im.is_remote else f"/api/images/{im.sha256}/original"
        named_by_url = im.entry_id in (im.url, im.location)
        tiles.append(
            {
                **im.__dict__,
                "entry_id": im.entry_id if details or not named_by_url else im.sha256[:12],
                "original_url": original if details or not im.is_remote else thumbnail_url(im.sha256),
            }
        )
    context: dict[str, object] = {
        "status": status,
        "images": tiles,
        "failures": [f for f in failures if _servable(f.url, f.error)] if details else [],
        "failed_count": len(failures),
        "details": details,
        "page": page,
        "pages": pages,
        "offset": offset,
    }
    return templates(request).TemplateResponse(request, "gallery.html", context)


DUPLICATES_PAGE_SIZE = 20
GROUP_PAGE_SIZE = 60  # members of one group shown at a time (/duplicates?group=...)


@router.get("/duplicates", response_class=HTMLResponse)
async def duplicates_page(
    request: Request, service: ServiceDep, page: int = 1, tier: str = "", min_size: int = 2, group: str = ""
) -> HTMLResponse:
    """Every duplicate group, a page at a time, the keeper first in each row with its first few members; or,
    with ``group``, that one group's members a page at a time. While the groups are first computed after a
    start, a notice that reloads itself."""
    status = await _status(service)
    chosen: GroupTier | None = "exact" if tier == "exact" else "copy" if tier == "copy" else None
    min_size = max(2, min_size)
    context: dict[str, object] = {
        "status": status,
        "groups": [],
        "total": 0,
        "page": 1,
        "pages": 1,
        "offset": 0,
        "tier": chosen or "",
        "min_size": min_size,
        "query": (f"&tier={chosen}" if chosen else "") + (f"&min_size={min_size}" if min_size > 2 else ""),
        "computing": False,
        "single": None,
    }
    try:
        if group:
            first = await service.pool.run(service.duplicates.group, group.strip().lower(), offset=0, limit=1)
            pages = max(1, math.ceil(first.size / GROUP_PAGE_SIZE))
            page = min(max(1, page), pages)
            one = await service.pool.run(
                service.duplicates.group, first.id, offset=(page - 1) * GROUP_PAGE_SIZE, limit=GROUP_PAGE_SIZE
            )
            context.update(
                groups=[group_info(one)], total=1, page=page, pages=pages, single=one.id, query=f"&group={one.id}"
            )
        else:
            size = DUPLICATES_PAGE_SIZE
            total, _ = await service.pool.run(service.duplicates.page, tier=chosen, min_size=min_size, limit=0)
            pages = max(1, math.ceil(total / size))
            page = min(max(1, page), pages)
            offset = (page - 1) * size
            _, groups = await service.pool.run(
                service.duplicates.page, tier=chosen, min_size=min_size, offset=offset, limit=size
            )
            context.update(groups=[group_info(g) for g in groups], total=total, page=page, pages=pages, offset=offset)
    except GroupsNotReadyError:
        context["computing"] = True
    return templates(request).TemplateResponse(request, "duplicates.html", context)
