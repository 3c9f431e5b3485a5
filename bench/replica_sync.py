"""What a replica pays to follow the catalogue: the full reconcile (start, fallback) against the change log.

A SQLite catalogue of N synthetic images (random unit embeddings, 500 random ORB descriptors each, as the local
index keeps), a replica's FAISS index and local-feature index built from it (the full path: every vec_id
compared, the local index rebuilt from every ORB blob), then C images added and C removed by another
connection, each followed by an incremental sync (only the new log rows).

    python bench/replica_sync.py [--sizes 10000 100000] [--changes 1 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.features.orb import OrbFeatures
from pictrace.indexes import DerivedIndexes
from pictrace.indexes.local import LocalIndex, local_index_params
from pictrace.indexes.vector import FaissIndex, FaissParams, IndexInfo
from pictrace.store import Catalogue, Source, StoredImage
from pictrace.store.blobs import encode_embedding
from pictrace.store.images import upsert_source
from pictrace.sync import Follower
from pictrace.tuning import Tuning

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 1280


def image(i: int, rng: np.random.Generator) -> StoredImage:
    vector = rng.normal(size=DIM).astype(np.float32)
    orb = OrbFeatures(rng.uniform(0, 640, size=(500, 2)).astype(np.float32),
                      rng.integers(0, 256, size=(500, 32), dtype=np.uint8), 640, 480, 1.0)
    sha = hashlib.sha256(f"img{i}".encode()).hexdigest()
    return StoredImage(sha, sha, 640, 480, "JPEG", 100_000, i, vector / np.linalg.norm(vector), b"gray",
                       orb.to_bytes(), b"thumb")


def fill(catalogue: Catalogue, n: int, rng: np.random.Generator) -> None:
    """n rows in one transaction (a bench's rows, not an ingest: no log rows, like a catalogue made earlier)."""
    with catalogue._transaction() as conn:
        for i in range(n):
            im = image(i, rng)
            conn.execute(
                """INSERT INTO images (sha256, pixel_sha256, width, height, format, nbytes, dhash, embedding, gray,
                                       orb, thumbnail, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (im.sha256, im.pixel_sha256, im.width, im.height, im.format, im.nbytes, im.dhash,
                 encode_embedding(im.embedding), im.gray_png, im.orb, im.thumbnail, time.time()),
            )
            upsert_source(conn, Source(url=f"https://example.com/{i}.jpg"), "ok", im.sha256, None)


def timed(follower: Follower) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = follower.sync()
    return time.perf_counter() - t0, result


def run(n: int, changes: list[int], workdir: Path) -> list[dict[str, Any]]:
    rng = np.random.default_rng(n)
    path = workdir / f"catalogue-{n}.sqlite3"
    path.unlink(missing_ok=True)
    writer = Catalogue(path)
    fill(writer, n, rng)
    replica = Catalogue(path)
    index = FaissIndex(IndexInfo("bench", "bench", DIM), None, FaissParams(mode="exact"))
    local = LocalIndex(local_index_params(Tuning().local))
    follower = Follower(replica, DerivedIndexes(replica, index, local))
    full_s, result = timed(follower)  # no position yet: the full path
    rows = [{"n": n, "what": "full reconcile (start, fallback)", "changes": n, "sync_s": round(full_s, 3),
             "added": result.added, "removed": result.removed}]
    print("  " + json.dumps(rows[-1]), flush=True)
    next_id = n
    for c in changes:
        added = [writer.add_image(image(next_id + k, rng), Source(url=f"https://example.com/new/{next_id + k}.jpg"))
                 for k in range(c)]
        next_id += c
        seconds, result = timed(follower)
        assert not result.full and result.added == c, result
        rows.append({"n": n, "what": f"+{c} images", "changes": c, "sync_s": round(seconds, 4),
                     "added": result.added, "removed": result.removed, "log_rows_read": result.changes_read})
        print("  " + json.dumps(rows[-1]), flush=True)
        for vec_id, _ in added:
            sha = writer.records([vec_id])[vec_id].sha256
            writer.remove_image(sha)
        seconds, result = timed(follower)
        assert not result.full and result.removed == c, result
        rows.append({"n": n, "what": f"-{c} images", "changes": c, "sync_s": round(seconds, 4),
                     "added": result.added, "removed": result.removed, "log_rows_read": result.changes_read})
        print("  " + json.dumps(rows[-1]), flush=True)
    replica.close()
    writer.close()
    path.unlink(missing_ok=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--changes", nargs="+", type=int, default=[1, 100])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pictrace-replica-sync")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import faiss

    faiss.omp_set_num_threads(1)  # as a serving replica runs (Service.start); busy cores make OpenMP spin
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        print(f"catalogue of {n} images", flush=True)
        rows += run(n, args.changes, args.workdir)
    cols = ["n", "what", "sync_s", "added", "removed", "log_rows_read"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "–")) for c in cols) + " |")
    RESULTS.mkdir(exist_ok=True)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
           "rows": rows}
    (RESULTS / "replica_sync.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
