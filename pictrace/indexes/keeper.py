"""The one owner of PicTrace's derived state: the vector index and the local-feature index, kept in step with
the catalogue (the system of record).

Both indexes can always be rebuilt from the catalogue (it costs time, never results), so everything that changes
them goes through ``DerivedIndexes``, which changes both: ingest and the API after their catalogue commit, a
start reopening the saved files and applying what changed while the app was down, a replica applying the
change log, ``reindex``.

A shared vector collection (Milvus) is one that every writer updates and its server persists: a start checks it
against the catalogue (a new model's empty collection is filled there), but a process never follows other
processes' changes to it, only its own in-process local-feature index.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pictrace.config import Settings
from pictrace.errors import IndexCorruptError
from pictrace.features.orb import OrbFeatures
from pictrace.indexes.local import LocalIndex, LocalIndexCorruptError, LocalIndexParams, local_index_params
from pictrace.indexes.vector import IndexInfo, VectorIndex
from pictrace.indexes.vector.factory import build_index, empty_index, vectors_are_shared
from pictrace.store import Catalogue
from pictrace.tuning import Tuning, VectorIndexTuning

log = logging.getLogger(__name__)


@contextlib.contextmanager
def all_threads() -> Iterator[None]:
    """Give FAISS every core for a bulk build (queries are served with 1 thread, see Service.start)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def catalogue_identity(catalogue: Catalogue) -> str:
    """A random id the catalogue keeps in its meta table: a saved local index names the catalogue it follows
    (vec_ids are never reused within one catalogue, but a new catalogue starts them again)."""
    found = catalogue.get_meta("catalogue_id")
    if found is None:
        found = uuid.uuid4().hex
        catalogue.set_meta("catalogue_id", found)
    return found


class DerivedIndexes:
    """The vector index and the local-feature index of one process, and the catalogue they follow.

    Thread-safe as its indexes are: searches go on during every operation, and a rebuild replays the writes
    made while it ran. Counts returned are images; where the vectors are shared, those of the local index.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        vector: VectorIndex,
        local: LocalIndex,
        *,
        shares_vectors: bool = False,
        local_path: Path | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.vector = vector
        self.local = local
        self.shares_vectors = shares_vectors  # Milvus: other processes write the same collection
        self.local_path = local_path  # where the local index is saved; None: not persisted
        # Two ingest batches that both see the gallery outgrow the lists would otherwise both rebuild it, and
        # the second build's swap could land in the middle of the match-graph linking that follows.
        self._relearning = threading.Lock()

    # --- opening ---------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        settings: Settings,
        catalogue: Catalogue,
        info: IndexInfo,
        tuning: Tuning,
        *,
        rebuild: bool = False,
    ) -> DerivedIndexes:
        """Reopen the saved indexes and apply the catalogue's changes since; rebuild from the catalogue what is
        missing, stale (another model, other build parameters, another catalogue) or corrupt.

        ``rebuild`` ignores the files altogether (``pictrace reindex``: also the way out of a mismatched index).
        """
        shared = vectors_are_shared(settings)
        vector = _open_vector(settings, info, tuning.vectors, fresh=rebuild and not shared)
        try:
            params = local_index_params(tuning.local)
            local_path = settings.local_index_path if tuning.local.persist else None
            reopened = None if rebuild or local_path is None else _open_local(local_path, params, catalogue)
            local = reopened if reopened is not None else LocalIndex(params)  # (an empty index is falsy)
            indexes = cls(catalogue, vector, local, shares_vectors=shared, local_path=local_path)
            with all_threads():
                if rebuild:
                    log.info("building the indexes from the catalogue (%d images)", indexes.rebuild())
                else:
                    indexes._catch_up(local_reopened=reopened is not None)
        except BaseException:
            vector.close()
            raise
        log.info("local-feature index: %d descriptors, ~%d bytes per image", len(local), local.bytes_per_image)
        return indexes

    def _catch_up(self, *, local_reopened: bool) -> None:
        """At start: bring both indexes in line with the catalogue, the shared vectors included."""
        if len(self.vector) == 0 and self.catalogue.counts()[0] > 0:
            log.info("building the vector index from the catalogue (%d images)", self._rebuild_vector())
        else:
            added, removed = self._reconcile_vector()
            if added or removed:
                log.info("vector index brought in line with the catalogue: +%d -%d", added, removed)
            if not self._maintain_vector() and (added or removed):
                self.vector.save()
        if local_reopened:
            added, removed = self._reconcile_local()
            if added or removed:
                log.info("local-feature index brought in line with the catalogue: +%d -%d", added, removed)
            if self.local.needs_training():
                log.info("local-feature index outgrew its lists: relearning them")
                self._relearn_local()
        else:
            self._relearn_local()
        self._save_local()

    # --- writes that follow a catalogue commit ---------------------------------------------------------

    def add(self, vec_ids: Sequence[int], vectors: np.ndarray, orbs: Sequence[OrbFeatures]) -> None:
        """Index images just committed to the catalogue (``vectors`` row i and ``orbs[i]`` are ``vec_ids[i]``'s)."""
        if not len(vec_ids):
            return
        self.vector.add(np.array(vec_ids, dtype=np.int64), vectors)
        for vec_id, orb in zip(vec_ids, orbs, strict=True):
            self.local.add(vec_id, orb)

    def remove(self, vec_ids: Sequence[int]) -> None:
        """Drop images just deleted from the catalogue."""
        if not len(vec_ids):
            return
        self.vector.remove(np.array(vec_ids, dtype=np.int64))
        self.local.remove(vec_ids)

    # --- following changes made elsewhere --------------------------------------------------------------

    def apply_changes(self, adds: Sequence[int], removes: Sequence[int]) -> tuple[int, int]:
        """Apply another process's catalogue changes (a replica reading the change log): drop ``removes``, add
        those of ``adds`` not held yet, read from the catalogue (images deleted meanwhile are not read back).
        Returns (added, removed). Applying a change twice is harmless."""
        added = removed = 0
        if not self.shares_vectors:  # else the writer updated the shared collection itself
            if len(removes):
                removed = self.vector.remove(np.array(removes, dtype=np.int64))
            missing = np.array(adds, dtype=np.int64)
            missing = missing[~self.vector.contains(missing)]  # it may hold some: its own writes, or since start
            for ids, vectors in self.catalogue.embeddings(missing.tolist()):
                self.vector.add(ids, vectors)
                added += len(ids)
        local = self._update_local(adds, removes)
        return local if self.shares_vectors else (added, removed)

    def reconcile(self) -> tuple[int, int]:
        """Make this process's indexes hold exactly the catalogue's images (after a lost index, or another
        process's writes the change log no longer accounts for): O(gallery) reads, O(change) writes. A shared
        vector collection is left to its writers. Returns (added, removed)."""
        vector = (0, 0) if self.shares_vectors else self._reconcile_vector()
        local = self._reconcile_local()
        return local if self.shares_vectors else vector

    def _reconcile_vector(self) -> tuple[int, int]:
        """The index's ids are read before the catalogue's: vectors reach the index only after their catalogue
        commit, so an id held but no longer catalogued was really deleted, never merely not yet visible."""
        held = self.vector.ids()
        wanted = self.catalogue.vec_ids()
        missing = np.setdiff1d(wanted, held)
        extra = np.setdiff1d(held, wanted)
        if len(extra):
            self.vector.remove(extra)
        for ids, vectors in self.catalogue.embeddings(missing.tolist()):
            self.vector.add(ids, vectors)
        return len(missing), len(extra)

    def _reconcile_local(self) -> tuple[int, int]:
        held = self.local.held_ids()
        wanted = self.catalogue.vec_ids()
        return self._update_local(np.setdiff1d(wanted, held).tolist(), np.setdiff1d(held, wanted).tolist())

    def _update_local(self, adds: Sequence[int], removes: Sequence[int]) -> tuple[int, int]:
        removed = self.local.remove(removes)
        added = 0
        for vec_id, blob in self.catalogue.orb_blobs_of([v for v in adds if v not in self.local]):
            self.local.add(vec_id, OrbFeatures.from_bytes(blob))
            added += 1
        return added, removed

    # --- rebuilding ------------------------------------------------------------------------------------

    def rebuild(self) -> int:
        """Rebuild both indexes from the catalogue and save them (``reindex``). Returns the image count.

        Searches and API writes go on meanwhile: the indexes serve their old structures and apply the writes
        made during the build."""
        count = self._rebuild_vector()
        self._relearn_local()
        self._save_local()
        return count

    def _rebuild_vector(self) -> int:
        """Replace every vector with the catalogue's (a fresh structure, chosen for their count) and save."""
        count = self.catalogue.counts()[0]
        self.vector.rebuild(self.catalogue.embeddings(), expected=count)
        if self.shares_vectors:  # other processes' writes during the load went to the collection it replaced
            self._reconcile_vector()
        self.vector.save()
        return count

    def _relearn_local(self) -> None:
        """Build the local index from the catalogue (new lists) and swap it in; then apply what was added or
        deleted while it was built (an API write during a build of minutes), which the swap would otherwise drop."""
        self.local.replace_with(LocalIndex.build(self.local.params, self.catalogue.orb_blobs()))
        self._reconcile_local()

    def relearn_if_outgrown(self) -> bool:
        """Relearn the local index's lists when the gallery outgrew them (``LocalIndex.needs_training``, the one
        rule: a first ingest grows the gallery from nothing, and without lists every search scans all codes).
        Checked under a lock, so one growth seen by two writers relearns once. The new lists are saved at once:
        at 100k images they cost minutes, which a crash before the next save would cost the next start again."""
        with self._relearning:
            if not self.local.needs_training():
                return False
            self._relearn_local()
            self._save_local()
            return True

    def _maintain_vector(self) -> bool:
        if not self.vector.needs_rebuild():
            return False
        self._rebuild_vector()
        return True

    def maintain(self) -> bool:
        """Rebuild (and save) the vector index when deletes or growth call for it, and relearn the local lists
        when the gallery outgrew them. Returns whether either was rebuilt."""
        rebuilt = self._maintain_vector()
        return self.relearn_if_outgrown() or rebuilt

    # --- persistence -----------------------------------------------------------------------------------

    def save(self) -> None:
        """Persist both: the vector index (a file, or a flush of the shared collection), and the local index when
        it changed since it was saved. A local index that cannot be written is logged, not raised: the next
        start rebuilds it from the catalogue."""
        self.vector.save()
        self._save_local()

    def _save_local(self) -> bool:
        if self.local_path is None:
            return False
        try:
            return self.local.save(self.local_path, catalogue_identity(self.catalogue))
        except OSError:
            log.exception("could not save the local-feature index; it will be rebuilt at the next start")
            return False

    def close(self) -> None:
        """Save, then release the vector index's connection or files (the catalogue is the caller's)."""
        try:
            self.save()
        finally:
            self.vector.close()


def _open_vector(settings: Settings, info: IndexInfo, tuning: VectorIndexTuning, *, fresh: bool) -> VectorIndex:
    """The configured vector index, or an empty FAISS one when ``fresh`` or its file is unreadable (the caller
    fills it from the catalogue). Raises IndexMismatchError for a file of another model."""
    if fresh:
        return empty_index(settings, info, tuning)
    try:
        return build_index(settings, info, tuning)
    except IndexCorruptError as exc:
        log.warning("%s; rebuilding it from the catalogue", exc)
        return empty_index(settings, info, tuning)


def _open_local(path: Path, params: LocalIndexParams, catalogue: Catalogue) -> LocalIndex | None:
    """The saved local index, or None when there is none or it is stale or corrupt (rebuilt by the caller)."""
    if not path.exists():
        return None
    try:
        local = LocalIndex.open(path, params, catalogue_identity(catalogue))
    except LocalIndexCorruptError as exc:
        log.warning("%s; rebuilding it from the catalogue", exc)
        return None
    if local is None:
        log.warning("local-feature index %s was built with other settings, in an older format or for another "
                    "catalogue; rebuilding it from the catalogue", path)
    return local
