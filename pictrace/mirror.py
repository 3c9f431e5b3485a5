"""Mirrored copies: ORB descriptors are not mirror-invariant, so a left-right flipped copy finds no geometric
match. The shortlist's candidates without a fit (or with a fit too weak for a copy) are matched once more
against a mirrored query; the better fit wins, and one found that way includes the mirror (negative
determinant), which the transform read-out reports as ``flip``.

One extra ORB extraction per query (only when some shortlisted candidate lacks a strong fit but has an embedding
cosine of at least ``PICTRACE_MIRROR_MIN_EMBEDDING``: mirrored copies measured 0.74-0.99) and one match per such
candidate: bench/thresholds.py measures what it costs and what it finds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from pictrace.config import Settings
from pictrace.features.extract import orb_of
from pictrace.features.orb import OrbFeatures
from pictrace.ranking import CandidateScore, match_features, rescore
from pictrace.store import RerankFeatures
from pictrace.transform import mirror_matrix, to_pixel_homography
from pictrace.work import MapEach, map_serial


def needs_mirror(
    candidates: Sequence[CandidateScore], stored: Mapping[int, RerankFeatures], settings: Settings
) -> list[CandidateScore]:
    """The candidates worth a match against the mirrored query: no fit, or one too weak for a copy."""
    if not settings.mirror_check:
        return []
    # A mirrored copy sometimes has a weak spurious direct fit (8-10 inliers): re-check those too.
    return [
        c
        for c in candidates
        if (c.homography is None or c.orb_inliers < settings.copy_min_inliers)
        and c.embedding >= settings.mirror_min_embedding  # the embedding barely notices a mirror
        and c.vec_id in stored
    ]


def mirrored_orb(rgb: np.ndarray, settings: Settings) -> OrbFeatures:
    """The mirrored query's ORB features, extracted as the query's (small ones upscaled too)."""
    return orb_of(np.ascontiguousarray(rgb[:, ::-1]), settings)


def mirror_pass(
    rgb: np.ndarray,
    candidates: list[CandidateScore],
    stored: Mapping[int, RerankFeatures],
    settings: Settings,
    *,
    mirrored: Callable[[], OrbFeatures] | None = None,
    map_each: MapEach = map_serial,
) -> list[CandidateScore]:
    """The candidates, with those that had no fit re-verified against the mirrored query.

    ``mirrored`` gives the mirrored query's features when they were started elsewhere (the search starts them
    on its side thread while the shortlist's SSIM runs); ``map_each`` runs the matches.
    """
    todo = needs_mirror(candidates, stored, settings)
    if not todo:
        return candidates
    query = mirrored() if mirrored is not None else mirrored_orb(rgb, settings)
    unmirror = mirror_matrix(query.width)  # query working -> mirrored query working

    def rematch(candidate: CandidateScore) -> CandidateScore:
        gallery = OrbFeatures.from_bytes(stored[candidate.vec_id].orb)
        match = match_features(query, gallery, settings)
        current = candidate.orb_inliers if candidate.homography is not None else 0
        if match.homography is None or match.inliers <= current:
            return candidate
        homography = to_pixel_homography(match.homography @ unmirror, query.scale, gallery.scale)
        return rescore(candidate, settings, orb=match.score, orb_inliers=match.inliers, homography=homography)

    found = {c.vec_id: c for c in map_each(rematch, todo)}
    return [found.get(c.vec_id, c) for c in candidates]
