"""The pixel budget: how many pixels may be decoded at once, across requests.

The CPU pool bounds work by count, but one 50 MP PNG (146 KB on the wire) costs ~150 MB of pixels and a second
of CPU, a phone photo a hundredth of that: 32 clients sending the former took search p50 to 12 s and RSS to
1.45 GB. So before a request's decode is queued, its cost is read from the header (``decode_cost``) and held
against ``budget_pixels``: large images take turns, small ones pass beside them. The wait is on the event loop,
holding no worker; beyond ``max_waiting`` waiters a request gets 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from pictrace.errors import OverloadedError


class PixelBudget:
    def __init__(self, budget_pixels: int, max_waiting: int) -> None:
        self._budget = budget_pixels
        self._max_waiting = max_waiting
        self._used = 0
        self._waiting = 0
        self._changed: asyncio.Condition | None = None  # made on first use, on the serving loop

    @property
    def used(self) -> int:
        return self._used

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """``pixels`` of the budget while the block runs (an image larger than the budget gets all of it)."""
        pixels = max(1, min(pixels, self._budget))
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        async with changed:
            if self._used + pixels > self._budget:
                if self._waiting >= self._max_waiting:
                    raise OverloadedError("too many large images are being decoded; retry later", retry_after_s=2)
                self._waiting += 1
                try:
                    await changed.wait_for(lambda: self._used + pixels <= self._budget)
                finally:
                    self._waiting -= 1
            self._used += pixels
        try:
            yield
        finally:
            async with changed:
                self._used -= pixels
                changed.notify_all()
