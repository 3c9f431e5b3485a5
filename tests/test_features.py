"""Hashing, SSIM, ORB verification and thumbnails on images made in code (scikit-image's bundled photos)."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from pictrace.decode import decode_image
from pictrace.errors import DecodeError
from pictrace.features.hashing import dhash64, hamming64, pixel_sha256, sha256_hex
from pictrace.features.orb import OrbFeatures, OrbMatch, extract_orb, match_orb
from pictrace.features.ssim import gray256, ssim_score
from pictrace.features.thumbnail import (
    decode_ssim_gray,
    encode_gray_png,
    encode_thumbnail,
    media_type,
)

MIN_INLIERS = 8


def _photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos (shipped in the wheel, no network), C-contiguous RGB."""
    loader: Callable[[], np.ndarray] = getattr(skdata, name)
    return np.ascontiguousarray(loader())


def _imdecode(data: bytes) -> np.ndarray:
    out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert out is not None
    return out


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return _photo("astronaut")


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return _photo("coffee")


@pytest.fixture(scope="module")
def astronaut_orb(astronaut: np.ndarray) -> OrbFeatures:
    return extract_orb(astronaut)


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.cvtColor(_imdecode(buf.tobytes()), cv2.COLOR_BGR2RGB)


def _project(hom: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return cv2.perspectiveTransform(pts.reshape(-1, 1, 2).astype(np.float64), hom).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------ hashing


def test_sha256_known_value() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _encode(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


def test_pixel_sha256_same_pixels_any_encoding(astronaut: np.ndarray) -> None:
    small = np.ascontiguousarray(astronaut[:64, :80])
    png = decode_image(_encode(small, "PNG"), max_pixels=10_000_000).rgb
    bmp = decode_image(_encode(small, "BMP"), max_pixels=10_000_000).rgb
    assert _encode(small, "PNG") != _encode(small, "BMP")
    assert pixel_sha256(png) == pixel_sha256(bmp) == pixel_sha256(small)
    changed = small.copy()
    changed[10, 10, 0] ^= 1
    assert pixel_sha256(changed) != pixel_sha256(small)
    # same bytes, different shape: a different picture
    assert pixel_sha256(small.reshape(80, 64, 3)) != pixel_sha256(small)


def test_dhash_near_for_resized_far_for_unrelated(astronaut: np.ndarray, coffee: np.ndarray) -> None:
    h = dhash64(astronaut)
    assert -(2**63) <= h < 2**63
    resized = cv2.resize(astronaut, (200, 200), interpolation=cv2.INTER_AREA)
    assert hamming64(h, dhash64(resized)) <= 6
    assert hamming64(h, dhash64(_jpeg(astronaut, 40))) <= 6
    assert hamming64(h, dhash64(coffee)) >= 20


def test_hamming64_signed_and_unsigned_forms() -> None:
    assert hamming64(-1, 0) == 64
    assert hamming64(-1, 2**64 - 1) == 0
    assert hamming64(0b1011, 0b0001) == 2


def test_dhash_fits_sqlite_int64() -> None:
    ramp = np.tile(np.arange(255, -1, -1, dtype=np.uint8)[None, :, None], (64, 1, 3))  # every bit 0
    assert dhash64(np.ascontiguousarray(ramp)) == 0
    up = np.ascontiguousarray(ramp[:, ::-1])  # brightness rises left to right: every bit 1
    assert dhash64(up) == -1


# --------------------------------------------------------------------------------------------------- SSIM


def test_ssim_identical_is_one_noise_is_low(astronaut: np.ndarray) -> None:
    g = gray256(astronaut)
    assert g.shape == (256, 256)
    assert g.dtype == np.uint8
    assert ssim_score(g, g.copy()) == pytest.approx(1.0)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    assert ssim_score(g, noise) < 0.1
    assert 0.0 <= ssim_score(g, 255 - g) <= 1.0  # anti-correlated clips to 0, never negative


def test_ssim_mismatched_shapes_is_a_bug() -> None:
    with pytest.raises(ValueError, match="equal shapes"):
        ssim_score(np.zeros((4, 4), np.uint8), np.zeros((5, 5), np.uint8))


# ---------------------------------------------------------------------------------------------------- ORB


def test_orb_working_size_and_scale() -> None:
    big = cv2.resize(_photo("astronaut"), (1280, 960), interpolation=cv2.INTER_AREA)
    f = extract_orb(big, max_side=640)
    assert (f.width, f.height) == (640, 480)
    assert f.scale == pytest.approx(0.5)
    assert f.points.dtype == np.float32
    assert f.points.shape[1] == 2
    assert f.descriptors.shape == (len(f.points), 32)
    assert f.descriptors.dtype == np.uint8
    assert 500 <= len(f.points) <= 1000
    assert f.points[:, 0].max() < 640
    assert f.points[:, 1].max() < 480
    small = extract_orb(np.ascontiguousarray(_photo("astronaut")[:100, :150]))
    assert (small.width, small.height, small.scale) == (150, 100, 1.0)  # never upscaled


def test_orb_crop_translation(astronaut: np.ndarray, astronaut_orb: OrbFeatures) -> None:
    side = int(512 * 0.7746)  # 60% of the area
    ox, oy = 70, 40
    crop = np.ascontiguousarray(astronaut[oy : oy + side, ox : ox + side])
    m = match_orb(extract_orb(crop), astronaut_orb)
    assert m.inliers >= MIN_INLIERS
    assert m.score > 0
    assert m.homography is not None
    pts = np.array([[0, 0], [side, 0], [side / 2, side / 2], [0, side]])
    np.testing.assert_allclose(_project(m.homography, pts), pts + np.array([ox, oy]), atol=3.0)


def test_orb_rotation_90(astronaut: np.ndarray, astronaut_orb: OrbFeatures) -> None:
    rotated = np.ascontiguousarray(np.rot90(astronaut))  # counter-clockwise: (x, y) -> (y, W-1-x) back
    m = match_orb(extract_orb(rotated), astronaut_orb)
    assert m.inliers >= MIN_INLIERS
    assert m.homography is not None
    # a point (x, y) of the rotated image shows original pixel (511 - y, x)
    pts = np.array([[10.0, 20.0], [300.0, 100.0], [450.0, 400.0]])
    expected = np.stack([511 - pts[:, 1], pts[:, 0]], axis=1)
    np.testing.assert_allclose(_project(m.homography, pts), expected, atol=3.0)


def test_orb_quarter_downscale(astronaut: np.ndarray, astronaut_orb: OrbFeatures) -> None:
    small = cv2.resize(astronaut, (128, 128), interpolation=cv2.INTER_AREA)
    m = match_orb(extract_orb(small), astronaut_orb)
    assert m.inliers >= MIN_INLIERS
    assert m.homography is not None
    pts = np.array([[16.0, 16.0], [64.0, 64.0], [110.0, 30.0]])
    np.testing.assert_allclose(_project(m.homography, pts), pts * 4, atol=6.0)


def test_orb_jpeg_q30(astronaut: np.ndarray, astronaut_orb: OrbFeatures) -> None:
    m = match_orb(extract_orb(_jpeg(astronaut, 30)), astronaut_orb)
    assert m.inliers >= MIN_INLIERS
    assert m.score == 1.0
    assert m.homography is not None
    pts = np.array([[50.0, 50.0], [256.0, 256.0], [400.0, 120.0]])
    np.testing.assert_allclose(_project(m.homography, pts), pts, atol=2.0)


def test_orb_rotation_15(astronaut: np.ndarray, astronaut_orb: OrbFeatures) -> None:
    rot = cv2.getRotationMatrix2D((256, 256), 15, 1.0)  # original -> rotated
    rotated = cv2.warpAffine(astronaut, rot, (512, 512))
    m = match_orb(extract_orb(rotated), astronaut_orb)
    assert m.inliers >= MIN_INLIERS
    assert m.homography is not None
    pts = np.array([[200.0, 200.0], [300.0, 260.0], [256.0, 150.0]])
    expected = cv2.transform(pts.reshape(-1, 1, 2), cv2.invertAffineTransform(rot)).reshape(-1, 2)
    np.testing.assert_allclose(_project(m.homography, pts), expected, atol=3.0)


def test_orb_scaled_gallery_uses_working_coordinates(astronaut: np.ndarray) -> None:
    big = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    gallery = extract_orb(big)  # working 640x640, scale 0.625
    assert gallery.scale == pytest.approx(0.625)
    m = match_orb(extract_orb(astronaut), gallery)
    assert m.homography is not None
    pts = np.array([[100.0, 100.0], [400.0, 300.0]])
    np.testing.assert_allclose(_project(m.homography, pts), pts * 1.25, atol=3.0)


def test_orb_unrelated_images_score_zero() -> None:
    feats = [extract_orb(_photo(name)) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    for i, q in enumerate(feats):
        for j, g in enumerate(feats):
            if i != j:
                m = match_orb(q, g)
                assert m.inliers < MIN_INLIERS, (i, j, m)
                assert m.score == 0.0
                assert m.homography is None


def orb1_blob(orb: OrbFeatures) -> bytes:
    """The ORB1 blob catalogues held before ORB2 (float32 points), written as that code wrote it."""
    n = len(orb)
    header = struct.pack("<4sIIId", b"ORB1", n, orb.width, orb.height, float(orb.scale))
    return header + orb.points.astype("<f4").tobytes() + orb.descriptors.astype(np.uint8).tobytes()


def test_orb_bytes_round_trip(astronaut_orb: OrbFeatures) -> None:
    blob = astronaut_orb.to_bytes()
    assert len(blob) == 32 + len(astronaut_orb.points) * 36  # 4 bytes of points + 32 of descriptor each
    back = OrbFeatures.from_bytes(blob)
    step = OrbFeatures.point_step(astronaut_orb.width, astronaut_orb.height)
    assert step < 0.01  # a 512 px working image: points within 0.004 px
    np.testing.assert_allclose(back.points, astronaut_orb.points, rtol=0, atol=step / 2 + 1e-4)
    np.testing.assert_array_equal(back.descriptors, astronaut_orb.descriptors)
    assert (back.width, back.height, back.scale) == (
        astronaut_orb.width,
        astronaut_orb.height,
        astronaut_orb.scale,
    )
    assert back.points.dtype == np.float32
    assert back.descriptors.dtype == np.uint8
    with pytest.raises(ValueError, match="length"):
        OrbFeatures.from_bytes(blob[:-1])
    with pytest.raises(ValueError, match="magic"):
        OrbFeatures.from_bytes(b"XXXX" + blob[4:])


def test_orb1_blobs_of_older_catalogues_still_read(astronaut_orb: OrbFeatures) -> None:
    back = OrbFeatures.from_bytes(orb1_blob(astronaut_orb))
    np.testing.assert_array_equal(back.points, astronaut_orb.points)  # float32 then: exact
    np.testing.assert_array_equal(back.descriptors, astronaut_orb.descriptors)
    assert (back.width, back.height, back.scale) == (astronaut_orb.width, astronaut_orb.height, astronaut_orb.scale)
    with pytest.raises(ValueError, match="length"):
        OrbFeatures.from_bytes(orb1_blob(astronaut_orb)[:-1])


def test_compact_orb_verifies_like_the_exact_points(astronaut: np.ndarray, astronaut_orb: OrbFeatures) -> None:
    """A rotated, rescaled copy fits the stored (rounded) keypoints as it fits the extracted ones."""
    h, w = astronaut.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), 12, 0.8)
    copy = extract_orb(np.ascontiguousarray(cv2.warpAffine(astronaut, turn, (w, h))))
    exact = match_orb(copy, astronaut_orb)
    stored = match_orb(copy, OrbFeatures.from_bytes(astronaut_orb.to_bytes()))
    assert exact.homography is not None and stored.homography is not None
    assert abs(stored.inliers - exact.inliers) <= max(2, exact.inliers // 20)
    # the two fits place the picture's corners within a pixel of each other (RANSAC itself allows 5 px)
    corners = np.array([[[0, 0]], [[w, 0]], [[w, h]], [[0, h]]], dtype=np.float64)
    a = cv2.perspectiveTransform(corners, stored.homography)
    b = cv2.perspectiveTransform(corners, exact.homography)
    assert float(np.abs(a - b).max()) < 1.0


def test_orb_empty_features_match_nothing(astronaut_orb: OrbFeatures) -> None:
    flat = extract_orb(np.full((300, 400, 3), 128, dtype=np.uint8))
    assert len(flat.points) == 0
    assert flat.points.shape == (0, 2)
    assert flat.descriptors.shape == (0, 32)
    restored = OrbFeatures.from_bytes(flat.to_bytes())
    assert restored.points.shape == (0, 2)
    for q, g in [(flat, astronaut_orb), (astronaut_orb, flat), (flat, flat)]:
        m = match_orb(q, g)
        assert isinstance(m, OrbMatch)
        assert (m.matches, m.inliers, m.score, m.homography) == (0, 0, 0.0, None)


def test_orb_tiny_image_does_not_crash(astronaut_orb: OrbFeatures) -> None:
    tiny = extract_orb(np.ascontiguousarray(_photo("astronaut")[:8, :8]))
    assert match_orb(tiny, astronaut_orb).score == 0.0


# ------------------------------------------------------------------------------------------- thumbnails


def test_thumbnail_keeps_aspect_and_never_upscales(coffee: np.ndarray) -> None:
    thumb = _imdecode(encode_thumbnail(coffee))
    assert thumb.shape[:2] == (171, 256)  # 400x600 -> 171x256
    small = np.ascontiguousarray(coffee[:50, :80])
    data = encode_thumbnail(small, max_side=256, quality=90)
    assert data[:3] == b"\xff\xd8\xff"
    assert _imdecode(data).shape[:2] == (50, 80)


def test_thumbnail_colours_are_rgb_not_bgr() -> None:
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    out = decode_image(encode_thumbnail(red), max_pixels=1_000_000).rgb
    assert out[32, 32, 0] > 240
    assert out[32, 32, 2] < 15


def test_gray_png_round_trip_is_lossless(astronaut: np.ndarray) -> None:
    g = gray256(astronaut)
    back = decode_ssim_gray(encode_gray_png(g))
    np.testing.assert_array_equal(back, g)
    assert back.dtype == np.uint8
    with pytest.raises(DecodeError):
        decode_ssim_gray(b"not a png")
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_gray_png(astronaut)


def test_webp_thumbnail_decodes_with_its_size_and_type(coffee: np.ndarray) -> None:
    webp = encode_thumbnail(coffee, quality=80, fmt="webp")
    jpeg = encode_thumbnail(coffee)
    assert (media_type(webp), media_type(jpeg)) == ("image/webp", "image/jpeg")
    assert media_type(encode_gray_png(gray256(coffee))) == "image/png"
    exact = cv2.resize(coffee, (256, 171), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    back = _imdecode(webp)
    assert back.shape == (171, 256, 3)
    assert cv2.PSNR(np.ascontiguousarray(exact), back) > 30
    assert len(webp) < len(jpeg)
    with pytest.raises(ValueError, match="format"):
        encode_thumbnail(coffee, fmt="gif")


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_ssim_gray_from_the_thumbnail_is_close_to_the_exact_gray(astronaut: np.ndarray, fmt: str) -> None:
    """SSIM against the gray read back from the thumbnail is within 0.02 of SSIM against the exact gray."""
    exact = gray256(astronaut)
    from_thumb = decode_ssim_gray(encode_thumbnail(astronaut, quality=80, fmt=fmt))
    assert from_thumb.shape == (256, 256) and from_thumb.dtype == np.uint8
    query = gray256(np.ascontiguousarray(cv2.resize(astronaut, (300, 300))[20:280, 10:290]))
    assert abs(ssim_score(query, from_thumb) - ssim_score(query, exact)) < 0.02
    assert ssim_score(exact, from_thumb) > 0.9


def test_ssim_gray_reads_the_png_of_older_catalogues_exactly(astronaut: np.ndarray) -> None:
    g = gray256(astronaut)
    np.testing.assert_array_equal(decode_ssim_gray(encode_gray_png(g)), g)
    with pytest.raises(DecodeError):
        decode_ssim_gray(b"")
    with pytest.raises(DecodeError):
        decode_ssim_gray(b"RIFF0000WEBP broken")
