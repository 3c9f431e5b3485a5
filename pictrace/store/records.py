"""What the catalogue stores and returns, as plain frozen values (no SQL here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class StoredImage:
    """Everything the ingest computed for one distinct image (one SHA-256)."""

    sha256: str
    pixel_sha256: str
    width: int
    height: int
    format: str
    nbytes: int
    dhash: int
    embedding: np.ndarray
    gray_png: bytes  # SSIM's gray as PNG, or empty: SSIM then reads the thumbnail (decode_ssim_gray)
    orb: bytes
    thumbnail: bytes


@dataclass(frozen=True)
class Source:
    """Where an image came from: a db.json entry (origin 'gallery') or an API call (origin 'api')."""

    url: str
    origin: str = "gallery"
    entry_url: str | None = None
    entry_id: str | None = None
    position: int | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class FileStat:
    """A file's size and modification time: equal on two scans, the file is taken as unchanged (not read)."""

    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SourceState:
    status: str
    sha256: str | None
    error: str | None


@dataclass(frozen=True)
class FailedSource:
    url: str
    position: int | None
    error: str


@dataclass(frozen=True)
class ImageRecord:
    """What a search result shows about a gallery image (its first source names it)."""

    vec_id: int
    sha256: str
    pixel_sha256: str
    width: int
    height: int
    entry_id: str
    url: str  # as written in db.json (or given to the API)
    location: str  # where it was fetched from: the URL, or the resolved local path
    metadata: dict[str, Any]

    @property
    def is_remote(self) -> bool:
        return self.location.startswith(("http://", "https://"))


@dataclass(frozen=True)
class GalleryImage:
    """A row of the gallery page."""

    sha256: str
    width: int
    height: int
    format: str
    nbytes: int
    entry_id: str
    url: str  # as written in db.json
    location: str  # the URL, or the resolved local path
    sources: int  # URLs with these same bytes

    @property
    def is_remote(self) -> bool:
        return self.location.startswith(("http://", "https://"))


@dataclass(frozen=True)
class ChangePosition:
    """Where a replica stands in the change log: the last seq applied and the generation it brought."""

    seq: int
    generation: int


@dataclass(frozen=True)
class Change:
    """One row of the change log: an image (its vec_id) that was added or removed."""

    seq: int
    vec_id: int
    op: str  # 'add' | 'remove'
    generation: int


@dataclass(frozen=True)
class LinkFit:
    """One verified link of an image to ``other``, as the match graph found it: how many keypoints agree, the
    pair's verdict (``copy`` / ``similar``), their embedding cosine, and the homography from this image's
    pixels to the other's (mirror included), from which the duplicate groups read what was done."""

    other: int
    inliers: int
    tier: str | None = None
    cosine: float | None = None
    homography: np.ndarray | None = None


@dataclass(frozen=True)
class PairLink:
    """A stored link read back in one direction (``homography``: ``vec_id`` pixels -> ``other`` pixels; None but
    for a copy)."""

    vec_id: int
    other: int
    inliers: int
    tier: str | None
    cosine: float | None
    homography: np.ndarray | None


@dataclass(frozen=True)
class GroupLinks:
    """The stored links of a set of images: those between two of them, each direction, and for each image
    outside linked to one of them, its strongest link's inliers."""

    inside: list[PairLink]
    leaving: dict[int, int]


@dataclass(frozen=True)
class ImageFacts:
    """What the duplicate groups need to know of an image to choose the keeper and to show it."""

    vec_id: int
    sha256: str
    pixel_sha256: str
    width: int
    height: int
    format: str
    nbytes: int
    entry_id: str
    url: str
