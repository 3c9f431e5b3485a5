"""A gallery of up to 1,000,000 images on one machine, built from real-content rows: build time, restart time,
search p50/p95, RSS, disk, and whether the evaluation sets' queries still find their targets.

Ingesting a million real photos takes longer than a measurement should, so the catalogue is grown from one that
``bench/scale_quality.py`` ingested for real (distractors from ``make_distractors.py`` plus the evaluation sets'
galleries). Each distractor row is copied again and again, each copy perturbed so that it is a distinct image
with real-looking features, never uniformly random bits (which spread evenly over the local index's lists and
flatter it):
- ORB descriptors: every bit flipped with probability ``--flip`` (0.1: ~13 of the 128 bits the local index
  keeps), so copies fall in the same lists as their source, as near-identical product shots do;
- embedding: the source's plus Gaussian noise, cosine to it spread over 0.55..0.95;
- thumbnail (SSIM's gray too), keypoint positions: the source's (they are only read for the candidates of a query).
The evaluation sets' own rows are kept once, so their queries' targets stay unique.

    python bench/scale_quality.py D10K/db.json --workdir /data/sq10k          # the real rows, once
    python bench/scale_million.py /data/sq10k --size 1000000 --workdir /data/m1 [--tuning FILE]

Then ``python -m pictrace reindex`` builds both indexes (timed, with its peak RSS), and a fresh serving process
opens them (restart time) and searches every query of both sets (``scale_quality.serve_and_search``).
Prints a table and writes ``bench/results/scale_million_<N>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_quality import RESULTS, SETS, disk, print_serving, serving_process

from pictrace.features.orb import OrbFeatures
from pictrace.store.blobs import decode_embedding, encode_embedding


def perturbed_orb(blob: bytes, flip: float, rng: np.random.Generator) -> bytes:
    orb = OrbFeatures.from_bytes(blob)
    bits = rng.random((len(orb), orb.descriptors.shape[1] * 8)) < flip
    return replace(orb, descriptors=orb.descriptors ^ np.packbits(bits, axis=1)).to_bytes()


def perturbed_embedding(blob: bytes, rng: np.random.Generator) -> bytes:
    """Noise of a norm that puts the copy at cosine ~0.55..0.95 from its source (unit vectors)."""
    v = decode_embedding(blob)
    noise = rng.normal(size=v.shape).astype(np.float32) * (rng.uniform(0.33, 1.5) / np.sqrt(v.size))
    out = v + noise
    return encode_embedding(out / np.linalg.norm(out))


def grow(real: Path, data_dir: Path, size: int, flip: float, seed: int = 1) -> dict[str, Any]:
    """Copy the real catalogue, then add perturbed copies of its distractor rows until it holds ``size``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    src_path, dst_path = real / "data" / "catalogue.sqlite3", data_dir / "catalogue.sqlite3"
    with sqlite3.connect(src_path) as src:
        src.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for stale in data_dir.iterdir():
        stale.unlink()
    shutil.copyfile(src_path, dst_path)
    started = time.perf_counter()
    src, dst = sqlite3.connect(src_path), sqlite3.connect(dst_path)
    dst.execute("PRAGMA journal_mode=WAL")
    have = dst.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    query_names = {name for gt in SETS.values() for name in json.loads(gt.read_text())["gallery"]}
    rows = [
        (sha, entry_id)
        for sha, entry_id in src.execute("SELECT sha256, entry_id FROM sources WHERE status = 'ok'")
        if entry_id not in query_names
    ]
    columns = [c for _, c, *_ in src.execute("PRAGMA table_info(images)") if c != "vec_id"]
    rows_vec = dict(src.execute("SELECT sha256, vec_id FROM images"))
    links = src.execute("SELECT vec_id, other, inliers, tier, cosine, fit FROM links").fetchall()
    rng = np.random.default_rng(seed)
    marks = ", ".join("?" * len(columns))
    copy = 0
    while have < size:
        copy += 1
        copied: dict[int, int] = {}  # this round's source vec_id -> its copy's
        for start in range(0, len(rows), 1000):
            chunk = rows[start : start + 1000]
            by_sha = {sha: entry for sha, entry in chunk}
            found = src.execute(
                f"SELECT {', '.join(columns)} FROM images WHERE sha256 IN ({', '.join('?' * len(chunk))})",
                list(by_sha),
            ).fetchall()
            with dst:
                for row in found:
                    if have >= size:
                        break
                    values = dict(zip(columns, row, strict=True))
                    source_vec = rows_vec[values["sha256"]]
                    sha = hashlib.sha256(f"copy{copy}:{values['sha256']}".encode()).hexdigest()
                    entry = f"{by_sha[values['sha256']]}c{copy}"
                    values.update(
                        sha256=sha,
                        pixel_sha256=sha,
                        embedding=perturbed_embedding(values["embedding"], rng),
                        orb=perturbed_orb(values["orb"], flip, rng),
                    )
                    cur = dst.execute(
                        f"INSERT INTO images ({', '.join(columns)}) VALUES ({marks})", list(values.values())
                    )
                    copied[source_vec] = int(cur.lastrowid or 0)
                    dst.execute(
                        """INSERT INTO sources (url, entry_url, origin, entry_id, position, sha256, metadata,
                                                status, attempts, updated_at)
                           VALUES (?, ?, 'gallery', ?, ?, ?, '{}', 'ok', 1, ?)""",
                        (f"copies/{entry}.jpg", f"copies/{entry}.jpg", entry, have, sha, time.time()),
                    )
                    have += 1
            if have >= size:
                break
        # the copies keep their sources' match-graph links among themselves (so the duplicate groups grow with
        # the gallery), and a self-link each: linked, so that no later ingest links a million images again
        with dst:
            dst.executemany(
                "INSERT INTO links (vec_id, other, inliers, tier, cosine, fit) VALUES (?, ?, ?, ?, ?, ?)",
                [(copied[a], copied[b], *rest) for a, b, *rest in links if a in copied and b in copied],
            )
            dst.executemany(
                "INSERT OR IGNORE INTO links (vec_id, other, inliers) VALUES (?, ?, 0)",
                [(v, v) for v in copied.values()],
            )
        print(f"  {have:,} rows", flush=True)
    dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    src.close()
    dst.close()
    return {"rows": have, "copies_per_distractor": copy, "write_s": round(time.perf_counter() - started, 1)}


def reindex(data_dir: Path, tuning: Path | None = None) -> dict[str, Any]:
    """Both indexes built from the catalogue by the product's own command, in its own process."""
    env = {**os.environ, "PICTRACE_DATA_DIR": str(data_dir)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    fitted = ["--tuning", str(tuning)] if tuning is not None else []
    subprocess.run([sys.executable, "-m", "pictrace", *fitted, "reindex"], env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "build_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("real", type=Path, help="a --workdir of bench/scale_quality.py (its data/ holds the real rows)")
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--flip", type=float, default=0.1, help="probability of flipping each descriptor bit")
    ap.add_argument("--reuse", action="store_true", help="keep an already grown catalogue and built indexes")
    ap.add_argument("--tuning", type=Path, help="a tuning JSON file for the reindex and the serving process")
    a = ap.parse_args()
    data_dir = a.workdir / "data"
    report: dict[str, Any] = {"size": a.size, "flip": a.flip, "real": str(a.real), "tuning": str(a.tuning or "")}
    if not a.reuse:
        report["grow"] = grow(a.real, data_dir, a.size, a.flip)
        report["reindex"] = reindex(data_dir, a.tuning)
    report["serve"] = s = serving_process(a.workdir, ["--tuning", str(a.tuning)] if a.tuning else [])
    report["disk"] = d = disk(data_dir, s["indexed"])
    print(f"\ngallery {s['indexed']:,} images")
    if "grow" in report:
        g, r = report["grow"], report["reindex"]
        print(
            f"build       rows written {g['write_s']:.0f} s, indexes (reindex) {r['build_s']:.0f} s,"
            f" peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    print_serving(s, d)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"scale_million_{a.size}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
