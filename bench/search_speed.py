"""Ingest throughput and search latency at several gallery sizes, against the original PicTrace's way.

Galleries are made in code from scikit-image's bundled photos (random crops, scales and colour shifts, so every
image has distinct bytes) and served over HTTP on 127.0.0.1. For each size it reports ingest images/s and search
p50/p95 (single client, after warm-up) next to the embed-only time of one image, the floor of any search.
The original PicTrace downloaded and scored every gallery image (embedding, SSIM, ORB) on every query: that is
timed at the smaller sizes and the ratio printed.

    python bench/search_speed.py [--sizes 100 1000 10000] [--baseline-sizes 100 1000] [--queries 50]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.config import Settings
from pictrace.decode import decode_image
from pictrace.features.orb import extract_orb, match_orb
from pictrace.features.ssim import gray256, ssim_score
from pictrace.gallery import load_gallery
from pictrace.service import Service

RESULTS = Path(__file__).resolve().parent / "results"


def base_photos() -> list[np.ndarray]:
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick",
             "grass", "gravel", "hubble_deep_field", "retina", "horse", "clock"]
    out = []
    for name in names:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    return out


def variant(photos: list[np.ndarray], i: int, side: int) -> bytes:
    """A distinct gallery image: a random crop of a base photo, resized, colour-shifted, JPEG-encoded."""
    rng = np.random.default_rng(i)
    src = photos[i % len(photos)]
    h, w = src.shape[:2]
    f = rng.uniform(0.45, 0.9)
    ch, cw = int(h * f), int(w * f)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = src[y : y + ch, x : x + cw].astype(np.int16) + rng.integers(-25, 25, size=3)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    pil.thumbnail((side, side))
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=int(rng.integers(70, 95)))
    return buf.getvalue()


def query_of(data: bytes, i: int) -> bytes:
    """An edited copy of a gallery image: crop + recompression (what users search with)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    rng = np.random.default_rng(10_000 + i)
    f = rng.uniform(0.6, 0.85)
    x, y = int(rng.integers(0, int(w * (1 - f)) + 1)), int(rng.integers(0, int(h * (1 - f)) + 1))
    img = img.crop((x, y, x + int(w * f), y + int(h * f)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=40)
    return buf.getvalue()


class Server:
    def __init__(self, files: dict[str, bytes]) -> None:
        files_ = files

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = files_.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def original_way(service: Service, query: bytes, urls: list[str]) -> float:
    """One query answered like the original: download and score every gallery image (embedding, SSIM, ORB)."""
    settings = service.settings
    started = time.perf_counter()
    q = decode_image(query, max_pixels=settings.max_pixels)
    q_emb = service.embedder.embed([q.rgb])[0]
    tuning = service.tuning
    q_gray, q_orb = gray256(q.rgb), extract_orb(q.rgb, n_features=tuning.orb.features)
    scores = []
    for url in urls:
        data = await service.fetcher.fetch_gallery(url)
        g = decode_image(data, max_pixels=settings.max_pixels)
        emb = float(service.embedder.embed([g.rgb])[0] @ q_emb)
        ssim = ssim_score(q_gray, gray256(g.rgb))
        orb = match_orb(q_orb, extract_orb(g.rgb, n_features=tuning.orb.features)).score
        scores.append(emb + ssim + orb)
    np.argsort(scores)
    return (time.perf_counter() - started) * 1000


async def run_size(n: int, n_queries: int, side: int, baseline: bool, photos: list[np.ndarray]) -> dict[str, Any]:
    files = {f"/g/{i}.jpg": variant(photos, i, side) for i in range(n)}
    server = Server(files)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "db.json"
        db.write_text(json.dumps([{"id": str(i), "url": f"{server.base}/g/{i}.jpg"} for i in range(n)]))
        settings = Settings(_env_file=None, data_dir=Path(tmp) / "data", db=db, index_on_start=False)  # type: ignore[call-arg]
        service = await Service.start(settings)
        try:
            started = time.perf_counter()
            report = await service.ingestor.ingest_gallery(load_gallery(db))
            ingest_s = time.perf_counter() - started
            assert report.added + report.duplicates == n and not report.failed, report
            rng = np.random.default_rng(n)
            picks = rng.choice(n, size=min(n_queries, n), replace=False)
            queries = [(int(i), query_of(files[f"/g/{i}.jpg"], int(i))) for i in picks]
            for _, q in queries[:3]:  # warm-up
                service.searcher.search_bytes(q)
            latencies, same_image, same_photo = [], 0, 0
            for i, q in queries:
                t0 = time.perf_counter()
                result = service.searcher.search_bytes(q)
                latencies.append((time.perf_counter() - t0) * 1000)
                if result.results:
                    best = int(result.results[0].id)
                    same_image += best == i
                    # gallery images are overlapping crops of a few photos: another crop of the same photo
                    # that holds the query's region is a right answer too
                    same_photo += best % len(photos) == i % len(photos)
            one = decode_image(queries[0][1], max_pixels=settings.max_pixels).rgb
            embed_ms = []
            for _ in range(20):
                t0 = time.perf_counter()
                service.embedder.embed([one])
                embed_ms.append((time.perf_counter() - t0) * 1000)
            row: dict[str, Any] = {
                "images": n,
                "ingest_s": round(ingest_s, 2),
                "ingest_img_per_s": round(n / ingest_s, 1),
                "search_p50_ms": round(pct(latencies, 50), 1),
                "search_p95_ms": round(pct(latencies, 95), 1),
                "embed_only_ms": round(statistics.median(embed_ms), 1),
                "top1_same_image": round(same_image / len(queries), 3),
                "top1_same_photo": round(same_photo / len(queries), 3),
            }
            if baseline:
                urls = [f"{server.base}/g/{i}.jpg" for i in range(n)]
                original = [await original_way(service, q, urls) for _, q in queries[:3]]
                row["original_ms"] = round(statistics.median(original), 1)
                row["speedup"] = round(row["original_ms"] / row["search_p50_ms"], 1)
            return row
        finally:
            await service.close()
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--baseline-sizes", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--side", type=int, default=320, help="longest side of gallery images (px)")
    args = parser.parse_args()
    photos = base_photos()
    rows = []
    for n in args.sizes:
        row = asyncio.run(run_size(n, args.queries, args.side, n in args.baseline_sizes, photos))
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["images", "ingest_img_per_s", "search_p50_ms", "search_p95_ms", "embed_only_ms", "top1_same_photo",
            "original_ms", "speedup"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "–")) for c in cols) + " |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "search_speed.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
