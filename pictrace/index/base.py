"""The VectorIndex protocol and the lock that makes a FAISS index safe to share between threads."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class IndexInfo:
    """What built the vectors: an index refuses to mix vectors from another backbone or weights file."""

    backbone: str
    fingerprint: str
    dim: int


@runtime_checkable
class VectorIndex(Protocol):
    """Nearest neighbours by inner product over L2-normalised vectors (= cosine), keyed by int64 ids."""

    @property
    def info(self) -> IndexInfo: ...

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (or replace) vectors under the given ids."""
        ...

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids; unknown ids are ignored. Returns how many were removed."""
        ...

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) queries → (scores (n, k) float32, ids (n, k) int64), best first, -1 ids pad short rows."""
        ...

    def ids(self) -> np.ndarray:
        """Every id held, for reconciling the index with the catalogue."""
        ...

    def save(self) -> None:
        """Persist durably and atomically (a crash leaves the old file or the new one, never half of one)."""
        ...


class ReadWriteLock:
    """Many readers or one writer. FAISS crashes if vectors are added while another thread searches."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
