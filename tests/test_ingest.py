"""Ingest of a gallery served over real HTTP: failures reported and skipped, work done once, restart-safe."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ImageServer, encode, ingest

from pictrace.config import Settings
from pictrace.service import Service


def write_db(path: Path, entries: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def served_gallery(image_server: ImageServer, photos: dict[str, np.ndarray]) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        entries.append(
            {"id": name, "url": image_server.add(f"img/{name}.jpg", encode(photos[name])), "kind": "photo"}
        )
    image_server.add("img/notes.txt", b"this is not an image at all")
    entries.append({"id": "missing", "url": image_server.url("img/missing.jpg")})
    entries.append({"id": "slow", "url": image_server.url("slow/late.jpg")})
    entries.append({"id": "text", "url": image_server.url("img/notes.txt")})
    entries.append({"id": "bad-entry"})
    return entries


async def test_ingest_reports_and_skips_failures(
    served_gallery: list[dict[str, object]], make_settings: Callable[..., Settings], image_server: ImageServer
) -> None:
    settings = make_settings(fetch_timeout_s=1.0, fetch_retries=0)
    image_server.add("slow/late.jpg", b"too late")
    write_db(settings.db, served_gallery)
    report = await ingest(settings)
    assert report.added == 4
    failed = {f.position: f.reason for f in report.failed}
    assert set(failed) == {4, 5, 6}
    assert "404" in failed[4]
    assert "tim" in failed[5].lower()  # timed out / timeout
    assert "image" in failed[6].lower()
    assert [f.position for f in report.invalid] == [7]


async def test_restart_downloads_nothing_and_failures_are_retried(
    served_gallery: list[dict[str, object]], make_settings: Callable[..., Settings], image_server: ImageServer
) -> None:
    settings = make_settings(fetch_timeout_s=1.0, fetch_retries=0)
    write_db(settings.db, served_gallery)
    first = await ingest(settings)
    assert first.added == 4
    hits_after_first = dict(image_server.hits)
    # the missing image appears: the next run fetches it, and only it
    image_server.add("img/missing.jpg", encode(np.full((64, 64, 3), (200, 30, 30), np.uint8)))
    second = await ingest(settings)
    assert second.unchanged == 4 and second.added == 1
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        assert image_server.hits[f"/img/{name}.jpg"] == hits_after_first[f"/img/{name}.jpg"] == 1
    assert image_server.hits["/img/missing.jpg"] == hits_after_first["/img/missing.jpg"] + 1


async def test_same_bytes_stored_once(
    image_server: ImageServer, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    data = encode(photos["coffee"])
    write_db(
        settings.db,
        [
            {"id": "a", "url": image_server.add("a.jpg", data)},
            {"id": "b", "url": image_server.add("b.jpg", data)},
        ],
    )
    report = await ingest(settings)
    assert report.added == 1 and report.duplicates == 1
    service = await Service.start(settings)
    try:
        assert service.catalogue.counts() == (1, 0)
        assert len(service.indexes.vector) == 1
    finally:
        await service.close()


async def test_removed_entries_leave_the_index(
    image_server: ImageServer, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    entries = [
        {"id": n, "url": image_server.add(f"{n}.jpg", encode(photos[n]))} for n in ("coffee", "rocket")
    ]
    write_db(settings.db, entries)
    await ingest(settings)
    write_db(settings.db, entries[:1])
    report = await ingest(settings)
    assert report.removed == 1 and report.unchanged == 1
    service = await Service.start(settings)
    try:
        assert len(service.indexes.vector) == 1
        result = service.searcher.search_bytes(encode(photos["rocket"]))
        assert all(m.id != "rocket" for m in result.results)
    finally:
        await service.close()


async def test_local_paths_relative_to_db_json(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "chelsea.png").write_bytes(encode(photos["chelsea"], "PNG"))
    write_db(settings.db, [{"url": "pics/chelsea.png"}, {"url": "pics/nope.png"}])
    report = await ingest(settings)
    assert report.added == 1
    assert "not found" in report.failed[0].reason


async def test_lost_index_is_rebuilt_from_catalogue(
    image_server: ImageServer, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    write_db(
        settings.db,
        [{"id": n, "url": image_server.add(f"{n}.jpg", encode(photos[n]))} for n in ("coffee", "rocket")],
    )
    await ingest(settings)
    settings.index_path.write_bytes(b"corrupted beyond repair")
    service = await Service.start(settings)
    try:
        assert len(service.indexes.vector) == 2
        assert service.searcher.search_bytes(encode(photos["rocket"])).results[0].id == "rocket"
    finally:
        await service.close()
    settings.index_path.unlink()
    service = await Service.start(settings)
    try:
        assert len(service.indexes.vector) == 2
    finally:
        await service.close()
