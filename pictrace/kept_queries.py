"""Keeping query images, only when an operator turns it on (``PICTRACE_KEEP_QUERIES``; off by default).

Queries are strangers' pictures: by default they live in memory for the length of the request and are never
written anywhere. When kept (to debug or evaluate), the file name is made here from the SHA-256 of the bytes and
the format the decoder found: nothing the client sent (file name, content type) reaches the file system.
"""

from __future__ import annotations

import os
from pathlib import Path

from pictrace.config import Settings
from pictrace.decode import probe_image

EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def keep_query(settings: Settings, data: bytes, sha256: str) -> Path:
    """Write an already-searched query under ``queries_dir`` as ``<sha256>.<ext>`` (atomically, once)."""
    fmt, _, _ = probe_image(data, max_pixels=settings.max_pixels)
    directory = settings.queries_dir
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{sha256}.{EXTENSIONS.get(fmt, 'img')}"
    if path.exists():
        return path
    tmp = directory / f".{sha256}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
