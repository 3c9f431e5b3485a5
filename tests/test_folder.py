"""A folder as the gallery: phone formats, incremental re-scans, moves that keep their features, and watching it
with real file operations in a temp dir."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import crop, encode
from fastapi.testclient import TestClient
from PIL import Image

from pictrace.config import Settings
from pictrace.gallery import load_gallery
from pictrace.service import Service
from pictrace.tuning import Tuning
from pictrace.watch import FolderWatcher
from pictrace.web import create_app


def phone(rgb: np.ndarray, fmt: str, **options: object) -> bytes:
    from pillow_heif import register_heif_opener

    register_heif_opener()
    return encode(rgb, fmt, quality=90, **options)


def rows(settings: Settings, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(settings.catalogue_path) as conn:
        return list(conn.execute(sql))


def sources(settings: Settings) -> dict[str, str]:
    """{id: sha256} of the folder's indexed files."""
    found = rows(settings, "SELECT entry_id, sha256 FROM sources WHERE status = 'ok'")
    return {str(i): str(s) for i, s in found}


def vec_ids(settings: Settings) -> dict[str, int]:
    return {str(s): int(v) for v, s in rows(settings, "SELECT vec_id, sha256 FROM images")}


async def index(settings: Settings, folder: Path) -> object:
    service = await Service.start(settings)
    try:
        return await service.ingestor.ingest_gallery(load_gallery(folder))
    finally:
        await service.close()


@pytest.fixture
def folder(tmp_path: Path, photos: dict[str, np.ndarray]) -> Path:
    root = tmp_path / "Photos"
    (root / "2024" / "trip").mkdir(parents=True)
    (root / "a.jpg").write_bytes(encode(photos["astronaut"]))
    (root / "2024" / "cat.heic").write_bytes(phone(photos["chelsea"], "HEIF"))
    (root / "2024" / "trip" / "coffee.avif").write_bytes(phone(photos["coffee"], "AVIF"))
    (root / "2024" / "rocket.png").write_bytes(encode(photos["rocket"], "PNG"))
    (root / "notes.txt").write_text("not a picture")
    (root / "clip.mov").write_bytes(b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + b"\x00" * 4096)
    (root / ".hidden.jpg").write_bytes(encode(photos["camera"]))
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "x.jpg").write_bytes(encode(photos["coins"]))
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(encode(photos["brick"]))
    os.symlink(outside, root / "escape.jpg")
    os.symlink(root / "a.jpg", root / "2024" / "link-to-a.jpg")  # stays inside: allowed, the same bytes
    return root


def test_folder_index_accepts_phone_formats_and_refuses_escaping_links(
    folder: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(db=folder)
    report = asyncio.run(index(settings, folder))
    ids = sources(settings)
    assert sorted(ids) == ["2024/cat.heic", "2024/link-to-a.jpg", "2024/rocket.png", "2024/trip/coffee.avif", "a.jpg"]
    assert ids["2024/link-to-a.jpg"] == ids["a.jpg"]
    assert report.added == 4 and report.duplicates == 1  # type: ignore[attr-defined]
    assert report.skipped == 2  # type: ignore[attr-defined]  # the text file and the video
    assert report.failed == []  # type: ignore[attr-defined]
    [refused] = report.invalid  # type: ignore[attr-defined]
    assert refused.url == "escape.jpg" and "outside the folder" in refused.reason
    assert sorted(str(f) for (f,) in rows(settings, "SELECT format FROM images")) == ["AVIF", "HEIF", "JPEG", "PNG"]
    # thumbnails are our own WebP whatever the original was
    thumbs = [bytes(t) for (t,) in rows(settings, "SELECT thumbnail FROM images")]
    assert all(t[:4] == b"RIFF" and t[8:12] == b"WEBP" for t in thumbs)


def test_rescan_reads_only_what_changed_and_moves_keep_their_features(
    folder: Path, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    settings = make_settings(db=folder)
    asyncio.run(index(settings, folder))
    before_ids, before_vecs = sources(settings), vec_ids(settings)

    # same size and mtime, other bytes: taken as unchanged, so not read (the catalogue keeps the old SHA-256)
    png = folder / "2024" / "rocket.png"
    stat = png.stat()
    data = bytearray(png.read_bytes())
    data[-20] ^= 0xFF
    png.write_bytes(bytes(data))
    os.utime(png, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = asyncio.run(index(settings, folder))
    assert (again.added, again.duplicates, again.removed, again.unchanged) == (0, 0, 0, 7)  # type: ignore[attr-defined]
    assert sources(settings) == before_ids

    # touched, same bytes: read again, nothing re-embedded
    (folder / "a.jpg").touch()
    os.utime(folder / "a.jpg", ns=(0, stat.st_mtime_ns + 10**9))
    touched = asyncio.run(index(settings, folder))
    assert (touched.added, touched.duplicates, touched.unchanged) == (0, 0, 7)  # type: ignore[attr-defined]

    # moved and renamed: the same image row (same vec_id), nothing embedded again
    shutil.move(folder / "2024" / "cat.heic", folder / "2024" / "trip" / "kitty.HEIC")
    # changed in place: re-indexed, and its old image leaves the index
    (folder / "a.jpg").write_bytes(encode(photos["brick"]))
    (folder / "2024" / "link-to-a.jpg").unlink()
    # removed
    (folder / "2024" / "trip" / "coffee.avif").unlink()
    report = asyncio.run(index(settings, folder))
    after_ids, after_vecs = sources(settings), vec_ids(settings)
    assert sorted(after_ids) == ["2024/rocket.png", "2024/trip/kitty.HEIC", "a.jpg"]
    assert after_ids["2024/trip/kitty.HEIC"] == before_ids["2024/cat.heic"]
    assert after_vecs[after_ids["2024/trip/kitty.HEIC"]] == before_vecs[before_ids["2024/cat.heic"]]
    assert after_ids["a.jpg"] != before_ids["a.jpg"]
    assert before_ids["a.jpg"] not in after_vecs and before_ids["2024/trip/coffee.avif"] not in after_vecs
    assert len(after_vecs) == 3
    assert report.added == 1 and report.duplicates == 1 and report.removed == 3  # type: ignore[attr-defined]


def test_search_a_folder_gallery_and_open_the_original(
    folder: Path, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    (folder / ".store").mkdir()
    (folder / ".store" / "coins.png").write_bytes(encode(photos["coins"], "PNG"))
    os.symlink(folder / ".store" / "coins.png", folder / "linked.png")  # the only name of these bytes
    settings = make_settings(db=folder, max_pixels=300_000)
    asyncio.run(index(settings, folder))
    with TestClient(create_app(settings)) as client:
        query = phone(crop(photos["chelsea"]), "HEIF")  # a phone photo of a part of it
        response = client.post("/api/search", files={"file": ("q.heic", query, "image/heic")})
        assert response.status_code == 200, response.text
        best = response.json()["results"][0]
        assert best["id"] == "2024/cat.heic" and best["url"] == "2024/cat.heic"
        original = client.get(best["original_url"])
        assert original.status_code == 200 and original.content == (folder / "2024" / "cat.heic").read_bytes()
        # over the pixel cap: refused from the header, 413
        big = phone(np.zeros((600, 800, 3), np.uint8) + 128, "HEIF")
        refused = client.post("/api/search", files={"file": ("big.heic", big, "image/heic")})
        assert refused.status_code == 413 and "800x600" in refused.json()["detail"]
        # a link inside the folder re-pointed outside since it was indexed: its original is not served
        link = folder / "linked.png"
        sha = sources(settings)["linked.png"]
        assert client.get(f"/api/images/{sha}/original").content == link.read_bytes()
        link.unlink()
        os.symlink(folder.parent / "elsewhere.jpg", link)
        assert client.get(f"/api/images/{sha}/original").status_code == 404


# --- watching ---------------------------------------------------------------------------------------------


def eventually(check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except sqlite3.OperationalError:  # another process is still creating the catalogue
            pass
        time.sleep(0.1)
    assert check()


class Watching:
    """A service watching a folder on its own event loop in a thread, as `python -m pictrace watch` does."""

    def __init__(self, settings: Settings, folder: Path, tuning: Tuning) -> None:
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.error: BaseException | None = None
        self.watcher: FolderWatcher | None = None

        async def main() -> None:
            service = await Service.start(settings, tuning=tuning)
            try:
                self.watcher = FolderWatcher(service.ingestor, folder, tuning.watch)
                await self.watcher.run(self.stop)
            finally:
                await service.close()

        def run() -> None:
            try:
                self.loop.run_until_complete(main())
            except BaseException as exc:  # shown by close()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        eventually(lambda: self.watcher is not None and self.watcher.reconciles >= 1)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive() and self.error is None, self.error
        self.loop.close()


@pytest.fixture
def watch_tuning() -> Tuning:
    return Tuning().replace(watch={"quiet_ms": 400, "max_wait_ms": 20_000})


@pytest.fixture
def watching(
    folder: Path, make_settings: Callable[..., Settings], watch_tuning: Tuning
) -> Iterator[tuple[Settings, Watching]]:
    settings = make_settings(db=folder)
    watching = Watching(settings, folder, watch_tuning)
    try:
        yield settings, watching
    finally:
        watching.close()


def test_watch_follows_adds_changes_moves_and_deletes(
    folder: Path, watching: tuple[Settings, Watching], photos: dict[str, np.ndarray]
) -> None:
    settings, _ = watching
    assert "2024/cat.heic" in sources(settings)  # the reconcile at start
    cat_vec = vec_ids(settings)[sources(settings)["2024/cat.heic"]]

    # a copy in progress: written in pieces, slower than the quiet time in total; indexed once, complete
    data = encode(photos["camera"], "PNG")
    with (folder / "new.png").open("wb") as out:
        for start in range(0, len(data), len(data) // 6 + 1):
            out.write(data[start : start + len(data) // 6 + 1])
            out.flush()
            time.sleep(0.15)
    eventually(lambda: "new.png" in sources(settings))
    attempts = rows(settings, "SELECT attempts, status FROM sources WHERE entry_id = 'new.png'")
    assert attempts == [(1, "ok")]

    shutil.move(folder / "2024" / "cat.heic", folder / "cat-moved.heic")
    (folder / "2024" / "trip" / "coffee.avif").unlink()
    eventually(lambda: "cat-moved.heic" in sources(settings) and "2024/trip/coffee.avif" not in sources(settings))
    assert "2024/cat.heic" not in sources(settings)
    assert vec_ids(settings)[sources(settings)["cat-moved.heic"]] == cat_vec  # features kept

    old = sources(settings)["2024/rocket.png"]
    (folder / "2024" / "rocket.png").write_bytes(encode(photos["coins"], "PNG"))
    eventually(lambda: sources(settings).get("2024/rocket.png") not in (None, old))
    eventually(lambda: old not in vec_ids(settings))
    # hidden files are not watched into the index
    (folder / ".partial.jpg").write_bytes(encode(photos["brick"]))
    (folder / "last.jpg").write_bytes(encode(photos["brick"], quality=70))
    eventually(lambda: "last.jpg" in sources(settings))
    assert ".partial.jpg" not in sources(settings)


def test_a_restart_catches_what_changed_while_down(
    folder: Path, make_settings: Callable[..., Settings], watch_tuning: Tuning, photos: dict[str, np.ndarray]
) -> None:
    settings = make_settings(db=folder)
    first = Watching(settings, folder, watch_tuning)
    first.close()
    (folder / "a.jpg").unlink()
    (folder / "while-down.jpg").write_bytes(encode(photos["coins"]))
    second = Watching(settings, folder, watch_tuning)  # returns once its first reconcile is done
    try:
        ids = sources(settings)
        assert "while-down.jpg" in ids and "a.jpg" not in ids
    finally:
        second.close()


def test_watch_setting_with_the_web_app(
    folder: Path, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    settings = make_settings(db=folder, watch=True)
    with TestClient(create_app(settings, tuning=Tuning().replace(watch={"quiet_ms": 300}))) as client:
        eventually(lambda: client.get("/api/health").json()["images"]["indexed"] == 4)
        (folder / "added-later.jpg").write_bytes(encode(photos["coins"]))
        eventually(lambda: client.get("/api/health").json()["images"]["indexed"] == 5)
        result = client.post("/api/search", files={"file": ("q.jpg", encode(crop(photos["coins"])), "image/jpeg")})
        assert result.json()["results"][0]["id"] == "added-later.jpg"


def test_cli_index_and_watch_refuse_what_they_cannot_use(tmp_path: Path) -> None:
    from pictrace.cli import main

    assert main(["--data-dir", str(tmp_path / "d"), "watch", str(tmp_path / "nope")]) == 2
    db = tmp_path / "db.json"
    db.write_text("[]")
    assert main(["--data-dir", str(tmp_path / "d"), "watch", str(db)]) == 2
    image = tmp_path / "pics"
    image.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(image / "red.png")
    assert main(["--data-dir", str(tmp_path / "d"), "index", str(image), "--quiet"]) == 0


def test_cli_watch_follows_a_folder_until_interrupted(
    folder: Path, tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICTRACE_")}
    env["PYTHONPATH"] = str(root)
    data = tmp_path / "cli-data"
    settings = Settings(_env_file=None, data_dir=data)  # type: ignore[call-arg]
    command = [sys.executable, "-m", "pictrace", "--data-dir", str(data), "watch", str(folder)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        eventually(lambda: data.joinpath("catalogue.sqlite3").exists() and "a.jpg" in sources(settings), 120)
        (folder / "from-the-camera.jpg").write_bytes(encode(photos["coins"]))
        eventually(lambda: "from-the-camera.jpg" in sources(settings), 60)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "watching" in out and "added 4" in out
