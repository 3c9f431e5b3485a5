"""Is one image the other's whole frame again (rescaled, recompressed, recoloured)? A pixel check, no keypoints.

ORB needs corners, and a copy shrunk to 50-100 px and saved at JPEG quality 15-40 keeps too few of them to fit
a homography against its original (docs/duplicates.md: the copies most often missed). When two images have the
same aspect ratio, the homography a whole-frame copy would have is known without any matching (a pure
rescale), so the check is on pixels instead: both are brought to the smaller one's size (at most
``side`` px, where JPEG noise is averaged away) and their grey-level *gradients* are correlated. Gradients, not
levels: a recoloured or greyscale copy keeps its edges, and a white product background (equal in every photo of
a shop) has none, so two different photos on it do not agree for their background's sake.

Pure functions over decoded grey images; the match graph (pictrace/graph.py) decides which pairs are checked.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def same_aspect(a: tuple[int, int], b: tuple[int, int], tolerance: float) -> bool:
    """Whether two (width, height) sizes have the same aspect ratio within ``tolerance`` (log ratio)."""
    if min(a) < 1 or min(b) < 1:
        return False
    return abs(math.log((a[0] / a[1]) / (b[0] / b[1]))) <= tolerance


def frame_agreement(a: np.ndarray, b: np.ndarray, side: int) -> float:
    """Gradient correlation of two grey images (any sizes) over their whole frames, at the smaller one's size
    capped at ``side`` px on its longer side: 1 for the same picture, about 0-0.9 for different photos of one
    product on one background. 0 when either is flat."""
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    factor = min(1.0, side / max(h, w))
    size = (max(8, round(w * factor)), max(8, round(h * factor)))
    num, den_a, den_b = 0.0, 0.0, 0.0
    ga = _gradients(cv2.resize(a, size, interpolation=cv2.INTER_AREA))
    gb = _gradients(cv2.resize(b, size, interpolation=cv2.INTER_AREA))
    for da, db in zip(ga, gb, strict=True):
        num += float((da * db).sum())
        den_a += float((da * da).sum())
        den_b += float((db * db).sum())
    if den_a <= 0 or den_b <= 0:
        return 0.0
    return num / math.sqrt(den_a * den_b)


def _gradients(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = gray.astype(np.float32)
    return cv2.Sobel(img, cv2.CV_32F, 1, 0), cv2.Sobel(img, cv2.CV_32F, 0, 1)


def rescale_homography(a: tuple[int, int], b: tuple[int, int]) -> np.ndarray:
    """The homography of a whole-frame copy: ``a``'s pixels onto ``b``'s (sizes as width, height)."""
    return np.diag([b[0] / a[0], b[1] / a[1], 1.0])


def cells_agreeing(a: np.ndarray, b: np.ndarray, a_to_b: np.ndarray, cells: int = 4) -> float:
    """Where a homography says grey image ``a`` shows part of grey image ``b`` (``a_to_b``: a's pixels -> b's),
    the share of a's cells (a ``cells`` x ``cells`` grid) whose gradients correlate with b's warped onto them
    (at least 0.5), among the cells that lie inside b and have texture in both. A copy agrees in nearly every
    cell; a map fitted on one part of a collage and extended over the rest does not agree beyond that part."""
    h, w = a.shape[:2]
    if min(h, w) < 2 * cells:
        return 1.0  # too small to say where it agrees
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(b, a_to_b, (w, h), flags=flags)
    inside = cv2.warpPerspective(np.full(b.shape[:2], 255, np.uint8), a_to_b, (w, h), flags=flags) == 255
    (ax, ay), (bx, by) = _gradients(cv2.GaussianBlur(a, (0, 0), 1.0)), _gradients(cv2.GaussianBlur(warped, (0, 0), 1.0))
    weight = inside.astype(np.float64)
    rows, cols = [i * h // cells for i in range(cells)], [j * w // cells for j in range(cells)]

    def per_cell(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(np.add.reduceat(x, rows, axis=0), cols, axis=1)

    num = per_cell((ax * bx + ay * by) * weight)
    den_a, den_b = per_cell((ax * ax + ay * ay) * weight), per_cell((bx * bx + by * by) * weight)
    shown, area = per_cell(weight), per_cell(np.ones_like(weight))
    # a cell says something where most of it lies inside b and both have texture there (not a plain
    # background, not a black corner)
    judged = (shown >= 0.5 * area) & (den_a >= _TEXTURE * shown) & (den_b >= _TEXTURE * shown)
    if not judged.any():
        return 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = num / np.sqrt(den_a * den_b)
    return float((corr[judged] >= _CELL_AGREES).mean())


_TEXTURE = 100.0  # mean squared Sobel response (grey levels) below which a cell is flat
_CELL_AGREES = 0.5
