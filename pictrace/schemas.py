"""Pydantic models for what crosses a boundary: gallery entries in, search results and status out.

Input models (what a client or db.json sends) are kept apart from output models (what PicTrace answers).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def thumbnail_url(sha256: str) -> str:
    """Where an answer points a client for an image's stored thumbnail (served by pictrace/web/api.py)."""
    return f"/api/images/{sha256}/thumbnail"

# ---------------------------------------------------------------------------------------------- input


class GalleryEntry(BaseModel):
    """One db.json entry: where the image is, an optional id, and any other keys kept as metadata."""

    model_config = ConfigDict(frozen=True)

    url: str = Field(description="http(s) URL, or a path relative to the db.json file.")
    id: str | None = Field(None, description="Caller's identifier; defaults to the URL.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Every other key of the entry.")

    @property
    def key(self) -> str:
        """The identifier shown to users: the entry's id, else its URL."""
        return self.id if self.id is not None else self.url


class SearchRequest(BaseModel):
    """JSON body of ``POST /api/search`` when searching by URL."""

    url: str = Field(description="http(s) URL of the query image.", min_length=1, max_length=4096)
    top_k: int | None = Field(None, ge=1, le=50, description="How many matches to return (default 5).")


# --------------------------------------------------------------------------------------------- output


class ComponentScores(BaseModel):
    """The evidence behind a fused score, each in [0, 1]."""

    embedding: float = Field(description="Cosine similarity of the CNN embeddings (clipped to [0, 1]).")
    ssim: float = Field(
        description="SSIM of the 256x256 grayscale images (clipped to [0, 1]); 0 when not computed: only the "
        "best PICTRACE_SSIM_SHORTLIST candidates get it."
    )
    orb: float = Field(description="ORB matches that agree on one homography (RANSAC inliers), scaled.")
    orb_inliers: int = Field(0, description="Number of geometrically consistent ORB matches.")
    votes: int = Field(0, description="Query ORB descriptors whose nearest gallery descriptors include this image's.")


class TransformInfo(BaseModel):
    """What was done to a copy, read off the fitted homography (see pictrace/matching/transform.py)."""

    crop: tuple[int, int, int, int] = Field(
        description="Box (x0, y0, x1, y1) of the gallery image the query shows, in gallery pixels."
    )
    crop_fraction: float = Field(description="Area of the crop box over the gallery image's area.")
    query_box: tuple[int, int, int, int] = Field(
        description="Box (x0, y0, x1, y1) of the query that shows the gallery image, in query pixels."
    )
    scale: float = Field(description="Query pixels per gallery pixel (0.5: the copy is half the size).")
    rotation: float = Field(description="Degrees the copy is turned counter-clockwise, in (-180, 180].")
    flip: bool = Field(description="The copy is mirrored left-right (mirror first, then rotation).")
    perspective: float = Field(description="Departure from an affine map: 0 for edits, > 0 for another shot.")
    homography: list[list[float]] = Field(description="3x3 map from query pixels to gallery pixels.")


class Match(BaseModel):
    """One gallery image that matches the query."""

    id: str = Field(description="The gallery entry's id (or its URL when it has none).")
    url: str = Field(description="The gallery entry's url, as written in db.json.")
    original_url: str = Field(description="Where to view the original: its http(s) URL, or PicTrace's copy.")
    sha256: str = Field(description="SHA-256 of the gallery image's bytes.")
    score: float = Field(description="Fused score in [0, 1]; higher is more similar.")
    scores: ComponentScores
    exact: bool = Field(False, description="True when the query has the same bytes as this image.")
    verdict: Literal["exact", "copy", "similar"] = Field(
        "similar",
        description="exact: same bytes or pixels; copy: the same picture edited; similar: same thing, other shot.",
    )
    transform: TransformInfo | None = Field(None, description="For a geometric match: what was done to it.")
    via: str | None = Field(
        None,
        description="Found through this other result (id): it matches both the query and this image.",
    )
    evidence_url: str | None = Field(
        None, description="PNG with the matched keypoints and an SSIM difference map (while the query is kept)."
    )
    thumbnail_url: str = Field(description="Thumbnail served by PicTrace itself.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Other keys of the db.json entry.")


class QueryInfo(BaseModel):
    id: str | None = Field(
        None, description="Handle for /api/explain while the query is kept in memory (None when disabled)."
    )
    sha256: str
    width: int
    height: int
    inner_picture: list[int] | None = Field(
        None,
        description="[x, y, width, height] of a picture found inside the query (a screenshot's, or one framed by a "
        "border), in the query's pixels: it was searched by its own embedding as well.",
    )


class SearchResult(BaseModel):
    """Answer of ``POST /api/search``: the query's identity and its matches, best first."""

    query: QueryInfo
    results: list[Match]
    took_ms: float = Field(description="Time spent answering, in milliseconds.")


class ImageCounts(BaseModel):
    indexed: int = Field(description="Distinct images searchable now.")
    pending: int = Field(description="Gallery entries the background ingest still has to do.")
    failed: int = Field(description="Gallery entries that could not be indexed (see `pictrace index`).")


class Health(BaseModel):
    status: str = Field(description="'ok' once the model and index are loaded.")
    model: str = Field(description="Embedding backbone in use.")
    images: ImageCounts


class LegacySimilarImages(BaseModel):
    """The original PicTrace's answer format, kept for its clients."""

    similar_images: list[str]


class FailedEntry(BaseModel):
    position: int | None = Field(description="Index of the entry in db.json (None when not from db.json).")
    url: str
    reason: str


class IngestReport(BaseModel):
    """Summary of one ingest run."""

    added: int = 0
    duplicates: int = Field(0, description="New URLs whose bytes were already stored (stored once).")
    unchanged: int = 0
    removed: int = Field(0, description="Sources dropped because they left db.json (or the folder).")
    skipped: int = Field(0, description="Files of a folder gallery read and left out: not images.")
    deleted: int = Field(
        0, description="Entries kept out because their image was deleted through the API (not fetched)."
    )
    failed: list[FailedEntry] = Field(default_factory=list)
    invalid: list[FailedEntry] = Field(default_factory=list, description="db.json entries refused.")


# ------------------------------------------------------------------------------- writes through the API


class AddImageRequest(BaseModel):
    """JSON body of ``POST /api/images`` when adding by URL."""

    url: str = Field(description="http(s) URL of the image (fetched SSRF-guarded).", min_length=1, max_length=4096)
    id: str | None = Field(None, min_length=1, max_length=256, description="Your identifier (default: the URL).")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Returned with search results.")


class AddedImage(BaseModel):
    """Answer of ``POST /api/images`` (201 when the bytes were new, 200 when already stored)."""

    sha256: str
    id: str
    url: str = Field(description="The URL given, or 'upload:<sha256>' for an uploaded file.")
    added: bool = Field(description="False when the same bytes were already in the gallery (source linked).")
    width: int
    height: int
    thumbnail_url: str


class AddedItem(BaseModel):
    """One file of a ``POST /api/images`` with several files: what happened to it, as the one-file answer's
    status would say (201 added, 200 already stored, 4xx refused with the reason)."""

    filename: str | None = Field(None, description="The part's file name, as the client sent it.")
    status: int = Field(description="201 added, 200 already stored (source linked), or the refusal's 4xx/503.")
    outcome: Literal["added", "duplicate", "refused"]
    image: AddedImage | None = Field(None, description="The image, unless it was refused.")
    detail: str | None = Field(None, description="Why it was refused.")


class AddedImages(BaseModel):
    """Answer of ``POST /api/images`` with several files (always 200): one entry per file, in order."""

    results: list[AddedItem]


class DeletedImage(BaseModel):
    sha256: str
    deleted: bool = True


class Reindexed(BaseModel):
    vectors: int = Field(description="Vectors in the rebuilt index.")


class DuplicateEdit(BaseModel):
    """What was done to a group member relative to the keeper, read off the stored homographies."""

    crop: tuple[int, int, int, int] = Field(description="Box (x0, y0, x1, y1) of the keeper it shows, keeper pixels.")
    crop_fraction: float = Field(description="Area of that box over the keeper's area.")
    scale: float = Field(description="Its pixels per keeper pixel (0.5: half the size).")
    rotation: float = Field(description="Degrees turned counter-clockwise, in (-180, 180].")
    flip: bool = Field(description="Mirrored left-right.")
    border: bool = Field(description="Its frame holds more than the keeper's picture: a border or a page around it.")
    hops: int = Field(description="Links composed to reach the keeper (1: matched directly).")
    summary: str = Field(description="The read-out in words, e.g. 'crop 45% · rotated 90° · mirrored'.")


class DuplicateImage(BaseModel):
    id: str = Field(description="The gallery entry's id (or its URL).")
    sha256: str
    url: str
    width: int
    height: int
    format: str
    nbytes: int
    thumbnail_url: str


class DuplicateMember(DuplicateImage):
    role: Literal["keeper", "exact", "copy"] = Field(
        description="keeper; exact (the keeper's very pixels); copy (the same picture edited)."
    )
    edit: DuplicateEdit | None = Field(default=None, description="Relative to the keeper (copies only).")
    evidence_url: str | None = Field(default=None, description="Picture of this member against the keeper.")


class DuplicateGroupInfo(BaseModel):
    id: str = Field(description="Stable while the member with the smallest sha256 stays.")
    tier: Literal["exact", "copy"] = Field(description="exact: every member has the same pixels; else copy.")
    size: int = Field(description="Members in all.")
    keeper: str = Field(description="sha256 of the member to keep.")
    decided: bool = Field(description="The keeper was chosen by a person ('keep this one').")
    member_offset: int = Field(0, description="Where ``members`` starts among all (the keeper is the first).")
    members: list[DuplicateMember] = Field(
        description="A page of the members, the keeper first: a list page shows the first few, "
        "GET /api/duplicates/{group_id} takes offset and limit."
    )
    similar: list[DuplicateImage] = Field(description="Linked to a member as similar: shown beside, never merged.")


class DuplicatePage(BaseModel):
    total: int = Field(description="Groups matching the filter.")
    offset: int
    limit: int
    groups: list[DuplicateGroupInfo]


class NotDuplicatesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256_a: str = Field(min_length=64, max_length=64)
    sha256_b: str = Field(min_length=64, max_length=64)


class KeepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(min_length=64, max_length=64, description="The member to keep.")
    delete_others: bool = Field(default=False, description="Also remove the group's other members.")


class Decided(BaseModel):
    group: DuplicateGroupInfo | None = Field(description="The group after the decision (None: it is gone).")
    deleted: list[str] = Field(default_factory=list, description="sha256 of the images removed.")
