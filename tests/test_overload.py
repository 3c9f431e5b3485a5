"""Overload against the real app under uvicorn: a full CPU queue answers 503 + Retry-After at once, the other
requests are 200, and /api/health stays fast because the event loop never runs CPU work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ImageServer, crop, encode
from live_server import Live, live_server

from pictrace.config import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings(
    image_server: ImageServer, photos: dict[str, np.ndarray], make_settings: Callable[..., Settings]
) -> Settings:
    settings = make_settings(index_on_start=True, workers=1, queue_limit=1, api_token="t")
    names = ("coffee", "rocket", "astronaut")
    settings.db.write_text(
        json.dumps([{"id": n, "url": image_server.add(f"g/{n}.jpg", encode(photos[n]))} for n in names])
    )
    return settings


def wait_indexed(live: Live, n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        images = httpx.get(live.url("/api/health")).json()["images"]
        if images["indexed"] >= n and images["pending"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("gallery not indexed")


def test_full_queue_answers_503_at_once(settings: Settings, photos: dict[str, np.ndarray]) -> None:
    query = encode(crop(photos["rocket"]))
    with live_server(settings) as live:
        wait_indexed(live, 3)
        pool = live.app.state.service.pool
        gate = threading.Event()
        # occupy the one worker and the one queue slot with jobs that wait on the gate
        held = [asyncio.run_coroutine_threadsafe(pool.run_background(gate.wait, 30), live.loop) for _ in range(2)]
        try:
            deadline = time.monotonic() + 5
            while pool.in_flight < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with httpx.Client(base_url=live.base, timeout=10) as client:
                for _ in range(5):
                    started = time.perf_counter()
                    response = client.post("/api/search", files={"file": ("q.jpg", query, "image/jpeg")})
                    took = time.perf_counter() - started
                    assert response.status_code == 503, response.text
                    assert int(response.headers["retry-after"]) >= 1
                    assert response.json()["detail"]
                    assert took < 1.0, f"503 took {took:.2f}s: it waited instead of refusing"
                    started = time.perf_counter()
                    assert client.get("/api/health").status_code == 200
                    assert time.perf_counter() - started < 1.0
                # writes go through the same pool: refused the same way
                response = client.post(
                    "/api/images",
                    files={"file": ("a.jpg", query, "image/jpeg")},
                    headers={"Authorization": "Bearer t"},
                )
                assert response.status_code == 503 and response.headers["retry-after"], response.text
                assert pool.in_flight == 2
            # refused before the upload is read: the server answers while most of the body is still unsent
            with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
                sock.sendall(
                    b"POST /api/search HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 900000\r\n\r\n--b\r\n"
                )
                head = sock.recv(65536)
                assert head.startswith(b"HTTP/1.1 503"), head[:200]
                assert b"retry-after" in head.lower()
        finally:
            gate.set()
            for future in held:
                future.result(10)
        with httpx.Client(base_url=live.base, timeout=30) as client:
            response = client.post("/api/search", files={"file": ("q.jpg", query, "image/jpeg")})
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["id"] == "rocket"


@contextlib.contextmanager
def server_process(settings: Settings) -> Iterator[str]:
    """`python -m pictrace serve` in its own process: its event loop does not share a GIL with our clients."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICTRACE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        PICTRACE_DATA_DIR=str(settings.data_dir),
        PICTRACE_DB=str(settings.db),
        PICTRACE_WORKERS=str(settings.workers),
        PICTRACE_QUEUE_LIMIT=str(settings.queue_limit),
        PICTRACE_PORT=str(port),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pictrace", "serve"],
        cwd=settings.data_dir.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "server exited"
            assert time.monotonic() < deadline, "server did not index the gallery"
            with contextlib.suppress(httpx.HTTPError):
                images = httpx.get(f"{base}/api/health").json()["images"]
                if images["indexed"] >= 3 and images["pending"] == 0:
                    break
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_saturated_cpu_gives_200s_and_503s_only_and_health_stays_fast(
    settings: Settings, photos: dict[str, np.ndarray]
) -> None:
    queries = [encode(crop(photos[n], 0.7, 0.1)) for n in ("coffee", "rocket", "astronaut")]
    statuses: Counter[int] = Counter()
    retry_after_ok = True
    health_ms: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        nonlocal retry_after_ok
        with httpx.Client(base_url=base, timeout=30) as client:
            n = 0
            while not stop.is_set() and n < 200:  # bounded
                data = queries[(i + n) % len(queries)]
                response = client.post("/api/search", files={"file": ("q.jpg", data, "image/jpeg")})
                with lock:
                    statuses[response.status_code] += 1
                    if response.status_code == 503 and not response.headers.get("retry-after", "").isdigit():
                        retry_after_ok = False
                n += 1

    def health_loop() -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get("/api/health").status_code == 200
                health_ms.append((time.perf_counter() - started) * 1000)
                time.sleep(0.05)

    with server_process(settings) as base:
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
        threads.append(threading.Thread(target=health_loop))
        for thread in threads:
            thread.start()
        time.sleep(5)
        stop.set()
        for thread in threads:
            thread.join(60)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= 3 and statuses[503] >= 3, statuses
    assert retry_after_ok
    assert len(health_ms) >= 10, health_ms
    # a blocked loop would make health wait for whole searches (hundreds of ms each, queued 8 deep)
    assert statistics.median(health_ms) < 150, health_ms
    assert max(health_ms) < 2000, health_ms
