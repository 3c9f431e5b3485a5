"""The catalogue's embedding encoding: float16 now, float32 as older catalogues hold it, never confused."""

from __future__ import annotations

import numpy as np
import pytest

from pictrace.features.embed import l2_normalise
from pictrace.store.blobs import decode_embedding, encode_embedding


def test_float16_round_trip_keeps_cosines_within_1e_3() -> None:
    rng = np.random.default_rng(0)
    vectors = l2_normalise(rng.normal(size=(50, 1280)).astype(np.float32))
    back = np.stack([decode_embedding(encode_embedding(v)) for v in vectors])
    assert back.dtype == np.float32 and back.shape == vectors.shape
    assert len(encode_embedding(vectors[0])) == 3 + 1280 * 2
    np.testing.assert_allclose(back, vectors, rtol=1e-3, atol=1e-5)
    assert float(np.abs(back @ vectors.T - vectors @ vectors.T).max()) < 1e-3


@pytest.mark.parametrize("dim", [16, 1280, 2048])
def test_float32_blobs_of_older_catalogues_read_exactly(dim: int) -> None:
    vector = l2_normalise(np.random.default_rng(dim).normal(size=(1, dim)).astype(np.float32))[0]
    old = vector.astype("<f4").tobytes()
    assert np.array_equal(decode_embedding(old), vector)
    assert len(encode_embedding(vector)) % 2 == 1 and len(old) % 4 == 0  # the two encodings never collide


def test_values_float16_cannot_hold_stay_float32_and_bad_blobs_are_errors() -> None:
    huge = np.array([1e6, -2.0, 0.5], dtype=np.float32)
    assert np.array_equal(decode_embedding(encode_embedding(huge)), huge)
    with pytest.raises(ValueError, match="neither"):
        decode_embedding(b"f16\x00\x00\x00")  # even length with the tag: neither
    with pytest.raises(ValueError, match="neither"):
        decode_embedding(b"abcdef")
