"""Many machines, one PostgreSQL catalogue and one Milvus server, all real processes.

Two `python -m pictrace index --shard I/2` workers fill the catalogue and the collection; two `python app.py`
replicas (no local vectors) search them, follow each other's writes, survive a Milvus restart and a reindex. The
servers are the session's (tests/pgserver.py, tests/milvusserver.py); every process here is a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ImageServer, crop, encode
from milvusserver import MilvusTestServer
from test_sharding import NAMES, finish, run_cli, shard_gallery

from pictrace.indexes.vector import IndexInfo
from pictrace.indexes.vector.milvus_index import MilvusIndex
from pictrace.store.postgres import PostgresCatalogue

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "cluster-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SYNC_S = 0.5
TIMEOUT_S = 10.0  # the replicas' Milvus request timeout (tuning.vectors.milvus_timeout_s)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Replica:
    """`python app.py` on a free port, with its own data dir (a local-feature index, no vectors)."""

    def __init__(self, name: str, env: dict[str, str], tmp: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PICTRACE_")}
        clean.update(env, PYTHONPATH=str(ROOT), PICTRACE_PORT=str(self.port), PICTRACE_DATA_DIR=str(tmp / name))
        self.log = (tmp / f"{name}.log").open("w")
        self.process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=clean, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.base, timeout=30)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, Path(self.log.name).read_text()
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/api/health").status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"replica on {self.base} did not start: {Path(self.log.name).read_text()[-2000:]}")

    def search(self, data: bytes, top_k: int = 5) -> httpx.Response:
        return self.client.post("/api/search", files={"file": ("q.jpg", data, "image/jpeg")},
                                data={"top_k": str(top_k)})

    def found(self, data: bytes) -> list[str]:
        response = self.search(data)
        assert response.status_code == 200, response.text
        return [m["id"] for m in response.json()["results"]]

    def stop(self) -> None:
        self.client.close()
        self.process.kill()  # throw-away replicas: nothing of theirs outlives the test
        self.process.wait(timeout=30)
        self.log.close()


def eventually(check: object, timeout: float, every: float = 0.1) -> float:
    """Poll ``check()`` until it is true; returns the seconds it took (fails past ``timeout``)."""
    assert callable(check)
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "not within the time allowed"
        time.sleep(every)
    return time.monotonic() - start


def consistent(postgres_url: str, milvus_uri: str) -> tuple[list[int], list[int]]:
    """(the catalogue's vec_ids, the collection's ids), sorted: equal when catalogue and vectors agree."""
    catalogue = PostgresCatalogue(postgres_url)
    try:
        wanted = sorted(catalogue.vec_ids().tolist())
    finally:
        catalogue.close()
    from pymilvus import MilvusClient

    client = MilvusClient(uri=milvus_uri)
    try:
        (name,) = client.list_collections()  # one model, one collection (reindex dropped the one it replaced)
        model = json.loads(client.describe_collection(name)["description"])
    finally:
        client.close()
    index = MilvusIndex(milvus_uri, IndexInfo(model["backbone"], model["fingerprint"], model["dim"]))
    try:
        return wanted, sorted(index.ids().tolist())
    finally:
        index.close()


@pytest.fixture
def cluster_env(postgres_url: str, milvus_uri: str) -> dict[str, str]:
    return {
        "PICTRACE_DATABASE_URL": postgres_url,
        "PICTRACE_MILVUS_URI": milvus_uri,
        "PICTRACE_FETCH_RETRIES": "0",
        "PICTRACE_FETCH_ALLOW": "127.0.0.1",
        "PICTRACE_INDEX_ON_START": "false",
        "PICTRACE_SYNC_INTERVAL_S": str(SYNC_S),
        "PICTRACE_API_TOKEN": TOKEN,
    }


@pytest.fixture
def replicas(cluster_env: dict[str, str], tmp_path: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []

    def start() -> list[Replica]:
        started.extend(Replica(name, cluster_env, tmp_path) for name in ("replica-a", "replica-b"))
        for replica in started:
            replica.wait_ready()
        return started

    yield start  # type: ignore[misc]
    for replica in started:
        replica.stop()


def test_two_workers_two_replicas_one_postgres_one_milvus(
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    cluster_env: dict[str, str],
    replicas: object,
    milvus_server: MilvusTestServer,
    postgres_url: str,
    milvus_uri: str,
    tmp_path: Path,
) -> None:
    entries = shard_gallery(image_server, photos)
    db = tmp_path / "db.json"
    db.write_text(json.dumps(entries))
    workers = [run_cli("--data-dir", str(tmp_path / f"worker{i}"), "index", str(db), "--shard", f"{i}/2",
                       "--quiet", env=cluster_env, cwd=tmp_path) for i in range(2)]
    for worker in workers:
        assert "added 3, duplicates 0" in finish(worker)
    assert consistent(postgres_url, milvus_uri)[0] == consistent(postgres_url, milvus_uri)[1]

    assert callable(replicas)
    a, b = replicas()
    for name in NAMES:  # both replicas find the images of both shards, from the shared vectors
        query = encode(crop(photos[name], 0.7))
        assert a.found(query)[:1] == [name]
        assert b.found(query)[:1] == [name]

    # an image added through A is found through B within the sync interval (plus a request's time)
    new = encode(photos["brick"])
    added = a.client.post("/api/images", files={"file": ("brick.jpg", new, "image/jpeg")}, headers=AUTH)
    assert added.status_code == 201, added.text
    new_id, new_sha = added.json()["id"], added.json()["sha256"]
    took = eventually(lambda: new_id in b.found(encode(crop(photos["brick"], 0.8))), timeout=SYNC_S + 10)
    print(f"added through A, found through B after {took:.2f} s")

    # a delete through B is gone from both
    assert b.client.delete(f"/api/images/{new_sha}", headers=AUTH).status_code == 200
    assert new_id not in b.found(new)
    eventually(lambda: new_id not in a.found(new), timeout=SYNC_S + 10)

    # reindex drops and reloads the collection while B keeps answering
    answers: list[int] = []
    stop = threading.Event()

    def keep_searching() -> None:
        query = encode(crop(photos["coffee"], 0.7))
        while not stop.is_set():
            response = b.search(query)
            answers.append(response.status_code)
            assert response.status_code != 200 or response.json()["results"][0]["id"] == "coffee"

    searcher = threading.Thread(target=keep_searching)
    searcher.start()
    try:
        out = finish(run_cli("--data-dir", str(tmp_path / "reindexer"), "reindex", env=cluster_env, cwd=tmp_path))
    finally:
        stop.set()
        searcher.join(timeout=60)
    assert answers and set(answers) == {200}, (answers, out)
    wanted, held = consistent(postgres_url, milvus_uri)
    assert wanted == held and len(held) == len(NAMES)

    # the Milvus server stops: searches answer 503 with a clear detail within the timeout, never a 500
    query = encode(crop(photos["rocket"], 0.7))
    milvus_server.stop()
    try:
        for replica in (a, b):
            started = time.monotonic()
            response = replica.search(query)
            assert time.monotonic() - started < TIMEOUT_S + 5
            assert response.status_code == 503, response.text
            assert "Milvus" in response.json()["detail"]
    finally:
        milvus_server.start()
    for replica in (a, b):  # and they recover without a restart
        eventually(lambda r=replica: r.search(query).status_code == 200, timeout=90, every=0.5)  # type: ignore[misc]
        assert replica.found(query)[:1] == ["rocket"]


def test_a_worker_killed_mid_ingest_is_made_whole_by_its_rerun(
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    cluster_env: dict[str, str],
    postgres_url: str,
    milvus_uri: str,
    tmp_path: Path,
) -> None:
    entries = [{"id": name, "url": image_server.add(f"img/{name}.jpg", encode(photos[name]))} for name in NAMES]
    # one download that hangs: the worker has committed the others when it is killed
    entries.append({"id": "brick", "url": image_server.add("slow/brick.jpg", encode(photos["brick"]))})
    image_server.slow_seconds = 60
    db = tmp_path / "db.json"
    db.write_text(json.dumps(entries))
    env = {**cluster_env, "PICTRACE_FETCH_TIMEOUT_S": "120"}
    worker = run_cli("--data-dir", str(tmp_path / "worker"), "index", str(db), "--quiet", env=env, cwd=tmp_path)
    catalogue = PostgresCatalogue(postgres_url)
    try:
        eventually(lambda: catalogue.counts()[0] >= len(NAMES) - 1, timeout=120, every=0.05)
    finally:
        catalogue.close()
    assert worker.poll() is None  # still ingesting: the slow download is pending
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)

    image_server.slow_seconds = 0
    out = finish(run_cli("--data-dir", str(tmp_path / "worker"), "index", str(db), "--quiet", env=env, cwd=tmp_path))
    assert "failed 0" in out or "added" in out, out
    wanted, held = consistent(postgres_url, milvus_uri)
    assert wanted == held and len(held) == len(NAMES) + 1
