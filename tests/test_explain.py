"""Evidence pictures and the bounded in-memory query store they need; the gallery page; verdicts end to end."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ImageServer, crop, encode
from fastapi.testclient import TestClient

from pictrace.config import Settings
from pictrace.errors import NotFoundError
from pictrace.explain import QueryMemory, difference_map, inlier_pairs
from pictrace.features.extract import orb_of
from pictrace.features.orb import extract_orb, match_orb
from pictrace.matching.transform import to_pixel_homography
from pictrace.schemas import QueryInfo, SearchResult
from pictrace.tuning import Tuning
from pictrace.web import create_app

LOCAL = ["astronaut", "chelsea", "coffee", "rocket", "camera"]


def result() -> SearchResult:
    return SearchResult(query=QueryInfo(sha256="0" * 64, width=1, height=1), results=[], took_ms=1.0)


# --- the query memory ---------------------------------------------------------------------------------------


def test_memory_keeps_and_forgets_after_ttl() -> None:
    memory = QueryMemory(ttl_s=0.3, max_entries=4, max_bytes=10_000)
    key = memory.keep(b"x" * 100, result())
    assert key is not None and len(key) >= 20
    assert memory.get(key).data == b"x" * 100
    time.sleep(0.4)
    with pytest.raises(NotFoundError, match="no longer kept"):
        memory.get(key)
    assert len(memory) == 0 and memory.nbytes == 0


def test_memory_is_bounded_by_entries_and_bytes() -> None:
    memory = QueryMemory(ttl_s=60, max_entries=3, max_bytes=1000)
    keys = [memory.keep(bytes([i]) * 100, result()) for i in range(5)]
    assert len(memory) == 3
    with pytest.raises(NotFoundError):
        memory.get(str(keys[0]))
    assert memory.get(str(keys[4])).data[:1] == b"\x04"
    memory.keep(b"y" * 950, result())  # pushes out the older ones to stay within 1000 bytes
    assert memory.nbytes == 950 and len(memory) == 1
    assert memory.keep(b"z" * 1001, result()) is None  # alone over the cap: not kept at all


def test_memory_disabled_keeps_nothing() -> None:
    memory = QueryMemory(ttl_s=0, max_entries=3, max_bytes=1000)
    assert memory.keep(b"abc", result()) is None and len(memory) == 0


# --- drawing -------------------------------------------------------------------------------------------------


def test_difference_map_highlights_an_added_caption(photos: dict[str, np.ndarray]) -> None:
    gallery = photos["coffee"]
    query = gallery.copy()
    cv2.rectangle(query, (40, 300), (360, 370), (255, 255, 255), -1)
    cv2.putText(query, "SALE -50%", (50, 350), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (200, 0, 0), 3)
    heat = difference_map(query, gallery, np.eye(3)).astype(float).mean(axis=2)
    inside = heat[305:365, 45:355].mean()
    outside = np.concatenate([heat[:250].ravel(), heat[:, 400:].ravel()]).mean()
    assert inside > outside + 60, (inside, outside)


def test_inlier_pairs_agree_with_the_homography(photos: dict[str, np.ndarray]) -> None:
    tuning = Tuning()
    gallery = photos["astronaut"]
    query = crop(gallery, 0.6, 0.2)
    q, g = orb_of(query, tuning), orb_of(gallery, tuning)  # as the search extracts them
    match = match_orb(q, g)
    assert match.homography is not None
    hom = to_pixel_homography(match.homography, q.scale, g.scale)
    qpts, gpts = inlier_pairs(query, g, hom, False, tuning)
    assert len(qpts) >= match.inliers * 0.8
    offset = np.array([gallery.shape[1] * 0.2, gallery.shape[0] * 0.2])
    assert np.median(np.linalg.norm(qpts + offset - gpts, axis=1)) < 3


# --- through the app -----------------------------------------------------------------------------------------


@pytest.fixture
def app_settings(
    tmp_path: Path, image_server: ImageServer, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> Settings:
    (tmp_path / "g").mkdir()
    entries: list[dict[str, str]] = []
    for name in LOCAL:
        (tmp_path / "g" / f"{name}.jpg").write_bytes(encode(photos[name]))
        entries.append({"id": name, "url": f"g/{name}.jpg", "title": name.title()})
    entries.append({"id": "coins", "url": image_server.add("coins.jpg", encode(photos["coins"]))})
    entries.append({"id": "broken", "url": image_server.add("broken.jpg", b"this is not an image")})
    settings = make_settings(index_on_start=True)
    settings.db.write_text(json.dumps(entries))
    return settings


@pytest.fixture
def client(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings)) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            images = client.get("/api/health").json()["images"]
            if images["indexed"] >= 6 and images["pending"] == 0:
                break
            time.sleep(0.2)
        yield client


def png_size(data: bytes) -> tuple[int, int]:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img.shape[1], img.shape[0]


def test_copy_gets_verdict_transform_and_evidence(client: TestClient, photos: dict[str, np.ndarray]) -> None:
    query = encode(np.ascontiguousarray(np.rot90(crop(photos["rocket"], 0.6, 0.2))))
    body = client.post("/api/search", files={"file": ("q.jpg", query, "image/jpeg")}).json()
    best = body["results"][0]
    assert best["id"] == "rocket" and best["verdict"] == "copy"
    t = best["transform"]
    assert abs(t["rotation"] - 90) < 2 and not t["flip"] and 0.3 < t["crop_fraction"] < 0.42
    assert body["query"]["id"] and best["evidence_url"] == f"/api/explain/{body['query']['id']}/{best['sha256']}"
    png = client.get(best["evidence_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    width, height = png_size(png.content)
    assert width > 2.5 * 320 and height > 320  # query | gallery | difference map


def test_exact_and_remote_gallery_evidence(client: TestClient, photos: dict[str, np.ndarray]) -> None:
    body = client.post("/api/search", files={"file": ("q.jpg", encode(photos["coins"]), "image/jpeg")}).json()
    best = body["results"][0]
    assert best["id"] == "coins" and best["verdict"] == "exact" and best["exact"]
    png = client.get(best["evidence_url"])  # drawn on the stored thumbnail: the original is remote
    assert png.status_code == 200 and png_size(png.content)[1] > 320


def test_explain_unknown_query_or_image_is_404(client: TestClient, photos: dict[str, np.ndarray]) -> None:
    body = client.post("/api/search", files={"file": ("q.jpg", encode(photos["chelsea"]), "image/jpeg")}).json()
    qid = body["query"]["id"]
    other = client.post("/api/search", files={"file": ("q.jpg", encode(photos["camera"]), "image/jpeg")}).json()
    response = client.get(f"/api/explain/{qid}/{other['results'][0]['sha256']}")
    assert response.status_code == 404 and "not among" in response.json()["detail"]
    response = client.get(f"/api/explain/not-a-query/{body['results'][0]['sha256']}")
    assert response.status_code == 404 and "search again" in response.json()["detail"]


def test_evidence_off_when_ttl_is_zero(
    app_settings: Settings, make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    settings = app_settings.model_copy(update={"explain_ttl_s": 0})
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/api/health").json()["images"]["indexed"] < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        body = client.post("/api/search", files={"file": ("q.jpg", encode(photos["coffee"]), "image/jpeg")}).json()
        assert body["query"]["id"] is None and body["results"][0]["evidence_url"] is None
        assert client.app.state.service.queries.nbytes == 0  # type: ignore[attr-defined]


def test_results_page_has_three_sections(client: TestClient, photos: dict[str, np.ndarray]) -> None:
    query = encode(crop(photos["astronaut"], 0.6, 0.1))
    page = client.post("/search", files={"file": ("q.jpg", query, "image/jpeg")})
    assert page.status_code == 200
    for key, title in (("exact", "Exact"), ("copy", "Copies"), ("similar", "Similar")):
        assert f'id="section-{key}"' in page.text and f">{title} " in page.text
    copies = page.text.split('id="section-copy"')[1].split("</section>")[0]
    assert 'data-verdict="copy"' in copies and "Astronaut" in copies and "/api/explain/" in copies
    assert "Yours shows 36% of it" in copies
    assert "Chelsea" not in page.text  # unrelated: not shown at all


def test_gallery_page_lists_pages_and_failures(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    page = client.get("/gallery")
    assert page.status_code == 200
    assert page.text.count('class="tile"') == 6 and "Page 1 of 1" in page.text
    # which entries failed, and why, is the operator's to see (tests/test_safety.py)
    assert "broken.jpg" not in page.text and "could not be indexed" in page.text
    assert "/api/images/" in page.text and 'alt="astronaut"' in page.text
    monkeypatch.setattr("pictrace.web.pages.GALLERY_PAGE_SIZE", 4)
    first, second = client.get("/gallery"), client.get("/gallery?page=2")
    assert first.text.count('class="tile"') == 4 and 'rel="next"' in first.text
    assert second.text.count('class="tile"') == 2 and "Page 2 of 2" in second.text and 'rel="prev"' in second.text
    assert client.get("/gallery?page=99").text.count('class="tile"') == 2  # clamped to the last page


def test_similar_without_geometry_is_drawn_side_by_side(photos: dict[str, np.ndarray]) -> None:
    from pictrace.explain import render_evidence
    from pictrace.schemas import ComponentScores, Match

    gallery = photos["chelsea"]
    match = Match(
        id="cat", url="g/cat.jpg", original_url="/x", sha256="1" * 64, score=0.5,
        scores=ComponentScores(embedding=0.85, ssim=0.2, orb=0.0), verdict="similar", thumbnail_url="/t",
    )
    png = render_evidence(photos["coffee"], gallery, (gallery.shape[1], gallery.shape[0]), extract_orb(gallery),
                          match, Tuning())
    width, height = png_size(png)
    q_w = round(photos["coffee"].shape[1] * 320 / photos["coffee"].shape[0])
    g_w = round(gallery.shape[1] * 320 / gallery.shape[0])
    assert width == q_w + g_w + 8 and height == 320 + 2 * 26  # two panels, no difference map
