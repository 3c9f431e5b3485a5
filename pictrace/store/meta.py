"""Key/value facts about the catalogue as a whole (its id, the backbone its vectors came from, tombstones)."""

from __future__ import annotations

from pictrace.store.sql import SqlAccess


class MetaQueries(SqlAccess):
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def delete_meta(self, key: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))
