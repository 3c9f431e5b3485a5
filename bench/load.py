"""Load test: N concurrent clients for T seconds against a running PicTrace, with the server's memory watched.

Each client uploads query images (demo/queries/ and the demo gallery) to POST /api/search in a loop; a probe
times GET /api/health every 100 ms from a separate process. Reports requests/s, p50/p99 latency per status,
the status counts, health latency, and the server's RSS over the run (start, peak, end: memory must stay
flat). With N well above capacity the only statuses must be 200 and 503 (with Retry-After).

    python bench/load.py --serve --clients 64 --seconds 30          # starts `python app.py` on the demo gallery
    python bench/load.py --url http://127.0.0.1:5000 --pid PID --clients 8 --seconds 20
    python bench/load.py --serve --flood 32 --clients 2 --seconds 30   # 32 clients sending 49.99 MP images

``--flood N`` adds N clients that upload 49.99 MP images (a PNG and a JPEG, under the 50 MP cap, alternately)
beside the normal clients; statuses and latencies are then reported per kind ("flood 200", "normal 503"...), and
the server's RSS before the run, at its peak and 5 s after it.

``--serve`` runs the server in a fresh temp data dir (PICTRACE_DATA_DIR) on a free port, waits for the demo
gallery to be indexed, runs the load and stops it. Results are printed and written to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def query_images() -> list[tuple[str, bytes]]:
    paths = sorted((ROOT / "demo" / "queries").glob("*.jpg")) + sorted((ROOT / "demo" / "gallery").glob("*.jpg"))
    return [(p.name, p.read_bytes()) for p in paths]


def flood_images() -> list[tuple[str, bytes]]:
    """A 49.99 MP PNG and JPEG (7070 x 7070), small on the wire: decoding each costs ~150 MB of pixels."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (7070, 7070), (200, 180, 160))
    draw = ImageDraw.Draw(image)
    for i in range(0, 7070, 400):
        draw.rectangle((i, i // 2, i + 200, i // 2 + 300), fill=(i % 255, 40, 90))
    out = []
    for fmt, options in (("PNG", {"compress_level": 9}), ("JPEG", {"quality": 70})):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        out.append((f"flood.{fmt.lower()}", buffer.getvalue()))
    return out


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, from /proc (Linux)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(workers: int | None, queue_limit: int | None) -> Iterator[tuple[str, int]]:
    """`python app.py` on the demo gallery, in a temp data dir; yields (base URL, pid) once it is indexed."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pictrace-load-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PICTRACE_")}
        env.update(
            PICTRACE_PORT=str(port), PICTRACE_DATA_DIR=str(Path(tmp) / "data"), PICTRACE_DB=str(ROOT / "db.json")
        )
        if workers:
            env["PICTRACE_WORKERS"] = str(workers)
        if queue_limit:
            env["PICTRACE_QUEUE_LIMIT"] = str(queue_limit)
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"server exited: {(Path(tmp) / 'server.log').read_text()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    images = httpx.get(f"{base}/api/health", timeout=2).json()["images"]
                    if images["indexed"] > 0 and images["pending"] == 0:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("gallery not indexed in 300 s")
                time.sleep(0.5)
            yield base, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def probe_health(base: str, seconds: float, out: Any) -> None:
    """GET /api/health every 100 ms for ``seconds``; put the latencies (ms) on ``out``."""
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=60) as http:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                http.get("/api/health")
                latencies.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.1)
    out.put(latencies)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(base: str, pid: int | None, clients: int, seconds: float, flood: int = 0) -> dict[str, Any]:
    images = query_images()
    huge = flood_images() if flood else []
    rss_before = rss_kib(pid)[0] if pid is not None else None
    statuses: Counter[str] = Counter()
    latency: dict[str, list[float]] = defaultdict(list)
    missing_retry_after = 0
    health_ms: list[float] = []
    rss: list[tuple[float, int]] = []
    started = time.monotonic()
    stop_at = started + seconds
    limits = httpx.Limits(max_connections=clients + flood + 2, max_keepalive_connections=clients + flood + 2)

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:

        async def client(i: int, kind: str = "") -> None:
            nonlocal missing_retry_after
            n = i
            sent = huge if kind == "flood" else images
            while time.monotonic() < stop_at:
                name, data = sent[n % len(sent)]
                n += 1
                t0 = time.perf_counter()
                try:
                    response = await http.post("/api/search", files={"file": (name, data, "image/jpeg")})
                    key = f"{kind} {response.status_code}".strip()
                    if response.status_code == 503 and not response.headers.get("retry-after", "").isdigit():
                        missing_retry_after += 1
                except httpx.HTTPError as exc:
                    key = f"{kind} {type(exc).__name__}".strip()
                statuses[key] += 1
                latency[key].append((time.perf_counter() - t0) * 1000)

        async def memory() -> None:
            while pid is not None and time.monotonic() < stop_at:
                rss.append((time.monotonic() - started, rss_kib(pid)[0]))
                await asyncio.sleep(0.25)

        # health is probed from another process: this one's event loop is busy driving the clients
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        prober = ctx.Process(target=probe_health, args=(base, seconds, results))
        prober.start()
        kinds = ("normal", "flood") if flood else ("", "")
        await asyncio.gather(
            *(client(i, kinds[0]) for i in range(clients)), *(client(i, kinds[1]) for i in range(flood)), memory()
        )
        health_ms.extend(await asyncio.to_thread(results.get, True, 60))
        prober.join(10)
    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    result: dict[str, Any] = {
        "clients": clients,
        "flood_clients": flood,
        "seconds": round(elapsed, 1),
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "ok_per_s": round(statuses["200"] / elapsed, 1),
        "statuses": dict(statuses),
        "latency_ms": {
            k: {"p50": round(pct(v, 0.5), 1), "p99": round(pct(v, 0.99), 1), "n": len(v)} for k, v in latency.items()
        },
        "missing_retry_after": missing_retry_after,
        "health_ms": {
            "p50": round(pct(health_ms, 0.5), 1),
            "p99": round(pct(health_ms, 0.99), 1),
            "max": round(max(health_ms, default=float("nan")), 1),
            "n": len(health_ms),
        },
        "only_200_and_503": {k.split()[-1] for k in statuses} <= {"200", "503"},
    }
    if pid is not None and rss:
        values = [v for _, v in rss]
        quarter = values[len(values) // 4 :]
        result["rss_mib"] = {
            "start": round(values[0] / 1024, 1),
            "peak": round(max(values) / 1024, 1),
            "end": round(values[-1] / 1024, 1),
            "after_first_quarter_min": round(min(quarter) / 1024, 1),
            "after_first_quarter_max": round(max(quarter) / 1024, 1),
            "hwm_process_lifetime": round(rss_kib(pid)[1] / 1024, 1),
        }
        if rss_before is not None:
            await asyncio.sleep(5)
            result["rss_mib"]["before"] = round(rss_before / 1024, 1)
            result["rss_mib"]["after_5s"] = round(rss_kib(pid)[0] / 1024, 1)
    return result


def print_table(result: dict[str, Any]) -> None:
    flood = f" + {result['flood_clients']} flooding with 49.99 MP images" if result.get("flood_clients") else ""
    print(
        f"\n{result['clients']} clients{flood} x {result['seconds']} s: {result['requests']} requests, "
        f"{result['requests_per_s']} req/s ({result['ok_per_s']} answered 200/s)"
    )
    print(f"{'status':>12} {'count':>8} {'p50 ms':>9} {'p99 ms':>9}")
    for status, count in sorted(result["statuses"].items()):
        lat = result["latency_ms"][status]
        print(f"{status:>12} {count:>8} {lat['p50']:>9.1f} {lat['p99']:>9.1f}")
    h = result["health_ms"]
    print(f"health: p50 {h['p50']} ms, p99 {h['p99']} ms, max {h['max']} ms over {h['n']} probes")
    if "rss_mib" in result:
        m = result["rss_mib"]
        print(
            f"server RSS MiB: before {m.get('before')}, start {m['start']}, peak {m['peak']}, end {m['end']}, "
            f"5 s after {m.get('after_5s')} "
            f"(after the first quarter: {m['after_first_quarter_min']}..{m['after_first_quarter_max']})"
        )
    print(f"only 200 and 503: {result['only_200_and_503']}; 503 without Retry-After: {result['missing_retry_after']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="base URL of a running server (default: --serve)")
    parser.add_argument("--pid", type=int, help="server process id, to watch its memory")
    parser.add_argument("--serve", action="store_true", help="start `python app.py` on the demo gallery")
    parser.add_argument("--clients", type=int, nargs="+", default=[64], help="concurrent clients (one run each)")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--flood", type=int, default=0, help="clients uploading 49.99 MP images beside them")
    parser.add_argument("--workers", type=int, help="PICTRACE_WORKERS for --serve")
    parser.add_argument("--queue-limit", type=int, help="PICTRACE_QUEUE_LIMIT for --serve")
    args = parser.parse_args()
    if not args.serve and not args.url:
        parser.error("give --url (and --pid) of a running server, or --serve")
    results = []
    with contextlib.ExitStack() as stack:
        if args.serve:
            base, pid = stack.enter_context(serve(args.workers, args.queue_limit))
        else:
            base, pid = args.url.rstrip("/"), args.pid
        for clients in args.clients:
            result = asyncio.run(run_load(base, pid, clients, args.seconds, args.flood))
            print_table(result)
            results.append(result)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"command": sys.argv, "runs": results}, indent=2))
    print(f"\nwritten {out.relative_to(ROOT)}")
    return 0 if all(r["only_200_and_503"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
