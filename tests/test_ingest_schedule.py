"""The ingest's schedule: batches overlap on the pool, yet give what one thread would, and progress stays true."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import crop, encode, resize

from pictrace.config import Settings
from pictrace.gallery import load_gallery
from pictrace.ingest import IngestProgress
from pictrace.ingest_schedule import IngestSchedule
from pictrace.service import Service
from pictrace.tuning import Tuning
from pictrace.work import WorkPool

# small batches, so that several are in flight; lists learned at 1,500 codes (~3 images), so that a 20-image
# ingest learns them and then relearns them once it has grown 4x
TUNING = Tuning().replace(ingest={"embed_batch": 4}, local={"flat_below": 1500})
LEARNED = re.compile(r"(\d+) codes added")  # each build of the lists, with the codes it filed


def write_gallery(root: Path, photos: dict[str, np.ndarray]) -> Path:
    """Six photos, each also cropped and shrunk (links to find), the bytes of one twice, one broken file."""
    (root / "g").mkdir()
    entries = []
    for name in ["astronaut", "chelsea", "coffee", "rocket", "camera", "brick"]:
        for edit, rgb in [("", photos[name]), ("-crop", crop(photos[name])), ("-small", resize(photos[name], 0.5))]:
            (root / "g" / f"{name}{edit}.jpg").write_bytes(encode(rgb))
            entries.append({"id": f"{name}{edit}", "url": f"g/{name}{edit}.jpg"})
        if name == "coffee":
            (root / "g" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
            entries.append({"id": "broken", "url": "g/broken.jpg"})
    (root / "g" / "again.jpg").write_bytes((root / "g" / "chelsea.jpg").read_bytes())  # same bytes, other file
    entries.append({"id": "again", "url": "g/again.jpg"})
    db = root / "db.json"
    db.write_text(json.dumps(entries))
    return db


def stored(settings: Settings) -> dict[str, object]:
    """Everything an ingest leaves in the catalogue, by content (vec_ids included: commit order)."""
    conn = sqlite3.connect(settings.catalogue_path)
    try:
        sha = dict(conn.execute("SELECT vec_id, sha256 FROM images").fetchall())
        return {
            "images": sorted(conn.execute("SELECT vec_id, sha256, pixel_sha256, width, height FROM images")),
            "embeddings": sorted(conn.execute("SELECT vec_id, embedding FROM images")),
            "sources": sorted(conn.execute("SELECT url, sha256, status FROM sources")),
            "links": sorted((sha[a], sha[b], n, t, c, f) for a, b, n, t, c, f in conn.execute(
                "SELECT vec_id, other, inliers, tier, cosine, fit FROM links WHERE vec_id != other")),
            "linked": sorted(sha[v] for (v,) in conn.execute("SELECT vec_id FROM links WHERE vec_id = other")),
        }
    finally:
        conn.close()


async def ingest_with(
    settings: Settings, on_progress: Callable[[IngestProgress], None] | None = None
) -> tuple[dict[str, object], dict[str, object]]:
    service = await Service.start(settings, tuning=TUNING)
    try:
        report = await service.ingestor.ingest_gallery(load_gallery(settings.db), on_progress)
        local = service.indexes.local
        query = service.catalogue.orb_blobs_of([1])
        from pictrace.features.orb import OrbFeatures

        votes = local.vote(OrbFeatures.from_bytes(dict(query)[1])).top(10, 1)
        index = {
            "held": local.held_ids().tolist(),
            "inverted": local.is_inverted_file,
            "votes": votes,
            "report": (report.added, report.duplicates, [(f.url, f.reason) for f in report.failed]),
            "unlinked": service.catalogue.unlinked(),
        }
    finally:
        await service.close()
    return stored(settings), index


async def test_one_worker_or_two_store_the_same_catalogue_links_and_index(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = write_gallery(tmp_path, photos)
    caplog.set_level(logging.INFO, logger="pictrace.indexes.local.index")
    runs = []
    learned: list[list[int]] = []
    for workers in (1, 2):
        caplog.clear()
        # one fetcher: the images arrive in the gallery's order, which is what makes the run repeatable
        settings = make_settings(data_dir=tmp_path / f"data-{workers}", db=db, workers=workers, fetch_concurrency=1)
        runs.append(await ingest_with(settings))
        learned.append([int(m.group(1)) for r in caplog.records if (m := LEARNED.search(r.getMessage()))])
    (catalogue_1, index_1), (catalogue_2, index_2) = runs
    assert catalogue_1 == catalogue_2
    assert index_1 == index_2
    added, duplicates, failed = index_1["report"]  # type: ignore[misc]
    assert (added, duplicates) == (18, 1)
    assert [url for url, _ in failed] == ["g/broken.jpg"]
    assert index_1["inverted"] and index_1["unlinked"] == []
    assert len(catalogue_1["linked"]) == 18  # type: ignore[arg-type]
    links = {(a, b) for a, b, *_ in catalogue_1["links"]}  # type: ignore[attr-defined]
    assert len(links) >= 12  # each crop and each small copy found its photo, both ways
    # the lists: learned once the exact scan passed 1,500 codes, relearned once at 4x that, never twice
    assert learned[0] == learned[1]
    first, *later = learned[0]
    assert first >= 1500 and len(later) == 1
    assert later[0] >= 4 * first
    assert len(index_1["held"]) == 18  # type: ignore[arg-type]


async def test_progress_adds_up_while_images_are_linked(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(db=write_gallery(tmp_path, photos))
    seen: list[tuple[int, int, int, int, int]] = []

    def on_progress(p: IngestProgress) -> None:
        seen.append((p.total, p.done, p.failed, p.linking, p.pending))

    service = await Service.start(settings, tuning=TUNING)
    try:
        report = await service.ingestor.ingest_gallery(load_gallery(settings.db), on_progress)
        final = service.ingestor.progress
    finally:
        await service.close()
    total = len(json.loads(settings.db.read_text()))
    assert [s[1] for s in seen] == sorted(s[1] for s in seen)  # done only grows
    for t, done, _failed, linking, pending in seen:
        assert t == total and 0 < done <= total
        assert pending == total - done + linking  # what is not stored yet, and what is stored but not linked
    assert any(linking > 0 for *_, linking, _ in seen)  # each batch is reported stored before it is linked
    assert seen[-1][1] == total and seen[-1][2] == 1
    assert (final.done, final.failed, final.linking, final.pending, final.running) == (total, 1, 0, 0, False)
    assert report.added == 18


async def test_an_image_failing_mid_batch_costs_only_itself_and_the_next_run_resumes(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    """A broken file among good ones in the same batch: recorded as failed, the others stored and linked; fixed,
    it is the only thing the next run does."""
    settings = make_settings(db=write_gallery(tmp_path, photos))
    service = await Service.start(settings, tuning=TUNING)
    try:
        report = await service.ingestor.ingest_gallery(load_gallery(settings.db))
        assert [f.url for f in report.failed] == ["g/broken.jpg"]
        (tmp_path / "g" / "broken.jpg").write_bytes(encode(crop(photos["coffee"], 0.5, 0.2)))
        again = await service.ingestor.ingest_gallery(load_gallery(settings.db))
        assert (again.added, again.unchanged, again.failed) == (1, 19, [])
        assert service.catalogue.unlinked() == []
        assert service.catalogue.counts()[0] == len(service.indexes.local.held_ids()) == 19
    finally:
        await service.close()


# --- the schedule itself, with jobs that only record what ran when ----------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, int] = {"early": 0, "late": 0}
        self.most: dict[str, int] = {"early": 0, "late": 0}
        self.late_order: list[int] = []

    def enter(self, part: str) -> None:
        with self.lock:
            self.running[part] += 1
            self.most[part] = max(self.most[part], self.running[part])

    def leave(self, part: str) -> None:
        with self.lock:
            self.running[part] -= 1


async def numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@pytest.mark.parametrize("workers", [1, 2])
async def test_late_parts_run_in_order_one_at_a_time_while_early_parts_overlap(workers: int) -> None:
    pool = WorkPool(workers, 100)
    record = Recorder()
    schedule: IngestSchedule[int, int] = IngestSchedule(pool, width=workers, ahead=3)

    def work(i: int) -> int:
        time.sleep(0.002 * (7 - i % 7))  # later batches often finish their early part first
        return i

    async def early(i: int) -> int:
        record.enter("early")
        try:
            return sum(await schedule.each(work, [i, i, i])) // 3
        finally:
            record.leave("early")

    async def late(i: int) -> None:
        record.enter("late")
        try:
            await schedule.one(work, i)
            record.late_order.append(i)
        finally:
            record.leave("late")

    try:
        await schedule.flow(numbers(20), early, late)
    finally:
        pool.shutdown()
    assert record.late_order == list(range(20))
    assert record.most["late"] == 1
    assert 1 <= record.most["early"] <= 3


async def test_an_error_stops_the_flow_and_is_raised() -> None:
    pool = WorkPool(2, 100)
    schedule: IngestSchedule[int, int] = IngestSchedule(pool, width=2, ahead=3)
    done: list[int] = []

    async def early(i: int) -> int:
        if i == 5:
            raise ValueError("batch 5 broke")
        return i

    async def late(i: int) -> None:
        await asyncio.sleep(0)
        done.append(i)

    try:
        with pytest.raises(ValueError, match="batch 5 broke"):
            await schedule.flow(numbers(50), early, late)
    finally:
        pool.shutdown()
    assert done == list(range(len(done))) and len(done) <= 5
