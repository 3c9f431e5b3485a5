"""Many processes on one PostgreSQL catalogue: sharded ingest workers, replicas that follow, reindex.

Real subprocesses (`python -m pictrace index --shard I/N`), a real PostgreSQL server and a real HTTP server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ImageServer, crop, encode

from pictrace.config import Settings
from pictrace.gallery import Shard
from pictrace.service import Service

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins"]


def shard_gallery(server: ImageServer, photos: dict[str, np.ndarray]) -> list[dict[str, object]]:
    """Six entries, three per shard of 2 (the URL is salted until it hashes to the shard wanted)."""
    entries: list[dict[str, object]] = []
    for i, name in enumerate(NAMES):
        shard = Shard(i % 2, 2)
        url = next(u for salt in range(200) if shard.owns(u := server.url(f"img/{name}-{salt}.jpg")))
        server.add(url.removeprefix(server.base), encode(photos[name]))
        entries.append({"id": name, "url": url, "shard": i % 2})
    return entries


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PICTRACE_")}
    clean.update(env, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "pictrace", *args], cwd=cwd, env=clean, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def finish(process: subprocess.Popen[str], timeout: float = 120) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


@pytest.fixture
def pg_settings(postgres_url: str, make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        return make_settings(database_url=postgres_url, **overrides)

    return make


async def test_two_shard_workers_fill_one_catalogue_and_replicas_follow(
    image_server: ImageServer,
    photos: dict[str, np.ndarray],
    postgres_url: str,
    pg_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    entries = shard_gallery(image_server, photos)
    db = tmp_path / "db.json"
    db.write_text(json.dumps(entries))

    # a replica serving before the workers start: it must follow the catalogue they fill
    replica = await Service.start(pg_settings(data_dir=tmp_path / "replica", sync_interval_s=0.2))
    try:
        assert len(replica.indexes.vector) == 0
        env = {"PICTRACE_DATABASE_URL": postgres_url, "PICTRACE_FETCH_RETRIES": "0"}
        workers = [
            run_cli("--data-dir", str(tmp_path / f"worker{i}"), "index", str(db), "--shard", f"{i}/2", "--quiet",
                    env=env, cwd=tmp_path)
            for i in range(2)
        ]
        outputs = [finish(w) for w in workers]
        for out in outputs:
            assert "added 3, duplicates 0" in out, out
        for entry in entries:  # each image was downloaded once, by the worker owning it
            assert image_server.hits[str(entry["url"]).removeprefix(image_server.base)] == 1

        deadline = time.monotonic() + 30
        while len(replica.indexes.vector) < len(NAMES) and time.monotonic() < deadline:  # noqa: ASYNC110 (polls the timer)
            await asyncio.sleep(0.1)
        assert len(replica.indexes.vector) == len(NAMES)
        for name in NAMES:  # an edited copy finds its original, whichever shard indexed it
            result = await replica.pool.run(replica.searcher.search_bytes, encode(crop(photos[name], 0.7)), 1)
            assert result.results and result.results[0].id == name
    finally:
        await replica.close()

    # a replica started afterwards builds its index from the catalogue at start
    fresh = await Service.start(pg_settings(data_dir=tmp_path / "fresh"))
    try:
        assert len(fresh.indexes.vector) == len(NAMES)
        indexed, failed = fresh.catalogue.counts()
        assert (indexed, failed) == (len(NAMES), 0)
    finally:
        await fresh.close()

    # and an app process (the CLI) finds an image of each shard
    for name in ("astronaut", "chelsea"):  # shard 0 and shard 1
        query = tmp_path / f"{name}.jpg"
        query.write_bytes(encode(crop(photos[name], 0.8)))
        out = finish(run_cli("--data-dir", str(tmp_path / "cli"), "search", str(query), "--json",
                             env={"PICTRACE_DATABASE_URL": postgres_url}, cwd=tmp_path))
        assert json.loads(out[out.index("{"):])["results"][0]["id"] == name


async def test_a_shard_removes_only_its_own_entries(
    image_server: ImageServer, photos: dict[str, np.ndarray], pg_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    from pictrace.gallery import load_gallery

    entries = shard_gallery(image_server, photos)
    db = tmp_path / "db.json"
    db.write_text(json.dumps(entries))
    for i in range(2):
        service = await Service.start(pg_settings(data_dir=tmp_path / f"w{i}", sync_interval_s=0))
        try:
            report = await service.ingestor.ingest_gallery(load_gallery(db), shard=Shard(i, 2))
            assert report.added == 3
        finally:
            await service.close()

    # db.json loses one entry of each shard; only shard 0's worker runs again
    kept = [e for e in entries if e["id"] not in ("astronaut", "chelsea")]
    db.write_text(json.dumps(kept))
    service = await Service.start(pg_settings(data_dir=tmp_path / "w0", sync_interval_s=0))
    try:
        report = await service.ingestor.ingest_gallery(load_gallery(db), shard=Shard(0, 2))
        assert (report.removed, report.unchanged, report.added) == (1, 2, 0)
        remaining = {r.entry_id for r in service.catalogue.records(service.catalogue.vec_ids().tolist()).values()}
        assert remaining == set(NAMES) - {"astronaut"}  # chelsea belongs to shard 1: its worker decides
    finally:
        await service.close()


def test_reindex_rebuilds_a_lost_index_from_postgres(
    image_server: ImageServer, photos: dict[str, np.ndarray], postgres_url: str, tmp_path: Path
) -> None:
    db = tmp_path / "db.json"
    db.write_text(json.dumps(shard_gallery(image_server, photos)[:3]))
    env = {"PICTRACE_DATABASE_URL": postgres_url}
    finish(run_cli("--data-dir", str(tmp_path / "d"), "index", str(db), "--quiet", env=env, cwd=tmp_path))
    index_file = tmp_path / "d" / "vectors.faiss"
    index_file.write_bytes(b"lost")
    out = finish(run_cli("--data-dir", str(tmp_path / "d"), "reindex", env=env, cwd=tmp_path))
    assert "from the catalogue: 3 vectors" in out
    assert index_file.read_bytes().startswith(b"PICTRACE-FAISS-2\n")


def test_shard_parsing_and_ownership() -> None:
    assert Shard.parse(" 1/3 ") == Shard(1, 3)
    for bad in ("3/3", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            Shard.parse(bad)
    urls = [f"https://example.com/{i}.jpg" for i in range(300)]
    owners = [[Shard(i, 3).owns(u) for i in range(3)] for u in urls]
    assert all(sum(o) == 1 for o in owners)  # every entry has exactly one owner
    counts = np.sum(owners, axis=0)
    assert counts.min() > 60  # and the split is roughly even
