"""Stage 1, candidates: the images worth ranking for one query, and what made each one a candidate.

Three sources: the query's exact bytes or decoded pixels (hash lookups), the images its local descriptors vote
for (pictrace/indexes/local/: they find a small, tilted, glared copy the embedding misses), and the nearest
vectors by embedding. The first two need no embedding, so the search verifies them while it is computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from pictrace.features.orb import OrbFeatures
from pictrace.indexes.local import LocalIndex, Votes
from pictrace.indexes.vector import VectorIndex
from pictrace.matching.scores import CandidateScore
from pictrace.search.schedule import MapEach
from pictrace.tuning import Tuning


@dataclass(frozen=True)
class Candidates:
    exact: frozenset[int]  # the query's own bytes or decoded pixels: always ranked first
    votes: Votes
    voted: tuple[int, ...]  # the most-voted images, most votes first
    # the query embedding's cosine with each candidate: the index's nearest first (best first), then the exact
    # and voted candidates' own in the catalogue's order; this order breaks ties between equal scores
    cosines: dict[int, float] = field(default_factory=dict)

    @property
    def local(self) -> list[int]:
        """The candidates found without the embedding."""
        return [*self.exact, *self.voted]

    def best_first(self, scores: Iterable[CandidateScore]) -> list[CandidateScore]:
        """Exact matches first, then by fused score; a stable sort, so ties keep their order."""
        return sorted(scores, key=lambda c: (c.vec_id in self.exact, c.fused), reverse=True)


def votes_for(query: OrbFeatures, local: LocalIndex, tuning: Tuning, map_each: MapEach) -> Votes:
    """Which images the query's local descriptors point to (none when ``local_candidates`` is 0)."""
    if tuning.cascade.local_candidates == 0:
        return Votes({})
    return local.vote(query, map_each)


def local_candidates(exact: Iterable[int], votes: Votes, tuning: Tuning) -> Candidates:
    """The candidates without the embedding: exact matches and the most-voted images."""
    voted = votes.top(tuning.cascade.local_candidates, tuning.cascade.local_min_votes)
    return Candidates(frozenset(exact), votes, tuple(voted))


def nearest(index: VectorIndex, embeddings: np.ndarray, tuning: Tuning) -> dict[int, float]:
    """The ``candidates`` nearest vectors of each of the query's embeddings (rows: the query's, and the picture's
    inside it), each with its best cosine, best first (ties: the query's own first)."""
    scores, ids = index.search(np.atleast_2d(embeddings), tuning.cascade.candidates)
    best: dict[int, float] = {}
    for row_scores, row_ids in zip(scores, ids, strict=True):
        for s, i in zip(row_scores.tolist(), row_ids.tolist(), strict=True):
            if i >= 0 and s > best.get(int(i), -np.inf):
                best[int(i)] = float(s)
    return dict(sorted(best.items(), key=lambda kv: -kv[1]))


def with_nearest(found: Candidates, nearest: Mapping[int, float], own: Mapping[int, float]) -> Candidates:
    """The candidates joined by the nearest vectors; ``own``: the cosines of the candidates found before."""
    return replace(found, cosines={**nearest, **own})
