"""Paging the duplicate groups of an existing catalogue: how long until the groups are ready after a start, and
how long a page takes (the list, and one group's members), as /api/duplicates serves them.

    python bench/duplicates_paging.py DATA_DIR [--pages 10] [--limit 20] [--out bench/results/...json]

Starts the Service on DATA_DIR (``index_on_start`` off: nothing is ingested) and reports: the start itself,
the time until the partition is ready (built from the stored links, or read back from the catalogue where a
previous start stored it), the groups and the largest, the first list page, pages spread over the list
(p50/max), and member pages of the largest group. Each page is timed as the API does it: the page computed on
the pool, then its JSON model. The partition is stored in the catalogue as the service would (the data dir is
written to: use a copy where that matters). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def _timed(service: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """(result, wall ms, CPU ms of the worker thread): the page computed on the pool, then its JSON model. On a
    machine shared with other work the wall time carries their load; the thread's CPU time does not."""
    from pictrace.duplicates import group_info

    def page() -> tuple[Any, float]:
        cpu = time.thread_time()
        result = fn(*args, **kwargs)
        for group in result[1] if isinstance(result, tuple) else [result]:
            group_info(group)
        return result, (time.thread_time() - cpu) * 1000

    started = time.perf_counter()
    result, cpu_ms = await service.pool.run_background(page)
    return result, (time.perf_counter() - started) * 1000, cpu_ms


async def wait_ready(service: Any, timeout_s: float = 3600) -> float:
    """Seconds until the duplicate groups are ready (the service builds them in the background at start)."""
    started = time.perf_counter()
    while not service.duplicates.ready:
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError("the duplicate groups were not ready in time")
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


async def duplicate_pages(
    service: Any, pages: int = 10, limit: int = 20, keepers_wait_s: float = 300
) -> dict[str, Any]:
    """The duplicate groups' pages as /api/duplicates serves them, once the groups are ready: the first list
    page, pages spread over the list (their keepers chosen on the spot where the background thread has not yet),
    member pages of the largest group, and list pages again once every keeper is chosen."""
    ready_s = await wait_ready(service)
    (total, _), first_ms, first_cpu = await _timed(service, service.duplicates.page, limit=limit)
    times, cpu = [], []
    for k in range(pages):
        offset = (total * k) // pages
        _, ms, cpu_ms = await _timed(service, service.duplicates.page, offset=offset, limit=limit)
        times.append(ms)
        cpu.append(cpu_ms)
    started = time.perf_counter()
    # pages after every keeper is chosen (steady state); on a large first start that can take longer than a
    # bench should wait, and then the pending count is what it reports
    pending = service.duplicates.pending_keepers()
    while pending and time.perf_counter() - started < keepers_wait_s:
        await asyncio.sleep(1.0)
        pending = service.duplicates.pending_keepers()
    keepers_s = time.perf_counter() - started
    steady, steady_cpu = [], []
    for k in range(pages if not pending else 0):
        _, ms, cpu_ms = await _timed(service, service.duplicates.page, offset=(total * k) // pages, limit=limit)
        steady.append(ms)
        steady_cpu.append(cpu_ms)
    sizes = sorted((len(g) for g in service.duplicates._view.groups), reverse=True)
    member_ms, member_cpu = [], []
    if sizes:
        largest = service.duplicates._view.ids[0]
        for offset in sorted({0, sizes[0] // 2, max(0, sizes[0] - 100)}):
            _, ms, cpu_ms = await _timed(service, service.duplicates.group, largest, offset=offset, limit=100)
            member_ms.append(ms)
            member_cpu.append(cpu_ms)
    return {
        "ready_s": round(ready_s, 2),
        "groups": total,
        "grouped_images": sum(sizes),
        "largest_groups": sizes[:10],
        "first_page_ms": round(first_ms, 1),
        "first_page_cpu_ms": round(first_cpu, 1),
        "page_p50_ms": round(statistics.median(times), 1) if times else None,
        "page_max_ms": round(max(times), 1) if times else None,
        "page_cpu_p50_ms": round(statistics.median(cpu), 1) if cpu else None,
        "page_cpu_max_ms": round(max(cpu), 1) if cpu else None,
        "member_page_ms": [round(ms, 1) for ms in member_ms],
        "member_page_cpu_ms": [round(ms, 1) for ms in member_cpu],
        "keepers_all_chosen_s": None if pending else round(ready_s + keepers_s, 1),
        "keepers_pending": pending,
        "page_p50_ms_after": round(statistics.median(steady), 1) if steady else None,
        "page_max_ms_after": round(max(steady), 1) if steady else None,
        "page_cpu_p50_ms_after": round(statistics.median(steady_cpu), 1) if steady_cpu else None,
        "page_cpu_max_ms_after": round(max(steady_cpu), 1) if steady_cpu else None,
    }


async def run(data_dir: Path, pages: int, limit: int) -> dict[str, Any]:
    from pictrace.config import Settings
    from pictrace.service import Service

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=data_dir, index_on_start=False, sync_interval_s=0
    )
    started = time.perf_counter()
    service = await Service.start(settings)
    start_s = time.perf_counter() - started
    try:
        images = (await asyncio.to_thread(service.catalogue.counts))[0]
        out = await duplicate_pages(service, pages, limit)
        return {"images": images, "start_s": round(start_s, 2), **out}
    finally:
        await service.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_dir", type=Path, help="an existing PicTrace data dir (its catalogue holds the links)")
    ap.add_argument("--pages", type=int, default=10, help="list pages spread over the groups")
    ap.add_argument("--limit", type=int, default=20, help="groups a list page")
    ap.add_argument("--out", type=Path, help="JSON file (default bench/results/duplicates_paging_<N>.json)")
    a = ap.parse_args()
    result = asyncio.run(run(a.data_dir, a.pages, a.limit))
    print(f"images           {result['images']:,}")
    print(f"start            {result['start_s']:.2f} s (the groups are built after it, in the background)")
    print(f"groups ready     {result['ready_s']:.2f} s after the start")
    print(f"groups           {result['groups']:,} ({result['grouped_images']:,} images)")
    print(f"largest groups   {result['largest_groups']}")
    print(
        f"list page        first {result['first_page_ms']:.0f} ms (CPU {result['first_page_cpu_ms']:.0f}), then p50 "
        f"{result['page_p50_ms']:.0f} ms, max {result['page_max_ms']:.0f} ms (CPU p50 "
        f"{result['page_cpu_p50_ms']:.0f}, max {result['page_cpu_max_ms']:.0f}; {a.limit} groups a page)"
    )
    print(
        f"member pages     {result['member_page_ms']} ms, CPU {result['member_page_cpu_ms']} ms (100 members of the"
        " largest group)"
    )
    if result["keepers_pending"]:
        print(f"every keeper     not yet: {result['keepers_pending']:,} groups' keepers still to choose")
    else:
        print(
            f"every keeper     chosen {result['keepers_all_chosen_s']:.0f} s after the start; list pages then p50 "
            f"{result['page_p50_ms_after']:.0f} ms, max {result['page_max_ms_after']:.0f} ms (CPU p50 "
            f"{result['page_cpu_p50_ms_after']:.0f}, max {result['page_cpu_max_ms_after']:.0f})"
        )
    out = a.out or Path(__file__).parent / "results" / f"duplicates_paging_{result['images']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
