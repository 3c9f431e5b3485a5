"""Duplicate groups: copies grouped with their original and read out, look-alikes kept apart, decisions kept."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import crop, encode, rotate90

from pictrace.config import Settings
from pictrace.duplicates import Group, partition
from pictrace.gallery import load_gallery
from pictrace.service import Service


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
