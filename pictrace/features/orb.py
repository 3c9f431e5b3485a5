"""ORB keypoints and RANSAC geometric verification: "is this the same scene, moved/cropped/rotated?".

Embeddings say two images look alike; a homography supported by many distinct keypoints says one is an
edited copy of the other (crop, rotation, rescale, recompression). The verification is deliberately strict:
inliers count *distinct* keypoints on both sides (text and screenshots otherwise pile many matches onto one
point) and degenerate homographies (folded, collapsed or exploded quadrilaterals) are rejected, so two
unrelated images essentially never score.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

# ORB1 (catalogues written before ORB2): float32 x, y per keypoint. ORB2: uint16 x, y in units of ``step``
# (the working image's longest side / 65535, ~0.01 px at 640 px), half the bytes of the points for a rounding
# far below RANSAC's 5 px. Both are read; the magic says which.
_MAGIC_V1 = b"ORB1"
_MAGIC = b"ORB2"
_HEADER_V1 = struct.Struct("<4sIIId")  # magic, n, width, height, scale
_HEADER = struct.Struct("<4sIIIdd")  # magic, n, width, height, scale, step (pixels per point unit)
_POINT_UNITS = 65535
_DESC_BYTES = 32
_MIN_DET = 1.0 / 100.0
_MAX_DET = 100.0

# 12 pyramid levels at scale 1.2 divide a side by 1.2**11 ~ 7.4: anything thinner cannot be analysed.
MIN_SIDE = 8


@dataclass(frozen=True, eq=False)
class OrbFeatures:
    """Keypoints of one image in its working (downscaled) coordinates, ready to store and match."""

    points: np.ndarray  # (N, 2) float32, x, y in the working image
    descriptors: np.ndarray  # (N, 32) uint8
    width: int  # working image size
    height: int
    scale: float  # working size / original size

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def strongest(self, n: int) -> OrbFeatures:
        """The first ``n`` keypoints (strongest first since extraction sorts them by response)."""
        if n >= len(self):
            return self
        return OrbFeatures(self.points[:n], self.descriptors[:n], self.width, self.height, self.scale)

    def to_bytes(self) -> bytes:
        """Compact little-endian blob (ORB2): fixed header, then fixed-point points and raw descriptors.

        Points come back within ``point_step / 2`` of what was stored (:meth:`point_step`)."""
        n = len(self)
        step = self.point_step(self.width, self.height)
        points = np.clip(np.rint(np.asarray(self.points, dtype=np.float64).reshape(n, 2) / step), 0, _POINT_UNITS)
        desc = np.ascontiguousarray(self.descriptors, dtype=np.uint8).reshape(n, _DESC_BYTES)
        header = _HEADER.pack(_MAGIC, n, self.width, self.height, float(self.scale), step)
        return header + points.astype("<u2").tobytes() + desc.tobytes()

    @staticmethod
    def point_step(width: int, height: int) -> float:
        """Pixels per stored point unit: the longest side spread over the uint16 range."""
        return max(width, height, 1) / _POINT_UNITS

    @classmethod
    def from_bytes(cls, data: bytes) -> OrbFeatures:
        """Inverse of :meth:`to_bytes`, and reads the older ORB1 blobs; a blob of the wrong shape is a
        ValueError, never garbage features."""
        if len(data) < _HEADER_V1.size:
            raise ValueError("ORB blob is shorter than its header")
        magic = bytes(data[:4])
        if magic == _MAGIC_V1:
            _, n, width, height, scale = _HEADER_V1.unpack_from(data)
            start, point_bytes, dtype, step = _HEADER_V1.size, 8, "<f4", 1.0
        elif magic == _MAGIC and len(data) >= _HEADER.size:
            _, n, width, height, scale, step = _HEADER.unpack_from(data)
            start, point_bytes, dtype = _HEADER.size, 4, "<u2"
        else:
            raise ValueError(f"ORB blob has an unknown magic {magic!r}")
        points_end = start + n * point_bytes
        if len(data) != points_end + n * _DESC_BYTES:
            raise ValueError(f"ORB blob length {len(data)} does not match its {n} keypoints")
        points = np.frombuffer(data, dtype=dtype, count=n * 2, offset=start).reshape(n, 2)
        desc = np.frombuffer(data, dtype=np.uint8, count=n * _DESC_BYTES, offset=points_end)
        return cls(
            points=(points * step).astype(np.float32) if magic == _MAGIC else points.astype(np.float32),
            descriptors=desc.reshape(n, _DESC_BYTES).copy(),
            width=width,
            height=height,
            scale=scale,
        )


def _empty(width: int, height: int, scale: float) -> OrbFeatures:
    return OrbFeatures(
        points=np.zeros((0, 2), dtype=np.float32),
        descriptors=np.zeros((0, _DESC_BYTES), dtype=np.uint8),
        width=width,
        height=height,
        scale=scale,
    )


def extract_orb(rgb: np.ndarray, *, n_features: int = 1000, max_side: int = 640, min_side: int = 0) -> OrbFeatures:
    """ORB on a grayscale copy whose longest side is at most ``max_side`` and at least ``min_side``.

    Small images are upscaled (bicubic, at most 4x) to ``min_side``: FAST finds few corners on a ~100 px
    thumbnail, and the pyramid only goes down, so a shrunken copy otherwise has to meet its original at a
    coarse level where both have almost no keypoints left.

    A low FAST threshold and a small border keep small or low-contrast images from coming out empty; twelve
    pyramid levels (1.2**11 ~ 7x) let a heavily downscaled copy still meet its original at some level. An
    image with no corners at all (flat colour) legitimately yields zero keypoints.
    """
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape[:2]
    longest = max(h, w)
    if longest > max_side:
        factor = max_side / longest
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    elif 0 < longest < min_side:
        factor = min(4.0, min_side / longest)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_CUBIC)
    wh, ww = gray.shape[:2]
    scale = max(wh, ww) / longest
    if min(wh, ww) < MIN_SIDE:
        # OpenCV's pyramid would shrink a side to 0 pixels and raise; such slivers have no usable corners
        return _empty(ww, wh, scale)
    orb = cv2.ORB.create(
        nfeatures=int(n_features),
        scaleFactor=1.2,
        nlevels=12,
        edgeThreshold=15,
        patchSize=31,
        fastThreshold=10,
    )
    keypoints, descriptors = orb.detectAndCompute(gray, None)
    if descriptors is None or not keypoints:
        return _empty(ww, wh, scale)
    # Strongest first, so a prefix of the list (what the local-feature index keeps) is the best subset.
    order = np.argsort([-kp.response for kp in keypoints], kind="stable")
    points = np.array([keypoints[i].pt for i in order], dtype=np.float32).reshape(-1, 2)
    return OrbFeatures(
        points=points,
        descriptors=np.ascontiguousarray(descriptors[order], dtype=np.uint8),
        width=ww,
        height=wh,
        scale=scale,
    )


@dataclass(frozen=True, eq=False)
class OrbMatch:
    """Outcome of verifying one query against one gallery image."""

    matches: int  # matches surviving the ratio test
    inliers: int  # RANSAC inliers as distinct keypoints: min(#distinct query, #distinct gallery)
    homography: np.ndarray | None  # 3x3 float64 query working -> gallery working; None unless accepted
    score: float  # 0 below min_inliers, else min(1, weighted / full_inliers)
    weighted: float = 0.0  # distinct query inliers, each weighted by how central it is (see centre_weights)


def _plausible(hom: np.ndarray, width: int, height: int) -> bool:
    """Reject homographies no real edit produces: non-finite, collapsing/exploding, folded or twisted."""
    if not np.all(np.isfinite(hom)) or abs(hom[2, 2]) < 1e-12:
        return False
    hom = hom / hom[2, 2]
    det = abs(float(np.linalg.det(hom[:2, :2])))
    if not _MIN_DET <= det <= _MAX_DET:
        return False
    corners = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], dtype=np.float64)
    proj = corners @ hom.T
    if np.any(proj[:, 2] <= 1e-9):  # a corner crossed the horizon: the plane is folded over
        return False
    quad = proj[:, :2] / proj[:, 2:3]
    edges = np.roll(quad, -1, axis=0) - quad
    nxt = np.roll(edges, -1, axis=0)
    cross = edges[:, 0] * nxt[:, 1] - edges[:, 1] * nxt[:, 0]
    # All four turns the same way <=> convex and simple (for a quadrilateral the turns then sum to 360°).
    return bool(np.all(cross > 1e-9) or np.all(cross < -1e-9))


def centre_weights(points: np.ndarray, width: int, height: int, sigma: float) -> np.ndarray:
    """A Gaussian centre prior on query keypoints: 1 at the centre, ~0.08 at a corner for ``sigma`` 0.2.

    People photograph (or crop to) the thing they are looking for, so it sits near the middle of the query.
    Two phone photos of *different* covers taken on the same desk agree on the desk around the edges, often
    with more inliers than the cover itself has with its own scan; weighting inliers by centrality ranks the
    cover's match first. An edited copy keeps its inliers everywhere, the centre included, so copies are not
    hurt. ``sigma`` is a fraction of the longest side; 0 turns the prior off (every inlier counts 1).
    """
    if sigma <= 0 or len(points) == 0:
        return np.ones(len(points), dtype=np.float64)
    side = float(max(width, height, 1))
    dx = (points[:, 0].astype(np.float64) - width / 2.0) / side
    dy = (points[:, 1].astype(np.float64) - height / 2.0) / side
    return np.asarray(np.exp(-(dx * dx + dy * dy) / (2.0 * sigma * sigma)), dtype=np.float64)


def ratio_matches(query: np.ndarray, gallery: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (query, gallery) of the Hamming nearest neighbours that pass Lowe's ratio test.

    FAISS's binary flat search (popcount, one thread) was ~5x faster here than cv2.BFMatcher.knnMatch.
    """
    import faiss

    index = faiss.IndexBinaryFlat(_DESC_BYTES * 8)
    index.add(np.ascontiguousarray(gallery, dtype=np.uint8))
    dist, idx = index.search(np.ascontiguousarray(query, dtype=np.uint8), 2)
    keep = (idx[:, 1] >= 0) & (dist[:, 0] < ratio * dist[:, 1])
    return np.nonzero(keep)[0].astype(np.intp), idx[keep, 0].astype(np.intp)


def match_orb(
    query: OrbFeatures,
    gallery: OrbFeatures,
    *,
    ratio: float = 0.75,
    ransac_px: float = 5.0,
    min_inliers: int = 8,
    full_inliers: int = 40,
    centre_sigma: float = 0.0,
) -> OrbMatch:
    """Ratio-tested Hamming matches, then a RANSAC homography checked for plausibility."""
    if len(query) < 1 or len(gallery) < 2:
        return OrbMatch(matches=0, inliers=0, homography=None, score=0.0)
    qi, gi = ratio_matches(query.descriptors, gallery.descriptors, ratio)
    return verify_matches(
        query,
        gallery,
        qi,
        gi,
        ransac_px=ransac_px,
        min_inliers=min_inliers,
        full_inliers=full_inliers,
        centre_sigma=centre_sigma,
    )


def _fit_homography(
    query: OrbFeatures,
    gallery: OrbFeatures,
    qi: np.ndarray,
    gi: np.ndarray,
    ransac_px: float,
    method: int = cv2.USAC_DEFAULT,
) -> tuple[np.ndarray, np.ndarray] | None:
    """RANSAC homography of matches ``qi[k]`` ↔ ``gi[k]`` and its inlier mask; None when there is no fit."""
    if len(qi) < 4:
        return None
    src = query.points[qi].reshape(-1, 1, 2).astype(np.float32)
    dst = gallery.points[gi].reshape(-1, 1, 2).astype(np.float32)
    try:
        # USAC (OpenCV >= 4.5) stops early on hopeless candidates; cv2.RANSAC ran all 2000 iterations
        # there and cost ~100x more per non-matching candidate, which is most of them.
        hom, mask = cv2.findHomography(src, dst, method, float(ransac_px), maxIters=2000, confidence=0.995)
    except cv2.error:  # e.g. all matched points coincide
        return None
    if hom is None or mask is None:
        return None
    return np.asarray(hom, dtype=np.float64), mask.ravel().astype(bool)


def consensus(
    query: OrbFeatures, gallery: OrbFeatures, qi: np.ndarray, gi: np.ndarray, *, ransac_px: float = 5.0
) -> int:
    """Distinct keypoints (the smaller side) on which one RANSAC homography of the tentative matches agrees.

    A screen, not a verdict: no plausibility check and no ratio test, so it errs towards "maybe". It costs a
    RANSAC over a few dozen matches (~0.15 ms) where the full check costs a Hamming match of every keypoint
    against every keypoint (~2 ms).
    """
    # USAC_FAST skips the local optimisation of the best model: half the time, the same screening decisions
    # on the shared real-photo set.
    fit = _fit_homography(query, gallery, qi, gi, ransac_px, cv2.USAC_FAST)
    if fit is None:
        return 0
    keep = fit[1]
    return min(len(np.unique(qi[keep])), len(np.unique(gi[keep])))


def verify_matches(
    query: OrbFeatures,
    gallery: OrbFeatures,
    qi: np.ndarray,
    gi: np.ndarray,
    *,
    ransac_px: float = 5.0,
    min_inliers: int = 8,
    full_inliers: int = 40,
    centre_sigma: float = 0.0,
) -> OrbMatch:
    """RANSAC homography over tentative matches (query index ``qi[k]`` ↔ gallery index ``gi[k]``).

    The matches may come from the ratio test or from the local-feature index's votes; inliers are counted as
    distinct keypoints on both sides and the homography must be one a real edit can produce. The score
    counts the distinct query inliers weighted by :func:`centre_weights` (plain counts for ``centre_sigma`` 0).
    """
    n_matches = len(qi)
    rejected = OrbMatch(matches=n_matches, inliers=0, homography=None, score=0.0)
    if n_matches < 4:
        return rejected
    fit = _fit_homography(query, gallery, qi, gi, ransac_px)
    if fit is None or not _plausible(fit[0], query.width, query.height):
        return rejected
    hom, keep = fit
    inliers = min(len(np.unique(qi[keep])), len(np.unique(gi[keep])))
    if inliers < min_inliers:
        return OrbMatch(matches=n_matches, inliers=inliers, homography=None, score=0.0)
    hom = np.asarray(hom, dtype=np.float64) / float(hom[2, 2])
    distinct_query = np.unique(qi[keep])
    weighted = float(centre_weights(query.points[distinct_query], query.width, query.height, centre_sigma).sum())
    return OrbMatch(
        matches=n_matches,
        inliers=inliers,
        homography=hom,
        score=min(1.0, weighted / float(full_inliers)),
        weighted=weighted,
    )
