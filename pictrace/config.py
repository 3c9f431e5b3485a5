"""The operator's settings: environment variables ``PICTRACE_*`` (or a ``.env`` file), grouped as in the README.

What an operator turns: where it serves, which model, what it accepts, fetches and keeps, how much work it
takes on, and how it scales out. Every limit the service enforces is here, so one table (the README's) says
what PicTrace will accept. Constants fitted by the benchmarks are not settings: they live in
pictrace/tuning.py, next to the measurements that set them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
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
    db: Path = Field(
        Path("db.json"), description="Gallery: a file (JSON list of {url, id?, ...}) or a folder of images."
    )
    data_dir: Path = Field(Path("data"), description="Where the catalogue, index and thumbnails live.")
    index_on_start: bool = Field(True, description="Index the gallery file in the background at start.")
    watch: bool = Field(
        False, description="With a folder as PICTRACE_DB: keep the index in step as its files change."
    )

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

    # --- search and evidence -------------------------------------------------------------------------
    top_k: int = Field(5, ge=1, le=50, description="Results returned when the client does not say.")
    explain_ttl_s: int = Field(
        600, ge=0, description="Seconds a query image is kept in memory for /api/explain; 0 keeps none."
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
    fetch_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts or networks (CIDR) a user's URL may reach despite the SSRF guard, comma separated.",
    )
    max_metadata_bytes: int = Field(
        16 * 1024, ge=2, description="Largest metadata JSON accepted with an image added through the API."
    )

    # --- work and writes -----------------------------------------------------------------------------
    workers: int = Field(2, ge=1, description="Threads in the one bounded executor for CPU work.")
    queue_limit: int = Field(16, ge=1, description="CPU jobs waiting beyond which requests get 503.")
    api_token: str | None = Field(
        None, description="Bearer token for write endpoints; unset disables writes."
    )
    gallery_public_details: bool = Field(
        False, description="Show /gallery's source URLs and failure reasons to all; off: only with the API token."
    )
    keep_queries: bool = Field(
        False, description="Keep query images (named by SHA-256) under DATA_DIR/queries; off: never stored."
    )

    # --- scaling out: index structure, shared catalogue and vectors ---------------------------------
    index_mode: Literal["auto", "exact", "hnsw", "hnsw-sq8"] = Field(
        "auto", description="FAISS structure: exact, hnsw, hnsw-sq8, or auto (by gallery size)."
    )
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


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """``PICTRACE_*`` variables that name no setting: a typo, or a constant that became a tuning constant,
    which the service would otherwise ignore without a word."""
    known = {f"PICTRACE_{name.upper()}" for name in Settings.model_fields} | {"PICTRACE_TEST_TENSORFLOW"}
    return sorted(name for name in environ if name.startswith("PICTRACE_") and name not in known)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and .env), with explicit overrides winning (tests, CLI flags)."""
    return Settings(**overrides)  # type: ignore[arg-type]
