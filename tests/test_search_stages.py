"""The search's stages one at a time, on plain data made in code, and the search they make up: where its work
runs (one thread or two) never changes its answer, and it reads each candidate's features once."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import crop, encode, recompress, resize, rotate90

from pictrace.features.extract import orb_of
from pictrace.features.orb import OrbFeatures
from pictrace.features.ssim import SsimReference, gray256
from pictrace.features.thumbnail import encode_gray_png
from pictrace.indexes.local import LocalIndex, LocalIndexParams, Votes
from pictrace.matching.geometry import identical_fit
from pictrace.matching.mirror import mirrored_orb
from pictrace.matching.scores import CandidateScore, fuse
from pictrace.search import Searcher
from pictrace.search.candidates import Candidates, local_candidates, votes_for, with_nearest
from pictrace.search.expand import expand
from pictrace.search.present import describe, kept, named
from pictrace.search.rerank import mirror_pass, needs_mirror, shortlist, with_ssim_all
from pictrace.search.schedule import Schedule, map_serial
from pictrace.search.verify import Checks, scores, verify
from pictrace.service import Service
from pictrace.store import Catalogue, ImageRecord
from pictrace.tuning import Tuning

NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick"]
ROCKET = NAMES.index("rocket") + 1  # vec_ids below are positions in NAMES, from 1
COFFEE = NAMES.index("coffee") + 1


@pytest.fixture(scope="module")
def tuning() -> Tuning:
    return Tuning()


@pytest.fixture(scope="module")
def gallery(photos: dict[str, np.ndarray], tuning: Tuning) -> dict[int, OrbFeatures]:
    """Each photo's ORB features as ingest stores them, by vec_id."""
    return {i: orb_of(photos[name], tuning) for i, name in enumerate(NAMES, 1)}


@pytest.fixture(scope="module")
def local(gallery: dict[int, OrbFeatures]) -> LocalIndex:
    params = LocalIndexParams(per_image=500, code_bytes=16, knn=10, max_distance=24, nprobe=16, flat_below=10**9)
    return LocalIndex.build(params, ((v, orb.to_bytes()) for v, orb in gallery.items()))


def score(vec_id: int, embedding: float, orb: float = 0.0, inliers: int = 0, *, fit: bool = False) -> CandidateScore:
    return CandidateScore(
        vec_id, embedding, 0.0, orb, inliers, fuse(embedding, 0.0, orb, Tuning()), np.eye(3) if fit else None
    )


# ---------------------------------------------------------------------------------------------- candidates


def test_local_candidates_are_the_exact_matches_and_the_most_voted(
    photos: dict[str, np.ndarray], local: LocalIndex, tuning: Tuning
) -> None:
    query = orb_of(resize(crop(photos["rocket"], 0.6, 0.2), 0.7), tuning)
    votes = votes_for(query, local, tuning, map_serial)
    found = local_candidates([COFFEE], votes, tuning)
    assert found.voted[0] == ROCKET and found.exact == {COFFEE}
    assert found.local == [COFFEE, *found.voted]
    assert all(votes.counts[v] >= tuning.cascade.local_min_votes for v in found.voted)
    off = tuning.replace(cascade={"local_candidates": 0})
    assert votes_for(query, local, off, map_serial).counts == {}
    assert local_candidates([], votes_for(query, local, off, map_serial), off).voted == ()


def test_nearest_vectors_come_first_and_ties_keep_that_order() -> None:
    found = with_nearest(Candidates(frozenset({9}), Votes({}), (4,)), {3: 0.9, 5: 0.5}, {4: 0.5, 9: 0.2})
    assert list(found.cosines) == [3, 5, 4, 9]
    ranked = found.best_first([score(v, found.cosines[v]) for v in found.cosines])
    assert [c.vec_id for c in ranked] == [9, 3, 5, 4]  # exact first, then by score; 5 and 4 tie in cosine order


# -------------------------------------------------------------------------------------------------- verify


def test_verify_checks_the_voted_copy_fully_and_takes_the_exact_match_as_identical(
    photos: dict[str, np.ndarray], gallery: dict[int, OrbFeatures], local: LocalIndex, tuning: Tuning
) -> None:
    query = orb_of(resize(crop(photos["rocket"], 0.6, 0.2), 0.7), tuning)
    found = local_candidates([COFFEE], votes_for(query, local, tuning, map_serial), tuning)
    orbs = {v: gallery[v] for v in found.local}
    checks = verify(query, found, orbs, Checks(), tuning, map_serial)
    assert checks.considered == set(orbs)
    identical = identical_fit(gallery[COFFEE])
    assert (checks.fits[COFFEE].score, checks.fits[COFFEE].inliers) == (identical.score, identical.inliers)
    assert checks.fits[ROCKET].inliers >= tuning.check.min_inliers and checks.fits[ROCKET].homography is not None
    assert set(checks.fits) <= {COFFEE, ROCKET, *found.voted}
    # The nearest vectors join: the candidates already considered are not screened again, and the nearest by
    # embedding get the full check whatever their votes.
    cosines = {v: 0.05 * v for v in gallery}
    joined = with_nearest(found, cosines, {})
    nearest_two = set(sorted(gallery, key=lambda v: -cosines[v])[: tuning.cascade.verify_embedding_top])
    again = verify(query, joined, gallery, checks, tuning, map_serial)
    assert again.considered == set(gallery)
    assert nearest_two <= set(again.fits) and set(checks.fits) <= set(again.fits)
    assert all(again.fits[v] is checks.fits[v] for v in checks.fits)
    ranked = joined.best_first(scores(joined, gallery, again, tuning))
    assert ranked[0].vec_id == COFFEE and ranked[1].vec_id == ROCKET
    assert [c.vec_id for c in ranked if c.orb_inliers == 0] != []  # unchecked ones keep their embedding score


def test_the_most_voted_get_the_full_check_though_their_few_votes_fail_the_screen(
    photos: dict[str, np.ndarray], gallery: dict[int, OrbFeatures], tuning: Tuning
) -> None:
    """A tiny copy's keypoints reach few of its original's codes: too few pairs for the screen's RANSAC, though
    its full match agrees on a homography. Being the most voted is enough for the full check."""
    query = orb_of(resize(crop(photos["rocket"], 0.7, 0.1), 0.8), tuning)
    few = np.arange(4)  # four pairs: under prescreen_min_inliers, so the screen cannot pass them
    votes = Votes({ROCKET: 4, COFFEE: 3}, owners=np.array([COFFEE] * 3 + [ROCKET] * 4), rows=np.r_[few[:3], few],
                  keypoints=np.r_[few[:3], few])
    found = Candidates(frozenset(), votes, (ROCKET, COFFEE))
    orbs = {v: gallery[v] for v in found.local}
    assert tuning.cascade.verify_voted_top == 2 and len(few) < tuning.cascade.prescreen_min_inliers
    screened_only = verify(query, found, orbs, Checks(), tuning.replace(cascade={"verify_voted_top": 0}), map_serial)
    assert screened_only.fits == {}
    checks = verify(query, found, orbs, Checks(), tuning, map_serial)
    assert set(checks.fits) == {ROCKET, COFFEE}
    assert checks.fits[ROCKET].inliers >= tuning.check.min_inliers and checks.fits[ROCKET].homography is not None
    assert checks.fits[COFFEE].homography is None
    top_one = verify(query, found, orbs, Checks(), tuning.replace(cascade={"verify_voted_top": 1}), map_serial)
    assert set(top_one.fits) == {ROCKET}


def test_without_votes_every_candidate_gets_the_full_check(
    photos: dict[str, np.ndarray], gallery: dict[int, OrbFeatures], local: LocalIndex, tuning: Tuning
) -> None:
    off = tuning.replace(cascade={"local_candidates": 0})
    query = orb_of(crop(photos["coins"], 0.7, 0.1), off)
    found = with_nearest(local_candidates([], votes_for(query, local, off, map_serial), off), {1: 0.3, 6: 0.8}, {})
    checks = verify(query, found, {1: gallery[1], 6: gallery[6]}, Checks(), off, map_serial)
    assert set(checks.fits) == {1, 6} and checks.fits[6].inliers >= off.check.min_inliers


# -------------------------------------------------------------------------------------------------- expand


def test_expand_lifts_the_links_of_the_best_verified_results(tuning: Tuning) -> None:
    exact = score(9, 1.0, 1.0, 500, fit=True)
    source = score(1, 0.6, 1.0, 80, fit=True)
    weak = score(2, 0.4)
    ranked = [exact, source, weak]
    links = {1: [(2, 12), (3, 24), (7, 30)], 9: [(4, 15), (1, 6)]}
    cosines = {3: 0.2, 4: 0.1}  # 7 was deleted meanwhile: no cosine
    asked: list[list[int]] = []

    def cosine_of(ids: list[int]) -> dict[int, float]:
        asked.append(ids)
        return {v: cosines[v] for v in ids if v in cosines}

    out = {c.vec_id: c for c in expand(ranked, frozenset({9}), tuning, links_of=links_of(links), cosine_of=cosine_of)}
    assert asked == [[4, 3, 7]]  # only the images not ranked yet
    weight, full = tuning.cascade.expand_weight, tuning.check.full_inliers
    assert out[3].via == 1 and out[3].fused == pytest.approx(weight * source.fused * 24 / full)
    assert out[4].via == 9 and out[4].fused == pytest.approx(weight * 1.0 * 15 / full)  # from an exact match
    assert 7 not in out and out[1] == source and out[9] == exact  # a weaker offer never lowers a result
    assert out[2].via == 1 and out[2].fused == pytest.approx(weight * source.fused * 12 / full)
    assert out[2].fused > weak.fused and out[2].embedding == weak.embedding  # lifted, its own evidence kept
    off = tuning.replace(cascade={"expand_from": 0})
    assert expand(ranked, frozenset(), off, links_of=links_of(links), cosine_of=cosine_of) == ranked


def links_of(links: dict[int, list[tuple[int, int]]]) -> Callable[[list[int]], dict[int, list[tuple[int, int]]]]:
    return lambda ids: {v: links[v] for v in ids if v in links}


# -------------------------------------------------------------------------------------------------- rerank


def test_rerank_gives_the_shortlist_ssim_and_finds_a_mirrored_copy(
    photos: dict[str, np.ndarray], gallery: dict[int, OrbFeatures], tuning: Tuning
) -> None:
    rgb = np.ascontiguousarray(crop(photos["astronaut"], 0.8, 0.1)[:, ::-1])
    ranked = [score(v, 0.9 - 0.05 * v) for v in gallery]
    best, rest = shortlist(ranked, 3, tuning.replace(cascade={"ssim_shortlist": 2}))
    assert (len(best), len(rest)) == (3, len(ranked) - 3)
    grays = {v: encode_gray_png(gray256(photos[NAMES[v - 1]])) for v in (1, 2)}  # 3 has no stored thumbnail
    reference = SsimReference(gray256(photos["chelsea"]))
    with_ssim = with_ssim_all(reference, best, grays, tuning, map_serial)
    assert [c.vec_id for c in with_ssim] == [1, 2]
    assert with_ssim[1].ssim > 0.95 > with_ssim[0].ssim  # chelsea is candidate 2
    assert with_ssim[1].fused > best[1].fused
    todo = needs_mirror(with_ssim, gallery, tuning)
    assert [c.vec_id for c in todo] == [1, 2]  # no fit, embedding high enough
    (astronaut, chelsea) = mirror_pass(mirrored_orb(rgb, tuning), with_ssim, gallery, tuning, map_serial)
    assert astronaut.homography is not None and astronaut.orb_inliers >= tuning.verdicts.copy_min_inliers
    assert float(np.linalg.det(astronaut.homography[:2, :2])) < 0  # fitted through the mirror
    assert chelsea == with_ssim[1]


# ------------------------------------------------------------------------------------------------- present


def test_the_nearest_by_embedding_stay_on_the_shortlist_wherever_they_rank(tuning: Tuning) -> None:
    """A mirrored copy (no direct fit) ranked below images lifted by the match graph still gets the mirror check."""
    lifted = [score(v, 0.5, 0.3, 9, fit=True) for v in range(10, 16)]
    mirror = score(1, 0.96)
    ranked = [*lifted, score(2, 0.6), mirror, score(3, 0.7)]
    best, rest = shortlist(ranked, 3, tuning.replace(cascade={"ssim_shortlist": 4}))
    assert [c.vec_id for c in best] == [10, 11, 12, 13, 1, 3]  # the 2 nearest by embedding: 1 and 3
    assert [c.vec_id for c in rest] == [14, 15, 2]
    off = tuning.replace(cascade={"ssim_shortlist": 4, "verify_embedding_top": 0})
    assert [c.vec_id for c in shortlist(ranked, 3, off)[0]] == [10, 11, 12, 13]


def test_present_keeps_the_related_and_describes_them_with_verdicts(tuning: Tuning) -> None:
    exact, copy, linked, unrelated = (
        score(1, 1.0, 1.0, 500, fit=True),
        score(2, 0.7, 1.0, 120, fit=True),
        CandidateScore(3, 0.3, 0.0, 0.0, 0, 0.2, via=2, linked=0.2),
        score(4, 0.2),
    )
    floor = tuning.replace(fusion={"min_score": 0.1})
    shown = kept([exact, copy, linked, unrelated], frozenset({1}), floor)
    assert [c.vec_id for c in shown] == [1, 2, 3]
    assert named(shown) == {1, 2, 3}
    records = {v: record(v) for v in (1, 2, 3, 4)}
    matches = describe([exact, copy, linked, unrelated], frozenset({1}), records, (640, 480), 5, tuning)
    assert [(m.id, m.verdict) for m in matches] == [("e1", "exact"), ("e2", "copy"), ("e3", "similar")]
    assert matches[0].score == 1.0 and matches[1].transform is not None and matches[1].transform.scale == 1.0
    assert matches[2].via == "e2" and matches[2].transform is None
    assert len(describe([exact, copy, linked], frozenset({1}), records, (640, 480), 2, tuning)) == 2
    assert [m.id for m in describe([exact, copy], frozenset({1}), {2: records[2]}, (640, 480), 5, tuning)] == [
        "e2"
    ]  # a candidate removed while ranking is left out


def record(vec_id: int) -> ImageRecord:
    return ImageRecord(vec_id, f"{vec_id:064x}", f"{vec_id:064x}", 640, 480, f"e{vec_id}", f"g/{vec_id}.jpg",
                       f"/g/{vec_id}.jpg", {})


# ------------------------------------------------------------------------------------- the search as a whole


@pytest.fixture
async def service(photos_service: Service) -> Service:
    return photos_service


def queries(photos: dict[str, np.ndarray], root: Path) -> Iterator[bytes]:
    for name in ["astronaut", "rocket", "coins", "coffee"]:
        rgb = photos[name]
        yield encode(crop(rgb, 0.6, 0.15))
        yield recompress(rotate90(crop(rgb, 0.7, 0.1)), 30)
        yield encode(np.ascontiguousarray(crop(rgb, 0.8, 0.1)[:, ::-1]))  # mirrored: the mirror check's job
        yield encode(resize(rgb, 0.25))
    yield (root / "g" / "chelsea.jpg").read_bytes()  # an exact match
    yield encode(np.random.default_rng(5).integers(0, 255, (240, 320, 3), dtype=np.uint8))  # nothing related


@pytest.mark.parametrize("two", [True, False], ids=["two-threads", "one-thread"])
async def test_one_thread_and_two_threads_rank_identically(
    service: Service, photos: dict[str, np.ndarray], two: bool
) -> None:
    """Where the work runs changes nothing: every id, every score, every read-out the same (both settings of
    ``embed_alongside`` against an explicit schedule of the other kind)."""
    tuning = service.tuning.replace(cascade={"embed_alongside": two})
    indexes, settings = service.indexes, service.settings
    default = Searcher(service.catalogue, indexes.vector, service.embedder, settings, indexes.local, tuning)
    other = Schedule.one_thread() if two else Schedule.two_threads()
    explicit = Searcher(service.catalogue, indexes.vector, service.embedder, settings, indexes.local, tuning, other)
    root = Path(str(service.settings.db)).parent
    try:
        for data in queries(photos, root):
            a_result, a_ranked = default.search_ranked(data)
            b_result, b_ranked = explicit.search_ranked(data)
            assert a_ranked == b_ranked
            assert a_result.model_dump(exclude={"took_ms"}) == b_result.model_dump(exclude={"took_ms"})
    finally:
        default.close()
        explicit.close()


class CountingCatalogue(Catalogue):
    """The real catalogue, recording which images each per-candidate read asked for."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.asked: dict[str, Counter[int]] = {k: Counter() for k in ("orb", "embedding", "gray", "record")}

    def _count(self, kind: str, vec_ids: Iterable[int]) -> list[int]:
        wanted = [int(v) for v in vec_ids]
        self.asked[kind].update(set(wanted))
        return wanted

    def orb_blobs_of(self, vec_ids: Iterable[int], batch: int = 1024) -> Iterator[tuple[int, bytes]]:
        return super().orb_blobs_of(self._count("orb", vec_ids), batch)

    def embeddings(
        self, vec_ids: Iterable[int] | None = None, batch: int = 4096
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return super().embeddings(None if vec_ids is None else self._count("embedding", vec_ids), batch)

    def grays_of(self, vec_ids: Iterable[int]) -> dict[int, bytes]:
        return super().grays_of(self._count("gray", vec_ids))

    def records(self, vec_ids: Iterable[int]) -> dict[int, ImageRecord]:
        return super().records(self._count("record", vec_ids))


async def test_a_search_reads_each_candidates_features_once(service: Service, photos: dict[str, np.ndarray]) -> None:
    catalogue = CountingCatalogue(service.settings.catalogue_path)
    searcher = Searcher(catalogue, service.indexes.vector, service.embedder, service.settings, service.indexes.local)
    root = Path(str(service.settings.db)).parent
    try:
        for data in queries(photos, root):
            for counts in catalogue.asked.values():
                counts.clear()
            _, ranked = searcher.search_ranked(data)
            assert all(n == 1 for counts in catalogue.asked.values() for n in counts.values()), catalogue.asked
            assert len(catalogue.asked["record"]) >= len(ranked)
    finally:
        searcher.close()
        catalogue.close()


# ------------------------------------------------------------------------------- the thresholds' benchmark


def thresholds_bench() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "thresholds.py"
    spec = importlib.util.spec_from_file_location("thresholds_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_thresholds_are_measured_with_the_search_stages(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    """bench/thresholds.py on a tiny set made in code: an edited and a mirrored copy among the other photos."""
    bench = thresholds_bench()
    dataset = tmp_path / "tiny"
    (dataset / "images").mkdir(parents=True)
    for name in NAMES:
        (dataset / "images" / f"{name}.jpg").write_bytes(encode(photos[name]))
    (dataset / "images" / "q-crop.jpg").write_bytes(encode(crop(photos["rocket"], 0.6, 0.2)))
    mirrored = np.ascontiguousarray(crop(photos["astronaut"], 0.8, 0.1)[:, ::-1])
    (dataset / "images" / "q-mirror.jpg").write_bytes(encode(mirrored))
    gt = {
        "gallery": [f"{name}.jpg" for name in NAMES],
        "queries": [
            {"query": "q-crop.jpg", "relevant": ["rocket.jpg"]},
            {"query": "q-mirror.jpg", "relevant": ["astronaut.jpg"]},
        ],
    }
    (dataset / "gt.json").write_text(json.dumps(gt))
    rows = await bench.measure(dataset, tmp_path / "work")
    assert len(rows) == 2 * len(NAMES)  # every gallery image is among the top 20 of a gallery this small
    by = {(r["query"], r["gallery"]): r for r in rows}
    assert by["q-crop.jpg", "rocket.jpg"]["inliers"] >= 25 and by["q-crop.jpg", "rocket.jpg"]["relevant"]
    assert by["q-mirror.jpg", "astronaut.jpg"]["mirror_inliers"] >= 25 and by["q-mirror.jpg", "astronaut.jpg"]["flip"]
    assert max(r["inliers"] for r in rows if not r["relevant"]) < 8
