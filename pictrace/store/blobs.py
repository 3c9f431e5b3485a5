"""How an embedding is kept in the catalogue's ``embedding`` column.

Older catalogues hold raw little-endian float32 (4 bytes a dimension). New rows hold ``b"f16"`` and float16
(2 bytes a dimension): the vectors are L2-normalised, so float16's ~3 significant digits move a cosine by
~1e-4 (under 1e-3, tested), and the catalogue is where the bytes are. The vector index keeps the embedder's
float32 for what ingest gives it, and these, widened, when it is rebuilt from the catalogue.

The 3-byte tag makes every float16 blob's length odd and every float32 blob's a multiple of 4, so the two can
never be mistaken for each other, in one catalogue or mixed.
"""

from __future__ import annotations

import numpy as np

_FLOAT16 = b"f16"
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def encode_embedding(vector: np.ndarray) -> bytes:
    """float16 with its tag; a vector float16 cannot hold (not normalised, huge values) stays float32."""
    values = np.asarray(vector, dtype=np.float32).ravel()
    if values.size and float(np.abs(values).max()) >= _FLOAT16_MAX:
        return values.astype("<f4").tobytes()
    return _FLOAT16 + values.astype("<f2").tobytes()


def decode_embedding(blob: bytes) -> np.ndarray:
    """float32 vector of either encoding; a blob of neither shape is a ValueError."""
    data = bytes(blob)
    if len(data) % 2 == 1 and data.startswith(_FLOAT16):
        return np.frombuffer(data, dtype="<f2", offset=len(_FLOAT16)).astype(np.float32)
    if len(data) % 4 == 0:
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    raise ValueError(f"embedding blob of {len(data)} bytes is neither float16 nor float32")
