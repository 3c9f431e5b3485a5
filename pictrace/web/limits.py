"""Limits on a request body enforced while it arrives: its size (a huge upload is refused before it is all
read) and its time (a client sending a byte a second is dropped, not waited on)."""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pictrace.errors import TooLargeError
from pictrace.tuning import Serving


class _BodyTimeoutError(Exception):
    """Raised out of ``receive`` to the middleware that set the deadline (never seen by the routes' handlers)."""


class BodyTimeouts:
    """A body must arrive within ``body_timeout_s`` in all, with no pause over ``body_idle_s``; else 408 and the
    connection is closed. Only the body's arrival is timed: once it is complete, waiting is the app's business."""

    def __init__(self, app: ASGIApp, serving: Serving) -> None:
        self.app = app
        self.total_s = serving.body_timeout_s
        self.idle_s = serving.body_idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s
        complete = False
        started = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            wait = min(self.idle_s, deadline - loop.time())
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimeoutError from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, watched_send)
        except _BodyTimeoutError:
            if started:
                raise
            await _answer(send, 408, "the request body did not arrive in time")


class BodySizeLimit:
    """Refuses bodies over ``max_bytes``: at once from Content-Length, else as soon as the count passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise TooLargeError(f"request body is larger than the {self.max_bytes}-byte limit")
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, send: Send) -> None:
        await _answer(send, 413, f"request body is larger than the {self.max_bytes}-byte limit")


async def _answer(send: Send, status: int, detail: str) -> None:
    """A JSON error, closing the connection (the rest of the body is never read)."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
