"""DerivedIndexes keeps the vector and the local-feature index in step with the catalogue, on every vector backend.

A real SQLite catalogue of synthetic images (random unit embeddings, random ORB descriptors); after every
operation both indexes must hold exactly the catalogue's images, and find each by its own vector and its own
descriptors. On Milvus (a collection every writer updates) a replica leaves the vectors to their writers and
follows its local index only; a start checks the collection.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pictrace.config import Settings
from pictrace.features.orb import OrbFeatures
from pictrace.indexes import DerivedIndexes
from pictrace.indexes.keeper import catalogue_identity
from pictrace.indexes.local import LocalIndex, LocalIndexParams, local_index_params
from pictrace.indexes.vector import FaissIndex, IndexInfo
from pictrace.store import Catalogue, Source, StoredImage
from pictrace.tuning import Tuning

INFO = IndexInfo("test-backbone", "abc123", 64)
LOCAL_PARAMS = local_index_params(Tuning().local)
DESCRIPTORS = 200


def synthetic(i: int) -> StoredImage:
    rng = np.random.default_rng(i)
    vector = rng.normal(size=INFO.dim).astype(np.float32)
    orb = OrbFeatures(
        rng.uniform(0, 640, size=(DESCRIPTORS, 2)).astype(np.float32),
        rng.integers(0, 256, size=(DESCRIPTORS, 32), dtype=np.uint8),
        640,
        480,
        1.0,
    )
    sha = hashlib.sha256(f"image {i}".encode()).hexdigest()
    return StoredImage(sha, sha, 640, 480, "JPEG", 1000, i, vector / np.linalg.norm(vector), b"gray",
                       orb.to_bytes(), b"thumb")


def commit(catalogue: Catalogue, numbers: range) -> dict[int, StoredImage]:
    """Store images in the catalogue (what ingest or another process commits). Returns them by vec_id."""
    stored = {}
    for i in numbers:
        image = synthetic(i)
        vec_id, added = catalogue.add_image(image, Source(url=f"https://example.com/{i}.jpg"))
        assert added
        stored[vec_id] = image
    return stored


def index_args(images: dict[int, StoredImage]) -> tuple[list[int], np.ndarray, list[OrbFeatures]]:
    ids = list(images)
    return ids, np.stack([images[v].embedding for v in ids]), [OrbFeatures.from_bytes(images[v].orb) for v in ids]


def assert_in_step(indexes: DerivedIndexes, catalogue: Catalogue) -> None:
    """Both indexes hold exactly the catalogue's images, and find each by its stored vector and descriptors."""
    wanted = sorted(catalogue.vec_ids().tolist())
    assert sorted(indexes.vector.ids().tolist()) == wanted
    assert indexes.local.held_ids().tolist() == wanted
    for ids, vectors in catalogue.embeddings():
        _, found = indexes.vector.search(vectors, 1)
        assert found[:, 0].tolist() == ids.tolist()
    for vec_id, blob in catalogue.orb_blobs():
        assert indexes.local.vote(OrbFeatures.from_bytes(blob)).top(1) == [vec_id]


@pytest.fixture(params=["faiss", "milvus-lite"])
def settings(request: pytest.FixtureRequest, make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    if request.param == "faiss":
        return make_settings()
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed: pip install -r requirements-scale.txt")
    return make_settings(milvus_uri=str(tmp_path / "vectors.milvus.db"))


@pytest.fixture
def catalogue(settings: Settings) -> Iterator[Catalogue]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalogue = Catalogue(settings.catalogue_path)
    yield catalogue
    catalogue.close()


class Opener:
    """Opens the indexes as a start does, closing the previous ones first (Milvus Lite: one client per file)."""

    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        self.settings, self.catalogue = settings, catalogue
        self.current: DerivedIndexes | None = None

    def __call__(self, rebuild: bool = False) -> DerivedIndexes:
        self.close()
        self.current = DerivedIndexes.open(self.settings, self.catalogue, INFO, Tuning(), rebuild=rebuild)
        return self.current

    def close(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            current.close()


@pytest.fixture
def open_indexes(settings: Settings, catalogue: Catalogue) -> Iterator[Opener]:
    opener = Opener(settings, catalogue)
    yield opener
    opener.close()


class TestDerivedIndexes:
    def test_open_builds_from_the_catalogue_and_reopens_what_was_saved(
        self, settings: Settings, catalogue: Catalogue, open_indexes: Opener
    ) -> None:
        images = commit(catalogue, range(6))
        indexes = open_indexes()
        assert indexes.shares_vectors == bool(settings.milvus_uri)
        assert_in_step(indexes, catalogue)
        open_indexes.close()
        saved = LocalIndex.open(settings.local_index_path, LOCAL_PARAMS, catalogue_identity(catalogue))
        assert saved is not None and saved.held_ids().tolist() == sorted(images)
        if not indexes.shares_vectors:
            assert sorted(FaissIndex.open(settings.index_path, INFO).ids().tolist()) == sorted(images)

        # changed while the app was down: the start applies it to both
        commit(catalogue, range(6, 9))
        gone = next(iter(images))
        catalogue.remove_image(images[gone].sha256)
        reopened = open_indexes()
        assert gone not in reopened.local and len(catalogue.vec_ids()) == 8
        assert_in_step(reopened, catalogue)

    def test_an_unchanged_local_index_is_reopened_not_rewritten(
        self, settings: Settings, catalogue: Catalogue, open_indexes: Opener
    ) -> None:
        for numbers in (range(0), range(3)):  # an empty index too
            commit(catalogue, numbers)
            open_indexes()
            open_indexes.close()
            os.utime(settings.local_index_path, ns=(0, 0))
            assert_in_step(open_indexes(), catalogue)
            open_indexes.close()
            assert settings.local_index_path.stat().st_mtime_ns == 0

    def test_add_and_remove_follow_the_catalogue_commits(self, catalogue: Catalogue, open_indexes: Opener) -> None:
        indexes = open_indexes()
        assert len(indexes.vector) == 0 and len(indexes.local) == 0
        images = commit(catalogue, range(5))
        indexes.add(*index_args(images))
        assert_in_step(indexes, catalogue)
        indexes.add(*index_args(images))  # again: no duplicates
        assert_in_step(indexes, catalogue)
        assert len(indexes.local) == 5 * DESCRIPTORS

        gone = list(images)[1:3]
        for vec_id in gone:
            catalogue.remove_image(images[vec_id].sha256)
        indexes.remove(gone)
        assert_in_step(indexes, catalogue)
        indexes.add([], np.zeros((0, INFO.dim), np.float32), [])
        indexes.remove([])
        assert_in_step(indexes, catalogue)

    def test_apply_changes_of_another_writer(self, catalogue: Catalogue, open_indexes: Opener) -> None:
        images = commit(catalogue, range(4))
        indexes = open_indexes()
        # another process commits three images and deletes one; this one reads the change log
        new = commit(catalogue, range(4, 7))
        gone = next(iter(images))
        catalogue.remove_image(images[gone].sha256)
        vectors_before = sorted(indexes.vector.ids().tolist())
        assert indexes.apply_changes(list(new), [gone]) == (3, 1)
        if indexes.shares_vectors:  # left to the writer, which updates the shared collection itself
            assert sorted(indexes.vector.ids().tolist()) == vectors_before
            ids, vectors, _ = index_args(new)
            indexes.vector.add(np.array(ids, dtype=np.int64), vectors)
            indexes.vector.remove(np.array([gone], dtype=np.int64))
        assert_in_step(indexes, catalogue)
        assert indexes.apply_changes(list(new), [gone]) == (0, 0)  # a row applied twice changes nothing
        # an add whose image was deleted before the replica read it is not added
        late = commit(catalogue, range(7, 8))
        catalogue.remove_image(late[next(iter(late))].sha256)
        assert indexes.apply_changes(list(late), []) == (0, 0)
        assert_in_step(indexes, catalogue)

    def test_reconcile_repairs_what_this_process_keeps(
        self, catalogue: Catalogue, open_indexes: Opener
    ) -> None:
        images = commit(catalogue, range(6))
        indexes = open_indexes()
        ids = list(images)
        stray = synthetic(99)  # an image no longer catalogued (deleted behind this process's back)
        indexes.add([999], stray.embedding[None, :], [OrbFeatures.from_bytes(stray.orb)])
        indexes.vector.remove(np.array(ids[:2], dtype=np.int64))
        indexes.local.remove(ids[2:5])
        vectors_before = sorted(indexes.vector.ids().tolist())
        if indexes.shares_vectors:
            assert indexes.reconcile() == (3, 1)  # the local index's; the shared vectors are its writers'
            assert sorted(indexes.vector.ids().tolist()) == vectors_before
            indexes = open_indexes()  # a start checks the shared collection
        else:
            assert indexes.reconcile() == (2, 1)
        assert_in_step(indexes, catalogue)
        assert indexes.reconcile() == (0, 0)

    def test_rebuild_replaces_both_and_saves_them(
        self, settings: Settings, catalogue: Catalogue, open_indexes: Opener
    ) -> None:
        images = commit(catalogue, range(5))
        indexes = open_indexes()
        indexes.vector.remove(indexes.vector.ids())
        indexes.local.remove(list(images))
        assert indexes.rebuild() == 5
        assert_in_step(indexes, catalogue)
        saved = LocalIndex.open(settings.local_index_path, LOCAL_PARAMS, catalogue_identity(catalogue))
        assert saved is not None and saved.held_ids().tolist() == sorted(images)
        if not indexes.shares_vectors:
            assert sorted(FaissIndex.open(settings.index_path, INFO).ids().tolist()) == sorted(images)
        # a start told to rebuild does not read the files
        open_indexes.close()
        settings.local_index_path.write_bytes(b"not an index")
        if not indexes.shares_vectors:
            settings.index_path.write_bytes(b"not an index")
        assert_in_step(open_indexes(rebuild=True), catalogue)
        assert LocalIndex.open(settings.local_index_path, LOCAL_PARAMS, catalogue_identity(catalogue))

    def test_maintain_rebuilds_a_worn_vector_index(self, catalogue: Catalogue, open_indexes: Opener) -> None:
        images = commit(catalogue, range(40))
        indexes = open_indexes()
        gone = list(images)[::2]
        for vec_id in gone:
            catalogue.remove_image(images[vec_id].sha256)
        indexes.remove(gone)
        if indexes.shares_vectors:  # Milvus compacts its deletes itself
            assert not indexes.maintain()
        else:
            assert isinstance(indexes.vector, FaissIndex) and indexes.vector.tombstones == 20
            assert indexes.maintain()
            assert indexes.vector.tombstones == 0
            assert not indexes.maintain()
        assert_in_step(indexes, catalogue)

    def test_relearn_if_outgrown(self, settings: Settings, catalogue: Catalogue, open_indexes: Opener) -> None:
        commit(catalogue, range(6))
        opened = open_indexes()
        small = LocalIndexParams(per_image=500, code_bytes=16, knn=10, max_distance=24, nprobe=16, flat_below=1000,
                                 cell_lists=16)
        indexes = DerivedIndexes(catalogue, opened.vector, LocalIndex(small), shares_vectors=opened.shares_vectors)
        assert indexes.reconcile() == ((6, 0) if indexes.shares_vectors else (0, 0))  # the vectors were held
        assert_in_step(indexes, catalogue)
        assert not indexes.local.is_inverted_file
        assert indexes.relearn_if_outgrown()  # 1,200 codes added one image at a time, none learned from
        assert indexes.local.is_inverted_file
        assert not indexes.relearn_if_outgrown()
        assert_in_step(indexes, catalogue)
        indexes.add(*index_args(commit(catalogue, range(6, 18))))  # tripled: not yet the growth that relearns
        assert not indexes.relearn_if_outgrown()
        indexes.add(*index_args(commit(catalogue, range(18, 24))))  # 4x the codes the lists were learned from
        with ThreadPoolExecutor(2) as both:  # two writers see the same growth: one relearn
            relearned = list(both.map(lambda _: indexes.relearn_if_outgrown(), range(2)))
        assert sorted(relearned) == [False, True]
        assert not indexes.relearn_if_outgrown()
        assert_in_step(indexes, catalogue)
