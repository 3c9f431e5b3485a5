"""Search latency of two checkouts (or two settings), measured interleaved so that host drift hits both alike.

On the 2-vCPU machines this project runs on, the time of embedding one image moves by up to 1.4x from one
minute to the next, and with it the search's latency: two `eval` runs one after the other cannot resolve a
change of a few per cent. Here two worker processes, each a checkout of PicTrace with its own copy of one
index, take the evaluation's queries in turn (A then B, B then A on the next query), each also timing the
embedding of one image every fifth query. Only one of them works at any moment.

The gallery of GT.json is indexed once, with this checkout's code, into a throw-away data dir that is copied for
each side (the other checkout must read the same catalogue format). Each side prints p50/p95 of its searches,
the median time of embedding one image, and their ratio (the quality issue's latency yardstick).

    python bench/search_ab.py GT.json --b ../other-checkout [--b-env PICTRACE_X=1] [--rounds 1] [--queries 250]
    python bench/search_ab.py GT.json --b-tuning one-thread.json     # same code, other constants (--tuning FILE)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.config import Settings
from pictrace.eval import GroundTruth, _write_gallery_file
from pictrace.gallery import load_gallery
from pictrace.service import Service

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# Runs inside each checkout: 'search I' / 'embed I' on stdin, milliseconds on stdout.
WORKER = """
import asyncio, sys, time
from pathlib import Path
sys.path.insert(0, ".")
from pictrace.config import Settings
from pictrace.eval import GroundTruth, _embed_one_ms
try:
    from pictrace.files import read_local_file
except ImportError:  # a checkout from before pictrace/files.py
    from pictrace.ingest import read_local_file
from pictrace.service import Service

async def main() -> None:
    gt = GroundTruth.load(Path(sys.argv[1]))
    images = Path(sys.argv[1]).parent / "images"
    options = {}
    if len(sys.argv) > 3:
        from pictrace.tuning import Tuning
        options["tuning"] = Tuning.from_file(Path(sys.argv[3]))
    service = await Service.start(Settings(data_dir=Path(sys.argv[2]), index_on_start=False), **options)
    queries = [read_local_file(images / q.name, service.settings.max_upload_bytes) for q in gt.queries]
    for data in queries[:3]:  # warm-up
        await service.pool.run_background(service.searcher.search_ranked, data)
    print("ready", flush=True)
    for line in sys.stdin:
        command, i = line.split()
        data = queries[int(i)]
        if command == "embed":
            ms = await service.pool.run_background(_embed_one_ms, service, data)
        else:
            started = time.perf_counter()
            await service.pool.run_background(service.searcher.search_ranked, data)
            ms = (time.perf_counter() - started) * 1000
        print(f"{ms:.3f}", flush=True)
    await service.close()

asyncio.run(main())
"""


async def build_index(gt_path: Path, workdir: Path) -> Path:
    """The gallery indexed once with this checkout's defaults; returns the data dir."""
    gt = GroundTruth.load(gt_path)
    db = _write_gallery_file(gt, (gt_path.parent / "images").resolve(), workdir)
    data_dir = workdir / "data"
    service = await Service.start(Settings(_env_file=None, db=db, data_dir=data_dir, index_on_start=False))
    try:
        report = await service.ingestor.ingest_gallery(load_gallery(db))
        if report.failed:
            raise SystemExit(f"{len(report.failed)} gallery images failed to index")
    finally:
        await service.close()
    return data_dir


class Side:
    def __init__(
        self, name: str, checkout: Path, env: dict[str, str], gt_path: Path, data_dir: Path, tuning: Path | None
    ) -> None:
        self.name = name
        self.search_ms: list[float] = []
        self.embed_ms: list[float] = []
        python = checkout / ".venv" / "bin" / "python"
        self.proc = subprocess.Popen(
            [str(python if python.exists() else Path(sys.executable)), "-c", WORKER, str(gt_path), str(data_dir),
             *([str(tuning.resolve())] if tuning else [])],
            cwd=checkout,
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready", name

    def ask(self, command: str) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()

    def row(self) -> dict[str, Any]:
        p50 = statistics.median(self.search_ms)
        embed = statistics.median(self.embed_ms)
        p95 = sorted(self.search_ms)[int(0.95 * (len(self.search_ms) - 1))]
        return {
            "side": self.name,
            "searches": len(self.search_ms),
            "p50_ms": round(p50, 1),
            "p95_ms": round(p95, 1),
            "embed_one_ms": round(embed, 1),
            "ratio": round(p50 / embed, 3),
        }


def parse_env(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gt", type=Path)
    parser.add_argument("--a", type=Path, default=ROOT, help="checkout A (default: this one)")
    parser.add_argument("--b", type=Path, default=ROOT, help="checkout B (default: this one)")
    parser.add_argument("--a-env", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--b-env", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--a-tuning", type=Path, help="a tuning file for side A (pictrace/tuning.py)")
    parser.add_argument("--b-tuning", type=Path, help="a tuning file for side B")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the queries")
    parser.add_argument("--queries", type=int, default=0, help="the first N queries (0: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "search_ab.json")
    args = parser.parse_args()
    gt_path = args.gt.resolve()
    n = len(GroundTruth.load(gt_path).queries)
    n = min(n, args.queries) if args.queries else n
    with tempfile.TemporaryDirectory(prefix="pictrace-ab-") as tmp:
        data_dir = asyncio.run(build_index(gt_path, Path(tmp)))
        shutil.copytree(data_dir, Path(tmp) / "data-b")
        sides = [
            Side(
                f"A {args.a} {' '.join(args.a_env)} {args.a_tuning or ''}".strip(),
                args.a.resolve(), parse_env(args.a_env), gt_path, data_dir, args.a_tuning,
            ),
            Side(
                f"B {args.b} {' '.join(args.b_env)} {args.b_tuning or ''}".strip(),
                args.b.resolve(), parse_env(args.b_env), gt_path, Path(tmp) / "data-b", args.b_tuning,
            ),
        ]
        try:
            for r in range(args.rounds):
                for i in range(n):
                    for side in sides if (i + r) % 2 == 0 else sides[::-1]:
                        side.search_ms.append(side.ask(f"search {i}"))
                        if i % 5 == 0:
                            side.embed_ms.append(side.ask(f"embed {i}"))
        finally:
            for side in sides:
                side.close()
    rows = [side.row() for side in sides]
    print(f"{'side':60s} {'p50':>7s} {'p95':>7s} {'embed':>7s} {'ratio':>6s}")
    for row in rows:
        print(
            f"{row['side'][:60]:60s} {row['p50_ms']:7.1f} {row['p95_ms']:7.1f} {row['embed_one_ms']:7.1f} "
            f"{row['ratio']:6.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"gt": str(gt_path), "rounds": args.rounds, "queries": n, "sides": rows}, indent=2))


if __name__ == "__main__":
    main()
