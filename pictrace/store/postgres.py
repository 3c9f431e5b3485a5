"""The catalogue in PostgreSQL (psycopg 3), for several replicas and ingest workers sharing one gallery.

Every query is inherited from ``Catalogue`` (its parts' portable SQL); this class only supplies the connection,
the schema and the placeholder style (``?`` → ``%s``). Selected with ``PICTRACE_DATABASE_URL=postgresql://...``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pictrace.store.catalogue import Catalogue
from pictrace.store.schema import POSTGRES_SCHEMA, upgrade

_SCHEMA_LOCK = 0x50494354  # advisory lock id: workers starting together create the schema one at a time


def to_pg(sql: str) -> str:
    """``?`` placeholders (the shared SQL's style) → psycopg's ``%s``; a literal ``%`` is doubled first."""
    return sql.replace("%", "%%").replace("?", "%s")


def redact(url: str) -> str:
    """The database URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class _Connection:
    """What the shared SQL sees inside a transaction: ``execute``/``executemany`` with ``?`` placeholders."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(to_pg(sql), tuple(params)) if params else self._conn.execute(sql)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(to_pg(sql), [tuple(r) for r in rows])


class PostgresCatalogue(Catalogue):
    """The shared catalogue on a PostgreSQL server: one connection per process, guarded like SQLite's."""

    def __init__(self, url: str) -> None:  # Catalogue.__init__ is not called: it opens the SQLite file
        import psycopg

        self.url = url
        self._psycopg = psycopg
        self._lock = threading.RLock()
        self._conn: Any = psycopg.connect(url, autocommit=True)
        with self._lock, self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            self._conn.execute(POSTGRES_SCHEMA)
            upgrade(_Connection(self._conn), real="DOUBLE PRECISION", blob="BYTEA")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def location(self) -> str:
        return redact(self.url)

    def _connection(self) -> Any:
        """The connection, opened again if the server dropped it (a restart, a failover)."""
        if self._conn.broken:
            self._conn = self._psycopg.connect(self.url, autocommit=True)
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                yield _Connection(conn)

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        params = tuple(params)
        with self._lock:
            return list(_Connection(self._connection()).execute(sql, params).fetchall())
