"""Small derived images kept in the catalogue: a JPEG thumbnail for the UI and the lossless SSIM gray."""

from __future__ import annotations

import cv2
import numpy as np

from pictrace.errors import DecodeError


def encode_thumbnail(rgb: np.ndarray, *, max_side: int = 256, quality: int = 82) -> bytes:
    """JPEG of the image with its longest side at most ``max_side`` (aspect kept, never upscaled)."""
    if max_side < 1:
        raise ValueError("max_side must be positive")
    img: np.ndarray = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = img.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding of the thumbnail failed")
    return buf.tobytes()


def encode_gray_png(gray: np.ndarray) -> bytes:
    """Lossless PNG of a 2-D uint8 gray image (the SSIM input must come back bit-exact)."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"encode_gray_png needs a 2-D uint8 array, got {gray.dtype} {gray.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(gray))
    if not ok:
        raise ValueError("PNG encoding of the gray image failed")
    return buf.tobytes()


def decode_gray_png(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_gray_png`; a damaged blob is a :class:`DecodeError`, not a crash."""
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if arr is None or arr.ndim != 2 or arr.dtype != np.uint8:
        raise DecodeError("stored gray PNG cannot be decoded")
    return arr
