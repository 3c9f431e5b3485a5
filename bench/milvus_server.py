"""Vectors in a Milvus server against FAISS in-process, on one 10k gallery; and how soon another process sees a
new vector.

Starts a throw-away Milvus 2.3.5 standalone (tests/milvusserver.py; `pip install -r requirements-test.txt`),
fills it and a FAISS index with the same N vectors, then times single-query searches (k = 10, the cascade's
candidates) through the same ``VectorIndex`` calls the search makes, and recall@10 of Milvus against FAISS's
exact answer. The vectors: synthetic unit vectors of the model's dimension (1280), queries near some of them;
or, with ``--real EVAL``, the bundled model's embeddings of a real-content gallery: the 50 SMVS DVD references
among N - 50 distractors made by ``EVAL/make_distractors.py`` (crops and mosaics of real photos, 256-512 px), its
200 phone photos as queries (embeddings cached under bench/results/; about 10 minutes to embed 10k on 2 cores).
Then a writer process adds one vector at a time and this process polls its own client until that vector is
its nearest: the time for a new image's vector to become findable on another replica (a replica's local-feature
index follows within ``PICTRACE_SYNC_INTERVAL_S``, measured end to end by tests/test_milvus_cluster.py).

    python bench/milvus_server.py [--size 10000] [--queries 300] [--adds 20] [--real ../shared/eval]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from milvusserver import MilvusTestServer, _free_port  # noqa: E402

from pictrace.indexes.vector import FaissIndex, IndexInfo  # noqa: E402
from pictrace.indexes.vector.milvus_index import MilvusIndex  # noqa: E402

RESULTS = ROOT / "bench" / "results"
INFO = IndexInfo("efficientnet-lite2", "bench", 1280)

WRITER = """
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from pictrace.indexes.vector import IndexInfo
from pictrace.indexes.vector.milvus_index import MilvusIndex
index = MilvusIndex(sys.argv[2], IndexInfo("efficientnet-lite2", "bench", 1280))
print("ready", flush=True)
for line in sys.stdin:
    vec_id, seed = map(int, line.split())
    v = np.random.default_rng(seed).normal(size=(1, 1280)).astype(np.float32)
    index.add(np.array([vec_id]), v / np.linalg.norm(v))
    print(time.time(), flush=True)
"""


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, INFO.dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def real_vectors(eval_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery vectors, query vectors, the gallery row of each query's reference), embedded once and cached."""
    cache = RESULTS / f"milvus_server_real_{size}.npz"
    if cache.exists():
        held = np.load(cache)
        return held["gallery"], held["queries"], held["truth"]
    import importlib.util
    import io

    from PIL import Image

    from pictrace.config import Settings
    from pictrace.features.embed import build_embedder

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    embedder = build_embedder("efficientnet-lite2", settings.model_path, threads=2)
    spec = importlib.util.spec_from_file_location("make_distractors", eval_dir / "make_distractors.py")
    assert spec and spec.loader
    maker_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker_module)
    smvs = eval_dir / "smvs-dvd-a"
    gt = json.loads((smvs / "gt_ref.json").read_text())
    paths = maker_module.sources([str(smvs / "images"), str(eval_dir / "copy-public" / "images")],
                                 [str(smvs / "gt.json")])
    maker = maker_module.Maker(paths, seed=1, min_side=256, max_side=512)

    def rgb(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def embed_all(make: object, count: int, what: str) -> np.ndarray:
        assert callable(make)
        out = []
        for start in range(0, count, 16):
            out.append(embedder.embed([rgb(make(i)) for i in range(start, min(start + 16, count))]))
            if start % 1600 == 0:
                print(f"embedding {what}: {start}/{count}", flush=True)
        return np.concatenate(out)

    refs = gt["gallery"]
    references = embed_all(lambda i: (smvs / "images" / refs[i]).read_bytes(), len(refs), "references")
    distractors = embed_all(maker.jpeg, size - len(refs), "distractors")
    queries = embed_all(lambda i: (smvs / "images" / gt["queries"][i]["query"]).read_bytes(), len(gt["queries"]),
                        "queries")
    truth = np.array([refs.index(q["relevant"][0]) for q in gt["queries"]])
    gallery = np.concatenate([references, distractors])
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.savez(cache, gallery=gallery, queries=queries, truth=truth)
    return gallery, queries, truth


def timed_searches(index: object, queries: np.ndarray) -> tuple[list[float], np.ndarray]:
    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        _, ids = index.search(q[None, :], 10)  # type: ignore[attr-defined]
        times.append((time.perf_counter() - start) * 1000)
        found.append(ids[0])
    return times, np.array(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--adds", type=int, default=20)
    parser.add_argument("--real", type=Path, metavar="EVAL", help="the shared evaluation folder (../shared/eval)")
    args = parser.parse_args()

    if args.real:
        gallery, queries, picks = real_vectors(args.real, args.size)
        kind = "real content: SMVS DVD references among make_distractors.py distractors, phone-photo queries"
    else:
        gallery = unit(args.size, 0)
        # queries near gallery vectors (a copy's embedding is close to its original's, not equal)
        picks = np.random.default_rng(1).choice(args.size, args.queries, replace=False)
        queries = gallery[picks] + 0.05 * unit(args.queries, 2)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        kind = "synthetic unit vectors"
    ids = np.arange(args.size, dtype=np.int64)

    server = MilvusTestServer(Path(tempfile.mkdtemp(prefix="bench-milvus-")), _free_port())
    server.start()
    try:
        from pymilvus import MilvusClient

        version = MilvusClient(uri=server.uri).get_server_version()
        import faiss

        faiss.omp_set_num_threads(1)  # as the service searches (Service.start)
        faiss_index = FaissIndex(INFO)
        faiss_index.add(ids, gallery)
        faiss_ms, exact = timed_searches(faiss_index, queries)

        milvus = MilvusIndex(server.uri, INFO)
        start = time.perf_counter()
        milvus.add(ids, gallery)
        milvus.save()
        milvus.reload()  # index every flushed segment before timing
        load_s = time.perf_counter() - start
        time.sleep(2.5)  # past this process's own-write window: searches as a replica that did not write
        milvus_ms, approx = timed_searches(milvus, queries)
        recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)]))
        planted = float(np.mean(approx[:, 0] == picks))  # the query's own source first
        planted_in_10 = (float(np.mean([p in row for p, row in zip(picks, approx, strict=True)])),
                         float(np.mean([p in row for p, row in zip(picks, exact, strict=True)])))

        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), server.uri], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "ready"
        visible_ms = []
        for n in range(args.adds):
            vec_id, seed = 10_000_000 + n, 1000 + n
            target = unit(1, seed)
            writer.stdin.write(f"{vec_id} {seed}\n")
            writer.stdin.flush()
            written = float(writer.stdout.readline())
            while milvus.search(target, 1)[1][0, 0] != vec_id:
                time.sleep(0.005)
            visible_ms.append((time.time() - written) * 1000)
        writer.stdin.close()
        writer.wait(timeout=30)
        milvus.close()
    finally:
        server.stop()

    result = {
        "server": version, "size": args.size, "dim": INFO.dim, "vectors": kind,
        "faiss_exact_p50_ms": float(np.percentile(faiss_ms, 50)),
        "faiss_exact_p95_ms": float(np.percentile(faiss_ms, 95)),
        "milvus_p50_ms": float(np.percentile(milvus_ms, 50)), "milvus_p95_ms": float(np.percentile(milvus_ms, 95)),
        "milvus_recall_at_10": recall, "milvus_source_first": planted,
        "source_in_top10_milvus": planted_in_10[0], "source_in_top10_faiss": planted_in_10[1], "milvus_load_s": load_s,
        "findable_elsewhere_p50_ms": float(np.percentile(visible_ms, 50)),
        "findable_elsewhere_max_ms": float(np.max(visible_ms)),
    }
    print(f"{'index':<22}{'p50 ms':>9}{'p95 ms':>9}{'recall@10':>11}")
    print(f"{'FAISS exact':<22}{result['faiss_exact_p50_ms']:>9.2f}{result['faiss_exact_p95_ms']:>9.2f}{1.0:>11.3f}")
    print(f"{'Milvus ' + version:<22}{result['milvus_p50_ms']:>9.2f}{result['milvus_p95_ms']:>9.2f}{recall:>11.3f}")
    print(f"Milvus puts the query's source first for {planted:.3f} of the queries (FAISS: "
          f"{float(np.mean(exact[:, 0] == picks)):.3f})")
    print(f"the query's source in the top 10: Milvus {planted_in_10[0]:.3f}, FAISS {planted_in_10[1]:.3f}")
    print(f"load {args.size} vectors into Milvus (insert, flush, index): {load_s:.1f} s")
    print(f"a vector added by another process is findable after p50 {result['findable_elsewhere_p50_ms']:.0f} ms, "
          f"max {result['findable_elsewhere_max_ms']:.0f} ms ({args.adds} adds)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"milvus_server{'_real' if args.real else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
