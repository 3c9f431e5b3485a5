"""Index files on disk: written atomically, and framed (header, id table, FAISS index, CRC-32) so that a
truncated or damaged file is detected on reading. The vector and the local-feature index both use it."""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np


def atomic_write(path: Path, data: bytes | Iterable[bytes] | Callable[[BinaryIO], None]) -> None:
    """Write to a temporary file, fsync, then rename over the target: readers see old or new, never half.

    ``data`` is bytes, chunks of bytes, or a function that writes to the open file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with tmp.open("wb") as handle:
            if callable(data):
                data(handle)
            else:
                for chunk in [data] if isinstance(data, bytes) else data:
                    handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_framed(
    handle: BinaryIO,
    magic: bytes,
    end: bytes,
    header: dict[str, object],
    ids: np.ndarray,
    dump: Callable[[Any], None],
) -> None:
    """``magic``, one JSON header line, an int64 id table, a FAISS index (``dump`` writes it to the callback
    writer it is given), then the CRC-32 of everything between magic and it, and ``end``. A stream: no second
    copy of a large index in memory, one pass for the checksum. The vector and the local-feature index use it."""
    crc = 0

    def put(chunk: bytes) -> int:
        nonlocal crc
        crc = zlib.crc32(chunk, crc)
        handle.write(chunk)
        return len(chunk)

    handle.write(magic)
    put(json.dumps(header).encode() + b"\n")
    put(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    dump(faiss.PyCallbackIOWriter(put))  # type: ignore[attr-defined]
    handle.write(struct.pack("<I", crc) + end)


def read_framed(
    handle: BinaryIO,
    magic: bytes,
    end: bytes,
    count_key: str,
    load: Callable[[Any], Any],
    older: bytes | None = None,
) -> tuple[dict[str, Any], np.ndarray, Any]:
    """Inverse of :func:`write_framed` (``header[count_key]`` is the id table's length); ValueError or
    RuntimeError when the file is not one, whole. ``older``: the prefix of an older format's magic, named in
    the error."""
    head = handle.read(len(magic))
    if head != magic:
        raise ValueError("bad magic" + (" (an older format)" if older and head.startswith(older) else ""))
    line = handle.readline(1 << 20)
    crc = zlib.crc32(line)
    header = json.loads(line)
    count = int(header[count_key])
    raw = handle.read(count * 8)
    if len(raw) != count * 8:
        raise ValueError(f"truncated {count_key} table")
    crc = zlib.crc32(raw, crc)

    def get(size: int) -> bytes:
        nonlocal crc
        chunk = handle.read(size)
        crc = zlib.crc32(chunk, crc)
        return chunk

    index = load(faiss.PyCallbackIOReader(get))  # type: ignore[attr-defined]
    if handle.read() != struct.pack("<I", crc) + end:
        raise ValueError("checksum mismatch or trailing data")
    return header, np.frombuffer(raw, dtype="<i8").astype(np.int64), index
