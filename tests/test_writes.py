"""Writes through the API (add, delete, reindex): bearer token, SSRF-guarded URLs, durable across restarts."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import ImageServer, crop, encode
from fastapi.testclient import TestClient

from pictrace.cli import main as cli_main
from pictrace.config import Settings
from pictrace.web import create_app

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GALLERY = ("coffee", "rocket", "camera")


def sources(settings: Settings) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(settings.catalogue_path) as conn:
        return list(conn.execute("SELECT url, origin, entry_id FROM sources ORDER BY url"))


def ids_found(client: TestClient, data: bytes) -> list[str]:
    response = client.post("/api/search", files={"file": ("q.jpg", data, "image/jpeg")}, data={"top_k": "10"})
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["results"]]


@pytest.fixture
def settings(
    image_server: ImageServer, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> Settings:
    settings = make_settings(api_token=TOKEN)
    entries = [{"id": n, "url": image_server.add(f"g/{n}.jpg", encode(photos[n]))} for n in GALLERY]
    settings.db.write_text(json.dumps(entries))
    return settings


def ingest(settings: Settings) -> None:
    assert cli_main(["--data-dir", str(settings.data_dir), "index", str(settings.db), "--quiet"]) == 0


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    ingest(settings)
    with TestClient(create_app(settings)) as client:
        yield client


# --- who may write --------------------------------------------------------------------------------------


def test_writes_disabled_without_a_token_say_how_to_enable(
    make_settings: Callable[..., Settings], photos: dict[str, np.ndarray]
) -> None:
    with TestClient(create_app(make_settings(api_token=None))) as client:
        calls = [
            client.post("/api/images", files={"file": ("a.jpg", encode(photos["coffee"]), "image/jpeg")}),
            client.post("/api/images", json={"url": "https://example.com/a.jpg"}, headers=AUTH),
            client.delete("/api/images/" + "0" * 64, headers=AUTH),
            client.post("/api/reindex", headers=AUTH),
        ]
        for response in calls:
            assert response.status_code == 403, response.text
            assert "PICTRACE_API_TOKEN" in response.json()["detail"]
        # reads need nothing
        assert client.get("/api/health").status_code == 200
        assert client.get("/api/health").json()["images"]["indexed"] == 0


def test_wrong_or_missing_token_is_401_and_writes_nothing(
    client: TestClient, settings: Settings, photos: dict[str, np.ndarray]
) -> None:
    before = sources(settings)
    upload = {"file": ("a.jpg", encode(photos["chelsea"]), "image/jpeg")}
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
    ):
        response = client.post("/api/images", files=upload, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["detail"]
    assert client.post("/api/reindex").status_code == 401
    assert client.delete("/api/images/" + "0" * 64).status_code == 401
    assert sources(settings) == before
    # a search (a read) needs no token
    assert ids_found(client, encode(photos["coffee"]))[0] == "coffee"


def test_openapi_declares_the_bearer_scheme(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "apiToken" in schema["components"]["securitySchemes"]
    assert schema["paths"]["/api/images"]["post"]["security"] == [{"apiToken": []}]
    assert "security" not in schema["paths"]["/api/search"]["post"]


# --- add ------------------------------------------------------------------------------------------------


def test_add_upload_with_id_and_metadata(client: TestClient, settings: Settings, photos: dict[str, np.ndarray]) -> None:
    data = encode(photos["chelsea"])
    response = client.post(
        "/api/images",
        files={"file": ("../../cat.jpg", data, "text/html")},
        data={"id": "cat-1", "metadata": json.dumps({"title": "Chelsea"})},
        headers=AUTH,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["added"] is True and body["id"] == "cat-1" and body["url"] == f"upload:{body['sha256']}"
    assert (body["width"], body["height"]) == photos["chelsea"].shape[1::-1]
    assert client.get(body["thumbnail_url"]).status_code == 200
    assert (f"upload:{body['sha256']}", "api", "cat-1") in sources(settings)
    # searchable at once, with its id and metadata; its (missing) original is a 404, not a 500
    query = client.post("/api/search", files={"file": ("q.jpg", encode(crop(photos["chelsea"])), "image/jpeg")})
    best = query.json()["results"][0]
    assert best["id"] == "cat-1" and best["metadata"] == {"title": "Chelsea"}
    assert client.get(f"/api/images/{body['sha256']}/original").status_code == 404
    assert client.get("/api/health").json()["images"]["indexed"] == len(GALLERY) + 1
    # the same bytes again: stored once, answered 200
    again = client.post("/api/images", files={"file": ("x.jpg", data, "image/jpeg")}, headers=AUTH)
    assert again.status_code == 200 and again.json()["added"] is False
    assert client.get("/api/health").json()["images"]["indexed"] == len(GALLERY) + 1


def test_add_by_url_json_and_form(
    client: TestClient, settings: Settings, image_server: ImageServer, photos: dict[str, np.ndarray]
) -> None:
    url = image_server.add("new/astronaut.png", encode(photos["astronaut"], "PNG"))
    response = client.post("/api/images", json={"url": url, "metadata": {"k": 1}}, headers=AUTH)
    assert response.status_code == 201, response.text
    assert response.json()["id"] == url and response.json()["url"] == url
    assert (url, "api", url) in sources(settings)
    assert ids_found(client, encode(photos["astronaut"]))[0] == url
    url2 = image_server.add("new/brick.jpg", encode(photos["brick"]))
    form = client.post("/api/images", data={"url": url2, "id": "brick"}, headers=AUTH)
    assert form.status_code == 201, form.text
    assert ids_found(client, encode(photos["brick"]))[0] == "brick"


def test_add_refuses_bad_input_without_writing(
    client: TestClient, settings: Settings, image_server: ImageServer
) -> None:
    before = sources(settings)
    html = image_server.add("page.jpg", b"<!DOCTYPE html><html><body>hi</body></html>")
    cases: list[tuple[dict[str, Any], int]] = [
        (dict(files={"file": ("a.jpg", b"not an image", "image/jpeg")}), 415),
        (dict(json={"url": html}), 415),
        (dict(json={"url": image_server.url("nothing.jpg")}), 502),
        (dict(json={"url": "ftp://example.com/a.jpg"}), 400),
        (dict(json={"url": "http://user:pw@example.com/a.jpg"}), 400),
        (dict(json={"id": "no url"}), 400),
        (dict(data={"url": html, "metadata": "[1, 2]"}), 400),
        (dict(data={"url": html, "metadata": "{not json"}), 400),
        (dict(data={"url": html, "metadata": json.dumps({"x": "y" * 20000})}), 400),
        (dict(content=b"raw", headers={"content-type": "text/plain"}), 400),
    ]
    for kwargs, status in cases:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        response = client.post("/api/images", headers=headers, **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert response.json()["detail"]
    assert sources(settings) == before


def test_add_by_url_is_ssrf_guarded(
    settings: Settings, make_settings: Callable[..., Settings], image_server: ImageServer, photos: dict[str, np.ndarray]
) -> None:
    strict = make_settings(api_token=TOKEN, fetch_allow=[])
    url = image_server.add("internal.jpg", encode(photos["coffee"]))
    with TestClient(create_app(strict)) as client:
        for target in (url, "http://10.0.0.1/x.jpg", "http://[::1]/x.jpg", "http://2130706433/x.jpg"):
            response = client.post("/api/images", json={"url": target}, headers=AUTH)
            assert response.status_code == 400, (target, response.text)
        assert image_server.hits["/internal.jpg"] == 0
        assert client.get("/api/health").json()["images"]["indexed"] == 0


# --- delete ---------------------------------------------------------------------------------------------


def test_delete_is_final_also_after_restart_and_reingest(
    settings: Settings, photos: dict[str, np.ndarray], image_server: ImageServer
) -> None:
    ingest(settings)
    rocket = encode(photos["rocket"])
    stale_index = settings.data_dir / "stale.faiss"
    shutil.copy(settings.index_path, stale_index)  # the index as it was before the delete
    with TestClient(create_app(settings)) as client:
        sha = client.post("/api/search", files={"file": ("q.jpg", rocket, "image/jpeg")}).json()["results"][0]
        assert sha["id"] == "rocket"
        response = client.delete(f"/api/images/{sha['sha256']}", headers=AUTH)
        assert response.status_code == 200, response.text
        assert "rocket" not in ids_found(client, rocket)
        assert client.get(sha["thumbnail_url"]).status_code == 404
        assert client.delete(f"/api/images/{sha['sha256']}", headers=AUTH).status_code == 404
        assert client.delete("/api/images/not-a-hash", headers=AUTH).status_code == 404
    # a crash that lost the index write: the stale index still holds the vector; the catalogue wins at start
    shutil.copy(stale_index, settings.index_path)
    with TestClient(create_app(settings)) as client:
        assert "rocket" not in ids_found(client, rocket)
        assert client.get("/api/health").json()["images"]["indexed"] == len(GALLERY) - 1
    # db.json still lists it: the next ingest keeps it out (not fetched, not a failure)
    ingest(settings)
    with TestClient(create_app(settings)) as client:
        assert "rocket" not in ids_found(client, rocket)
        with sqlite3.connect(settings.catalogue_path) as conn:
            assert conn.execute("SELECT 1 FROM sources WHERE entry_id = 'rocket'").fetchone() is None
        assert client.get("/api/health").json()["images"]["failed"] == 0
        # an explicit add brings it back
        again = client.post("/api/images", files={"file": ("r.jpg", rocket, "image/jpeg")}, headers=AUTH)
        assert again.status_code == 201, again.text
        assert ids_found(client, rocket)[0] == sha["sha256"]


# --- reindex --------------------------------------------------------------------------------------------


def test_reindex_rebuilds_from_the_catalogue(client: TestClient, photos: dict[str, np.ndarray]) -> None:
    indexes = client.app.state.service.indexes  # type: ignore[attr-defined]
    indexes.local.remove(indexes.vector.ids().tolist())  # the local-feature index too (it finds crops alone)
    indexes.vector.remove(indexes.vector.ids())  # the in-memory index loses everything
    assert "camera" not in ids_found(client, encode(crop(photos["camera"])))
    response = client.post("/api/reindex", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {"vectors": len(GALLERY)}
    assert len(indexes.vector) == len(GALLERY)
    assert ids_found(client, encode(crop(photos["camera"])))[0] == "camera"


def test_reindex_is_refused_while_an_ingest_runs(client: TestClient) -> None:
    lock = client.app.state.service.ingestor._lock  # type: ignore[attr-defined]
    client.portal.call(lock.acquire)  # type: ignore[union-attr]
    try:
        response = client.post("/api/reindex", headers=AUTH)
        assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
        assert "ingest" in response.json()["detail"]
    finally:
        client.portal.call(lock.release)  # type: ignore[union-attr]
    assert client.post("/api/reindex", headers=AUTH).status_code == 200


def test_cli_reindex_replaces_a_bad_index_file(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    ingest(settings)
    settings.index_path.write_bytes(b"PICTRACE-FAISS-1\n{}\ngarbage")
    assert cli_main(["--data-dir", str(settings.data_dir), "reindex"]) == 0
    assert f"{len(GALLERY)} vectors" in capsys.readouterr().out
    from pictrace.features.embed import build_embedder
    from pictrace.indexes.vector import FaissIndex, IndexInfo

    embedder = build_embedder(settings.backbone, settings.model_path, threads=1)
    index = FaissIndex.open(settings.index_path, IndexInfo(embedder.name, embedder.fingerprint, embedder.dim))
    assert len(index) == len(GALLERY)


# --- several images in one request ------------------------------------------------------------------------


def test_add_several_files_answers_one_entry_each(
    client: TestClient, settings: Settings, photos: dict[str, np.ndarray]
) -> None:
    from pillow_heif import register_heif_opener

    register_heif_opener()
    heic = encode(photos["astronaut"], "HEIF", quality=90)
    files = [
        ("file", ("a.heic", heic, "image/heic")),
        ("file", ("notes.txt", b"not an image at all", "text/plain")),
        ("file", ("coffee.jpg", encode(photos["coffee"]), "image/jpeg")),  # already in the gallery
        ("file", ("cut.jpg", encode(photos["chelsea"])[:2000], "image/jpeg")),  # truncated
        ("file", ("brick.png", encode(photos["brick"], "PNG"), "image/png")),
    ]
    response = client.post("/api/images", files=files, data={"metadata": '{"batch": 1}'}, headers=AUTH)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["filename"], r["status"], r["outcome"]) for r in results] == [
        ("a.heic", 201, "added"),
        ("notes.txt", 415, "refused"),
        ("coffee.jpg", 200, "duplicate"),
        ("cut.jpg", 422, "refused"),
        ("brick.png", 201, "added"),
    ]
    assert results[1]["detail"] and results[1]["image"] is None
    assert results[0]["image"]["width"] == photos["astronaut"].shape[1]
    assert client.get("/api/health").json()["images"]["indexed"] == len(GALLERY) + 2
    best = client.post("/api/search", files={"file": ("q.jpg", encode(crop(photos["brick"])), "image/jpeg")})
    assert best.json()["results"][0]["metadata"] == {"batch": 1}


def test_add_files_field_and_single_file_keeps_its_answer(client: TestClient, photos: dict[str, np.ndarray]) -> None:
    one = client.post("/api/images", files={"files": ("b.jpg", encode(photos["brick"]), "image/jpeg")}, headers=AUTH)
    assert one.status_code == 200 and [r["status"] for r in one.json()["results"]] == [201]
    cat = {"file": ("c.jpg", encode(photos["chelsea"]), "image/jpeg")}
    single = client.post("/api/images", files=cat, headers=AUTH)
    assert single.status_code == 201 and single.json()["added"] is True and "results" not in single.json()
    named = client.post(
        "/api/images",
        files=[("file", ("x.jpg", encode(photos["coins"]), "image/jpeg"))] * 2,
        data={"id": "one-name-for-two"},
        headers=AUTH,
    )
    assert named.status_code == 400 and "id" in named.json()["detail"]
