"""Exact and near-duplicate fingerprints.

``sha256_hex`` identifies the same *file*, ``pixel_sha256`` the same *picture* after decoding (a PNG and a BMP
of identical pixels collide on purpose), and ``dhash64`` survives resizing and recompression so near copies
can be found with a Hamming distance in SQL.
"""

from __future__ import annotations

import hashlib
import struct

import cv2
import numpy as np

_MASK64 = (1 << 64) - 1


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of raw bytes (the upload or download as received)."""
    return hashlib.sha256(data).hexdigest()


def pixel_sha256(rgb: np.ndarray) -> str:
    """Hex SHA-256 of shape + pixels, so two encodings of the same pixels are the same image.

    The shape is hashed too: the same bytes laid out as 2x6 and 3x4 are different pictures.
    """
    pixels = np.ascontiguousarray(rgb, dtype=np.uint8)
    h = hashlib.sha256()
    h.update(struct.pack(f"<I{pixels.ndim}Q", pixels.ndim, *pixels.shape))
    h.update(pixels.data)
    return h.hexdigest()


def _gray(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim == 2:
        return rgb
    return cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2GRAY)


def dhash64(rgb: np.ndarray) -> int:
    """64-bit difference hash (9x8 gray, 'is the right neighbour brighter?'), as a signed int64.

    The bits are an unsigned 64-bit pattern; it is returned two's-complement signed so it fits SQLite's
    INTEGER column unchanged. :func:`hamming64` accepts either form.
    """
    gray = _gray(rgb).astype(np.float32)
    small = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming64(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes (signed or unsigned representation)."""
    return ((a ^ b) & _MASK64).bit_count()
