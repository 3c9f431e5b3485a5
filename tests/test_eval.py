"""The eval command: metrics that follow score.py's rules, and an end-to-end run on a set made in code."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import crop, encode, recompress, rotate90

from pictrace.cli import main
from pictrace.config import Settings
from pictrace.errors import EvalError
from pictrace.eval import GroundTruth, Query, average_precision, run_eval, score

# The shared evaluation data sits next to the checkout (or next to the worktrees folder); never in the repo.
_ROOT = Path(__file__).resolve().parents[1]
SHARED_SMVS = next(
    (
        p
        for p in (r / "shared" / "eval" / "smvs-dvd-a" / "gt.json" for r in (_ROOT.parent, _ROOT.parent.parent))
        if p.is_file()
    ),
    _ROOT / "missing",
)


def _toy_gt() -> GroundTruth:
    gallery = ("a1", "a2", "a3", "b1", "b2", "b3", "c1", "c2", "c3")
    queries = tuple(Query(name, frozenset(n for n in gallery if n[0] == name[0] and n != name)) for name in gallery)
    return GroundTruth(gallery, queries)


def test_perfect_ranker_scores_one_and_reversed_does_not() -> None:
    gt = _toy_gt()
    perfect = {q.name: sorted(gt.gallery, key=lambda n: (n not in q.relevant and n != q.name, n)) for q in gt.queries}
    best = score(gt, perfect)
    assert (best.map, best.r1, best.r5) == (1.0, 1.0, 1.0)
    worst = score(gt, {q: list(reversed(ranked)) for q, ranked in perfect.items()})
    assert worst.map < 0.5 and worst.r1 == 0.0
    assert score(gt, {}).map == 0.0  # a query with no results is a complete miss


def test_metrics_follow_score_py_rules() -> None:
    rel = frozenset({"x", "y"})
    assert average_precision(["x", "n", "y"], rel) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(["x"], rel) == pytest.approx(0.5)  # a relevant image never returned is a miss
    gt = GroundTruth(("q", "x", "y", "n"), (Query("q", rel),))
    # The query itself, unknown names and repeats are dropped before ranking.
    cleaned = score(gt, {"q": ["q", "zzz", "x", "x", "y"]})
    assert cleaned.map == 1.0 and cleaned.r1 == 1.0
    assert cleaned.ns is None  # N-S needs exactly 4 relevant per query


def test_ns_counts_relevant_in_top_four() -> None:
    gallery = ("q", "r1", "r2", "r3", "r4", "n1")
    gt = GroundTruth(gallery, (Query("q", frozenset({"r1", "r2", "r3", "r4"})),))
    assert score(gt, {"q": ["r1", "n1", "r2", "r3", "r4"]}).ns == 3


def test_bad_ground_truth_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text('{"gallery": []}')
    with pytest.raises(EvalError):
        GroundTruth.load(path)


def _write_set(root: Path, photos: dict[str, np.ndarray]) -> Path:
    """Three photos, each as an original plus two edited copies: every image's relevant ones are the other two."""
    images = root / "images"
    images.mkdir()
    edits: dict[str, Callable[[np.ndarray], bytes]] = {
        "orig": encode,
        "crop": lambda rgb: encode(crop(rgb, 0.65, 0.12)),
        "rot-q40": lambda rgb: recompress(rotate90(rgb), 40),
    }
    gallery = []
    for name in ("astronaut", "coffee", "rocket"):
        for edit, make in edits.items():
            (images / f"{name}-{edit}.jpg").write_bytes(make(photos[name]))
            gallery.append(f"{name}-{edit}.jpg")
    queries = [
        {"query": n, "relevant": [m for m in gallery if m.split("-")[0] == n.split("-")[0] and m != n]} for n in gallery
    ]
    gt = root / "gt.json"
    gt.write_text(json.dumps({"gallery": gallery, "queries": queries}))
    return gt


async def test_eval_runs_every_query_through_the_searcher(
    tmp_path: Path, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> None:
    gt = _write_set(tmp_path, photos)
    settings = make_settings()
    report = await run_eval(gt, settings)
    assert report.indexed == 9
    assert set(report.results) == set(GroundTruth.load(gt).gallery)
    assert report.metrics.map >= 0.9 and report.metrics.r1 == 1.0
    assert len(report.latency_ms) == 9 and report.p50_ms > 0 and report.embed_ms > 0
    assert not settings.data_dir.exists()  # the index was a throw-away one


def test_eval_command_writes_score_py_results(
    tmp_path: Path, photos: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    gt = _write_set(tmp_path, photos)
    out = tmp_path / "results.json"
    monkeypatch.chdir(tmp_path)  # no developer .env
    assert main(["eval", str(gt), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mAP"] >= 0.9 and summary["search_p50_ms"] > 0
    results = json.loads(out.read_text())
    assert results["coffee-orig.jpg"][0] == "coffee-orig.jpg"  # the query itself: an exact hit
    assert set(results["coffee-orig.jpg"][1:3]) == {"coffee-crop.jpg", "coffee-rot-q40.jpg"}


@pytest.mark.skipif(not SHARED_SMVS.is_file(), reason="shared evaluation data not present on this machine")
def test_ground_truth_of_the_shared_set_loads() -> None:
    gt = GroundTruth.load(SHARED_SMVS)
    assert len(gt.gallery) == 250 and all(len(q.relevant) == 4 for q in gt.queries)
