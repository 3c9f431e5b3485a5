"""Mirrored copies: ORB descriptors are not mirror-invariant, so a left-right flipped copy finds no geometric
match. The shortlist's candidates without a fit (or with a fit too weak for a copy) are matched once more
against a mirrored query; the better fit wins, and one found that way includes the mirror (negative
determinant), which the transform read-out reports as ``flip``.

One extra ORB extraction per query (only when some shortlisted candidate lacks a strong fit but has an embedding
cosine of at least ``PICTRACE_MIRROR_MIN_EMBEDDING``: mirrored copies measured 0.74-0.99) and one match per such
candidate: bench/thresholds.py measures what it costs and what it finds. Here, one candidate at a time; the
search's rerank stage (pictrace/search/rerank.py) picks the candidates and runs the matches.
"""

from __future__ import annotations

import numpy as np

from pictrace.features.extract import orb_of
from pictrace.features.orb import OrbFeatures
from pictrace.matching.geometry import match_features
from pictrace.matching.scores import CandidateScore, rescore
from pictrace.matching.transform import mirror_matrix, to_pixel_homography
from pictrace.tuning import Tuning


def worth_mirroring(candidate: CandidateScore, tuning: Tuning) -> bool:
    """No fit, or one too weak for a copy, and an embedding close enough for a mirrored copy."""
    # A mirrored copy sometimes has a weak spurious direct fit (8-10 inliers): re-check those too.
    return (
        tuning.cascade.mirror_check
        and (candidate.homography is None or candidate.orb_inliers < tuning.verdicts.copy_min_inliers)
        and candidate.embedding >= tuning.cascade.mirror_min_embedding  # the embedding barely notices a mirror
    )


def mirrored_orb(rgb: np.ndarray, tuning: Tuning, decoded_scale: float = 1.0) -> OrbFeatures:
    """The mirrored query's ORB features, extracted as the query's (small ones upscaled too)."""
    return orb_of(np.ascontiguousarray(rgb[:, ::-1]), tuning, decoded_scale)


def mirror_fit(
    mirrored: OrbFeatures, candidate: CandidateScore, gallery: OrbFeatures, tuning: Tuning
) -> CandidateScore:
    """The candidate re-verified against the mirrored query: rescored when that fit beats the direct one."""
    unmirror = mirror_matrix(mirrored.width)  # query working -> mirrored query working
    match = match_features(mirrored, gallery, tuning)
    current = candidate.orb_inliers if candidate.homography is not None else 0
    if match.homography is None or match.inliers <= current:
        return candidate
    homography = to_pixel_homography(match.homography @ unmirror, mirrored.scale, gallery.scale)
    return rescore(candidate, tuning, orb=match.score, orb_inliers=match.inliers, homography=homography)
