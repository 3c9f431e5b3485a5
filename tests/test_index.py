"""One behaviour test class run against every VectorIndex implementation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pictrace.errors import IndexCorruptError, IndexMismatchError
from pictrace.index import FaissIndex, IndexInfo, VectorIndex

INFO = IndexInfo("test-backbone", "abc123", 64)


def unit_vectors(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


IndexFactory = Callable[[Path], VectorIndex]

BACKENDS: dict[str, IndexFactory] = {
    "faiss-flat": lambda path: FaissIndex.open(path / "v.faiss", INFO),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> tuple[str, IndexFactory]:
    return request.param, BACKENDS[request.param]


class TestVectorIndex:
    def test_finds_each_vector_as_its_own_nearest(
        self, backend: tuple[str, IndexFactory], tmp_path: Path
    ) -> None:
        _, factory = backend
        index = factory(tmp_path)
        vectors = unit_vectors(200)
        ids = np.arange(1000, 1200, dtype=np.int64)
        index.add(ids, vectors)
        assert len(index) == 200
        scores, found = index.search(vectors[:10], 5)
        assert found.shape == (10, 5)
        assert list(found[:, 0]) == list(ids[:10])
        assert np.allclose(scores[:, 0], 1.0, atol=1e-4)
        assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first

    def test_remove_and_replace(self, backend: tuple[str, IndexFactory], tmp_path: Path) -> None:
        _, factory = backend
        index = factory(tmp_path)
        vectors = unit_vectors(50, seed=1)
        index.add(np.arange(50, dtype=np.int64), vectors)
        assert index.remove(np.array([3, 4, 999], dtype=np.int64)) == 2
        _, found = index.search(vectors[3:4], 10)
        assert 3 not in found[0]
        index.add(np.array([7], dtype=np.int64), vectors[3:4])  # replace id 7's vector
        _, found = index.search(vectors[3:4], 1)
        assert found[0, 0] == 7
        assert len(index) == 48
        assert sorted(index.ids().tolist()) == sorted(set(range(50)) - {3, 4})

    def test_empty_and_short(self, backend: tuple[str, IndexFactory], tmp_path: Path) -> None:
        _, factory = backend
        index = factory(tmp_path)
        _, found = index.search(unit_vectors(1), 5)
        assert found.shape[0] == 1 and (found.size == 0 or np.all(found < 0))
        index.add(np.array([1, 2], dtype=np.int64), unit_vectors(2))
        _, found = index.search(unit_vectors(1), 5)
        assert sorted(i for i in found[0].tolist() if i >= 0) == [1, 2]

    def test_persists_across_reopen(self, backend: tuple[str, IndexFactory], tmp_path: Path) -> None:
        _, factory = backend
        index = factory(tmp_path)
        vectors = unit_vectors(30, seed=2)
        index.add(np.arange(30, dtype=np.int64), vectors)
        index.remove(np.array([5], dtype=np.int64))
        index.save()
        reopened = factory(tmp_path)
        assert len(reopened) == 29
        _, found = reopened.search(vectors[6:7], 1)
        assert found[0, 0] == 6
        _, found = reopened.search(vectors[5:6], 3)
        assert 5 not in found[0]


def test_faiss_corrupt_file_is_detected(tmp_path: Path) -> None:
    index = FaissIndex.open(tmp_path / "v.faiss", INFO)
    index.add(np.arange(10, dtype=np.int64), unit_vectors(10))
    index.save()
    raw = bytearray((tmp_path / "v.faiss").read_bytes())
    raw[-20] ^= 0xFF
    (tmp_path / "v.faiss").write_bytes(bytes(raw))
    with pytest.raises(IndexCorruptError):
        FaissIndex.open(tmp_path / "v.faiss", INFO)
    (tmp_path / "v.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexCorruptError):
        FaissIndex.open(tmp_path / "v.faiss", INFO)


def test_faiss_refuses_other_backbone(tmp_path: Path) -> None:
    index = FaissIndex.open(tmp_path / "v.faiss", INFO)
    index.add(np.arange(3, dtype=np.int64), unit_vectors(3))
    index.save()
    with pytest.raises(IndexMismatchError, match="reindex"):
        FaissIndex.open(tmp_path / "v.faiss", IndexInfo("other", "def", 64))
