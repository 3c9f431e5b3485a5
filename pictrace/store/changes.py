"""The change log and generation counter: what replicas follow to keep their indexes current (pictrace/sync.py).

Every transaction that adds or deletes images calls ``log_changes``: it bumps the generation, then writes one
row per image carrying the generation it made. On PostgreSQL the bump's row lock makes concurrent writers
commit one at a time from there, so seq order is commit order: a replica that read up to a seq never finds an
older seq committed after it. A replica applies the rows newer than the last one it applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pictrace.store.records import Change, ChangePosition
from pictrace.store.sql import SqlAccess

_BUMP_GENERATION = "UPDATE changes SET generation = generation + 1 WHERE id = 1"
_LOG_CHANGE = "INSERT INTO change_log (vec_id, op, generation) SELECT ?, ?, generation FROM changes WHERE id = 1"


def log_changes(conn: Any, vec_ids: Iterable[int], op: str) -> None:
    """Inside a write transaction: move the generation once, and log ``op`` ('add' | 'remove') per image."""
    conn.execute(_BUMP_GENERATION)
    conn.executemany(_LOG_CHANGE, [(int(vec_id), op) for vec_id in vec_ids])


class ChangeLogQueries(SqlAccess):
    """Reading and trimming the change log (its rows are written by the image writes, through ``log_changes``)."""

    def generation(self) -> int:
        """A counter that moves whenever an image is added or deleted, by any process sharing the catalogue."""
        return int(self._query("SELECT generation FROM changes WHERE id = 1")[0][0])

    def change_position(self) -> ChangePosition:
        """The newest change and the generation counter, read together (one statement: one snapshot)."""
        rows = self._query(
            "SELECT (SELECT MAX(seq) FROM change_log), generation FROM changes WHERE id = 1"
        )
        return ChangePosition(int(rows[0][0] or 0), int(rows[0][1]))

    def changes_after(self, seq: int) -> list[Change]:
        """The log's rows newer than ``seq``, oldest first (what a replica has not applied yet)."""
        rows = self._query(
            "SELECT seq, vec_id, op, generation FROM change_log WHERE seq > ? ORDER BY seq", (int(seq),)
        )
        return [Change(int(s), int(v), str(op), int(g)) for s, v, op, g in rows]

    def trim_change_log(self, through_seq: int) -> int:
        """Drop the log's rows up to ``through_seq`` (about 40 bytes each, so rarely worth it). A replica that had
        not applied them notices the gap in generations and reconciles in full. Returns the rows dropped."""
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM change_log WHERE seq <= ?", (int(through_seq),))
            return int(cursor.rowcount)
