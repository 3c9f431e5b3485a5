"""What was done to a copy, read off the homography that ORB + RANSAC fitted: crop box, scale, rotation, flip.

Pure functions over numbers (the API's view of a read-out is pictrace/search/present.py). The homography the
matcher returns maps the query's *working* coordinates (the downscaled image ORB ran on) to the gallery image's
working coordinates; everything here is first brought to original pixel coordinates, so the read-out speaks in
the pixels of the images the user sees.

Conventions (what the user reads):

* ``crop``: the box of the gallery image that the query shows, in gallery pixels (x0, y0, x1, y1), clipped to
  the image. A query that *contains* the gallery image (a border, a screenshot) shows all of it.
* ``query_box``: where the gallery image appears inside the query, in query pixels, clipped to the query.
* ``scale``: query pixels per gallery pixel (0.5: the copy is half the size).
* ``rotation``: degrees the copy was turned counter-clockwise, as seen on screen, in (-180, 180].
* ``flip``: the copy is a mirror image (left-right). Mirror first, then rotation.
* ``perspective``: how far the fit is from an affine map over the part of the query that shows the gallery
  image (0 for crops, rotations and rescales; a phone photo of a print or a screen gives a clearly positive
  value); see :func:`overlap_perspective`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_MIRROR = np.diag([-1.0, 1.0])


@dataclass(frozen=True)
class TransformReadout:
    crop: tuple[int, int, int, int]
    crop_fraction: float  # area of the crop box / area of the gallery image
    query_box: tuple[int, int, int, int]
    scale: float
    rotation: float
    flip: bool
    perspective: float
    homography: np.ndarray  # 3x3, query pixels -> gallery pixels


def to_pixel_homography(hom_working: np.ndarray, query_scale: float, gallery_scale: float) -> np.ndarray:
    """Query original pixels -> gallery original pixels, from the working-coordinate homography.

    ``*_scale`` is working size / original size (``OrbFeatures.scale``).
    """
    to_query_working = np.diag([query_scale, query_scale, 1.0])
    from_gallery_working = np.diag([1.0 / gallery_scale, 1.0 / gallery_scale, 1.0])
    hom: np.ndarray = from_gallery_working @ np.asarray(hom_working, dtype=np.float64) @ to_query_working
    return np.asarray(hom / hom[2, 2], dtype=np.float64)


def mirror_matrix(width: float) -> np.ndarray:
    """Left-right mirror of an image ``width`` pixels wide, in OpenCV keypoint coordinates (centres at ints)."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _project(hom: np.ndarray, points: np.ndarray) -> np.ndarray:
    ones = np.ones((points.shape[0], 1))
    proj: np.ndarray = np.hstack([points, ones]) @ hom.T
    return np.asarray(proj[:, :2] / proj[:, 2:3], dtype=np.float64)


def _box(points: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0 = np.clip(points.min(axis=0), 0, [width, height])
    x1, y1 = np.clip(points.max(axis=0), 0, [width, height])
    return round(float(x0)), round(float(y0)), round(float(x1)), round(float(y1))


def _corners(width: int, height: int) -> np.ndarray:
    return np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)


def perspective_strength(hom: np.ndarray, width: int, height: int) -> float:
    """Largest relative change of the projective denominator over the query's corners.

    For ``w = h20 x + h21 y + 1`` this is ``max |w - w_centre| / w_centre``: 0 for any affine map (crop, scale,
    rotation, flip), about 0.1-0.5 for a photo taken at an angle. Independent of the image's pixel size.
    """
    hom = hom / hom[2, 2]
    w = _corners(width, height) @ hom[2, :2] + 1.0
    centre = float(hom[2, 0] * width / 2 + hom[2, 1] * height / 2 + 1.0)
    return float(np.max(np.abs(w - centre)) / abs(centre)) if centre else math.inf


def overlap_perspective(hom: np.ndarray, query_size: tuple[int, int], gallery_size: tuple[int, int]) -> float:
    """:func:`perspective_strength` over the part of the query that shows the gallery image (``query_box``).

    The fit was made on keypoints both images show; measured over the query's whole frame it extrapolates
    into margins the gallery image does not have (the page around a screenshot, a border, the original seen
    from its crop), where the noise of a fit on a small image grows into a "perspective" that is not there.
    The same for either direction of a pair, up to that noise.
    """
    hom = np.asarray(hom, dtype=np.float64)
    hom = hom / hom[2, 2]
    return _perspective_over(hom, _box(_project(np.linalg.inv(hom), _corners(*gallery_size)), *query_size))


def _perspective_over(hom: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = box
    if x1 - x0 < 2 or y1 - y0 < 2:
        return math.inf
    shifted = hom @ np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
    return perspective_strength(shifted, x1 - x0, y1 - y0)


def read_transform(
    hom_pixels: np.ndarray,
    query_size: tuple[int, int],
    gallery_size: tuple[int, int],
) -> TransformReadout:
    """Crop, scale, rotation and flip of the query relative to the gallery image.

    ``hom_pixels`` maps query pixels to gallery pixels (see :func:`to_pixel_homography`), mirror included
    when the fit was made against a mirrored query (a negative determinant is read as a flip); sizes are
    (width, height). The linear part is taken at the query's
    centre, so a mild perspective does not bias the read-out.
    """
    hom = np.asarray(hom_pixels, dtype=np.float64)
    hom = hom / hom[2, 2]
    qw, qh = query_size
    gw, gh = gallery_size
    gallery_quad = _project(hom, _corners(qw, qh))
    crop = _box(gallery_quad, gw, gh)
    crop_area = max(0, crop[2] - crop[0]) * max(0, crop[3] - crop[1])
    inverse = np.linalg.inv(hom)
    query_box = _box(_project(inverse, _corners(gw, gh)), qw, qh)
    # Jacobian of the gallery -> query map at the gallery point the query's centre lands on.
    centre = _project(hom, np.array([[qw / 2, qh / 2]], dtype=np.float64))[0]
    jac = _jacobian(inverse, centre)
    det = float(np.linalg.det(jac))
    mirrored = det < 0
    if mirrored:
        jac = jac @ _MIRROR  # gallery -> mirrored gallery -> query: peel the mirror off the right
    scale = math.sqrt(abs(det))
    # In image coordinates (y down), [[c, -s], [s, c]] with angle a turns the picture clockwise on screen.
    angle = -math.degrees(math.atan2(jac[1, 0] - jac[0, 1], jac[0, 0] + jac[1, 1]))
    if angle <= -180.0:
        angle += 360.0
    return TransformReadout(
        crop=crop,
        crop_fraction=round(crop_area / float(gw * gh), 4) if gw * gh else 0.0,
        query_box=query_box,
        scale=round(scale, 4),
        rotation=round(angle + 0.0, 2),
        flip=mirrored,
        perspective=round(_perspective_over(hom, query_box), 4),
        homography=hom,
    )


def _jacobian(hom: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Linear part of a homography at ``point`` (exact for affine maps)."""
    x, y = float(point[0]), float(point[1])
    w = hom[2, 0] * x + hom[2, 1] * y + hom[2, 2]
    u = hom[0, 0] * x + hom[0, 1] * y + hom[0, 2]
    v = hom[1, 0] * x + hom[1, 1] * y + hom[1, 2]
    return np.array(
        [
            [(hom[0, 0] * w - u * hom[2, 0]) / w**2, (hom[0, 1] * w - u * hom[2, 1]) / w**2],
            [(hom[1, 0] * w - v * hom[2, 0]) / w**2, (hom[1, 1] * w - v * hom[2, 1]) / w**2],
        ]
    )

