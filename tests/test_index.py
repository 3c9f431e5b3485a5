"""One behaviour test class run against every VectorIndex implementation."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ImageServer, crop, encode

from pictrace.config import Settings
from pictrace.errors import IndexCorruptError, IndexMismatchError
from pictrace.gallery import load_gallery
from pictrace.indexes.vector import FaissIndex, FaissParams, IndexInfo, VectorIndex
from pictrace.service import Service

INFO = IndexInfo("test-backbone", "abc123", 64)


def unit_vectors(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


IndexFactory = Callable[[Path], VectorIndex]
MILVUS_LITE_MISSING = "milvus-lite is not installed: pip install -r requirements-scale.txt"

def milvus_lite(path: Path) -> VectorIndex:
    pytest.importorskip("milvus_lite", reason=MILVUS_LITE_MISSING)
    from pictrace.indexes.vector.milvus_index import MilvusIndex

    return MilvusIndex(str(path / "milvus.db"), INFO)


def milvus_server(uri: str) -> IndexFactory:
    from pictrace.indexes.vector.milvus_index import MilvusIndex

    return lambda path: MilvusIndex(uri, INFO)


BACKENDS: dict[str, IndexFactory] = {
    "faiss-flat": lambda path: FaissIndex.open(path / "v.faiss", INFO),
    "faiss-hnsw": lambda path: FaissIndex.open(path / "v.faiss", INFO, FaissParams(mode="hnsw")),
    "faiss-hnsw-sq8": lambda path: FaissIndex.open(path / "v.faiss", INFO, FaissParams(mode="hnsw-sq8")),
    "faiss-auto": lambda path: FaissIndex.open(path / "v.faiss", INFO, FaissParams(approx_from=40)),
    "milvus-lite": milvus_lite,
    "milvus-server": lambda path: pytest.fail("made by the backend fixture, from the session's server"),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, IndexFactory]]:
    opened: list[VectorIndex] = []
    make = BACKENDS[request.param]
    if request.param == "milvus-server":  # a real server (tests/milvusserver.py), emptied for this test
        make = milvus_server(request.getfixturevalue("milvus_uri"))

    def factory(path: Path) -> VectorIndex:
        for index in opened:  # Milvus Lite allows one client per file: the previous one is done
            index.close()
        opened.clear()
        opened.append(make(path))
        return opened[0]

    yield request.param, factory
    for index in opened:
        index.close()


class TestVectorIndex:
    def test_finds_each_vector_as_its_own_nearest(
        self, backend: tuple[str, IndexFactory], tmp_path: Path
    ) -> None:
        name, factory = backend
        index = factory(tmp_path)
        vectors = unit_vectors(200)
        ids = np.arange(1000, 1200, dtype=np.int64)
        index.add(ids, vectors)
        assert len(index) == 200
        scores, found = index.search(vectors[:10], 5)
        assert found.shape == (10, 5)
        assert list(found[:, 0]) == list(ids[:10])
        tolerance = 5e-3 if "sq8" in name else 1e-4  # 8-bit codes give approximate inner products
        assert np.allclose(scores[:, 0], 1.0, atol=tolerance)
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
        assert index.contains(np.array([2, 3, 4, 7, 999], dtype=np.int64)).tolist() == [True, False, False, True, False]

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

    def test_deletes_stay_deleted_after_rebuild_and_reopen(
        self, backend: tuple[str, IndexFactory], tmp_path: Path
    ) -> None:
        _, factory = backend
        index = factory(tmp_path)
        vectors = unit_vectors(120, seed=3)
        ids = np.arange(120, dtype=np.int64)
        index.add(ids, vectors)
        gone = np.arange(0, 120, 3, dtype=np.int64)  # a third: enough tombstones to call for a rebuild
        assert index.remove(gone) == len(gone)
        assert index.remove(gone) == 0  # removing again removes nothing
        kept = np.setdiff1d(ids, gone)
        if index.needs_rebuild():
            index.rebuild([(kept, vectors[kept])], expected=len(kept))
            assert not index.needs_rebuild()
        index.save()
        reopened = factory(tmp_path)
        assert sorted(reopened.ids().tolist()) == kept.tolist()
        _, found = reopened.search(vectors[gone], 10)
        assert not np.isin(found, gone).any()
        _, found = reopened.search(vectors[kept[:5]], 1)
        assert found[:, 0].tolist() == kept[:5].tolist()

    def test_rebuild_replaces_everything(self, backend: tuple[str, IndexFactory], tmp_path: Path) -> None:
        _, factory = backend
        index = factory(tmp_path)
        old = unit_vectors(30, seed=4)
        index.add(np.arange(30, dtype=np.int64), old)
        new = unit_vectors(20, seed=5)
        index.rebuild(iter([(np.arange(100, 110, dtype=np.int64), new[:10]),
                            (np.arange(110, 120, dtype=np.int64), new[10:])]))
        assert len(index) == 20
        assert sorted(index.ids().tolist()) == list(range(100, 120))
        _, found = index.search(new[:3], 1)
        assert found[:, 0].tolist() == [100, 101, 102]


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


def test_faiss_saves_only_what_changed(tmp_path: Path) -> None:
    """A close right after an ingest's own save writes nothing again; a change, or a fresh index, is written."""
    path = tmp_path / "v.faiss"
    index = FaissIndex.open(path, INFO)
    index.save()
    assert path.exists()  # a fresh index is written even when empty
    index.add(np.arange(5, dtype=np.int64), unit_vectors(5))
    index.save()
    written = path.stat().st_mtime_ns
    index.save()
    index.remove(np.array([99], dtype=np.int64))  # nothing removed: no change
    index.save()
    assert path.stat().st_mtime_ns == written
    reopened = FaissIndex.open(path, INFO)
    reopened.save()
    assert path.stat().st_mtime_ns == written
    reopened.remove(np.array([0], dtype=np.int64))
    reopened.save()
    assert path.stat().st_mtime_ns != written and len(FaissIndex.open(path, INFO)) == 4


def test_faiss_refuses_other_backbone(tmp_path: Path) -> None:
    index = FaissIndex.open(tmp_path / "v.faiss", INFO)
    index.add(np.arange(3, dtype=np.int64), unit_vectors(3))
    index.save()
    with pytest.raises(IndexMismatchError, match="reindex"):
        FaissIndex.open(tmp_path / "v.faiss", IndexInfo("other", "def", 64))


# --- FAISS specifics: structure chosen by size, tombstones, file format ----------------------------------


def test_faiss_auto_mode_follows_gallery_size(tmp_path: Path) -> None:
    params = FaissParams(approx_from=100, sq8_from=300)
    index = FaissIndex.open(tmp_path / "v.faiss", INFO, params)
    vectors = unit_vectors(400, seed=6)
    index.add(np.arange(50, dtype=np.int64), vectors[:50])
    assert index.mode == "exact" and not index.needs_rebuild()
    index.add(np.arange(50, 150, dtype=np.int64), vectors[50:150])
    assert index.needs_rebuild()  # grew past approx_from
    index.rebuild([(np.arange(150, dtype=np.int64), vectors[:150])], expected=150)
    assert index.mode == "hnsw"
    index.rebuild([(np.arange(400, dtype=np.int64), vectors)], expected=400)
    assert index.mode == "hnsw-sq8"
    index.save()
    reopened = FaissIndex.open(tmp_path / "v.faiss", INFO, params)
    assert reopened.mode == "hnsw-sq8" and len(reopened) == 400
    _, found = reopened.search(vectors[:20], 1)
    assert found[:, 0].tolist() == list(range(20))
    # shrinking a little below the threshold does not flip the structure back and forth
    reopened.remove(np.arange(250, 400, dtype=np.int64))
    reopened.rebuild([(np.arange(250, dtype=np.int64), vectors[:250])], expected=250)
    assert reopened.mode == "hnsw"
    reopened.remove(np.arange(230, 250, dtype=np.int64))
    assert reopened.tombstones == 20 and not reopened.needs_rebuild()


def test_faiss_replace_in_hnsw_leaves_a_tombstone_not_a_ghost(tmp_path: Path) -> None:
    index = FaissIndex.open(tmp_path / "v.faiss", INFO, FaissParams(mode="hnsw"))
    vectors = unit_vectors(20, seed=7)
    index.add(np.arange(20, dtype=np.int64), vectors)
    index.add(np.array([5], dtype=np.int64), vectors[15:16])  # id 5 now holds vector 15
    assert len(index) == 20 and index.tombstones == 1
    _, found = index.search(vectors[5:6], 20)
    assert found[0, 0] != 5  # the old vector of id 5 is gone
    scores, found = index.search(vectors[15:16], 2)
    assert sorted(found[0].tolist()) == [5, 15] and np.allclose(scores[0], 1.0, atol=1e-4)


def test_faiss_search_while_adding_is_safe(tmp_path: Path) -> None:
    import threading

    index = FaissIndex.open(tmp_path / "v.faiss", INFO, FaissParams(mode="hnsw"))
    vectors = unit_vectors(3000, seed=8)
    index.add(np.arange(100, dtype=np.int64), vectors[:100])
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                _, found = index.search(vectors[:4], 10)
                assert (found[:, 0] >= 0).all()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=searcher)
    thread.start()
    for start in range(100, 3000, 100):
        index.add(np.arange(start, start + 100, dtype=np.int64), vectors[start : start + 100])
        index.remove(np.array([start - 50], dtype=np.int64))
    stop.set()
    thread.join()
    assert errors == []
    assert len(index) == 3000 - 29


def test_faiss_older_format_is_reported_as_corrupt(tmp_path: Path) -> None:
    (tmp_path / "v.faiss").write_bytes(b"PICTRACE-FAISS-1\n{}\n")
    with pytest.raises(IndexCorruptError, match="older format"):
        FaissIndex.open(tmp_path / "v.faiss", INFO)


# --- the service on each backend: ingest, search, restart -------------------------------------------------


@pytest.mark.parametrize("backend_settings", ["faiss-hnsw-sq8", "milvus-lite", "milvus-server"])
async def test_service_ingests_and_finds_on_each_backend(
    request: pytest.FixtureRequest,
    backend_settings: str,
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    if backend_settings == "milvus-lite":
        pytest.importorskip("milvus_lite", reason=MILVUS_LITE_MISSING)
    overrides: dict[str, object] = (
        {"index_mode": "hnsw-sq8"} if backend_settings.startswith("faiss") else {"milvus_uri": str(tmp_path / "m.db")}
    )
    if backend_settings == "milvus-server":
        overrides = {"milvus_uri": request.getfixturevalue("milvus_uri")}
    settings = make_settings(**overrides)
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    settings.db.write_text(
        json.dumps([{"id": n, "url": image_server.add(f"{n}.jpg", encode(photos[n]))} for n in names])
    )
    service = await Service.start(settings)
    try:
        report = await service.ingestor.ingest_gallery(load_gallery(settings.db))
        assert report.added == 4
        # db.json loses one image: it leaves the index too
        settings.db.write_text(json.dumps([{"id": n, "url": image_server.url(f"{n}.jpg")} for n in names[1:]]))
        report = await service.ingestor.ingest_gallery(load_gallery(settings.db))
        assert report.removed == 1
    finally:
        await service.close()
    service = await Service.start(settings)  # after a restart
    try:
        assert len(service.indexes.vector) == 3
        for name in names[1:]:
            result = await service.pool.run(service.searcher.search_bytes, encode(crop(photos[name], 0.7)), 1)
            assert result.results[0].id == name
        result = await service.pool.run(service.searcher.search_bytes, encode(photos["astronaut"]), 5)
        assert "astronaut" not in [m.id for m in result.results]
    finally:
        await service.close()


@pytest.mark.parametrize("where", [0.5, 0.9, "truncate"])
def test_faiss_damage_anywhere_in_the_file_is_detected(tmp_path: Path, where: float | str) -> None:
    index = FaissIndex.open(tmp_path / "v.faiss", INFO, FaissParams(mode="hnsw"))
    index.add(np.arange(300, dtype=np.int64), unit_vectors(300))
    index.save()
    raw = bytearray((tmp_path / "v.faiss").read_bytes())
    if where == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[int(len(raw) * float(where))] ^= 0x01  # one bit of a vector or of the graph
    (tmp_path / "v.faiss").write_bytes(bytes(raw))
    with pytest.raises(IndexCorruptError):
        FaissIndex.open(tmp_path / "v.faiss", INFO)


def test_faiss_writes_during_a_rebuild_are_kept(tmp_path: Path) -> None:
    import threading

    index = FaissIndex.open(tmp_path / "v.faiss", INFO, FaissParams(mode="hnsw"))
    vectors = unit_vectors(100, seed=9)
    index.add(np.arange(60, dtype=np.int64), vectors[:60])
    reading, release = threading.Event(), threading.Event()

    def catalogue_batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield np.arange(30, dtype=np.int64), vectors[:30]
        reading.set()
        release.wait(10)  # the catalogue is slow; meanwhile the service goes on writing
        yield np.arange(30, 60, dtype=np.int64), vectors[30:60]

    builder = threading.Thread(target=index.rebuild, args=(catalogue_batches(), 60))
    builder.start()
    assert reading.wait(10)
    index.add(np.arange(60, 100, dtype=np.int64), vectors[60:])  # ingested during the rebuild
    index.remove(np.array([5, 70], dtype=np.int64))  # deleted during the rebuild
    _, found = index.search(vectors[80:81], 1)  # searches are served meanwhile
    assert found[0, 0] == 80
    release.set()
    builder.join()
    assert sorted(index.ids().tolist()) == sorted(set(range(100)) - {5, 70})
    assert index.tombstones == 2  # replayed onto the new structure: 5 and 70 are tombstones there
    _, found = index.search(vectors[[5, 70, 99]], 1)
    assert found[:, 0].tolist()[2] == 99 and 5 not in found[:, 0] and 70 not in found[:, 0]


def test_milvus_lite_file_is_free_for_another_process_after_close(tmp_path: Path) -> None:
    """close() stops the in-process Milvus Lite server: another process (a restart, the bench) can open it."""
    import subprocess
    import sys

    index = milvus_lite(tmp_path)
    index.add(np.arange(5, dtype=np.int64), unit_vectors(5))
    index.save()
    index.close()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from test_index import milvus_lite;"
        "index = milvus_lite(Path(sys.argv[2])); print(len(index)); index.close()"
    )
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", code, str(tests), str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=tests.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "5"


@pytest.mark.parametrize("other", ["dimension", "model"])
def test_milvus_server_refuses_a_collection_of_another_model(milvus_uri: str, other: str) -> None:
    """A collection of this name that holds another model's vectors is refused at open, in one line."""
    from pictrace.indexes.vector.milvus_index import MilvusIndex

    made_by = (IndexInfo("another-backbone", "fff999", 64) if other == "model"
               else IndexInfo(INFO.backbone, INFO.fingerprint, 32))
    MilvusIndex(milvus_uri, made_by, collection="shared_vectors").close()
    with pytest.raises(IndexMismatchError) as refused:
        MilvusIndex(milvus_uri, INFO, collection="shared_vectors")
    message = str(refused.value)
    assert "\n" not in message and "shared_vectors" in message
    assert ("dim 32" in message) if other == "dimension" else ("another-backbone" in message)


def test_milvus_server_reindex_moves_a_collection_made_before_aliases_behind_one(milvus_uri: str) -> None:
    """A collection named after the model itself (as before reindex used aliases) is used as it is, and the
    first rebuild replaces it with a new collection behind an alias of that name."""
    from pymilvus import MilvusClient

    from pictrace.indexes.vector.milvus_index import MilvusIndex, collection_name

    name = collection_name(INFO)
    client = MilvusClient(uri=milvus_uri)
    client.create_collection(name, dimension=INFO.dim, metric_type="IP", consistency_level="Strong")
    vectors = unit_vectors(20, seed=7)
    client.insert(name, [{"id": i, "vector": v.tolist()} for i, v in enumerate(vectors)])
    index = MilvusIndex(milvus_uri, INFO)
    try:
        assert len(index) == 20
        index.rebuild([(np.arange(100, 105, dtype=np.int64), vectors[:5])])
        assert sorted(index.ids().tolist()) == list(range(100, 105))
        _, found = index.search(vectors[:1], 1)
        assert found[0, 0] == 100
        (physical,) = client.list_collections()
        assert physical != name and client.list_aliases(physical)["aliases"] == [name]
    finally:
        index.close()
        client.close()
