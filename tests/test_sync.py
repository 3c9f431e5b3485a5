"""Replicas follow the catalogue's change log: two services on one catalogue, SQLite and PostgreSQL.

The writer adds and removes images through its API path; the replica syncs and finds them, or stops finding
them. Raw SQL behind the log's back shows which path a sync took: the incremental one never looks at images
the log does not name, the full reconcile (the fallback) does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import crop, encode

from pictrace.config import Settings
from pictrace.features.orb import OrbFeatures
from pictrace.indexes.local import LocalIndex, LocalIndexParams
from pictrace.service import Service
from pictrace.store import Change, ChangePosition
from pictrace.sync import covers, net_effect

Pair = tuple[Service, Service]


@pytest.fixture(params=["sqlite", "postgres"])
async def pair(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings], tmp_path: Path
) -> AsyncIterator[Pair]:
    """(writer, replica) on one catalogue; the replica's timer is off, the tests sync it explicitly."""
    if request.param == "sqlite":  # one data dir, so one catalogue file; each keeps its own index in memory
        writer_settings = replica_settings = make_settings(sync_interval_s=0)
    else:
        url = request.getfixturevalue("postgres_url")
        writer_settings = make_settings(database_url=url, data_dir=tmp_path / "writer", sync_interval_s=0)
        replica_settings = make_settings(database_url=url, data_dir=tmp_path / "replica", sync_interval_s=0)
    writer = await Service.start(writer_settings)
    replica = await Service.start(replica_settings)
    try:
        yield writer, replica
    finally:
        await replica.close()
        await writer.close()


async def top_id(service: Service, photo: np.ndarray) -> str | None:
    result = await service.pool.run(service.searcher.search_bytes, encode(crop(photo, 0.7)), 1)
    return result.results[0].id if result.results else None


async def test_replica_applies_only_the_new_log_rows(pair: Pair, photos: dict[str, np.ndarray]) -> None:
    writer, replica = pair
    added = {n: await writer.ingestor.add_image(encode(photos[n]), entry_id=n) for n in ("coffee", "rocket", "coins")}
    assert await replica.sync_now() == (3, 0)
    for name in added:
        assert await top_id(replica, photos[name]) == name
    assert (replica.follower.full_syncs, replica.follower.incremental_syncs) == (0, 1)

    await writer.ingestor.remove_image(added["rocket"].sha256)
    assert await replica.sync_now() == (0, 1)
    assert await top_id(replica, photos["rocket"]) != "rocket"
    assert len(replica.indexes.vector) == 2 and "rocket" not in {
        r.entry_id for r in replica.catalogue.records(replica.indexes.vector.ids().tolist()).values()
    }
    assert await replica.sync_now() == (0, 0)  # nothing new: the counter alone was read

    # coins vanishes behind the log's back (no row, no bump), then the writer adds chelsea the normal way:
    # the incremental sync reads one row and adds chelsea, and never notices coins (it does not scan)
    vec_coins = replica.catalogue.vec_ids_by_hash(added["coins"].sha256, "-")[0]
    with writer.catalogue._transaction() as conn:
        conn.execute("DELETE FROM sources WHERE sha256 = ?", (added["coins"].sha256,))
        conn.execute("DELETE FROM images WHERE sha256 = ?", (added["coins"].sha256,))
    await writer.ingestor.add_image(encode(photos["chelsea"]), entry_id="chelsea")
    local_before = len(replica.indexes.local)
    assert await replica.sync_now() == (1, 0)
    assert replica.follower.incremental_syncs == 3 and replica.follower.full_syncs == 0
    assert await top_id(replica, photos["chelsea"]) == "chelsea"
    assert replica.indexes.vector.contains(np.array([vec_coins])).tolist() == [True]
    assert vec_coins in replica.indexes.local
    assert len(replica.indexes.local) > local_before  # chelsea's codes were added to the structure it already had

    # a writer that does not log (an older PicTrace) moves the counter only: the replica reconciles in full
    with writer.catalogue._transaction() as conn:
        conn.execute("UPDATE changes SET generation = generation + 1 WHERE id = 1")
    assert await replica.sync_now() == (0, 1)
    assert replica.follower.full_syncs == 1
    assert replica.indexes.vector.contains(np.array([vec_coins])).tolist() == [False]
    assert vec_coins not in replica.indexes.local
    assert await top_id(replica, photos["chelsea"]) == "chelsea"


async def test_a_trimmed_log_falls_back_to_the_full_reconcile(pair: Pair, photos: dict[str, np.ndarray]) -> None:
    writer, replica = pair
    await writer.ingestor.add_image(encode(photos["coffee"]), entry_id="coffee")
    assert await replica.sync_now() == (1, 0)
    gone = await writer.ingestor.add_image(encode(photos["brick"]), entry_id="brick")
    await writer.ingestor.add_image(encode(photos["camera"]), entry_id="camera")
    await writer.ingestor.remove_image(gone.sha256)
    assert writer.catalogue.trim_change_log(writer.catalogue.change_position().seq - 1) > 0  # keep the last row
    assert await replica.sync_now() == (1, 0)  # camera added; brick was never seen
    assert replica.follower.full_syncs == 1
    assert await top_id(replica, photos["camera"]) == "camera"
    assert await top_id(replica, photos["brick"]) != "brick"
    await writer.ingestor.add_image(encode(photos["coins"]), entry_id="coins")
    assert await replica.sync_now() == (1, 0)  # and back on the log from the position the reconcile read
    assert (replica.follower.full_syncs, replica.follower.incremental_syncs) == (1, 2)


async def test_own_writes_and_replayed_rows_change_nothing(
    make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    """A process that writes (an ingest worker, an API add on a replica) also follows: its own rows, and rows
    already in the indexes it built at start, are applied again without duplicates or tombstones."""
    settings = make_settings(sync_interval_s=0)
    first = await Service.start(settings)
    try:
        await first.ingestor.add_image(encode(photos["coffee"]), entry_id="coffee")
    finally:
        await first.close()
    service = await Service.start(settings)
    try:
        service.follower.position = None  # reconcile once more at the sync, then replay the log from seq 0
        assert await service.sync_now() == (0, 0)
        service.follower.position = ChangePosition(0, 0)
        await service.ingestor.add_image(encode(photos["rocket"]), entry_id="rocket")
        assert await service.sync_now() == (0, 0)
        assert len(service.indexes.vector) == 2 and service.indexes.vector.tombstones == 0  # type: ignore[attr-defined]
        per_image = service.tuning.local.per_image
        assert len(service.indexes.local) == sum(
            min(len(OrbFeatures.from_bytes(b)), per_image) for _, b in service.catalogue.orb_blobs()
        )
    finally:
        await service.close()


async def test_shared_milvus_replica_follows_with_its_local_index_only(
    make_settings: Callable[..., Settings], tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed: pip install -r requirements-scale.txt")
    settings = make_settings(sync_interval_s=0, milvus_uri=str(tmp_path / "vectors.milvus.db"))
    writer = await Service.start(settings)
    try:
        assert writer.indexes.shares_vectors  # the collection is shared: nothing of the vectors to follow
        await writer.ingestor.add_image(encode(photos["coffee"]), entry_id="coffee")
        writer.indexes.local.remove(writer.catalogue.vec_ids().tolist())  # as if another process had added it
        assert await writer.sync_now() == (1, 0)
        assert await top_id(writer, photos["coffee"]) == "coffee"
    finally:
        await writer.close()


def test_net_effect_and_coverage() -> None:
    log = [Change(1, 10, "add", 5), Change(2, 11, "add", 6), Change(3, 10, "remove", 7), Change(4, 12, "add", 7)]
    assert net_effect(log) == ([11, 12], [10])
    assert covers(log, 4, 7) and covers(log[1:], 5, 7)
    assert not covers(log[1:], 4, 7)  # generation 5's row is gone (trimmed)
    assert not covers(log, 4, 8)  # generation 8 left no row (a writer that does not log)


def test_local_index_adds_and_removes_are_idempotent(photos: dict[str, np.ndarray]) -> None:
    from pictrace.features.orb import extract_orb

    orbs = {n: extract_orb(photos[n]) for n in ("coffee", "rocket", "chelsea")}
    for flat_below in (10**9, 500):  # exact, and an inverted file
        params = LocalIndexParams(per_image=500, code_bytes=16, knn=10, max_distance=24, nprobe=16,
                                  flat_below=flat_below)
        index = LocalIndex.build(params, [(1, orbs["coffee"].to_bytes()), (2, orbs["rocket"].to_bytes())])
        assert index.is_inverted_file == (flat_below == 500)
        size = len(index)
        index.add(1, orbs["coffee"])
        assert len(index) == size
        index.add(3, orbs["chelsea"])
        assert index.remove([1, 3, 99]) == 2 and index.remove([1]) == 0
        assert len(index) == min(len(orbs["rocket"]), 500) and 2 in index and 1 not in index
        assert index.vote(orbs["rocket"]).top(1) == [2] and 1 not in index.vote(orbs["coffee"]).counts
