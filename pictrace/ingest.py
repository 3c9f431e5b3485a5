"""Gallery → fetch → decode → features (batched embedding) → catalogue → the derived indexes → match-graph links.

Images go through in batches, and the next batches' decoding, features and embedding run beside the commit and
linking of the one before (pictrace/ingest_schedule.py says what runs where), so both cores stay busy. Each
image is linked as soon as its batch is in the indexes: the links are stored both ways, so it finds the images
before it, and the images after it find it.

Work is done once per image: a URL already indexed is not fetched again, the same bytes under another URL are
linked instead of stored twice, failures are recorded with their reason and retried by the next run, and each
image is committed whole, so a run that is killed resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pictrace.config import Settings
from pictrace.decode import decode_image
from pictrace.errors import NotAnImageFileError, NotFoundError, OverloadedError, PicTraceError
from pictrace.features.embed import Embedder
from pictrace.features.extract import local_features
from pictrace.features.hashing import sha256_hex
from pictrace.features.orb import OrbFeatures
from pictrace.fetch import Fetcher, host_of
from pictrace.files import read_folder_image, read_local_file
from pictrace.gallery import Gallery, LocatedEntry, Shard
from pictrace.graph import Candidates, OwedPairs, link_candidates, link_images, verify_links
from pictrace.indexes import DerivedIndexes
from pictrace.ingest_schedule import IngestSchedule
from pictrace.schemas import FailedEntry, IngestReport
from pictrace.store import Catalogue, FileStat, LinkFit, Source, SourceState, StoredImage
from pictrace.tuning import Tuning
from pictrace.work import WorkPool

log = logging.getLogger(__name__)


@dataclass
class IngestProgress:
    """Live counters for the health endpoint, the page and the CLI's progress bar."""

    total: int = 0
    done: int = 0
    failed: int = 0
    running: bool = False
    linking: int = 0  # images stored but not yet linked into the match graph

    @property
    def pending(self) -> int:
        return max(self.total - self.done, 0) + self.linking if self.running else 0


@dataclass
class _Fetched:
    """Downloaded bytes and where they came from (a db.json entry, or an API call)."""

    source: Source
    data: bytes
    position: int | None = None
    stat: FileStat | None = None  # a folder's file: its size and mtime before it was read
    previous: str | None = None  # the SHA-256 its source named before this run

    @property
    def shown_url(self) -> str:
        return self.source.entry_url or self.source.url


@dataclass(frozen=True)
class AddedImage:
    """What :meth:`Ingestor.add_image` did: the image's identity and whether its bytes were new."""

    sha256: str
    id: str
    url: str
    added: bool
    width: int
    height: int


def upload_url(sha256: str) -> str:
    """The catalogue key of an image uploaded through the API (it has no URL; never a client-named string)."""
    return f"upload:{sha256}"


def tombstone_key(sha256: str) -> str:
    """Meta key remembering that an image was deleted through the API, so an ingest does not bring it back."""
    return f"deleted:{sha256}"


DELETED_SOURCE = "deleted-source:"
UNSETTLED = "unsettled-after"


def unsettled_key(shard: Shard | None) -> str:
    """Meta key of a run in progress: its value is the last vec_id before the run's images. A run that stops
    before matching the pairs its images' arrival missed (``OwedPairs``) leaves it behind, and the next run
    matches those images again: without it they lost those links for good (docs/scaling.md, "Checkpoints").
    One per shard: the workers of one catalogue run at the same time."""
    return UNSETTLED if shard is None else f"{UNSETTLED}:{shard.index}/{shard.count}"


def deleted_source_key(url: str) -> str:
    """Meta key remembering that a db.json entry's image was deleted through the API (its value: the image's
    SHA-256), so the next ingest keeps the entry out instead of fetching it again and calling it failed."""
    return f"{DELETED_SOURCE}{url}"


@dataclass
class _Prepared:
    """One fetched image after its per-image job: exactly one of unchanged, duplicate, failure or stored."""

    fetched: _Fetched
    unchanged: bool = False
    duplicate: bool = False
    failure: FailedEntry | None = None
    stored: StoredImage | None = None  # without its embedding yet
    rgb: np.ndarray | None = None


@dataclass
class _Embedded:
    """A batch after its early part: each image's preparation, and the embeddings of those ready, in order."""

    batch: list[_Fetched]
    prepared: list[_Prepared]
    vectors: np.ndarray | None


@dataclass
class _BatchOutcome:
    added: int = 0
    duplicates: int = 0
    unchanged: int = 0
    skipped: int = 0
    failed: list[FailedEntry] = field(default_factory=list)


class _HostSchedule:
    """The entries to fetch, handed out so that no host has more than ``per_host`` in flight: the fetchers then
    never queue behind one slow host's slots while other hosts' entries wait (a slow host delays its own
    entries only). Hosts take turns; local files (no host) are one more turn-taker."""

    def __init__(self, entries: list[LocatedEntry], per_host: int) -> None:
        self._per_host = per_host
        self._left: dict[str, collections.deque[LocatedEntry]] = {}
        for entry in entries:
            self._left.setdefault(self._host(entry), collections.deque()).append(entry)
        self._turns = collections.deque(self._left)
        self._busy: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Condition()

    @staticmethod
    def _host(entry: LocatedEntry) -> str:
        return host_of(entry.location) if entry.is_remote else ""

    async def take(self) -> LocatedEntry | None:
        """The next entry whose host has a free slot, waiting for one to free; None when none are left."""
        async with self._changed:
            while True:
                for _ in range(len(self._turns)):
                    host = self._turns[0]
                    self._turns.rotate(-1)
                    if self._left[host] and self._busy[host] < self._per_host:
                        self._busy[host] += 1
                        return self._left[host].popleft()
                if not any(self._left.values()):
                    return None
                await self._changed.wait()

    async def release(self, entry: LocatedEntry) -> None:
        async with self._changed:
            self._busy[self._host(entry)] -= 1
            self._changed.notify_all()


def _source(item: LocatedEntry, origin: str = "gallery") -> Source:
    return Source(
        url=item.location,
        origin=origin,
        entry_url=item.entry.url,
        entry_id=item.entry.id,
        position=item.position,
        metadata=item.entry.metadata,
    )


class Ingestor:
    def __init__(
        self,
        catalogue: Catalogue,
        indexes: DerivedIndexes,
        embedder: Embedder,
        fetcher: Fetcher,
        pool: WorkPool,
        settings: Settings,
        tuning: Tuning,
    ) -> None:
        self.catalogue = catalogue
        self.indexes = indexes
        self.embedder = embedder
        self.fetcher = fetcher
        self.pool = pool
        self.settings = settings
        self.tuning = tuning
        self.progress = IngestProgress()
        self._lock = asyncio.Lock()

    async def ingest_gallery(
        self,
        gallery: Gallery,
        on_progress: Callable[[IngestProgress], None] | None = None,
        shard: Shard | None = None,
    ) -> IngestReport:
        """Bring the catalogue in line with a gallery (db.json or a folder): add new entries, retry failures,
        re-read changed files, drop removed ones.

        New entries are done before removed ones are dropped, so a file moved or renamed (a db.json URL
        renamed) finds its bytes still stored and keeps its features: it is linked, not embedded again.
        A folder's file is read again only when its size or mtime moved since it was last read.
        With a ``shard``, only the entries (and the removals) that the shard owns: workers with different
        shards of one db.json share a catalogue without duplicating or undoing each other's work.
        """
        async with self._lock:
            whole = gallery
            if shard is not None:
                gallery = gallery.shard(shard)
            report = IngestReport(invalid=list(gallery.invalid))
            states = await self.pool.run_background(self.catalogue.source_states)
            deleted = await self.pool.run_background(self._deleted_sources)
            entries = [e for e in gallery.entries if e.location not in deleted]
            report.deleted = len(gallery.entries) - len(entries)
            stats = await self.pool.run_background(self.catalogue.file_stats) if whole.folder else {}

            def is_todo(e: LocatedEntry) -> bool:
                if e.stat is not None:  # a folder's file: unchanged size and mtime, not read again
                    return stats.get(e.location) != e.stat
                return (s := states.get(e.location)) is None or s.status != "ok"

            todo: list[LocatedEntry] = []
            unchanged: list[LocatedEntry] = []
            for e in entries:
                (todo if is_todo(e) else unchanged).append(e)
            report.unchanged = len(unchanged)
            await self.pool.run_background(self._refresh_details, [e for e in unchanged if e.stat is None])
            self.progress = IngestProgress(total=len(todo), running=True)
            dropped = 0
            stopped = False
            unsettled = await self.pool.run_background(self._open_run, unsettled_key(shard), bool(todo))
            try:
                try:
                    outcome = await self._run(todo, states, whole.folder, on_progress, unsettled)
                    if self._links_enabled and (todo or unsettled):  # this run's images, and those, settled
                        await self.pool.run_background(self.catalogue.delete_meta, unsettled_key(shard))
                    report.removed, dropped = await self._drop_removed(whole, gallery, shard, stats)
                except asyncio.CancelledError:
                    stopped = True  # SIGTERM or Ctrl-C: save what is indexed now; relearning waits for a next run
                    raise
                finally:
                    if todo or dropped:  # a re-scan that found nothing to do writes nothing
                        if not stopped:
                            await self.pool.run_background(self.indexes.maintain)
                        await self.pool.run_background(self.indexes.save)
                await self.pool.run_background(self._link_unlinked)
            finally:
                self.progress.running = False
            report.added, report.duplicates = outcome.added, outcome.duplicates
            report.unchanged += outcome.unchanged
            report.skipped = outcome.skipped
            report.failed = sorted(outcome.failed, key=lambda f: f.position if f.position is not None else -1)
            return report

    def _open_run(self, key: str, adding: bool) -> list[int]:
        """Mark where this run's images begin (when it adds some), and return the images of earlier runs that
        stopped before settling them (in vec_id order, as ``OwedPairs`` tracks them), to be linked again first."""
        if not self._links_enabled:
            return []
        after = self.catalogue.get_meta(key)
        if after is not None:
            return self.catalogue.vec_ids_after(int(after))
        if adding:
            self.catalogue.set_meta(key, str(self.catalogue.last_vec_id()))
        return []

    def _deleted_sources(self) -> set[str]:
        """db.json URLs whose image was deleted through the API and not added back since."""
        marked = self.catalogue.meta_with_prefix(DELETED_SOURCE)
        tombstoned = self.catalogue.meta_with_prefix(tombstone_key(""))
        return {url for url, sha in marked.items() if sha in tombstoned}
    async def _drop_removed(
        self, whole: Gallery, gallery: Gallery, shard: Shard | None, stats: dict[str, FileStat]
    ) -> tuple[int, int]:
        """Forget the sources that left the gallery, and the images no source names any more.
        Returns (sources dropped, images dropped)."""
        current = {e.location for e in gallery.entries}
        known = await self.pool.run_background(self.catalogue.gallery_entry_urls)
        gone = [
            url
            for url, entry_url in known.items()
            if url not in current and (shard is None or shard.owns(entry_url))
        ]
        removed: list[int] = []
        if gone:
            removed = await self.pool.run_background(self.catalogue.remove_sources, gone)
        if whole.folder is not None:
            listed = {e.location for e in whole.entries}
            await self.pool.run_background(self.catalogue.forget_file_stats, [u for u in stats if u not in listed])
            removed += await self.pool.run_background(self.catalogue.remove_orphans)
        if removed:
            await self.pool.run_background(self.indexes.remove, removed)
        return len(gone), len(removed)

    def _refresh_details(self, entries: list[LocatedEntry]) -> None:
        if entries:
            self.catalogue.update_sources_details([_source(e) for e in entries])

    async def _run(
        self,
        todo: list[LocatedEntry],
        states: dict[str, SourceState],
        folder: Path | None,
        on_progress: Callable[[IngestProgress], None] | None,
        unsettled: list[int],
    ) -> _BatchOutcome:
        outcome = _BatchOutcome()
        hosts = _HostSchedule(todo, self.settings.fetch_per_host)
        fetched: asyncio.Queue[_Fetched | Exception | None] = asyncio.Queue(maxsize=self.tuning.ingest.embed_batch * 2)
        n_fetchers = max(1, min(self.settings.fetch_concurrency, len(todo)))

        def advance(n: int, failures: list[FailedEntry]) -> None:
            self.progress.done += n
            self.progress.failed += len(failures)
            outcome.failed.extend(failures)
            if on_progress is not None:
                on_progress(self.progress)

        async def fetch_worker() -> None:
            while (item := await hosts.take()) is not None:
                try:
                    data = await self._fetch(item, folder)
                except NotAnImageFileError:
                    await self.pool.run_background(self._forget_source, item)
                    outcome.skipped += 1
                    advance(1, [])
                    continue
                except PicTraceError as exc:
                    await self.pool.run_background(self._record_failure, item, str(exc))
                    advance(1, [FailedEntry(position=item.position, url=item.entry.url, reason=str(exc))])
                    continue
                finally:
                    await hosts.release(item)
                state = states.get(item.location)
                previous = state.sha256 if state is not None and state.status == "ok" else None
                await fetched.put(_Fetched(_source(item), data, item.position, item.stat, previous))

        async def fetch_all() -> None:
            """Every entry, then the end mark (None); a fetch that failed unexpectedly ends the stream with its
            error instead, which ``batches`` raises. Cancelled (the batches failed, or the run was stopped), it
            puts nothing: no one reads the queue any more, and a put on a full queue would wait for ever."""
            try:
                await asyncio.gather(*(fetch_worker() for _ in range(n_fetchers)))
            except Exception as exc:
                await fetched.put(exc)
                raise
            await fetched.put(None)

        schedule: IngestSchedule[list[_Fetched], _Embedded] = IngestSchedule(
            self.pool, width=self.settings.workers, ahead=self.tuning.ingest.batches_in_flight
        )

        async def batches() -> AsyncIterator[list[_Fetched]]:
            """Full batches in the order the images were fetched (the last one shorter): the same images
            make the same batches however long each step took, so the same links and lists. A batch that
            waited ``batch_wait_s`` for its next image goes as it is: a slow host (or a trickle of files) must
            not hold back the images already fetched."""
            batch: list[_Fetched] = []
            while True:
                try:  # asyncio.timeout, not wait_for: 3.11's wait_for loses a cancel that lands as the get returns
                    async with asyncio.timeout(self.tuning.ingest.batch_wait_s if batch else None):
                        item = await fetched.get()
                except TimeoutError:
                    yield batch
                    batch = []
                    continue
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise item
                batch.append(item)
                if len(batch) >= self.tuning.ingest.embed_batch:
                    yield batch
                    batch = []
            if batch:
                yield batch

        async def early(batch: list[_Fetched]) -> _Embedded:
            prepared = await schedule.each(self._prepare_fetched, batch)
            pixels = [p.rgb for p in prepared if p.rgb is not None]
            vectors = await schedule.batched(self.embedder.embed, pixels) if pixels else None
            return _Embedded(batch, prepared, vectors)

        async def late(embedded: _Embedded) -> None:
            result, new_ids = await schedule.one(self._commit, embedded)
            outcome.added += result.added
            outcome.duplicates += result.duplicates
            outcome.unchanged += result.unchanged
            if self._links_enabled:
                self.progress.linking += len(new_ids)
            advance(len(embedded.batch), result.failed)
            if self._links_enabled and new_ids:
                await link_arrived(new_ids)
            await checkpoint()

        async def link_arrived(vec_ids: list[int]) -> None:
            """Link images from their side to the images before them, tracked for ``settle``."""
            try:
                await schedule.one(self._store_links, await schedule.each(self._find_links, vec_ids), owed)
            finally:
                self.progress.linking -= len(vec_ids)

        saved_at = time.monotonic()

        async def checkpoint() -> None:
            """Save the derived indexes every ``checkpoint_s`` (late parts run one at a time, so each save holds
            exactly the batches committed before it): a run killed outright then costs the next start the
            images since, not a rebuild of the whole gallery's indexes from the catalogue."""
            nonlocal saved_at
            if time.monotonic() - saved_at >= self.tuning.ingest.checkpoint_s:
                await schedule.one(self.indexes.save)
                saved_at = time.monotonic()

        async def settle() -> None:
            """Match the pairs the images' arrival missed (``OwedPairs``), once all are in."""
            pairs = owed.owed()
            if pairs:
                log.info("matching %d pairs the arrival of %d images missed",
                         sum(len(others) for _, others in pairs), len(pairs))
            self.progress.linking += len(pairs)
            try:
                found = await schedule.each(self._verify_owed, pairs)
                await schedule.one(self._store_links, found, None)
            finally:
                self.progress.linking -= len(pairs)

        async def relink(stopped: list[int]) -> None:
            """A stopped run's images, linked again as if they were arriving now, before this run's: each against
            the whole gallery from its side, and tracked like this run's own, so that the images after it (its
            run's later ones too) offer their votes and ``settle`` matches what they owe."""
            log.info("matching again the %d images of a run that stopped before settling them", len(stopped))
            self.progress.linking += len(stopped)
            step = self.tuning.ingest.embed_batch
            for start in range(0, len(stopped), step):  # a batch's candidates in memory at a time
                await link_arrived(stopped[start : start + step])

        owed = OwedPairs(self.tuning.cascade.graph_candidates,
                         self.tuning.cascade.graph_candidates + self.tuning.duplicates.nearest_candidates)
        producer = asyncio.create_task(fetch_all())
        try:
            if self._links_enabled and unsettled:
                await relink(unsettled)
            await schedule.flow(batches(), early, late)
            if self._links_enabled:
                await settle()
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        return outcome

    async def _fetch(self, item: LocatedEntry, folder: Path | None) -> bytes:
        if item.is_remote:
            return await self.fetcher.fetch_gallery(item.location)
        limit = self.settings.max_download_bytes
        if folder is not None and item.stat is not None:
            return await self.pool.run_background(read_folder_image, Path(item.location), folder, limit)
        return await self.pool.run_background(read_local_file, Path(item.location), limit)

    def _record_failure(self, item: LocatedEntry, reason: str) -> None:
        self.catalogue.record_failure(_source(item), reason)
        if item.stat is not None:  # not retried until the file changes: it would fail the same way
            self.catalogue.record_file_stats([(item.location, item.stat)])

    def _forget_source(self, item: LocatedEntry) -> None:
        """A folder's file that is not (or no longer) an image: no source, and not read again while unchanged."""
        self.catalogue.remove_sources([item.location])
        if item.stat is not None:
            self.catalogue.record_file_stats([(item.location, item.stat)])

    def _prepare(self, data: bytes, sha: str) -> tuple[StoredImage, np.ndarray]:
        """Decode and featurise one image (everything but the batched embedding). Raises on bad bytes."""
        image = decode_image(
            data, max_pixels=self.settings.max_pixels, draft_min_side=self.tuning.decoding.draft_min_side
        )
        local = local_features(image, self.tuning)
        stored = StoredImage(
            sha256=sha,
            pixel_sha256=local.pixel_sha256,
            width=image.width,
            height=image.height,
            format=image.format,
            nbytes=len(data),
            dhash=local.dhash,
            embedding=np.zeros(0, np.float32),
            gray_png=local.gray_png,
            orb=local.orb,
            thumbnail=local.thumbnail,
        )
        return stored, image.rgb

    def _prepare_fetched(self, fetched: _Fetched) -> _Prepared:
        """One image's work before the embedding (a job of its own): unchanged bytes are skipped, known bytes
        linked to the new source, deleted ones refused, failures recorded; the rest decoded and featurised."""
        sha = sha256_hex(fetched.data)
        if fetched.previous == sha:  # a file touched, not changed: its source already names these bytes
            return _Prepared(fetched, unchanged=True)
        try:
            if self.catalogue.get_meta(tombstone_key(sha)) is not None:
                raise PicTraceError(f"image {sha} was deleted through the API; POST it to /api/images to add it back")
            if self.catalogue.has_image(sha):
                self.catalogue.link_source(fetched.source, sha)
                return _Prepared(fetched, duplicate=True)
            stored, rgb = self._prepare(fetched.data, sha)
        except PicTraceError as exc:
            self.catalogue.record_failure(fetched.source, str(exc))
            return _Prepared(fetched, failure=FailedEntry(position=fetched.position, url=fetched.shown_url,
                                                          reason=str(exc)))
        return _Prepared(fetched, stored=stored, rgb=rgb)

    def _commit(self, embedded: _Embedded) -> tuple[_BatchOutcome, list[int]]:
        """Commit a batch's images one by one (each whole), put the new ones in the indexes, relearn the local
        lists when the gallery outgrew them. Returns the outcome and the new images' vec_ids, in order."""
        outcome = _BatchOutcome()
        new_ids: list[int] = []
        new_vectors: list[np.ndarray] = []
        new_orbs: list[OrbFeatures] = []
        ready = iter(() if embedded.vectors is None else embedded.vectors)
        for prepared in embedded.prepared:
            if prepared.unchanged:
                outcome.unchanged += 1
            elif prepared.duplicate:
                outcome.duplicates += 1
            elif prepared.failure is not None:
                outcome.failed.append(prepared.failure)
            elif prepared.stored is not None:
                vector = next(ready)
                stored = StoredImage(**{**prepared.stored.__dict__, "embedding": vector})
                vec_id, is_new = self.catalogue.add_image(stored, prepared.fetched.source)
                if is_new:
                    new_ids.append(vec_id)
                    new_vectors.append(vector)
                    new_orbs.append(OrbFeatures.from_bytes(stored.orb))
                    outcome.added += 1
                else:  # the same bytes twice in flight: the first one committed stored them
                    outcome.duplicates += 1
        if new_ids:
            self.indexes.add(new_ids, np.stack(new_vectors), new_orbs)
            self.indexes.relearn_if_outgrown()
        stats = [(f.source.url, f.stat) for f in embedded.batch if f.stat is not None]
        self.catalogue.record_file_stats(stats)  # after the images: a crash before it only costs a re-read
        return outcome, new_ids

    def _find_links(self, vec_id: int) -> tuple[Candidates | None, list[LinkFit]]:
        """One new image's links to the images before it (and those of its own batch)."""
        candidates = link_candidates(self.catalogue, self.indexes.local, self.tuning, vec_id, self.indexes.vector)
        return candidates, [] if candidates is None else verify_links(self.catalogue, self.tuning, candidates)

    def _verify_owed(self, pair: tuple[int, list[int]]) -> tuple[Candidates, list[LinkFit]]:
        candidates = Candidates(pair[0], pair[1], {})
        return candidates, verify_links(self.catalogue, self.tuning, candidates)

    def _store_links(
        self, found: Sequence[tuple[Candidates | None, list[LinkFit]]], owed: OwedPairs | None
    ) -> None:
        """In vec_id order, as one thread linking them one after the other would (a pair found from both sides
        keeps the later image's fit), each image's votes offered to the images before it."""
        for candidates, links in found:
            if candidates is not None:
                self.catalogue.add_links(candidates.vec_id, links)
                if owed is not None:
                    owed.arrived(candidates, links)

    @property
    def _links_enabled(self) -> bool:
        return self.tuning.cascade.graph_candidates > 0

    def _link(self, vec_ids: list[int]) -> None:
        """Store the new images' verified matches (the match graph, pictrace/graph.py)."""
        if self._links_enabled:
            link_images(self.catalogue, self.indexes.local, self.tuning, vec_ids, self.indexes.vector)

    def _link_unlinked(self) -> int:
        """Link the images never linked: added before the match graph existed, or by a run that stopped between
        an image's commit and its links (each image is linked as its batch arrives, so normally none)."""
        if not self._links_enabled:
            return 0
        todo = self.catalogue.unlinked()
        if todo:
            log.info("linking %d images into the match graph", len(todo))
            self.progress.linking = len(todo)
            try:
                self._link(todo)
            finally:
                self.progress.linking = 0
        return len(todo)

    # --- writes through the API ------------------------------------------------------------------------

    async def add_image(
        self,
        data: bytes,
        *,
        url: str | None = None,
        entry_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AddedImage:
        """Add one image (an upload, or bytes fetched from a user's URL) with origin 'api'.

        Goes through the bounded pool like a search (503 when it is full). The indexes are not saved here: the
        catalogue commit is what counts, and the indexes are reconciled with it at every start.
        """
        return await self.pool.run(self._add_one, data, url, entry_id, metadata)

    def _add_one(
        self, data: bytes, url: str | None, entry_id: str | None, metadata: dict[str, Any] | None
    ) -> AddedImage:
        sha = sha256_hex(data)
        stored, rgb = self._prepare(data, sha)  # raises 413/415/422 errors before anything is written
        key = url or upload_url(sha)
        source = Source(url=key, origin="api", entry_url=key, entry_id=entry_id or (url or sha), metadata=metadata)
        self.catalogue.delete_meta(tombstone_key(sha))  # an explicit add undoes an earlier delete
        if self.catalogue.has_image(sha):
            self.catalogue.link_source(source, sha)
            added = False
        else:
            vector = self.embedder.embed([rgb])[0]
            vec_id, added = self.catalogue.add_image(StoredImage(**{**stored.__dict__, "embedding": vector}), source)
            if added:
                self.indexes.add([vec_id], vector[None, :], [OrbFeatures.from_bytes(stored.orb)])
                self._link([vec_id])
        return AddedImage(sha, source.entry_id or key, key, added, stored.width, stored.height)

    async def remove_image(self, sha256: str) -> None:
        """Delete an image and all its sources; an ingest of db.json will not bring it back (tombstone)."""
        await self.pool.run(self._remove_one, sha256)

    def _remove_one(self, sha256: str) -> None:
        if not self.catalogue.has_image(sha256):
            raise NotFoundError(f"no image with sha256 {sha256}")
        # tombstone first: an ingest running now must not re-add the bytes between the two writes
        self.catalogue.set_meta(tombstone_key(sha256), "api")
        for url in self.catalogue.gallery_sources_of(sha256):
            self.catalogue.set_meta(deleted_source_key(url), sha256)
        vec_id = self.catalogue.remove_image(sha256)
        self.indexes.remove([vec_id])

    async def reindex(self) -> int:
        """Rebuild the indexes from the catalogue and save them. Refused (503) while an ingest runs."""
        if self._lock.locked():
            raise OverloadedError("an ingest is running; reindex when it is done", retry_after_s=30)
        async with self._lock:
            return await self.pool.run_background(self.indexes.rebuild)

