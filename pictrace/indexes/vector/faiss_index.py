"""The embedded default vector index: FAISS in-process, persisted to one file written atomically.

Three structures behind one class, chosen by gallery size (or forced by ``PICTRACE_INDEX_MODE``):

- ``exact``: ``IndexFlatIP``, brute force; best while the gallery is small (18 ms at 100k on 2 cores).
- ``hnsw``: ``IndexHNSWFlat``, a graph: sub-millisecond at 100k with recall@10 ≈ 1.
- ``hnsw-sq8``: ``IndexHNSWSQ`` with 8-bit scalar quantisation: a quarter of the vector memory.

HNSW cannot remove vectors, so every structure uses one scheme: vectors get dense internal labels (their
position), a label → id table maps them to catalogue ids, and a removed or replaced vector is a tombstone
(label → -1) that searches skip with an ``IDSelectorBitmap``. ``needs_rebuild`` says when tombstones (or a
gallery that outgrew its structure) call for a rebuild from the catalogue, the system of record.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from pictrace.errors import IndexCorruptError, IndexMismatchError
from pictrace.indexes.lock import ReadWriteLock
from pictrace.indexes.storage import atomic_write, read_framed, write_framed
from pictrace.indexes.vector.base import IndexInfo

log = logging.getLogger(__name__)

# File: MAGIC, one JSON header line, the label table (int64), the FAISS index, then a trailer holding the CRC-32
# of everything between MAGIC and it. Written and read as a stream (no second copy of a 500 MB index in memory,
# one pass for the checksum), which is what keeps a restart at 100k images well under a second.
MAGIC = b"PICTRACE-FAISS-2\n"
END = b"\nPICTRACE-FAISS-END\n"
MODES = ("exact", "hnsw", "hnsw-sq8")


@dataclass(frozen=True)
class FaissParams:
    """How the structure is chosen and tuned (from Settings; defaults measured in bench/index_scale.py)."""

    mode: str = "auto"  # auto | exact | hnsw | hnsw-sq8
    approx_from: int = 20_000  # auto: exact below this many vectors, HNSW from here
    sq8_from: int = 100_000  # auto: HNSW+SQ8 from here (recall@10 0.99 on real embeddings, a third of the memory)
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    rebuild_fraction: float = 0.2  # tombstones above this fraction of labels call for a rebuild

    def mode_for(self, count: int) -> str:
        if self.mode != "auto":
            return self.mode
        if count >= self.sq8_from:
            return "hnsw-sq8"
        if count >= self.approx_from:
            return "hnsw"
        return "exact"


def _new_structure(mode: str, dim: int, params: FaissParams) -> faiss.Index:
    if mode == "exact":
        return faiss.IndexFlatIP(dim)
    if mode == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    elif mode == "hnsw-sq8":
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)  # type: ignore[assignment,arg-type]  # faiss stubs lag the SWIG API
    else:
        raise ValueError(f"unknown FAISS index mode {mode!r} (expected auto or one of {', '.join(MODES)})")
    index.hnsw.efConstruction = params.ef_construction
    return index


def _mode_of(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexHNSWSQ):
        return "hnsw-sq8"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    return "exact"


class _Structure:
    """One FAISS structure with its label table; not thread-safe (FaissIndex holds the lock)."""

    def __init__(self, index: faiss.Index, labels: np.ndarray, trained_on: int) -> None:
        self.index = index
        self.labels = labels  # label → catalogue id, -1 for a tombstone; len == index.ntotal
        self.where = {int(v): i for i, v in enumerate(labels.tolist()) if v >= 0}
        self.trained_on = trained_on
        self._selector: tuple[faiss.IDSelector, np.ndarray] | None = None

    @property
    def mode(self) -> str:
        return _mode_of(self.index)

    @property
    def alive(self) -> int:
        return len(self.where)

    @property
    def dead(self) -> int:
        return len(self.labels) - len(self.where)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.remove(ids)
        if not self.index.is_trained:
            # SQ8 learns each dimension's range from the first vectors; needs_rebuild retrains it on more later.
            self.index.train(vectors)
            self.trained_on = len(vectors)
        start = int(self.index.ntotal)
        self.index.add(vectors)
        self.labels = np.concatenate([self.labels, ids])
        for offset, vec_id in enumerate(ids.tolist()):
            self.where[vec_id] = start + offset
        self._selector = None

    def remove(self, ids: np.ndarray) -> int:
        removed = 0
        for vec_id in ids.tolist():
            label = self.where.pop(int(vec_id), None)
            if label is not None:
                self.labels[label] = -1
                removed += 1
        if removed:
            self._selector = None
        return removed

    def search(self, vectors: np.ndarray, k: int, ef_search: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(vectors)
        k = min(k, self.alive)
        if k <= 0:
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        held = self._alive_selector()  # hold the bitmap for the whole search
        if isinstance(self.index, faiss.IndexHNSW):
            params: faiss.SearchParameters = faiss.SearchParametersHNSW(efSearch=max(ef_search, k))  # type: ignore[attr-defined]
        else:
            params = faiss.SearchParameters()
        if held is not None:
            params.sel = held[0]
        scores, labels = self.index.search(vectors, k, params=params)
        ids = np.where(labels >= 0, self.labels[np.maximum(labels, 0)], -1)
        return scores, ids.astype(np.int64)

    def _alive_selector(self) -> tuple[faiss.IDSelector, np.ndarray] | None:
        if self.dead == 0:
            return None
        held = self._selector
        if held is None:
            bitmap = np.packbits(self.labels >= 0, bitorder="little")
            # the selector points into ``bitmap``: the pair travels together so the array outlives the search
            held = (faiss.IDSelectorBitmap(len(self.labels), faiss.swig_ptr(bitmap)), bitmap)
            self._selector = held
        return held


class FaissIndex:
    """The FAISS backend of ``VectorIndex``: thread-safe (read-write lock), ids are the catalogue's vec_ids."""

    def __init__(
        self,
        info: IndexInfo,
        path: Path | None = None,
        params: FaissParams | None = None,
        *,
        _structure: _Structure | None = None,
    ) -> None:
        self._info = info
        self._path = path
        self._params = params or FaissParams()
        mode = self._params.mode_for(0)
        self._s = _structure or _Structure(_new_structure(mode, info.dim, self._params), np.zeros(0, np.int64), 0)
        self._lock = ReadWriteLock()
        self._rebuild_lock = threading.Lock()
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None
        self._changes = 0  # adds, removes and rebuilds so far: ``save`` writes only when some came since the last
        self._saved_changes: int | None = 0 if _structure is not None else None  # read from the file: as saved

    @classmethod
    def open(cls, path: Path, info: IndexInfo, params: FaissParams | None = None) -> FaissIndex:
        """Load ``path`` if it exists (checking integrity and provenance), else start empty."""
        if not path.exists():
            return cls(info, path, params)
        try:
            with path.open("rb") as handle:
                header, labels, index = _read(handle)
            stored = IndexInfo(header["backbone"], header["fingerprint"], int(header["dim"]))
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise IndexCorruptError(f"vector index {path} is unreadable ({exc})") from exc
        if stored != info:
            raise IndexMismatchError(
                f"vector index {path} was built with {stored.backbone} (dim {stored.dim}, weights "
                f"{stored.fingerprint[:12]}); this service uses {info.backbone} (dim {info.dim}, weights "
                f"{info.fingerprint[:12]}). To reindex, point PICTRACE_DATA_DIR at a new directory and run "
                "`python -m pictrace index`."
            )
        return cls(info, path, params, _structure=_Structure(index, labels, int(header.get("trained_on", 0))))

    @property
    def info(self) -> IndexInfo:
        return self._info

    @property
    def mode(self) -> str:
        return self._s.mode

    @property
    def tombstones(self) -> int:
        return self._s.dead

    def __len__(self) -> int:
        return self._s.alive

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self._info.dim or len(ids) != len(vectors):
            raise ValueError(f"expected ({len(ids)}, {self._info.dim}) vectors, got {vectors.shape}")
        if len(ids) == 0:
            return
        with self._lock.write():
            self._s.add(ids, vectors)
            self._changes += 1
            if self._journal is not None:
                self._journal.append(("add", ids, vectors))

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock.write():
            if self._journal is not None:
                self._journal.append(("remove", ids, None))
            removed = self._s.remove(ids)
            self._changes += removed > 0
            return removed

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock.read():
            return self._s.search(vectors, k, self._params.ef_search)

    def ids(self) -> np.ndarray:
        with self._lock.read():
            return np.fromiter(self._s.where.keys(), dtype=np.int64, count=len(self._s.where))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        with self._lock.read():
            where = self._s.where
            return np.array([int(i) in where for i in np.asarray(ids).tolist()], dtype=bool)

    def needs_rebuild(self) -> bool:
        """Too many tombstones, a gallery that outgrew (or shrank below) its structure, or SQ8 trained on few."""
        with self._lock.read():
            s = self._s
            if s.dead > self._params.rebuild_fraction * max(len(s.labels), 1) and s.dead >= 16:
                return True
            wanted = self._params.mode_for(s.alive)
            if wanted != s.mode:
                grows = MODES.index(wanted) > MODES.index(s.mode)
                # shrink only well below the threshold, so a gallery near it does not flip on every delete
                if grows or self._params.mode_for(2 * s.alive) == wanted:
                    return True
            return s.mode == "hnsw-sq8" and s.trained_on < min(s.alive, 100_000) / 2

    def rebuild(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], expected: int | None = None) -> None:
        """Build a fresh structure from the catalogue's vectors, then swap it in; serves the old one meanwhile.

        Adds and removes that arrive during the build are journaled and replayed onto the new structure.
        """
        with self._rebuild_lock:
            with self._lock.write():
                self._journal = []
            try:
                structure = self._build(batches, expected)
            except BaseException:
                with self._lock.write():
                    self._journal = None
                raise
            with self._lock.write():
                for op, ids, vectors in self._journal or []:
                    if op == "add":
                        assert vectors is not None
                        structure.add(ids, vectors)
                    else:
                        structure.remove(ids)
                self._journal = None
                self._s = structure
                self._changes += 1
        log.info("vector index rebuilt: %d vectors, mode %s", structure.alive, structure.mode)

    def _build(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], expected: int | None) -> _Structure:
        batches = iter(batches)
        first: list[tuple[np.ndarray, np.ndarray]] = []
        if expected is None:  # the mode depends on the count: hold the batches (only small galleries get here)
            first = list(batches)
            expected = sum(len(ids) for ids, _ in first)
        mode = self._params.mode_for(expected)
        structure = _Structure(_new_structure(mode, self._info.dim, self._params), np.zeros(0, np.int64), 0)
        if mode == "hnsw-sq8":  # train the quantiser on up to 100k vectors before adding any
            held = len(first) and sum(len(ids) for ids, _ in first)
            for ids, vectors in batches:
                first.append((ids, vectors))
                held += len(ids)
                if held >= 100_000:
                    break
            if first:
                train = np.concatenate([np.asarray(v, dtype=np.float32) for _, v in first])
                structure.index.train(train)
                structure.trained_on = len(train)
        for ids, vectors in [*first, *batches]:
            structure.add(
                np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(vectors, dtype=np.float32)
            )
        return structure

    def save(self) -> None:
        """Write the index atomically, unless nothing changed since it was saved or read: a close after an
        ingest, which has just saved, would otherwise write it again (1.6-5 GB at 1M images)."""
        if self._path is None:
            return
        with self._lock.read():  # writers wait while the file is written; searches go on
            if self._saved_changes == self._changes:
                return
            s = self._s
            header = {
                "backbone": self._info.backbone,
                "fingerprint": self._info.fingerprint,
                "dim": self._info.dim,
                "mode": s.mode,
                "count": s.alive,
                "labels": len(s.labels),
                "trained_on": s.trained_on,
            }
            atomic_write(self._path, lambda handle: _write(handle, header, s.labels, s.index))
            self._saved_changes = self._changes

    def close(self) -> None:
        """Nothing to release: the file is written by ``save`` and not held open."""


def _write(handle: BinaryIO, header: dict[str, object], labels: np.ndarray, index: faiss.Index) -> None:
    write_framed(handle, MAGIC, END, header, labels, lambda writer: faiss.write_index(index, writer))


def _read(handle: BinaryIO) -> tuple[dict[str, Any], np.ndarray, faiss.Index]:
    """Parse one index file, checking its CRC and trailer; raises ValueError/RuntimeError when corrupt."""
    header, labels, index = read_framed(handle, MAGIC, END, "labels", faiss.read_index, older=b"PICTRACE-FAISS")
    if index.ntotal != len(labels):
        raise ValueError("label table does not match the index")
    return header, labels, index
