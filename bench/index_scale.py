"""Vector index at scale: build time, memory, disk, reopen time, query latency and recall, per backend and mode;
then end-to-end search at a large gallery against the embed-only floor.

Three parts (each can be chosen with --parts):

- ``synthetic``: N random unit vectors of 1280 dimensions (--sizes, default 10k and 100k; 1M works with ~12 GB
  of memory and hours of HNSW build on 2 cores), queries are near-duplicates of gallery vectors (cosine ≈ 0.9).
  Recall is reported two ways: ``r1@10`` (the exact nearest neighbour is in the top 10: FAISS's convention)
  and ``r10@10`` (overlap of the top-10 sets; on random vectors everything but the first is a near tie).
- ``real``: the bundled model's embeddings of a few hundred edited copies of scikit-image's photos, with
  held-out edits as queries, alone and hidden among --real-size vectors made from them (each real vector plus
  noise), which is where approximate indexes must still find the true near-duplicates.
- ``e2e``: a catalogue of --e2e-size images made by replicating real features (each row: the gray image, ORB
  keypoints and thumbnail of a real image, its embedding perturbed, a unique sha256), reused between runs.
  Only the first copy of each real image keeps its ORB descriptors; the other rows get random ones, so that the
  local-feature index holds --e2e-size distinct images (exact copies would all collect the same votes and all
  pass the geometric check, which no real gallery does);
  then the service is started on it (the index built from the catalogue, timed) and real held-out queries are
  searched: p50/p95 of the whole search next to the embed-only time, and where the time goes.

    python bench/index_scale.py [--parts synthetic real e2e] [--sizes 10000 100000] [--modes exact hnsw hnsw-sq8]
                                [--milvus-max 100000] [--real-size 100000] [--e2e-size 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss

from pictrace.config import Settings
from pictrace.decode import decode_image
from pictrace.features.embed import build_embedder
from pictrace.features.extract import local_features
from pictrace.features.orb import OrbFeatures
from pictrace.indexes.vector import FaissIndex, FaissParams, IndexInfo, VectorIndex
from pictrace.store import Catalogue, Source
from pictrace.store.blobs import encode_embedding
from pictrace.store.images import upsert_source
from pictrace.tuning import Tuning

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 1280
K = 50


# --------------------------------------------------------------------------------------------- measuring
def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process and its children (Milvus Lite runs a server process), in MB."""
    pids = [pid or os.getpid()]
    total = 0.0
    while pids:
        p = pids.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                pids.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


OPEN_PROBE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from pictrace.indexes.vector import FaissIndex, FaissParams, IndexInfo
def rss():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
before = rss()
t0, c0 = time.perf_counter(), time.process_time()
index = FaissIndex.open(Path({path!r}), IndexInfo("bench", "bench", {dim}), FaissParams(mode={mode!r}))
print(json.dumps({{"open_s": round(time.perf_counter() - t0, 3), "open_cpu_s": round(time.process_time() - c0, 3),
                  "memory_mb": round(rss() - before, 1)}}))
"""


MILVUS_OPEN_PROBE = """
import json, sys, time
sys.path.insert(0, {root!r})
from pictrace.indexes.vector import IndexInfo
from pictrace.indexes.vector.milvus_index import MilvusIndex
def rss_mb():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
before = rss_mb()
t0, c0 = time.perf_counter(), time.process_time()
index = MilvusIndex({path!r}, IndexInfo("bench", "bench", {dim}))
print(json.dumps({{"open_s": round(time.perf_counter() - t0, 3), "open_cpu_s": round(time.process_time() - c0, 3),
                  "memory_mb": round(rss_mb() - before, 1)}}))
index.close()
"""


def open_in_fresh_process(path: Path, mode: str, dim: int) -> dict[str, Any]:
    """Reopen time and resident memory of the index alone, in a new process (a restarted service)."""
    import subprocess

    here = Path(__file__).resolve().parent
    probe = MILVUS_OPEN_PROBE if mode == "milvus-lite" else OPEN_PROBE
    code = probe.format(root=str(here.parent), path=str(path), dim=dim, mode=mode)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"reopening {path} in a new process failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def noisy(base: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """base + isotropic noise of norm ≈ scale, renormalised (cosine to base ≈ 1/sqrt(1+scale²))."""
    noise = rng.normal(size=base.shape).astype(np.float32) * (scale / np.sqrt(base.shape[1]))
    return unit(base + noise)


def recall(found: np.ndarray, truth: np.ndarray, at: int = 10) -> tuple[float, float]:
    r1 = float(np.mean([truth[i, 0] in found[i, :at] for i in range(len(truth))]))
    r10 = float(np.mean([len(set(found[i, :at]) & set(truth[i, :at])) / at for i in range(len(truth))]))
    return r1, r10


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 50_000):
        out[start : start + 50_000] = unit(rng.normal(size=(min(50_000, n - start), DIM)).astype(np.float32))
    return out


# ------------------------------------------------------------------------------------------ one index
def build(mode: str, vectors: np.ndarray, workdir: Path, params: FaissParams) -> tuple[VectorIndex, dict[str, Any]]:
    gc.collect()
    before = rss_mb()
    info = IndexInfo("bench", "bench", vectors.shape[1])
    ids = np.arange(len(vectors), dtype=np.int64)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    index: VectorIndex
    if mode == "milvus-lite":
        from pictrace.indexes.vector.milvus_index import MilvusIndex

        index = MilvusIndex(str(workdir / "milvus.db"), info)
        for s in range(0, len(ids), 10_000):
            index.add(ids[s : s + 10_000], vectors[s : s + 10_000])
        index.save()
        inserted_s = time.perf_counter() - started
        index.reload()  # wait for the segments' HNSW indexes (built in the background after a flush)
    else:
        path = workdir / f"{mode}.faiss"
        index = FaissIndex(info, path, FaissParams(**{**params.__dict__, "mode": mode}))
        index.rebuild(((ids[s : s + 50_000], vectors[s : s + 50_000]) for s in range(0, len(ids), 50_000)),
                      expected=len(ids))
    build_s = time.perf_counter() - started
    row: dict[str, Any] = {"build_s": round(build_s, 1), "build_vec_per_s": round(len(ids) / build_s)}
    if mode != "milvus-lite":
        t0 = time.perf_counter()
        index.save()
        row["save_s"] = round(time.perf_counter() - t0, 2)
        row["disk_mb"] = round(path.stat().st_size / 1e6, 1)
        row.update(open_in_fresh_process(path, mode, vectors.shape[1]))
    else:
        row["insert_s"] = round(inserted_s, 1)  # build_s adds the index build that the reload waits for
        row["disk_mb"] = round(sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file()) / 1e6, 1)
        row["build_memory_mb"] = round(rss_mb() - before, 1)  # Milvus Lite runs in this process
        index.close()  # single-process: the probe opens the file alone, then this process again
        row.update(open_in_fresh_process(workdir / "milvus.db", mode, vectors.shape[1]))
        from pictrace.indexes.vector.milvus_index import MilvusIndex

        index = MilvusIndex(str(workdir / "milvus.db"), info)
    return index, row


def query(index: VectorIndex, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    faiss.omp_set_num_threads(1)  # as served: one query, one thread
    for q in queries[:5]:
        index.search(q[None, :], K)
    latencies, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = index.search(q[None, :], K)
        latencies.append((time.perf_counter() - t0) * 1000)
        found.append(ids[0])
    r1, r10 = recall(np.array(found), truth)
    return {"p50_ms": round(pct(latencies, 50), 2), "p95_ms": round(pct(latencies, 95), 2),
            "r1@10": round(r1, 3), "r10@10": round(r10, 3)}


def exact_truth(gallery: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, truth = faiss.knn(queries, gallery, k, metric=faiss.METRIC_INNER_PRODUCT)
    return truth


def run_modes(label: str, gallery: np.ndarray, queries: np.ndarray, modes: list[str], params: FaissParams,
              milvus_max: int) -> list[dict[str, Any]]:
    truth = exact_truth(gallery, queries)
    rows = []
    for mode in modes:
        if mode == "milvus-lite" and len(gallery) > milvus_max:
            print(f"  {label} {mode}: skipped (more than --milvus-max {milvus_max} vectors)", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="pictrace-bench-") as tmp:
            index, row = build(mode, gallery, Path(tmp), params)
            row = {"set": label, "n": len(gallery), "mode": mode, **row, **query(index, queries, truth)}
            index.close()
            del index
            gc.collect()
        print("  " + json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ real images
def base_photos() -> list[np.ndarray]:
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick",
             "grass", "gravel", "hubble_deep_field", "retina", "horse", "clock", "cat", "page", "text", "moon"]
    out = []
    for name in names:
        img = getattr(data, name)()
        img = np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]
        out.append(np.ascontiguousarray(img.astype(np.uint8) if img.dtype != bool else img.astype(np.uint8) * 255))
    return out


def edit(src: np.ndarray, rng: np.random.Generator) -> bytes:
    """A random user edit: crop, colour shift, resize, sometimes mirror or rotate, JPEG at some quality."""
    h, w = src.shape[:2]
    f = rng.uniform(0.5, 0.95)
    ch, cw = int(h * f), int(w * f)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = src[y : y + ch, x : x + cw].astype(np.int16) + rng.integers(-30, 30, size=3)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if rng.random() < 0.2:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.2:
        pil = pil.rotate(float(rng.uniform(-15, 15)), expand=True)
    pil.thumbnail((int(rng.integers(200, 480)),) * 2)
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=int(rng.integers(60, 95)))
    return buf.getvalue()


def real_set(settings: Settings, per_photo: int, queries_per_photo: int) -> dict[str, Any]:
    """Gallery edits and held-out query edits of each photo, embedded by the bundled model, with features."""
    embedder = build_embedder(settings.backbone, settings.model_path, threads=settings.embed_threads)
    rng = np.random.default_rng(7)
    gallery, g_photo, feats, queries, q_photo = [], [], [], [], []
    for p, photo in enumerate(base_photos()):
        for _ in range(per_photo):
            img = decode_image(edit(photo, rng), max_pixels=settings.max_pixels)
            gallery.append(img)
            g_photo.append(p)
            feats.append(local_features(img, Tuning()))
        for _ in range(queries_per_photo):
            queries.append(edit(photo, rng))
            q_photo.append(p)
    g_vec = np.concatenate([embedder.embed([g.rgb for g in gallery[s : s + 16]]) for s in range(0, len(gallery), 16)])
    q_img = [decode_image(q, max_pixels=settings.max_pixels) for q in queries]
    q_vec = np.concatenate([embedder.embed([q.rgb for q in q_img[s : s + 16]]) for s in range(0, len(q_img), 16)])
    return {"embedder": embedder, "gallery": gallery, "g_vec": g_vec, "g_photo": np.array(g_photo), "feats": feats,
            "queries": queries, "q_vec": q_vec, "q_photo": np.array(q_photo)}


def replicate(g_vec: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    """n vectors: the real ones, then each real vector again with noise (cosine to it spread over 0.55..0.95)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, g_vec.shape[1]), np.float32)
    out[: len(g_vec)] = g_vec
    for start in range(len(g_vec), n, 20_000):
        stop = min(n, start + 20_000)
        src = g_vec[rng.integers(0, len(g_vec), size=stop - start)]
        scale = rng.uniform(0.33, 1.5, size=(stop - start, 1)).astype(np.float32)
        noise = rng.normal(size=src.shape).astype(np.float32) * (scale / np.sqrt(src.shape[1]))
        out[start:stop] = unit(src + noise)
    return out


# ------------------------------------------------------------------------------------------ end to end
def make_catalogue(path: Path, real: dict[str, Any], n: int) -> None:
    """A catalogue of n rows: real features, replicated; embeddings as ``replicate`` makes them."""
    if path.exists():
        cat = Catalogue(path)
        have = cat.counts()[0]
        cat.close()
        if have == n:
            return
        path.unlink()
    vectors = replicate(real["g_vec"], n)
    cat = Catalogue(path)
    gallery, feats = real["gallery"], real["feats"]
    rng = np.random.default_rng(3)
    started = time.perf_counter()
    with cat._transaction() as conn:  # one transaction: the bench's rows, not an ingest
        for i in range(n):
            j = i % len(gallery)
            f = feats[j]
            orb = f.orb
            if i >= len(gallery):  # a distinct image for the local index: same keypoints, random descriptors
                real_orb = OrbFeatures.from_bytes(f.orb)
                codes = rng.integers(0, 256, size=real_orb.descriptors.shape, dtype=np.uint8)
                orb = replace(real_orb, descriptors=codes).to_bytes()
            sha = hashlib.sha256(f"row{i}".encode()).hexdigest()
            conn.execute(
                """INSERT INTO images (sha256, pixel_sha256, width, height, format, nbytes, dhash, embedding, gray,
                                       orb, thumbnail, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (sha, sha if i >= len(gallery) else f.pixel_sha256, gallery[j].width, gallery[j].height, "JPEG",
                 100_000, f.dhash, encode_embedding(vectors[i]), f.gray_png, orb, f.thumbnail, time.time()),
            )
            upsert_source(conn, Source(url=f"https://example.com/{i}.jpg", entry_id=str(i), position=i),
                          "ok", sha, None)
    cat.close()
    print(f"  catalogue of {n} rows written in {time.perf_counter() - started:.0f} s", flush=True)


async def e2e(
    real: dict[str, Any], n: int, workdir: Path, settings_overrides: dict[str, Any], tuning: Tuning
) -> dict[str, Any]:
    from pictrace.service import Service

    settings = Settings(_env_file=None, data_dir=workdir, index_on_start=False, **settings_overrides)  # type: ignore[call-arg]
    make_catalogue(settings.catalogue_path, real, n)
    settings.index_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    service = await Service.start(settings, tuning=tuning)
    start_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        await service.close()
        service = await Service.start(settings)
        reopen_s = time.perf_counter() - t0
        searcher, index, embedder = service.searcher, service.indexes.vector, service.embedder
        queries = real["queries"]
        for q in queries[:3]:
            searcher.search_bytes(q)
        total, decode_ms, embed_ms, index_ms, hits = [], [], [], [], 0
        for q, photo in zip(queries, real["q_photo"], strict=True):
            t0 = time.perf_counter()
            result = searcher.search_bytes(q)
            total.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            img = decode_image(q, max_pixels=settings.max_pixels)
            t1 = time.perf_counter()
            vec = embedder.embed([img.rgb])[0]
            t2 = time.perf_counter()
            index.search(vec[None, :], service.tuning.cascade.candidates)
            t3 = time.perf_counter()
            decode_ms.append((t1 - t0) * 1000)
            embed_ms.append((t2 - t1) * 1000)
            index_ms.append((t3 - t2) * 1000)
            if result.results:  # row i carries the features of real gallery image i mod len(gallery)
                hits += int(real["g_photo"][int(result.results[0].id) % len(real["gallery"])] == photo)
        p50 = pct(total, 50)
        floor = statistics.median(embed_ms)
        rest = p50 - statistics.median(decode_ms) - floor - statistics.median(index_ms)
        return {
            "n": n, "mode": getattr(index, "mode", "?"), "index_build_at_start_s": round(start_s, 1),
            "restart_s": round(reopen_s, 2), "search_p50_ms": round(p50, 1), "search_p95_ms": round(pct(total, 95), 1),
            "embed_only_ms": round(floor, 1), "ratio_to_embed": round(p50 / floor, 2),
            "decode_ms": round(statistics.median(decode_ms), 1), "index_ms": round(statistics.median(index_ms), 2),
            "rerank_and_reads_ms": round(rest, 1), "top1_same_photo": round(hits / len(queries), 3),
            "catalogue_mb": round(settings.catalogue_path.stat().st_size / 1e6),
            "catalogue_bytes_per_image": round(settings.catalogue_path.stat().st_size / n),
            "index_disk_mb": round(settings.index_path.stat().st_size / 1e6, 1),
            "local_index_disk_mb": round(settings.local_index_path.stat().st_size / 1e6, 1)
            if settings.local_index_path.exists() else None,
            "serve_rss_mb": round(rss_mb()),
        }
    finally:
        await service.close()


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["synthetic", "real", "e2e"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--modes", nargs="+", default=["exact", "hnsw", "hnsw-sq8", "milvus-lite"])
    parser.add_argument("--real-modes", nargs="+", default=["exact", "hnsw", "hnsw-sq8"],
                        help="modes for the replicated real set (Milvus Lite's index is flat: recall 1 by design)")
    parser.add_argument("--milvus-max", type=int, default=100_000, help="largest size Milvus Lite is run at")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--real-size", type=int, default=100_000)
    parser.add_argument("--e2e-size", type=int, default=100_000)
    parser.add_argument("--e2e-mode", default="auto")
    parser.add_argument("--per-photo", type=int, default=20, help="gallery edits per photo (18 photos)")
    parser.add_argument("--hnsw-m", type=int, default=FaissParams.hnsw_m)
    parser.add_argument("--ef-construction", type=int, default=FaissParams.ef_construction)
    parser.add_argument("--ef-search", type=int, default=FaissParams.ef_search)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pictrace-index-scale")
    args = parser.parse_args()
    params = FaissParams(hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search)
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(),
                           "loadavg_start": os.getloadavg()}
    rows: list[dict[str, Any]] = []
    if "synthetic" in args.parts:
        for n in args.sizes:
            print(f"synthetic {n} x {DIM}", flush=True)
            gallery = synthetic(n)
            rng = np.random.default_rng(1)
            queries = noisy(gallery[rng.choice(n, size=args.queries, replace=False)], 0.5, rng)
            rows += run_modes("synthetic", gallery, queries, args.modes, params, args.milvus_max)
            del gallery
            gc.collect()
    real = None
    if "real" in args.parts or "e2e" in args.parts:
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        t0 = time.perf_counter()
        real = real_set(settings, args.per_photo, max(2, args.queries // 18))
        print(f"real: {len(real['gallery'])} gallery edits, {len(real['queries'])} query edits "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if "real" in args.parts and real is not None:
        rows += run_modes("real", real["g_vec"], real["q_vec"], args.modes, params, args.milvus_max)
        if args.real_size > len(real["g_vec"]):
            rows += run_modes("real-replicated", replicate(real["g_vec"], args.real_size), real["q_vec"],
                              args.real_modes, params, args.milvus_max)
    out["index"] = rows
    if "e2e" in args.parts and real is not None:
        print(f"end to end at {args.e2e_size} images", flush=True)
        args.workdir.mkdir(parents=True, exist_ok=True)
        tuning = Tuning().replace(vectors={"ef_search": args.ef_search})
        out["e2e"] = asyncio.run(e2e(real, args.e2e_size, args.workdir, {"index_mode": args.e2e_mode}, tuning))
        print("  " + json.dumps(out["e2e"]), flush=True)
    out["loadavg_end"] = os.getloadavg()

    cols = ["set", "n", "mode", "insert_s", "build_s", "build_vec_per_s", "memory_mb", "disk_mb", "open_s",
            "open_cpu_s", "p50_ms", "p95_ms", "r1@10", "r10@10"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "–")) for c in cols) + " |")
    if "e2e" in out:
        print("\n" + "\n".join(f"{k}: {v}" for k, v in out["e2e"].items()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "index_scale.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
