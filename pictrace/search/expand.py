"""Stage 3, expand: the match graph's links of the best verified results join the ranking.

A phone photo of a cover matches that cover's clean scan, which matches every other photo of the cover, but
two phone photos often share too few keypoints to match each other directly. The links verified at ingest
(pictrace/graph.py) bring those in, scored below the result they were reached through (``expand_weight`` x its
score x the link's strength), each saying ``via`` which one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pictrace.matching.scores import CandidateScore, rescore
from pictrace.tuning import Tuning

Links = Mapping[int, list[tuple[int, int]]]  # vec_id -> [(other, inliers), ...]


def expand(
    ranked: list[CandidateScore],
    exact: frozenset[int],
    tuning: Tuning,
    *,
    links_of: Callable[[list[int]], Links],
    cosine_of: Callable[[list[int]], Mapping[int, float]],
) -> list[CandidateScore]:
    """Add (or lift) the links of the best verified results. ``ranked`` is sorted best first; the answer is not
    sorted (the caller orders it its own way: exact hits first).

    Sources: exact matches (their stored links are the query's own verified neighbours) and the best
    ``expand_from`` results with a geometric fit scoring at least ``expand_min_score``. ``links_of`` gives the
    sources' stored links, ``cosine_of`` the embedding cosines of images not ranked yet (absent: deleted).
    """
    if tuning.cascade.expand_from == 0 or tuning.cascade.expand_weight == 0:
        return ranked
    verified = [
        c
        for c in ranked
        if c.vec_id not in exact and c.homography is not None and c.fused >= tuning.cascade.expand_min_score
    ]
    sources = [c for c in ranked if c.vec_id in exact] + verified[: tuning.cascade.expand_from]
    if not sources:
        return ranked
    links = links_of([c.vec_id for c in sources])
    offers: dict[int, tuple[float, int]] = {}  # other -> (score through the link, source)
    for source in sources:
        base = 1.0 if source.vec_id in exact else source.fused
        for other, inliers in links.get(source.vec_id, []):
            if other in exact:
                continue
            score = tuning.cascade.expand_weight * base * min(1.0, inliers / tuning.check.full_inliers)
            if score > offers.get(other, (0.0, 0))[0]:
                offers[other] = (score, source.vec_id)
    by_id = {c.vec_id: c for c in ranked}
    cosines = cosine_of([v for v in offers if v not in by_id])
    for other, (score, source_id) in offers.items():
        current = by_id.get(other)
        if current is None:
            if other not in cosines:  # deleted meanwhile
                continue
            current = CandidateScore(other, max(0.0, min(1.0, cosines[other])), 0.0, 0.0, 0, 0.0)
        if score > current.fused:
            by_id[other] = rescore(current, tuning, linked=score, via=source_id)
    return list(by_id.values())
