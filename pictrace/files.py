"""Reading an image file from disk (a gallery entry, a CLI or eval query) with the same byte cap as downloads."""

from __future__ import annotations

from pathlib import Path

from pictrace.decode import ALLOWED_FORMATS, sniff
from pictrace.errors import FetchError, NotAnImageFileError, TooLargeError

# enough for every allowed format's signature (an ISO media box's brand is at bytes 8..12)
_HEAD_BYTES = 64


def read_local_file(path: Path, max_bytes: int) -> bytes:
    """The file's bytes; TooLargeError above ``max_bytes``, FetchError when it cannot be read."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise TooLargeError(f"{path.name} is {size} bytes; the limit is {max_bytes}")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise FetchError(f"file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise FetchError(f"not a file: {path}") from exc
    except PermissionError as exc:
        raise FetchError(f"cannot read {path}: permission denied") from exc


def read_folder_image(path: Path, root: Path, max_bytes: int) -> bytes:
    """A folder gallery's file: refused unless it still lies inside ``root`` (a symlink may have been
    re-pointed since the scan), and looked at by its first bytes before the rest is read, so a video or a
    document is left out (:class:`NotAnImageFileError`) without reading it whole or calling it a failure."""
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError as exc:
        raise FetchError(f"file not found: {path}") from exc
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise FetchError(f"cannot resolve {path}: {exc}") from exc
    if not real.is_relative_to(root):
        raise FetchError(f"{path} leads outside the folder {root}: refused")
    if not real.is_file():  # a FIFO or a device would block or never end
        raise FetchError(f"{path} is not a regular file")
    try:
        with path.open("rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except FileNotFoundError as exc:
        raise FetchError(f"file not found: {path}") from exc
    except (IsADirectoryError, PermissionError) as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror}") from exc
    if sniff(head) not in ALLOWED_FORMATS:
        raise NotAnImageFileError(f"{path.name} is not an image in an accepted format")
    return read_local_file(path, max_bytes)
