"""Stage 2, verify: which candidates get the full geometric check, and its outcome.

The full check (ORB + RANSAC, pictrace/matching/geometry.py) costs ~2 ms a candidate. The cascade: exact
matches take ``identical_fit`` for free; the others pass a screen on the pairs behind their votes first; the
``verify_embedding_top`` nearest by embedding and the ``verify_voted_top`` most voted are checked whatever their
screen (an edited copy can be too small or too blurred for its keypoints to reach the index, and a tiny one's few
votes too few for the screen's RANSAC, though its full match finds a hundred inliers); the rest keep their
embedding score.

``verify`` runs once on the candidates found without the embedding (while it is computed) and once more when
the nearest vectors have joined them, each time on the candidates it has not considered yet.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field

from pictrace.features.orb import OrbFeatures
from pictrace.indexes.local import Votes
from pictrace.matching.geometry import GeometricFit, fit_geometry, identical_fit, passes_screen
from pictrace.matching.scores import CandidateScore, scored
from pictrace.search.candidates import Candidates
from pictrace.search.schedule import MapEach
from pictrace.tuning import Tuning


@dataclass(frozen=True)
class Checks:
    fits: dict[int, GeometricFit] = field(default_factory=dict)  # the candidates fully checked
    considered: frozenset[int] = frozenset()  # screened (passed or not) or exact: never screened again


def verify(
    query: OrbFeatures,
    found: Candidates,
    orbs: Mapping[int, OrbFeatures],
    done: Checks,
    tuning: Tuning,
    map_each: MapEach,
) -> Checks:
    """``done`` plus the checks of the candidates in ``orbs`` it has not considered (``map_each`` runs them)."""
    new = [v for v in orbs if v not in done.considered]
    fits = dict(done.fits)
    fits.update((v, identical_fit(orbs[v])) for v in new if v in found.exact and v not in fits)
    passed = screen(query, {v: orbs[v] for v in new if v not in fits}, found.votes, tuning, map_each)
    checked = passed | nearest_by_embedding(found.cosines, orbs, tuning) | most_voted(found.voted, new, tuning)
    fits |= fit_all(query, orbs, checked - fits.keys(), tuning, map_each)
    return Checks(fits, done.considered | frozenset(new))


def screen(
    query: OrbFeatures, gallery: Mapping[int, OrbFeatures], votes: Votes, tuning: Tuning, map_each: MapEach
) -> set[int]:
    """The candidates whose vote pairs pass the screen (all of them when it is off, or without votes).

    Matching every query keypoint against every keypoint of a candidate costs ~2 ms; the local index's votes
    already paired some of them up, and a RANSAC over those few dozen pairs costs ~0.2 ms. Measured on the
    shared sets, this checks ~8 of ~27 candidates a query and drops ~1 % of the relevant matches the full
    check would have found (docs/quality.md).
    """
    if tuning.cascade.local_candidates == 0 or tuning.cascade.prescreen_min_inliers == 0:
        return set(gallery)
    todo = sorted(gallery)
    passed = map_each(lambda v: passes_screen(query, gallery[v], votes.pairs(v), tuning), todo)
    return {v for v, ok in zip(todo, passed, strict=True) if ok}


def nearest_by_embedding(cosines: Mapping[int, float], among: Container[int], tuning: Tuning) -> set[int]:
    """The ``verify_embedding_top`` candidates nearest by embedding, of those in ``among`` (ties: cosines' order)."""
    candidates = [v for v in cosines if v in among]
    return set(sorted(candidates, key=lambda v: -cosines[v])[: tuning.cascade.verify_embedding_top])


def most_voted(voted: Sequence[int], among: Container[int], tuning: Tuning) -> set[int]:
    """The ``verify_voted_top`` most voted candidates, of those in ``among``: the first of ``voted`` (the voted
    candidates, most votes first), not a second ranking of every image voted for (~1 ms at 100k images)."""
    return {v for v in voted[: tuning.cascade.verify_voted_top] if v in among}


def fit_all(
    query: OrbFeatures,
    gallery: Mapping[int, OrbFeatures],
    vec_ids: set[int],
    tuning: Tuning,
    map_each: MapEach,
) -> dict[int, GeometricFit]:
    """The full check of these candidates (those in ``gallery``)."""
    todo = sorted(v for v in vec_ids if v in gallery)
    return dict(zip(todo, map_each(lambda v: fit_geometry(query, gallery[v], tuning), todo), strict=True))


def scores(
    found: Candidates, orbs: Container[int], checks: Checks, tuning: Tuning
) -> list[CandidateScore]:
    """Every candidate with stored features, scored (not yet sorted): embedding and fit, SSIM still 0."""
    return [
        scored(v, cosine, checks.fits.get(v), tuning, found.votes.counts.get(v, 0))
        for v, cosine in found.cosines.items()
        if v in orbs
    ]
