"""The picture inside a query: found in a screenshot made in code (a page of bars, text and flat boxes around
a pasted photo), not found in plain photos, and searched by its own embedding beside the query's."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import PASTED_AT, encode, resize, screenshot

from pictrace.features.inner import Box, inner_picture
from pictrace.service import Service
from pictrace.tuning import Tuning

NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick"]
@pytest.fixture(scope="module")
def pasted(photos: dict[str, np.ndarray]) -> np.ndarray:
    return resize(photos["coffee"], 0.4)  # 240 x 160: about 14 % of the page


def test_the_pasted_picture_is_found_where_it_was_pasted(pasted: np.ndarray) -> None:
    found = inner_picture(screenshot(pasted), Tuning().inner)
    assert found is not None
    h, w = pasted.shape[:2]
    expected = Box(*PASTED_AT, w, h)
    assert max(abs(a - b) for a, b in zip(
        (found.x, found.y, found.width, found.height),
        (expected.x, expected.y, expected.width, expected.height), strict=True,
    )) <= 3, found
    # a large page is looked at smaller; the box comes back in its own pixels
    big = cv2.resize(screenshot(pasted), (1280, 880), interpolation=cv2.INTER_LINEAR)
    scaled = inner_picture(big, Tuning().inner)
    assert scaled is not None and abs(scaled.x - 2 * PASTED_AT[0]) <= 6 and abs(scaled.width - 2 * w) <= 8


def test_plain_photos_and_flat_boxes_hold_no_picture(photos: dict[str, np.ndarray]) -> None:
    tuning = Tuning().inner
    for name in NAMES:
        assert inner_picture(photos[name], tuning) is None, name
    page = screenshot(np.full((160, 240, 3), 200, np.uint8))  # the pasted "picture" is one flat colour
    assert inner_picture(page, tuning) is None


async def test_a_screenshot_is_searched_by_the_picture_inside_it(
    photos_service: Service, pasted: np.ndarray
) -> None:
    service = photos_service
    query = encode(screenshot(pasted))
    result = service.searcher.search_bytes(query)
    h, w = pasted.shape[:2]
    assert result.query.inner_picture is not None
    assert max(abs(a - b) for a, b in zip(result.query.inner_picture, [*PASTED_AT, w, h], strict=True)) <= 3
    coffee = next(m for m in result.results if m.id == "coffee")
    assert result.results[0].id == "coffee"
    assert coffee.scores.embedding > 0.8  # the pasted picture's own embedding, not the page's
    service.searcher.tuning = service.searcher.tuning.replace(inner={"enabled": False})
    without = service.searcher.search_bytes(query)
    assert without.query.inner_picture is None
    page_only = {m.id: m.scores.embedding for m in without.results}
    assert page_only.get("coffee", 0.0) < coffee.scores.embedding - 0.1
