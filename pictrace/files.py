"""Reading an image file from disk (a gallery entry, a CLI or eval query) with the same byte cap as downloads."""

from __future__ import annotations

from pathlib import Path

from pictrace.errors import FetchError, TooLargeError


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
