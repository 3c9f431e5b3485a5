"""The page in a real headless Chromium (Debian's `chromium`, driven by Playwright), against the real app.

The app runs under uvicorn on 127.0.0.1 with a gallery made in code: chelsea, an edited copy of it (a copy), the
same picture as if photographed at an angle (similar: another shot, a strong perspective) and unrelated photos.
Skipped, with the reason, only where the browser cannot start.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import ImageServer, _handler, crop, encode

from pictrace.config import Settings
from pictrace.web import create_app

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -r requirements-browser.txt"
)

CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-token"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn serving an app in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        pw = playwright_api.sync_playwright().start()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"Playwright cannot start: {exc}")
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    except Exception as exc:  # pragma: no cover - depends on the machine
        pw.stop()
        reason = str(exc).splitlines()[0]
        pytest.skip(f"headless Chromium ({CHROMIUM}) cannot start (apt-get install chromium): {reason}")
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture(scope="module")
def query_server() -> Iterator[ImageServer]:
    state = ImageServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def photographed(rgb: np.ndarray) -> np.ndarray:
    """The picture as a phone would see a print of it at an angle: a strong perspective."""
    h, w = rgb.shape[:2]
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    dst = np.array([[w * 0.2, h * 0.12], [w * 0.94, 0], [w, h], [0, h * 0.9]], dtype=np.float32)
    return cv2.warpPerspective(rgb, cv2.getPerspectiveTransform(src, dst), (w, h), borderValue=(255, 255, 255))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, np.ndarray]) -> Path:
    root = tmp_path_factory.mktemp("browser")
    (root / "g").mkdir()
    chelsea = photos["chelsea"]
    gallery = {
        "chelsea": chelsea,
        "chelsea-crop": crop(chelsea, 0.6, 0.2),
        "chelsea-photo": photographed(chelsea),
        "astronaut": photos["astronaut"],
        "coffee": photos["coffee"],
        "rocket": photos["rocket"],
    }
    entries = []
    for name, rgb in gallery.items():
        (root / "g" / f"{name}.jpg").write_bytes(encode(rgb))
        entries.append({"id": name, "url": f"g/{name}.jpg", "title": name.replace("-", " ").title()})
    (root / "db.json").write_text(json.dumps(entries))
    (root / "query.jpg").write_bytes(encode(chelsea))
    (root / "notes.jpg").write_bytes(b"these are my notes, not a picture")
    return root


@pytest.fixture(scope="module")
def live(files: Path) -> Iterator[LiveServer]:
    settings = Settings(
        _env_file=None,
        data_dir=files / "data",
        db=files / "db.json",
        index_on_start=True,
        api_token=TOKEN,  # only the duplicates page's decisions use it
        fetch_allow=["127.0.0.1"],
        fetch_timeout_s=5.0,
    )
    with LiveServer(create_app(settings)) as server:
        import httpx

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            images = httpx.get(f"{server.url}/api/health").json()["images"]
            if images["indexed"] >= 6 and images["pending"] == 0:
                break
            time.sleep(0.2)
        yield server


@pytest.fixture
def page(browser: Any, live: LiveServer) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def section_ids(page: Any, key: str) -> list[str]:
    return [t.strip() for t in page.locator(f"#section-{key} .match .id a").all_inner_texts()]


def test_upload_shows_three_sections_and_evidence(page: Any, live: LiveServer, files: Path) -> None:
    page.goto(live.url)
    page.set_input_files("#file", str(files / "query.jpg"))
    page.locator("#preview").wait_for(state="visible")  # the query preview, before searching (read async)
    page.click("#search-button")
    page.wait_for_selector("#results-title")
    assert section_ids(page, "exact") == ["Chelsea"]
    assert section_ids(page, "copy") == ["Chelsea Crop"]
    assert section_ids(page, "similar") == ["Chelsea Photo"]
    for other in ("Astronaut", "Coffee", "Rocket"):
        assert other not in page.inner_text("main")
    assert page.locator("#query-preview").is_visible()
    copy = page.locator("#section-copy .match").first
    assert "It fills 36% of yours" in copy.inner_text()  # the gallery copy is a crop of the query
    with page.context.expect_page() as opened:
        copy.locator("a.evidence").click()
    evidence = opened.value
    evidence.wait_for_load_state()
    size = evidence.evaluate("() => [document.images[0].naturalWidth, document.images[0].naturalHeight]")
    assert size[0] > 900 and size[1] > 320, size
    assert evidence.url.startswith(f"{live.url}/api/explain/")


def test_search_by_url_with_the_keyboard(page: Any, live: LiveServer, query_server: ImageServer, files: Path) -> None:
    url = query_server.add("q/cat.jpg", (files / "query.jpg").read_bytes())
    page.goto(live.url)
    field = page.get_by_label("Image URL")
    field.focus()
    page.keyboard.type(url)
    page.keyboard.press("Enter")
    page.wait_for_selector("#results-title")
    assert section_ids(page, "exact") == ["Chelsea"]
    assert url in page.inner_text(".query")


def test_drop_anywhere_searches(page: Any, live: LiveServer, files: Path) -> None:
    page.goto(live.url)
    data = base64.b64encode((files / "query.jpg").read_bytes()).decode()
    transfer = page.evaluate_handle(
        """(b64) => {
            const bin = atob(b64); const bytes = new Uint8Array(bin.length);
            for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
            return dt;
        }""",
        data,
    )
    page.dispatch_event("h1", "dragenter", {"dataTransfer": transfer})
    assert page.locator("#drop-overlay").is_visible()
    with page.expect_navigation():
        page.dispatch_event("h1", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#results-title")
    assert section_ids(page, "exact") == ["Chelsea"]


def test_non_image_gives_a_readable_error(page: Any, live: LiveServer, files: Path) -> None:
    page.goto(live.url)
    page.set_input_files("#file", str(files / "notes.jpg"))
    page.click("#search-button")
    alert = page.get_by_role("alert")
    alert.wait_for()
    text = alert.inner_text()
    assert "Could not search" in text and "image" in text.lower()
    assert page.get_by_label("Image URL").is_visible()  # the form is there to try again


def test_phone_sized_screen_and_gallery_page(browser: Any, live: LiveServer) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    try:
        for path in ("/", "/gallery"):
            page.goto(live.url + path)
            overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, (path, overflow)
        assert page.locator(".gallery .tile").count() == 6
        images = page.locator("img")
        for i in range(images.count()):
            assert images.nth(i).get_attribute("alt"), "every image has an alt text"
    finally:
        context.close()


def test_paste_an_image_searches(page: Any, live: LiveServer, files: Path) -> None:
    page.goto(live.url)
    data = base64.b64encode((files / "query.jpg").read_bytes()).decode()
    with page.expect_navigation():
        page.evaluate(
            """(b64) => {
                const bin = atob(b64); const bytes = new Uint8Array(bin.length);
                for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "clipboard.jpg", {type: "image/jpeg"}));
                document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true}));
            }""",
            data,
        )
    page.wait_for_selector("#results-title")
    assert section_ids(page, "exact") == ["Chelsea"]


def test_keyboard_reaches_every_control(page: Any, live: LiveServer) -> None:
    page.goto(live.url)
    seen = []
    for _ in range(12):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("() => document.activeElement.id || document.activeElement.textContent.trim()"))
    assert seen.index("file") < seen.index("url") < seen.index("search-button"), seen
    assert "Skip to content" in seen and "Gallery" in seen


def test_duplicates_page_with_the_keyboard_and_a_decision(page: Any, live: LiveServer) -> None:
    """Last in the file: its decision splits the crop from chelsea (searches ignore it; this page does not)."""
    import httpx

    deadline = time.monotonic() + 30  # the groups follow the catalogue in the background, within a second or two
    while time.monotonic() < deadline:
        answer = httpx.get(f"{live.url}/api/duplicates")
        if answer.status_code == 200 and answer.json()["total"] >= 1:
            break
        time.sleep(0.2)
    page.goto(f"{live.url}/duplicates")
    groups = page.locator(".dup-group")
    assert groups.count() == 1 and page.inner_text("#dup-total") == "1 group"
    members = groups.first.locator(".dup-member")
    assert [t.strip() for t in members.locator(".id").all_inner_texts()] == ["chelsea", "chelsea-crop"]
    assert "Keeper" in members.nth(0).inner_text() and "keeper" in (members.nth(0).get_attribute("class") or "")
    assert "crop 36%" in members.nth(1).locator(".edit").inner_text()
    assert "chelsea-photo" in groups.first.locator(".similar-row").inner_text()  # beside the group, not in it
    page.keyboard.press("j")  # the keyboard reaches the group, then its evidence link
    assert page.evaluate("() => document.activeElement.dataset.group") == groups.first.get_attribute("data-group")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "evidence"
    with page.context.expect_page() as opened:
        page.keyboard.press("Enter")
    evidence = opened.value
    evidence.wait_for_load_state()
    assert evidence.evaluate("() => document.images[0].naturalWidth") > 300
    assert "/api/explain/pair/" in evidence.url
    evidence.close()
    assert not page.locator(".split-btn").first.is_visible()  # no token, no decisions
    page.locator(".decide-token summary").click()
    page.fill("#token", TOKEN)
    page.locator(".split-btn").first.click()
    page.wait_for_function("() => document.getElementById('dup-total').textContent.trim() === '0 groups'")
    assert page.locator(".dup-group").count() == 0
