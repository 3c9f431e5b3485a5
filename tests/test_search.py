"""Search finds edited copies of a gallery image first, with honest component scores."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import crop, encode, recompress, resize, rotate90

from pictrace.config import Settings
from pictrace.errors import DecodeError, UnsupportedFormatError
from pictrace.gallery import load_gallery
from pictrace.schemas import Match
from pictrace.service import Service

NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick"]


@pytest.fixture
async def service(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> AsyncIterator[Service]:
    settings = make_settings()
    (tmp_path / "g").mkdir()
    entries = []
    for name in NAMES:
        (tmp_path / "g" / f"{name}.jpg").write_bytes(encode(photos[name]))
        entries.append({"id": name, "url": f"g/{name}.jpg"})
    settings.db.write_text(json.dumps(entries))
    svc = await Service.start(settings)
    report = await svc.ingestor.ingest_gallery(load_gallery(settings.db))
    assert report.added == len(NAMES)
    yield svc
    await svc.close()


EDITS: dict[str, Callable[[np.ndarray], bytes]] = {
    "crop": lambda rgb: encode(crop(rgb, 0.6, 0.15)),
    "rotate90": lambda rgb: encode(rotate90(rgb)),
    "jpeg-q30": lambda rgb: recompress(rgb, 30),
    "quarter-size": lambda rgb: encode(resize(rgb, 0.25)),
    "crop-rotate-q30": lambda rgb: recompress(rotate90(crop(rgb, 0.7, 0.1)), 30),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket"])
async def test_edited_copy_is_found_first(
    service: Service, photos: dict[str, np.ndarray], edit: str, name: str
) -> None:
    result = service.searcher.search_bytes(EDITS[edit](photos[name]))
    best = result.results[0]
    assert best.id == name, [(m.id, m.score) for m in result.results]
    assert not best.exact
    assert best.scores.orb_inliers >= service.tuning.check.min_inliers
    if len(result.results) > 1:
        assert best.score > result.results[1].score


async def test_exact_bytes_hit_is_first_with_full_score(service: Service, tmp_path: Path) -> None:
    data = (tmp_path / "g" / "coffee.jpg").read_bytes()
    result = service.searcher.search_bytes(data)
    assert result.results[0].id == "coffee"
    assert result.results[0].exact and result.results[0].score == 1.0
    assert result.query.sha256 == result.results[0].sha256


async def test_same_pixels_other_encoding_is_exact(service: Service, tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / "g" / "rocket.jpg").convert("RGB"))
    result = service.searcher.search_bytes(encode(pixels, "PNG"))
    assert result.results[0].id == "rocket" and result.results[0].exact
    _assert_identity_fit(service, result.results[0])


async def test_a_re_upload_is_the_identity_with_every_keypoint_agreeing(service: Service, tmp_path: Path) -> None:
    """Exact matches skip the full ORB check (geometry.identical_fit): its answer must be what the check finds."""
    from PIL import Image

    from pictrace.features.extract import orb_of
    from pictrace.features.orb import OrbFeatures
    from pictrace.matching.geometry import fit_geometry, identical_fit

    result = service.searcher.search_bytes((tmp_path / "g" / "coffee.jpg").read_bytes())
    _assert_identity_fit(service, result.results[0])
    (vec_id,) = service.catalogue.vec_ids_by_hash(result.results[0].sha256, "")
    ((_, blob),) = service.catalogue.orb_blobs_of([vec_id])
    stored = OrbFeatures.from_bytes(blob)
    pixels = np.asarray(Image.open(tmp_path / "g" / "coffee.jpg").convert("RGB"))
    checked = fit_geometry(orb_of(pixels, service.tuning), stored, service.tuning)
    shortcut = identical_fit(stored)
    assert (checked.score, checked.inliers) == (shortcut.score, shortcut.inliers)
    assert checked.homography is not None and shortcut.homography is not None
    # the stored keypoints are fixed-point (ORB2, within 0.005 px here): the fit places the corners where the
    # identity does, to a small fraction of a pixel
    h, w = pixels.shape[:2]
    corners = np.array([[[0, 0]], [[w, 0]], [[w, h]], [[0, h]]], dtype=np.float64) * stored.scale
    fitted = cv2.perspectiveTransform(corners, checked.homography)
    assert float(np.abs(fitted - cv2.perspectiveTransform(corners, shortcut.homography)).max()) < 0.25


def _assert_identity_fit(service: Service, match: Match) -> None:
    from pictrace.features.orb import OrbFeatures

    (vec_id,) = service.catalogue.vec_ids_by_hash(match.sha256, "")
    ((_, blob),) = service.catalogue.orb_blobs_of([vec_id])
    assert match.exact and match.scores.orb == 1.0
    assert match.scores.orb_inliers == len(OrbFeatures.from_bytes(blob)) > 100
    assert match.transform is not None
    assert match.transform.scale == 1.0 and match.transform.rotation == 0.0 and not match.transform.flip
    assert match.transform.crop_fraction == 1.0 and match.transform.perspective == 0.0


async def test_result_shape_and_top_k(service: Service, photos: dict[str, np.ndarray]) -> None:
    result = service.searcher.search_bytes(encode(photos["chelsea"]), top_k=3)
    assert 1 <= len(result.results) <= 3  # unrelated photos are not shown at all
    assert result.results[0].id == "chelsea"
    scores = [m.score for m in result.results]
    assert scores == sorted(scores, reverse=True)
    for match in result.results:
        assert 0.0 <= match.score <= 1.0
        for value in (match.scores.embedding, match.scores.ssim, match.scores.orb):
            assert 0.0 <= value <= 1.0
        assert match.thumbnail_url == f"/api/images/{match.sha256}/thumbnail"
    assert result.took_ms > 0


async def test_unrelated_images_get_no_geometric_support(service: Service) -> None:
    noise = np.random.default_rng(3).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    result = service.searcher.search_bytes(encode(noise))
    assert all(m.scores.orb == 0.0 for m in result.results)
    assert all(m.score < 0.5 for m in result.results)
    assert result.results == []  # and they are unrelated, so not shown


async def test_bad_query_bytes_raise_typed_errors(service: Service) -> None:
    with pytest.raises(UnsupportedFormatError):
        service.searcher.search_bytes(b"hello, not an image")
    with pytest.raises(DecodeError):
        service.searcher.search_bytes(encode(np.zeros((64, 64, 3), np.uint8))[:200])


async def test_worker_threads_run_faiss_on_one_openmp_thread(service: Service) -> None:
    """OpenMP settings are per thread: the workers that run searches must set their own (see service.py)."""
    import faiss

    counts = await asyncio.gather(*(service.pool.run(faiss.omp_get_max_threads) for _ in range(8)))
    assert set(counts) == {1}


async def test_search_with_the_embedding_alongside_ranks_as_one_thread_does(
    service: Service, photos: dict[str, np.ndarray]
) -> None:
    """The side thread only changes where the work runs: every score and every rank stay the same."""
    from pictrace.search import Searcher

    one_thread = service.tuning.replace(cascade={"embed_alongside": False})
    indexes = service.indexes
    serial = Searcher(service.catalogue, indexes.vector, service.embedder, service.settings, indexes.local, one_thread)
    assert service.tuning.cascade.embed_alongside
    try:
        for name in ["astronaut", "rocket", "coins"]:
            for edit in ["crop", "crop-rotate-q30"]:
                data = EDITS[edit](photos[name])
                alongside, ranked = service.searcher.search_ranked(data)
                alone, ranked_alone = serial.search_ranked(data)
                assert ranked == ranked_alone
                assert alongside.results == alone.results
                assert alongside.results[0].id == name
    finally:
        serial.close()


@pytest.mark.parametrize("name", ["astronaut", "rocket"])
async def test_mirrored_copy_is_found_with_the_mirror_pass_on_the_side_thread(
    service: Service, photos: dict[str, np.ndarray], name: str
) -> None:
    """The mirrored query's ORB is extracted on the side thread while the shortlist's SSIM runs: a mirrored
    crop is still found first as a flip, with the same answer as on one thread."""
    from pictrace.search import Searcher

    data = encode(np.ascontiguousarray(crop(photos[name], 0.8, 0.1)[:, ::-1]))
    one_thread = service.tuning.replace(cascade={"embed_alongside": False})
    indexes = service.indexes
    serial = Searcher(service.catalogue, indexes.vector, service.embedder, service.settings, indexes.local, one_thread)
    try:
        alongside, ranked = service.searcher.search_ranked(data)
        alone, ranked_alone = serial.search_ranked(data)
    finally:
        serial.close()
    best = alongside.results[0]
    assert best.id == name and best.transform is not None and best.transform.flip
    assert best.scores.orb_inliers >= service.tuning.verdicts.copy_min_inliers
    assert (ranked, alongside.results) == (ranked_alone, alone.results)


async def test_concurrent_searches_sharing_the_side_thread_answer_as_one_at_a_time(
    service: Service, photos: dict[str, np.ndarray]
) -> None:
    queries = [EDITS[edit](photos[name]) for name in ["astronaut", "coffee", "rocket"] for edit in ["crop", "jpeg-q30"]]
    one_at_a_time = [service.searcher.search_ranked(q)[1] for q in queries]
    together = await asyncio.gather(*(service.pool.run(service.searcher.search_ranked, q) for q in queries))
    assert [ranked for _, ranked in together] == one_at_a_time
