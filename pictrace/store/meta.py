"""Key/value facts about the catalogue as a whole (its id, the backbone its vectors came from, tombstones)."""

from __future__ import annotations

import json

from pictrace.errors import PicTraceError
from pictrace.store.sql import SqlAccess

FEATURE_IDENTITY_KEY = "feature_identity"


class CorruptMetaError(PicTraceError):
    """A meta value cannot be read back as what was recorded (edited by hand, or written by something else)."""


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

    def meta_with_prefix(self, prefix: str) -> dict[str, str]:
        """Every fact whose key starts with ``prefix``, keyed by the rest of the key."""
        rows = self._query("SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))
        return {str(key)[len(prefix) :]: str(value) for key, value in rows}

    def delete_meta(self, key: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))

    def feature_identity(self) -> dict[str, object] | None:
        """What defined the stored features when they were recorded (``record_feature_identity``), or None for
        a catalogue that never recorded it. Compared at start with what the running code would compute, so
        features made two different ways are never mixed."""
        value = self.get_meta(FEATURE_IDENTITY_KEY)
        if value is None:
            return None
        try:
            identity = json.loads(value)
        except json.JSONDecodeError as exc:
            raise CorruptMetaError(f"meta {FEATURE_IDENTITY_KEY!r} is not JSON: {value[:80]!r}") from exc
        if not isinstance(identity, dict):
            raise CorruptMetaError(f"meta {FEATURE_IDENTITY_KEY!r} is not a JSON object: {value[:80]!r}")
        return identity

    def record_feature_identity(self, identity: dict[str, object]) -> None:
        """Record what defines the stored features (backbone, weights, feature parameters...), replacing any
        earlier record. Values must be JSON (str, numbers, bools, None, lists, dicts with str keys); they
        read back equal, with tuples as lists. Keys are sorted, so the same identity is stored as the same text.
        """
        self.set_meta(FEATURE_IDENTITY_KEY, json.dumps(identity, sort_keys=True, allow_nan=False))
