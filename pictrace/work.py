"""The one bounded executor for CPU work (decode, embed, SSIM, ORB, index I/O).

The event loop only waits on it. Jobs beyond ``workers + queue_limit`` are refused at once with
OverloadedError (HTTP 503 + Retry-After) instead of piling up and taking memory and latency with them.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, ParamSpec, Protocol, TypeVar

from pictrace.errors import OverloadedError

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")


def one_openmp_thread() -> None:
    """OpenMP's thread count is per calling thread, so each worker sets its own: with 2 OpenMP threads per
    FAISS call, concurrent queries (or any other load) on 2 cores spin against each other; measured here, 26
    candidates' ratio matching took 4.6–5.1 s instead of 0.15–0.5 s on a busy machine."""
    import faiss

    faiss.omp_set_num_threads(1)


class WorkPool:
    def __init__(self, workers: int, queue_limit: int, initializer: Callable[[], object] | None = None) -> None:
        """``initializer`` runs once in each worker thread (per-thread library settings such as OpenMP's)."""
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="pictrace-cpu", initializer=initializer
        )
        self._capacity = workers + queue_limit
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def check_capacity(self) -> None:
        """Raise OverloadedError when the queue is full: lets a route refuse before it reads a large body."""
        if self._in_flight >= self._capacity:
            raise OverloadedError()

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on a worker thread, or raise OverloadedError when the queue is full."""
        self.check_capacity()
        return await self._submit(functools.partial(fn, *args, **kwargs))

    async def run_background(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Like run, but never refused: background ingest waits its turn instead of failing."""
        return await self._submit(functools.partial(fn, *args, **kwargs))

    async def _submit(self, job: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        future: Future[T] = self._executor.submit(job)
        # Count the job until it really ends: a cancelled request does not stop a job already running.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._finished))
        return await asyncio.wrap_future(future)

    def _finished(self) -> None:
        self._in_flight -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


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

    A single search is mostly sequential work that releases the GIL (onnxruntime, OpenCV, FAISS): the query's
    embedding runs here while the worker computes its ORB features, and then the two threads share the
    candidates' checks. Jobs run in the order submitted; nothing but admitted work is ever submitted, so it is
    bounded by the pool.
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
