"""A replica follows a catalogue that other processes write to, at the cost of what changed.

Every image added or deleted leaves a row in the catalogue's change log (seq, vec_id, op, generation), in the
transaction that does it. A replica remembers the last row it applied and, when the generation counter moved,
reads only the newer rows: it adds those images' embeddings and ORB codes and drops the deleted ones. That is
O(change) per sync, where comparing every vec_id and rebuilding the local-feature index was O(gallery)
(minutes at 1M images).

The full reconcile stays as the fallback, whenever the log cannot be trusted to be complete since the
position: at start (the position is kept in memory only), and when the new rows do not account for every
generation since it, which is what a trimmed log or a writer that does not log (an older PicTrace) leave.
Applying a row twice is harmless (adds of held images are skipped), so the position may lag the snapshot.
A shared vector collection (Milvus) is not followed: every writer updates it (pictrace/indexes/keeper.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from pictrace.indexes import DerivedIndexes
from pictrace.store import Catalogue, Change, ChangePosition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    """What one sync did: images added to and removed from this process's indexes, and how."""

    added: int
    removed: int
    full: bool  # the full reconcile ran (no position, or the log did not cover every change since it)
    changes_read: int = 0  # change-log rows read (incremental path)


def covers(changes: list[Change], since: int, generation: int) -> bool:
    """Whether ``changes`` hold a row for every generation after ``since`` up to ``generation``.

    Every logging transaction moves the counter by one and writes its rows with the new value, so a missing
    generation is a transaction whose rows are gone (trimmed) or were never written (a writer that does not log).
    """
    seen = {c.generation for c in changes}
    return all(g in seen for g in range(since + 1, generation + 1))


def net_effect(changes: list[Change]) -> tuple[list[int], list[int]]:
    """(vec_ids to add, vec_ids to remove). vec_ids are never reused, so a removal is final."""
    removed = {c.vec_id for c in changes if c.op == "remove"}
    added = list(dict.fromkeys(c.vec_id for c in changes if c.op == "add" and c.vec_id not in removed))
    return added, sorted(removed)


class Follower:
    """Keeps one process's indexes in step with the catalogue's change log.

    Thread-safe: one sync at a time (the timer and ``Service.sync_now`` may overlap).
    """

    def __init__(
        self,
        catalogue: Catalogue,
        indexes: DerivedIndexes,
        position: ChangePosition | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.indexes = indexes
        self.position = position  # read before the indexes were built from the catalogue, or None
        self.full_syncs = 0
        self.incremental_syncs = 0
        self._lock = threading.Lock()

    def sync(self) -> SyncResult:
        """Apply what other processes changed since the last sync: the new log rows, else a full reconcile."""
        with self._lock:
            position = self.position
            if position is None:
                return self._full()
            generation = self.catalogue.generation()
            if generation == position.generation:
                return SyncResult(0, 0, full=False)
            changes = self.catalogue.changes_after(position.seq)
            if not covers(changes, position.generation, generation):
                log.info("change log incomplete since seq %d (trimmed, or a writer that does not log): "
                         "reconciling in full", position.seq)
                return self._full()
            return self._apply(changes)

    def _apply(self, changes: list[Change]) -> SyncResult:
        added, removed = self.indexes.apply_changes(*net_effect(changes))
        self.indexes.relearn_if_outgrown()  # the gallery grew 4x since the lists were learned (amortised O(1))
        self.position = ChangePosition(changes[-1].seq, max(c.generation for c in changes))
        self.incremental_syncs += 1
        return SyncResult(added, removed, full=False, changes_read=len(changes))

    def _full(self) -> SyncResult:
        """Compare every vec_id with the indexes and apply the difference: O(gallery) reads, O(change) writes
        (the local index is relearned only when it outgrew its lists, as on the incremental path)."""
        position = self.catalogue.change_position()  # before reading: rows after it are applied again, harmlessly
        added, removed = self.indexes.reconcile()
        self.indexes.relearn_if_outgrown()
        self.position = position
        self.full_syncs += 1
        return SyncResult(added, removed, full=True)
