"""Builds (and closes) everything a running PicTrace needs, for the web app's lifespan and the CLI alike."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from pictrace.config import Settings
from pictrace.errors import IndexCorruptError, IndexMismatchError
from pictrace.explain import QueryMemory
from pictrace.features.embed import Embedder, build_embedder
from pictrace.fetch import Fetcher
from pictrace.index import IndexInfo, VectorIndex
from pictrace.index.factory import build_index, empty_index
from pictrace.ingest import (
    Ingestor,
    catalogue_identity,
    maintain,
    rebuild,
    reconcile,
    reconcile_local,
    save_local_index,
)
from pictrace.local_index import LocalIndex, LocalIndexCorruptError, LocalIndexParams
from pictrace.search import Searcher
from pictrace.store import Catalogue
from pictrace.sync import Follower
from pictrace.work import WorkPool, one_openmp_thread

log = logging.getLogger(__name__)


def check_backbone(catalogue: Catalogue, embedder: Embedder) -> None:
    """Refuse to mix vectors of two backbones (or two weight files) in one catalogue."""
    stored = (catalogue.get_meta("backbone"), catalogue.get_meta("fingerprint"))
    current = (embedder.name, embedder.fingerprint)
    if stored == (None, None):
        catalogue.set_meta("backbone", embedder.name)
        catalogue.set_meta("fingerprint", embedder.fingerprint)
        return
    if stored != current and catalogue.counts()[0] > 0:
        raise IndexMismatchError(
            f"the catalogue {catalogue.location} was built with backbone {stored[0]} "
            f"(weights {str(stored[1])[:12]}); this service uses {embedder.name} "
            f"(weights {embedder.fingerprint[:12]}); vectors of two models cannot be mixed. To reindex, point "
            "PICTRACE_DATA_DIR at a new directory and run `python -m pictrace index`; or switch "
            "PICTRACE_BACKBONE (and PICTRACE_RESNET50_WEIGHTS) back."
        )
    catalogue.set_meta("backbone", embedder.name)
    catalogue.set_meta("fingerprint", embedder.fingerprint)


def open_catalogue(settings: Settings) -> Catalogue:
    """PostgreSQL when ``PICTRACE_DATABASE_URL`` is set (shared by replicas and workers), else SQLite."""
    if settings.database_url:
        from pictrace.store.postgres import PostgresCatalogue

        return PostgresCatalogue(settings.database_url)
    return Catalogue(settings.catalogue_path)


def index_info(embedder: Embedder) -> IndexInfo:
    return IndexInfo(embedder.name, embedder.fingerprint, embedder.dim)


@contextlib.contextmanager
def _all_threads() -> Iterator[None]:
    """Give FAISS every core for a bulk build (queries are served with 1 thread, see Service.start)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def rebuild_index(index: VectorIndex, catalogue: Catalogue) -> int:
    """Load every vector of the catalogue into a fresh structure of ``index`` and save it. Returns the count."""
    count = rebuild(index, catalogue)
    index.save()
    return count


def open_index(
    settings: Settings, catalogue: Catalogue, embedder: Embedder, *, rebuild: bool = False
) -> VectorIndex:
    """Open the persisted index, rebuilding it from the catalogue when it is missing, stale or corrupt.

    ``rebuild`` ignores the file altogether (``pictrace reindex``: also the way out of a mismatched index).
    """
    info = index_info(embedder)
    if rebuild and not settings.milvus_uri:
        index = empty_index(settings, info)
    else:
        try:
            index = build_index(settings, info)
        except IndexCorruptError as exc:
            log.warning("%s; rebuilding it from the catalogue", exc)
            index = empty_index(settings, info)
    with _all_threads():
        if rebuild or (len(index) == 0 and catalogue.counts()[0] > 0):
            log.info("building the vector index from the catalogue (%d images)", rebuild_index(index, catalogue))
            return index
        added, removed = reconcile(index, catalogue)
        if added or removed:
            log.info("vector index brought in line with the catalogue: +%d -%d", added, removed)
        if not maintain(index, catalogue) and (added or removed):
            index.save()
    return index


def local_index_params(settings: Settings) -> LocalIndexParams:
    return LocalIndexParams(
        per_image=settings.local_per_image,
        code_bytes=settings.local_code_bytes,
        knn=settings.local_knn,
        max_distance=settings.local_max_distance,
        nprobe=settings.local_nprobe,
        train_max=settings.local_train_max,
        max_lists=settings.local_max_lists,
        train_iterations=settings.local_train_iterations,
        cell_lists=settings.local_cell_lists,
        top_probe=settings.local_top_probe,
    )


def open_local_index(settings: Settings, catalogue: Catalogue, *, rebuild: bool = False) -> LocalIndex:
    """Reopen the saved local index and apply the catalogue's changes since; else build it from the ORB blobs in
    the catalogue (the system of record). ``rebuild`` ignores the file (``pictrace reindex``)."""
    params = local_index_params(settings)
    path = settings.local_index_path
    local: LocalIndex | None = None
    if settings.local_persist and not rebuild and path.exists():
        try:
            local = LocalIndex.open(path, params, catalogue_identity(catalogue))
            if local is None:
                log.warning("local-feature index %s was built with other settings, in an older format or for "
                            "another catalogue; rebuilding it from the catalogue", path)
        except LocalIndexCorruptError as exc:
            log.warning("%s; rebuilding it from the catalogue", exc)
    with _all_threads():
        if local is not None:
            added, removed = reconcile_local(local, catalogue)
            if added or removed:
                log.info("local-feature index brought in line with the catalogue: +%d -%d", added, removed)
            if local.needs_training():
                log.info("local-feature index outgrew its lists: relearning them")
                local = None
        if local is None:
            local = LocalIndex.build(params, catalogue.orb_blobs())
        save_local_index(settings, catalogue, local)
    log.info("local-feature index: %d descriptors, ~%d bytes per image", len(local), local.bytes_per_image)
    return local


@dataclass
class Service:
    settings: Settings
    catalogue: Catalogue
    embedder: Embedder
    index: VectorIndex
    local: LocalIndex
    pool: WorkPool
    fetcher: Fetcher
    searcher: Searcher
    ingestor: Ingestor
    queries: QueryMemory  # recent queries, in memory only, for the evidence pictures (bounded, TTL)
    follower: Follower  # this process's position in the catalogue's change log
    sync_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def start(
        cls, settings: Settings, *, fetcher: Fetcher | None = None, rebuild_index: bool = False
    ) -> Service:
        import faiss

        faiss.omp_set_num_threads(1)  # one query on 2 OpenMP threads was ~7x slower here than on 1
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        catalogue = open_catalogue(settings)
        try:
            embedder = build_embedder(
                settings.backbone,
                settings.model_path,
                threads=settings.embed_threads,
                resnet50_weights=settings.resnet50_weights,
            )
            check_backbone(catalogue, embedder)
            position = catalogue.change_position()  # before the indexes read the catalogue: see pictrace/sync.py
            index = open_index(settings, catalogue, embedder, rebuild=rebuild_index)
            local = open_local_index(settings, catalogue, rebuild=rebuild_index)
        except BaseException:
            catalogue.close()
            raise
        fetcher = fetcher or Fetcher(settings)
        await fetcher.start()
        pool = WorkPool(settings.workers, settings.queue_limit, initializer=one_openmp_thread)
        service = cls(
            settings=settings,
            catalogue=catalogue,
            embedder=embedder,
            index=index,
            local=local,
            pool=pool,
            fetcher=fetcher,
            searcher=Searcher(catalogue, index, embedder, settings, local),
            ingestor=Ingestor(catalogue, index, embedder, fetcher, pool, settings, local),
            queries=QueryMemory.from_settings(settings),
            follower=Follower(catalogue, None if settings.milvus_uri else index, local, position),
        )
        if settings.sync_interval_s > 0:
            service.sync_task = asyncio.create_task(service._follow_catalogue())
        return service

    async def _follow_catalogue(self) -> None:
        """Keep this process's indexes in step with a catalogue other processes write to (replicas).

        A cheap counter read every ``sync_interval_s``; when it moved, the change log's new rows are applied
        (pictrace/sync.py). Shared Milvus needs no vector sync, every writer updates the one collection, but the
        in-process local-feature index does.
        """
        while True:
            await asyncio.sleep(self.settings.sync_interval_s)
            try:
                added, removed = await self.sync_now()
                if added or removed:
                    log.info("followed the catalogue: +%d -%d images", added, removed)
                    await self.pool.run_background(maintain, self.index, self.catalogue)
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup must not end the loop; it is retried next tick
                log.exception("could not follow the catalogue; retrying in %.0f s", self.settings.sync_interval_s)

    async def sync_now(self) -> tuple[int, int]:
        """Apply other processes' changes at once (tests, and a replica that wants to be current before
        answering). Returns (added, removed): vectors, or local-index images on shared Milvus."""
        result = await self.pool.run_background(self.follower.sync)
        return result.added, result.removed

    async def close(self) -> None:
        if self.sync_task is not None:
            self.sync_task.cancel()
            await asyncio.gather(self.sync_task, return_exceptions=True)
        self.queries.clear()
        await self.fetcher.close()
        self.pool.shutdown()
        self.searcher.close()
        self.index.save()
        self.index.close()
        try:
            save_local_index(self.settings, self.catalogue, self.local)
        except OSError:  # derived data: rebuilt at the next start, so a full disk must not lose the catalogue
            log.exception("could not save the local-feature index; it will be rebuilt at the next start")
        self.catalogue.close()
