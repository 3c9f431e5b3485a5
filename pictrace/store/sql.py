"""What every part of the catalogue builds on: one read and one write transaction, in portable SQL.

The parts (images.py, changes.py, links.py, meta.py) are mixins of ``Catalogue`` that reach the database only
through ``_query`` and ``_transaction``, with ``?`` placeholders and SQL that SQLite and PostgreSQL both run
(``ON CONFLICT``, ``RETURNING``). Each engine supplies these two methods, so a query written once works on both.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any


class SqlAccess:
    """The two methods an engine implements (``Catalogue`` for SQLite, ``PostgresCatalogue``)."""

    def _transaction(self) -> AbstractContextManager[Any]:
        """One write transaction; yields a connection with ``execute``/``executemany`` (``?`` placeholders).

        Committed when the block ends, rolled back (and the error raised again) when it raises.
        """
        raise NotImplementedError

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one read (``?`` placeholders) and return all its rows."""
        raise NotImplementedError


def marks(count: int) -> str:
    """``?,?,...``: the placeholders of an ``IN (...)`` list of ``count`` values."""
    return ",".join("?" * count)
