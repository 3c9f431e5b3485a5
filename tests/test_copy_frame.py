"""The whole-frame check and the keeper, on photos edited in code: a copy shrunk past its keypoints is a copy,
another view of the scene is not; the keeper is the picture the others were made from, however it is saved."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from conftest import encode, resize
from test_duplicates import names, started, warp

from pictrace.config import Settings
from pictrace.duplicates import choose_keeper
from pictrace.matching.frame import frame_agreement, rescale_homography, same_aspect
from pictrace.matching.verdict import VerdictThresholds, classify
from pictrace.store import ImageFacts
from pictrace.tuning import Tuning


def grey(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))[:, :, ::-1]


def tiny_jpeg(rgb: np.ndarray) -> np.ndarray:
    """What a shared copy often is: an eighth of the size, JPEG quality 40 (at 25 the cat's fur measured
    0.90: heavy quantisation of fine texture falls below the check, which is set to keep look-alikes out)."""
    return decoded(encode(resize(rgb, 0.125), "JPEG", quality=40))


def captioned(rgb: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(rgb.copy())
    h, w = out.shape[:2]
    cv2.putText(out, "SALE 50%", (w // 10, h - h // 8), cv2.FONT_HERSHEY_SIMPLEX, w / 160, (255, 255, 0), w // 60)
    return out


def test_a_tiny_copy_agrees_with_its_frame_and_another_view_does_not(photos: dict[str, np.ndarray]) -> None:
    thresholds = VerdictThresholds.from_tuning(Tuning())
    side = Tuning().verdicts.frame_side
    for name in ("astronaut", "coffee"):
        photo = photos[name]
        small = tiny_jpeg(photo)
        assert same_aspect(photo.shape[1::-1], small.shape[1::-1], Tuning().verdicts.frame_aspect)
        assert frame_agreement(grey(photo), grey(small), side) >= thresholds.copy_min_frame, name
        assert frame_agreement(grey(photo), grey(np.ascontiguousarray(photo[:, :, ::-1])), side) > 0.98  # hue
        other_view = warp(photo)
        assert frame_agreement(grey(photo), grey(other_view), side) < thresholds.copy_min_frame, name
    # the copy rule: the frame evidence makes a copy only with the embedding floor, and is not needed otherwise
    rule = dict(exact=False, inliers=0, perspective=None, thresholds=thresholds)
    assert classify(embedding=0.6, frame=0.97, **rule) == "copy"  # type: ignore[arg-type]
    assert classify(embedding=0.2, frame=0.97, **rule) is None  # type: ignore[arg-type]
    assert classify(embedding=0.6, frame=0.9, **rule) is None  # type: ignore[arg-type]
    # a whole-frame copy's homography is the rescale: the small copy's corners land on the photo's
    hom = rescale_homography((64, 64), (512, 512))
    assert np.allclose(hom @ np.array([64.0, 64.0, 1.0]), [512.0, 512.0, 1.0])


def facts(vec_id: int, rgb: np.ndarray, nbytes: int) -> ImageFacts:
    h, w = rgb.shape[:2]
    return ImageFacts(vec_id, f"sha{vec_id}", f"px{vec_id}", w, h, "JPEG", nbytes, f"img{vec_id}", "")


def test_the_keeper_is_the_picture_the_others_were_made_from(photos: dict[str, np.ndarray]) -> None:
    # the original is the most compressed (fewest bytes), as in a gallery of re-saved copies: bytes cannot tell
    photo = photos["coffee"]
    w = photo.shape[1]
    flip = np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]])
    versions = {
        1: (grey(photo)[:, :, None].repeat(3, axis=2), 90_000),
        2: (photo, 20_000),
        3: (captioned(photo), 80_000),
        4: (np.ascontiguousarray(photo[:, ::-1]), 70_000),
    }
    members = [facts(v, rgb, n) for v, (rgb, n) in versions.items()]
    fits: dict[tuple[int, int], np.ndarray] = {}
    for a in versions:
        for b in versions:
            if a != b:
                fits[(a, b)] = flip if (a == 4) != (b == 4) else np.eye(3)
    pictures = {m.vec_id: versions[m.vec_id][0][:, :, ::-1] for m in members}  # thumbnails are BGR
    keeper = choose_keeper(members, fits, looks=lambda m: pictures[m.vec_id])
    assert keeper.vec_id == 2
    # without looking at the pixels, the captioned, grey and original copies cannot be told apart
    assert choose_keeper(members, fits).vec_id != 2


async def test_a_tiny_copy_and_a_grey_copy_join_their_original(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    images = {
        "astronaut": encode(photos["astronaut"], "JPEG", quality=40),
        "astronaut-tiny": encode(tiny_jpeg(photos["astronaut"]), "JPEG", quality=90),
        "astronaut-grey": encode(grey(photos["astronaut"]), "PNG"),
        "chelsea": encode(photos["chelsea"], "JPEG"),
        "chelsea-angle": encode(warp(photos["chelsea"]), "JPEG"),
        "coffee": encode(photos["coffee"], "JPEG"),
    }
    (tmp_path / "g").mkdir()
    for name, data in images.items():
        (tmp_path / "g" / f"{name}.img").write_bytes(data)
    settings.db.write_text(json.dumps([{"id": n, "url": f"g/{n}.img"} for n in images]))
    service = await started(settings)
    try:
        total, groups = service.duplicates.page()
        assert total == 1, [names(g) for g in groups]
        assert sorted(names(groups[0])) == ["astronaut", "astronaut-grey", "astronaut-tiny"]
        assert groups[0].keeper.entry_id == "astronaut"  # the most pixels in colour, though the fewest bytes
        tiny = next(m for m in groups[0].members if m.facts.entry_id == "astronaut-tiny")
        assert tiny.edit is not None and abs(tiny.edit.scale - 0.125) < 0.01
    finally:
        await service.close()
