"""All settings in one place: environment variables ``PICTRACE_*`` (or a ``.env`` file).

Every limit the service enforces lives here, so an operator can read one table (the README's) and know what
PicTrace will accept, fetch and keep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PROJECT_ROOT / "models" / "efficientnet-lite2" / "model.onnx"

MiB = 1024 * 1024


class Settings(BaseSettings):
    """PicTrace configuration. Field names map to ``PICTRACE_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="PICTRACE_", env_file=".env", extra="ignore")

    # --- serving -------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the web server binds to.")
    port: int = Field(5000, ge=1, le=65535, description="Port the web server listens on.")
    db: Path = Field(Path("db.json"), description="Gallery file (JSON list of {url, id?, ...}).")
    data_dir: Path = Field(Path("data"), description="Where the catalogue, index and thumbnails live.")
    index_on_start: bool = Field(True, description="Index the gallery file in the background at start.")

    # --- model ---------------------------------------------------------------------------------------
    backbone: str = Field(
        "efficientnet-lite2",
        description="Embedding backbone: efficientnet-lite2 (bundled ONNX) or resnet50 (needs TensorFlow).",
    )
    model_path: Path = Field(DEFAULT_MODEL, description="ONNX model file for the default backbone.")
    resnet50_weights: Path | None = Field(
        None,
        description="ResNet50 weights file (.h5 or .weights.h5); unset: Keras' cache, else its download.",
    )
    embed_threads: int = Field(2, ge=1, description="Embedding threads (onnxruntime, or TensorFlow for resnet50).")
    embed_batch: int = Field(16, ge=1, le=256, description="Images per embedding batch at ingest.")
    embed_alongside: bool = Field(
        True,
        description="Embed a query on a thread of its own while its ORB features, votes and screen run "
        "(both cores on one query; false: one after the other).",
    )

    # --- search --------------------------------------------------------------------------------------
    top_k: int = Field(5, ge=1, le=50, description="Results returned when the client does not say.")
    candidates: int = Field(
        10, ge=1, le=1000, description="Nearest embedding vectors verified by ORB+RANSAC (with the local ones)."
    )
    local_candidates: int = Field(
        40, ge=0, le=1000, description="Images with most local-descriptor votes screened for ORB+RANSAC (0: off)."
    )
    local_min_votes: int = Field(3, ge=1, description="Fewer local-descriptor votes than this make no candidate.")
    local_per_image: int = Field(
        500, ge=16, le=10000, description="Strongest ORB descriptors per gallery image kept in the local index."
    )
    local_code_bytes: int = Field(
        16, ge=4, le=32, description="Bytes of each 32-byte ORB descriptor kept in the local index."
    )
    local_knn: int = Field(10, ge=1, le=100, description="Nearest gallery descriptors looked up per query one.")
    local_max_distance: int = Field(
        24, ge=0, le=256, description="Hamming distance (on the kept bytes) beyond which a neighbour casts no vote."
    )
    local_nprobe: int = Field(16, ge=1, description="Inverted lists searched per query descriptor.")
    local_train_max: int = Field(
        262_144, ge=1024, description="Most descriptors the local index's inverted lists are learned from."
    )
    local_max_lists: int = Field(65_536, ge=64, description="Most inverted lists in the local index.")
    local_train_iterations: int = Field(
        10, ge=0, le=100, description="k-means rounds that learn the local index's inverted lists."
    )
    local_cell_lists: int = Field(
        65536,
        ge=1,
        description="Inverted lists per top cell of the local index's two-level list assignment (65536: one cell, "
        "the exact scan; 1024: a build ~3.5x faster from ~100k images, at a cost in vote recall).",
    )
    local_top_probe: int = Field(
        8, ge=1, description="Top cells whose lists are candidates for a query descriptor's nearest lists."
    )
    local_persist: bool = Field(
        True, description="Keep the local index in the data dir between starts (False: rebuilt at every start)."
    )
    prescreen_min_inliers: int = Field(
        7, ge=0, le=1000, description="Agreeing keypoints a candidate's votes need for its ORB check (0: check all)."
    )
    verify_embedding_top: int = Field(
        2, ge=0, le=1000, description="Nearest embedding vectors that get the ORB check whatever their votes."
    )
    expand_from: int = Field(
        3, ge=0, le=50, description="Best verified results whose match-graph neighbours join the results (0: off)."
    )
    expand_min_score: float = Field(
        0.2, ge=0, le=1, description="A verified result must score this much before its neighbours are added."
    )
    expand_weight: float = Field(
        0.5, ge=0, le=1, description="A neighbour reached through a result scores this share of that result's score."
    )
    graph_candidates: int = Field(
        10, ge=0, le=1000, description="Most-voted images each new image is verified against at ingest (0: no graph)."
    )
    ssim_shortlist: int = Field(
        5, ge=0, le=1000, description="Best verified candidates that also get SSIM (the costliest signal)."
    )
    weight_embedding: float = Field(0.15, ge=0, description="Fusion weight of the embedding cosine.")
    weight_ssim: float = Field(0.05, ge=0, description="Fusion weight of SSIM (256x256 gray).")
    weight_orb: float = Field(0.8, ge=0, description="Fusion weight of ORB+RANSAC geometric agreement.")
    orb_features: int = Field(1000, ge=50, le=10000, description="ORB keypoints per image.")
    orb_max_side: int = Field(
        640, ge=128, le=4096, description="Longest side an image is resized to for ORB."
    )
    orb_min_side: int = Field(
        480, ge=0, le=4096, description="Smaller images are upscaled to this longest side for ORB (4x at most, 0: off)."
    )
    orb_verify_features: int = Field(
        10000, ge=8, le=10000, description="Strongest keypoints of a candidate matched at verification."
    )
    orb_ratio: float = Field(0.75, gt=0, lt=1, description="Lowe ratio test threshold for ORB matches.")
    orb_ransac_px: float = Field(5.0, gt=0, description="RANSAC reprojection threshold (pixels).")
    orb_min_inliers: int = Field(8, ge=4, description="Fewer inliers than this count as no geometric match.")
    orb_full_inliers: int = Field(
        30, ge=5, description="Centre-weighted inliers at which the ORB score (and a graph link) reaches 1.0."
    )
    orb_centre_sigma: float = Field(
        0.2, ge=0, le=10, description="Centre prior on query inliers, a fraction of the longest side (0: off)."
    )
    min_score: float = Field(0.0, ge=0, le=1, description="Matches scoring below this are not returned.")

    # --- verdicts and evidence (issue 7; thresholds measured by bench/thresholds.py, see docs/verdicts.md) ---
    copy_min_inliers: int = Field(
        25, ge=4, description="Distinct RANSAC inliers from which a geometric match counts as a copy."
    )
    copy_min_embedding: float = Field(
        0.3, ge=0, le=1, description="Embedding cosine a copy needs at least (guards against geometric accidents)."
    )
    copy_max_perspective: float = Field(
        0.15, ge=0, description="Largest perspective of a copy's homography; above it the match is 'similar'."
    )
    similar_min_embedding: float = Field(
        0.8, ge=0, le=1, description="Embedding cosine from which a non-copy is shown as similar."
    )
    mirror_check: bool = Field(
        True, description="Also match a mirrored query against the shortlist (ORB is not mirror-invariant)."
    )
    mirror_min_embedding: float = Field(
        0.7, ge=0, le=1, description="Embedding cosine a candidate needs for the mirror check (mirrored: >= 0.74)."
    )
    explain_ttl_s: int = Field(
        600, ge=0, description="Seconds a query image is kept in memory for /api/explain; 0 keeps none."
    )
    explain_max_entries: int = Field(64, ge=1, description="Query images kept in memory for /api/explain at most.")
    explain_max_bytes: int = Field(
        64 * MiB, ge=MiB, description="Memory the kept query images may take at most (oldest dropped first)."
    )

    # --- limits --------------------------------------------------------------------------------------
    max_upload_bytes: int = Field(20 * MiB, ge=1024, description="Largest accepted request body.")
    max_download_bytes: int = Field(20 * MiB, ge=1024, description="Largest image body fetched from a URL.")
    max_pixels: int = Field(50_000_000, ge=10_000, description="Largest image (width x height) decoded.")
    fetch_timeout_s: float = Field(20.0, gt=0, description="Total time allowed for one download.")
    fetch_connect_timeout_s: float = Field(5.0, gt=0, description="Time allowed to connect.")
    fetch_retries: int = Field(2, ge=0, le=10, description="Retries on 5xx/connection errors (gallery).")
    fetch_concurrency: int = Field(16, ge=1, description="Concurrent downloads in total.")
    fetch_per_host: int = Field(4, ge=1, description="Concurrent downloads per host (politeness).")
    fetch_max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed per download.")
    fetch_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts or networks (CIDR) a user's URL may reach despite the SSRF guard, comma separated.",
    )
    user_agent: str = Field("PicTrace/1.0 (+reverse image search)", description="User-Agent for downloads.")

    # --- work ----------------------------------------------------------------------------------------
    workers: int = Field(2, ge=1, description="Threads in the one bounded executor for CPU work.")
    queue_limit: int = Field(16, ge=1, description="CPU jobs waiting beyond which requests get 503.")
    api_token: str | None = Field(
        None, description="Bearer token for write endpoints; unset disables writes."
    )
    keep_queries: bool = Field(
        False, description="Keep query images (named by SHA-256) under DATA_DIR/queries; off: never stored."
    )
    max_metadata_bytes: int = Field(
        16 * 1024, ge=2, description="Largest metadata JSON accepted with an image added through the API."
    )

    # --- scale: index structure, shared catalogue and vectors ---------------------------------------
    index_mode: Literal["auto", "exact", "hnsw", "hnsw-sq8"] = Field(
        "auto", description="FAISS structure: exact, hnsw, hnsw-sq8, or auto (by gallery size)."
    )
    index_approx_from: int = Field(
        20_000, ge=1, description="auto: images from which FAISS switches from exact search to HNSW."
    )
    index_sq8_from: int = Field(
        100_000, ge=1, description="auto: images from which FAISS uses HNSW with 8-bit scalar quantisation."
    )
    index_ef_search: int = Field(128, ge=8, le=4096, description="HNSW candidates explored per query (efSearch).")
    database_url: str | None = Field(
        None, description="PostgreSQL catalogue (postgresql://user@host:port/db); unset: SQLite in the data dir."
    )
    milvus_uri: str | None = Field(
        None, description="Milvus vectors: a file path (Milvus Lite) or http://host:19530; unset: FAISS."
    )
    milvus_token: str | None = Field(None, description="Milvus token (user:password) for a server that asks.")
    sync_interval_s: float = Field(
        5.0, ge=0, description="How often a replica checks the catalogue for other writers' changes (0: never)."
    )

    @field_validator("fetch_allow", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _weights_not_all_zero(self) -> Settings:
        if self.weight_embedding + self.weight_ssim + self.weight_orb <= 0:
            raise ValueError("at least one of the fusion weights must be positive")
        return self

    @property
    def catalogue_path(self) -> Path:
        return self.data_dir / "catalogue.sqlite3"

    @property
    def index_path(self) -> Path:
        return self.data_dir / "vectors.faiss"

    @property
    def local_index_path(self) -> Path:
        return self.data_dir / "local.faiss"

    @property
    def queries_dir(self) -> Path:
        return self.data_dir / "queries"


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and .env), with explicit overrides winning (tests, CLI flags)."""
    return Settings(**overrides)  # type: ignore[arg-type]
