"""Structural similarity on a fixed 256x256 grayscale, a cheap pixel-level re-ranking signal.

A fixed size (aspect ratio deliberately ignored) makes every stored gray comparable to every query, and lets
the catalogue keep one small lossless PNG per image instead of re-decoding the original at search time.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from skimage.metrics import structural_similarity

SSIM_SIDE = 256


def gray256(rgb: np.ndarray) -> np.ndarray:
    """(256, 256) uint8 grayscale of an RGB (or already gray) image, resized with INTER_AREA."""
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    out = cv2.resize(gray, (SSIM_SIDE, SSIM_SIDE), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out, dtype=np.uint8)


def ssim_score(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two same-shape gray images in [0, 1] (negative correlation counts as no similarity)."""
    if a.shape != b.shape:
        raise ValueError(f"ssim_score needs equal shapes, got {a.shape} and {b.shape}")
    value = float(structural_similarity(a, b, data_range=255))  # type: ignore[no-untyped-call]
    if not math.isfinite(value):
        return 0.0
    return min(1.0, max(0.0, value))
