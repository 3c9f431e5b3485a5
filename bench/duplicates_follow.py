"""What following an ingest costs the duplicate groups on a large gallery: the groups thread's CPU while a
serving process ingests new images into a built data dir.

    cp -r /data/sq100k/data /data/copy      # the run adds images: never point it at a data dir you keep
    python bench/duplicates_follow.py /data/copy GALLERY.json [--settle 20]

GALLERY.json is the data dir's own gallery file plus the new entries (a gallery file names *every* image: one
that left the others out would remove them). The process starts the service on the data dir, waits for the
groups to be ready, ingests the gallery, waits ``--settle`` seconds (the groups place an ingest run's images
again once it has ended), and reports the ingest's images/s, the process's CPU and the groups thread's CPU
during the ingest and after it. Prints a table and writes ``bench/results/duplicates_follow.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_quality import wait_ready

from pictrace.config import Settings
from pictrace.gallery import load_gallery
from pictrace.service import Service

RESULTS = Path(__file__).resolve().parent / "results"


async def follow(data_dir: Path, gallery: Path, settle_s: float) -> dict[str, Any]:
    service = await Service.start(Settings(data_dir=data_dir, index_on_start=False))
    try:
        await wait_ready(service)
        groups = service.duplicates
        images_before = service.catalogue.counts()[0]
        groups_cpu, process_cpu, started = groups.cpu_s, time.process_time(), time.perf_counter()
        report = await service.ingestor.ingest_gallery(load_gallery(gallery))
        wall = time.perf_counter() - started
        during = groups.cpu_s - groups_cpu
        process = time.process_time() - process_cpu
        await asyncio.sleep(settle_s)
        return {
            "data_dir": str(data_dir),
            "images_before": images_before,
            "added": report.added,
            "removed": report.removed,
            "ingest_s": round(wall, 1),
            "images_per_s": round(report.added / wall, 2) if wall else None,
            "process_cpu_s": round(process, 1),
            "groups_cpu_during_s": round(during, 1),
            "groups_cpu_with_settle_s": round(groups.cpu_s - groups_cpu, 1),
            "settle_s": settle_s,
        }
    finally:
        await service.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("gallery", type=Path, help="the data dir's gallery file plus the new entries")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds to follow after the ingest")
    a = ap.parse_args()
    out = asyncio.run(follow(a.data_dir, a.gallery, a.settle))
    print(f"{out['added']} images added to {out['images_before']:,} ({out['removed']} removed) in "
          f"{out['ingest_s']} s: {out['images_per_s']} img/s, process CPU {out['process_cpu_s']} s")
    print(f"groups thread CPU: {out['groups_cpu_during_s']} s during the ingest, "
          f"{out['groups_cpu_with_settle_s']} s with the {out['settle_s']:.0f} s after it")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "duplicates_follow.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
