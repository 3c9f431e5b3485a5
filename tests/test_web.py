"""The three routes (page, API multipart, API JSON URL) and the original's API, end to end through the app."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ImageServer, crop, encode, resize, rotate90, screenshot
from fastapi.testclient import TestClient

from pictrace.config import Settings
from pictrace.web import create_app

NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera"]


def wait_until_indexed(client: TestClient, n: int, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = client.get("/api/health").json()
        if health["images"]["indexed"] >= n and health["images"]["pending"] == 0:
            return dict(health)
        time.sleep(0.2)
    raise AssertionError(f"gallery not indexed in {timeout}s: {health}")


@pytest.fixture
def settings(
    tmp_path: Path,
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    make_settings: Callable[..., Settings],
) -> Settings:
    entries = [
        {"id": n, "url": image_server.add(f"g/{n}.jpg", encode(photos[n])), "title": n.title()} for n in NAMES
    ]
    entries.append({"id": "gone", "url": image_server.url("g/gone.jpg")})
    settings = make_settings(index_on_start=True, max_upload_bytes=2 * 1024 * 1024)
    settings.db.write_text(json.dumps(entries))
    return settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        health = wait_until_indexed(client, len(NAMES))
        assert health["status"] == "ok"
        assert health["images"] == {"indexed": len(NAMES), "pending": 0, "failed": 1}
        yield client


def test_api_search_multipart(client: TestClient, photos: dict[str, np.ndarray]) -> None:
    query = encode(crop(photos["rocket"], 0.6, 0.2))
    response = client.post("/api/search", files={"file": ("q.jpg", query, "image/jpeg")}, data={"top_k": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"query", "results", "took_ms"}
    assert set(body["query"]) == {"id", "sha256", "width", "height", "inner_picture"}
    assert body["query"]["inner_picture"] is None  # a crop of a photo: no picture inside it
    assert 1 <= len(body["results"]) <= 3  # the unrelated photos are not shown
    best = body["results"][0]
    assert best["verdict"] == "copy" and best["transform"]["crop_fraction"] < 0.5
    assert best["id"] == "rocket" and best["metadata"] == {"title": "Rocket"}
    assert set(best["scores"]) >= {"embedding", "ssim", "orb"}
    thumb = client.get(best["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    assert thumb.content[:4] == b"RIFF" and thumb.content[8:12] == b"WEBP"


def test_api_search_json_url(
    client: TestClient, image_server: ImageServer, photos: dict[str, np.ndarray]
) -> None:
    url = image_server.add("q/chelsea-rot.jpg", encode(rotate90(photos["chelsea"])))
    response = client.post("/api/search", json={"url": url, "top_k": 2})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert 1 <= len(results) <= 2 and results[0]["id"] == "chelsea"


def test_api_search_form_url_and_default_top_k(
    client: TestClient, image_server: ImageServer, photos: dict[str, np.ndarray]
) -> None:
    url = image_server.add("q/coffee.jpg", encode(crop(photos["coffee"], 0.5, 0.25)))
    response = client.post("/api/search", data={"url": url})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert 1 <= len(results) <= 5 and results[0]["id"] == "coffee"


def test_page_upload_shows_results(client: TestClient, photos: dict[str, np.ndarray]) -> None:
    home = client.get("/")
    assert home.status_code == 200 and 'type="file"' in home.text and 'name="url"' in home.text
    query = encode(crop(photos["astronaut"], 0.6, 0.1))
    page = client.post("/search", files={"file": ("q.jpg", query, "image/jpeg")})
    assert page.status_code == 200
    assert page.text.index("astronaut") < page.text.index("chelsea") if "chelsea" in page.text else True
    assert "/api/images/" in page.text and "%" in page.text and "SSIM" in page.text and "ORB" in page.text


def test_page_says_it_searched_the_picture_inside_a_screenshot(
    client: TestClient, photos: dict[str, np.ndarray]
) -> None:
    query = encode(screenshot(resize(photos["coffee"], 0.4)))
    page = client.post("/search", files={"file": ("screen.png", query, "image/jpeg")})
    assert page.status_code == 200
    said = re.search(r'id="inner-picture">It holds a picture \((\d+)×(\d+) px at (\d+), (\d+)\)', page.text)
    assert said is not None, page.text
    assert max(abs(int(a) - b) for a, b in zip(said.groups(), (240, 160, 236, 112), strict=True)) <= 3
    plain = client.post("/search", files={"file": ("q.jpg", encode(photos["coffee"]), "image/jpeg")})
    assert plain.status_code == 200 and 'id="inner-picture"' not in plain.text


def test_page_readable_errors(client: TestClient) -> None:
    page = client.post("/search", files={"file": ("notes.jpg", b"just some text", "image/jpeg")})
    assert page.status_code == 415
    assert 'role="alert"' in page.text and "image" in page.text
    page = client.post("/search", data={"url": "http://10.0.0.1/x.jpg"})
    assert page.status_code == 400 and 'role="alert"' in page.text
    page = client.post("/search", data={})
    assert page.status_code == 400 and "no query image" in page.text


def test_api_errors_are_json_with_status(client: TestClient, image_server: ImageServer) -> None:
    cases = [
        (dict(files={"file": ("x.jpg", b"plain text, not an image", "image/jpeg")}), 415),
        (dict(files={"file": ("x.jpg", encode(np.zeros((50, 50, 3), np.uint8))[:150], "image/jpeg")}), 422),
        (dict(json={"url": "ftp://example.com/a.jpg"}), 400),
        (dict(json={"url": image_server.url("nothing-here.jpg")}), 502),
        (dict(json={"url": "http://127.0.0.1:1/x.jpg", "top_k": 0}), 400),
        (dict(json={"top_k": 3}), 400),
        (dict(content=b"raw", headers={"content-type": "text/plain"}), 400),
    ]
    for kwargs, status in cases:
        response = client.post("/api/search", **kwargs)  # type: ignore[arg-type]
        assert response.status_code == status, (kwargs, response.text)
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]


def test_oversized_upload_gets_413(client: TestClient) -> None:
    big = b"\xff\xd8" + b"0" * (3 * 1024 * 1024)
    response = client.post("/api/search", files={"file": ("big.jpg", big, "image/jpeg")})
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]


def test_ssrf_guard_on_query_urls(settings: Settings, make_settings: Callable[..., Settings]) -> None:
    strict = make_settings(fetch_allow=[], db=settings.db, index_on_start=False)
    with TestClient(create_app(strict)) as client:
        for url in [
            "http://127.0.0.1:5000/x.jpg",
            "http://10.0.0.1/x.jpg",
            "http://[::1]/x.jpg",
            "http://169.254.169.254/latest/meta-data/",
        ]:
            response = client.post("/api/search", json={"url": url})
            assert response.status_code == 400, (url, response.text)
            assert response.json()["detail"]


def test_legacy_routes(client: TestClient, image_server: ImageServer, photos: dict[str, np.ndarray]) -> None:
    response = client.post("/upload/", files={"file": ("q.jpg", encode(photos["coffee"]), "image/jpeg")})
    assert response.status_code == 200, response.text
    urls = response.json()["similar_images"]
    assert 1 <= len(urls) <= 5 and urls[0] == image_server.url("g/coffee.jpg")
    url = image_server.add("q/rocket.jpg", encode(rotate90(photos["rocket"])))
    response = client.post("/upload_from_url/", data={"image_url": url})
    assert response.status_code == 200, response.text
    assert response.json()["similar_images"][0] == image_server.url("g/rocket.jpg")
    assert client.post("/upload/", files={"file": ("x.txt", b"nope", "text/plain")}).status_code == 415
    assert client.post("/upload_from_url/", data={}).status_code == 400


def test_openapi_documents_the_api(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/health", "/upload/", "/upload_from_url/"} <= set(schema["paths"])
    content = schema["paths"]["/api/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert client.get("/docs").status_code == 200
