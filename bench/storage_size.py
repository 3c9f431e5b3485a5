"""Catalogue bytes per image, by field, on real content: what one gallery image costs on disk.

Ingests the first N entries of a db.json of real-content JPEGs (e.g. made by ../shared/eval/make_distractors.py)
into a throw-away data dir with the service's own ingest, then sums the stored blob lengths of each column of
``images`` and divides the SQLite file's size (after a checkpoint, links and sources included) by the images.

    python bench/storage_size.py [--db /work/d10k/db.json] [--count 500] [--tuning FILE]

``--tuning`` measures other storage choices (``{"storage": {"ssim_gray": "png"}}``: pictrace/tuning.py ``Storage``).

A folder holding ``images/*.jpg`` without its db.json (a generation still running) works too: the first N files
by name are taken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.config import Settings
from pictrace.gallery import load_gallery
from pictrace.service import Service
from pictrace.tuning import Tuning

RESULTS = Path(__file__).resolve().parent / "results"
BLOBS = ("embedding", "gray", "orb", "thumbnail")


def first_entries(db: Path, count: int, into: Path) -> list[dict[str, str]]:
    """The first ``count`` entries, their files copied under ``into`` (db.json paths are relative to it)."""
    if db.is_file():
        files = [(str(e.get("id", "")), (db.parent / e["url"]).resolve()) for e in json.loads(db.read_text())[:count]]
    else:
        files = [(f.stem, f) for f in sorted((db / "images").glob("*.jpg"))[:count]]
    (into / "images").mkdir(parents=True)
    entries = []
    for entry_id, path in files:
        shutil.copyfile(path, into / "images" / path.name)
        entries.append({"id": entry_id or path.stem, "url": f"images/{path.name}"})
    return entries


def measure(catalogue: Path) -> dict[str, Any]:
    conn = sqlite3.connect(catalogue)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        images = int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        sums = conn.execute(
            "SELECT " + ", ".join(f"SUM(LENGTH({c}))" for c in BLOBS) + " FROM images"
        ).fetchone()
        links = conn.execute("SELECT COUNT(*) FROM links").fetchone()[0]
    finally:
        conn.close()
    size = catalogue.stat().st_size
    per_field = {c: int(s or 0) / images for c, s in zip(BLOBS, sums, strict=True)}
    return {
        "images": images,
        "bytes_per_image": per_field,
        "blobs_per_image": sum(per_field.values()),
        "file_bytes_per_image": size / images,
        "file_bytes": size,
        "links": int(links),
    }


async def run(db: Path, count: int, tuning: Tuning) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        entries = first_entries(db, count, Path(tmp))
        gallery_json = Path(tmp) / "db.json"
        gallery_json.write_text(json.dumps(entries))
        data = Path(tmp) / "data"
        settings = Settings(_env_file=None, data_dir=data, db=gallery_json, index_on_start=False)  # type: ignore[call-arg]
        service = await Service.start(settings, tuning=tuning)
        try:
            start = time.perf_counter()
            report = await service.ingestor.ingest_gallery(load_gallery(gallery_json))
            took = time.perf_counter() - start
        finally:
            await service.close()
        result = measure(settings.catalogue_path)
    result.update(
        {
            "source": str(db),
            "entries": len(entries),
            "failed": len(report.failed),
            "ingest_s": took,
            "storage": tuning.storage.model_dump(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", type=Path, default=Path("/work/d10k/db.json"), help="db.json (or its folder)")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--tuning", type=Path, help="tuning overrides (JSON), e.g. other storage choices")
    parser.add_argument("--out", type=Path, default=RESULTS / "storage_size.json")
    args = parser.parse_args()
    db = args.db if args.db.exists() else args.db.parent
    tuning = Tuning.from_file(args.tuning) if args.tuning else Tuning()
    result = asyncio.run(run(db, args.count, tuning))
    print(f"{result['images']} images from {result['source']} ({result['failed']} failed); {result['storage']}")
    print(f"{'field':24} {'KB / image':>10}")
    for name, value in result["bytes_per_image"].items():
        print(f"{name:24} {value / 1000:>10.1f}")
    print(f"{'blobs, total':24} {result['blobs_per_image'] / 1000:>10.1f}")
    print(f"{'SQLite file / image':24} {result['file_bytes_per_image'] / 1000:>10.1f}")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
