"""Everything stored per gallery image except its embedding (which is computed in batches)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pictrace.decode import DecodedImage
from pictrace.features.hashing import dhash64, pixel_sha256
from pictrace.features.orb import OrbFeatures, extract_orb
from pictrace.features.ssim import gray256
from pictrace.features.thumbnail import encode_gray_png, encode_thumbnail, thumbnail_pixels
from pictrace.tuning import Tuning


@dataclass(frozen=True)
class LocalFeatures:
    pixel_sha256: str
    dhash: int
    gray_png: bytes  # empty where SSIM reads its gray from the thumbnail (tuning.storage.ssim_gray)
    orb: bytes
    thumbnail: bytes


def orb_of(rgb: np.ndarray, tuning: Tuning, decoded_scale: float = 1.0) -> OrbFeatures:
    """ORB with the configured sizes: gallery images at ingest, queries (and their mirror) at search alike.

    ``decoded_scale`` (``DecodedImage.scale``): ``rgb`` is that many pixels per picture pixel, so the keypoints'
    scale is taken relative to the picture, and fitted homographies come out in the file's pixels."""
    orb = extract_orb(
        rgb, n_features=tuning.orb.features, max_side=tuning.orb.max_side, min_side=tuning.orb.min_side
    )
    return orb if decoded_scale == 1.0 else replace(orb, scale=orb.scale * decoded_scale)


def local_features(image: DecodedImage, tuning: Tuning) -> LocalFeatures:
    """What the catalogue stores, encoded as ``tuning.storage`` says (docs/scaling.md, "Sizing")."""
    storage = tuning.storage
    orb = orb_of(image.rgb, tuning, image.scale).strongest(storage.gallery_features)
    small = thumbnail_pixels(image.rgb)  # one area resize for both: the hash moves by a bit or two, not more
    return LocalFeatures(
        pixel_sha256=pixel_sha256(image.rgb),
        dhash=dhash64(small),
        gray_png=encode_gray_png(gray256(image.rgb)) if storage.ssim_gray == "png" else b"",
        orb=orb.to_bytes(),
        thumbnail=encode_thumbnail(
            small,
            quality=storage.thumbnail_quality,
            fmt=storage.thumbnail_format,
            webp_method=storage.webp_method,
        ),
    )
