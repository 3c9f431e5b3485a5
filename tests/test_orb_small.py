"""Small images are upscaled for ORB, so a shrunken copy still has keypoints to match its original with."""

from __future__ import annotations

import numpy as np
from conftest import resize

from pictrace.features.orb import extract_orb, match_orb


def test_small_images_get_more_keypoints_when_upscaled(photos: dict[str, np.ndarray]) -> None:
    tiny = resize(photos["coffee"], 0.2)  # 120 x 80
    plain = extract_orb(tiny)
    upscaled = extract_orb(tiny, min_side=480)
    assert len(upscaled) > 2 * len(plain)
    assert upscaled.width == 4 * tiny.shape[1]  # at most 4x
    assert upscaled.scale == 4.0  # points stay comparable through the recorded scale


def test_shrunken_copy_verifies_against_its_original(photos: dict[str, np.ndarray]) -> None:
    original = extract_orb(photos["rocket"], min_side=480)
    copy = extract_orb(resize(photos["rocket"], 0.25), min_side=480)
    other = extract_orb(photos["coffee"], min_side=480)
    assert match_orb(copy, original).inliers >= 8
    assert match_orb(copy, other).homography is None


def test_keypoints_are_stored_strongest_first(photos: dict[str, np.ndarray]) -> None:
    import cv2

    features = extract_orb(photos["astronaut"])
    top = features.strongest(100)
    assert len(top) == 100 and features.strongest(10**6) is features
    # The strongest 100 by the detector's own response are exactly the first 100 stored.
    orb = cv2.ORB.create(nfeatures=1000, scaleFactor=1.2, nlevels=12, edgeThreshold=15, patchSize=31, fastThreshold=10)
    gray = cv2.cvtColor(photos["astronaut"], cv2.COLOR_RGB2GRAY)  # 512 px: no resize at max_side 640
    keypoints, _ = orb.detectAndCompute(gray, None)
    strongest = sorted(keypoints, key=lambda k: -k.response)[:100]
    assert len(keypoints) == len(features)

    def key(x: float, y: float) -> tuple[int, int]:
        return round(float(x) * 10), round(float(y) * 10)

    overlap = {key(*k.pt) for k in strongest} & {key(*p) for p in top.points}
    assert len(overlap) >= 95  # ties in response may swap a few at the cut
