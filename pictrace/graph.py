"""The match graph: verified geometric links between gallery images, built at ingest, used for query expansion
(pictrace/search/expand.py).

A phone photo of a cover in glare matches that cover's clean scan with many inliers, and the scan matches every
other photo of the cover, but two phone photos (glare against blur, tilt against clutter) often share too few
keypoints to match each other directly. Each new image is therefore verified against its most-voted gallery
images once, at ingest, and the accepted matches are stored in the catalogue both ways (``links``). A query
that matches some gallery image well then also finds that image's links, scored below the image itself
(``expand_weight`` × its score × the link's strength), and each such result says ``via`` which image it was
reached through. On the shared real-photo set this lifted mAP from 0.92 to 0.97 (docs/quality.md).

Links are derived data like the indexes, but costly to recompute (one verification round per image), so they
live in the catalogue (system of record, shared by replicas) and are deleted with either of their images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np

from pictrace.errors import DecodeError
from pictrace.features.orb import OrbFeatures
from pictrace.indexes.local import LocalIndex, Votes
from pictrace.indexes.vector import VectorIndex
from pictrace.matching.frame import frame_agreement, rescale_homography, same_aspect
from pictrace.matching.geometry import match_features, passes_screen
from pictrace.matching.mirror import mirrored_orb
from pictrace.matching.transform import mirror_matrix, overlap_perspective, to_pixel_homography
from pictrace.matching.verdict import VerdictThresholds, classify
from pictrace.store import Catalogue, LinkFit
from pictrace.tuning import Tuning

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidates:
    """The images one stored image is matched against, and what chose them."""

    vec_id: int
    others: list[int]  # most-voted first, then the nearest vectors not voted for
    votes: dict[int, int]  # every image its descriptors voted for, with its votes
    cosines: dict[int, float] = field(default_factory=dict)  # the nearest vectors' cosines
    nearest: frozenset[int] = frozenset()  # those close enough to be matched against the mirror too
    framed: tuple[int, ...] = ()  # the nearest vectors that get the frame check when no fit made them a copy
    # the image's own keypoints and embedding as ``link_candidates`` read them (None: read by ``verify_links``)
    orb: OrbFeatures | None = field(default=None, compare=False)
    embedding: np.ndarray | None = field(default=None, compare=False)
    # the pairs behind the votes, which the voted candidates' screen fits (None: every candidate fully matched)
    screen: Votes | None = field(default=None, compare=False)
    unscreened: frozenset[int] = frozenset()  # the nearest vectors: fully matched whatever their votes


def link_candidates(
    catalogue: Catalogue, local: LocalIndex, tuning: Tuning, vec_id: int, vector: VectorIndex | None = None
) -> Candidates | None:
    """The most-voted gallery images of one stored image, and with ``vector`` its few nearest by embedding (a
    small copy gets few votes, one too small for keypoints none: those get the frame check); None when it was
    deleted meanwhile."""
    own = dict(catalogue.orb_blobs_of([vec_id])).get(vec_id)
    if own is None:
        return None
    orb = OrbFeatures.from_bytes(own)
    votes = local.vote(orb)
    ranked = votes.top(tuning.cascade.graph_candidates + 1, tuning.cascade.local_min_votes)
    others = [v for v in ranked if v != vec_id][: tuning.cascade.graph_candidates]
    cosines: dict[int, float] = {}
    nearest: set[int] = set()
    unscreened: set[int] = set()
    framed: list[int] = []
    wanted = tuning.duplicates
    deepest = max(wanted.nearest_candidates, wanted.frame_candidates)
    embedding = _embedding(catalogue, vec_id)
    if vector is not None and embedding is not None and deepest:
        scores, ids = vector.search(embedding[None, :], deepest + 1)
        neighbours = [(float(s), int(o)) for s, o in zip(scores[0].tolist(), ids[0].tolist(), strict=True)]
        neighbours = [(s, o) for s, o in neighbours if o >= 0 and o != vec_id][:deepest]
        for rank, (score, other) in enumerate(neighbours):
            if score < tuning.verdicts.copy_min_embedding:
                continue
            cosines[other] = score
            if rank < wanted.frame_candidates:
                framed.append(other)
            if rank < wanted.nearest_candidates:
                unscreened.add(other)
                if tuning.cascade.mirror_check and score >= wanted.mirror_min_embedding:
                    nearest.add(other)
                if other not in others:
                    others.append(other)
    counts = {v: c for v, c in votes.counts.items() if v != vec_id and c >= tuning.cascade.local_min_votes}
    return Candidates(
        vec_id, others, counts, cosines, frozenset(nearest), tuple(framed), orb, embedding, votes, frozenset(unscreened)
    )


def verify_links(catalogue: Catalogue, tuning: Tuning, candidates: Candidates) -> list[LinkFit]:
    """Match one stored image against its candidates; the accepted matches, each with its verdict.

    Those of the nearest vectors close enough to be a mirrored copy (``tuning.duplicates``) are matched once
    more against the mirrored image when the direct fit is too weak for a copy: ORB is not mirror-invariant, so
    a mirror gets no direct fit. The mirrored keypoints come from the stored thumbnail, so a backfill or a
    replica needs no original. Where one of a pair is too small for keypoints, the ``framed`` candidates of the
    same aspect ratio get the frame check on the stored thumbnails (pictrace/matching/frame.py) when no fit made
    them a copy.
    """
    vec_id, others, nearest, framed = candidates.vec_id, candidates.others, candidates.nearest, candidates.framed
    facts = catalogue.image_facts([vec_id]).get(vec_id)
    if facts is None:  # deleted meanwhile
        return []
    orb, embedding = candidates.orb, candidates.embedding
    if orb is None:  # not read yet (a pair owed at the end of a run)
        own = dict(catalogue.orb_blobs_of([vec_id])).get(vec_id)
        if own is None:
            return []
        orb, embedding = OrbFeatures.from_bytes(own), _embedding(catalogue, vec_id)
    cosines = dict(candidates.cosines)
    if embedding is not None:
        for ids_, vectors in catalogue.embeddings([v for v in others if v not in cosines]):
            cosines.update(zip(ids_.tolist(), (vectors @ embedding).tolist(), strict=True))
    thresholds = VerdictThresholds.from_tuning(tuning)
    others_facts = catalogue.image_facts([*others, *framed])
    pixels_of = {v: f.pixel_sha256 for v, f in others_facts.items()}
    size = (facts.width, facts.height)
    mirrored: OrbFeatures | None = None
    links: dict[int, LinkFit] = {}
    screen = candidates.screen
    for other, blob in catalogue.orb_blobs_of(others):  # images deleted meanwhile are not read back
        if other not in pixels_of:
            continue
        gallery = OrbFeatures.from_bytes(blob)
        # as the search screens its voted candidates: most voted images are no match, and a RANSAC over the
        # vote pairs (~0.2 ms) tells them from one that is before the full match (~2 ms)
        if (
            screen is not None
            and other not in candidates.unscreened
            and not passes_screen(orb, gallery, screen.pairs(other), tuning)
        ):
            continue
        cosine = cosines.get(other, 0.0)
        match = match_features(orb, gallery, tuning)
        inliers = match.inliers if match.homography is not None else 0
        hom = None if match.homography is None else to_pixel_homography(match.homography, orb.scale, gallery.scale)
        if other in nearest and inliers < tuning.verdicts.copy_min_inliers:
            if mirrored is None:
                mirrored = _mirrored_from_thumbnail(catalogue, facts.sha256, facts.width, tuning)
            flipped = match_features(mirrored, gallery, tuning)
            if flipped.homography is not None and flipped.inliers > inliers:
                inliers = flipped.inliers
                hom = to_pixel_homography(
                    flipped.homography @ mirror_matrix(mirrored.width), mirrored.scale, gallery.scale
                )
        if hom is None:
            continue
        pixels = pixels_of[other]
        tier = classify(
            exact=pixels == facts.pixel_sha256,
            embedding=cosine,
            inliers=inliers,
            perspective=overlap_perspective(hom, size, (others_facts[other].width, others_facts[other].height)),
            thresholds=thresholds,
        )
        links[other] = LinkFit(other, inliers, "copy" if tier == "exact" else tier, round(cosine, 4), hom)
    own_grey: np.ndarray | None = None
    for other in framed:
        fitted = links.get(other)
        image = others_facts.get(other)
        if image is None or (fitted is not None and fitted.tier == "copy"):
            continue
        if min(max(size), max(image.width, image.height)) > tuning.verdicts.frame_side:
            continue  # both large enough for keypoints: the fit above is the verdict
        if not same_aspect(size, (image.width, image.height), tuning.verdicts.frame_aspect):
            continue
        if own_grey is None:
            own_grey = _thumbnail_grey(catalogue, facts.sha256)
        agreement = frame_agreement(own_grey, _thumbnail_grey(catalogue, image.sha256), tuning.verdicts.frame_side)
        inliers = 0 if fitted is None else fitted.inliers
        tier = classify(
            exact=image.pixel_sha256 == facts.pixel_sha256,
            embedding=cosines[other],
            inliers=inliers,
            perspective=None,
            thresholds=thresholds,
            frame=agreement,
        )
        if tier is not None and tier != "similar":  # a whole-frame copy: the rescale is its homography
            hom = rescale_homography(size, (image.width, image.height))
            links[other] = LinkFit(other, inliers, "copy", round(cosines[other], 4), hom)
    return list(links.values())


def find_links(
    catalogue: Catalogue,
    local: LocalIndex,
    tuning: Tuning,
    vec_id: int,
    vector: VectorIndex | None = None,
) -> list[LinkFit]:
    """Verified matches of one stored image against its most-voted gallery images (and with ``vector`` its
    nearest), each with its verdict (``link_candidates``, then ``verify_links``)."""
    if tuning.cascade.graph_candidates == 0:
        return []
    candidates = link_candidates(catalogue, local, tuning, vec_id, vector)
    return [] if candidates is None else verify_links(catalogue, tuning, candidates)


class OwedPairs:
    """The matches that linking each image as it arrives would miss, and linking the finished gallery would make.

    At arrival an image is matched against its most-voted images among those *before* it; linking the finished
    gallery matched each image against its ``k`` most voted among all, later ones included. The links go both
    ways, but a match is not symmetric (the ratio test and RANSAC run from one image's keypoints): on
    copy-public, 100 of the finished gallery's 508 pairs were missing after linking at arrival, 98 of them
    found from the earlier image's side and only 22 from the later one's. The earlier image's side is what is
    owed: each image of a run keeps its ``k`` best-voted images, from its own votes at arrival and then from
    the votes of every image after it (votes are near-symmetric: each descriptor's nearest neighbours, so the
    later image's votes for it stand for its votes for the later one), and the ones it never matched itself
    nor was linked to are matched once the run's images are all in (``owed``): the pairs that linking the
    finished gallery would have matched from its side, not a second pass over the gallery. Images of earlier
    runs are not tracked (as before: a new image is matched against them from its side only).
    Memory: ~(20 * k + 8 * checked) bytes an image of the run, and its links.
    """

    def __init__(self, k: int, checked: int) -> None:
        self._k, self._width = k, max(1, checked)
        self._n = 0
        self._ids = np.zeros(0, dtype=np.int64)  # tracked vec_ids in arrival order (increasing)
        self._top_ids = np.zeros((0, k), dtype=np.int64)
        self._top_votes = np.zeros((0, k), dtype=np.int32)
        self._checked = np.zeros((0, self._width), dtype=np.int64)  # matched from its own side at arrival
        self._linked: set[tuple[int, int]] = set()  # (earlier, later) pairs linked at arrival

    def _grow(self) -> None:
        size = max(64, 2 * len(self._ids))
        self._ids = np.concatenate([self._ids, np.full(size - len(self._ids), np.iinfo(np.int64).max)])
        for name, fill in (("_top_ids", -1), ("_top_votes", 0), ("_checked", -1)):
            old = getattr(self, name)
            grown = np.full((size, old.shape[1]), fill, dtype=old.dtype)
            grown[: len(old)] = old
            setattr(self, name, grown)

    def arrived(self, candidates: Candidates, links: Iterable[LinkFit] = ()) -> None:
        """Record an image just linked from its side (in vec_id order), and offer its votes to those before."""
        if self._k == 0 or (self._n and candidates.vec_id <= self._ids[self._n - 1]):
            return
        self._linked.update((min(f.other, candidates.vec_id), max(f.other, candidates.vec_id)) for f in links)
        if self._n == len(self._ids):
            self._grow()
        row, self._n = self._n, self._n + 1
        self._ids[row] = candidates.vec_id
        own = sorted(candidates.votes.items(), key=lambda kv: (-kv[1], kv[0]))[: self._k]
        self._top_ids[row, : len(own)] = [v for v, _ in own]
        self._top_votes[row, : len(own)] = [c for _, c in own]
        checked = candidates.others[: self._width]
        self._checked[row, : len(checked)] = checked
        if not candidates.votes:
            return
        voted = np.fromiter(candidates.votes.keys(), dtype=np.int64, count=len(candidates.votes))
        counts = np.fromiter(candidates.votes.values(), dtype=np.int32, count=len(candidates.votes))
        rows = np.searchsorted(self._ids[:row], voted)
        found = (rows < row) & (self._ids[np.minimum(rows, max(row - 1, 0))] == voted)
        rows, counts = rows[found], counts[found]  # those it was matched with too: they hold their place
        slot = np.argmin(self._top_votes[rows], axis=1)
        better = counts > self._top_votes[rows, slot]  # a tie keeps the earlier image, as Votes.top does
        rows, slot = rows[better], slot[better]
        self._top_ids[rows, slot] = candidates.vec_id
        self._top_votes[rows, slot] = counts[better]

    def owed(self) -> list[tuple[int, list[int]]]:
        """(image, the images it owes a match with, most voted first) for every tracked image that owes some:
        among its ``k`` best voted, those it did not match itself and is not linked to."""
        out: list[tuple[int, list[int]]] = []
        for row in range(self._n):
            order = np.argsort(-self._top_votes[row], kind="stable")
            ids = self._top_ids[row, order]
            ids = ids[(ids >= 0) & ~np.isin(ids, self._checked[row])]
            if not len(ids):
                continue
            own = int(self._ids[row])
            missing = [v for v in ids.tolist() if (min(own, v), max(own, v)) not in self._linked]
            if missing:
                out.append((own, missing))
        return out


def _embedding(catalogue: Catalogue, vec_id: int) -> np.ndarray | None:
    for _, vectors in catalogue.embeddings([vec_id]):
        return np.asarray(vectors[0], dtype=np.float32)
    return None


def _thumbnail_grey(catalogue: Catalogue, sha256: str) -> np.ndarray:
    """The stored thumbnail in grey (our own encoding: a ~0.2 ms decode, no upload checks)."""
    grey = cv2.imdecode(np.frombuffer(catalogue.thumbnail(sha256), np.uint8), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise DecodeError(f"the stored thumbnail of {sha256} does not decode")
    return np.asarray(grey)


def _mirrored_from_thumbnail(catalogue: Catalogue, sha256: str, width: int, tuning: Tuning) -> OrbFeatures:
    """ORB of the left-right mirrored thumbnail (our own JPEG, decoded without the upload checks), scaled to the
    original's ``width`` as a large picture decoded smaller is, so fits come out in the original's pixels."""
    bgr = cv2.imdecode(np.frombuffer(catalogue.thumbnail(sha256), np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DecodeError(f"the stored thumbnail of {sha256} does not decode")
    return mirrored_orb(np.ascontiguousarray(bgr[:, :, ::-1]), tuning, bgr.shape[1] / width)


def link_images(
    catalogue: Catalogue,
    local: LocalIndex,
    tuning: Tuning,
    vec_ids: Iterable[int],
    vector: VectorIndex | None = None,
) -> int:
    """Compute and store the links of ``vec_ids`` (new images at ingest, or a backfill). Returns links stored."""
    return sum(catalogue.add_links(vec_id, find_links(catalogue, local, tuning, vec_id, vector)) for vec_id in vec_ids)
