"""Persistence: the catalogue (system of record) with each image's features and thumbnail.

SQLite by default (``Catalogue``); PostgreSQL (``PostgresCatalogue``, imported lazily: psycopg is an extra)
when ``PICTRACE_DATABASE_URL`` is set. ``open_catalogue`` is the one place that chooses.
"""

from pictrace.store.base import CatalogueStore
from pictrace.store.catalogue import Catalogue
from pictrace.store.meta import CorruptMetaError
from pictrace.store.records import (
    Change,
    ChangePosition,
    FailedSource,
    FileStat,
    GalleryImage,
    GroupLinks,
    ImageFacts,
    ImageRecord,
    LinkFit,
    PairLink,
    Source,
    SourceState,
    StoredImage,
)

__all__ = [
    "Catalogue",
    "CatalogueStore",
    "Change",
    "ChangePosition",
    "CorruptMetaError",
    "FailedSource",
    "FileStat",
    "GalleryImage",
    "GroupLinks",
    "ImageFacts",
    "ImageRecord",
    "LinkFit",
    "PairLink",
    "Source",
    "SourceState",
    "StoredImage",
]
