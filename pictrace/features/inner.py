"""The picture inside a query: a photo pasted into a screenshot or a page, or framed by an added border.

A screenshot's embedding is mostly the page around the picture (bars, text, coloured boxes), and its ORB
keypoints go to the text's corners: among 10k look-alike distractors such a query's original fell out of the
embedding's 30 nearest and drew no fit (docs/quality.md, "The picture inside a query"). The picture itself is
usually bounded by a straight outline where it meets the page, which Canny's edges close into a contour that
fills its own bounding box. The largest such box with picture-like content (not a flat UI box) is searched by
its own embedding beside the query's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pictrace.features.embed import Embedder
from pictrace.tuning import InnerPicture


@dataclass(frozen=True)
class Box:
    """x, y, width, height in the pixels of the array it was found in."""

    x: int
    y: int
    width: int
    height: int

    def scaled(self, factor: float) -> Box:
        return Box(*(round(v * factor) for v in (self.x, self.y, self.width, self.height)))

    def of(self, rgb: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(rgb[self.y : self.y + self.height, self.x : self.x + self.width])


def inner_picture(rgb: np.ndarray, tuning: InnerPicture) -> Box | None:
    """The largest box inside ``rgb`` whose outline is a closed edge filling it and whose inside is not flat;
    None when there is none (most photos: their edges close no large box)."""
    import cv2

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    height, width = gray.shape
    scale = min(1.0, tuning.side / max(height, width))
    if scale < 1.0:
        gray = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        height, width = gray.shape
    edges = cv2.dilate(cv2.Canny(gray, tuning.canny_low, tuning.canny_high), np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(edges, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    area = height * width
    best: tuple[int, int, int, int] | None = None
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        box = w * h
        if not tuning.min_share * area <= box <= tuning.max_share * area or min(w, h) < tuning.min_side * scale:
            continue
        if cv2.contourArea(contour) < tuning.fill * box:  # an outline that does not close around its box
            continue
        inside = gray[y + 3 : y + h - 3, x + 3 : x + w - 3]  # within the dilated outline
        if inside.size == 0 or float(inside.std()) < tuning.min_contrast:  # a flat box: page furniture
            continue
        if best is None or box > best[2] * best[3]:
            best = (x, y, w, h)
    if best is None:
        return None
    x, y, w, h = best  # less the pixel the dilation added around the outline
    return Box(x + 1, y + 1, w - 2, h - 2).scaled(1.0 / scale)


@dataclass(frozen=True)
class InnerQuery:
    """The picture found inside a query, and its embedding."""

    box: Box  # in the decoded query's pixels
    embedding: np.ndarray


def inner_query(rgb: np.ndarray, embedder: Embedder, tuning: InnerPicture) -> InnerQuery | None:
    """The picture inside the query, embedded; None when there is none (or the search is off)."""
    if not tuning.enabled:
        return None
    box = inner_picture(rgb, tuning)
    return None if box is None else InnerQuery(box, embedder.embed([box.of(rgb)])[0])
