"""A corpus of bad inputs, made in code, through the HTTP API: each gets its status and a JSON `detail`.

Also: a huge body is refused (413) before it is all read, over a real socket; nothing a client names (file
names, content types) reaches the file system; query images are not kept unless the operator says so.
"""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import struct
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from conftest import ImageServer, encode
from fastapi.testclient import TestClient
from live_server import live_server
from PIL import Image

from pictrace.config import Settings
from pictrace.fetch import Fetcher
from pictrace.web import create_app

MiB = 1024 * 1024


def _save(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(side: int = 30_000) -> bytes:
    """A valid 1-bit PNG of side x side zeros: a few hundred KiB on the wire, side**2 pixels inflated."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def noise(h: int = 240, w: int = 320) -> np.ndarray:
    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(small, np.ones((8, 8, 1), np.uint8)))


def sixteen_bit_png() -> bytes:
    ramp = (np.linspace(0, 65535, 200 * 150) % 65536).astype(np.uint16).reshape(150, 200)
    im = Image.fromarray(ramp)  # mode I;16
    assert im.mode == "I;16"
    return _save(im, "PNG")


def animated_gif() -> bytes:
    frames = [Image.fromarray(noise()).convert("P"), Image.new("P", (320, 240), 3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="4000" height="4000">'
    b'<rect width="4000" height="4000" fill="red"/></svg>'
)
HTML = b"<!DOCTYPE html><html><head><title>Not found</title></head><body>nope</body></html>"

# (name, bytes, client file name, client content type, status)
UPLOADS: list[tuple[str, bytes, str, str, int]] = [
    ("zero bytes", b"", "empty.jpg", "image/jpeg", 415),
    ("truncated jpeg", encode(noise(), "JPEG")[:2000], "cut.jpg", "image/jpeg", 422),
    ("png bomb", png_bomb(), "bomb.png", "image/png", 413),
    ("65535x65535 header", png_header(65535, 65535), "huge.png", "image/png", 413),
    ("cmyk jpeg", _save(Image.fromarray(noise()).convert("CMYK"), "JPEG"), "cmyk.jpg", "image/jpeg", 200),
    ("16-bit png", sixteen_bit_png(), "deep.png", "image/png", 200),
    ("animated gif", animated_gif(), "anim.gif", "image/gif", 200),
    # found by schemathesis: OpenCV's ORB pyramid raised (500) on images thinner than 8 pixels
    ("1x1 png", _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "dot.png", "image/png", 200),
    ("3x500 sliver", _save(Image.fromarray(noise(8, 504)[:3, :500]), "PNG"), "line.png", "image/png", 200),
    ("svg", SVG, "vector.svg", "image/svg+xml", 415),
    ("svg named .jpg", SVG, "photo.jpg", "image/jpeg", 415),
    ("html as jpeg", HTML, "photo.jpg", "image/jpeg", 415),
    ("text named .jpg", b"hello, I am a text file\n" * 20, "notes.jpg", "image/jpeg", 415),
    ("pdf", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "doc.jpg", "image/jpeg", 415),
    ("random bytes", np.random.default_rng(3).bytes(5000), "rand.jpg", "image/jpeg", 415),
]


@pytest.fixture
def settings(
    image_server: ImageServer, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> Settings:
    settings = make_settings(index_on_start=True, max_upload_bytes=1 * MiB)
    entries = [{"id": n, "url": image_server.add(f"g/{n}.jpg", encode(photos[n]))} for n in ("coffee", "rocket")]
    settings.db.write_text(json.dumps(entries))
    return settings


def wait_indexed(client: TestClient, n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        images = client.get("/api/health").json()["images"]
        if images["indexed"] >= n and images["pending"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("gallery not indexed")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        wait_indexed(client, 2)
        yield client


def assert_json_detail(response: object) -> None:
    body = response.json()  # type: ignore[attr-defined]
    assert isinstance(body.get("detail"), str) and body["detail"], body


def _problem(got: int, ctype: str, body: dict[str, Any], status: int) -> str | None:
    if got != status or ctype != "application/json":
        return f"{got} {ctype} {body}"
    if status == 200:
        return None if body["query"]["width"] > 0 and isinstance(body["results"], list) else str(body)
    return None if isinstance(body.get("detail"), str) and body["detail"] else str(body)


def test_upload_corpus(client: TestClient) -> None:
    """One app for the whole corpus (starting one per case costs seconds); every case is checked."""
    wrong = []
    for name, data, filename, ctype, status in UPLOADS:
        started = time.perf_counter()
        response = client.post("/api/search", files={"file": (filename, data, ctype)})
        took = time.perf_counter() - started
        problem = _problem(response.status_code, response.headers["content-type"], response.json(), status)
        if problem is None and status == 413 and took > 2.0:
            problem = f"took {took:.2f}s: refused from the header, not after inflating it?"
        if problem is not None:
            wrong.append((name, problem))
    assert wrong == []


def test_url_corpus_decodes_whatever_the_content_type_says(client: TestClient, image_server: ImageServer) -> None:
    """The conftest server labels everything image/jpeg: only the bytes decide."""
    cases = [
        ("page.jpg", HTML, 415),
        ("vector.jpg", SVG, 415),
        ("notes.jpg", b"plain text\n" * 10, 415),
        ("bomb.jpg", png_bomb(), 413),
        ("cut.jpg", encode(noise(), "JPEG")[:2000], 422),
        ("empty.jpg", b"", 415),
        ("really-a-png.jpg", _save(Image.fromarray(noise()), "PNG"), 200),
    ]
    for path, data, status in cases:
        response = client.post("/api/search", json={"url": image_server.add(f"u/{path}", data)})
        assert response.status_code == status, (path, response.text)
        if status != 200:
            assert_json_detail(response)


def test_huge_body_through_the_client_gets_413(client: TestClient) -> None:
    response = client.post("/api/search", files={"file": ("big.jpg", b"\xff\xd8\xff" + b"0" * (2 * MiB), "image/jpeg")})
    assert response.status_code == 413
    assert_json_detail(response)


# --- 413 before the body is all read: a raw socket ----------------------------------------------------


def _read_response(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _content_length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def _hung_up(sock: socket.socket) -> bool:
    """True once the server has closed the connection (our sends fail, or reads see EOF)."""
    try:
        for _ in range(200):
            sock.sendall(b"x" * 65536)
            time.sleep(0.01)
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


def _status_and_body(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body[: _content_length(raw)])


def test_declared_huge_body_refused_before_it_is_sent(settings: Settings) -> None:
    with live_server(settings) as live, socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(
            b"POST /api/search HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000\r\n\r\n"
            + b"--b\r\n"
            + b"x" * 65536
        )
        status, body = _status_and_body(_read_response(sock))
        assert status == 413 and "limit" in str(body["detail"])
        # and the server hangs up instead of waiting for the other 999 MB
        sock.settimeout(5)
        assert _hung_up(sock)


def test_chunked_huge_body_refused_while_it_arrives(settings: Settings) -> None:
    """No Content-Length: the count while streaming is what stops it, long before the body ends (it never does)."""
    cap = settings.max_upload_bytes + 64 * 1024
    with live_server(settings) as live, socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(
            b"POST /api/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(_read_response(sock, timeout=20)), daemon=True)
        reader.start()
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + b"x" * 60000
        sent = 0
        try:
            while reader.is_alive() and sent < 50 * cap:
                sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
                sent += len(part)
                time.sleep(0.001)
        except OSError:
            pass  # the server hung up on us: what we want
        reader.join(20)
        assert received and received[0], "no answer while the body was still arriving"
        status, body = _status_and_body(received[0])
        assert status == 413 and "limit" in str(body["detail"])
        assert sent < 3 * cap  # refused soon after the cap, not after reading everything we could send


# --- nothing a client names reaches the file system; queries are not kept ------------------------------


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(("-wal", "-shm"))}


def _rows(settings: Settings) -> tuple[int, int, int]:
    with sqlite3.connect(settings.catalogue_path) as conn:
        images, sources, meta = (
            conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("images", "sources", "meta")
        )
        return int(images), int(sources), int(meta)


def test_client_names_never_reach_the_file_system_and_queries_are_not_kept(
    client: TestClient,
    settings: Settings,
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where a large multipart upload would spill
    data_before, rows_before = _tree(settings.data_dir), _rows(settings)
    marker = f"pwned-{uuid.uuid4().hex}"
    evil_names = [f"../../../../tmp/{marker}.jpg", f"/tmp/{marker}.jpg", f"..\\..\\{marker}.jpg", f"{marker}\x00.jpg"]
    big = encode(np.repeat(np.repeat(photos["astronaut"], 2, 0), 2, 1), "PNG")  # > 1 MiB spool threshold?
    for name in evil_names:
        for payload in (encode(photos["chelsea"]), big[: 900 * 1024]):
            client.post("/api/search", files={"file": (name, payload, f"image/{marker}; name=../../{marker}")})
    response = client.post("/api/search", json={"url": image_server.add(f"{marker}.jpg", encode(photos["coffee"]))})
    assert response.status_code == 200 and response.json()["results"][0]["id"] == "coffee"
    assert not list(Path("/tmp").glob(f"{marker}*"))
    assert not [p for p in tmp_path.rglob("*") if marker in p.name]
    assert not [p for p in Path.cwd().rglob(f"{marker}*")]
    assert list(spool.iterdir()) == []  # spooled uploads are anonymous and gone with the request
    assert _tree(settings.data_dir) == data_before  # no query image, thumbnail or row was kept
    assert _rows(settings) == rows_before


def test_keep_queries_keeps_them_under_names_pictrace_makes(
    make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    settings = make_settings(keep_queries=True)
    with TestClient(create_app(settings)) as client:
        data = encode(photos["rocket"])
        response = client.post("/api/search", files={"file": ("../../x.exe", data, "application/x-evil")})
        assert response.status_code == 200, response.text
        sha = response.json()["query"]["sha256"]
    assert [p.name for p in settings.queries_dir.iterdir()] == [f"{sha}.jpg"]
    assert (settings.queries_dir / f"{sha}.jpg").read_bytes() == data


# --- SSRF through the API ------------------------------------------------------------------------------


class RebindingResolver(AbstractResolver):
    """A real resolver over a fixed table: 'photos.test' is a public-looking name that points at 127.0.0.1."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self.table.get(host)
        if address is None:
            raise OSError(f"unknown host {host}")
        return [
            ResolveResult(
                hostname=host, host=address, port=port, family=socket.AF_INET, proto=0, flags=socket.AI_NUMERICHOST
            )
        ]

    async def close(self) -> None:
        pass


def test_ssrf_guard_checks_the_connected_address_and_honours_the_allow_list(
    make_settings: Callable[..., Settings],
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = "internal/secret.jpg"
    image_server.add(path, encode(photos["coffee"]))
    port = image_server.base.rsplit(":", 1)[1]
    resolver = RebindingResolver({"photos.test": "127.0.0.1", "cdn.test": "127.0.0.1"})
    # the operator's allow-list comes from the environment, comma separated; it opens only what it names
    monkeypatch.setenv("PICTRACE_FETCH_ALLOW", " cdn.test , 192.0.2.0/24")
    from pictrace.config import load_settings

    allow = load_settings(_env_file=None).fetch_allow
    assert allow == ["cdn.test", "192.0.2.0/24"]
    settings = make_settings(fetch_allow=allow)
    with TestClient(create_app(settings, fetcher=Fetcher(settings, resolver=resolver))) as client:
        for url in (
            f"http://photos.test:{port}/{path}",  # a name that resolves to loopback
            f"http://127.0.0.1:{port}/{path}",
            f"http://2130706433:{port}/{path}",
            f"http://0x7f.1:{port}/{path}",
            f"http://[::ffff:7f00:1]:{port}/{path}",
        ):
            response = client.post("/api/search", json={"url": url})
            assert response.status_code == 400, (url, response.text)
            assert_json_detail(response)
        assert image_server.hits[f"/{path}"] == 0
        # the allowed name reaches the same address
        response = client.post("/api/search", json={"url": f"http://cdn.test:{port}/{path}"})
        assert response.status_code == 200, response.text
        assert image_server.hits[f"/{path}"] == 1
