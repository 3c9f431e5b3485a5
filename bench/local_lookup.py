"""The local-feature index's lookup on a built data dir: where a query's time goes (list assignment, list scan),
what a scan budget (``LocalVotes.scan_budget``) and the query cells (``LocalVotes.query_cell_lists``) save and
lose, on the evaluation sets' real queries.

    python bench/local_lookup.py DATA_DIR [--budgets 1.5 1.0 0.7 0.5] [--queries 50]

One thread, the shipped ORB extraction (1,000 features at 640 px) and index parameters; a query is the first
``--queries`` of every fifth query of each set in ``../shared/eval``. Every figure but the list assignment's is
the product's own ``LocalIndex.vote`` on the index opened from the data dir: each budget with every list centre
compared, then today's tuning without and with the query cells. "Vote pairs kept" is the share of the (query
descriptor, gallery image) pairs of the full scan (or, for the cells, of every centre compared) found too.
The search quality behind either is measured by ``bench/scale_quality.py --tuning``. Prints a table and writes
``bench/results/local_lookup.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.decode import decode_image
from pictrace.features.orb import OrbFeatures, extract_orb
from pictrace.indexes.local import LocalIndex, local_index_params
from pictrace.indexes.local.file import read_local
from pictrace.tuning import Tuning

EVAL = Path(__file__).resolve().parent.parent.parent / "shared" / "eval"
RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("smvs-dvd-a", "copy-public")


def query_features(per_set: int) -> list[OrbFeatures]:
    features = []
    for name in SETS:
        gt = json.loads((EVAL / name / "gt.json").read_text())
        for query in gt["queries"][::5][:per_set]:
            data = (EVAL / name / "images" / query["query"]).read_bytes()
            features.append(extract_orb(decode_image(data, max_pixels=50_000_000, draft_min_side=640).rgb))
    return features


def open_index(data_dir: Path, catalogue_id: str, **tuned: Any) -> LocalIndex:
    """The saved index as the product opens it, with today's tuning changed by ``tuned`` (query-time fields)."""
    index = LocalIndex.open(
        data_dir / "local.faiss", local_index_params(Tuning().local.model_copy(update=tuned)), catalogue_id
    )
    if index is None:
        sys.exit("the saved index was built with other parameters than today's")
    return index


def timed_votes(index: LocalIndex, features: list[OrbFeatures]) -> tuple[float, list[set[Any]]]:
    """``LocalIndex.vote`` p50 (ms) on one thread, and each query's (descriptor, image) vote pairs."""
    times, pairs = [], []
    for query in features:
        started = time.perf_counter()
        votes = index.vote(query)
        times.append(time.perf_counter() - started)
        pairs.append(set(zip(votes.rows.tolist(), votes.owners.tolist(), strict=True)))
    return statistics.median(times) * 1000, pairs


def kept(found: list[set[Any]], full: list[set[Any]]) -> float:
    return statistics.mean(len(f & b) / max(1, len(b)) for f, b in zip(found, full, strict=True))


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
    features = query_features(a.queries)
    with (a.data_dir / "local.faiss").open("rb") as handle:  # the lists as stored, and the assignment alone
        header, _, ivf = read_local(handle)
    if not isinstance(ivf, faiss.IndexBinaryIVF):
        sys.exit("the index is an exact scan (too small for lists): nothing to budget")
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.float64)
    codes_held, lists_held = int(ivf.ntotal), int(ivf.nlist)
    mean = codes_held / lists_held
    assign = []
    for query in features:
        codes = np.ascontiguousarray(query.descriptors[:, : local.code_bytes])
        started = time.perf_counter()
        ivf.quantizer.search(codes, local.nprobe)
        assign.append(time.perf_counter() - started)
    del ivf
    catalogue_id = str(header["catalogue"])
    # the budgets: the product's vote with every list centre compared, each budget in turn (query-time fields)
    index = open_index(a.data_dir, catalogue_id, query_cell_lists=None, scan_budget=None)
    full_ms, full = timed_votes(index, features)
    rows: list[dict[str, Any]] = [{"budget": None, "max_codes": 0, "p50_ms": full_ms, "pairs_kept": 1.0}]
    for budget in a.budgets:
        index.params = replace(index.params, scan_budget=budget)
        ms, found = timed_votes(index, features)
        max_codes = max(1, round(budget * local.nprobe * mean))
        rows.append({"budget": budget, "max_codes": max_codes, "p50_ms": ms, "pairs_kept": kept(found, full)})
    index.params = replace(index.params, scan_budget=local.scan_budget)
    plain_ms, plain = timed_votes(index, features)
    del index
    cells_ms, cells = timed_votes(open_index(a.data_dir, catalogue_id), features)
    report = {
        "data_dir": str(a.data_dir),
        "images": int(header["held"]),
        "codes": codes_held,
        "lists": lists_held,
        "mean_list": mean,
        "probed_list": float((sizes**2).sum() / sizes.sum()),  # a list's size as a descriptor landing by data sees it
        "queries": len(features),
        "descriptors_per_query": statistics.mean(len(f) for f in features),
        "assign_p50_ms": statistics.median(assign) * 1000,
        "rows": rows,
        "vote_p50_ms": {"every_centre": plain_ms, "query_cells": cells_ms},
        "query_cells_pairs_kept": kept(cells, plain),
    }
    print(f"{report['images']:,} images, {report['codes']:,} codes in {report['lists']:,} lists: average list "
          f"{mean:,.0f} codes, the list a probe meets {report['probed_list']:,.0f}")
    print(f"{len(features)} queries, {report['descriptors_per_query']:.0f} descriptors each; list assignment p50 "
          f"{report['assign_p50_ms']:.1f} ms (one thread)")
    print(f"{'budget':>8} {'codes/descriptor':>17} {'vote p50 ms':>12} {'vote pairs kept':>16}")
    for row in rows:
        budget = "none" if row["budget"] is None else f"{row['budget']:.2f}"
        codes = "all" if not row["max_codes"] else f"{row['max_codes']:,}"
        print(f"{budget:>8} {codes:>17} {row['p50_ms']:>12.1f} {row['pairs_kept']:>16.3f}")
    print(f"LocalIndex.vote with today's tuning: every list centre compared {plain_ms:.1f} ms; query cells "
          f"({local.query_cell_lists} lists each, {local.top_probe} probed) {cells_ms:.1f} ms, vote pairs kept "
          f"{report['query_cells_pairs_kept']:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "local_lookup.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
