"""The local-feature index on disk: reopened with the same votes, brought in step with a catalogue that changed
while the app was down, rebuilt when its file is corrupt, stale or another catalogue's; bounded training."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from conftest import ImageServer, crop, encode, ingest, resize

from pictrace.config import Settings
from pictrace.features.orb import OrbFeatures, extract_orb
from pictrace.gallery import load_gallery
from pictrace.indexes.local import LocalIndex, LocalIndexCorruptError, LocalIndexParams, local_index_params
from pictrace.indexes.local.lists import train_lists
from pictrace.ingest import IngestProgress
from pictrace.service import Service
from pictrace.store import Catalogue
from pictrace.tuning import Tuning

T = TypeVar("T")

NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick"]


def _params(flat_below: int, train_max: int = 262_144) -> LocalIndexParams:
    return LocalIndexParams(
        per_image=500, code_bytes=16, knn=10, max_distance=24, nprobe=16, flat_below=flat_below, train_max=train_max,
        cell_lists=16,
    )


@pytest.fixture(scope="module")
def orbs(photos: dict[str, np.ndarray]) -> dict[str, OrbFeatures]:
    return {name: extract_orb(photos[name]) for name in NAMES}


@pytest.fixture(scope="module")
def queries(photos: dict[str, np.ndarray]) -> list[OrbFeatures]:
    return [extract_orb(resize(crop(photos[name], 0.6, 0.2), 0.7)) for name in NAMES]


def _same_votes(a: LocalIndex, b: LocalIndex, queries: list[OrbFeatures]) -> None:
    for query in queries:
        va, vb = a.vote(query), b.vote(query)
        assert va.counts == vb.counts
        assert np.array_equal(va.rows, vb.rows) and np.array_equal(va.keypoints, vb.keypoints)


@pytest.mark.parametrize("flat_below", [10**9, 1000], ids=["exact", "inverted-file"])
def test_saved_index_reopens_with_identical_votes(
    tmp_path: Path, orbs: dict[str, OrbFeatures], queries: list[OrbFeatures], flat_below: int
) -> None:
    built = LocalIndex.build(_params(flat_below), ((i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)))
    path = tmp_path / "local.faiss"
    assert built.save(path, "cat-1")
    assert not built.save(path, "cat-1")  # nothing changed since: not written again
    reopened = LocalIndex.open(path, _params(flat_below), "cat-1")
    assert reopened is not None
    assert reopened.is_inverted_file == built.is_inverted_file == (flat_below == 1000)
    assert len(reopened) == len(built) and reopened.held_ids().tolist() == list(range(1, len(NAMES) + 1))
    assert reopened.needs_training() == built.needs_training()
    _same_votes(built, reopened, queries)
    # it keeps working as an index: removes and adds after the reopen
    reopened.remove([3])
    assert 3 not in reopened.vote(orbs["coffee"]).counts
    reopened.add(3, orbs["coffee"])
    assert reopened.vote(orbs["coffee"]).top(1) == [3]


def test_other_build_settings_or_another_catalogue_are_not_reused(
    tmp_path: Path, orbs: dict[str, OrbFeatures]
) -> None:
    path = tmp_path / "local.faiss"
    LocalIndex.build(_params(1000), [(1, orbs["coffee"].to_bytes()), (2, orbs["rocket"].to_bytes())]).save(
        path, "cat-1"
    )
    assert LocalIndex.open(path, _params(1000), "cat-2") is None
    assert LocalIndex.open(path, _params(2000), "cat-1") is None
    assert LocalIndex.open(path, LocalIndexParams(500, 8, 10, 24, 16, 1000, cell_lists=16), "cat-1") is None
    assert LocalIndex.open(path, LocalIndexParams(500, 16, 10, 24, 16, 1000, cell_lists=8), "cat-1") is None
    query_time = LocalIndexParams(
        500, 16, knn=3, max_distance=10, nprobe=4, flat_below=1000, cell_lists=16, top_probe=1
    )
    reopened = LocalIndex.open(path, query_time, "cat-1")  # knn, distance, nprobe, top_probe apply to a saved index
    assert reopened is not None and reopened.params == query_time
    assert reopened.vote(orbs["rocket"]).top(1) == [2]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_a_damaged_file_is_detected(tmp_path: Path, orbs: dict[str, OrbFeatures], damage: str) -> None:
    path = tmp_path / "local.faiss"
    LocalIndex.build(_params(1000), ((i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1))).save(path, "c")
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "flip":
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :]
    elif damage == "garbage":
        data = os.urandom(4096)
    else:
        data = b""
    path.write_bytes(data)
    with pytest.raises(LocalIndexCorruptError):
        LocalIndex.open(path, _params(1000), "c")


def test_capped_training_sample_is_still_order_independent(
    orbs: dict[str, OrbFeatures], queries: list[OrbFeatures]
) -> None:
    """Lists learned from a capped sample (1,024 of ~4,000 codes) come out the same whatever the arrival order,
    and still find each query's source image."""
    blobs = [(i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)]
    forward = LocalIndex.build(_params(1000, train_max=1024), blobs)
    backward = LocalIndex.build(_params(1000, train_max=1024), reversed(blobs))
    assert forward.is_inverted_file and backward.is_inverted_file
    _same_votes(forward, backward, queries)
    for i, query in enumerate(queries[:4], 1):
        assert forward.vote(query).top(1) == [i]


def test_training_is_binary_k_means() -> None:
    """Two well-separated groups of codes: each centre ends up the majority code of one group."""
    rng = np.random.default_rng(7)
    centres = rng.integers(0, 256, (2, 16), dtype=np.uint8)
    bits = np.unpackbits(centres, axis=1)
    noisy = np.repeat(bits, 200, axis=0) ^ (rng.random((400, 128)) < 0.05).astype(np.uint8)
    sample = np.packbits(noisy, axis=1)[rng.permutation(400)]
    learned = train_lists(sample, 2, 10)
    assert sorted(map(bytes, learned)) == sorted(map(bytes, centres))
    assert np.array_equal(train_lists(sample, 2, 10), learned)


# --- through the service: start, ingest, restart -------------------------------------------------------


def _write_db(settings: Settings, server: ImageServer, photos: dict[str, np.ndarray], names: list[str]) -> None:
    entries = [{"id": n, "url": server.add(f"{n}.jpg", encode(photos[n]))} for n in names]
    settings.db.write_text(json.dumps(entries))


def _fresh(settings: Settings, service: Service) -> LocalIndex:
    return LocalIndex.build(local_index_params(Tuning().local), service.catalogue.orb_blobs())


async def test_the_service_reopens_the_saved_index(
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    queries: list[OrbFeatures],
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    _write_db(settings, image_server, photos, ["coffee", "rocket", "chelsea"])
    await ingest(settings)
    assert settings.local_index_path.exists()
    written = settings.local_index_path.stat().st_mtime_ns
    service = await Service.start(settings)
    try:
        assert service.indexes.local.held_ids().tolist() == sorted(service.catalogue.vec_ids().tolist())
        _same_votes(service.indexes.local, _fresh(settings, service), queries)
    finally:
        await service.close()
    assert settings.local_index_path.stat().st_mtime_ns == written  # reopened and unchanged: not rewritten


async def test_a_stale_file_is_brought_in_step_with_the_catalogue(
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    queries: list[OrbFeatures],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """The catalogue changed while the app was down (an ingest that kept no local index): the saved index is
    reopened, loses the deleted image, gains the added ones."""
    settings = make_settings()
    _write_db(settings, image_server, photos, ["coffee", "rocket"])
    await ingest(settings)
    old = settings.local_index_path.read_bytes()
    _write_db(settings, image_server, photos, ["coffee", "chelsea", "astronaut"])
    await ingest(settings)
    settings.local_index_path.write_bytes(old)  # as if the app had been down during that second ingest
    service = await Service.start(settings)
    try:
        wanted = sorted(service.catalogue.vec_ids().tolist())
        assert len(wanted) == 3 and service.indexes.local.held_ids().tolist() == wanted
        _same_votes(service.indexes.local, _fresh(settings, service), queries)
        assert all(m.id != "rocket" for m in service.searcher.search_bytes(encode(photos["rocket"])).results)
    finally:
        await service.close()
    assert settings.local_index_path.read_bytes() != old  # the brought-in-step index was saved


async def test_a_corrupt_or_foreign_file_is_rebuilt(
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    queries: list[OrbFeatures],
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings()
    _write_db(settings, image_server, photos, ["coffee", "rocket"])
    await ingest(settings)
    saved = settings.local_index_path.read_bytes()
    settings.local_index_path.write_bytes(saved[: len(saved) // 2])
    service = await _start_expecting_a_rebuild(settings, caplog, "rebuilding it from the catalogue", 2, queries)
    try:
        assert service.searcher.search_bytes(encode(photos["rocket"])).results[0].id == "rocket"
    finally:
        await service.close()
    assert LocalIndex.open(settings.local_index_path, local_index_params(Tuning().local), _catalogue_id(settings))

    # another catalogue (the SQLite file replaced): its vec_ids would mean other images, so the file is not used
    other = make_settings(data_dir=settings.data_dir.parent / "other")
    other.data_dir.mkdir()
    other.local_index_path.write_bytes(settings.local_index_path.read_bytes())
    service = await Service.start(other)
    try:
        assert len(service.indexes.local) == 0
    finally:
        await service.close()


async def _start_expecting_a_rebuild(
    settings: Settings, caplog: pytest.LogCaptureFixture, reason: str, images: int, queries: list[OrbFeatures]
) -> Service:
    """Start on a local-index file that must not be used: the log says why, and the index rebuilt from the
    catalogue holds every image and votes as a fresh one does. The caller closes the service."""
    with caplog.at_level(logging.WARNING, logger="pictrace.indexes.keeper"):
        service = await Service.start(settings)
    try:
        assert any(reason in r.getMessage() for r in caplog.records)
        assert len(service.indexes.local.held_ids()) == images
        _same_votes(service.indexes.local, _fresh(settings, service), queries)
    except BaseException:
        await service.close()
        raise
    return service


def _catalogue_id(settings: Settings) -> str:
    found = _read_catalogue(settings, lambda catalogue: catalogue.get_meta("catalogue_id"))
    assert found is not None
    return found


def _read_catalogue(settings: Settings, read: Callable[[Catalogue], T]) -> T:
    catalogue = Catalogue(settings.catalogue_path)
    try:
        return read(catalogue)
    finally:
        catalogue.close()


def _write_older_format(path: Path, catalogue_id: str, blobs: list[tuple[int, bytes]]) -> None:
    """A file as the previous release wrote it: magic 1, an inverted file whose quantizer is one flat list of
    centres, parameters without the two-level ones."""
    import faiss

    from pictrace.indexes.storage import write_framed

    ids = np.concatenate([(np.int64(v) << 14) | np.arange(500, dtype=np.int64) for v, _ in blobs])
    codes = np.concatenate([OrbFeatures.from_bytes(b).descriptors[:500, :16] for _, b in blobs])
    quantizer = faiss.IndexBinaryFlat(128)
    quantizer.add(np.ascontiguousarray(codes[:64]))
    ivf = faiss.IndexBinaryIVF(quantizer, 128, 64)
    ivf.train(np.ascontiguousarray(codes[:1]))
    ivf.add_with_ids(np.ascontiguousarray(codes), ids)
    old_params = {"per_image": 500, "code_bytes": 16, "flat_below": 50_000, "train_max": 262_144,
                  "max_lists": 65_536, "train_iterations": 10}
    header = {"params": old_params, "catalogue": catalogue_id, "trained_on": len(ids), "held": len(blobs),
              "codes": len(ids)}
    held = np.array([v for v, _ in blobs], dtype=np.int64)
    with path.open("wb") as handle:
        write_framed(handle, b"PICTRACE-LOCAL-1\n", b"PICTRACE-END\n", header, held,
                     lambda writer: faiss.write_index_binary(ivf, writer))


async def test_a_file_in_the_older_format_is_stale_and_rebuilt(
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    queries: list[OrbFeatures],
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file from before the two-level quantizer is stale, not damaged: skipped unread and rebuilt."""
    settings = make_settings()
    _write_db(settings, image_server, photos, ["coffee", "rocket", "chelsea"])
    await ingest(settings)
    catalogue_id = _catalogue_id(settings)
    blobs = _read_catalogue(settings, lambda catalogue: list(catalogue.orb_blobs()))
    _write_older_format(settings.local_index_path, catalogue_id, blobs)
    assert LocalIndex.open(settings.local_index_path, local_index_params(Tuning().local), catalogue_id) is None
    service = await _start_expecting_a_rebuild(settings, caplog, "in an older format", 3, queries)
    await service.close()
    reopened = LocalIndex.open(settings.local_index_path, local_index_params(Tuning().local), catalogue_id)
    assert reopened is not None and len(reopened) == len(service.indexes.local)  # saved again, in today's format


async def test_reindex_rebuilds_the_local_index_too(
    image_server: ImageServer, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    _write_db(settings, image_server, photos, ["coffee", "rocket"])
    await ingest(settings)
    settings.local_index_path.write_bytes(b"will be replaced")
    service = await Service.start(settings, rebuild_index=True)
    await service.close()
    assert LocalIndex.open(settings.local_index_path, local_index_params(Tuning().local), _catalogue_id(settings))


async def test_persisting_can_be_turned_off(
    image_server: ImageServer, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    _write_db(settings, image_server, photos, ["coffee"])
    await ingest(settings, Tuning().replace(local={"persist": False}))
    assert not settings.local_index_path.exists()


@pytest.mark.parametrize(
    ("changes", "mid_run"),
    [
        ({"ingest": {"checkpoint_s": 0}}, "some"),  # saved after every batch
        ({"local": {"flat_below": 1000}}, "lists"),  # lists learned mid-run are saved at once
        ({}, "none"),  # neither: the file is the one the start wrote, until the run ends
    ],
    ids=["checkpoint", "relearn", "neither"],
)
async def test_a_long_ingest_saves_the_local_index_as_it_goes(
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    make_settings: Callable[..., Settings],
    changes: dict[str, dict[str, object]],
    mid_run: str,
) -> None:
    """What a run killed outright would leave for the next start: the images of its last checkpoint, and any lists
    learned since, instead of a rebuild of everything from the catalogue."""
    settings = make_settings()
    _write_db(settings, image_server, photos, NAMES)
    tuning = Tuning().replace(ingest={"embed_batch": 2}).replace(**changes)
    params = local_index_params(tuning.local)
    seen: list[tuple[int, int, bool]] = []  # (images done, images the saved file holds, whether it has lists)
    service = await Service.start(settings, tuning=tuning)
    catalogue_id = service.catalogue.get_meta("catalogue_id")
    assert catalogue_id is not None

    def on_progress(progress: IngestProgress) -> None:
        saved = LocalIndex.open(settings.local_index_path, params, catalogue_id)
        assert saved is not None
        seen.append((progress.done, len(saved.held_ids()), saved.is_inverted_file))

    try:
        report = await service.ingestor.ingest_gallery(load_gallery(settings.db), on_progress)
    finally:
        await service.close()
    assert report.added == len(NAMES)
    during = [(held, lists) for done, held, lists in seen if done < len(NAMES)]
    assert during
    if mid_run == "none":
        assert all(held == 0 for held, _ in during)
    else:
        assert any(0 < held < len(NAMES) for held, _ in during)
    if mid_run == "lists":
        assert any(lists for held, lists in during if held)
    final = LocalIndex.open(settings.local_index_path, params, catalogue_id)
    assert final is not None and len(final.held_ids()) == len(NAMES)
