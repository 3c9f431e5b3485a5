"""The local-feature index: votes point at the image a query's keypoints come from, exact or inverted file."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from conftest import crop, resize

from pictrace.features.extract import orb_of
from pictrace.features.orb import OrbFeatures, consensus, extract_orb
from pictrace.indexes.local import LocalIndex, LocalIndexParams
from pictrace.indexes.local.lists import stable_sample, train_two_level, two_level_quantizer
from pictrace.search.schedule import map_serial
from pictrace.search.verify import nearest_by_embedding, screen
from pictrace.tuning import Tuning

NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick"]


def _params(flat_below: int) -> LocalIndexParams:
    return LocalIndexParams(
        per_image=500, code_bytes=16, knn=10, max_distance=24, nprobe=16, flat_below=flat_below, cell_lists=16
    )


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


def test_add_and_remove_on_the_inverted_file(orbs: dict[str, OrbFeatures]) -> None:
    """Codes added after the build go to the lists the two-level quantizer picks, where a query finds them."""
    index = LocalIndex.build(_params(1000), ((i, orbs[n].to_bytes()) for i, n in enumerate(NAMES[:6], 1)))
    assert index.is_inverted_file
    for i, name in enumerate(NAMES[:6], 1):  # an image's own descriptors find it after the build
        assert index.vote(orbs[name]).top(1) == [i]
    before = len(index)
    index.add(20, orbs["brick"])
    assert len(index) == before + min(len(orbs["brick"]), 500)
    assert index.vote(orbs["brick"]).top(1) == [20]
    index.remove([20, 3])
    assert len(index) == before - min(len(orbs["coffee"]), 500)
    assert 20 not in index.vote(orbs["brick"]).counts and 3 not in index.vote(orbs["coffee"]).counts


def _clustered_codes(seed: int, clusters: int, each: int, flip: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.unpackbits(rng.integers(0, 256, (clusters, 16), dtype=np.uint8), axis=1)
    noisy = np.repeat(centres, each, axis=0) ^ (rng.random((clusters * each, 128)) < flip).astype(np.uint8)
    return np.packbits(noisy, axis=1)


def test_two_level_assignment_mostly_picks_the_nearest_list() -> None:
    """On clustered codes a code's list (nearest sub-centre of its nearest top cell) is the list an exact scan
    of all sub-centres picks, or one as near, almost always; probing every top cell is the exact scan."""
    codes = _clustered_codes(3, 64, 150, 0.06)
    top, subs, offsets = train_two_level(stable_sample([codes], 16384), 256, 32, 10)
    assert len(top) == 8 and 240 <= len(subs) <= 270 and offsets[-1] == len(subs)
    assert len(train_two_level(codes[:4000], 63, 32, 2)[0]) == 1  # under 2 cells' worth of lists: one cell
    quantizer = two_level_quantizer(top, subs, offsets)
    exact = faiss.IndexBinaryFlat(128)
    exact.add(subs)
    exact_dist, exact_list = exact.search(codes, 1)
    one_cell = faiss.SearchParametersIVF()
    one_cell.nprobe = 1
    dist, lists = quantizer.search(codes, 1, params=one_cell)
    assert (lists == exact_list).mean() > 0.9
    assert (dist == exact_dist).mean() > 0.95
    every_cell = faiss.SearchParametersIVF()
    every_cell.nprobe = len(top)
    assert np.array_equal(quantizer.search(codes, 16, params=every_cell)[0], exact.search(codes, 16)[0])


def test_the_training_sample_does_not_depend_on_order_or_chunks() -> None:
    codes = _clustered_codes(5, 16, 100, 0.1)
    sample = stable_sample([codes], 500)
    assert len(sample) == 500
    shuffled = codes[np.random.default_rng(1).permutation(len(codes))]
    assert np.array_equal(stable_sample(np.array_split(shuffled, 7), 500), sample)
    assert len(stable_sample([codes[:100]], 500)) == 100  # fewer codes than asked: all of them


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


def test_a_scan_budget_bounds_the_codes_a_descriptor_scans(
    photos: dict[str, np.ndarray], orbs: dict[str, OrbFeatures]
) -> None:
    """The nearest lists are scanned first and the lookup stops once the budget is spent: a generous budget is
    the full scan, a small one finds fewer pairs, and the source image still leads on what it finds."""
    from dataclasses import replace

    blobs = [(i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)]
    full = LocalIndex.build(_params(1000), blobs)
    generous = LocalIndex.build(replace(_params(1000), scan_budget=1000.0), blobs)
    tight = LocalIndex.build(replace(_params(1000), scan_budget=0.05), blobs)
    assert full.is_inverted_file and full.params.structure() == tight.params.structure()
    for i, name in enumerate(NAMES[:4], 1):
        query = extract_orb(resize(crop(photos[name], 0.6, 0.2), 0.7))
        all_of_it, bounded = full.vote(query), tight.vote(query)
        assert generous.vote(query).counts == all_of_it.counts
        assert len(bounded.owners) < len(all_of_it.owners)
        assert bounded.top(1) == [i], bounded.counts


def test_query_cells_search_the_lists_the_exact_assignment_filed_codes_in(
    photos: dict[str, np.ndarray], orbs: dict[str, OrbFeatures]
) -> None:
    """With the codes filed in their nearest lists (one top cell), a query searches cells over the lists for its
    nearest ones: probing every cell is the exact assignment, probing two still finds the source image with
    most of its votes. Query-time only: an index saved without them is reused."""
    from dataclasses import replace

    blobs = [(i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)]
    exact_filing = replace(_params(1000), cell_lists=65_536)
    plain = LocalIndex.build(replace(exact_filing, query_cell_lists=None), blobs)
    two_cells = LocalIndex.build(replace(exact_filing, query_cell_lists=16, top_probe=2), blobs)
    assert plain.is_inverted_file and plain._query_cells is None
    cells = two_cells._query_cells
    assert cells is not None and cells.nlist > 2
    assert plain.params.structure() == two_cells.params.structure()
    # probing every cell finds every descriptor's nearest lists, as comparing it with every centre does
    centres = plain._coarse.invlists  # type: ignore[union-attr]
    n = centres.list_size(0)
    every_centre = faiss.IndexBinaryFlat(128)
    every_centre.add(faiss.rev_swig_ptr(centres.get_codes(0), n * 16).reshape(n, 16)[
        np.argsort(faiss.rev_swig_ptr(centres.get_ids(0), n))])
    codes = np.ascontiguousarray(orbs["coins"].descriptors[:, :16])
    every_cell = faiss.SearchParametersIVF()
    every_cell.nprobe = cells.nlist
    assert np.array_equal(cells.search(codes, 16, params=every_cell)[0], every_centre.search(codes, 16)[0])
    kept = []
    for i, name in enumerate(NAMES[:4], 1):
        query = extract_orb(resize(crop(photos[name], 0.6, 0.2), 0.7))
        exact, approximate = plain.vote(query), two_cells.vote(query)
        assert approximate.top(1) == [i], approximate.counts
        pairs = set(zip(exact.owners.tolist(), exact.rows.tolist(), strict=True))
        found = set(zip(approximate.owners.tolist(), approximate.rows.tolist(), strict=True))
        kept.append(len(found & pairs) / len(pairs))
    assert 0.6 < float(np.mean(kept)) < 1.0, kept  # two of the cells: most pairs, not all


@pytest.mark.parametrize("flat_below", [10**9, 1000], ids=["exact", "inverted-file"])
def test_votes_shared_with_a_side_thread_are_the_votes_of_one_thread(
    photos: dict[str, np.ndarray], orbs: dict[str, OrbFeatures], flat_below: int
) -> None:
    """The lookup is split into chunks the side thread can take: every vote and every pair stays the same, and
    the side thread really takes some of the chunks (a map that records which thread looked up what)."""
    import threading
    import time

    from pictrace.indexes.local.index import VOTE_CHUNK
    from pictrace.search.schedule import SideThread

    index = LocalIndex.build(_params(flat_below), ((i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)))
    side = SideThread()
    threads: set[str] = set()
    caller = threading.current_thread()

    def recorded(fn, items):  # type: ignore[no-untyped-def]
        def call(x):  # type: ignore[no-untyped-def]
            threads.add(threading.current_thread().name)
            if threading.current_thread() is caller:
                time.sleep(0.002)  # leaves the side thread chunks to take even on a loaded machine
            return fn(x)

        return side.map(call, items)

    try:
        for name in ["astronaut", "coins"]:
            query = extract_orb(resize(crop(photos[name], 0.7, 0.1), 0.8), n_features=3000)
            assert len(query) > 4 * VOTE_CHUNK
            one, two = index.vote(query, map_serial), index.vote(query, recorded)
            assert one.counts == two.counts and one.counts
            for field in ("owners", "rows", "keypoints"):
                assert np.array_equal(getattr(one, field), getattr(two, field))
    finally:
        side.shutdown()
    assert any(t.startswith("pictrace-side") for t in threads), threads


def test_searches_share_the_index_while_adds_and_removes_take_it_alone(orbs: dict[str, OrbFeatures]) -> None:
    """A vote holds the index for reading until its lookup is done: another vote goes on meanwhile, an add waits
    (FAISS crashed here on an add during a search)."""
    import threading

    index = LocalIndex.build(_params(10**9), ((i, orbs[n].to_bytes()) for i, n in enumerate(NAMES[:4], 1)))
    inside, release = threading.Event(), threading.Event()

    def held_map(fn, items):  # type: ignore[no-untyped-def]
        inside.set()
        assert release.wait(10)
        return [fn(x) for x in items]

    holder = threading.Thread(target=index.vote, args=(orbs["coffee"], held_map))
    holder.start()
    try:
        assert inside.wait(10)
        other = threading.Thread(target=index.vote, args=(orbs["rocket"],))
        other.start()
        other.join(10)
        assert not other.is_alive()  # readers share the lock
        adder = threading.Thread(target=index.add, args=(20, orbs["brick"]))
        adder.start()
        adder.join(0.3)
        assert adder.is_alive() and 20 not in index  # the add waits for the vote
    finally:
        release.set()
        holder.join(10)
    adder.join(10)
    assert not adder.is_alive() and index.vote(orbs["brick"]).top(1) == [20]


def test_vote_pairs_are_the_matching_keypoints(photos: dict[str, np.ndarray], orbs: dict[str, OrbFeatures]) -> None:
    """Each vote's pair is a query keypoint and the gallery keypoint it found; for a crop they agree on a shift."""
    index = LocalIndex.build(_params(10**9), ((i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)))
    coffee = NAMES.index("coffee") + 1
    h, w = photos["coffee"].shape[:2]
    query = extract_orb(photos["coffee"][h // 4 :, w // 4 :])  # a crop: gallery point = query point + offset
    votes = index.vote(query)
    rows, keypoints = votes.pairs(coffee)
    assert len(rows) == votes.counts[coffee] and len(set(rows.tolist())) == len(rows)
    assert votes.pairs(10**6)[0].size == 0  # an image nobody voted for has no pairs
    gallery = orbs["coffee"]
    shift = gallery.points[keypoints] / gallery.scale - query.points[rows] / query.scale
    agree = np.linalg.norm(shift - np.array([w // 4, h // 4]), axis=1) < 3
    assert agree.mean() > 0.5, agree.mean()


def test_consensus_screens_related_from_unrelated(
    photos: dict[str, np.ndarray], orbs: dict[str, OrbFeatures]
) -> None:
    index = LocalIndex.build(_params(10**9), ((i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)))
    query = extract_orb(resize(crop(photos["rocket"], 0.6, 0.2), 0.7))
    votes = index.vote(query)
    agreeing = {
        name: consensus(query, orbs[name], *votes.pairs(i)) for i, name in enumerate(NAMES, 1) if i in votes.counts
    }
    threshold = Tuning().cascade.prescreen_min_inliers
    assert agreeing["rocket"] >= 2 * threshold, agreeing  # the cropped, shrunk copy passes the screen easily
    assert max(v for name, v in agreeing.items() if name != "rocket") < threshold, agreeing


def test_only_screened_and_nearest_candidates_get_the_full_check(
    photos: dict[str, np.ndarray], orbs: dict[str, OrbFeatures]
) -> None:
    index = LocalIndex.build(_params(10**9), ((i, orbs[n].to_bytes()) for i, n in enumerate(NAMES, 1)))
    rgb = resize(crop(photos["rocket"], 0.6, 0.2), 0.7)
    query = orb_of(rgb, Tuning())
    gallery = {i: orbs[name] for i, name in enumerate(NAMES, 1)}
    cosines = {i: 0.1 * i for i in gallery}  # by embedding, the last two images are nearest
    votes = index.vote(query)
    rocket = NAMES.index("rocket") + 1

    def chosen(**cascade: int) -> set[int]:
        """What the search checks fully: the screened candidates and the nearest by embedding."""
        configured = Tuning().replace(cascade=cascade)
        passed = screen(query, gallery, votes, configured, map_serial)
        return passed | nearest_by_embedding(cosines, gallery, configured)

    passed = chosen(verify_embedding_top=0)
    assert rocket in passed and len(passed) <= 2, passed  # chance agreement of 7 keypoints is rare
    assert chosen(verify_embedding_top=2) == passed | {len(NAMES), len(NAMES) - 1}
    assert chosen(prescreen_min_inliers=0) == set(gallery)  # the screen off: every candidate is checked
