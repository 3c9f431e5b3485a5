"""Small derived images kept in the catalogue: the thumbnail for the UI (JPEG, or WebP since the compact
catalogue) and SSIM's gray (its own lossless PNG in older catalogues; now read from the thumbnail)."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from pictrace.errors import DecodeError
from pictrace.features.ssim import gray256

_ENCODINGS = {"jpeg": (".jpg", cv2.IMWRITE_JPEG_QUALITY), "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY)}


def thumbnail_pixels(rgb: np.ndarray, max_side: int = 256) -> np.ndarray:
    """The image with its longest side at most ``max_side`` (area-averaged, aspect kept, never upscaled): what
    the thumbnail encodes, and small enough for the other whole-image summaries (the difference hash)."""
    if max_side < 1:
        raise ValueError("max_side must be positive")
    img: np.ndarray = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = img.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img


def encode_thumbnail(
    rgb: np.ndarray, *, max_side: int = 256, quality: int = 82, fmt: str = "jpeg", webp_method: int = 4
) -> bytes:
    """JPEG or WebP (``fmt``) of the image with its longest side at most ``max_side`` (aspect kept, never
    upscaled). ``webp_method``: libwebp's effort, 0 (fastest) to 6 (smallest); OpenCV's encoder fixes it at 4,
    so any other goes through Pillow's."""
    if fmt not in _ENCODINGS:
        raise ValueError(f"unknown thumbnail format {fmt!r}")
    img = thumbnail_pixels(rgb, max_side)
    if fmt == "webp" and webp_method != 4:
        out = io.BytesIO()
        Image.fromarray(img).save(out, "WEBP", quality=int(quality), method=int(webp_method))
        return out.getvalue()
    bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ext, flag = _ENCODINGS[fmt]
    ok, buf = cv2.imencode(ext, bgr, [flag, int(quality)])
    if not ok:
        raise ValueError(f"{fmt} encoding of the thumbnail failed")
    return buf.tobytes()


def encode_gray_png(gray: np.ndarray) -> bytes:
    """Lossless PNG of a 2-D uint8 gray image (``Storage.ssim_gray="png"``: SSIM's gray comes back bit-exact)."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"encode_gray_png needs a 2-D uint8 array, got {gray.dtype} {gray.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(gray))
    if not ok:
        raise ValueError("PNG encoding of the gray image failed")
    return buf.tobytes()


def decode_ssim_gray(data: bytes) -> np.ndarray:
    """SSIM's 256x256 gray from what the catalogue keeps for it: the exact gray's PNG (older catalogues), or
    the thumbnail, whose gray is made the way ``gray256`` makes the query's.

    Self-describing, so catalogues holding either (or both) read alike: a decoded picture that is already a
    256x256 gray is used as it is (what ``gray256`` would leave unchanged), anything else goes through
    ``gray256``. A damaged blob is a :class:`DecodeError`."""
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if arr is None or arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise DecodeError("stored SSIM gray (or thumbnail) cannot be decoded")
    if arr.ndim == 3:  # OpenCV decodes colour as BGR (BGRA with alpha)
        code = cv2.COLOR_BGRA2GRAY if arr.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        arr = cv2.cvtColor(arr, code)
    return gray256(arr)


def media_type(data: bytes) -> str:
    """The MIME type of a stored thumbnail, read from its first bytes (older catalogues hold JPEG)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return "image/jpeg"
