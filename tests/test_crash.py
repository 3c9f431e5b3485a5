"""Crashes and faults: `kill -9` mid-ingest then a restart, gallery hosts that are down, slow or send garbage,
and a corrupt index file. Each leaves a consistent catalogue and index, and what failed is retried later."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import ImageServer, encode, ingest

from pictrace.config import Settings
from pictrace.decode import decode_image
from pictrace.service import Service

ROOT = Path(__file__).resolve().parent.parent


def picture(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return encode(np.ascontiguousarray(np.kron(small, np.ones((8, 8, 1), np.uint8))))


def catalogue_rows(path: Path) -> dict[str, object]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {
            "integrity": conn.execute("PRAGMA integrity_check").fetchone()[0],
            "images": conn.execute("SELECT COUNT(*) FROM images").fetchone()[0],
            "ok": {r[0] for r in conn.execute("SELECT url FROM sources WHERE status = 'ok'")},
            "orphans": conn.execute(
                "SELECT COUNT(*) FROM images i WHERE NOT EXISTS (SELECT 1 FROM sources s WHERE s.sha256 = i.sha256)"
            ).fetchone()[0],
            "vec_ids": sorted(r[0] for r in conn.execute("SELECT vec_id FROM images")),
        }


def count_images(path: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet, or busy
        return 0


# --- kill -9 in the middle of `python -m pictrace index` -------------------------------------------------


@dataclass
class SlowIngest:
    """`python -m pictrace index` of ``n`` slow images, run until ``signal`` once 4 are stored."""

    command: list[str]
    env: dict[str, str]
    data_dir: Path
    returncode: int
    output: str


def ingest_until_signalled(tmp_path: Path, image_server: ImageServer, n: int, stop: signal.Signals) -> SlowIngest:
    image_server.slow_seconds = 0.4  # every image is slow, so the signal lands half way
    entries = [{"id": f"img-{i}", "url": image_server.add(f"slow/{i}.jpg", picture(i))} for i in range(n)]
    (tmp_path / "db.json").write_text(json.dumps(entries))
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICTRACE_")}
    env.update(PYTHONPATH=str(ROOT), PICTRACE_DATA_DIR=str(data_dir), PICTRACE_FETCH_PER_HOST="2")
    command = [sys.executable, "-m", "pictrace", "index", "db.json", "--quiet"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while count_images(data_dir / "catalogue.sqlite3") < 4:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "ingest made no progress"
            time.sleep(0.05)
        proc.send_signal(stop)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
    return SlowIngest(command, env, data_dir, proc.returncode, output)


def test_kill_9_mid_ingest_then_restart_resumes_consistently(tmp_path: Path, image_server: ImageServer) -> None:
    n = 24
    run = ingest_until_signalled(tmp_path, image_server, n, signal.SIGKILL)
    command, env, data_dir = run.command, run.env, run.data_dir
    assert run.returncode == -signal.SIGKILL

    # what the kill left: whole images only, each with its source; an index file is whole or absent
    after_kill = catalogue_rows(data_dir / "catalogue.sqlite3")
    assert after_kill["integrity"] == "ok"
    assert after_kill["orphans"] == 0
    killed_at = int(after_kill["images"])  # type: ignore[call-overload]
    assert 4 <= killed_at < n, "the kill did not land mid-run"
    committed = set(after_kill["ok"])  # type: ignore[call-overload]
    hits_at_kill = Counter(image_server.hits)

    restart = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert f"added {n - killed_at}," in restart.stdout, restart.stdout
    assert "failed 0" in restart.stdout

    final = catalogue_rows(data_dir / "catalogue.sqlite3")
    assert final["integrity"] == "ok" and final["orphans"] == 0
    assert final["images"] == n and len(final["ok"]) == n  # type: ignore[arg-type]
    # what was committed before the kill was not downloaded again
    for url in committed:
        path = "/" + url.split("/", 3)[3]
        assert image_server.hits[path] == hits_at_kill[path], url
    # the index holds exactly the catalogue's vectors, once each; every image is found by its bytes
    from pictrace.features.embed import build_embedder
    from pictrace.indexes.vector import FaissIndex, IndexInfo

    embedder = build_embedder("efficientnet-lite2", Settings(_env_file=None).model_path, threads=1)
    index = FaissIndex.open(data_dir / "vectors.faiss", IndexInfo(embedder.name, embedder.fingerprint, embedder.dim))
    assert sorted(index.ids().tolist()) == final["vec_ids"]
    assert len(index) == n
    vectors = embedder.embed([decode_image(picture(i), max_pixels=10**6).rgb for i in (0, n - 1)])
    scores, ids = index.search(np.asarray(vectors), 1)
    assert (scores[:, 0] > 0.999).all() and len(set(ids[:, 0].tolist())) == 2


def test_sigterm_mid_ingest_saves_the_indexes_and_the_next_run_goes_on(
    tmp_path: Path, image_server: ImageServer
) -> None:
    """`docker stop` or systemd ends an ingest with SIGTERM: it stops like Ctrl-C, saving the derived indexes of what
    it stored (the default SIGTERM exits at once, without them), and the same command goes on from there."""
    n = 24
    run = ingest_until_signalled(tmp_path, image_server, n, signal.SIGTERM)
    command, env, data_dir = run.command, run.env, run.data_dir
    assert run.returncode == 128 + signal.SIGTERM, run.output
    assert "stopped" in run.output and "Traceback" not in run.output, run.output

    stopped = catalogue_rows(data_dir / "catalogue.sqlite3")
    assert stopped["integrity"] == "ok" and stopped["orphans"] == 0
    assert 4 <= int(stopped["images"]) < n  # type: ignore[call-overload]
    from pictrace.indexes.local import LocalIndex, local_index_params
    from pictrace.tuning import Tuning

    with contextlib.closing(sqlite3.connect(data_dir / "catalogue.sqlite3")) as conn:
        catalogue_id = conn.execute("SELECT value FROM meta WHERE key = 'catalogue_id'").fetchone()[0]
    saved = LocalIndex.open(data_dir / "local.faiss", local_index_params(Tuning().local), catalogue_id)
    assert saved is not None
    held = saved.held_ids().tolist()
    assert len(held) >= 4 and set(held) <= set(stopped["vec_ids"])  # type: ignore[call-overload]

    # the pairs its images' arrival missed were to be matched at its end: the next run matches them again
    assert meta_value(data_dir, "unsettled-after") == "0"
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"added {n - int(stopped['images'])}," in again.stdout, again.stdout  # type: ignore[call-overload]
    assert catalogue_rows(data_dir / "catalogue.sqlite3")["images"] == n
    assert f"matching again the {stopped['images']} images of a run that stopped" in again.stderr, again.stderr
    assert meta_value(data_dir, "unsettled-after") is None


def meta_value(data_dir: Path, key: str) -> str | None:
    with contextlib.closing(sqlite3.connect(data_dir / "catalogue.sqlite3")) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


# --- gallery hosts that are down, slow or send garbage -------------------------------------------------


class FaultyGallery:
    """/good/* serves images; /slowloris/* sends a byte every 0.2 s; /garbage/* sends noise as image/jpeg.
    ``fixed`` turns every path into a good image (the host recovered)."""

    def __init__(self) -> None:
        self.fixed = False
        self.hits: Counter[str] = Counter()
        self.images: dict[str, bytes] = {}
        gallery = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                gallery.hits[self.path] += 1
                body = gallery.images.get(self.path, b"")
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    if self.path.startswith("/slowloris/") and not gallery.fixed:
                        self.send_header("Content-Length", "100000")
                        self.end_headers()
                        for _ in range(100):
                            self.wfile.write(b"\xff")
                            self.wfile.flush()
                            time.sleep(0.2)
                        return
                    if self.path.startswith("/garbage/") and not gallery.fixed:
                        body = np.random.default_rng(5).bytes(3000)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, data: bytes) -> str:
        self.images[path] = data
        return self.base + path


@pytest.fixture
def faulty() -> Iterator[FaultyGallery]:
    server = FaultyGallery()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@contextlib.contextmanager
def down_host() -> Iterator[int]:
    """A port that refuses connections: bound, never listening (so nobody else takes it meanwhile)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_faulty_hosts_cost_only_their_entries_and_are_retried(
    faulty: FaultyGallery, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(fetch_timeout_s=1.0, fetch_retries=0)
    with down_host() as port:
        down_url = f"http://127.0.0.1:{port}/down/a.jpg"
        entries = [{"id": f"good-{i}", "url": faulty.add(f"/good/{i}.jpg", picture(100 + i))} for i in range(4)]
        entries += [
            {"id": "down", "url": down_url},
            {"id": "slowloris", "url": faulty.add("/slowloris/s.jpg", picture(200))},
            {"id": "garbage", "url": faulty.add("/garbage/g.jpg", picture(201))},
        ]
        settings.db.write_text(json.dumps(entries))
        started = time.monotonic()
        report = await ingest(settings)
        assert time.monotonic() - started < 30
        assert report.added == 4
        reasons = {f.url: f.reason.lower() for f in report.failed}
        assert set(reasons) == {down_url, entries[5]["url"], entries[6]["url"]}
        assert "connect" in reasons[down_url]
        assert "timed out" in reasons[str(entries[5]["url"])]
        assert "not a supported image" in reasons[str(entries[6]["url"])]
        rows = catalogue_rows(settings.catalogue_path)
        assert rows["images"] == 4 and rows["orphans"] == 0
        with contextlib.closing(sqlite3.connect(settings.catalogue_path)) as conn:
            recorded = dict(conn.execute("SELECT url, error FROM sources WHERE status = 'failed'").fetchall())
        assert {k: v.lower() for k, v in recorded.items()} == reasons

    # the hosts recover: the next ingest retries exactly those entries, and only those
    faulty.fixed = True
    faulty.add("/down/a.jpg", picture(202))
    server = ThreadingHTTPServer(("127.0.0.1", port), faulty.httpd.RequestHandlerClass)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hits_before = Counter(faulty.hits)
        second = await ingest(settings)
    finally:
        server.shutdown()
        server.server_close()
    assert second.added == 3 and second.unchanged == 4 and second.failed == []
    for i in range(4):
        assert faulty.hits[f"/good/{i}.jpg"] == hits_before[f"/good/{i}.jpg"] == 1
    assert faulty.hits["/down/a.jpg"] == 1 and faulty.hits["/garbage/g.jpg"] == 2
    assert catalogue_rows(settings.catalogue_path)["images"] == 7


# --- a corrupt index file ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip a byte", "header only"])
async def test_corrupt_index_is_detected_and_rebuilt(
    damage: str, tmp_path: Path, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings()
    (tmp_path / "pics").mkdir()
    for i in range(3):
        (tmp_path / "pics" / f"{i}.jpg").write_bytes(picture(300 + i))
    settings.db.write_text(json.dumps([{"url": f"pics/{i}.jpg"} for i in range(3)]))
    assert (await ingest(settings)).added == 3
    raw = bytearray(settings.index_path.read_bytes())
    if damage == "flip a byte":
        raw[-100] ^= 0xFF
    else:
        raw = raw[: raw.index(b"\n", 20) + 1]
    settings.index_path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="pictrace.indexes.keeper"):
        service = await Service.start(settings)
    try:
        assert any("rebuilding it from the catalogue" in r.getMessage() for r in caplog.records)
        assert len(service.indexes.vector) == 3
        assert service.searcher.search_bytes(picture(301)).results[0].exact
    finally:
        await service.close()


# --- a failure inside the ingest's link stage ---------------------------------------------------------------


async def test_a_failing_link_stage_ends_the_ingest_with_its_error(
    tmp_path: Path, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    """A stored image whose keypoints no longer read (a damaged catalogue row) fails the links of the images
    that match it. The ingest must stop with that error, not wait for ever: the fetchers, far ahead, had
    filled their queue and waited to put their end mark in it, and no one read the queue any more."""
    from conftest import crop, resize

    from pictrace.tuning import Tuning

    settings = make_settings()
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "original.jpg").write_bytes(encode(photos["astronaut"]))
    settings.db.write_text(json.dumps([{"url": "pics/original.jpg"}]))
    assert (await ingest(settings)).added == 1
    with contextlib.closing(sqlite3.connect(settings.catalogue_path)) as conn, conn:
        conn.execute("UPDATE images SET orb = ?", (b"ORB2-damaged",))
    entries = [{"url": "pics/original.jpg"}]
    for i in range(12):  # copies of the damaged image: each one's links read its keypoints
        name = f"copy{i}.jpg"
        (tmp_path / "pics" / name).write_bytes(encode(resize(crop(photos["astronaut"], 0.9 - 0.02 * i), 0.8)))
        entries.append({"url": f"pics/{name}"})
    settings.db.write_text(json.dumps(entries))
    small_batches = Tuning.model_validate({"ingest": {"embed_batch": 2, "batches_in_flight": 1}})  # a queue of 4
    run = asyncio.create_task(ingest(settings, small_batches))
    done, _ = await asyncio.wait({run}, timeout=120)  # a hang, not a speed: it ends in well under a second
    if not done:
        run.cancel()
        await asyncio.wait({run}, timeout=10)  # where it hangs, a cancel may hang as well
        pytest.fail("the ingest still waits two minutes after its link stage failed")
    with pytest.raises(ValueError, match="ORB blob"):
        run.result()


async def test_a_failing_fetch_stage_ends_the_ingest_with_its_error(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """An error the fetchers do not expect (here the catalogue refuses to record a failed download) must end the
    ingest with that error: it travels through the fetchers' queue to the batches, which are waiting on it,
    and the images fetched before it are kept."""
    from pictrace.tuning import Tuning

    settings = make_settings()
    (tmp_path / "pics").mkdir()
    entries = []
    for i in range(10):
        (tmp_path / "pics" / f"p{i}.png").write_bytes(picture(i))
        entries.append({"url": f"pics/p{i}.png"})
    entries.append({"url": "pics/missing.png"})  # fails its fetch, and its failure cannot be recorded
    settings.db.write_text(json.dumps([{"url": "pics/p0.png"}]))
    assert (await ingest(settings)).added == 1  # the catalogue exists; now it refuses every failure row
    with contextlib.closing(sqlite3.connect(settings.catalogue_path)) as conn, conn:
        for event in ("INSERT", "UPDATE"):
            conn.execute(
                f"CREATE TRIGGER no_failures_{event.lower()} BEFORE {event} ON sources WHEN NEW.status = 'failed' "
                "BEGIN SELECT RAISE(ABORT, 'the disk refuses this row'); END"
            )
    settings.db.write_text(json.dumps(entries))
    small_batches = Tuning.model_validate({"ingest": {"embed_batch": 2, "batches_in_flight": 1}})
    run = asyncio.create_task(ingest(settings, small_batches))
    done, _ = await asyncio.wait({run}, timeout=120)  # a hang, not a speed
    if not done:
        run.cancel()
        await asyncio.wait({run}, timeout=10)
        pytest.fail("the ingest still waits two minutes after its fetch stage failed")
    with pytest.raises(Exception, match="the disk refuses this row"):
        run.result()
    rows = catalogue_rows(settings.catalogue_path)
    assert rows["integrity"] == "ok" and rows["orphans"] == 0
    assert "pics/missing.png" not in {u.rsplit("/", 1)[-1] for u in rows["ok"]}  # type: ignore[attr-defined]
