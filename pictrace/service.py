"""Builds (and closes) everything a running PicTrace needs, for the web app's lifespan and the CLI alike."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pictrace.config import Settings
from pictrace.errors import IndexCorruptError, IndexMismatchError
from pictrace.explain import QueryMemory
from pictrace.features.embed import Embedder, build_embedder
from pictrace.fetch import Fetcher
from pictrace.index import FaissIndex, IndexInfo, VectorIndex
from pictrace.ingest import Ingestor, reconcile
from pictrace.local_index import LocalIndex, LocalIndexParams
from pictrace.search import Searcher
from pictrace.store import Catalogue
from pictrace.work import WorkPool

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
            f"the catalogue in {catalogue.path.parent} was built with backbone {stored[0]} "
            f"(weights {str(stored[1])[:12]}); this service uses {embedder.name} "
            f"(weights {embedder.fingerprint[:12]}); vectors of two models cannot be mixed. To reindex, point "
            "PICTRACE_DATA_DIR at a new directory and run `python -m pictrace index`; or switch "
            "PICTRACE_BACKBONE (and PICTRACE_RESNET50_WEIGHTS) back."
        )
    catalogue.set_meta("backbone", embedder.name)
    catalogue.set_meta("fingerprint", embedder.fingerprint)


def open_index(
    settings: Settings, catalogue: Catalogue, embedder: Embedder, *, rebuild: bool = False
) -> VectorIndex:
    """Open the persisted index, rebuilding it from the catalogue when it is missing, stale or corrupt.

    ``rebuild`` ignores the file altogether (``pictrace reindex``: also the way out of a mismatched index).
    """
    info = IndexInfo(embedder.name, embedder.fingerprint, embedder.dim)
    if rebuild:
        index: VectorIndex = FaissIndex(info, settings.index_path)
    else:
        try:
            index = FaissIndex.open(settings.index_path, info)
        except IndexCorruptError as exc:
            log.warning("%s; rebuilding it from the catalogue", exc)
            index = FaissIndex(info, settings.index_path)
    added, removed = reconcile(index, catalogue)
    if added or removed:
        log.info("vector index brought in line with the catalogue: +%d -%d", added, removed)
        index.save()
    return index


def local_index_params(settings: Settings) -> LocalIndexParams:
    return LocalIndexParams(
        per_image=settings.local_per_image,
        code_bytes=settings.local_code_bytes,
        knn=settings.local_knn,
        max_distance=settings.local_max_distance,
        nprobe=settings.local_nprobe,
    )


def open_local_index(settings: Settings, catalogue: Catalogue) -> LocalIndex:
    """Rebuilt from the ORB blobs in the catalogue (the system of record) at every start."""
    local = LocalIndex.build(local_index_params(settings), catalogue.orb_blobs())
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

    @classmethod
    async def start(
        cls, settings: Settings, *, fetcher: Fetcher | None = None, rebuild_index: bool = False
    ) -> Service:
        import faiss

        faiss.omp_set_num_threads(1)  # one query on 2 OpenMP threads was ~7x slower here than on 1
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        catalogue = Catalogue(settings.catalogue_path)
        try:
            embedder = build_embedder(
                settings.backbone,
                settings.model_path,
                threads=settings.embed_threads,
                resnet50_weights=settings.resnet50_weights,
            )
            check_backbone(catalogue, embedder)
            index = open_index(settings, catalogue, embedder, rebuild=rebuild_index)
            local = open_local_index(settings, catalogue)
        except BaseException:
            catalogue.close()
            raise
        fetcher = fetcher or Fetcher(settings)
        await fetcher.start()
        pool = WorkPool(settings.workers, settings.queue_limit)
        return cls(
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
        )

    async def close(self) -> None:
        self.queries.clear()
        await self.fetcher.close()
        self.pool.shutdown()
        self.index.save()
        self.catalogue.close()
