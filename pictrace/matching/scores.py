"""One candidate's component scores (embedding, SSIM, ORB) and their fusion into one score."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from pictrace.features.ssim import SsimReference
from pictrace.features.thumbnail import decode_ssim_gray
from pictrace.matching.geometry import GeometricFit
from pictrace.tuning import Tuning


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
    linked: float = 0.0  # score earned through the match graph (a floor under ``fused``), pictrace/search/expand.py
    via: int | None = None  # the result whose stored link brought that score


def rescore(candidate: CandidateScore, tuning: Tuning, **changes: object) -> CandidateScore:
    """The candidate with some components replaced and ``fused`` recomputed; a graph link's score is a floor."""
    changed = replace(candidate, **changes)  # type: ignore[arg-type]
    fused = fuse(changed.embedding, changed.ssim, changed.orb, tuning)
    return replace(changed, fused=max(fused, changed.linked))


def fuse(embedding: float, ssim: float, orb: float, tuning: Tuning) -> float:
    """Weighted mean of the three components, each in [0, 1], so the result is in [0, 1] too."""
    weights = (tuning.fusion.embedding, tuning.fusion.ssim, tuning.fusion.orb)
    total = sum(weights)
    return float((weights[0] * embedding + weights[1] * ssim + weights[2] * orb) / total)


def scored(vec_id: int, cosine: float, fit: GeometricFit | None, tuning: Tuning, votes: int = 0) -> CandidateScore:
    """A candidate's provisional score (SSIM counted as 0; ``with_ssim`` completes it for the shortlist).

    ``fit`` None: the candidate was not worth the ORB check (pictrace/search/verify.py) and keeps its
    embedding score.
    """
    embedding = float(np.clip(cosine, 0.0, 1.0))
    if fit is None:
        return CandidateScore(vec_id, embedding, 0.0, 0.0, 0, fuse(embedding, 0.0, 0.0, tuning), votes=votes)
    return CandidateScore(
        vec_id,
        embedding,
        0.0,
        fit.score,
        fit.inliers,
        fuse(embedding, 0.0, fit.score, tuning),
        fit.homography,
        votes=votes,
    )


def with_ssim(query: SsimReference, candidate: CandidateScore, gray: bytes, tuning: Tuning) -> CandidateScore:
    """SSIM is the costliest per-pair signal and the least discriminative, so only the shortlist pays for it."""
    return rescore(candidate, tuning, ssim=query.score(decode_ssim_gray(gray)))
