"""The local-feature index's lookup on a built data dir: where a query's time goes (list assignment, list scan)
and what a scan budget (``LocalVotes.scan_budget``) saves and loses, on the evaluation sets' real queries.

    python bench/local_scan_budget.py DATA_DIR [--budgets 1.5 1.0 0.7 0.5] [--queries 50]

One thread, the shipped ORB extraction (1,000 features at 640 px) and index parameters; a query is the first
``--queries`` of every fifth query of each set in ``../shared/eval``. "Vote pairs kept" is the share of the
(query descriptor, gallery image) pairs of the full scan that the budgeted scan finds too. The search quality
behind a budget is measured by ``bench/scale_quality.py --tuning``. Prints a table and writes
``bench/results/local_scan_budget.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.decode import decode_image
from pictrace.features.orb import extract_orb
from pictrace.indexes.local.file import read_local
from pictrace.indexes.local.index import KP_BITS
from pictrace.tuning import Tuning

EVAL = Path(__file__).resolve().parent.parent.parent / "shared" / "eval"
RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("smvs-dvd-a", "copy-public")


def query_codes(per_set: int, code_bytes: int) -> list[np.ndarray]:
    codes = []
    for name in SETS:
        gt = json.loads((EVAL / name / "gt.json").read_text())
        for query in gt["queries"][::5][:per_set]:
            data = (EVAL / name / "images" / query["query"]).read_bytes()
            rgb = decode_image(data, max_pixels=50_000_000, draft_min_side=640).rgb
            codes.append(np.ascontiguousarray(extract_orb(rgb).descriptors[:, :code_bytes]))
    return codes


def main() -> None:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.5, 1.0, 0.7, 0.5])
    ap.add_argument("--queries", type=int, default=50, help="queries per evaluation set")
    a = ap.parse_args()
    if not EVAL.is_dir():
        sys.exit(f"needs the evaluation sets in {EVAL}")
    local = Tuning().local
    faiss.omp_set_num_threads(1)
    with (a.data_dir / "local.faiss").open("rb") as handle:
        header, _, ivf = read_local(handle)
    if not isinstance(ivf, faiss.IndexBinaryIVF):
        sys.exit("the index is an exact scan (too small for lists): nothing to budget")
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.float64)
    mean = ivf.ntotal / ivf.nlist
    queries = query_codes(a.queries, local.code_bytes)

    def lookup(max_codes: int) -> tuple[float, list[set[tuple[int, int]]]]:
        params = faiss.SearchParametersIVF()
        params.nprobe, params.max_codes = local.nprobe, max_codes
        times, pairs = [], []
        for codes in queries:
            started = time.perf_counter()
            dist, ids = ivf.search(codes, local.knn, params=params)
            times.append(time.perf_counter() - started)
            ok = (ids >= 0) & (dist <= local.max_distance)
            pairs.append(set(zip(np.nonzero(ok)[0].tolist(), (ids[ok] >> KP_BITS).tolist(), strict=True)))
        return statistics.median(times) * 1000, pairs

    assign = []
    for codes in queries:
        started = time.perf_counter()
        ivf.quantizer.search(codes, local.nprobe)
        assign.append(time.perf_counter() - started)
    full_ms, full = lookup(0)
    rows: list[dict[str, Any]] = [{"budget": None, "max_codes": 0, "p50_ms": full_ms, "pairs_kept": 1.0}]
    for budget in a.budgets:
        max_codes = max(1, round(budget * local.nprobe * mean))
        ms, found = lookup(max_codes)
        kept = statistics.mean(len(f & b) / max(1, len(b)) for f, b in zip(found, full, strict=True))
        rows.append({"budget": budget, "max_codes": max_codes, "p50_ms": ms, "pairs_kept": kept})
    report = {
        "data_dir": str(a.data_dir),
        "images": int(header["held"]),
        "codes": int(ivf.ntotal),
        "lists": int(ivf.nlist),
        "mean_list": mean,
        "probed_list": float((sizes**2).sum() / sizes.sum()),  # a list's size as a descriptor landing by data sees it
        "queries": len(queries),
        "descriptors_per_query": statistics.mean(len(q) for q in queries),
        "assign_p50_ms": statistics.median(assign) * 1000,
        "rows": rows,
    }
    print(f"{report['images']:,} images, {report['codes']:,} codes in {report['lists']:,} lists: average list "
          f"{mean:,.0f} codes, the list a probe meets {report['probed_list']:,.0f}")
    print(f"{len(queries)} queries, {report['descriptors_per_query']:.0f} descriptors each; list assignment p50 "
          f"{report['assign_p50_ms']:.1f} ms (one thread)")
    print(f"{'budget':>8} {'codes/descriptor':>17} {'lookup p50 ms':>14} {'vote pairs kept':>16}")
    for row in rows:
        budget = "none" if row["budget"] is None else f"{row['budget']:.2f}"
        codes = "all" if not row["max_codes"] else f"{row['max_codes']:,}"
        print(f"{budget:>8} {codes:>17} {row['p50_ms']:>14.1f} {row['pairs_kept']:>16.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "local_scan_budget.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
