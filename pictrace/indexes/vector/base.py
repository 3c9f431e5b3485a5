"""The VectorIndex protocol: what search, ingest and the index keeper need from a vector index backend."""

from __future__ import annotations

from collections.abc import Iterable
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

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` are held (a bool mask), without listing them all: a replica's incremental sync."""
        ...

    def save(self) -> None:
        """Persist durably and atomically (a crash leaves the old file or the new one, never half of one)."""
        ...

    def needs_rebuild(self) -> bool:
        """Whether deletes or growth have made the structure worth rebuilding from the catalogue."""
        ...

    def rebuild(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], expected: int | None = None) -> None:
        """Replace every vector with ``batches`` (the catalogue's (ids, vectors)); ``expected`` = their count."""
        ...

    def close(self) -> None:
        """Release connections or files (the index must have been saved first)."""
        ...
