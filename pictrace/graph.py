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

import cv2
import numpy as np

from pictrace.errors import DecodeError
from pictrace.features.orb import OrbFeatures
from pictrace.indexes.local import LocalIndex
from pictrace.indexes.vector import VectorIndex
from pictrace.matching.frame import frame_agreement, rescale_homography, same_aspect
from pictrace.matching.geometry import match_features
from pictrace.matching.mirror import mirrored_orb
from pictrace.matching.transform import mirror_matrix, overlap_perspective, to_pixel_homography
from pictrace.matching.verdict import VerdictThresholds, classify
from pictrace.store import Catalogue, LinkFit
from pictrace.tuning import Tuning

log = logging.getLogger(__name__)


def find_links(
    catalogue: Catalogue,
    local: LocalIndex,
    tuning: Tuning,
    vec_id: int,
    vector: VectorIndex | None = None,
) -> list[LinkFit]:
    """Verified matches of one stored image against its most-voted gallery images, each with its verdict.

    With ``vector``, the few nearest images by embedding are matched too (a small copy gets few votes), and
    those close enough to be a mirrored copy (``tuning.duplicates``) once more against the mirrored image when
    the direct fit is too weak for a copy: ORB is not mirror-invariant, so a mirror gets no direct fit.
    The mirrored keypoints come from the stored thumbnail, so a backfill or a replica needs no original.
    Where one of a pair is too small for keypoints, the nearest vectors of the same aspect ratio get the frame
    check on the stored thumbnails (pictrace/matching/frame.py) when no fit made them a copy.
    """
    if tuning.cascade.graph_candidates == 0:
        return []
    own = dict(catalogue.orb_blobs_of([vec_id])).get(vec_id)
    facts = catalogue.image_facts([vec_id]).get(vec_id)
    if own is None or facts is None:  # deleted meanwhile
        return []
    orb = OrbFeatures.from_bytes(own)
    ranked = local.vote(orb).top(tuning.cascade.graph_candidates + 1, tuning.cascade.local_min_votes)
    others = [v for v in ranked if v != vec_id][: tuning.cascade.graph_candidates]
    embedding = _embedding(catalogue, vec_id)
    cosines: dict[int, float] = {}
    nearest: set[int] = set()  # the vector neighbours close enough to be matched against the mirror too
    framed: list[int] = []  # the vector neighbours that get the frame check when no fit made them a copy
    wanted = tuning.duplicates
    deepest = max(wanted.nearest_candidates, wanted.frame_candidates)
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
                if tuning.cascade.mirror_check and score >= wanted.mirror_min_embedding:
                    nearest.add(other)
                if other not in others:
                    others.append(other)
    if embedding is not None:
        for ids_, vectors in catalogue.embeddings([v for v in others if v not in cosines]):
            cosines.update(zip(ids_.tolist(), (vectors @ embedding).tolist(), strict=True))
    thresholds = VerdictThresholds.from_tuning(tuning)
    others_facts = catalogue.image_facts([*others, *framed])
    pixels_of = {v: f.pixel_sha256 for v, f in others_facts.items()}
    size = (facts.width, facts.height)
    mirrored: OrbFeatures | None = None
    links: dict[int, LinkFit] = {}
    for other, blob in catalogue.orb_blobs_of(others):  # images deleted meanwhile are not read back
        if other not in pixels_of:
            continue
        gallery = OrbFeatures.from_bytes(blob)
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


def _embedding(catalogue: Catalogue, vec_id: int) -> np.ndarray | None:
    for _, vectors in catalogue.embeddings([vec_id]):
        return np.asarray(vectors[0], dtype=np.float32)
    return None


def _thumbnail_grey(catalogue: Catalogue, sha256: str) -> np.ndarray:
    """The stored thumbnail in grey (our own JPEG: a ~0.2 ms decode, no upload checks)."""
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
