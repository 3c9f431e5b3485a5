"""Stage 5, present: what a client is shown of the ranking, in its terms: verdict and transform read-out.

The ranking keeps every candidate above ``min_score`` (and every exact match); the first ``top_k`` of those that
are related at all are described, each with its verdict (pictrace/matching/verdict.py) and, when it has a
geometric fit, what was done to the copy (pictrace/matching/transform.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pictrace.matching.scores import CandidateScore
from pictrace.matching.transform import TransformReadout, read_transform
from pictrace.matching.verdict import VerdictThresholds, classify
from pictrace.schemas import ComponentScores, Match, TransformInfo, thumbnail_url
from pictrace.store import ImageRecord
from pictrace.tuning import Tuning


def kept(ranked: Sequence[CandidateScore], exact: frozenset[int], tuning: Tuning) -> list[CandidateScore]:
    """The ranking as it is answered: exact matches and every candidate scoring at least ``min_score``."""
    return [c for c in ranked if c.vec_id in exact or c.fused >= tuning.fusion.min_score]


def named(kept: Sequence[CandidateScore]) -> set[int]:
    """The images ``describe`` needs records of: the candidates and those they were reached through."""
    return {v for c in kept for v in (c.vec_id, c.via) if v is not None}


def describe(
    kept: Sequence[CandidateScore],
    exact: frozenset[int],
    records: Mapping[int, ImageRecord],
    query_size: tuple[int, int],
    limit: int,
    tuning: Tuning,
) -> list[Match]:
    """The first ``limit`` matches with their verdict and transform read-out; unrelated candidates are left out."""
    thresholds = VerdictThresholds.from_tuning(tuning)
    matches: list[Match] = []
    for c in kept:
        if len(matches) == limit:
            break
        record = records.get(c.vec_id)
        if record is None:  # removed while we were ranking
            continue
        is_exact = c.vec_id in exact
        readout = (
            None if c.homography is None else read_transform(c.homography, query_size, (record.width, record.height))
        )
        verdict = classify(
            exact=is_exact,
            embedding=c.embedding,
            inliers=c.orb_inliers if readout is not None else 0,
            perspective=readout.perspective if readout is not None else None,
            thresholds=thresholds,
            linked=c.via is not None,
        )
        if verdict is None:
            continue
        matches.append(
            Match(
                id=record.entry_id,
                url=record.url,
                original_url=record.location if record.is_remote else f"/api/images/{record.sha256}/original",
                sha256=record.sha256,
                score=1.0 if is_exact else round(c.fused, 4),
                scores=ComponentScores(
                    embedding=round(c.embedding, 4),
                    ssim=round(c.ssim, 4),
                    orb=round(c.orb, 4),
                    orb_inliers=c.orb_inliers,
                    votes=c.votes,
                ),
                exact=is_exact,
                verdict=verdict,
                transform=None if readout is None else transform_info(readout),
                via=None if c.via is None or c.via not in records else records[c.via].entry_id,
                thumbnail_url=thumbnail_url(record.sha256),
                metadata=record.metadata,
            )
        )
    return matches


def transform_info(readout: TransformReadout) -> TransformInfo:
    """The API's view of a read-out."""
    return TransformInfo(
        crop=readout.crop,
        crop_fraction=readout.crop_fraction,
        query_box=readout.query_box,
        scale=readout.scale,
        rotation=readout.rotation,
        flip=readout.flip,
        perspective=readout.perspective,
        homography=[[round(float(v), 6) for v in row] for row in readout.homography],
    )
