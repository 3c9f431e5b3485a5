"""Builds (and closes) everything a running PicTrace needs, for the web app's lifespan and the CLI alike."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from dataclasses import dataclass, field

from pictrace.config import Settings, unknown_environment
from pictrace.duplicates import DuplicateGroups
from pictrace.errors import CatalogueCorruptError, FeatureMismatchError, IndexMismatchError
from pictrace.explain import QueryMemory
from pictrace.features.embed import Embedder, build_embedder
from pictrace.fetch import Fetcher
from pictrace.indexes import DerivedIndexes
from pictrace.indexes.vector import IndexInfo
from pictrace.ingest import Ingestor
from pictrace.pixels import PixelBudget
from pictrace.search import Searcher
from pictrace.store import Catalogue
from pictrace.sync import Follower
from pictrace.tuning import OrbExtraction, Tuning
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


def check_features(catalogue: Catalogue, orb: OrbExtraction) -> None:
    """Refuse to compare a query's ORB features with stored ones extracted with other parameters (another
    keypoint count or image size): their matches would mean something else, silently. A catalogue that has
    images but no record predates the record, and was extracted with what this service uses."""
    current = orb.model_dump()
    stored = catalogue.feature_identity()
    if stored is None or catalogue.counts()[0] == 0:
        catalogue.record_feature_identity(current)
        return
    if stored != current:
        raise FeatureMismatchError(
            f"the catalogue {catalogue.location} holds ORB features extracted with {stored}, this service "
            f"extracts {current}; extract them again: point PICTRACE_DATA_DIR at a new directory and run "
            "`python -m pictrace index` (`reindex` rebuilds the indexes from the stored features), or use the "
            "tuning that built it."
        )


def open_catalogue(settings: Settings) -> Catalogue:
    """PostgreSQL when ``PICTRACE_DATABASE_URL`` is set (shared by replicas and workers), else SQLite."""
    if settings.database_url:
        from pictrace.store.postgres import PostgresCatalogue

        return PostgresCatalogue(settings.database_url)
    return Catalogue(settings.catalogue_path)


def index_info(embedder: Embedder) -> IndexInfo:
    return IndexInfo(embedder.name, embedder.fingerprint, embedder.dim)


@dataclass
class Service:
    settings: Settings
    tuning: Tuning
    catalogue: Catalogue
    embedder: Embedder
    indexes: DerivedIndexes  # the vector and the local-feature index, kept in step with the catalogue
    pool: WorkPool
    fetcher: Fetcher
    searcher: Searcher
    ingestor: Ingestor
    queries: QueryMemory  # recent queries, in memory only, for the evidence pictures (bounded, TTL)
    follower: Follower  # this process's position in the catalogue's change log
    pixels: PixelBudget  # pixels decoded at once by requests (pictrace/pixels.py)
    duplicates: DuplicateGroups  # every duplicate in the gallery, derived from the catalogue's links
    sync_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        tuning: Tuning | None = None,
        fetcher: Fetcher | None = None,
        rebuild_index: bool = False,
    ) -> Service:
        """``tuning``: the fitted constants (pictrace/tuning.py), the shipped ones unless an experiment says."""
        import faiss

        tuning = tuning or Tuning()
        for name in unknown_environment(os.environ):
            log.warning("%s is not a setting (a typo, or a constant now in pictrace/tuning.py): ignored", name)

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
            check_features(catalogue, tuning.orb)
            position = catalogue.change_position()  # before the indexes read the catalogue: see pictrace/sync.py
            indexes = DerivedIndexes.open(settings, catalogue, index_info(embedder), tuning, rebuild=rebuild_index)
        except sqlite3.DatabaseError as exc:  # a damaged page found on the first reads
            catalogue.close()
            raise CatalogueCorruptError(catalogue.location, exc) from exc
        except BaseException:
            catalogue.close()
            raise
        fetcher = fetcher or Fetcher(settings, constants=tuning.fetching)
        await fetcher.start()
        pool = WorkPool(settings.workers, settings.queue_limit, initializer=one_openmp_thread)
        service = cls(
            settings=settings,
            tuning=tuning,
            catalogue=catalogue,
            embedder=embedder,
            indexes=indexes,
            pool=pool,
            fetcher=fetcher,
            searcher=Searcher(catalogue, indexes.vector, embedder, settings, indexes.local, tuning),
            ingestor=Ingestor(catalogue, indexes, embedder, fetcher, pool, settings, tuning),
            queries=QueryMemory.from_settings(settings, tuning.evidence),
            follower=Follower(catalogue, indexes, position),
            pixels=PixelBudget(tuning.decoding.budget_pixels, settings.queue_limit),
            duplicates=DuplicateGroups(catalogue, tuning.duplicates),
        )
        service.duplicates.start()  # in a thread of its own: a start does not wait for the groups
        if settings.sync_interval_s > 0:
            service.sync_task = asyncio.create_task(service._follow_catalogue())
        return service

    async def _follow_catalogue(self) -> None:
        """Keep this process's indexes in step with a catalogue other processes write to (replicas).

        A cheap counter read every ``sync_interval_s``; when it moved, the change log's new rows are applied
        (pictrace/sync.py).
        """
        while True:
            await asyncio.sleep(self.settings.sync_interval_s)
            try:
                added, removed = await self.sync_now()
                if added or removed:
                    log.info("followed the catalogue: +%d -%d images", added, removed)
                    await self.pool.run_background(self.indexes.maintain)
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
        await asyncio.to_thread(self.duplicates.close)  # stores the groups for the next start
        await self.fetcher.close()
        self.pool.shutdown()
        self.searcher.close()
        try:
            self.indexes.close()
        finally:
            self.catalogue.close()
