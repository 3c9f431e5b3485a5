"""Is this gallery image the query's picture, moved? ORB + RANSAC between one query and one candidate.

Pure functions of two images' keypoints and the tuning: the full check (``fit_geometry``), its shortcut for an
exact match (``identical_fit``), and the cheap screen on the pairs the local index's votes already found
(``passes_screen``). The search (pictrace/search/verify.py) decides which candidates get which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pictrace.features.orb import OrbFeatures, OrbMatch, consensus, match_orb
from pictrace.matching.transform import to_pixel_homography
from pictrace.tuning import Tuning


@dataclass(frozen=True)
class GeometricFit:
    """One candidate's ORB+RANSAC outcome: what the full check adds to its embedding score."""

    score: float
    inliers: int
    homography: np.ndarray | None  # accepted fit, query pixels -> gallery pixels (transform read-out)


def match_features(query: OrbFeatures, gallery: OrbFeatures, tuning: Tuning) -> OrbMatch:
    """ORB+RANSAC with the configured thresholds: the one geometric check search, mirror check and graph share."""
    return match_orb(
        query,
        gallery,
        ratio=tuning.check.ratio,
        ransac_px=tuning.check.ransac_px,
        min_inliers=tuning.check.min_inliers,
        full_inliers=tuning.check.full_inliers,
        centre_sigma=tuning.check.centre_sigma,
    )


def fit_geometry(query: OrbFeatures, gallery: OrbFeatures, tuning: Tuning) -> GeometricFit:
    """The full ORB check of one candidate; needs no embedding, so the search runs it while that is computed."""
    gallery_orb = gallery.strongest(tuning.check.verify_features)
    match = match_features(query, gallery_orb, tuning)
    homography = (
        None
        if match.homography is None
        else to_pixel_homography(match.homography, query.scale, gallery_orb.scale)
    )
    return GeometricFit(match.score, match.inliers, homography)


def identical_fit(gallery: OrbFeatures) -> GeometricFit:
    """The full check's answer for an exact match (the query's own bytes or decoded pixels) without running it.

    The stored keypoints were extracted from the same pixels with the same tuning, so every one agrees with
    itself through the identity; a re-upload of a catalogued image is common and this saves its ~2 ms check.
    """
    return GeometricFit(1.0, len(gallery), np.eye(3))


def passes_screen(
    query: OrbFeatures, gallery: OrbFeatures, pairs: tuple[np.ndarray, np.ndarray], tuning: Tuning
) -> bool:
    """Whether the tentative pairs (query rows, gallery keypoints) behind a candidate's votes agree on a
    homography with ``prescreen_min_inliers`` distinct keypoints (0: the screen is off, always)."""
    needed = tuning.cascade.prescreen_min_inliers
    if needed == 0:
        return True
    qi, gi = pairs
    return len(qi) >= needed and consensus(query, gallery, qi, gi, ransac_px=tuning.check.ransac_px) >= needed
