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
