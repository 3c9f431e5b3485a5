"""The local-feature index: votes point at the image a query's keypoints come from, exact or inverted file."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import crop, resize

from pictrace.features.orb import OrbFeatures, extract_orb
from pictrace.local_index import LocalIndex, LocalIndexParams

NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick"]


def _params(flat_below: int) -> LocalIndexParams:
    return LocalIndexParams(per_image=500, code_bytes=16, knn=10, max_distance=24, nprobe=16, flat_below=flat_below)


@pytest.fixture(scope="module")
def orbs(photos: dict[str, np.ndarray]) -> dict[str, OrbFeatures]:
    return {name: extract_orb(photos[name]) for name in NAMES}


@pytest.mark.parametrize("flat_below", [10**9, 1000], ids=["exact", "inverted-file"])
def test_votes_point_at_the_source_image(
    photos: dict[str, np.ndarray], orbs: dict[str, OrbFeatures], flat_below: int
) -> None:
    index = LocalIndex.build(_params(flat_below), ((i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)))
    assert index.is_inverted_file == (flat_below == 1000)
    assert len(index) == sum(min(len(o), 500) for o in orbs.values())
    for i, name in enumerate(NAMES[:4], 1):
        query = extract_orb(resize(crop(photos[name], 0.6, 0.2), 0.7))
        votes = index.vote(query)
        assert votes.top(1) == [i], votes.counts
        others = [c for v, c in votes.counts.items() if v != i]
        assert votes.counts[i] > 2 * max(others, default=0)


def test_add_and_remove_follow_the_catalogue(photos: dict[str, np.ndarray], orbs: dict[str, OrbFeatures]) -> None:
    index = LocalIndex.build(_params(10**9), [])
    assert index.vote(orbs["coffee"]).counts == {}
    index.add(7, orbs["coffee"])
    index.add(9, orbs["rocket"])
    assert index.vote(orbs["coffee"]).top(1) == [7]
    index.remove([7])
    assert 7 not in index.vote(orbs["coffee"]).counts
    assert len(index) == min(len(orbs["rocket"]), 500)


def test_outgrowing_the_lists_asks_for_training(orbs: dict[str, OrbFeatures]) -> None:
    index = LocalIndex.build(_params(1000), [(1, orbs["coffee"].to_bytes())])
    assert not index.is_inverted_file and not index.needs_training()
    index.add(2, orbs["rocket"])
    index.add(3, orbs["chelsea"])
    assert index.needs_training()  # past flat_below descriptors: time to learn inverted lists
    rebuilt = LocalIndex.build(index.params, ((i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)))
    index.replace_with(rebuilt)
    assert index.is_inverted_file and not index.needs_training()
    assert index.vote(orbs["coffee"]).top(1) == [NAMES.index("coffee") + 1]


def test_the_inverted_file_does_not_depend_on_the_order_images_arrived(
    photos: dict[str, np.ndarray], orbs: dict[str, OrbFeatures]
) -> None:
    """Concurrent fetches commit a gallery in a different order each time; its lists must come out the same."""
    blobs = [(i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)]
    forward = LocalIndex.build(_params(1000), blobs)
    backward = LocalIndex.build(_params(1000), reversed(blobs))
    assert forward.is_inverted_file and backward.is_inverted_file
    for name in NAMES:
        query = extract_orb(resize(crop(photos[name], 0.5, 0.3), 0.6))
        assert forward.vote(query).counts == backward.vote(query).counts
