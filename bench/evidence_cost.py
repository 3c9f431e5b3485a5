"""What the verdicts add to a query: the mirror check, the verdicts and read-out, and drawing an evidence picture.

On the bundled demo gallery (db.json, indexed into a temporary data dir), every demo query and every gallery
image is searched with the mirror check off and on (p50/p95 of the whole search), then the evidence picture of
each result is drawn (p50/p95 of explain_match: decode, ORB, warp, SSIM, PNG).

    python bench/evidence_cost.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.config import Settings
from pictrace.explain import KeptQuery, explain_match
from pictrace.gallery import load_gallery
from pictrace.service import Service

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(repeat: int) -> dict[str, Any]:
    queries = sorted((ROOT / "demo" / "queries").glob("*.jpg")) + sorted((ROOT / "demo" / "gallery").glob("*.jpg"))
    data = [q.read_bytes() for q in queries]
    out: dict[str, Any] = {"queries": len(data), "repeat": repeat}
    with tempfile.TemporaryDirectory() as tmp:
        base = Settings(_env_file=None, data_dir=Path(tmp), db=ROOT / "db.json", index_on_start=False)
        service = await Service.start(base)
        try:
            await service.ingestor.ingest_gallery(load_gallery(base.db))
            tunings = {m: service.tuning.replace(cascade={"mirror_check": m}) for m in (False, True)}
            service.searcher.search_bytes(data[0])  # warm-up
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(repeat):
                for d in data:
                    for mirror in (False, True):  # interleaved, so a busy machine weighs on both alike
                        service.searcher.tuning = tunings[mirror]
                        t0 = time.perf_counter()
                        service.searcher.search_bytes(d)
                        times[mirror].append((time.perf_counter() - t0) * 1000)
            for mirror, values in times.items():
                out[f"search_ms_mirror_{'on' if mirror else 'off'}"] = {
                    "p50": statistics.median(values), "p95": pct(values, 0.95)}
            service.searcher.tuning = service.tuning
            draw = []
            for d in data:
                result = service.searcher.search_bytes(d)
                kept = KeptQuery(d, result, time.monotonic() + 60)
                for m in result.results:
                    t0 = time.perf_counter()
                    explain_match(service.catalogue, kept, m.sha256, base, service.tuning)
                    draw.append((time.perf_counter() - t0) * 1000)
            out["explain_ms"] = {"n": len(draw), "p50": statistics.median(draw), "p95": pct(draw, 0.95)}
        finally:
            await service.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    out = asyncio.run(run(args.repeat))
    print(f"{'what':28s} {'p50 ms':>8} {'p95 ms':>8}")
    for key in ("search_ms_mirror_off", "search_ms_mirror_on", "explain_ms"):
        print(f"{key:28s} {out[key]['p50']:8.1f} {out[key]['p95']:8.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "evidence_cost.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
