"""Shared fixtures: photos made in code, a real HTTP server on 127.0.0.1, settings in a temp dir."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

# throw-away PostgreSQL and Milvus servers (session), fresh per test; see tests/pgserver.py, tests/milvusserver.py
from milvusserver import milvus_server, milvus_uri  # noqa: F401  (fixtures)
from pgserver import postgres_server, postgres_url  # noqa: F401  (fixtures)
from PIL import Image

from pictrace.config import Settings
from pictrace.schemas import IngestReport
from pictrace.tuning import Tuning

if TYPE_CHECKING:  # the service is imported where a fixture starts one
    from pictrace.service import Service


def encode(rgb: np.ndarray, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(rgb)
    if fmt == "JPEG":
        options.setdefault("quality", 90)
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photographs shipped inside scikit-image (no download), as RGB uint8."""
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick"]
    return {name: _rgb(getattr(data, name)()) for name in names}


# --- edits a user might make to a gallery image ---------------------------------------------------------


def crop(rgb: np.ndarray, fraction: float = 0.6, offset: float = 0.1) -> np.ndarray:
    h, w = rgb.shape[:2]
    ch, cw = int(h * fraction), int(w * fraction)
    y, x = int(h * offset), int(w * offset)
    return np.ascontiguousarray(rgb[y : y + ch, x : x + cw])


def rotate90(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(rgb))


def resize(rgb: np.ndarray, factor: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    return np.asarray(
        Image.fromarray(rgb).resize((max(1, int(w * factor)), max(1, int(h * factor))), Image.BILINEAR)
    )


def recompress(rgb: np.ndarray, quality: int) -> bytes:
    return encode(rgb, "JPEG", quality=quality)


PASTED_AT = (236, 112)


def screenshot(
    picture: np.ndarray, at: tuple[int, int] = PASTED_AT, size: tuple[int, int] = (640, 440)
) -> np.ndarray:
    """A screenshot of a dark page: a coloured bar with a title, lines of text, two flat boxes, and ``picture``
    pasted at ``at``."""
    import cv2

    width, height = size
    page = np.full((height, width, 3), 30, np.uint8)
    page[:32] = (220, 150, 100)
    cv2.putText(page, "Home  News  Photos", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
    cv2.rectangle(page, (300, 40), (480, 90), (20, 20, 200), -1)
    cv2.rectangle(page, (150, 160), (230, 240), (90, 200, 140), -1)
    for i, line in enumerate(["SALE 50% OFF", "WOW BUY NOW", "HOT DEAL LOL", "TOP 10 SALE"]):
        cv2.putText(page, line, (10, 130 + 60 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (230, 230, 230), 1)
    x, y = at
    h, w = picture.shape[:2]
    page[y : y + h, x : x + w] = picture
    return page


# --- a real HTTP server on 127.0.0.1 -------------------------------------------------------------------


@dataclass
class ImageServer:
    """Serves registered bytes; /missing is 404, /slow sleeps past any test timeout, /text is not an image."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    slow_seconds: float = 5.0

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def add(self, path: str, data: bytes) -> str:
        self.files["/" + path.lstrip("/")] = data
        return self.url(path)


def _handler(server: ImageServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            server.hits[self.path] += 1
            if self.path.startswith("/slow"):
                time.sleep(server.slow_seconds)
            body = server.files.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

    return Handler


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    state = ImageServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
async def photos_service(tmp_path: Path, photos: dict[str, np.ndarray]) -> AsyncIterator[Service]:
    """A service whose gallery is the eight photos, as files beside a db.json, ingested."""
    from pictrace.gallery import load_gallery
    from pictrace.service import Service

    (tmp_path / "g").mkdir()
    entries = []
    for name in photos:
        (tmp_path / "g" / f"{name}.jpg").write_bytes(encode(photos[name]))
        entries.append({"id": name, "url": f"g/{name}.jpg"})
    (tmp_path / "db.json").write_text(json.dumps(entries))
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", db=tmp_path / "db.json", index_on_start=False)
    svc = await Service.start(settings)
    assert (await svc.ingestor.ingest_gallery(load_gallery(settings.db))).added == len(photos)
    yield svc
    await svc.close()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings isolated in a temp dir, ignoring any PICTRACE_* of the developer's shell and .env."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "data_dir": tmp_path / "data",
            "db": tmp_path / "db.json",
            "index_on_start": False,
            "fetch_timeout_s": 2.0,
            "fetch_connect_timeout_s": 1.0,
            "fetch_retries": 1,
            "fetch_allow": ["127.0.0.1"],
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


async def ingest(settings: Settings, tuning: Tuning | None = None) -> IngestReport:
    """Index ``settings.db`` once with a service of its own (what `pictrace index` does)."""
    from pictrace.gallery import load_gallery
    from pictrace.service import Service

    service = await Service.start(settings, tuning=tuning)
    try:
        return await service.ingestor.ingest_gallery(load_gallery(settings.db))
    finally:
        await service.close()
