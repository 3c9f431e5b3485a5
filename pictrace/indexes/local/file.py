"""The local-feature index's file: which vec_ids it holds, what it was built with and for which catalogue,
and the FAISS binary index, framed and checked like the vector index's file."""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np

from pictrace.indexes.storage import read_framed, write_framed

MAGIC = b"PICTRACE-LOCAL-2\n"  # 2: the inverted file's quantizer is two-level; a 1 file is stale, rebuilt
OLDER = b"PICTRACE-LOCAL-"
END = b"PICTRACE-END\n"


class LocalIndexCorruptError(ValueError):
    """The saved local index cannot be read (truncated, bad checksum, another format)."""


def write_local(handle: BinaryIO, header: dict[str, object], held: np.ndarray, index: Any) -> None:
    """MAGIC, a JSON header line, the held vec_ids, the FAISS binary index (an inverted file holds its two-level
    quantizer), a CRC32 of all that, END."""
    import faiss

    write_framed(handle, MAGIC, END, header, held, lambda writer: faiss.write_index_binary(index, writer))


def read_local(handle: BinaryIO) -> tuple[dict[str, Any], np.ndarray, Any]:
    """Parse a file written by ``write_local``; ValueError or RuntimeError when it is not one, whole ("older format"
    in the message for a file of an older layout)."""
    import faiss

    header, held, index = read_framed(handle, MAGIC, END, "held", faiss.read_index_binary, older=OLDER)
    if int(index.ntotal) != int(header["codes"]):
        raise ValueError("code count does not match the header")
    return header, held, index
