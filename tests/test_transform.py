"""The transform read-out recovers known edits: crop box, scale, rotation (90° and small angles) and flip.

Edits are made in code on scikit-image's photos, then ORB + RANSAC fits the homography exactly as the search
does, so these tests cover the whole read-out path. Tolerances: crop box within 3% of the gallery image's
longer side, scale within 3%, rotation within 1.5°, flip exact.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from pictrace.features.extract import orb_of
from pictrace.features.orb import extract_orb, match_orb
from pictrace.matching.mirror import mirrored_orb
from pictrace.matching.scores import CandidateScore
from pictrace.matching.transform import mirror_matrix, perspective_strength, read_transform, to_pixel_homography
from pictrace.search.present import transform_info
from pictrace.search.rerank import mirror_pass
from pictrace.search.schedule import map_serial
from pictrace.tuning import Tuning

BOX_TOL = 0.03
SCALE_TOL = 0.03
ANGLE_TOL = 1.5


def fit(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Query pixels -> gallery pixels, fitted the way the search fits it."""
    q = extract_orb(query)
    g = extract_orb(gallery)
    match = match_orb(q, g)
    assert match.homography is not None, f"no fit ({match.inliers} inliers, {match.matches} matches)"
    return to_pixel_homography(match.homography, q.scale, g.scale)


def readout(query: np.ndarray, gallery: np.ndarray):  # type: ignore[no-untyped-def]
    hom = fit(query, gallery)
    return read_transform(hom, (query.shape[1], query.shape[0]), (gallery.shape[1], gallery.shape[0]))


def assert_box(found: tuple[int, int, int, int], expected: tuple[float, ...], side: int) -> None:
    err = max(abs(a - b) for a, b in zip(found, expected, strict=True))
    assert err <= BOX_TOL * side, (found, expected)


def angle_diff(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def rotate(rgb: np.ndarray, degrees: float, scale: float = 1.0) -> np.ndarray:
    """Counter-clockwise rotation about the centre, keeping the whole picture (canvas grows)."""
    h, w = rgb.shape[:2]
    mat = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, scale)
    cos, sin = abs(mat[0, 0]), abs(mat[0, 1])
    nw, nh = int(h * sin + w * cos), int(h * cos + w * sin)
    mat[0, 2] += nw / 2 - w / 2
    mat[1, 2] += nh / 2 - h / 2
    return cv2.warpAffine(rgb, mat, (nw, nh), borderValue=(255, 255, 255))


# --- pure read-out of known homographies ------------------------------------------------------------------


def test_identity_reads_as_no_edit() -> None:
    out = read_transform(np.eye(3), (400, 300), (400, 300))
    assert out.crop == (0, 0, 400, 300) and out.query_box == (0, 0, 400, 300)
    assert out.scale == 1.0 and out.rotation == 0.0 and not out.flip and out.perspective == 0.0
    assert out.crop_fraction == 1.0


@pytest.mark.parametrize("degrees", [-170.0, -90.0, -12.5, 0.0, 7.0, 90.0, 180.0])
@pytest.mark.parametrize("flip", [False, True])
def test_known_similarity_transforms(degrees: float, flip: bool) -> None:
    """query = rotate(scale(mirror?(gallery crop))): build the gallery->query map, read it back."""
    s = 0.5
    rad = math.radians(-degrees)  # counter-clockwise on screen is a negative angle in y-down coordinates
    rot = np.array([[math.cos(rad), -math.sin(rad)], [math.sin(rad), math.cos(rad)]])
    linear = s * rot @ (np.diag([-1.0, 1.0]) if flip else np.eye(2))
    g2q = np.eye(3)
    g2q[:2, :2] = linear
    g2q[:2, 2] = [300.0, 200.0]
    out = read_transform(np.linalg.inv(g2q), (600, 400), (800, 600))
    assert out.flip is flip
    assert abs(out.scale - s) < 1e-6
    assert angle_diff(out.rotation, degrees) < 1e-6
    assert out.perspective < 1e-9


def test_perspective_strength_separates_affine_from_projective() -> None:
    affine = np.array([[0.9, 0.1, 5], [-0.1, 0.9, 7], [0, 0, 1]], dtype=float)
    assert perspective_strength(affine, 640, 480) == 0.0
    tilted = affine.copy()
    tilted[2, :2] = [3e-4, 1e-4]
    assert 0.1 < perspective_strength(tilted, 640, 480) < 0.5


def test_transform_info_is_plain_json() -> None:
    info = transform_info(read_transform(np.eye(3), (10, 10), (10, 10)))
    assert info.model_dump()["homography"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


# --- recovered from real ORB fits on edited photos ---------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "rocket", "coffee"])
def test_crop_box_is_recovered(photos: dict[str, np.ndarray], name: str) -> None:
    gallery = photos[name]
    h, w = gallery.shape[:2]
    x0, y0, x1, y1 = int(w * 0.2), int(h * 0.15), int(w * 0.75), int(h * 0.8)
    out = readout(np.ascontiguousarray(gallery[y0:y1, x0:x1]), gallery)
    assert_box(out.crop, (x0, y0, x1, y1), max(h, w))
    assert abs(out.scale - 1.0) < SCALE_TOL and angle_diff(out.rotation, 0) < ANGLE_TOL and not out.flip
    assert abs(out.crop_fraction - (x1 - x0) * (y1 - y0) / (w * h)) < 0.05
    assert out.perspective < 0.1  # RANSAC noise on a pure crop; phone shots of a print measure far more


@pytest.mark.parametrize("factor", [0.3, 0.5, 1.6])
def test_scale_is_recovered(photos: dict[str, np.ndarray], factor: float) -> None:
    gallery = photos["astronaut"]
    h, w = gallery.shape[:2]
    query = cv2.resize(gallery, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_AREA)
    out = readout(query, gallery)
    assert abs(out.scale - factor) <= SCALE_TOL * factor
    assert_box(out.crop, (0, 0, w, h), max(h, w))


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_quarter_turns_are_recovered(photos: dict[str, np.ndarray], degrees: int) -> None:
    gallery = photos["chelsea"]
    query = np.ascontiguousarray(np.rot90(gallery, k=degrees // 90))  # counter-clockwise
    out = readout(query, gallery)
    assert angle_diff(out.rotation, degrees) < ANGLE_TOL, out.rotation
    assert abs(out.scale - 1) < SCALE_TOL and not out.flip


@pytest.mark.parametrize("degrees", [-15.0, -5.0, 3.0, 10.0, 20.0])
def test_small_rotations_are_recovered(photos: dict[str, np.ndarray], degrees: float) -> None:
    gallery = photos["rocket"]
    out = readout(rotate(gallery, degrees, 0.8), gallery)
    assert angle_diff(out.rotation, degrees) < ANGLE_TOL, out.rotation
    assert abs(out.scale - 0.8) < SCALE_TOL * 0.8


def test_crop_scale_and_rotation_together(photos: dict[str, np.ndarray]) -> None:
    gallery = photos["coffee"]
    h, w = gallery.shape[:2]
    box = (int(w * 0.1), int(h * 0.1), int(w * 0.7), int(h * 0.9))
    cropped = np.ascontiguousarray(gallery[box[1] : box[3], box[0] : box[2]])
    query = np.ascontiguousarray(np.rot90(cv2.resize(cropped, None, fx=0.6, fy=0.6)))
    out = readout(query, gallery)
    assert_box(out.crop, box, max(h, w))
    assert abs(out.scale - 0.6) < SCALE_TOL * 0.6 and angle_diff(out.rotation, 90) < ANGLE_TOL


def test_mirrored_copy_needs_the_mirror_pass(photos: dict[str, np.ndarray]) -> None:
    """A direct ORB match fails on a mirrored copy; the mirror pass finds it and the read-out says flip."""
    gallery = photos["astronaut"]
    h, w = gallery.shape[:2]
    box = (int(w * 0.1), int(h * 0.2), int(w * 0.9), int(h * 0.9))
    query = np.ascontiguousarray(gallery[box[1] : box[3], box[0] : box[2]][:, ::-1])
    tuning = Tuning()
    g = extract_orb(gallery, n_features=tuning.orb.features, max_side=tuning.orb.max_side)
    direct = match_orb(extract_orb(query), g)
    assert direct.homography is None
    before = [CandidateScore(7, 0.8, 0.0, 0.0, direct.inliers, 0.4)]
    (after,) = mirror_pass(mirrored_orb(query, tuning), before, {7: g}, tuning, map_serial)
    assert after.homography is not None and after.orb_inliers >= tuning.check.min_inliers
    out = read_transform(after.homography, (query.shape[1], query.shape[0]), (w, h))
    assert out.flip and angle_diff(out.rotation, 0) < ANGLE_TOL and abs(out.scale - 1) < SCALE_TOL
    assert_box(out.crop, box, max(h, w))
    off = tuning.replace(cascade={"mirror_check": False})
    assert mirror_pass(mirrored_orb(query, off), before, {7: g}, off, map_serial) == before


def test_mirror_matrix_is_its_own_inverse() -> None:
    m = mirror_matrix(101)
    assert np.allclose(m @ m, np.eye(3))
    assert np.allclose(m @ [0, 5, 1], [100, 5, 1])


@pytest.mark.parametrize("side", [64, 80])
def test_small_mirrored_copy_is_upscaled_like_any_query(photos: dict[str, np.ndarray], side: int) -> None:
    """A thumbnail-sized mirrored copy: the mirror pass extracts ORB as the search does for the query (small
    images upscaled to ``orb_min_side``); at its own 64-80 px ORB finds too few corners to fit anything."""
    gallery = photos["coffee"]
    h, w = gallery.shape[:2]
    query = np.ascontiguousarray(cv2.resize(gallery, (side, side * h // w), interpolation=cv2.INTER_AREA)[:, ::-1])
    tuning = Tuning()
    g = orb_of(gallery, tuning)  # extracted as at ingest
    candidate = CandidateScore(7, 0.8, 0.0, 0.0, 0, 0.4)
    (after,) = mirror_pass(mirrored_orb(query, tuning), [candidate], {7: g}, tuning, map_serial)
    assert after.homography is not None and after.orb_inliers >= tuning.check.min_inliers
    out = read_transform(after.homography, (query.shape[1], query.shape[0]), (w, h))
    assert out.flip and abs(out.scale - side / w) < SCALE_TOL * side / w


def test_a_crop_of_a_large_picture_reads_out_in_the_files_pixels(photos: dict[str, np.ndarray]) -> None:
    """A gallery photo of 3,000 px is decoded at half size (draft mode), yet the crop box is read out in its own
    pixels: the decode's scale is carried into the keypoints' scale, so the homography maps file pixels."""
    from conftest import encode

    from pictrace.decode import decode_image
    from pictrace.matching.geometry import fit_geometry

    tuning = Tuning()
    big = cv2.resize(photos["astronaut"], (3000, 3000), interpolation=cv2.INTER_CUBIC)
    gallery = decode_image(encode(big), max_pixels=50_000_000, draft_min_side=tuning.decoding.draft_min_side)
    assert gallery.scale < 1 and (gallery.width, gallery.height) == (3000, 3000)
    x0, y0, x1, y1 = 600, 450, 2250, 2400
    query = decode_image(encode(cv2.resize(big[y0:y1, x0:x1], (550, 650))), max_pixels=50_000_000)
    fit = fit_geometry(orb_of(query.rgb, tuning, query.scale), orb_of(gallery.rgb, tuning, gallery.scale), tuning)
    assert fit.homography is not None
    out = read_transform(fit.homography, (query.width, query.height), (gallery.width, gallery.height))
    assert_box(out.crop, (x0, y0, x1, y1), 3000)
