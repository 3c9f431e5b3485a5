"""Re-ranking of a query's candidates by SSIM and ORB geometric agreement, and fusion into one score."""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from pictrace.config import Settings
from pictrace.features.extract import orb_of
from pictrace.features.orb import OrbFeatures, OrbMatch, consensus, match_orb
from pictrace.features.ssim import SsimReference, gray256
from pictrace.features.thumbnail import decode_gray_png
from pictrace.local_index import Votes
from pictrace.store import RerankFeatures
from pictrace.transform import to_pixel_homography
from pictrace.work import MapEach, map_serial


@dataclass(frozen=True)
class QueryFeatures:
    """Local features of the query, computed once and compared with every candidate.

    The embedding is not among them: the search computes it alongside these (pictrace/search.py).
    """

    gray: SsimReference  # the query's half of SSIM, shared by every candidate on the shortlist
    orb: OrbFeatures

    @classmethod
    def compute(cls, rgb: np.ndarray, settings: Settings) -> QueryFeatures:
        return cls(gray=SsimReference(gray256(rgb)), orb=orb_of(rgb, settings))


@dataclass(frozen=True)
class CandidateScore:
    vec_id: int
    embedding: float
    ssim: float
    orb: float
    orb_inliers: int
    fused: float
    # accepted ORB fit, query pixels -> gallery pixels (transform read-out)
    homography: np.ndarray | None = field(default=None, compare=False)
    votes: int = 0  # local-descriptor votes that made (or backed) this candidate
    linked: float = 0.0  # score earned through the match graph (a floor under ``fused``), see pictrace/graph.py
    via: int | None = None  # the result whose stored link brought that score


def rescore(candidate: CandidateScore, settings: Settings, **changes: object) -> CandidateScore:
    """The candidate with some components replaced and ``fused`` recomputed; a graph link's score is a floor."""
    changed = replace(candidate, **changes)  # type: ignore[arg-type]
    fused = fuse(changed.embedding, changed.ssim, changed.orb, settings)
    return replace(changed, fused=max(fused, changed.linked))


def fuse(embedding: float, ssim: float, orb: float, settings: Settings) -> float:
    """Weighted mean of the three components, each in [0, 1], so the result is in [0, 1] too."""
    weights = (settings.weight_embedding, settings.weight_ssim, settings.weight_orb)
    total = sum(weights)
    return float((weights[0] * embedding + weights[1] * ssim + weights[2] * orb) / total)


def match_features(query: OrbFeatures, gallery: OrbFeatures, settings: Settings) -> OrbMatch:
    """ORB+RANSAC with the configured thresholds: the one geometric check search, mirror pass and graph share."""
    return match_orb(
        query,
        gallery,
        ratio=settings.orb_ratio,
        ransac_px=settings.orb_ransac_px,
        min_inliers=settings.orb_min_inliers,
        full_inliers=settings.orb_full_inliers,
        centre_sigma=settings.orb_centre_sigma,
    )


def screened(
    query: OrbFeatures,
    gallery: Mapping[int, OrbFeatures],
    votes: Votes,
    settings: Settings,
    map_each: MapEach = map_serial,
) -> set[int]:
    """The candidates whose vote pairs pass the screen (all of them when it is off): the cascade's first step.

    Matching every query keypoint against every keypoint of a candidate costs ~2 ms; the local index's votes
    already paired some of them up, and a RANSAC over those few dozen pairs costs ~0.2 ms. A candidate whose
    pairs agree on a homography with ``prescreen_min_inliers`` distinct keypoints gets the full check, and so
    do the ``verify_embedding_top`` nearest by embedding (``nearest_by_embedding``: an edited copy can be too
    small or too blurred for its keypoints to reach the index); the rest keep their embedding score. Measured on
    the shared sets, this checks ~8 of ~27 candidates a query and drops ~1 % of the relevant matches the full
    check would have found (docs/quality.md). ``map_each`` runs the screens (``SideThread.map`` shares them).
    """
    if settings.prescreen_min_inliers == 0:
        return set(gallery)
    todo = sorted(gallery)
    passed = map_each(lambda v: passes_screen(query, gallery[v], votes, v, settings), todo)
    return {v for v, ok in zip(todo, passed, strict=True) if ok}


def nearest_by_embedding(cosines: Mapping[int, float], among: Container[int], settings: Settings) -> set[int]:
    """The ``verify_embedding_top`` candidates nearest by embedding, of those in ``among`` (ties: cosines' order)."""
    candidates = [v for v in cosines if v in among]
    return set(sorted(candidates, key=lambda v: -cosines[v])[: settings.verify_embedding_top])


def passes_screen(query: OrbFeatures, gallery: OrbFeatures, votes: Votes, vec_id: int, settings: Settings) -> bool:
    """Whether the pairs behind ``vec_id``'s votes agree on a homography with enough keypoints (0: always)."""
    needed = settings.prescreen_min_inliers
    if needed == 0:
        return True
    qi, gi = votes.pairs(vec_id)
    return len(qi) >= needed and consensus(query, gallery, qi, gi, ransac_px=settings.orb_ransac_px) >= needed


@dataclass(frozen=True)
class GeometricFit:
    """One candidate's ORB+RANSAC outcome: what the full check adds to its embedding score."""

    score: float
    inliers: int
    homography: np.ndarray | None  # accepted fit, query pixels -> gallery pixels (transform read-out)


def fit_geometry(query: OrbFeatures, gallery: OrbFeatures, settings: Settings) -> GeometricFit:
    """The full ORB check of one candidate; needs no embedding, so the search runs it while that is computed."""
    gallery_orb = gallery.strongest(settings.orb_verify_features)
    match = match_features(query, gallery_orb, settings)
    homography = (
        None
        if match.homography is None
        else to_pixel_homography(match.homography, query.scale, gallery_orb.scale)
    )
    return GeometricFit(match.score, match.inliers, homography)


def identical_fit(gallery: OrbFeatures) -> GeometricFit:
    """The full check's answer for an exact match (the query's own bytes or decoded pixels) without running it.

    The stored keypoints were extracted from the same pixels with the same settings, so every one agrees with
    itself through the identity; a re-upload of a catalogued image is common and this saves its ~2 ms check.
    """
    return GeometricFit(1.0, len(gallery), np.eye(3))


def scored(vec_id: int, cosine: float, fit: GeometricFit | None, settings: Settings, votes: int = 0) -> CandidateScore:
    """A candidate's provisional score (SSIM counted as 0; ``with_ssim`` completes it for the shortlist).

    ``fit`` None: the candidate was not worth the ORB check (see ``screened``) and keeps its embedding score.
    """
    embedding = float(np.clip(cosine, 0.0, 1.0))
    if fit is None:
        return CandidateScore(vec_id, embedding, 0.0, 0.0, 0, fuse(embedding, 0.0, 0.0, settings), votes=votes)
    return CandidateScore(
        vec_id,
        embedding,
        0.0,
        fit.score,
        fit.inliers,
        fuse(embedding, 0.0, fit.score, settings),
        fit.homography,
        votes=votes,
    )


def verify(
    query: QueryFeatures,
    vec_id: int,
    cosine: float,
    gallery: OrbFeatures | None,
    settings: Settings,
    votes: int = 0,
) -> CandidateScore:
    """Embedding and ORB+RANSAC for one candidate (``gallery`` None: not worth the ORB check)."""
    fit = None if gallery is None else fit_geometry(query.orb, gallery, settings)
    return scored(vec_id, cosine, fit, settings, votes)


def with_ssim(
    query: SsimReference, candidate: CandidateScore, stored: RerankFeatures, settings: Settings
) -> CandidateScore:
    """SSIM is the costliest per-pair signal and the least discriminative, so only the shortlist pays for it."""
    return rescore(candidate, settings, ssim=query.score(decode_gray_png(stored.gray_png)))
