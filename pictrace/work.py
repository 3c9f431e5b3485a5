"""The one bounded executor for CPU work (decode, embed, SSIM, ORB, index I/O).

The event loop only waits on it. Jobs beyond ``workers + queue_limit`` are refused at once with
OverloadedError (HTTP 503 + Retry-After) instead of piling up and taking memory and latency with them.

A job may split its own work (one search verifying its candidates) over ``split_threads`` helper threads with
:meth:`WorkPool.map`: FAISS and OpenCV release the GIL, so a lone query uses both cores. The helpers are a
fixed-size pool of their own, so the total number of threads stays bounded (``workers + split_threads``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from pictrace.errors import OverloadedError

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")

# what a job uses to spread its own work: WorkPool.map, or ``serial`` where there is no pool (tests, scripts)
ParallelMap = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


def serial(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return [fn(x) for x in items]


class WorkPool:
    def __init__(self, workers: int, queue_limit: int, split_threads: int = 1) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pictrace-cpu")
        self._split = (
            ThreadPoolExecutor(max_workers=split_threads, thread_name_prefix="pictrace-split")
            if split_threads > 1
            else None
        )
        self._capacity = workers + queue_limit
        self._in_flight = 0

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]``, spread over the split threads (called from inside a job, in order)."""
        if self._split is None or len(items) < 2:
            return [fn(x) for x in items]
        return list(self._split.map(fn, items))

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
        if self._split is not None:
            self._split.shutdown(wait=True, cancel_futures=True)
