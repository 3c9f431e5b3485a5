"""How uvicorn serves PicTrace: a connection limit, and time and size limits on what a client sends.

uvicorn on its own waits for a request's headers, and for its body, as long as the client likes: 30 clients
sending a byte a second each held a connection (and a request slot) forever. Here:

* ``max_connections`` bounds open connections and requests (uvicorn's ``limit_concurrency``: beyond
  it, new requests get 503 at once);
* a request's headers must arrive whole within ``header_timeout_s`` and ``max_header_bytes``
  (:class:`LimitedHttpProtocol`; 408 or 431, then the connection is closed);
* its body must arrive within ``body_timeout_s`` in total, with no pause longer than ``body_idle_s``
  (:class:`pictrace.web.limits.BodyTimeouts`; 408, then closed);
* an idle keep-alive connection is closed after ``keep_alive_s``.

On the Internet, put a reverse proxy in front as well (docs/security.md): it buffers slow clients' bodies, so
PicTrace's workers never wait on them at all.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pictrace.config import Settings
from pictrace.tuning import Serving


def limited_protocol(serving: Serving) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a deadline and a size cap on each request's headers."""

    class LimitedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes = 0
        _awaiting_headers = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_headers()

        def _await_headers(self) -> None:
            if self._awaiting_headers:
                return
            self._awaiting_headers = True
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(serving.header_timeout_s, self._refuse, 408, "Request Timeout")

        def _headers_done(self) -> None:
            self._awaiting_headers = False
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _refuse(self, status: int, reason: str) -> None:
            self._headers_done()
            if not self.transport.is_closing():
                self.transport.write(
                    f"HTTP/1.1 {status} {reason}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n".encode("ascii")
                )
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers:
                end = data.find(b"\r\n\r\n")  # a read may carry the body's first bytes too: not counted
                self._header_bytes += len(data) if end < 0 else end
                if self._header_bytes > serving.max_header_bytes:
                    self._refuse(431, "Request Header Fields Too Large")
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            self._await_headers()  # the next request on a kept-alive connection gets its own deadline
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._headers_done()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_done()
            super().connection_lost(exc)

    return LimitedHttpProtocol


def server_config(app: Any, settings: Settings, serving: Serving, **extra: Any) -> uvicorn.Config:
    """The uvicorn configuration PicTrace is served with (``python app.py``, and the tests' live server)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": limited_protocol(serving),
        "limit_concurrency": serving.max_connections,
        "timeout_keep_alive": serving.keep_alive_s,
        "backlog": serving.backlog,
        "log_level": "info",
    }
    options.update(extra)
    return uvicorn.Config(app, **options)
