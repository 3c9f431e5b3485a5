"""A folder as the gallery: the first index of N photos, then re-scans (nothing changed; a few moved; a few changed).

N distinct 320x240 JPEGs are made in a temp dir from scikit-image's sample photos (a random crop of each, rescaled,
so no two share their pixels), in sub-folders of 100. One service indexes the folder (what `pictrace index
FOLDER` does after its start-up), then re-scans it: with nothing changed (only a `stat` per file), after
renaming 1% of the files (linked to their stored bytes: nothing decoded or embedded), and after rewriting 1% (read,
decoded, embedded again; their old images dropped).

    python bench/folder_scan.py [--files 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.config import Settings
from pictrace.gallery import load_gallery
from pictrace.service import Service

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = (320, 240)
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick",
          "hubble_deep_field", "motorcycle_left", "retina", "page", "text", "moon"]  # fmt: skip


def sample_photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTOS:
        try:
            image = getattr(data, name)()
        except Exception:  # a sample that needs pooch (a download) is left out
            continue
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        out.append(np.ascontiguousarray(image[..., :3].astype(np.uint8)))
    return out


def make_jpeg(photo: np.ndarray, rng: np.random.Generator) -> bytes:
    h, w = photo.shape[:2]
    fraction = rng.uniform(0.35, 0.9)
    ch, cw = int(h * fraction), int(w * fraction)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(photo[y : y + ch, x : x + cw]).resize(SIZE, Image.BILINEAR)
    buffer = io.BytesIO()
    crop.save(buffer, "JPEG", quality=int(rng.integers(80, 95)))
    return buffer.getvalue()


def make_folder(root: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    paths = []
    for i in range(n):
        folder = root / f"album-{i // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"IMG_{i:05d}.jpg"
        path.write_bytes(make_jpeg(photos[i % len(photos)], rng))
        paths.append(path)
    return paths


async def timed_index(service: Service, folder: Path) -> tuple[float, float, Any]:
    """(seconds listing the folder, seconds of the whole re-scan, the ingest report)."""
    start = time.perf_counter()
    gallery = load_gallery(folder)
    listed = time.perf_counter() - start
    report = await service.ingestor.ingest_gallery(gallery)
    return listed, time.perf_counter() - start, report


async def run(n: int, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        paths = make_folder(root, n)
        settings = Settings(_env_file=None, data_dir=Path(tmp) / "data", db=root, index_on_start=False)  # type: ignore[call-arg]
        service = await Service.start(settings)
        try:
            _, first_s, first = await timed_index(service, root)
            assert first.added + first.duplicates == n and not first.failed, first
            noop = [await timed_index(service, root) for _ in range(repeat)]
            assert all(r.unchanged == n and r.added == r.removed == 0 for _, _, r in noop)
            step = max(1, n // (n // 100 or 1))
            moved = paths[::step][: max(1, n // 100)]
            for path in moved:
                path.rename(path.with_name("moved-" + path.name))
            _, moved_s, moved_report = await timed_index(service, root)
            assert moved_report.added == 0 and moved_report.duplicates == len(moved)
            rng = np.random.default_rng(1)
            photos = sample_photos()
            changed = paths[1::step][: max(1, n // 100)]
            for path in changed:
                path.write_bytes(make_jpeg(photos[int(rng.integers(len(photos)))], rng))
            _, changed_s, changed_report = await timed_index(service, root)
            assert changed_report.added == len(changed), changed_report
        finally:
            await service.close()
    noop_total = sorted(total for _, total, _ in noop)
    noop_list = sorted(listed for listed, _, _ in noop)
    return {
        "files": n,
        "size": list(SIZE),
        "first_index_s": first_s,
        "first_index_images_per_s": n / first_s,
        "noop_rescan_s_median": noop_total[len(noop_total) // 2],
        "noop_rescan_listing_s_median": noop_list[len(noop_list) // 2],
        "noop_rescan_runs_s": [total for _, total, _ in noop],
        "moved_files": len(moved),
        "moved_rescan_s": moved_s,
        "changed_files": len(changed),
        "changed_rescan_s": changed_s,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="no-op re-scans to time (the median is shown)")
    args = parser.parse_args()
    result = asyncio.run(run(args.files, args.repeat))
    rows = [
        ("first index", f"{result['first_index_s']:.1f} s", f"{result['first_index_images_per_s']:.1f} images/s"),
        (
            "re-scan, nothing changed",
            f"{result['noop_rescan_s_median'] * 1000:.0f} ms",
            f"listing + stat {result['noop_rescan_listing_s_median'] * 1000:.0f} ms",
        ),
        (f"re-scan, {result['moved_files']} renamed", f"{result['moved_rescan_s'] * 1000:.0f} ms", "not embedded"),
        (f"re-scan, {result['changed_files']} rewritten", f"{result['changed_rescan_s'] * 1000:.0f} ms", "embedded"),
    ]
    print(f"folder of {result['files']} JPEGs, {SIZE[0]}x{SIZE[1]}")
    print(f"{'step':28} {'time':>10}  note")
    for step, took, note in rows:
        print(f"{step:28} {took:>10}  {note}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "folder_scan.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
