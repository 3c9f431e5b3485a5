"""Fitted constants: what the benchmarks measured, as typed, frozen objects (not environment variables).

An operator turns ``Settings`` (pictrace/config.py). These numbers are different: each was chosen from a
measurement on the shared evaluation data or a benchmark, named next to it, and changing one changes what
PicTrace answers. For experiments the whole set can be replaced from one JSON file (``Tuning.from_file``; the
CLI's ``--tuning FILE``; ``bench/`` writes such files), where each group may be given in part:
``{"cascade": {"candidates": 20}, "fusion": {"orb": 0.7}}``.

Docs: docs/quality.md (ranking levers, cascade sizes, fusion weights), docs/verdicts.md (verdict thresholds),
docs/scaling.md (vector and local-feature index structure).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pictrace.errors import ConfigurationError

MiB = 1024 * 1024

# Local-feature ids pack (image, keypoint) into one int64 with this many bits for the keypoint, so an image
# can keep at most 2**KEYPOINT_BITS keypoints. Lives here because it bounds ``OrbExtraction.features``.
KEYPOINT_BITS = 14


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OrbExtraction(_Frozen):
    """What the stored ORB features are: recorded in the catalogue and checked at start (a change needs the
    features extracted again). 1,000 keypoints at 480-640 px: docs/quality.md, "Centre prior and match graph"
    (more keypoints cost ingest and disk for no mAP; small queries upscaled to 480 px found their crops)."""

    features: Annotated[int, Field(ge=50)] = 1000
    max_side: Annotated[int, Field(ge=128, le=4096)] = 640
    min_side: Annotated[int, Field(ge=0, le=4096)] = 480  # 0: never upscale

    @model_validator(mode="after")
    def _fits_the_ids(self) -> OrbExtraction:
        if self.features > 1 << KEYPOINT_BITS:
            raise ValueError(f"orb.features must be at most {1 << KEYPOINT_BITS} (KEYPOINT_BITS of a local id)")
        return self


class Storage(_Frozen):
    """How ingest encodes what the catalogue keeps per image: docs/scaling.md, "Sizing" (bench/storage_size.py,
    and `pictrace eval` on both sets for each choice). Every blob says what it is, so catalogues written with
    other values (older ones: JPEG 82 thumbnails, a PNG gray each) read alike and need no migration.

    The thumbnail is WebP at the lowest quality whose mean PSNR against the exact 256 px picture reaches the old
    JPEG 82's (38.7 dB; WebP 80: 39.7 dB, 75: 38.4 dB) on 200 real-content distractors, at 57% of its bytes.
    SSIM reads its gray from that thumbnail (``ssim_gray="thumbnail"``) instead of a 32 KB lossless PNG of its
    own: SSIM moved by 0.007 on average (p95 0.016) on the same images, in a fused score that weighs it 0.05."""

    thumbnail_format: Literal["jpeg", "webp"] = "webp"
    thumbnail_quality: Annotated[int, Field(ge=1, le=100)] = 80
    # libwebp's effort: 2 encodes in 1.5 ms instead of 3.2 (4, OpenCV's) at 4% more bytes and 39.3 dB instead
    # of 39.6 on 200 real-content distractors (docs/scaling.md, "Ingest speed")
    webp_method: Annotated[int, Field(ge=0, le=6)] = 2
    ssim_gray: Literal["png", "thumbnail"] = "thumbnail"  # png: a lossless 256x256 gray of its own
    # the strongest keypoints stored per gallery image (a query keeps all of orb.features)
    gallery_features: Annotated[int, Field(ge=50, le=1 << KEYPOINT_BITS)] = 1000


class GeometricCheck(_Frozen):
    """ORB ratio matching and RANSAC between a query and one candidate: docs/quality.md, "Centre prior and
    match graph" (centre_sigma 0.2 took mAP 0.93 to 0.95; full_inliers 30 where copies saturate)."""

    verify_features: Annotated[int, Field(ge=8)] = 10000  # a candidate's strongest keypoints that are matched
    ratio: Annotated[float, Field(gt=0, lt=1)] = 0.75  # Lowe's ratio test
    ransac_px: Annotated[float, Field(gt=0)] = 5.0  # reprojection threshold
    min_inliers: Annotated[int, Field(ge=4)] = 8  # fewer: no geometric match
    full_inliers: Annotated[int, Field(ge=5)] = 30  # centre-weighted inliers at which the ORB score is 1.0
    centre_sigma: Annotated[float, Field(ge=0, le=10)] = 0.2  # centre prior, fraction of the longest side; 0: off


class LocalVotes(_Frozen):
    """The local-feature index (ORB descriptor votes): docs/scaling.md, "Local-feature index" (500 descriptors
    of 16 bytes per image, 10 neighbours within 24 bits: vote recall against memory at 10k-1M images)."""

    per_image: Annotated[int, Field(ge=16, le=1 << KEYPOINT_BITS)] = 500  # strongest descriptors kept per image
    code_bytes: Annotated[int, Field(ge=4, le=32)] = 16  # prefix of each 32-byte descriptor kept
    knn: Annotated[int, Field(ge=1, le=100)] = 10  # neighbours looked up per query descriptor
    max_distance: Annotated[int, Field(ge=0, le=256)] = 24  # Hamming distance beyond which a neighbour is no vote
    nprobe: Annotated[int, Field(ge=1)] = 16  # inverted lists visited per query descriptor
    # Codes a query descriptor scans at most, nearest list first, in ``nprobe`` average lists' worth (None: every
    # probed list whole). k-majority lists are uneven (at 100k real images a probe's list holds 1.8x the average),
    # and the crowded ones hold the commonest, least telling descriptors: docs/scaling.md, "The scan budget".
    scan_budget: Annotated[float, Field(gt=0)] | None = 1.0
    flat_below: Annotated[int, Field(ge=0)] = 50_000  # descriptors below which the exact scan is fast enough
    train_max: Annotated[int, Field(ge=1024)] = 262_144  # most descriptors the lists are learned from
    max_lists: Annotated[int, Field(ge=64)] = 65_536  # most inverted lists
    train_iterations: Annotated[int, Field(ge=0, le=100)] = 10  # k-means rounds
    # Lists per top cell of the two-level list assignment; None scans every list's centre (exact, the
    # default: 0.81 of the vote pairs at 100k against 0.58 with 1,024, for a build ~3.5x slower).
    cell_lists: Annotated[int, Field(ge=64)] | None = None
    top_probe: Annotated[int, Field(ge=1)] = 8  # top cells searched for a descriptor's nearest lists
    # Lists per top cell of the cells a query searches for its nearest lists when the codes were filed by the
    # exact assignment (None: every query descriptor compared with every list centre): docs/scaling.md, "Query
    # cells" (at 100k, 23 cells: 0.974 of the vote pairs for a lookup 20 % shorter).
    query_cell_lists: Annotated[int, Field(ge=2)] | None = 1024
    persist: bool = True  # keep the index in the data dir between starts (False: rebuilt at every start)
    # the gallery's growth since the lists were learned at which they are learned again (LocalIndex.needs_training)
    relearn_growth: Annotated[float, Field(gt=1)] = 4.0


class Cascade(_Frozen):
    """How many candidates each stage passes on: docs/quality.md, "Screening", "Less work on the shortlist"
    (each size the smallest that kept smvs-dvd-a's mAP and R@1), and docs/scaling.md, "Real content at scale"
    (``candidates`` and ``ssim_shortlist``: among 10k real-content distractors an edited copy too small or too
    compressed for keypoints falls to rank 5-12 of the embedding's list, where only SSIM tells it apart)."""

    candidates: Annotated[int, Field(ge=1, le=1000)] = 30  # nearest embedding vectors considered
    local_candidates: Annotated[int, Field(ge=0, le=1000)] = 40  # most-voted images screened (0: no votes)
    local_min_votes: Annotated[int, Field(ge=1)] = 3  # fewer votes make no candidate
    prescreen_min_inliers: Annotated[int, Field(ge=0, le=1000)] = 7  # votes' own agreeing pairs for a full check
    verify_embedding_top: Annotated[int, Field(ge=0, le=1000)] = 2  # nearest vectors fully checked regardless
    verify_voted_top: Annotated[int, Field(ge=0, le=1000)] = 2  # most-voted images fully checked regardless
    ssim_shortlist: Annotated[int, Field(ge=0, le=1000)] = 30  # best candidates that also get SSIM (all nearest)
    expand_from: Annotated[int, Field(ge=0, le=50)] = 3  # best results whose graph neighbours join (0: off)
    expand_min_score: Annotated[float, Field(ge=0, le=1)] = 0.2  # a result's score before it is expanded
    expand_weight: Annotated[float, Field(ge=0, le=1)] = 0.5  # a neighbour's share of its result's score
    graph_candidates: Annotated[int, Field(ge=0, le=1000)] = 10  # most-voted images linked at ingest (0: no graph)
    mirror_check: bool = True  # match a mirrored query against the shortlist (ORB is not mirror-invariant)
    mirror_min_embedding: Annotated[float, Field(ge=0, le=1)] = 0.7  # cosine a candidate needs for it
    embed_alongside: bool = True  # embed on a second thread while the local-feature half runs


class InnerPicture(_Frozen):
    """The picture inside a query (pictrace/features/inner.py), searched by its own embedding as well: docs/
    quality.md, "The picture inside a query" (screenshots among 10k distractors)."""

    enabled: bool = True
    side: Annotated[int, Field(ge=64)] = 512  # the query is looked at this large (longest side)
    canny_low: Annotated[int, Field(ge=0, le=1000)] = 40
    canny_high: Annotated[int, Field(ge=0, le=1000)] = 120
    min_share: Annotated[float, Field(gt=0, le=1)] = 0.05  # of the query's area: a smaller box is a detail
    max_share: Annotated[float, Field(gt=0, le=1)] = 0.8  # a larger one is the query itself, give or take a border
    min_side: Annotated[int, Field(ge=8)] = 40  # pixels of the query, as ORB's smallest image
    fill: Annotated[float, Field(gt=0, le=1)] = 0.9  # the outline's area over its box's: closed and straight
    min_contrast: Annotated[float, Field(ge=0)] = 20.0  # grey levels (standard deviation) inside: not a flat box


class Fusion(_Frozen):
    """Weights of the three scores in the fused one: docs/quality.md, "Chosen defaults and why" (fitted on
    smvs-dvd-a with ``eval --details``, checked on copy-public)."""

    embedding: Annotated[float, Field(ge=0)] = 0.15
    ssim: Annotated[float, Field(ge=0)] = 0.05
    orb: Annotated[float, Field(ge=0)] = 0.8
    min_score: Annotated[float, Field(ge=0, le=1)] = 0.0  # candidates below it are not shown

    @model_validator(mode="after")
    def _not_all_zero(self) -> Fusion:
        if self.embedding + self.ssim + self.orb <= 0:
            raise ValueError("at least one of the fusion weights must be positive")
        return self


class Verdicts(_Frozen):
    """Exact / copy / similar thresholds: docs/verdicts.md, "The measurement" (bench/thresholds.py)."""

    copy_min_inliers: Annotated[int, Field(ge=4)] = 25  # distinct inliers from which a fit is a copy
    copy_min_embedding: Annotated[float, Field(ge=0, le=1)] = 0.3  # guards against geometric accidents
    copy_max_perspective: Annotated[float, Field(ge=0)] = 0.15  # above: another shot of the print, similar
    similar_min_embedding: Annotated[float, Field(ge=0, le=1)] = 0.8  # cosine from which a non-copy is similar
    # Whole-frame copies without a keypoint fit (pictrace/matching/frame.py; docs/duplicates.md, "The frame
    # check"): same aspect ratio within frame_aspect (log ratio) and grey gradients correlated at least
    # copy_min_frame at the smaller image's size (at most frame_side px). On copy-public's top-64 embedding
    # neighbours, different photos of one product reached at most 0.933 where one was under 128 px (0.922 for
    # any), shrunk copies 0.95-0.99.
    copy_min_frame: Annotated[float, Field(ge=0, le=1)] = 0.95
    frame_aspect: Annotated[float, Field(ge=0)] = 0.03
    frame_side: Annotated[int, Field(ge=16, le=256)] = 128


class Duplicates(_Frozen):
    """How copy links make duplicate groups: docs/duplicates.md (bench/duplicates_quality.py on copy-public:
    look-alike clothing shots share weak near-identity fits; letting such a link only bring in an image with no
    stronger link kept every look-alike out)."""

    join_min_inliers: Annotated[int, Field(ge=0)] = 40  # a weaker link only brings in an image with no stronger
    # A member is a copy of its group's anchor when this share of one frame lies inside the other by their
    # composed homography (pictrace/grouping.py). copy-public (bench/duplicates_quality.py, pair precision /
    # recall): 0.6 0.990/0.852, 0.7 0.990/0.848, 0.8 0.990/0.813, 0.9 0.989/0.778 (screenshots that cut the
    # picture fall out first); 10k real-content largest group (before the pixel check below): 47-49 for all.
    containment: Annotated[float, Field(gt=0.5, le=1)] = 0.7
    # links composed from a member to its anchor: 1 joins only what matched the anchor itself (copy-public
    # recall 0.69), 2 also through a member inside the anchor (0.81); with no bound, maps composed through
    # collages chained 8,651 of 10k real-content images into one group again
    max_hops: Annotated[int, Field(ge=1, le=4)] = 2
    # ... and a member reached through another must show, by its thumbnail, the anchor's picture where the
    # composed map puts it in this share of its textured cells (a map fitted on one tile of a collage, extended
    # over the rest, does not): 10k real-content largest group 49 -> 21, copy-public recall 0.848 -> 0.840
    hop_agreement: Annotated[float, Field(ge=0, le=1)] = 0.6
    refresh_s: Annotated[float, Field(gt=0, le=60)] = 1.0  # how often the groups follow the catalogue
    save_every_s: Annotated[float, Field(gt=0)] = 30.0  # the partition is stored at most this often (and at close)
    list_members: Annotated[int, Field(ge=1, le=100)] = 6  # members each group of a list page shows
    # At ingest each image is also matched with its nearest vectors (small copies get few votes: 0.83 -> 0.84
    # pair recall), and those at least mirror_min_embedding close against its mirror too: mirrored copies
    # measured cosine 0.94-0.98 there, look-alike shots 0.8-0.9 (each a wasted mirror check, ~5 ms).
    nearest_candidates: Annotated[int, Field(ge=0, le=100)] = 3
    # ... and, where one of the two is at most verdicts.frame_side px, the nearest frame_candidates of the same
    # aspect ratio get the frame check when no keypoint fit made them a copy (~0.4 ms each): a copy shrunk to
    # 45-104 px found its original 1st-268th by cosine (median 17th); 16 candidates grouped 18/27, 32 21/27
    # (relinking one ingest of copy-public; the bench: 20/27 against 16 without the check).
    frame_candidates: Annotated[int, Field(ge=0, le=100)] = 32
    mirror_min_embedding: Annotated[float, Field(ge=0, le=1)] = 0.9


class VectorIndexTuning(_Frozen):
    """FAISS structure by gallery size: docs/scaling.md, "Vector index" (exact below 20k; HNSW+SQ8 from 100k
    at a quarter of the memory and recall 0.99)."""

    approx_from: Annotated[int, Field(ge=1)] = 20_000  # auto: images from which HNSW replaces exact search
    sq8_from: Annotated[int, Field(ge=1)] = 100_000  # auto: images from which HNSW stores 8-bit vectors
    ef_search: Annotated[int, Field(ge=8, le=4096)] = 128  # HNSW candidates explored per query
    # a Milvus request (search, add, remove) taking longer fails as unavailable (503) instead of holding a worker
    milvus_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0


class Ingest(_Frozen):
    """Ingest batching: bench/embed_speed.py (batch 16 is where onnxruntime's images/s levels off here)."""

    embed_batch: Annotated[int, Field(ge=1, le=256)] = 16
    # batches whose decoding, features and embedding may run ahead of the one being committed and linked
    # (pictrace/ingest_schedule.py): enough that a core never waits for the next batch's images
    batches_in_flight: Annotated[int, Field(ge=1, le=16)] = 3
    # how long a part-filled batch waits for its next fetched image before it goes as it is: well above a local
    # file's read (so a folder or a fast host still makes the same full batches), well below a slow host's wait
    batch_wait_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    # how often a long ingest saves the derived indexes, so that a run killed outright leaves a start at most this
    # much index work to redo from the catalogue (docs/scaling.md, "Checkpoints": a save at ~100k images writes
    # ~1.2 GB in seconds, under 1 % of this)
    checkpoint_s: Annotated[float, Field(ge=0)] = 600.0
    # files one POST /api/images may carry (their bytes together are capped by the operator's max_upload_bytes)
    max_files_per_request: Annotated[int, Field(ge=1, le=1000)] = 100


class Fetching(_Frozen):
    """Download constants no operator has needed to turn (the limits that matter are Settings)."""

    max_redirects: Annotated[int, Field(ge=0, le=10)] = 3
    user_agent: str = "PicTrace/1.0 (+reverse image search)"
    # users' downloads that may wait for one host's slots; beyond, 503: a slow host delays its own queue only
    host_queue: Annotated[int, Field(ge=0)] = 8
    # the share of the download pool the gallery ingest may hold, so users' URL searches always find a slot
    gallery_share: Annotated[float, Field(gt=0, le=1)] = 0.75


class Decoding(_Frozen):
    """What decoding may cost (pictrace/decode.py, pictrace/pixels.py; bench/load.py --flood measures it).

    Every feature works on at most 640 px (ORB; the embedding takes 260, SSIM and the thumbnail 256), so an image
    twice ``draft_min_side`` or more is decoded (JPEG) or kept (others) at a reduced size that keeps
    ``draft_min_side`` (2x ORB's, so its resize still averages pixels). ``budget_pixels`` bounds the pixels
    decoded at once across requests: one image at the 50 MP cap plus small ones beside it; a request over the
    budget waits, without holding a worker (docs/security.md, "Load": peak RSS 1,376 -> 672 MiB under a flood)."""

    draft_min_side: Annotated[int, Field(ge=0)] = 1280  # 0: always decode at full size
    budget_pixels: Annotated[int, Field(ge=1_000_000)] = 64_000_000


class Serving(_Frozen):
    """How long and how much a client may take to send a request (pictrace/web/serving.py). Sound defaults for a
    service reached directly; behind a reverse proxy (docs/security.md) the proxy's own limits come first."""

    # open connections and requests beyond which new requests get 503 at once (uvicorn's limit_concurrency); a
    # reverse proxy in front keeps its own number of connections to PicTrace below this
    max_connections: Annotated[int, Field(ge=1)] = 256
    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0  # a request's headers, whole
    max_header_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024  # request line and headers (nginx's default)
    body_timeout_s: Annotated[float, Field(gt=0)] = 120.0  # a whole body: 20 MiB at ~1.4 Mbit/s
    body_idle_s: Annotated[float, Field(gt=0)] = 15.0  # longest pause between two parts of a body
    keep_alive_s: Annotated[int, Field(ge=1)] = 5  # an idle kept-alive connection is closed after this
    backlog: Annotated[int, Field(ge=16)] = 1024  # connections the kernel queues before accept


class Evidence(_Frozen):
    """Bounds of the in-memory query store behind the evidence pictures (its lifetime is the operator's
    ``explain_ttl_s``): 64 queries of up to 1 MiB each cover a few minutes of a busy page."""

    max_entries: Annotated[int, Field(ge=1)] = 64
    max_bytes: Annotated[int, Field(ge=MiB)] = 64 * MiB


class FolderWatch(_Frozen):
    """Watching a folder gallery: changes are gathered until the folder has been quiet for ``quiet_ms`` and no
    changed file was modified more recently than that (a copy in progress is indexed once, complete), but for at
    most ``max_wait_ms``, so a folder that never stops changing is still kept in step."""

    quiet_ms: Annotated[int, Field(ge=10)] = 1500
    max_wait_ms: Annotated[int, Field(ge=100)] = 60_000


class Tuning(_Frozen):
    """Every fitted constant, in groups. ``Tuning()`` is what PicTrace ships."""

    orb: OrbExtraction = OrbExtraction()
    storage: Storage = Storage()
    check: GeometricCheck = GeometricCheck()
    local: LocalVotes = LocalVotes()
    inner: InnerPicture = InnerPicture()
    cascade: Cascade = Cascade()
    fusion: Fusion = Fusion()
    verdicts: Verdicts = Verdicts()
    duplicates: Duplicates = Duplicates()
    vectors: VectorIndexTuning = VectorIndexTuning()
    ingest: Ingest = Ingest()
    fetching: Fetching = Fetching()
    decoding: Decoding = Decoding()
    serving: Serving = Serving()
    evidence: Evidence = Evidence()
    watch: FolderWatch = FolderWatch()

    @classmethod
    def from_file(cls, path: Path) -> Tuning:
        """The shipped constants with the groups' fields that the JSON file names replaced."""
        try:
            data: Any = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the tuning file {path}: {exc}") from exc
        return cls.from_overrides(data, source=str(path))

    @classmethod
    def from_overrides(cls, data: Any, source: str = "overrides") -> Tuning:
        if not isinstance(data, dict):
            raise ConfigurationError(f"{source}: a tuning override is a JSON object of groups")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigurationError(f"{source}: {exc}") from exc

    def replace(self, **groups: dict[str, Any]) -> Tuning:
        """A copy with some fields of some groups replaced (tests, bench): ``replace(cascade={"candidates": 5})``."""
        merged = self.model_dump()
        for group, fields in groups.items():
            if group not in merged:
                raise ConfigurationError(f"no tuning group {group!r}")
            merged[group] = {**merged[group], **fields}
        return Tuning.from_overrides(merged)

    def to_file(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(), indent=2) + "\n")
