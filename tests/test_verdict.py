"""Verdicts from the evidence: exact beats everything, a copy needs near-affine geometry, unrelated is dropped."""

from __future__ import annotations

import pytest

from pictrace.matching.verdict import VerdictThresholds, classify
from pictrace.tuning import Tuning

T = VerdictThresholds(
    copy_min_inliers=12, copy_min_embedding=0.3, copy_max_perspective=0.1, similar_min_embedding=0.7,
    similar_min_inliers=8,
)


@pytest.mark.parametrize(
    ("exact", "embedding", "inliers", "perspective", "expected"),
    [
        (True, 0.0, 0, None, "exact"),  # same pixels: exact whatever the other signals say
        (False, 0.9, 40, 0.01, "copy"),
        (False, 0.35, 12, 0.0, "copy"),  # heavy edit: low cosine, but enough keypoints agree
        (False, 0.29, 200, 0.0, "similar"),  # below the embedding floor: not a copy, still a geometric match
        (False, 0.9, 11, 0.0, "similar"),  # too few inliers for a copy, embedding says same thing
        (False, 0.5, 11, 0.0, "similar"),  # a real but weak geometric match
        (False, 0.9, 60, 0.3, "similar"),  # the same print photographed at an angle: another shot
        (False, 0.69, 0, None, None),  # unrelated: not shown
        (False, 0.7, 0, None, "similar"),
        (False, 0.2, 5, None, None),  # inliers without an accepted homography count for nothing
    ],
)
def test_classify(
    exact: bool, embedding: float, inliers: int, perspective: float | None, expected: str | None
) -> None:
    got = classify(exact=exact, embedding=embedding, inliers=inliers, perspective=perspective, thresholds=T)
    assert got == expected


def test_thresholds_come_from_the_tuning() -> None:
    verdicts = {"copy_min_inliers": 30, "similar_min_embedding": 0.95, "copy_max_perspective": 0.5}
    tuning = Tuning().replace(verdicts=verdicts)
    t = VerdictThresholds.from_tuning(tuning)
    assert (t.copy_min_inliers, t.similar_min_embedding, t.copy_max_perspective) == (30, 0.95, 0.5)
    assert t.similar_min_inliers == tuning.check.min_inliers
    assert classify(exact=False, embedding=0.9, inliers=20, perspective=0.2, thresholds=t) == "similar"
