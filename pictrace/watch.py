"""Keep the index in step with a folder gallery while its files are added, changed, moved and deleted.

A full reconcile first (what changed while PicTrace was down), then one more each time the folder has changed
and settled. Every reconcile is the folder ingest itself (``Ingestor.ingest_gallery`` on a fresh scan), so a
watched folder follows exactly the rules of ``pictrace index``: unchanged files cost a ``stat``, a moved file
keeps its features. Events only say *when* to look; what changed is always read off the folder, so a missed or
merged event cannot leave the index wrong.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from watchfiles import Change, awatch

from pictrace.errors import PicTraceError
from pictrace.gallery import scan_folder
from pictrace.ingest import Ingestor
from pictrace.schemas import IngestReport
from pictrace.tuning import FolderWatch

log = logging.getLogger(__name__)


class FolderWatcher:
    def __init__(
        self,
        ingestor: Ingestor,
        folder: Path,
        timing: FolderWatch,
        on_report: Callable[[IngestReport], None] | None = None,
    ) -> None:
        self.ingestor = ingestor
        self.folder = folder.resolve()
        self.timing = timing
        self.on_report = on_report
        self.reconciles = 0  # completed reconciles, for a caller that waits for the first one

    async def reconcile(self) -> IngestReport:
        gallery = await asyncio.to_thread(scan_folder, self.folder)
        report = await self.ingestor.ingest_gallery(gallery)
        self.reconciles += 1
        if self.on_report is not None:
            self.on_report(report)
        return report

    def _visible(self, change: Change, path: str) -> bool:
        """Hidden files and whatever lies in hidden folders (editors' and copy tools' temporary files)."""
        try:
            parts = Path(path).relative_to(self.folder).parts
        except ValueError:
            return False
        return not any(part.startswith(".") for part in parts)

    async def _settle(self, paths: set[str]) -> None:
        """Wait while a changed file is younger than the quiet time: a copy still being written is read once,
        when it is complete (bounded by ``max_wait_ms``)."""
        quiet = self.timing.quiet_ms / 1000
        deadline = time.monotonic() + self.timing.max_wait_ms / 1000
        while time.monotonic() < deadline:
            wait = await asyncio.to_thread(_newest_mtime, paths) + quiet - time.time()
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, max(deadline - time.monotonic(), 0)))

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Reconcile, then watch until ``stop`` is set (or the task is cancelled).

        The watch is set up before the reconcile lists the folder, so a file added while it runs is seen by
        one of the two."""
        changes = awatch(
            self.folder,
            watch_filter=self._visible,
            step=self.timing.quiet_ms,
            debounce=self.timing.max_wait_ms,
            stop_event=stop,
            recursive=True,
        )
        # the generator's first step (up to its first await) creates the OS watch; one turn of the loop runs it
        first = asyncio.ensure_future(anext(changes))
        try:
            await asyncio.sleep(0)
            await self._reconcile_logged()
            batch = await first
            while True:
                await self._settle({path for _, path in batch})
                await self._reconcile_logged()
                batch = await anext(changes)
        except StopAsyncIteration:  # ``stop`` was set
            return
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)  # the generator is free again to be closed
            await changes.aclose()

    async def _reconcile_logged(self) -> None:
        try:
            report = await self.reconcile()
        except PicTraceError as exc:  # the folder unreadable for a moment: the next change tries again
            log.error("cannot reconcile %s: %s", self.folder, exc)
            return
        if report.added or report.duplicates or report.removed or report.failed or report.skipped:
            log.info(
                "%s: %d added, %d linked (same bytes), %d unchanged, %d removed, %d failed",
                self.folder,
                report.added,
                report.duplicates,
                report.unchanged,
                report.removed,
                len(report.failed),
            )
        refused = report.invalid if self.reconciles == 1 else []  # said once, not at every change
        for failure in report.failed + refused:
            log.warning("%s: %s", failure.url, failure.reason)


def _newest_mtime(paths: set[str]) -> float:
    newest = 0.0
    for path in paths:
        try:
            newest = max(newest, Path(path).stat().st_mtime)
        except OSError:  # gone again (a move, a delete): nothing to wait for
            continue
    return newest
