"""Local-feature index at scale: build (train + add) time, memory, disk, reopen time, vote latency, vote recall.

A gallery of N images, each 500 codes of 16 bytes (what PICTRACE_LOCAL_PER_IMAGE / _CODE_BYTES keep): the ORB
codes of the 250 real photos of the smvs-dvd-a evaluation set (../shared/eval, extracted once and cached), and
N - 250 synthetic images of uniformly random codes. Random 128-bit codes lie ~64 bits from everything, never
within the 24 bits that make a vote, so the exact votes of a real query are the same at every N: computed on
the real codes alone (an exact flat index), they are the truth the inverted file at N is measured against.
Random codes spread evenly over the lists, which real ones do not: latency on a real gallery of N is somewhat
higher (its lists are uneven). Queries are the real photos' own ORB features (up to 1,000 descriptors), as in
the all-vs-all evaluation, their own image left out.

Reported per N: nlist and training sample, train and add time (all cores, as at start), resident memory of the
built index, file size and save time, reopen time and memory (``LocalIndex.open`` in a fresh process), vote
latency p50/p95 for one query (1 FAISS thread, as served), and recall against the exact index: ``pairs``
(vote pairs found), ``cand@20`` (the exact top-20 candidate images, at least 3 votes, that the index's top 20
hold) and ``rel@20`` (the evaluation's relevant images in the top 20, exact vs inverted file).

    nice -n 19 python bench/local_index_scale.py [--sizes 10000 100000] [--queries 250] [--train-max 262144]
                                                 [--estimate 100000 1000000] [--add-part 2000000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss

from pictrace.config import Settings
from pictrace.decode import decode_image
from pictrace.features.orb import OrbFeatures, extract_orb
from pictrace.indexes.local import LocalIndex, LocalIndexParams
from pictrace.indexes.local.lists import list_count
from pictrace.tuning import Tuning

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
EVAL = ROOT.parent / "shared" / "eval" / "smvs-dvd-a"
CACHE = RESULTS / "local_index_real_orb.npz"
PER_IMAGE = 500
TOP = 20
MIN_VOTES = 3


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def real_features() -> tuple[list[str], list[OrbFeatures], dict[str, list[str]]]:
    """The evaluation photos' ORB features (extracted with the service's settings), cached in bench/results."""
    gt = json.loads((EVAL / "gt.json").read_text())
    names = sorted(gt["gallery"])
    relevant = {q["query"]: list(q["relevant"]) for q in gt["queries"]}
    if CACHE.exists():
        data = np.load(CACHE, allow_pickle=False)
        blobs = [bytes(data[f"b{i}"]) for i in range(len(names))]
    else:
        settings, tuning = Settings(_env_file=None), Tuning()  # type: ignore[call-arg]
        blobs = []
        for name in names:
            rgb = decode_image((EVAL / "images" / name).read_bytes(), max_pixels=settings.max_pixels).rgb
            orb = extract_orb(
                rgb, n_features=tuning.orb.features, max_side=tuning.orb.max_side, min_side=tuning.orb.min_side
            )
            blobs.append(orb.to_bytes())
        RESULTS.mkdir(exist_ok=True)
        np.savez(CACHE, **{f"b{i}": np.frombuffer(b, dtype=np.uint8) for i, b in enumerate(blobs)})
    return names, [OrbFeatures.from_bytes(b) for b in blobs], relevant


def gallery(n: int, real: list[OrbFeatures], seed: int = 0) -> Iterator[tuple[int, bytes]]:
    """vec_ids 1..250: the real photos; then n - 250 images of random codes (points don't matter for votes)."""
    for i, orb in enumerate(real, 1):
        yield i, orb.to_bytes()
    rng = np.random.default_rng(seed)
    points = np.zeros((PER_IMAGE, 2), dtype=np.float32)
    for vec_id in range(len(real) + 1, n + 1):
        desc = rng.integers(0, 256, (PER_IMAGE, 32), dtype=np.uint8)
        yield vec_id, OrbFeatures(points, desc, 640, 480, 1.0).to_bytes()


def top(votes: Any, self_id: int) -> list[int]:
    return [v for v in votes.top(TOP + 1, MIN_VOTES) if v != self_id][:TOP]


OPEN_PROBE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from pictrace.indexes.local import LocalIndex, LocalIndexParams
def rss():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
before = rss()
t0 = time.perf_counter()
index = LocalIndex.open(Path({path!r}), LocalIndexParams(**{params!r}), "bench")
assert index is not None
print(json.dumps({{"reopen_s": round(time.perf_counter() - t0, 2), "reopen_mb": round(rss() - before)}}))
"""


def measure(
    n: int,
    params: LocalIndexParams,
    real: list[OrbFeatures],
    names: list[str],
    relevant: dict[str, list[str]],
    exact_top: dict[int, list[int]],
    exact_pairs: dict[int, set[tuple[int, int]]],
    queries: list[int],
) -> dict[str, Any]:
    codes = n * PER_IMAGE
    nlist = list_count(codes, params.max_lists)
    row: dict[str, Any] = {"images": n, "codes": codes, "nlist": nlist,
                           "train_sample": min(64 * nlist, max(params.train_max, nlist))}
    gc.collect()
    before = rss_mb()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0, c0 = time.perf_counter(), time.process_time()
    index = LocalIndex.build(params, gallery(n, real))
    row["build_s"] = round(time.perf_counter() - t0, 1)
    row["build_cpu_s"] = round(time.process_time() - c0, 1)
    gc.collect()
    row["memory_mb"] = round(rss_mb() - before)
    row["bytes_per_image"] = round((rss_mb() - before) * 2**20 / n)
    faiss.omp_set_num_threads(1)
    times, pairs_found, pairs_total, cand_hit, cand_total, rel_exact, rel_ivf = [], 0, 0, 0, 0, 0, 0
    for q in queries:
        t0 = time.perf_counter()
        votes = index.vote(real[q - 1])
        times.append((time.perf_counter() - t0) * 1000)
        found = set(zip(votes.owners.tolist(), votes.rows.tolist(), strict=True))
        truth = exact_pairs[q]
        pairs_total += len(truth)
        pairs_found += len(truth & found)
        mine = top(votes, q)
        cand_total += len(exact_top[q])
        cand_hit += len(set(exact_top[q]) & set(mine))
        rel = {names.index(r) + 1 for r in relevant[names[q - 1]]}
        rel_exact += len(rel & set(exact_top[q]))
        rel_ivf += len(rel & set(mine))
    row["vote_p50_ms"] = round(statistics.median(times), 1)
    row["vote_p95_ms"] = round(float(np.percentile(times, 95)), 1)
    row["pairs"] = round(pairs_found / max(pairs_total, 1), 3)
    row["cand@20"] = round(cand_hit / max(cand_total, 1), 3)
    row["rel@20"] = f"{rel_ivf}/{rel_exact}"
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pictrace-local-", dir=RESULTS) as tmp:
        path = Path(tmp) / "local.faiss"
        t0 = time.perf_counter()
        index.save(path, "bench")
        row["save_s"] = round(time.perf_counter() - t0, 1)
        row["disk_mb"] = round(path.stat().st_size / 2**20)
        del index  # reopened in a fresh process: at 1M images two copies would not fit beside other work
        gc.collect()
        probe = OPEN_PROBE.format(root=str(ROOT), path=str(path), params=params.__dict__)
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return row


def estimate(n: int, params: LocalIndexParams, add_codes: int, seed: int = 1) -> dict[str, Any]:
    """Too big to build here in the time: time what the build does at this size, on part of the codes.

    Learns the lists it would learn (the same nlist and sample size, on random codes), then adds ``add_codes``
    codes to them; the add is linear in the codes, so it is scaled to n.
    """
    from pictrace.indexes.local.lists import train_two_level, two_level_quantizer

    codes = n * PER_IMAGE
    nlist = list_count(codes, params.max_lists)
    sample_size = min(64 * nlist, max(params.train_max, nlist))
    rng = np.random.default_rng(seed)
    sample = rng.integers(0, 256, (sample_size, 16), dtype=np.uint8)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0, c0 = time.perf_counter(), time.process_time()
    top, subs, offsets = train_two_level(sample, nlist, params.cell_lists, params.train_iterations)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    index = LocalIndex(params)
    coarse = two_level_quantizer(top, subs, offsets)
    ivf = faiss.IndexBinaryIVF(coarse, 128, len(subs))
    ivf.train(sample[:1])
    index._index, index._coarse = ivf, coarse
    part = rng.integers(0, 256, (add_codes, 16), dtype=np.uint8)
    t0, c0 = time.perf_counter(), time.process_time()
    index._add_codes(np.arange(add_codes, dtype=np.int64), part)
    add_s, add_cpu = time.perf_counter() - t0, time.process_time() - c0
    scale = codes / add_codes
    return {
        "images": n, "codes": codes, "nlist": len(subs), "train_sample": sample_size, "estimated": True,
        "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu, 1),
        "add_part_codes": add_codes, "add_part_s": round(add_s, 1), "add_part_cpu_s": round(add_cpu, 1),
        "build_s": f"~{train_s + add_s * scale:.0f}", "build_cpu_s": f"~{train_cpu + add_cpu * scale:.0f}",
    }


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="  %(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=250, help="real photos used as queries (of 250)")
    defaults = Tuning().local
    parser.add_argument("--train-max", type=int, default=defaults.train_max)
    parser.add_argument("--max-lists", type=int, default=defaults.max_lists)
    parser.add_argument("--iterations", type=int, default=defaults.train_iterations)
    parser.add_argument("--nprobe", type=int, default=defaults.nprobe)
    parser.add_argument("--cell-lists", type=int, default=defaults.cell_lists or defaults.max_lists)
    parser.add_argument("--top-probe", type=int, default=defaults.top_probe)
    parser.add_argument("--estimate", type=int, nargs="*", default=[],
                        help="sizes only estimated: lists learned in full, then --add-part codes added and scaled")
    parser.add_argument("--add-part", type=int, default=2_000_000)
    parser.add_argument("--out", type=Path, default=RESULTS / "local_index_scale.json")
    args = parser.parse_args()
    names, real, relevant = real_features()
    params = LocalIndexParams(
        per_image=PER_IMAGE, code_bytes=16, knn=defaults.knn,
        max_distance=defaults.max_distance, nprobe=args.nprobe,
        train_max=args.train_max, max_lists=args.max_lists, train_iterations=args.iterations,
        cell_lists=args.cell_lists, top_probe=args.top_probe,
    )
    queries = list(range(1, min(args.queries, len(real)) + 1))
    # the truth: an exact index of the real codes alone (random codes are never within max_distance of them)
    exact = LocalIndex.build(LocalIndexParams(**{**params.__dict__, "flat_below": 10**12}), gallery(len(real), real))
    exact_top, exact_pairs = {}, {}
    for q in queries:
        votes = exact.vote(real[q - 1])
        exact_top[q] = top(votes, q)
        exact_pairs[q] = set(zip(votes.owners.tolist(), votes.rows.tolist(), strict=True))
    print(f"{len(queries)} real queries, {statistics.mean(len(real[q - 1]) for q in queries):.0f} descriptors each; "
          f"params {params}", flush=True)
    rows = []
    for n in args.sizes:
        print(f"{n} images ...", flush=True)
        rows.append(measure(n, params, real, names, relevant, exact_top, exact_pairs, queries))
        print("  " + json.dumps(rows[-1]), flush=True)
    for n in args.estimate:
        print(f"{n} images, estimated ...", flush=True)
        rows.append(estimate(n, params, args.add_part))
        print("  " + json.dumps(rows[-1]), flush=True)
    cols = ["images", "nlist", "train_sample", "build_s", "build_cpu_s", "memory_mb", "bytes_per_image", "disk_mb",
            "save_s", "reopen_s", "reopen_mb", "vote_p50_ms", "vote_p95_ms", "pairs", "cand@20", "rel@20"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "–")) for c in cols) + " |")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"params": params.__dict__, "cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
