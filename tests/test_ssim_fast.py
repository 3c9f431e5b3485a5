"""The OpenCV SSIM computes scikit-image's formula, only faster."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import crop

from pictrace.features.ssim import gray256, ssim_reference, ssim_score


@pytest.mark.parametrize(("a", "b"), [("astronaut", "astronaut"), ("astronaut", "camera"), ("coffee", "chelsea")])
def test_fast_ssim_equals_scikit_image(photos: dict[str, np.ndarray], a: str, b: str) -> None:
    x, y = gray256(photos[a]), gray256(photos[b])
    assert ssim_score(x, y) == pytest.approx(max(0.0, ssim_reference(x, y)), abs=1e-4)


def test_fast_ssim_of_an_edit(photos: dict[str, np.ndarray]) -> None:
    x = gray256(photos["rocket"])
    y = gray256(crop(photos["rocket"], 0.95, 0.02))
    assert ssim_score(x, y) == pytest.approx(ssim_reference(x, y), abs=1e-4)
    assert 0.0 < ssim_score(x, y) < 1.0
