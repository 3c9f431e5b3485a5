"""Ingest speed against its floor: the product's ingest of N images, and the least work any ingest of them must do.

On the same files, in the same run:

* **floor**: read, decode (``decode_image``, the product's), resize and embed with the product's ONNX model in
  batches of 16 on 2 onnxruntime threads, the decoding of the next images on 2 threads beside the embedding.
  Measured before and after the ingest; the ratio uses their mean, so load that drifts during the run (a shared
  machine) weighs on both sides alike.
* **ingest**: ``python -m pictrace index DB`` (``pictrace.cli.main``, the same path) into a fresh data dir, from
  its start to its exit: decode, local features, embedding, commits, both indexes, relearning the local lists,
  the match-graph links, saving.

Prints both images/s, their ratio, and where the ingest's time went: each step's busy seconds summed over the
threads that ran it (calls timed where the product makes them), and the process's CPU seconds over its wall
time (2.0: both cores busy throughout). Writes bench/results/ingest_speed.json (or ``--out``).

Input: a db.json or a folder; its first ``--limit`` local entries (default 1,000). The default input is
/work/d10k/db.json, the first 1,000 of a 10,000-image real-content gallery (JPEGs 480-1280 px) made by the
shared eval's make_distractors.py; pass another path where that does not exist. ``--code DIR`` runs the
product from another checkout (e.g. ``git archive main | tar -x -C /tmp/main``) for a before/after.

    python bench/ingest_speed.py [/work/d10k/db.json] [--limit 1000] [--code DIR] [--tuning FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_SOURCE = Path("/work/d10k/db.json")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE, help="db.json or folder")
    parser.add_argument("--limit", type=int, default=1000, help="first N local entries (default 1000)")
    parser.add_argument("--batch", type=int, default=16, help="the floor's embedding batch")
    parser.add_argument("--threads", type=int, default=2, help="the floor's onnxruntime and decoding threads")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose pictrace/ is measured")
    parser.add_argument("--tuning", type=Path, help="a tuning JSON file for the ingest (pictrace/tuning.py)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest_speed.json")
    return parser.parse_args()


class StepTimes:
    """Busy seconds per step, summed over threads: each wrapped call adds its own wall time, and the CPU time
    of the thread that made it (on a machine shared with other work, wall time includes waiting for a core)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)  # the calling thread's CPU (onnxruntime's own threads not)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.cpu.clear()
            self.calls.clear()

    def wrap(self, owner: Any, name: str, step: str) -> None:
        """Time ``owner.name`` (a module's function or a class's method) as ``step``; absent names are skipped,
        so an older checkout is measured where it has the step."""
        original = getattr(owner, name, None)
        if original is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent, used = time.perf_counter() - started, time.thread_time() - cpu
                with self._lock:
                    self.seconds[step] += spent
                    self.cpu[step] += used
                    self.calls[step] += 1

        setattr(owner, name, timed)


def _instrument(times: StepTimes) -> None:
    """Wrap the product's steps where the ingest calls them (module globals it looked up by name)."""
    import pictrace.graph
    import pictrace.ingest
    from pictrace.features.embed import OnnxEmbedder
    from pictrace.indexes.keeper import DerivedIndexes
    from pictrace.store import Catalogue

    for name, step in [
        ("read_local_file", "read"),
        ("decode_image", "decode"),
        ("local_features", "features"),
        ("sha256_hex", "sha256"),
        ("find_links", "link: find"),
        ("link_candidates", "link: votes"),
        ("verify_links", "link: match"),
    ]:
        times.wrap(pictrace.ingest, name, step)
    times.wrap(pictrace.graph, "find_links", "link: find")  # before: link_images called it from graph.py
    times.wrap(OnnxEmbedder, "embed", "embed (resize + model)")
    for name in ("add_image", "link_source", "record_file_stats"):
        times.wrap(Catalogue, name, "commit")
    times.wrap(Catalogue, "add_links", "link: store")
    times.wrap(DerivedIndexes, "add", "index add")
    times.wrap(DerivedIndexes, "_relearn_local", "relearn local lists")
    times.wrap(DerivedIndexes, "save", "save indexes")


def _entries(source: Path, limit: int) -> list[Path]:
    from pictrace.gallery import load_gallery

    gallery = load_gallery(source)
    local = [Path(e.location) for e in gallery.entries if not e.is_remote]
    if not local:
        sys.exit(f"{source}: no local files")
    return local[:limit]


def _write_db(files: list[Path], workdir: Path) -> Path:
    db = workdir / "db.json"
    rows = [{"id": f.stem, "url": os.path.relpath(f, workdir)} for f in files]
    db.write_text(json.dumps(rows))
    return db


def floor_rate(files: list[Path], batch: int, threads: int) -> tuple[float, float]:
    """(images/s, process CPU s) of read + decode + resize + embed, the decoding beside the embedding."""
    from pictrace.config import load_settings
    from pictrace.decode import decode_image
    from pictrace.features.embed import build_embedder
    from pictrace.tuning import Tuning

    settings, tuning = load_settings(), Tuning()
    started, cpu = time.perf_counter(), time.process_time()
    embedder = build_embedder(settings.backbone, settings.model_path, threads=threads)

    def decoded(path: Path) -> Any:
        image = decode_image(
            path.read_bytes(), max_pixels=settings.max_pixels, draft_min_side=tuning.decoding.draft_min_side
        )
        return image.rgb

    def batches(pool: ThreadPoolExecutor) -> Iterator[list[Any]]:
        pending = [pool.submit(decoded, f) for f in files[: 2 * batch]]
        at = len(pending)
        while pending:
            take, pending = pending[:batch], pending[batch:]
            pending += [pool.submit(decoded, f) for f in files[at : at + batch]]
            at += batch
            yield [f.result() for f in take]

    with ThreadPoolExecutor(threads) as pool:
        for pixels in batches(pool):
            embedder.embed(pixels)
    return len(files) / (time.perf_counter() - started), time.process_time() - cpu


def _ingest(db: Path, data_dir: Path, tuning: Path | None = None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``python -m pictrace [--tuning FILE] index DB`` into ``data_dir``."""
    from pictrace.cli import main

    cpu, started = time.process_time(), time.perf_counter()
    fitted = ["--tuning", str(tuning)] if tuning is not None else []
    code = main(["--data-dir", str(data_dir), *fitted, "index", str(db), "--quiet"])
    if code != 0:
        sys.exit(f"pictrace index exited with {code}")
    return time.perf_counter() - started, time.process_time() - cpu


def _counts(data_dir: Path) -> dict[str, int]:
    import sqlite3

    conn = sqlite3.connect(data_dir / "catalogue.sqlite3")
    try:
        images = conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        links = conn.execute("SELECT COUNT(*) FROM links WHERE vec_id < other").fetchone()[0]
    finally:
        conn.close()
    return {"images": int(images), "links": int(links)}


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in pairs]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    args = _arguments()
    sys.path.insert(0, str(args.code.resolve()))
    import pictrace

    files = _entries(args.source, args.limit)
    for f in files:  # the page cache warm for both measurements
        f.read_bytes()
    times = StepTimes()
    _instrument(times)
    with tempfile.TemporaryDirectory(prefix="ingest-speed-") as tmp:
        workdir = Path(tmp)
        db = _write_db(files, workdir)
        floor_before, floor_cpu_before = floor_rate(files, args.batch, args.threads)
        times.reset()  # the floor's embeddings are not the ingest's
        wall, cpu = _ingest(db, workdir / "data", args.tuning)
        ingest_steps, ingest_cpu, ingest_calls = dict(times.seconds), dict(times.cpu), dict(times.calls)
        floor_after, floor_cpu_after = floor_rate(files, args.batch, args.threads)
        counts = _counts(workdir / "data")
    floor = (floor_before + floor_after) / 2
    floor_cpu_ms = (floor_cpu_before + floor_cpu_after) / 2 / len(files) * 1000
    ingest_cpu_ms = cpu / len(files) * 1000
    ingest = len(files) / wall
    steps = dict(sorted(ingest_steps.items(), key=lambda kv: -kv[1]))
    result: dict[str, Any] = {
        "source": str(args.source),
        "images": len(files),
        "code": str(Path(pictrace.__file__).resolve().parent.parent),
        "tuning": str(args.tuning) if args.tuning else None,
        "floor_images_per_s": round(floor, 2),
        "floor_before_after": [round(floor_before, 2), round(floor_after, 2)],
        "ingest_images_per_s": round(ingest, 2),
        "ratio": round(ingest / floor, 3),
        "ingest_wall_s": round(wall, 2),
        "ingest_cpu_s": round(cpu, 2),
        "cores_busy": round(cpu / wall, 2),
        "floor_cpu_ms_per_image": round(floor_cpu_ms, 1),
        "ingest_cpu_ms_per_image": round(ingest_cpu_ms, 1),
        "cpu_ratio": round(floor_cpu_ms / ingest_cpu_ms, 3),
        "step_busy_s": {k: round(v, 2) for k, v in steps.items()},
        "step_thread_cpu_s": {k: round(ingest_cpu.get(k, 0.0), 2) for k in steps},
        "step_calls": ingest_calls,
        "stored": counts,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(f"{len(files)} images from {args.source}; product code: {result['code']}")
    print(f"floor : {floor:6.1f} images/s (before {floor_before:.1f}, after {floor_after:.1f})")
    print(f"ingest: {ingest:6.1f} images/s ({wall:.1f} s, {cpu:.1f} CPU s: {cpu / wall:.2f} cores busy)")
    print(f"ratio : {ingest / floor:.3f} of the floor; stored {counts['images']} images, {counts['links']} links")
    print(
        f"CPU   : floor {floor_cpu_ms:.1f} ms/image, ingest {ingest_cpu_ms:.1f} ms/image "
        f"(ratio {floor_cpu_ms / ingest_cpu_ms:.3f}: the most the wall ratio can reach on idle cores)\n"
    )
    rows = [("step", "busy s", "thread CPU s", "share of wall")]
    rows += [(k, f"{v:.1f}", f"{ingest_cpu.get(k, 0.0):.1f}", f"{v / wall:.0%}") for k, v in steps.items()]
    print(_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
