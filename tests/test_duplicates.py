"""Duplicate groups: copies grouped with their original and read out, look-alikes kept apart, decisions kept."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import crop, encode, rotate90
from fastapi.testclient import TestClient
from test_cli import run_cli

from pictrace.config import Settings
from pictrace.duplicates import Group, partition
from pictrace.gallery import load_gallery
from pictrace.service import Service
from pictrace.web import create_app


def mirror(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, ::-1])


def warp(rgb: np.ndarray) -> np.ndarray:
    """The same scene seen from another angle: a clear perspective."""
    h, w = rgb.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[0.2 * w, 0.2 * h], [w, 0], [w, h], [0.2 * w, 0.8 * h]])
    return np.ascontiguousarray(cv2.warpPerspective(rgb, cv2.getPerspectiveTransform(src, dst), (w, h)))


def write_gallery(tmp_path: Path, settings: Settings, photos: dict[str, np.ndarray]) -> dict[str, str]:
    images = {
        "astronaut": photos["astronaut"],
        "astronaut-crop": crop(photos["astronaut"], 0.6, 0.2),
        "astronaut-turned": rotate90(photos["astronaut"]),
        "astronaut-mirror": mirror(photos["astronaut"]),
        "chelsea": photos["chelsea"],
        "chelsea-angle": warp(photos["chelsea"]),
        "coffee": photos["coffee"],
        "rocket": photos["rocket"],
    }
    (tmp_path / "g").mkdir(exist_ok=True)
    for name, rgb in images.items():
        (tmp_path / "g" / f"{name}.png").write_bytes(encode(rgb, "PNG"))
    settings.db.write_text(json.dumps([{"id": name, "url": f"g/{name}.png"} for name in images]))
    return {name: f"g/{name}.png" for name in images}


async def started(settings: Settings, ingest: bool = True) -> Service:
    service = await Service.start(settings)
    if ingest:
        report = await service.ingestor.ingest_gallery(load_gallery(settings.db))
        assert not report.failed
    return service


def names(group: Group) -> list[str]:
    return [m.facts.entry_id for m in group.members]


@pytest.fixture
def gallery(tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]) -> Settings:
    settings = make_settings()
    write_gallery(tmp_path, settings, photos)
    return settings


async def test_crop_rotation_and_mirror_join_their_original_which_is_kept(gallery: Settings) -> None:
    service = await started(gallery)
    try:
        total, groups = service.duplicates.page()
        assert total == 1, [names(g) for g in groups]
        group = groups[0]
        assert group.tier == "copy" and group.keeper.entry_id == "astronaut"
        assert sorted(names(group)) == ["astronaut", "astronaut-crop", "astronaut-mirror", "astronaut-turned"]
        edits = {m.facts.entry_id: m.edit for m in group.members}
        assert edits["astronaut"] is None
        crop_edit, turned, mirrored = edits["astronaut-crop"], edits["astronaut-turned"], edits["astronaut-mirror"]
        assert crop_edit is not None and turned is not None and mirrored is not None
        # the crop shows 60 % of each side from 20 % in: (102, 102, 409, 409) of 512 x 512
        assert all(abs(a - b) <= 6 for a, b in zip(crop_edit.crop, (102, 102, 409, 409), strict=True))
        assert not crop_edit.flip and abs(crop_edit.rotation) < 2 and abs(crop_edit.scale - 1) < 0.05
        assert abs(abs(turned.rotation) - 90) < 2 and not turned.flip
        assert mirrored.flip and abs(mirrored.rotation) < 2 and mirrored.crop_fraction > 0.95
        assert not any(e.border for e in (crop_edit, turned, mirrored))
        # the same group by any member's sha256, and by its id
        assert service.duplicates.group(group.members[2].facts.sha256).id == group.id
        assert service.duplicates.group(group.id).keeper == group.keeper
    finally:
        await service.close()


async def test_another_view_of_a_scene_is_similar_not_a_copy(gallery: Settings) -> None:
    service = await started(gallery)
    try:
        ids = service.catalogue.image_facts(service.catalogue.vec_ids().tolist())
        by_name = {f.entry_id: v for v, f in ids.items()}
        links = service.catalogue.pair_links([by_name["chelsea-angle"]])
        to_cat = [link for link in links if link.other == by_name["chelsea"]]
        assert to_cat and to_cat[0].tier == "similar"  # matched, with a clear perspective
        _, groups = service.duplicates.page()
        assert all("chelsea" not in names(g) for g in groups)
        assert service.duplicates.page(tier="exact")[0] == 0
    finally:
        await service.close()


async def test_decisions_stick_through_a_restart_and_a_new_ingest(gallery: Settings) -> None:
    service = await started(gallery)
    try:
        group = service.duplicates.page()[1][0]
        sha = {m.facts.entry_id: m.facts.sha256 for m in group.members}
        service.catalogue.decide_distinct(sha["astronaut"], sha["astronaut-crop"])
        service.catalogue.decide_keep(sha["astronaut-turned"])
    finally:
        await service.close()
    for ingest in (False, True):  # a restart, then an ingest that links everything it finds again
        service = await started(gallery, ingest=ingest)
        try:
            _, groups = service.duplicates.page()
            assert len(groups) == 1
            assert groups[0].keeper.entry_id == "astronaut-turned" and groups[0].decided
            # the crop and the original are "not duplicates": no link may join them, directly or not
            assert "astronaut-crop" not in names(groups[0])
            assert "astronaut-crop" in [f.entry_id for f in groups[0].similar]
        finally:
            await service.close()


def test_partition_joins_strongest_links_first_and_never_a_separated_pair() -> None:
    links = [(1, 2, 90), (2, 3, 80), (3, 4, 30), (5, 6, 40)]
    assert partition(links, [(7, "p"), (8, "p")]) == [[1, 2, 3, 4], [5, 6], [7, 8]]
    # 1 and 4 are not duplicates: the weakest link that would join them is left out
    assert partition(links, [], apart=[(1, 4)]) == [[1, 2, 3], [5, 6]]
    # a weak link brings a single image in, but does not merge two groups of several (look-alikes)
    weak = [(1, 2, 90), (3, 4, 80), (2, 3, 30), (4, 5, 30)]
    assert partition(weak, [], join_min_inliers=40) == [[1, 2], [3, 4, 5]]
    # a strong link merges two groups only when a second link between them agrees (one may be an accident:
    # the same black corners of two pictures turned by one angle)
    assert partition(weak, [], join_min_inliers=0) == [[1, 2], [3, 4, 5]]
    assert partition([*weak, (1, 4, 50)], [], join_min_inliers=0) == [[1, 2, 3, 4, 5]]
    assert partition([*weak, (1, 4, 50)], [], join_min_inliers=40) == [[1, 2, 3, 4, 5]]  # 2-3 agrees
    assert partition([(1, 2, 90), (3, 4, 80), (1, 4, 50)], [], join_min_inliers=40) == [[1, 2], [3, 4]]


TOKEN = "dups-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_api_lists_groups_draws_pair_evidence_and_takes_decisions(gallery: Settings, tmp_path: Path) -> None:
    await (await started(gallery)).close()
    settings = gallery.model_copy(update={"api_token": TOKEN})
    with TestClient(create_app(settings)) as client:
        page = client.get("/api/duplicates").json()
        assert page["total"] == 1 and page["offset"] == 0
        group = page["groups"][0]
        roles = {m["id"]: m for m in group["members"]}
        assert group["members"][0]["role"] == "keeper" and group["members"][0]["id"] == "astronaut"
        assert "mirrored" in roles["astronaut-mirror"]["edit"]["summary"]
        assert "rotated" in roles["astronaut-turned"]["edit"]["summary"]
        assert roles["astronaut-crop"]["edit"]["summary"].startswith("crop")
        assert client.get("/api/duplicates", params={"tier": "exact"}).json()["total"] == 0
        assert client.get("/api/duplicates", params={"min_size": 5}).json()["total"] == 0
        assert client.get("/api/duplicates", params={"limit": 0}).status_code == 422
        assert client.get(f"/api/duplicates/{group['id']}").json() == group
        missing = client.get("/api/duplicates/0000000000000000")
        assert missing.status_code == 404 and "detail" in missing.json()
        evidence = client.get(roles["astronaut-crop"]["evidence_url"])
        assert evidence.status_code == 200 and evidence.content[:4] == b"\x89PNG"
        sha = {m["id"]: m["sha256"] for m in group["members"]}
        split = {"sha256_a": sha["astronaut"], "sha256_b": sha["astronaut-crop"]}
        assert client.post("/api/duplicates/not-duplicates", json=split).status_code == 401
        decided = client.post("/api/duplicates/not-duplicates", json=split, headers=AUTH).json()
        assert "astronaut-crop" not in [m["id"] for m in decided["group"]["members"]]
        keep = {"sha256": sha["astronaut-turned"], "delete_others": True}
        kept = client.post("/api/duplicates/keep", json=keep, headers=AUTH).json()
        assert sorted(kept["deleted"]) == sorted([sha["astronaut"], sha["astronaut-mirror"]])
        assert client.get(f"/api/images/{sha['astronaut']}/thumbnail").status_code == 404
        # with the original gone nothing keeps the crop apart: it matches the turned copy, which stays the keeper
        assert [(m["id"], m["role"]) for m in kept["group"]["members"]] == [
            ("astronaut-turned", "keeper"),
            ("astronaut-crop", "copy"),
        ]


async def test_cli_prints_one_row_per_member(gallery: Settings, tmp_path: Path) -> None:
    await (await started(gallery)).close()
    done = run_cli("duplicates", "--csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert sorted(r["id"] for r in rows) == ["astronaut", "astronaut-crop", "astronaut-mirror", "astronaut-turned"]
    assert {r["group"] for r in rows} == {rows[0]["group"]} and {r["tier"] for r in rows} == {"copy"}
    assert [r["role"] for r in rows if r["id"] == "astronaut"] == ["keeper"]
    as_json = json.loads(run_cli("duplicates", "--json", "--tier", "copy", cwd=tmp_path).stdout)
    assert len(as_json) == 1 and as_json[0]["size"] == 4
    assert json.loads(run_cli("duplicates", "--json", "--tier", "exact", cwd=tmp_path).stdout) == []
