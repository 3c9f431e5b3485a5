"""The match graph: links stored at ingest let a query find what only an intermediate image matches."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import encode

from pictrace.config import Settings
from pictrace.features.orb import centre_weights
from pictrace.gallery import load_gallery
from pictrace.graph import Candidates, OwedPairs
from pictrace.service import Service
from pictrace.store import LinkFit
from pictrace.tuning import Tuning


def left(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, : int(rgb.shape[1] * 0.45)])


def right(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, int(rgb.shape[1] * 0.55) :])


def write_gallery(tmp_path: Path, settings: Settings, photos: dict[str, np.ndarray]) -> None:
    """The right part of the astronaut photo is listed *before* the whole photo: when it is ingested there
    is nothing to link it to yet, so its link must come from the whole photo's turn (links go both ways)."""
    images = {
        "right-part": right(photos["astronaut"]),
        "whole": photos["astronaut"],
        "chelsea": photos["chelsea"],
        "coffee": photos["coffee"],
        "rocket": photos["rocket"],
    }
    (tmp_path / "g").mkdir(exist_ok=True)
    for name, rgb in images.items():
        (tmp_path / "g" / f"{name}.jpg").write_bytes(encode(rgb))
    settings.db.write_text(json.dumps([{"id": name, "url": f"g/{name}.jpg"} for name in images]))


async def start_and_ingest(settings: Settings, tuning: Tuning | None = None) -> Service:
    service = await Service.start(settings, tuning=tuning)
    report = await service.ingestor.ingest_gallery(load_gallery(settings.db))
    assert not report.failed
    return service


async def test_a_query_finds_what_only_its_match_matches(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    write_gallery(tmp_path, settings, photos)
    service = await start_and_ingest(settings)
    try:
        query = encode(left(photos["astronaut"]))  # shares no pixel with the right part
        results = {m.id: m for m in service.searcher.search_bytes(query).results}
        assert next(iter(results)) == "whole" and results["whole"].verdict == "copy"
        assert results["whole"].via is None
        linked = results["right-part"]
        assert linked.via == "whole" and linked.verdict == "similar"
        assert linked.scores.orb_inliers == 0  # no direct geometric match: found through the link only
        assert 0 < linked.score < results["whole"].score
        assert not {"chelsea", "coffee", "rocket"} & set(results)

        # without expansion the same query does not find it
        service.searcher.tuning = service.tuning.replace(cascade={"expand_from": 0})
        assert "right-part" not in {m.id for m in service.searcher.search_bytes(query).results}
        service.searcher.tuning = service.tuning

        # deleting the intermediate image deletes its links: nothing leads to the right part any more
        await service.ingestor.remove_image(results["whole"].sha256)
        found = {m.id for m in service.searcher.search_bytes(query).results}
        assert "whole" not in found and "right-part" not in found
    finally:
        await service.close()


async def test_images_ingested_without_links_are_linked_by_the_next_ingest(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    write_gallery(tmp_path, make_settings(), photos)
    service = await start_and_ingest(make_settings(), Tuning().replace(cascade={"graph_candidates": 0}))
    try:
        assert len(service.catalogue.unlinked()) == 5
        assert service.catalogue.links_of(service.catalogue.vec_ids().tolist()) == {}
    finally:
        await service.close()

    service = await start_and_ingest(make_settings())  # nothing new in db.json: only the backfill runs
    try:
        catalogue = service.catalogue
        assert catalogue.unlinked() == []
        names = {r.entry_id: v for v, r in catalogue.records(catalogue.vec_ids().tolist()).items()}
        links = catalogue.links_of([names["whole"]])[names["whole"]]
        assert [other for other, _ in links] == [names["right-part"]]
        assert dict(links)[names["right-part"]] >= service.tuning.check.min_inliers
    finally:
        await service.close()


def test_centre_prior_weights_the_middle_of_the_query_most() -> None:
    points = np.array([[50, 40], [0, 0], [100, 80], [75, 40]], dtype=np.float32)
    weights = centre_weights(points, 100, 80, sigma=0.2)
    assert weights[0] == pytest.approx(1.0)
    assert weights[1] == pytest.approx(weights[2]) and weights[1] < 0.1  # corners count for little
    assert weights[1] < weights[3] < weights[0]
    assert centre_weights(points, 100, 80, sigma=0).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_the_api_and_the_page_say_what_a_result_was_found_through(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    from fastapi.testclient import TestClient

    from pictrace.web import create_app

    settings = make_settings(index_on_start=True)
    write_gallery(tmp_path, settings, photos)
    query = encode(left(photos["astronaut"]))
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # links are stored after an image is counted: wait for the batch
            images = client.get("/api/health").json()["images"]
            if images["indexed"] == 5 and images["pending"] == 0:
                break
            time.sleep(0.2)
        answer = client.post("/api/search", files={"file": ("q.jpg", query, "image/jpeg")})
        assert answer.status_code == 200
        by_id = {m["id"]: m for m in answer.json()["results"]}
        assert by_id["right-part"]["via"] == "whole" and by_id["whole"]["via"] is None
        page = client.post("/search", files={"file": ("q.jpg", query, "image/jpeg")})
        assert page.status_code == 200
        assert "Found through <strong>whole</strong>" in page.text
        assert page.text.count("Found through") == 1


def test_owed_pairs_are_the_earlier_images_best_voted_it_never_matched_itself() -> None:
    """Each image keeps its k best-voted images, later ones included (their votes for it stand for its votes for
    them); it owes a match to those it did not match itself and is not linked to."""
    owed = OwedPairs(k=2, checked=3)  # each image matched its 2 best voted (its candidates) at arrival
    owed.arrived(Candidates(1, [], {}))
    owed.arrived(Candidates(2, [1], {1: 9}))
    owed.arrived(Candidates(3, [1, 2], {1: 20, 2: 5}), [LinkFit(1, 40, "copy", 0.9, None)])  # linked: not owed
    owed.arrived(Candidates(4, [2, 3], {2: 30, 3: 7, 1: 4}))  # 4 votes: fewer than 1's best two (9, 20)
    owed.arrived(Candidates(5, [4, 1], {4: 30, 1: 12, 2: 11}))  # 12 for 1 beats 2's 9: 1 owes 5, no more 2
    expected = [(1, [5]), (2, [4, 5]), (3, [4]), (4, [5])]  # most voted first; none it matched itself
    assert owed.owed() == expected
    owed.arrived(Candidates(5, [1], {1: 99}))  # an image already recorded: ignored
    assert owed.owed() == expected
    assert OwedPairs(k=0, checked=0).owed() == []


async def test_voted_candidates_pass_the_screen_before_the_full_match(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    """At ingest, as in a search, a voted image is fully matched only if the pairs behind its votes agree on a
    homography: the right part's own votes for the whole photo pass; the same candidate with no vote pairs
    behind it is not matched, unless it is one of the nearest vectors (those are matched whatever their votes)."""
    from dataclasses import replace

    from pictrace.graph import link_candidates, verify_links
    from pictrace.indexes.local import Votes

    settings = make_settings()
    write_gallery(tmp_path, settings, photos)
    service = await start_and_ingest(settings)
    try:
        catalogue, tuning = service.catalogue, service.tuning
        names = {r.entry_id: v for v, r in catalogue.records(catalogue.vec_ids().tolist()).items()}
        part, whole = names["right-part"], names["whole"]
        found = link_candidates(catalogue, service.indexes.local, tuning, part)
        assert found is not None and whole in found.others and found.screen is not None
        assert [f.other for f in verify_links(catalogue, tuning, found)] == [whole]
        unbacked = replace(found, screen=Votes({whole: found.votes[whole]}), unscreened=frozenset())
        assert verify_links(catalogue, tuning, unbacked) == []
        assert [f.other for f in verify_links(catalogue, tuning, replace(unbacked, unscreened=frozenset({whole})))] == [
            whole
        ]
        assert [f.other for f in verify_links(catalogue, tuning, replace(unbacked, screen=None))] == [whole]
    finally:
        await service.close()
