"""Typed domain errors.

Domain code raises these and never turns a failure into ``None``. ``pictrace.web.errors`` is the one place
that maps them to HTTP statuses, so the classes carry no status codes themselves.
"""

from __future__ import annotations


class PicTraceError(Exception):
    """Base class: every error PicTrace raises on purpose."""


class InvalidInputError(PicTraceError):
    """The caller's request is malformed (bad top_k, no image given, bad db.json entry...)."""


class GalleryError(InvalidInputError):
    """db.json cannot be read at all (not JSON, not a list)."""


class UnsafeURLError(InvalidInputError):
    """A URL is refused before anything is fetched: bad scheme, credentials, or a forbidden address."""


class TooLargeError(PicTraceError):
    """A body or an image exceeds a configured limit (bytes or pixels)."""


class UnsupportedFormatError(PicTraceError):
    """The bytes are not an image in one of the allowed formats."""


class NotAnImageFileError(UnsupportedFormatError):
    """A file of a folder gallery is not an image in an allowed format (a video, a text file): left out, not
    reported as a failure."""


class DecodeError(PicTraceError):
    """The bytes claim an allowed image format but cannot be decoded (truncated, corrupt)."""


class FetchError(PicTraceError):
    """A remote image could not be downloaded (connection error, timeout, HTTP error status)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class NotFoundError(PicTraceError):
    """A requested image, query or resource does not exist."""


class OverloadedError(PicTraceError):
    """The CPU work queue is full; the client should retry later."""

    def __init__(self, message: str = "server is busy, retry later", *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(PicTraceError):
    """The service cannot answer yet (model or index still loading)."""


class GroupsNotReadyError(NotReadyError):
    """The duplicate groups are still being computed (after a start, in the background): retry shortly."""

    def __init__(
        self, message: str = "the duplicate groups are being computed, retry shortly", *, retry_after_s: int = 2
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelWeightsError(NotReadyError):
    """A backbone cannot be built: its weights file (or its library) is missing or does not fit.

    Raised at start so the service refuses to run, rather than embed with random weights.
    """


class AuthError(PicTraceError):
    """A write was attempted without the right bearer token (or with writes disabled)."""


class WritesDisabledError(AuthError):
    """A write was attempted on a service that has no ``PICTRACE_API_TOKEN`` configured (writes are off)."""


class IndexMismatchError(PicTraceError):
    """A persisted index was built by another backbone/dimension and must not be mixed with this one."""


class VectorStoreUnavailableError(NotReadyError):
    """The shared vector store (a Milvus server) is down, failing or slower than its timeout: retry later."""


class IndexCorruptError(PicTraceError):
    """A persisted vector index file cannot be read back."""


class CatalogueCorruptError(PicTraceError):
    """The catalogue cannot be read: the one message names the file and the commands that check or restore it."""

    def __init__(self, location: str, reason: object) -> None:
        super().__init__(
            f"the catalogue {location} cannot be read ({reason}); see what is wrong with `python -m pictrace "
            "check`, then restore a backup made by `python -m pictrace backup DEST` (copy it back over the file)"
        )


class EvalError(InvalidInputError):
    """An evaluation's ground-truth file or gallery is unusable (wrong format, images that fail)."""


class ConfigurationError(PicTraceError):
    """A tuning file or override that cannot be used (unreadable, unknown field, out of range)."""


class FeatureMismatchError(PicTraceError):
    """The catalogue's stored features were extracted with other parameters than this service's; mixing the two
    would compare descriptors that mean different things."""
