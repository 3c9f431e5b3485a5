"""Mirrored copies: ORB descriptors are not mirror-invariant, so a left-right flipped copy finds no geometric
match. The shortlist's candidates without a fit (or with a fit too weak for a copy) are matched once more
against a mirrored query; the better fit wins, and one found that way includes the mirror (negative
determinant), which the transform read-out reports as ``flip``.

One extra ORB extraction per query (only when some shortlisted candidate lacks a strong fit but has an embedding
cosine of at least ``PICTRACE_MIRROR_MIN_EMBEDDING``: mirrored copies measured 0.74-0.99) and one match per such
candidate: bench/thresholds.py measures what it costs and what it finds.
"""

from __future__ import annotations

import numpy as np

from pictrace.config import Settings
from pictrace.features.extract import orb_of
from pictrace.features.orb import OrbFeatures
from pictrace.ranking import CandidateScore, match_features, rescore
from pictrace.store import RerankFeatures
from pictrace.transform import mirror_matrix, to_pixel_homography


def mirror_pass(
    rgb: np.ndarray,
    candidates: list[CandidateScore],
    stored: dict[int, RerankFeatures],
    settings: Settings,
) -> list[CandidateScore]:
    """The candidates, with those that had no fit re-verified against the mirrored query."""
    # A mirrored copy sometimes has a weak spurious direct fit (8-10 inliers): re-check those too.
    todo = [
        c
        for c in candidates
        if (c.homography is None or c.orb_inliers < settings.copy_min_inliers)
        and c.embedding >= settings.mirror_min_embedding  # the embedding barely notices a mirror
        and c.vec_id in stored
    ]
    if not settings.mirror_check or not todo:
        return candidates
    mirrored = orb_of(np.ascontiguousarray(rgb[:, ::-1]), settings)  # as the query: small ones upscaled too
    unmirror = mirror_matrix(mirrored.width)  # query working -> mirrored query working
    found: dict[int, CandidateScore] = {}
    for candidate in todo:
        gallery = OrbFeatures.from_bytes(stored[candidate.vec_id].orb)
        match = match_features(mirrored, gallery, settings)
        current = candidate.orb_inliers if candidate.homography is not None else 0
        if match.homography is None or match.inliers <= current:
            continue
        homography = to_pixel_homography(match.homography @ unmirror, mirrored.scale, gallery.scale)
        found[candidate.vec_id] = rescore(
            candidate, settings, orb=match.score, orb_inliers=match.inliers, homography=homography
        )
    return [found.get(c.vec_id, c) for c in candidates]
