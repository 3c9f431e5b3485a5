"""create_app(settings): the FastAPI application. All heavy objects are built in the lifespan, none at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

import pictrace
from pictrace.config import PROJECT_ROOT, Settings
from pictrace.errors import PicTraceError
from pictrace.fetch import Fetcher
from pictrace.gallery import load_gallery
from pictrace.service import Service
from pictrace.tuning import Tuning
from pictrace.watch import FolderWatcher
from pictrace.web import admin, api, errors, pages
from pictrace.web.limits import BodySizeLimit, BodyTimeouts

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD = 64 * 1024


async def ingest_in_background(service: Service) -> None:
    """Index the configured gallery (db.json or a folder) while the service already answers searches."""
    path = service.settings.db
    if not path.exists():
        log.warning("gallery file %s not found: nothing to index (set PICTRACE_DB)", path)
        return
    try:
        gallery = await asyncio.to_thread(load_gallery, path)
        report = await service.ingestor.ingest_gallery(gallery)
    except PicTraceError as exc:
        log.error("background ingest of %s failed: %s", path, exc)
        return
    log.info(
        "ingest of %s: %d added, %d duplicates, %d unchanged, %d removed, %d failed, %d invalid, %d kept out",
        path,
        report.added,
        report.duplicates,
        report.unchanged,
        report.removed,
        len(report.failed),
        len(report.invalid),
        report.deleted,
    )
    for failure in report.failed + report.invalid:
        log.warning("entry %s (%s) skipped: %s", failure.position, failure.url, failure.reason)


def create_app(
    settings: Settings, *, tuning: Tuning | None = None, fetcher: Fetcher | None = None
) -> FastAPI:
    """Build the app; ``fetcher`` lets tests plug in a Fetcher with their own resolver."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await Service.start(settings, tuning=tuning, fetcher=fetcher)
        app.state.service = service
        task: asyncio.Task[None] | None = None
        if settings.watch and settings.db.is_dir():  # its first reconcile is the ingest at start
            watcher = FolderWatcher(service.ingestor, settings.db, service.tuning.watch)
            task = asyncio.create_task(watcher.run())
        elif settings.index_on_start:
            if settings.watch:
                log.warning("PICTRACE_WATCH needs a folder as PICTRACE_DB (%s is not one): not watching", settings.db)
            task = asyncio.create_task(ingest_in_background(service))
        app.state.ingest_task = task
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await service.close()

    app = FastAPI(
        title="PicTrace",
        version=pictrace.__version__,
        summary="Reverse image search: find the gallery images that show the same picture or thing.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.templates = Jinja2Templates(directory=PROJECT_ROOT / "templates")
    errors.install(app)
    app.include_router(api.router)
    app.include_router(admin.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=PROJECT_ROOT / "static"), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(BodyTimeouts, serving=(tuning or Tuning()).serving)
    return app
