"""Stage 4, rerank: the shortlist that will be shown gets SSIM and the mirror check.

SSIM is the costliest per-pair signal and the least discriminative, and the mirror check needs one more ORB
extraction, so only the best ``max(ssim_shortlist, top_k)`` candidates pay for them; the others keep their
provisional score and stay in the ranking.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

from pictrace.features.orb import OrbFeatures
from pictrace.features.ssim import SsimReference
from pictrace.matching.mirror import mirror_fit, worth_mirroring
from pictrace.matching.scores import CandidateScore, with_ssim
from pictrace.search.schedule import MapEach
from pictrace.search.verify import nearest_by_embedding
from pictrace.tuning import Tuning


def shortlist(
    ranked: list[CandidateScore], top_k: int, tuning: Tuning
) -> tuple[list[CandidateScore], list[CandidateScore]]:
    """(the best, which get SSIM and the mirror check; the rest). The ``verify_embedding_top`` nearest by
    embedding are among the best wherever they rank: a mirrored copy has no direct fit, and the images the match
    graph lifts around a weak fit to a look-alike can push it past the shortlist, away from the mirror check
    that would find it (a copy-public mirror among 100k distractors fell from rank 1 to 63 so)."""
    size = max(tuning.cascade.ssim_shortlist, top_k)
    cosines = {c.vec_id: c.embedding for c in ranked}
    nearest = nearest_by_embedding(cosines, cosines, tuning)  # the verify stage's own rule
    best = ranked[:size] + [c for c in ranked[size:] if c.vec_id in nearest]
    return best, [c for c in ranked[size:] if c.vec_id not in nearest]


def needs_mirror(
    candidates: Sequence[CandidateScore], orbs: Container[int], tuning: Tuning
) -> list[CandidateScore]:
    """The candidates worth a match against the mirrored query (with stored features to match)."""
    return [c for c in candidates if worth_mirroring(c, tuning) and c.vec_id in orbs]


def with_ssim_all(
    reference: SsimReference,
    candidates: Sequence[CandidateScore],
    grays: Mapping[int, bytes],
    tuning: Tuning,
    map_each: MapEach,
) -> list[CandidateScore]:
    """The candidates with SSIM against their stored grey thumbnail (those without one are dropped: deleted)."""
    todo = [c for c in candidates if c.vec_id in grays]
    return map_each(lambda c: with_ssim(reference, c, grays[c.vec_id], tuning), todo)


def mirror_pass(
    mirrored: OrbFeatures,
    candidates: list[CandidateScore],
    orbs: Mapping[int, OrbFeatures],
    tuning: Tuning,
    map_each: MapEach,
) -> list[CandidateScore]:
    """The candidates, those that ``needs_mirror`` picks re-verified against the mirrored query's features."""
    todo = needs_mirror(candidates, orbs, tuning)
    found = {c.vec_id: c for c in map_each(lambda c: mirror_fit(mirrored, c, orbs[c.vec_id], tuning), todo)}
    return [found.get(c.vec_id, c) for c in candidates]
