"""Embedding speed of each backbone: ms per image at batch 1 (a query) and batch 16 (ingest), plus start time.

Both go through ``build_embedder`` exactly as the service does, so the times include preprocessing (resize and
normalisation) of scikit-image's bundled photos at their own sizes. ResNet50 uses ``PICTRACE_RESNET50_WEIGHTS``
or Keras' cached ImageNet file when there is one, else random weights saved to a temporary file: speed does not
depend on what the weights hold.

    python bench/embed_speed.py [--backbones efficientnet-lite2 resnet50] [--threads 2] [--repeats 20]
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
from typing import Any

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


def time_per_image(embedder: Embedder, batch: list[np.ndarray], repeats: int) -> float:
    """Median wall ms per image over ``repeats`` calls, after two warm-up calls."""
    for _ in range(2):
        embedder.embed(batch)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.embed(batch)
        samples.append((time.perf_counter() - start) * 1000 / len(batch))
    return statistics.median(samples)


def bench(backbone: str, threads: int, repeats: int, images: list[np.ndarray], tmp: Path) -> dict[str, Any]:
    weights, source = (None, "bundled onnx") if backbone != "resnet50" else resnet50_weights(tmp, threads)
    start = time.perf_counter()
    embedder = build_embedder(backbone, DEFAULT_MODEL, threads=threads, resnet50_weights=weights)
    start_s = time.perf_counter() - start
    batch16 = [images[i % len(images)] for i in range(16)]
    ms1 = statistics.median(time_per_image(embedder, [img], repeats) for img in images[:4])
    ms16 = time_per_image(embedder, batch16, max(3, repeats // 4))
    return {
        "backbone": backbone,
        "dim": embedder.dim,
        "weights": source,
        "start_s": round(start_s, 2),
        "ms_per_img_batch1": round(ms1, 1),
        "ms_per_img_batch16": round(ms16, 1),
        "img_per_s_batch16": round(1000 / ms16, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet-lite2", "resnet50"])
    parser.add_argument("--threads", type=int, default=2, help="PICTRACE_EMBED_THREADS")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    images = photos()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            rows.append(bench(backbone, args.threads, args.repeats, images, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "embed_speed.json"
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()}
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
