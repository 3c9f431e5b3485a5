"""Safe to expose: what is stored cannot break a search, one slow host cannot stall the others, slow clients are
dropped, large images are bounded by pixels, and the operator can back up and check the catalogue.

Everything runs against the real service under uvicorn on 127.0.0.1 (tests/live_server.py)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from conftest import ImageServer, encode
from live_server import live_server

from pictrace.config import Settings
from pictrace.gallery import load_gallery
from pictrace.pixels import PixelBudget

TOKEN = "safety-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def search(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/api/search", files={"file": ("q.jpg", data, "image/jpeg")}, data={"top_k": "10"})


# --- metadata: checked where it comes in, and never a 500 on the way out --------------------------------------

BAD_METADATA = {
    "lone surrogate": '{"t": "\\ud800"}',
    "lone surrogate in a key": '{"\\udfff": 1}',
    "deep nest": '{"a": ' + "[" * 300 + "]" * 300 + "}",
    "very deep nest": '{"a": ' + "[" * 5000 + "]" * 5000 + "}",
    "huge integer": '{"n": ' + "7" * 5000 + "}",
    "integer past 64 bits": '{"n": ' + str(1 << 70) + "}",
    "not a number": '{"x": NaN}',
}


@pytest.mark.parametrize("name", sorted(BAD_METADATA))
def test_bad_metadata_is_refused_with_400_and_search_still_answers(
    name: str, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    image = encode(photos["coffee"])
    with live_server(make_settings(api_token=TOKEN)) as live, httpx.Client(base_url=live.base, timeout=30) as c:
        as_form = c.post(
            "/api/images",
            files={"file": ("a.jpg", image, "image/jpeg")},
            data={"metadata": BAD_METADATA[name]},
            headers=AUTH,
        )
        assert as_form.status_code == 400, as_form.text
        as_json = c.post(
            "/api/images",
            content=b'{"url": "http://127.0.0.1:9/a.jpg", "metadata": ' + BAD_METADATA[name].encode() + b"}",
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert as_json.status_code == 400, as_json.text
        assert c.get("/api/health").json()["images"]["indexed"] == 0
        assert search(c, image).status_code == 200


def test_metadata_size_is_counted_in_utf8_bytes(
    make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    """900 'é' are 1,802 bytes of UTF-8 (plus the braces), not the 5,400 of their \\u escapes."""
    settings = make_settings(api_token=TOKEN, max_metadata_bytes=2000)
    with live_server(settings) as live, httpx.Client(base_url=live.base, timeout=30) as c:
        fits = {"t": "é" * 900}
        added = c.post(
            "/api/images",
            files={"file": ("a.jpg", encode(photos["coffee"]), "image/jpeg")},
            data={"metadata": json.dumps(fits)},
            headers=AUTH,
        )
        assert added.status_code == 201, added.text
        too_big = c.post(
            "/api/images",
            files={"file": ("b.jpg", encode(photos["rocket"]), "image/jpeg")},
            data={"metadata": json.dumps({"t": "é" * 1100}, ensure_ascii=False)},
            headers=AUTH,
        )
        assert too_big.status_code == 400 and "2000-byte" in too_big.json()["detail"]
        found = search(c, encode(photos["coffee"])).json()["results"]
        assert found[0]["metadata"] == fits


def test_bad_db_json_entries_are_reported_by_position_and_skipped(
    image_server: ImageServer, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    settings = make_settings(index_on_start=True)
    good = image_server.add("g/coffee.jpg", encode(photos["coffee"]))
    text = (
        "["
        + json.dumps({"id": "good", "url": good, "title": "Coffee"})
        + ', {"id": "bad-title", "url": "g/x.jpg", "title": "\\ud83d"}'
        + ', {"id": "deep", "url": "g/y.jpg", "tags": ' + "[" * 300 + "]" * 300 + "}"
        + ', {"id": "\\ud800", "url": "g/z.jpg"}'
        + ', {"id": 1, "url": "g/w.jpg", "n": ' + str(1 << 64) + "}"
        + "]"
    )
    settings.db.write_text(text)
    gallery = load_gallery(settings.db)
    assert [e.entry.id for e in gallery.entries] == ["good"]
    assert [f.position for f in gallery.invalid] == [1, 2, 3, 4]
    with live_server(settings) as live, httpx.Client(base_url=live.base, timeout=30) as c:
        wait_indexed(c, 1)
        for page in ("/api/search", "/search"):
            answer = c.post(page, files={"file": ("q.jpg", encode(photos["coffee"]), "image/jpeg")})
            assert answer.status_code == 200, answer.text
        assert search(c, encode(photos["coffee"])).json()["results"][0]["metadata"] == {"title": "Coffee"}


def test_a_stored_record_that_cannot_be_served_is_left_out_not_a_500(
    image_server: ImageServer, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    """A record written before the checks (or by hand) costs its own match only, on the API and the page."""
    settings = make_settings(index_on_start=True)
    entries = [{"id": n, "url": image_server.add(f"g/{n}.jpg", encode(photos[n]))} for n in ("coffee", "rocket")]
    settings.db.write_text(json.dumps(entries))
    with live_server(settings) as live, httpx.Client(base_url=live.base, timeout=30) as c:
        wait_indexed(c, 2)
        with sqlite3.connect(settings.catalogue_path) as conn:
            conn.execute("UPDATE sources SET metadata = ? WHERE entry_id = 'coffee'", ('{"t": "\\ud800"}',))
            deep = '{"t": ' + "[" * 300 + "]" * 300 + "}"
            conn.execute("UPDATE sources SET metadata = ? WHERE entry_id = 'rocket'", (deep,))
        for name in ("coffee", "rocket"):
            answer = search(c, encode(photos[name]))
            assert answer.status_code == 200, answer.text
            assert name not in [m["id"] for m in answer.json()["results"]]
            page = c.post("/search", files={"file": ("q.jpg", encode(photos[name]), "image/jpeg")})
            assert page.status_code == 200, page.text
        assert c.get("/gallery").status_code == 200


def wait_indexed(client: httpx.Client, count: int, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        images = client.get("/api/health").json()["images"]
        if images["indexed"] >= count and images["pending"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"not indexed in {timeout}s: {client.get('/api/health').json()}")


# --- a deleted gallery image stays deleted, quietly --------------------------------------------------------------


def test_a_deleted_gallery_image_is_kept_out_not_fetched_or_failed(
    image_server: ImageServer,
    make_settings: Callable[..., Settings],
    photos: dict[str, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pictrace.cli import main as cli_main
    from pictrace.features.hashing import sha256_hex

    settings = make_settings(api_token=TOKEN)
    coffee = encode(photos["coffee"])
    entries = [
        {"id": "coffee", "url": image_server.add("g/coffee.jpg", coffee)},
        {"id": "rocket", "url": image_server.add("g/rocket.jpg", encode(photos["rocket"]))},
    ]
    settings.db.write_text(json.dumps(entries))
    index = ["--data-dir", str(settings.data_dir), "index", str(settings.db), "--quiet"]
    assert cli_main(index) == 0
    with live_server(settings) as live, httpx.Client(base_url=live.base, timeout=30) as c:
        deleted = c.delete(f"/api/images/{sha256_hex(coffee)}", headers=AUTH)
        assert deleted.status_code == 200, deleted.text
    capsys.readouterr()
    fetched_before = image_server.hits["/g/coffee.jpg"]
    for _ in range(2):
        assert cli_main(index) == 0
        out = capsys.readouterr().out
        assert "failed 0" in out and "kept out 1 (deleted through the API)" in out, out
    assert image_server.hits["/g/coffee.jpg"] == fetched_before
    with live_server(settings) as live, httpx.Client(base_url=live.base, timeout=30) as c:
        assert c.get("/api/health").json()["images"] == {"indexed": 1, "pending": 0, "failed": 0}
        assert "coffee" not in [m["id"] for m in search(c, coffee).json()["results"]]
        # adding the bytes back through the API lets the db.json entry in again
        assert c.post("/api/images", files={"file": ("c.jpg", coffee, "image/jpeg")}, headers=AUTH).status_code == 201
    assert cli_main(index) == 0
    assert "kept out" not in capsys.readouterr().out


# --- the gallery page keeps where images come from, and why entries failed, behind the token -----------------


def test_gallery_page_shows_sources_and_failures_only_with_the_token(
    image_server: ImageServer, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    settings = make_settings(api_token=TOKEN, index_on_start=True)
    entries = [
        {"url": image_server.add("internal/coffee.jpg", encode(photos["coffee"]))},
        {"id": "gone", "url": "http://127.0.0.1:9/secret-path.jpg"},
    ]
    settings.db.write_text(json.dumps(entries))
    with live_server(settings) as live, httpx.Client(base_url=live.base, timeout=30) as c:
        wait_indexed(c, 1)
        public = c.get("/gallery").text
        assert "1 entry could not be indexed" in public
        for secret in ("internal/coffee.jpg", "secret-path", "127.0.0.1:9", "cannot connect"):
            assert secret not in public
        for header in ({"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            assert "secret-path" not in c.get("/gallery", headers=header).text
        operator = c.get("/gallery", headers=AUTH).text
        for secret in ("internal/coffee.jpg", "secret-path", "cannot connect"):
            assert secret in operator
    with live_server(make_settings(gallery_public_details=True)) as live, httpx.Client(base_url=live.base) as c:
        assert "secret-path" in c.get("/gallery").text


# --- backup, check, restore ------------------------------------------------------------------------------------


def test_backup_then_check_then_restore_then_search(
    image_server: ImageServer,
    make_settings: Callable[..., Settings],
    photos: dict[str, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    from pictrace.cli import main as cli_main

    settings = make_settings(api_token=TOKEN)
    entries = [{"id": n, "url": image_server.add(f"g/{n}.jpg", encode(photos[n]))} for n in ("coffee", "camera")]
    settings.db.write_text(json.dumps(entries))
    data = ["--data-dir", str(settings.data_dir)]
    assert cli_main([*data, "index", str(settings.db), "--quiet"]) == 0
    backup = settings.data_dir.parent / "backups"
    backup.mkdir()
    assert cli_main([*data, "backup", str(backup)]) == 0
    assert (backup / "catalogue.sqlite3").is_file()
    capsys.readouterr()
    assert cli_main([*data, "check"]) == 0
    assert "problem" not in capsys.readouterr().out

    # after the backup, an image is added through the API (the indexes hold it)
    with live_server(settings) as live, httpx.Client(base_url=live.base, timeout=30) as c:
        rocket = encode(photos["rocket"])
        assert c.post("/api/images", files={"file": ("r.jpg", rocket, "image/jpeg")}, headers=AUTH).status_code == 201

    # the catalogue is damaged: one line naming the file and the commands, no traceback
    for leftover in settings.data_dir.glob("catalogue.sqlite3-*"):
        leftover.unlink()
    settings.catalogue_path.write_bytes(b"this is not a database" * 1000)
    capsys.readouterr()
    assert cli_main([*data, "serve", "--port", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(settings.catalogue_path) in err and "pictrace check" in err and "pictrace backup" in err
    assert cli_main([*data, "check"]) == 1
    assert "cannot be read" in capsys.readouterr().out

    # restored from the backup: the check sees the indexes hold an image the catalogue does not
    shutil.copy(backup / "catalogue.sqlite3", settings.catalogue_path)
    assert cli_main([*data, "check"]) == 1
    assert "1 not catalogued" in capsys.readouterr().out
    with live_server(settings) as live, httpx.Client(base_url=live.base, timeout=30) as c:
        assert search(c, encode(photos["coffee"])).json()["results"][0]["id"] == "coffee"
        assert "rocket" not in [m["id"] for m in search(c, rocket).json()["results"]]
        assert c.get("/api/health").json()["images"]["indexed"] == 2
    assert cli_main([*data, "check"]) == 0  # the start brought the indexes in line


# --- slow clients are dropped ------------------------------------------------------------------------------------


def _drip(port: int, head: bytes, drip: bytes, every_s: float, give_up_s: float) -> tuple[bytes, float]:
    """Send ``head`` at once, then ``drip`` a byte at a time; return what the server answered and when it closed."""
    import socket
    import time

    start = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=give_up_s) as sock:
        sock.sendall(head)
        sock.settimeout(every_s)
        for byte in drip:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed by the server
                break
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            answer += chunk
            if not chunk:
                break
            if time.monotonic() - start > give_up_s:
                break
        sock.settimeout(2)
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass
    return answer, time.monotonic() - start


def test_slow_clients_are_dropped_after_the_read_timeouts(make_settings: Callable[..., Settings]) -> None:
    """Clients sending their body (or headers) a byte at a time get 408 and are disconnected after the timeout,
    in parallel, while the service goes on answering."""
    from concurrent.futures import ThreadPoolExecutor

    from pictrace.tuning import Tuning

    tuning = Tuning().replace(serving={"header_timeout_s": 1.0, "body_timeout_s": 1.5, "body_idle_s": 1.0})
    body_head = (
        b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n"
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    )
    header_head = b"GET /api/health HTTP/1.1\r\nHost: x\r\n"
    with live_server(make_settings(), tuning=tuning) as live, ThreadPoolExecutor(12) as pool:
        slow_bodies = [pool.submit(_drip, live.port, body_head, b"x" * 200, 0.2, 20) for _ in range(8)]
        slow_headers = [pool.submit(_drip, live.port, header_head, b"X-Slow: " + b"a" * 200, 0.2, 20) for _ in range(4)]
        with httpx.Client(base_url=live.base, timeout=10) as c:
            assert c.get("/api/health").status_code == 200
        for future in slow_bodies + slow_headers:
            answer, took = future.result()
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert took < 10, took  # dropped: not held until the client gives up
        # a body that pauses longer than the idle limit is dropped too, well before the total limit
        answer, took = _drip(live.port, body_head, b"xx", 1.3, 20)
        assert answer.startswith(b"HTTP/1.1 408") and took < 3, (answer, took)


def test_oversized_headers_get_431_and_the_connection_is_closed(make_settings: Callable[..., Settings]) -> None:
    import socket

    with live_server(make_settings()) as live, socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]


# --- one slow image host delays its own downloads only --------------------------------------------------------


@contextlib.contextmanager
def dripping_host(address: str = "127.0.0.2") -> Iterator[str]:
    """An HTTP server on another loopback address that promises 100 kB and sends one byte a second."""
    import socketserver
    import threading
    import time

    class Drip(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(60)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                head += chunk
            try:
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
                for _ in range(60):
                    self.request.sendall(b"\xff")
                    time.sleep(1)
            except OSError:
                return

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer((address, 0), Drip)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{address}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_dripping_host_does_not_stall_url_searches_to_other_hosts(
    image_server: ImageServer, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    """32 URL searches to a host sending a byte a second, then one to a healthy host: answered within 3 s. The
    slow host's own searches beyond its slots and queue are refused with 503 at once."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    healthy = image_server.add("q/coffee.jpg", encode(photos["coffee"]))
    settings = make_settings(fetch_allow=["127.0.0.0/8"], fetch_timeout_s=5.0, fetch_retries=0)
    with dripping_host() as slow, live_server(settings) as live, ThreadPoolExecutor(32) as pool:

        def search_url(url: str) -> httpx.Response:
            with httpx.Client(base_url=live.base, timeout=30) as c:
                return c.post("/api/search", json={"url": url})

        stalled = [pool.submit(search_url, f"{slow}/{i}.jpg") for i in range(32)]
        time.sleep(1.0)  # all 32 have reached the fetcher
        started = time.monotonic()
        answer = search_url(healthy)
        took = time.monotonic() - started
        assert answer.status_code == 200, answer.text
        assert took < 3.0, f"the healthy URL search took {took:.1f}s"
        statuses = [f.result().status_code for f in stalled]
        assert statuses.count(503) >= 32 - 4 - 8  # beyond the host's 4 slots and its queue of 8
        assert set(statuses) <= {502, 503}
    print(f"healthy URL search beside 32 dripping ones: {took:.2f}s; statuses {sorted(statuses)}")


def test_a_dripping_gallery_host_delays_only_its_own_entries(
    image_server: ImageServer, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    settings = make_settings(index_on_start=True, fetch_timeout_s=5.0, fetch_retries=0)
    with dripping_host() as slow:
        entries = [{"id": f"slow{i}", "url": f"{slow}/{i}.jpg"} for i in range(24)]
        entries += [{"id": n, "url": image_server.add(f"g/{n}.jpg", encode(photos[n]))} for n in ("coffee", "rocket")]
        settings.db.write_text(json.dumps(entries))
        with live_server(settings) as live, httpx.Client(base_url=live.base, timeout=30) as c:
            import time

            deadline = time.monotonic() + 4.0
            while c.get("/api/health").json()["images"]["indexed"] < 2:
                assert time.monotonic() < deadline, "the healthy host's entries waited behind the dripping one"
                time.sleep(0.1)
            assert c.get("/api/health").json()["images"]["pending"] > 0  # the slow ones are still going


# --- a pixel budget: large images take turns, small ones pass ---------------------------------------------------


def huge_images() -> dict[str, bytes]:
    """A 49.99 MP PNG (a few hundred KB: flat colour compresses) and a 49.99 MP JPEG, under the 50 MP cap."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (7070, 7070), (200, 180, 160))
    draw = ImageDraw.Draw(image)
    for i in range(0, 7070, 400):
        draw.rectangle((i, i // 2, i + 200, i // 2 + 300), fill=(i % 255, 40, 90))
    out = {}
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 70}))
        out[fmt] = buffer.getvalue()
    return out


def test_a_flood_of_huge_images_leaves_normal_searches_answered(
    make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    import threading
    import time
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    huge = huge_images()
    stop = threading.Event()
    statuses: Counter[int] = Counter()

    with live_server(make_settings()) as live, ThreadPoolExecutor(10) as pool:

        def flood(client_no: int) -> None:
            with httpx.Client(base_url=live.base, timeout=60) as c:
                n = client_no
                while not stop.is_set():
                    fmt = ("PNG", "JPEG")[n % 2]
                    n += 1
                    answer = c.post("/api/search", files={"file": (f"big.{fmt.lower()}", huge[fmt], "image/" + fmt)})
                    statuses[answer.status_code] += 1

        flooding = [pool.submit(flood, i) for i in range(8)]
        time.sleep(2.0)  # the flood is under way
        with httpx.Client(base_url=live.base, timeout=60) as c:
            started = time.monotonic()
            answer = search(c, encode(photos["coffee"]))
            took = time.monotonic() - started
        stop.set()
        for future in flooding:
            future.result()
    assert answer.status_code == 200, answer.text
    # generous: alone it takes ~0.1 s; without the budget it queued behind the flood's decodes (~5-10 s here)
    assert took < 4.0, f"a normal search took {took:.1f}s under the flood"
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= 1
    print(f"normal search under the flood: {took:.2f}s; flood statuses {dict(statuses)}")


def test_backup_of_a_postgresql_catalogue_says_to_use_pg_dump(
    make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    from pictrace.cli import main as cli_main

    settings = make_settings()
    env = {"PICTRACE_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert cli_main(["--data-dir", str(settings.data_dir), "backup", str(settings.data_dir / "b")]) == 2
    err = capsys.readouterr().err
    assert "pg_dump" in err and len(err.strip().splitlines()) == 1


async def test_the_pixel_budget_lets_large_images_take_turns_and_small_ones_pass() -> None:
    import asyncio

    from pictrace.errors import OverloadedError

    budget = PixelBudget(64_000_000, max_waiting=1)
    order: list[str] = []

    async with budget.hold(50_000_000):  # a 50 MP decode running
        waiting = asyncio.create_task(_hold(budget, 50_000_000, order, "second big"))
        await asyncio.sleep(0)
        async with budget.hold(300_000):  # a phone photo passes beside it
            order.append("small")
        with pytest.raises(OverloadedError):  # the queue of large ones is full: 503, not a pile-up
            async with budget.hold(40_000_000):
                pass
        order.append("first big")
    await waiting
    assert order == ["small", "first big", "second big"]
    assert budget.used == 0


async def _hold(budget: PixelBudget, pixels: int, order: list[str], name: str) -> None:
    async with budget.hold(pixels):
        order.append(name)
