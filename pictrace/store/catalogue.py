"""The catalogue: the system of record for every image, its sources (URLs) and its features.

``Catalogue`` is composed of its parts, each a mixin of portable queries (images.py, changes.py, links.py,
meta.py, files.py; see sql.py), over one SQLite connection: WAL mode with ``synchronous=FULL``, so each
ingested image, committed with all its features in one transaction, survives a crash (even ``kill -9``).
``PostgresCatalogue`` (postgres.py) is a ``Catalogue`` that replaces only the connection, so code typed
against ``Catalogue`` runs on either engine.
Vector indexes are derived from the embeddings stored here and can always be rebuilt from them.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pictrace.errors import CatalogueCorruptError
from pictrace.store.changes import ChangeLogQueries
from pictrace.store.files import FileQueries
from pictrace.store.images import ImageQueries
from pictrace.store.links import LinkQueries
from pictrace.store.meta import MetaQueries
from pictrace.store.schema import SQLITE_SCHEMA, upgrade

_MMAP_BYTES = 1 << 40


class Catalogue(ImageQueries, ChangeLogQueries, LinkQueries, MetaQueries, FileQueries):
    """Thread-safe access to the catalogue: SQLite here (one connection, one lock; WAL lets readers overlap).

    Engine-specific: ``__init__``, ``close``, ``location``, ``_transaction``, ``_query``; the queries are the
    parts' and shared with PostgresCatalogue.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.RLock()
        try:
            self._prepare()
        except sqlite3.DatabaseError as exc:  # not a database, or a damaged one: one clear line, not a traceback
            self._conn.close()
            raise CatalogueCorruptError(str(path), exc) from exc

    def _prepare(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            # A search reads the ORB blobs of ~40 candidates (~40 KB each): through a memory map that took
            # 0.5 ms here instead of 2.2 ms of read() calls. The pages are the OS's file cache, reclaimable, not
            # the process's heap; SQLite maps at most its compiled limit (2 GB in most builds) and reads on.
            self._conn.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
            self._conn.executescript(SQLITE_SCHEMA)
        with self._transaction() as conn:
            upgrade(conn, real="REAL", blob="BLOB")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def location(self) -> str:
        """Where the catalogue lives, for messages (a file, or a database URL without its password)."""
        return str(self.path)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        # IMMEDIATE: take the write lock at BEGIN, so two writers wait (busy timeout) instead of deadlocking
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._conn.execute(sql, tuple(params)).fetchall())
