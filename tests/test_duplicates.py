"""Duplicate groups: copies grouped with their original and read out, look-alikes kept apart, decisions kept."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import crop, encode, rotate90
from fastapi.testclient import TestClient
from test_cli import run_cli

from pictrace.config import Settings
from pictrace.duplicates import DuplicateGroups, Group
from pictrace.errors import GroupsNotReadyError
from pictrace.gallery import load_gallery
from pictrace.grouping import Grouping, Shape
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
    service.duplicates.refresh()  # the background thread follows within a second; the tests read at once
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
        links = service.catalogue.group_links([by_name["chelsea-angle"], by_name["chelsea"]])
        to_cat = [link for link in links.inside if link.other == by_name["chelsea"]]
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


def shift(dx: float, dy: float, scale: float = 1.0) -> np.ndarray:
    return np.array([[scale, 0, dx], [0, scale, dy], [0, 0, 1]], dtype=float)


def grouped(grouping: Grouping) -> list[list[int]]:
    return sorted(sorted(g) for g in grouping.groups())


def test_a_collage_of_two_photos_does_not_chain_their_groups() -> None:
    """1, 2: photos (400 x 400); 3, 4: crops of them; 5: a collage of two other crops, its left half from 1's
    middle and its right half from 2's (each link's map extends over the whole frame, so the collage's other
    half lands outside the photo); 6: a crop of 3, matched with 3 only."""
    grouping = Grouping(containment=0.8, join_min_inliers=40, max_hops=2)
    sizes = {1: (400, 400), 2: (400, 400), 3: (200, 200), 4: (200, 200), 5: (400, 200), 6: (100, 100)}
    grouping.add_images({v: Shape(w, h, w * h, f"p{v}") for v, (w, h) in sizes.items()})
    links = [
        (3, 1, 300, shift(50, 50)),
        (4, 2, 300, shift(50, 50)),
        (5, 1, 200, shift(150, 100)),
        (5, 2, 200, shift(-50, 100)),
        (5, 3, 200, shift(100, 50)),
        (5, 4, 200, shift(-100, 50)),
        (6, 3, 90, shift(50, 50)),
    ]
    grouping.place(grouping.add_links(links))
    groups = grouped(grouping)  # joining the links transitively made one group of all six
    assert [1, 3, 6] in groups and any({2, 4} <= set(g) for g in groups), groups
    # the collage may join one photo's group (its frame, extended by that photo's fit, may lie inside it), but
    # it never brings the other photo's copies along
    assert not any({1, 2} <= set(g) or {3, 4} <= set(g) for g in groups), groups


def test_grouping_rules_weak_links_decisions_and_restore() -> None:
    grouping = Grouping(containment=0.8, join_min_inliers=40, max_hops=2)
    grouping.add_images({v: Shape(100, 100, 1000 + v, f"p{v}") for v in range(1, 8)})
    grouping.add_images({8: Shape(100, 100, 5, "p1")})  # 1's very pixels: exact, no link needed
    same = shift(0, 0)
    links = [(1, 2, 90, same), (1, 3, 80, same), (4, 5, 30, same), (5, 6, 28, same), (1, 4, 29, same)]
    grouping.place(grouping.add_links(links) | {8})
    # a weak link brings in only an image with no strong link; look-alikes (weak only) pair among themselves
    assert grouped(grouping) == [[1, 2, 3, 8], [4, 5, 6]]
    # not duplicates: 1 and 3 are never in one group again; a kept image anchors its own group
    grouping.place(grouping.set_decisions([(1, 3)], [2]))
    groups = grouped(grouping)
    assert not any({1, 3} <= set(g) for g in groups) and grouping.anchor_of[2] == 2
    # a partition read back from its groups is the same partition
    again = Grouping(containment=0.8, join_min_inliers=40, max_hops=2)
    again.add_images(dict(grouping.shapes))
    again.add_links(links)
    again.set_decisions([(1, 3)], [2])
    again.place(again.restore(list(grouping.groups()), grouping.vias(), grouping.alone()))
    assert grouped(again) == groups
    # an image removed: only its group is placed again
    grouping.place(grouping.remove_images([2]))
    assert not any(2 in g for g in grouped(grouping)) and [4, 5, 6] in grouped(grouping)


def test_exact_twins_looked_up_by_the_caller_link_as_those_found_by_reading_every_image() -> None:
    """An ingest's new images get their exact twins from the catalogue's pixel-hash index: the same exact links
    as reading every known image for them (which cost ~30 ms a tick at 100k), among the images the grouping
    knows only."""
    shapes = {v: Shape(100, 100, 1000 + v, f"p{v % 3}") for v in range(1, 7)}
    read, told = Grouping(), Grouping()
    read.add_images({v: shapes[v] for v in (1, 2)})
    told.add_images({v: shapes[v] for v in (1, 2)})
    later = {v: shapes[v] for v in range(3, 7)}
    catalogue_says = {"p0": [3, 6], "p1": [1, 4, 99], "p2": [2, 5]}  # 99: not known to the grouping (yet)
    assert read.add_images(later) == told.add_images(later, catalogue_says) != set()
    def linked(grouping: Grouping) -> set[tuple[int, int]]:
        return {(a, b) for a, near in grouping._near.items() for b in near if a < b}

    assert linked(read) == linked(told) == {(3, 6), (1, 4), (2, 5)}


def test_links_read_again_touch_only_what_changed() -> None:
    """After an ingest run the groups read every copy link again from the catalogue: a link that did not change
    (its inliers, its fit as stored: float32) leaves its group alone, a changed one has its pair placed again."""
    grouping = Grouping(containment=0.8, join_min_inliers=40, max_hops=2)
    grouping.add_images({v: Shape(100, 100, 1000 + v, f"p{v}") for v in range(1, 5)})
    links = [(1, 2, 90, shift(1.1, 0.3)), (3, 4, 80, shift(0, 0, 1.01))]
    grouping.place(grouping.add_links(links))
    assert grouped(grouping) == [[1, 2], [3, 4]]

    def as_stored(hom: np.ndarray) -> np.ndarray:
        return np.frombuffer(np.asarray(hom, np.float32).tobytes(), np.float32).astype(np.float64).reshape(3, 3)

    assert grouping.add_links([(a, b, n, as_stored(h)) for a, b, n, h in links]) == set()
    assert grouping.add_links([(1, 2, 90, as_stored(shift(1.1, 2.3)))]) == {1, 2}  # refitted
    assert grouping.add_links([(3, 4, 81, as_stored(shift(0, 0, 1.01)))]) == {3, 4}  # matched again, one more inlier
    grouping.place({1, 2, 3, 4})
    assert grouped(grouping) == [[1, 2], [3, 4]]


TOKEN = "dups-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def first_page(client: TestClient) -> Any:
    """The list once the groups are ready: a start reads them back in the background, and until then the API
    says so (503, Retry-After) rather than answering with groups it does not have yet."""
    deadline = time.monotonic() + 60
    answer = client.get("/api/duplicates")
    while answer.status_code == 503 and time.monotonic() < deadline:
        assert answer.json()["detail"] and answer.headers["Retry-After"]
        time.sleep(0.1)
        answer = client.get("/api/duplicates")
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_api_lists_groups_draws_pair_evidence_and_takes_decisions(gallery: Settings, tmp_path: Path) -> None:
    await (await started(gallery)).close()
    settings = gallery.model_copy(update={"api_token": TOKEN})
    with TestClient(create_app(settings)) as client:
        page = first_page(client)
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


async def test_members_page_within_a_group_and_the_list_shows_the_first_few(gallery: Settings) -> None:
    service = await started(gallery)
    try:
        total, groups = service.duplicates.page(members=2)
        group = groups[0]
        assert total == 1 and group.size == 4 and len(group.members) == 2 and group.members[0].tier == "keeper"
        everyone = service.duplicates.group(group.id)
        assert everyone.size == 4 and [m.facts.sha256 for m in everyone.members][:2] == [
            m.facts.sha256 for m in group.members
        ]
        rest = service.duplicates.group(group.id, offset=2, limit=5)
        assert rest.offset == 2 and [m.facts.sha256 for m in rest.members] == [
            m.facts.sha256 for m in everyone.members[2:]
        ]
        assert all(m.tier == "copy" and m.edit is not None for m in rest.members)
    finally:
        await service.close()
    with TestClient(create_app(gallery)) as client:
        listed = first_page(client)["groups"][0]
        assert listed["size"] == 4 and listed["member_offset"] == 0
        page = client.get(f"/api/duplicates/{listed['id']}", params={"offset": 1, "limit": 2}).json()
        assert page["member_offset"] == 1 and len(page["members"]) == 2 and page["size"] == 4
        assert all(m["role"] != "keeper" for m in page["members"])
        assert client.get(f"/api/duplicates/{listed['id']}", params={"limit": 0}).status_code == 422
        one = client.get("/duplicates", params={"group": listed["id"]})
        assert one.status_code == 200 and one.text.count('<li class="dup-member') == 4


async def test_the_partition_is_the_same_after_a_restart(gallery: Settings) -> None:
    service = await started(gallery)
    try:
        before = service.duplicates.page()[1]
        stored = service.catalogue.get_meta("duplicate_groups")
    finally:
        await service.close()
    service = await started(gallery, ingest=False)
    try:
        after = service.duplicates.page()[1]
        assert [(g.id, g.keeper.sha256, names(g)) for g in after] == [(g.id, g.keeper.sha256, names(g)) for g in before]
        assert stored is not None and service.catalogue.get_meta("duplicate_groups") is not None
    finally:
        await service.close()


async def test_an_added_image_joins_the_groups_without_a_regroup(
    gallery: Settings, photos: dict[str, np.ndarray]
) -> None:
    service = await started(gallery)
    try:
        grouping = service.duplicates._grouping  # followed in place, not built again
        [before] = service.duplicates.page()[1]
        added = await service.ingestor.add_image(encode(crop(photos["coffee"], 0.7, 0.1)), entry_id="coffee-crop")
        assert added.added
        service.duplicates.refresh()
        total, groups = service.duplicates.page()
        assert total == 2 and service.duplicates._grouping is grouping
        coffee = next(g for g in groups if "coffee" in names(g))
        assert sorted(names(coffee)) == ["coffee", "coffee-crop"]
        again = next(g for g in groups if g.id == before.id)
        assert names(again) == names(before)
        await service.ingestor.remove_image(added.sha256)  # removed: its group goes, the other stays
        service.duplicates.refresh()
        assert [g.id for g in service.duplicates.page()[1]] == [before.id]
    finally:
        await service.close()


async def test_links_the_tally_leaves_for_a_later_tick_are_read_then(
    gallery: Settings, photos: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy-link tally waits in proportion to its own cost (at 100k images it took 0.26 s on every tick of an
    ingest); the links written meanwhile are read when it runs, not dropped."""
    import pictrace.duplicates

    monkeypatch.setattr(pictrace.duplicates, "_TALLY_EVERY", 1e6)  # after a tally, the next waits its cap
    service = await started(gallery)  # its refresh ran the tally: the next is due in _RECENT_S / 2
    try:
        groups = service.duplicates
        assert groups._tally_due > time.monotonic() + 5
        added = await service.ingestor.add_image(encode(crop(photos["coffee"], 0.7, 0.1)), entry_id="coffee-crop")
        assert added.added
        groups._refresh()  # a tick before the tally is due: the image is known, its link not read yet
        assert not [g for g in groups.page()[1] if "coffee" in names(g)]
        groups._tally_due = 0.0
        groups._refresh()  # the tally is due: the link is read
        [coffee] = [g for g in groups.page()[1] if "coffee" in names(g)]
        assert sorted(names(coffee)) == ["coffee", "coffee-crop"]
    finally:
        await service.close()


async def test_pages_before_the_groups_are_computed_say_so(gallery: Settings) -> None:
    service = await started(gallery)
    try:
        fresh = DuplicateGroups(service.catalogue, service.tuning.duplicates)  # not started: nothing computed yet
        with pytest.raises(GroupsNotReadyError) as raised:
            fresh.page()
        assert raised.value.retry_after_s >= 1
        fresh.refresh()
        assert fresh.page()[0] == 1
    finally:
        await service.close()
    with TestClient(create_app(gallery)) as client:
        # a start does not wait for the groups: /api/health answers whatever the groups' state
        assert client.get("/api/health").status_code == 200
        from pictrace.web.errors import headers_for, status_for

        error = GroupsNotReadyError()
        assert status_for(error) == 503 and headers_for(error)["Retry-After"] == "2"
