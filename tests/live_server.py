"""The real app served by uvicorn on 127.0.0.1 in a thread: for tests that need real sockets and concurrency.

TestClient runs the app in-process and reads whole bodies first; these tests must see what a network client
sees (a 413 before the body is sent, a 503 while other requests are still running).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from pictrace.config import Settings
from pictrace.tuning import Tuning
from pictrace.web import create_app
from pictrace.web.serving import server_config


@dataclass
class Live:
    app: FastAPI
    base: str
    port: int
    loop: asyncio.AbstractEventLoop

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


@contextlib.contextmanager
def live_server(settings: Settings, timeout: float = 60, tuning: Tuning | None = None) -> Iterator[Live]:
    """The app as ``python app.py`` serves it (pictrace/web/serving.py's limits), on a free port."""
    tuning = tuning or Tuning()
    app = create_app(settings, tuning=tuning)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        server_config(app, settings, tuning.serving, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: loop.run_until_complete(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield Live(app, f"http://127.0.0.1:{port}", port, loop)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        loop.close()
        sock.close()
