"""The one bounded executor for CPU work (decode, embed, SSIM, ORB, index I/O).

The event loop only waits on it. Jobs beyond ``workers + queue_limit`` are refused at once with
OverloadedError (HTTP 503 + Retry-After) instead of piling up and taking memory and latency with them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from pictrace.errors import OverloadedError

P = ParamSpec("P")
T = TypeVar("T")


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

