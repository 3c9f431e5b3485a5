"""The embedded default vector index: FAISS in-process, persisted to one file written atomically."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import faiss
import numpy as np

from pictrace.errors import IndexCorruptError, IndexMismatchError
from pictrace.index.base import IndexInfo, ReadWriteLock

MAGIC = b"PICTRACE-FAISS-1\n"


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, then rename over the target: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FaissIndex:
    """Exact inner-product search (``IndexFlatIP``) with caller-chosen int64 ids (``IndexIDMap2``)."""

    def __init__(self, info: IndexInfo, path: Path | None = None, index: faiss.Index | None = None) -> None:
        self._info = info
        self._path = path
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(info.dim))
        self._lock = ReadWriteLock()

    @classmethod
    def open(cls, path: Path, info: IndexInfo) -> FaissIndex:
        """Load ``path`` if it exists (checking integrity and provenance), else start empty."""
        if not path.exists():
            return cls(info, path)
        raw = path.read_bytes()
        try:
            if not raw.startswith(MAGIC):
                raise ValueError("bad magic")
            header_end = raw.index(b"\n", len(MAGIC))
            header = json.loads(raw[len(MAGIC) : header_end])
            body = raw[header_end + 1 :]
            if hashlib.sha256(body).hexdigest() != header["sha256"]:
                raise ValueError("checksum mismatch")
            index = faiss.deserialize_index(np.frombuffer(body, dtype=np.uint8))
            stored = IndexInfo(header["backbone"], header["fingerprint"], int(header["dim"]))
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise IndexCorruptError(f"vector index {path} is unreadable ({exc})") from exc
        if stored != info:
            raise IndexMismatchError(
                f"vector index {path} was built with {stored.backbone} (dim {stored.dim}, weights "
                f"{stored.fingerprint[:12]}); this service uses {info.backbone} (dim {info.dim}, weights "
                f"{info.fingerprint[:12]}). To reindex, point PICTRACE_DATA_DIR at a new directory and run "
                "`python -m pictrace index`."
            )
        return cls(info, path, index)

    @property
    def info(self) -> IndexInfo:
        return self._info

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self._info.dim or len(ids) != len(vectors):
            raise ValueError(f"expected ({len(ids)}, {self._info.dim}) vectors, got {vectors.shape}")
        with self._lock.write():
            self._index.remove_ids(ids)  # type: ignore[arg-type]  # the SWIG wrapper takes arrays too
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        with self._lock.write():
            return int(self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))  # type: ignore[arg-type]

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock.read():
            if self._index.ntotal == 0:
                n = len(vectors)
                return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
            scores, ids = self._index.search(vectors, min(k, int(self._index.ntotal)))
        return scores, ids

    def ids(self) -> np.ndarray:
        with self._lock.read():
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)  # type: ignore[attr-defined]

    def save(self) -> None:
        if self._path is None:
            return
        with self._lock.read():
            body = faiss.serialize_index(self._index).tobytes()
        header = {
            "backbone": self._info.backbone,
            "fingerprint": self._info.fingerprint,
            "dim": self._info.dim,
            "count": len(self),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        atomic_write(self._path, MAGIC + json.dumps(header).encode() + b"\n" + body)
