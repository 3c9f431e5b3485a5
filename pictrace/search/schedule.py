"""Where a search's work runs: the worker thread that admitted it, and one side thread beside it.

A single search is mostly sequential work that releases the GIL (onnxruntime, OpenCV, FAISS), so one query can
use both cores: onnxruntime's two threads embed one image only ~1.4x faster than one, so the local-feature half
of the search, which needs no embedding, fits largely beside it (docs/quality.md, "Two threads for one
query"). This module is the only one that knows what runs where; the stages only ever see a ``MapEach`` and
results to wait for, and this module knows nothing of how candidates are ranked:

* ``QueryJobs``: the query's pixel hash, embedding, inner picture and SSIM reference go to the side thread in
  that order (its queue is first in, first out) while the worker extracts the query's ORB features, collects
  the votes and screens and checks the voted candidates; the mirrored query's ORB goes there later, beside the
  shortlist's SSIM.
* ``Schedule.map``: everything mapped over candidates (vote lookups, screens, full checks, SSIM, mirror
  matches) is shared by both threads, each taking the next item.

``Schedule.one_thread()`` runs the same jobs on the calling thread, in the order their results are wanted:
the same answers, which tests/test_search_stages.py holds it to.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from pictrace.features.embed import Embedder
from pictrace.features.hashing import pixel_sha256
from pictrace.features.inner import InnerQuery, inner_query
from pictrace.features.orb import OrbFeatures
from pictrace.features.ssim import SsimReference, gray256
from pictrace.matching.mirror import mirrored_orb
from pictrace.tuning import Tuning
from pictrace.work import one_openmp_thread

T = TypeVar("T")
R = TypeVar("R")


class MapEach(Protocol):
    """``[fn(x) for x in items]``, run however the caller chooses (``map_serial``, ``SideThread.map``)."""

    def __call__(self, fn: Callable[[T], R], items: Sequence[T], /) -> list[R]: ...


def map_serial(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``SideThread.map`` without the side thread."""
    return [fn(x) for x in items]


class SideJob(Generic[T]):
    """A job handed to the side thread, which the caller takes back and runs itself if it has not started.

    Concurrent searches share the side thread; when another search's embedding holds it, waiting there would
    be slower than doing the job here.
    """

    def __init__(self, job: Callable[[], T], side: SideThread | None) -> None:
        self._job = job
        self._future = None if side is None else side.submit(job)

    def result(self) -> T:
        if self._future is None or self._future.cancel():
            return self._job()
        return self._future.result()


class SideThread:
    """One more thread for a job the pool already admitted, so that one search can use both cores.

    Jobs run in the order submitted; nothing but admitted work is ever submitted, so it is bounded by the pool.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="pictrace-side", initializer=one_openmp_thread
        )

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        return self._executor.submit(fn)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]``, computed by the calling thread and this one, each taking the next item.

        The side thread joins once it is free (after an embedding still running, say); if it never gets to
        start, the caller has done everything.
        """
        if len(items) < 2:
            return [fn(x) for x in items]
        results: list[R | None] = [None] * len(items)
        tickets = itertools.count()  # next() on it is atomic under the GIL: each item is taken once

        def drain() -> None:
            for i in tickets:
                if i >= len(items):
                    return
                results[i] = fn(items[i])

        helper = self._executor.submit(drain)
        drain()
        if not helper.cancel():
            helper.result()
        return results  # type: ignore[return-value]  # every slot was filled by one of the two drains

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Schedule:
    """Both threads (a side thread of its own), or the calling thread alone (``one_thread``)."""

    def __init__(self, side: SideThread | None) -> None:
        self._side = side

    @classmethod
    def two_threads(cls) -> Schedule:
        return cls(SideThread())

    @classmethod
    def one_thread(cls) -> Schedule:
        return cls(None)

    @classmethod
    def for_tuning(cls, tuning: Tuning) -> Schedule:
        """Both threads, or one (``cascade.embed_alongside``)."""
        return cls.two_threads() if tuning.cascade.embed_alongside else cls.one_thread()

    def beside(self, job: Callable[[], T]) -> SideJob[T]:
        """Run ``job`` beside the caller (one thread: when its result is first wanted)."""
        return SideJob(job, self._side)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]``, shared by both threads when there are two."""
        return map_serial(fn, items) if self._side is None else self._side.map(fn, items)

    def query_jobs(
        self, rgb: np.ndarray, embedder: Embedder, tuning: Tuning, decoded_scale: float = 1.0
    ) -> QueryJobs:
        """Start the query's features that the worker's first steps do without (see the module docstring)."""
        pixel_hash = self.beside(lambda: pixel_sha256(rgb))
        embedding = self.beside(lambda: embedder.embed([rgb])[0])
        inner = self.beside(lambda: inner_query(rgb, embedder, tuning.inner))  # wanted right after the embedding
        return QueryJobs(
            pixel_hash,
            embedding,
            self.beside(lambda: SsimReference(gray256(rgb))),
            lambda: self.beside(lambda: mirrored_orb(rgb, tuning, decoded_scale)),
            inner,
        )

    def close(self) -> None:
        if self._side is not None:
            self._side.shutdown()


@dataclass(frozen=True)
class QueryJobs:
    """One query's features computed beside the worker; ``result()`` waits for one (or computes it)."""

    pixel_hash: SideJob[str]
    embedding: SideJob[np.ndarray]
    ssim_reference: SideJob[SsimReference]
    start_mirrored_orb: Callable[[], SideJob[OrbFeatures]]  # started only when a candidate needs it
    inner: SideJob[InnerQuery | None]  # the picture inside the query (a screenshot's), with its embedding
