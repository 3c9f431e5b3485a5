"""The evidence picture behind a match, and the short-lived memory of queries it needs.

``GET /api/explain/{query_id}/{sha256}`` answers a PNG: the query and the gallery image side by side with the
ORB matches that agree on the fitted homography drawn between them, and a third panel with the SSIM
difference map after warping the gallery image into the query's frame, so an added caption, watermark or
border stands out.

Drawing it needs the query after the answer was sent. Query images are otherwise never kept (docs/security.md), so this
is a deliberate, bounded exception: :class:`QueryMemory` holds the encoded query bytes *in memory only*, never
on disk, for ``PICTRACE_EXPLAIN_TTL_S`` seconds (0 keeps none and turns evidence off), at most
``PICTRACE_EXPLAIN_MAX_ENTRIES`` queries and ``PICTRACE_EXPLAIN_MAX_BYTES`` bytes, oldest dropped first, behind
an unguessable id.

The gallery side costs no extra disk per image: it is drawn on the original file when the gallery entry is a
local path, else on the stored 256-px thumbnail, with the stored ORB keypoints scaled onto it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
from skimage.metrics import structural_similarity

from pictrace.config import Settings
from pictrace.decode import decode_image
from pictrace.duplicates import DuplicateGroups
from pictrace.errors import NotFoundError, PicTraceError
from pictrace.features.extract import orb_of
from pictrace.features.orb import OrbFeatures, ratio_matches
from pictrace.files import read_local_file
from pictrace.matching.transform import read_transform
from pictrace.schemas import ComponentScores, Match, SearchResult, thumbnail_url
from pictrace.search.present import transform_info
from pictrace.store import Catalogue
from pictrace.tuning import Evidence, Tuning

PANEL_HEIGHT = 320
GAP = 8
CAPTION = 26
MAX_LINES = 60  # more lines hide the pictures; the footer gives the full count
_INLIER = (46, 204, 113)  # RGB: the canvas is converted to BGR only when encoded
_POINT = (255, 196, 0)


# ------------------------------------------------------------------------------------- query memory


@dataclass(frozen=True)
class KeptQuery:
    data: bytes
    result: SearchResult
    expires: float


class QueryMemory:
    """Bounded in-memory TTL store of recent queries (bytes + answer), keyed by a random id."""

    def __init__(self, ttl_s: float, max_entries: int, max_bytes: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, KeptQuery] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, bounds: Evidence) -> QueryMemory:
        return cls(settings.explain_ttl_s, bounds.max_entries, bounds.max_bytes)

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def keep(self, data: bytes, result: SearchResult) -> str | None:
        """Remember a query; returns its id, or None when disabled or the image alone is over the byte cap."""
        if not self.enabled or len(data) > self.max_bytes:
            return None
        key = secrets.token_urlsafe(18)
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            while self._items and (len(self._items) >= self.max_entries or self._bytes + len(data) > self.max_bytes):
                self._drop(next(iter(self._items)))
            self._items[key] = KeptQuery(data, result, now + self.ttl_s)
            self._bytes += len(data)
        return key

    def get(self, key: str) -> KeptQuery:
        with self._lock:
            self._expire(time.monotonic())
            kept = self._items.get(key)
        if kept is None:
            raise NotFoundError(
                "this query is no longer kept (queries are held in memory for a few minutes only): search again"
            )
        return kept

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def _expire(self, now: float) -> None:
        for key in [k for k, v in self._items.items() if v.expires <= now]:
            self._drop(key)

    def _drop(self, key: str) -> None:
        kept = self._items.pop(key)
        self._bytes -= len(kept.data)


def with_evidence(result: SearchResult, query_id: str | None) -> SearchResult:
    """The answer with its query id and an evidence link on every match (unchanged when nothing is kept)."""
    if query_id is None:
        return result
    results = [m.model_copy(update={"evidence_url": f"/api/explain/{query_id}/{m.sha256}"}) for m in result.results]
    query = result.query.model_copy(update={"id": query_id})
    return result.model_copy(update={"query": query, "results": results})


# ------------------------------------------------------------------------------------- the picture


def gallery_picture(catalogue: Catalogue, sha256: str, settings: Settings, draft_min_side: int = 0) -> np.ndarray:
    """The best gallery pixels available without storing more: the local original, else the thumbnail."""
    try:
        path = catalogue.local_path(sha256)
    except NotFoundError:
        path = None
    if path is not None:
        try:
            data = read_local_file(path, settings.max_download_bytes)
            return decode_image(data, max_pixels=settings.max_pixels, draft_min_side=draft_min_side).rgb
        except PicTraceError:
            pass  # the file changed or went away since it was indexed: the stored thumbnail still shows it
    thumb = cv2.imdecode(np.frombuffer(catalogue.thumbnail(sha256), np.uint8), cv2.IMREAD_COLOR)
    if thumb is None:
        raise NotFoundError(f"no picture of image {sha256} can be read")
    return cv2.cvtColor(thumb, cv2.COLOR_BGR2RGB)


def explain_match(
    catalogue: Catalogue, kept: KeptQuery, sha256: str, settings: Settings, tuning: Tuning
) -> bytes:
    """PNG evidence for one match of a kept query. Runs on the WorkPool (decode, ORB, warp, SSIM)."""
    match = next((m for m in kept.result.results if m.sha256 == sha256), None)
    if match is None:
        raise NotFoundError(f"image {sha256} is not among this query's results")
    draft = tuning.decoding.draft_min_side  # as the search decoded them, so the fitted map applies
    query = decode_image(kept.data, max_pixels=settings.max_pixels, draft_min_side=draft)
    gallery = gallery_picture(catalogue, sha256, settings, draft)
    orb_blob, width, height = catalogue.orb_by_sha256(sha256)
    return render_evidence(
        query.rgb, gallery, (width, height), OrbFeatures.from_bytes(orb_blob), match, tuning, query.scale
    )


def _fit_height(rgb: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    factor = height / rgb.shape[0]
    size = (max(1, round(rgb.shape[1] * factor)), height)
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(rgb), size, interpolation=interp), factor


def inlier_pairs(
    query_rgb: np.ndarray,
    gallery_orb: OrbFeatures,
    hom: np.ndarray,
    flip: bool,
    tuning: Tuning,
    query_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Matched points (query pixels, gallery pixels) that agree with the fitted homography ``hom``.

    The query's keypoints are extracted as the search extracted them (of the mirrored query for a flip), the
    gallery's are the stored ones; pairs pass the same ratio test and then the same reprojection tolerance.
    """
    source = np.ascontiguousarray(query_rgb[:, ::-1]) if flip else query_rgb
    q = orb_of(source, tuning, query_scale)
    empty = np.zeros((0, 2)), np.zeros((0, 2))
    if len(q) < 2 or len(gallery_orb) < 2:
        return empty
    qi, gi = ratio_matches(q.descriptors, gallery_orb.descriptors, tuning.check.ratio)  # the search's own
    if len(qi) == 0:
        return empty
    qpts = q.points[qi].astype(np.float64)
    if flip:
        qpts[:, 0] = (q.width - 1) - qpts[:, 0]
    qpts /= q.scale
    gpts = gallery_orb.points[gi].astype(np.float64) / gallery_orb.scale
    proj = np.hstack([qpts, np.ones((len(qpts), 1))]) @ hom.T
    proj = proj[:, :2] / proj[:, 2:3]
    tolerance = tuning.check.ransac_px / gallery_orb.scale
    keep = np.linalg.norm(proj - gpts, axis=1) <= tolerance
    return qpts[keep], gpts[keep]


def difference_map(query_rgb: np.ndarray, gallery_rgb: np.ndarray, to_gallery: np.ndarray) -> np.ndarray:
    """RGB heat map of 1 - SSIM after warping the gallery image into the query's frame (grey where no overlap).

    ``to_gallery`` maps query pixels to the *given* gallery picture's pixels.
    """
    h, w = query_rgb.shape[:2]
    warped = cv2.warpPerspective(gallery_rgb, np.linalg.inv(to_gallery), (w, h), flags=cv2.INTER_LINEAR)
    inside = cv2.warpPerspective(np.full(gallery_rgb.shape[:2], 255, np.uint8), np.linalg.inv(to_gallery), (w, h))
    qg = cv2.cvtColor(query_rgb, cv2.COLOR_RGB2GRAY)
    gg = cv2.cvtColor(warped, cv2.COLOR_RGB2GRAY)
    _, ssim_map = structural_similarity(qg, gg, data_range=255, full=True, win_size=7)  # type: ignore[no-untyped-call]
    diff = np.clip(1.0 - ssim_map, 0.0, 1.0)
    heat = cv2.applyColorMap((diff * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    blended: np.ndarray = (0.65 * heat + 0.35 * np.stack([qg] * 3, axis=-1)).astype(np.uint8)
    blended[inside < 128] = (90, 90, 90)
    return blended


def _caption(panel: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((CAPTION, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (40, 40, 40), 1, cv2.LINE_AA)
    return np.vstack([bar, panel])


def explain_pair(
    catalogue: Catalogue, groups: DuplicateGroups, sha_a: str, sha_b: str, settings: Settings, tuning: Tuning
) -> bytes:
    """PNG evidence that image a is a copy of image b (two members of one duplicate group), drawn from stored
    data alone: their pictures (local originals or thumbnails) and the homography the match graph stored."""
    a, b, hom = groups.pair_homography(sha_a, sha_b)
    draft = tuning.decoding.draft_min_side
    a_rgb = gallery_picture(catalogue, a.sha256, settings, draft)  # the original, else the thumbnail
    readout = read_transform(hom, (a.width, a.height), (b.width, b.height))
    match = Match(
        id=b.entry_id,
        url=b.url,
        original_url=f"/api/images/{b.sha256}/original",
        sha256=b.sha256,
        score=1.0,
        scores=ComponentScores(embedding=0.0, ssim=0.0, orb=0.0),
        verdict="exact" if a.pixel_sha256 == b.pixel_sha256 else "copy",
        transform=transform_info(readout),
        thumbnail_url=thumbnail_url(b.sha256),
    )
    orb_blob, width, height = catalogue.orb_by_sha256(b.sha256)
    b_rgb = gallery_picture(catalogue, b.sha256, settings, draft)
    a_scale = a_rgb.shape[1] / a.width  # a is drawn from a smaller picture: as a large query decoded smaller
    return render_evidence(
        a_rgb, b_rgb, (width, height), OrbFeatures.from_bytes(orb_blob), match, tuning, a_scale, a.entry_id
    )


def render_evidence(
    query_rgb: np.ndarray,
    gallery_rgb: np.ndarray,
    gallery_size: tuple[int, int],
    gallery_orb: OrbFeatures,
    match: Match,
    tuning: Tuning,
    query_scale: float = 1.0,
    query_caption: str = "query",
) -> bytes:
    """Query | gallery with inlier lines | SSIM difference map, as one PNG.

    ``gallery_size`` is the gallery image's original size; ``gallery_rgb`` may be smaller (the thumbnail).
    ``query_scale``: ``query_rgb``'s pixels per query picture pixel (a large query is decoded smaller).
    """
    q_img, q_factor = _fit_height(query_rgb, PANEL_HEIGHT)
    q_factor *= query_scale  # query picture pixels (the homography's) -> drawn pixels
    g_img, g_factor = _fit_height(gallery_rgb, PANEL_HEIGHT)
    g_factor *= gallery_rgb.shape[1] / gallery_size[0]  # gallery original pixels -> drawn pixels
    panels = [_caption(q_img, query_caption[:60]), _caption(g_img, f"{match.verdict}: {match.id}"[:60])]
    transform = match.transform
    count = 0
    if transform is not None:
        hom = np.array(transform.homography, dtype=np.float64)
        qpts, gpts = inlier_pairs(query_rgb, gallery_orb, hom, transform.flip, tuning, query_scale)
        count = len(qpts)
        drawn = np.diag([g_factor, g_factor, 1.0]) @ hom @ np.diag([1 / q_factor, 1 / q_factor, 1.0])
        panels.append(_caption(difference_map(q_img, g_img, drawn), "difference after alignment (1 - SSIM)"))
    canvas_w = sum(p.shape[1] for p in panels) + GAP * (len(panels) - 1)
    canvas = np.full((PANEL_HEIGHT + CAPTION, canvas_w, 3), 255, np.uint8)
    x = 0
    offsets = []
    for panel in panels:
        canvas[:, x : x + panel.shape[1]] = panel
        offsets.append(x)
        x += panel.shape[1] + GAP
    shown: list[int] = np.linspace(0, count - 1, min(count, MAX_LINES)).round().astype(int).tolist() if count else []
    if transform is not None and count:
        lines = canvas.copy()
        for i in shown:
            (qx, qy), (gx, gy) = qpts[i], gpts[i]
            a = (round(qx * q_factor), round(qy * q_factor) + CAPTION)
            b = (round(gx * g_factor) + offsets[1], round(gy * g_factor) + CAPTION)
            cv2.line(lines, a, b, _INLIER, 1, cv2.LINE_AA)
            cv2.circle(lines, a, 3, _POINT, 1, cv2.LINE_AA)
            cv2.circle(lines, b, 3, _POINT, 1, cv2.LINE_AA)
        canvas = cv2.addWeighted(lines, 0.75, canvas, 0.25, 0)
    footer = np.full((CAPTION, canvas_w, 3), 255, np.uint8)
    note = (
        f"{count} matched keypoints agree on one homography"
        + (f" ({len(shown)} drawn)" if count > len(shown) else "")
        if transform is not None
        else "no geometric agreement: similar by the embedding only"
    )
    cv2.putText(footer, note, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (40, 40, 40), 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.vstack([canvas, footer]), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding of the evidence picture failed")
    return png.tobytes()
