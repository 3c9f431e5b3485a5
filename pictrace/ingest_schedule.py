"""Where an ingest's work runs on the shared pool: per-image jobs and batch jobs, later batches overlapping
earlier ones, so that both cores stay busy from the first image to the last.

An ingest is a stream of batches. Each batch has an *early* part, run for up to ``ahead`` batches at once (its
per-image jobs, then one batched job), and a *late* part, run one batch at a time in the order the batches
came: the late part of batch k starts once batch k-1's late part is over. Whatever the number of threads, each
late part therefore sees exactly the state its predecessors left, which is what makes an ingest give the same
results with one worker or two. Decoding (PIL), OpenCV, zlib, onnxruntime and FAISS release the GIL, so the
pool's threads are enough to fill the cores (docs/scaling.md, "Ingest speed").

Per-image jobs of all batches together hold at most ``width`` of the pool's slots and the batched jobs one, so a
search arriving during an ingest waits behind a few images' work and one embedding, never behind a whole queue.
This module knows nothing of what the jobs compute.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, ParamSpec, TypeVar

from pictrace.work import WorkPool

B = TypeVar("B")
E = TypeVar("E")
T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


class IngestSchedule(Generic[B, E]):
    def __init__(self, pool: WorkPool, *, width: int, ahead: int) -> None:
        """``width``: per-image jobs on the pool at once (all batches together); ``ahead``: batches in flight."""
        self._pool = pool
        self._slots = asyncio.Semaphore(max(1, width))
        self._batched = asyncio.Semaphore(1)
        self._ahead = max(1, ahead)

    async def one(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """One job on the pool (a batch's commit)."""
        return await self._pool.run_background(fn, *args, **kwargs)

    async def batched(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A batch's own job in its early part (the embedding), one at a time: it already uses both cores, so
        two at once would finish no sooner and only keep a search waiting behind both."""
        async with self._batched:
            return await self._pool.run_background(fn, *args, **kwargs)

    async def each(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]``, each item a job of its own on the pool; results in the items' order."""

        async def job(item: T) -> R:
            async with self._slots:
                return await self._pool.run_background(fn, item)

        return list(await asyncio.gather(*(job(item) for item in items)))

    async def flow(
        self,
        batches: AsyncIterator[B],
        early: Callable[[B], Awaitable[E]],
        late: Callable[[E], Awaitable[None]],
    ) -> None:
        """Run ``early`` then ``late`` for every batch: ``early`` for up to ``ahead`` batches at once, ``late``
        strictly in the batches' order, one at a time. The first error cancels the batches in flight (jobs
        already running on the pool finish) and is raised."""
        window = asyncio.Semaphore(self._ahead)
        loop = asyncio.get_running_loop()

        async def one_batch(batch: B, before: asyncio.Future[None] | None, over: asyncio.Future[None]) -> None:
            try:
                result = await early(batch)
                if before is not None:
                    await before
                await late(result)
                over.set_result(None)
            except BaseException:
                over.cancel()  # the batches after it stop at once instead of waiting for it
                raise
            finally:
                window.release()

        before: asyncio.Future[None] | None = None
        try:
            async with asyncio.TaskGroup() as group:
                async for batch in batches:
                    await window.acquire()
                    over: asyncio.Future[None] = loop.create_future()
                    group.create_task(one_batch(batch, before, over))
                    before = over
        except BaseExceptionGroup as failed:  # the first error as it was raised: callers handle it by its type
            raise failed.exceptions[0] from None
