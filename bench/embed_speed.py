"""Embedding speed of each backbone: ms per image at batch 1 (a query) and batch 16 (ingest), plus start time.

Rounds alternate the backbones, so on a shared machine both see the same load; the best (minimum) time is the
least disturbed one, the median the typical one. Both go through ``build_embedder`` exactly as the service
does, so the times include preprocessing (resize and normalisation) of scikit-image's bundled photos at their
own sizes. ResNet50 uses ``PICTRACE_RESNET50_WEIGHTS`` or Keras' cached ImageNet file when there is one, else
random weights saved to a temporary file: speed does not depend on what the weights hold.

    python bench/embed_speed.py [--backbones efficientnet-lite2 resnet50] [--threads 2] [--repeats 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.config import DEFAULT_MODEL
from pictrace.features.embed import Embedder, build_embedder

RESULTS = Path(__file__).resolve().parent / "results"


def photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick"]:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    return out


def resnet50_weights(tmp: Path, threads: int) -> tuple[Path, str]:
    """The weights to time with, and where they came from."""
    from pictrace.features.keras_resnet import IMAGENET_NOTOP_FILE, build_resnet50, configure_threads, keras_cache_dir

    configure_threads(threads)  # before TensorFlow runs anything, as the service does
    explicit = os.environ.get("PICTRACE_RESNET50_WEIGHTS")
    if explicit:
        return Path(explicit), "PICTRACE_RESNET50_WEIGHTS"
    cached = keras_cache_dir() / "models" / IMAGENET_NOTOP_FILE
    if cached.is_file():
        return cached, "keras cache (imagenet)"
    path = tmp / "random.weights.h5"
    build_resnet50(None).save_weights(path)
    return path, "random (no imagenet file here)"


def time_per_image(embedder: Embedder, batch: list[np.ndarray]) -> tuple[float, float]:
    """(wall ms, CPU ms) per image; CPU time (all threads) hardly changes when other processes share the cores."""
    start, cpu = time.perf_counter(), time.process_time()
    embedder.embed(batch)
    return (time.perf_counter() - start) * 1000 / len(batch), (time.process_time() - cpu) * 1000 / len(batch)


def build(backbone: str, threads: int, tmp: Path) -> tuple[Embedder, str, float]:
    weights, source = (None, "bundled onnx") if backbone != "resnet50" else resnet50_weights(tmp, threads)
    start = time.perf_counter()
    embedder = build_embedder(backbone, DEFAULT_MODEL, threads=threads, resnet50_weights=weights)
    return embedder, source, time.perf_counter() - start


def bench(
    embedders: dict[str, Embedder], images: list[np.ndarray], repeats: int
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Rounds that alternate the backbones, so a busy machine slows them alike and their ratio holds."""
    batches = {1: [[img] for img in images[:4]], 16: [[images[i % len(images)] for i in range(16)]]}
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {name: {"1": [], "16": []} for name in embedders}
    for embedder in embedders.values():  # warm-up: first calls trace graphs and fill caches
        for size in batches:
            embedder.embed(batches[size][0])
    for round_ in range(repeats):
        for name, embedder in embedders.items():
            samples[name]["1"].append(time_per_image(embedder, batches[1][round_ % 4]))
            if round_ % 4 == 0:
                samples[name]["16"].append(time_per_image(embedder, batches[16][0]))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet-lite2", "resnet50"])
    parser.add_argument("--threads", type=int, default=2, help="PICTRACE_EMBED_THREADS")
    parser.add_argument("--repeats", type=int, default=40, help="batch-1 calls per backbone (batch 16: a quarter)")
    args = parser.parse_args()
    images = photos()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = {name: build(name, args.threads, Path(tmp)) for name in args.backbones}
        samples = bench({name: b[0] for name, b in built.items()}, images, args.repeats)
    for name, (embedder, source, start_s) in built.items():
        b1, b16 = [w for w, _ in samples[name]["1"]], [w for w, _ in samples[name]["16"]]
        cpu1, cpu16 = [c for _, c in samples[name]["1"]], [c for _, c in samples[name]["16"]]
        rows.append(
            {
                "backbone": name,
                "dim": embedder.dim,
                "weights": source,
                "start_s": round(start_s, 2),
                "ms_per_img_b1_median": round(statistics.median(b1), 1),
                "ms_per_img_b1_best": round(min(b1), 1),
                "ms_per_img_b16_median": round(statistics.median(b16), 1),
                "ms_per_img_b16_best": round(min(b16), 1),
                "img_per_s_b16_best": round(1000 / min(b16), 1),
                "cpu_ms_per_img_b1": round(statistics.median(cpu1), 1),
                "cpu_ms_per_img_b16": round(statistics.median(cpu16), 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "embed_speed.json"
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_after": os.getloadavg()}
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
