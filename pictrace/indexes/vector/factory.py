"""The one place that picks a vector index backend from the settings."""

from __future__ import annotations

from pictrace.config import Settings
from pictrace.indexes.vector.base import IndexInfo, VectorIndex
from pictrace.indexes.vector.faiss_index import FaissIndex, FaissParams
from pictrace.tuning import VectorIndexTuning


def faiss_params(settings: Settings, tuning: VectorIndexTuning) -> FaissParams:
    return FaissParams(
        mode=settings.index_mode,
        approx_from=tuning.approx_from,
        sq8_from=tuning.sq8_from,
        ef_search=tuning.ef_search,
    )


def vectors_are_shared(settings: Settings) -> bool:
    """Milvus is one collection that every writer (ingest worker, API replica) updates: a process neither
    follows other processes' vector changes nor builds a private copy of it. FAISS is this process's own."""
    return bool(settings.milvus_uri)


def build_index(settings: Settings, info: IndexInfo, tuning: VectorIndexTuning) -> VectorIndex:
    """Milvus when ``PICTRACE_MILVUS_URI`` is set, else the embedded FAISS file beside the catalogue.

    Raises IndexCorruptError for an unreadable FAISS file (the caller rebuilds it from the catalogue) and
    IndexMismatchError for vectors of another backbone.
    """
    if settings.milvus_uri:
        from pictrace.indexes.vector.milvus_index import MilvusIndex

        return MilvusIndex(
            settings.milvus_uri, info, token=settings.milvus_token or "", timeout_s=tuning.milvus_timeout_s
        )
    return FaissIndex.open(settings.index_path, info, faiss_params(settings, tuning))


def empty_index(settings: Settings, info: IndexInfo, tuning: VectorIndexTuning) -> VectorIndex:
    """A fresh FAISS index at the usual path (the file on disk was corrupt, or is being rebuilt)."""
    return FaissIndex(info, settings.index_path, faiss_params(settings, tuning))
