"""Retrieval quality on a labelled set: index its gallery, search every query, score the ranked lists.

The ground-truth format is the one of the shared evaluation sets (and their ``score.py``)::

    {"gallery": [file names], "queries": [{"query": name, "relevant": [names]}, ...]}

Queries go through the very ``Service``/``Searcher`` the web app uses, so the numbers describe the product,
not a side implementation. The metrics follow ``score.py``'s rules: the query itself is removed from its own
list, unknown and repeated names are dropped, relevant images never returned count as misses.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pictrace.config import Settings
from pictrace.errors import EvalError
from pictrace.files import read_local_file
from pictrace.gallery import load_gallery
from pictrace.service import Service
from pictrace.tuning import Tuning


@dataclass(frozen=True)
class Query:
    name: str
    relevant: frozenset[str]


@dataclass(frozen=True)
class GroundTruth:
    gallery: tuple[str, ...]
    queries: tuple[Query, ...]

    @classmethod
    def load(cls, path: Path) -> GroundTruth:
        try:
            raw = json.loads(path.read_text())
            gallery = tuple(str(name) for name in raw["gallery"])
            queries = tuple(Query(str(q["query"]), frozenset(str(r) for r in q["relevant"])) for q in raw["queries"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EvalError(f"{path}: not a ground-truth file ({exc})") from exc
        if not gallery or not queries:
            raise EvalError(f"{path}: needs a non-empty gallery and query list")
        return cls(gallery, queries)


@dataclass(frozen=True)
class Metrics:
    """Means over all queries. ``ns`` (relevant images in the top 4) only when every query has 4 relevant."""

    queries: int
    map: float
    r1: float
    r5: float
    ns: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"queries": self.queries, "mAP": self.map, "R@1": self.r1, "R@5": self.r5, "N-S": self.ns}


def _clean(ranked: Sequence[str], query: str, gallery: frozenset[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for name in ranked:
        if name == query or name in seen or name not in gallery:
            continue
        seen.add(name)
        out.append(name)
    return out


def average_precision(ranked: Sequence[str], relevant: frozenset[str]) -> float:
    """AP normalised by the number of relevant images (so missing ones count as misses)."""
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for rank, name in enumerate(ranked, 1):
        if name in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


def score(gt: GroundTruth, results: Mapping[str, Sequence[str]]) -> Metrics:
    """mAP, R@1, R@5 and N-S of ranked lists ``{query: [gallery names, best first]}``."""
    gallery = frozenset(gt.gallery)
    top4 = {len(q.relevant - {q.name}) for q in gt.queries} == {4}
    aps, r1, r5, ns = [], 0, 0, 0
    for q in gt.queries:
        relevant = q.relevant - {q.name}
        ranked = _clean(results.get(q.name, []), q.name, gallery)
        aps.append(average_precision(ranked, relevant))
        r1 += any(n in relevant for n in ranked[:1])
        r5 += any(n in relevant for n in ranked[:5])
        ns += sum(n in relevant for n in ranked[:4])
    n = len(gt.queries)
    return Metrics(n, sum(aps) / n, r1 / n, r5 / n, ns / n if top4 else None)


@dataclass
class EvalReport:
    metrics: Metrics
    latency_ms: list[float] = field(default_factory=list)
    embed_ms: float = 0.0
    indexed: int = 0
    results: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, list[dict[str, object]]] = field(default_factory=dict)  # each match's component scores

    @property
    def p50_ms(self) -> float:
        return _percentile(self.latency_ms, 50)

    @property
    def p95_ms(self) -> float:
        return _percentile(self.latency_ms, 95)

    def summary(self) -> dict[str, object]:
        return {
            **self.metrics.as_dict(),
            "indexed": self.indexed,
            "search_p50_ms": round(self.p50_ms, 2),
            "search_p95_ms": round(self.p95_ms, 2),
            "embed_one_ms": round(self.embed_ms, 2),
        }

    def text(self) -> str:
        m = self.metrics
        ns = f"{m.ns:.3f} / 4" if m.ns is not None else "n/a"
        return (
            f"queries {m.queries}, gallery {self.indexed}\n"
            f"mAP   {m.map:.4f}\nR@1   {m.r1:.4f}\nR@5   {m.r5:.4f}\nN-S   {ns}\n"
            f"search p50 {self.p50_ms:.1f} ms, p95 {self.p95_ms:.1f} ms "
            f"(embedding one image alone: {self.embed_ms:.1f} ms)"
        )


def _percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * pct / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _write_gallery_file(gt: GroundTruth, images: Path, workdir: Path) -> Path:
    """A db.json naming each gallery image by its file name, with paths relative to the db.json."""
    entries = [{"id": name, "url": os.path.relpath(images / name, workdir)} for name in gt.gallery]
    db = workdir / "db.json"
    db.write_text(json.dumps(entries))
    return db


def _embed_one_ms(service: Service, data: bytes, repeats: int = 3) -> float:
    """Median time of embedding one decoded image: the yardstick search latency is compared with."""
    from pictrace.decode import decode_image

    draft = service.tuning.decoding.draft_min_side
    rgb = decode_image(data, max_pixels=service.settings.max_pixels, draft_min_side=draft).rgb
    service.embedder.embed([rgb])  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        service.embedder.embed([rgb])
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def run_eval(
    gt_path: Path,
    settings: Settings,
    images: Path | None = None,
    on_query: Callable[[int, int], None] | None = None,
    *,
    tuning: Tuning | None = None,
) -> EvalReport:
    """Index the gallery of ``gt_path`` into a throw-away data dir and search every query against it.

    Each query is an ordinary search (the default ``top_k``, so its latency is a client's) whose ranked list is
    taken whole, shown or not (``Searcher.search_ranked``), so that every image the searcher ranks
    counts; images it does not return at all are misses, as in ``score.py``.
    """
    gt = GroundTruth.load(gt_path)
    images = images or gt_path.parent / "images"
    with tempfile.TemporaryDirectory(prefix="pictrace-eval-") as tmp:
        workdir = Path(tmp)
        db = _write_gallery_file(gt, images.resolve(), workdir)
        run_settings = settings.model_copy(update={"data_dir": workdir / "data", "index_on_start": False})
        service = await Service.start(run_settings, tuning=tuning)
        try:
            ingest = await service.ingestor.ingest_gallery(load_gallery(db))
            if ingest.failed:
                first = ingest.failed[0]
                raise EvalError(f"{len(ingest.failed)} gallery images failed, e.g. {first.url}: {first.reason}")
            report = EvalReport(metrics=score(gt, {}), indexed=service.catalogue.counts()[0])
            embed_samples: list[float] = []
            for i, q in enumerate(gt.queries):
                data = read_local_file(images / q.name, run_settings.max_upload_bytes)
                if i % 10 == 0:  # sampled through the run, so load changes hit both figures alike
                    embed_samples.append(await service.pool.run_background(_embed_one_ms, service, data))
                started = time.perf_counter()
                result, ranked = await service.pool.run_background(service.searcher.search_ranked, data)
                report.latency_ms.append((time.perf_counter() - started) * 1000)
                report.results[q.name] = ranked
                report.details[q.name] = [{"id": m.id, **m.scores.model_dump()} for m in result.results]
                if on_query is not None:
                    on_query(i + 1, len(gt.queries))
            report.metrics = score(gt, report.results)
            report.embed_ms = statistics.median(embed_samples)
            return report
        finally:
            await service.close()
