"""Duplicate groups on copy-public: pairwise precision and recall of the copy tier, and what grouping costs.

The 1,004 gallery photos and the 300 edited queries are ingested together as one gallery: the 100 originals
and their three edits each make a true group of 4. Pairs are counted over every pair that touches those 400
images (a pair of two look-alike gallery photos is reported apart: the clothing shots hold real duplicates).

Cost: the same gallery is ingested with the duplicate candidates off (no nearest-vector candidates, no
mirror matching: the match graph as it was, plus each link's verdict) and on, and the grouping itself is timed;
as two whole ingests are at the mercy of a shared machine's load, the link phase is also timed per image with
and without, interleaved on one catalogue.

    python bench/duplicates_quality.py [--eval ../shared/eval/copy-public] [--runs 1]
    python bench/duplicates_quality.py --reuse DATA_DIR   # score the groups of a data dir built before, and say
                                                          # what each edit's own link to its original is

Prints a table and writes bench/results/duplicates_quality.json. Never copies an eval image anywhere: the
db.json names them where they are.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.config import Settings
from pictrace.gallery import load_gallery
from pictrace.graph import find_links
from pictrace.service import Service
from pictrace.tuning import Tuning


def truth(gt: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(image -> its true group's original, for the 400 images), (query -> edit type)."""
    group = {}
    for q in gt["queries"]:
        original = q["relevant"][0]
        group[q["query"]] = original
        group[original] = original
    return group, dict(gt["edit_types"])


def write_db(images: Path, names: list[str], workdir: Path) -> Path:
    db = workdir / "db.json"
    db.write_text(json.dumps([{"id": n, "url": os.path.relpath(images / n, workdir)} for n in names]))
    return db


async def ingest(db: Path, tuning: Tuning, workdir: Path) -> tuple[float, Service]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=workdir / "data", db=db, index_on_start=False, sync_interval_s=0
    )
    service = await Service.start(settings, tuning=tuning)
    started = time.perf_counter()
    report = await service.ingestor.ingest_gallery(load_gallery(db))
    elapsed = time.perf_counter() - started
    if report.failed:
        raise SystemExit(f"{len(report.failed)} images failed, e.g. {report.failed[0]}")
    return elapsed, service


def link_phase_ab(service: Service, before: Tuning, shipped: Tuning) -> dict[str, float]:
    """ms per image of the link phase with and without the duplicate candidates, interleaved image by image on
    one catalogue (robust to the load of a shared machine, unlike two whole ingests)."""
    ids = service.catalogue.vec_ids().tolist()[::4]
    spent = {"links only": 0.0, "duplicates": 0.0}
    for vec_id in ids:
        for label, tuning in (("links only", before), ("duplicates", shipped)):
            started = time.perf_counter()
            find_links(service.catalogue, service.indexes.local, tuning, vec_id, service.indexes.vector)
            spent[label] += time.perf_counter() - started
    return {k: round(v / len(ids) * 1000, 2) for k, v in spent.items()}


def pairs_of(groups: list[list[str]]) -> set[frozenset[str]]:
    return {frozenset(p) for g in groups for p in itertools.combinations(g, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", type=Path, default=Path(__file__).resolve().parents[2] / "shared/eval/copy-public")
    parser.add_argument("--runs", type=int, default=1, help="ingests of each kind, alternated (cost)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "duplicates_quality.json")
    parser.add_argument("--reuse", type=Path, help="score the groups of this data dir (no ingest, no cost figures)")
    asyncio.run(run(parser.parse_args()))


def score(gt: dict[str, Any], found: list[list[str]], keepers: dict[str, list[str]]) -> dict[str, Any]:
    """Pairwise precision and recall over the pairs touching the 400 labelled images, per edit type, the
    look-alikes joined, and how often the keeper is the true original."""
    group_of, edit_of = truth(gt)
    true_groups: dict[str, list[str]] = {}
    for image, original in group_of.items():
        true_groups.setdefault(original, []).append(image)
    true_pairs = pairs_of(list(true_groups.values()))
    touching = {p for p in pairs_of(found) if p & group_of.keys()}
    tp = len(touching & true_pairs)
    per_type: dict[str, list[int]] = {}
    for query, kind in edit_of.items():
        same = any(query in g and group_of[query] in g for g in found)
        per_type.setdefault(kind, [0, 0])[0] += int(same)
        per_type[kind][1] += 1
    judged = [(k, g) for k, g in keepers.items() if any(group_of.get(n) == n and len(g) > 1 for n in g)]
    return {
        "copy_tier": {
            "precision": round(tp / len(touching), 4) if touching else 1.0,
            "recall": round(tp / len(true_pairs), 4),
            "true_pairs": len(true_pairs),
            "predicted_pairs_touching": len(touching),
            "true_positive_pairs": tp,
        },
        "lookalikes_joined_to_true_groups": sorted(
            {n for g in found if set(g) & group_of.keys() for n in g if n not in group_of}
        ),
        "groups": len(found),
        "keeper_is_the_original": f"{sum(1 for k, g in judged if group_of.get(k) == k)}/{len(judged)}",
        "groups_among_the_other_gallery_photos": [sorted(g) for g in found if not set(g) & group_of.keys()],
        "original_grouped_with_edit_by_type": {k: f"{v[0]}/{v[1]}" for k, v in sorted(per_type.items())},
        "missed_by_type": dict(
            Counter(edit_of[q] for q in edit_of if not any(q in g and group_of[q] in g for g in found))
        ),
    }


def links_to_original(data_dir: Path, gt: dict[str, Any]) -> dict[str, Any]:
    """The verdict of each edit's own stored link with its original (copy, similar, or none), in all and per edit
    type: what the groups start from, before any grouping rule (read from a SQLite data dir's catalogue)."""
    group_of, edit_of = truth(gt)
    path = data_dir / "catalogue.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        vec_of = dict(conn.execute("SELECT s.entry_id, i.vec_id FROM sources s JOIN images i ON i.sha256 = s.sha256"))
        tier = {(a, b): t for a, b, t in conn.execute("SELECT vec_id, other, tier FROM links")}
    verdicts: dict[str, str] = {}
    for query in edit_of:
        a, b = vec_of.get(query), vec_of.get(group_of[query])
        verdicts[query] = (tier.get((a, b)) or "none") if a is not None and b is not None else "not ingested"
    per_type: dict[str, Counter[str]] = {}
    for query, verdict in verdicts.items():
        per_type.setdefault(edit_of[query], Counter())[verdict] += 1
    return {
        "all": dict(Counter(verdicts.values())),
        "by_type": {kind: dict(counts) for kind, counts in sorted(per_type.items())},
    }


async def groups_of(data_dir: Path) -> tuple[list[list[str]], dict[str, list[str]]]:
    """The groups (entry ids) and each keeper's group, of an already built catalogue."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=data_dir, index_on_start=False, sync_interval_s=0
    )
    service = await Service.start(settings)
    try:
        service.duplicates.refresh()
        groups = service.duplicates.all_groups()
    finally:
        await service.close()
    return (
        [[m.facts.entry_id for m in g.members] for g in groups],
        {g.keeper.entry_id: [m.facts.entry_id for m in g.members] for g in groups},
    )


async def run(args: argparse.Namespace) -> None:
    gt = json.loads((args.eval / "gt.json").read_text())
    images = (args.eval / "images").resolve()
    names = list(gt["gallery"]) + [q["query"] for q in gt["queries"]]
    group_of, edit_of = truth(gt)
    if args.reuse is not None:  # the groups of a catalogue this bench (or the same gallery) built before
        found, keepers = await groups_of(args.reuse)
        result = score(gt, found, keepers)
        result["edit_link_to_its_original"] = links_to_original(args.reuse, gt)
        print(json.dumps({k: v for k, v in result.items() if k != "groups_among_the_other_gallery_photos"}, indent=2))
        return
    shipped = Tuning()
    before = shipped.replace(duplicates={"nearest_candidates": 0, "frame_candidates": 0})

    timings: dict[str, list[float]] = {"links only": [], "duplicates": []}
    grouping_s: list[float] = []
    found: list[list[str]] = []
    link_ms: dict[str, float] = {}
    keepers: dict[str, list[str]] = {}
    for run in range(args.runs):
        for label, tuning in (("links only", before), ("duplicates", shipped)):
            with tempfile.TemporaryDirectory(prefix="pictrace-dups-") as tmp:
                elapsed, service = await ingest(write_db(images, names, Path(tmp)), tuning, Path(tmp))
                try:
                    timings[label].append(elapsed)
                    if label == "duplicates":
                        started = time.perf_counter()
                        service.duplicates.refresh()
                        groups = service.duplicates.all_groups()
                        grouping_s.append(time.perf_counter() - started)
                        if run == 0:
                            found = [[m.facts.entry_id for m in g.members] for g in groups]
                            keepers = {g.keeper.entry_id: [m.facts.entry_id for m in g.members] for g in groups}
                        link_ms = link_phase_ab(service, before, shipped)
                finally:
                    await service.close()
            print(f"run {run + 1} {label}: ingest {elapsed:.1f} s", flush=True)

    true_groups: dict[str, list[str]] = {}
    for image, original in group_of.items():
        true_groups.setdefault(original, []).append(image)
    true_pairs = pairs_of(list(true_groups.values()))
    predicted = pairs_of(found)
    touching = {p for p in predicted if p & group_of.keys()}
    tp = len(touching & true_pairs)
    precision = tp / len(touching) if touching else 1.0
    recall = tp / len(true_pairs)
    lookalike_joins = sorted({n for g in found if set(g) & group_of.keys() for n in g if n not in group_of})
    gallery_only = [g for g in found if not set(g) & group_of.keys()]

    per_type: dict[str, list[int]] = {}
    for query, kind in edit_of.items():
        original = group_of[query]
        same = any(query in g and original in g for g in found)
        per_type.setdefault(kind, [0, 0])[0] += int(same)
        per_type[kind][1] += 1
    missed = Counter(edit_of[q] for q in edit_of if not any(q in g and group_of[q] in g for g in found))

    # the keeper of each group holding a true original and at least one of its edits: is it the original?
    judged = [(k, g) for k, g in keepers.items() if any(group_of.get(n) == n and len(g) > 1 for n in g)]
    keeper_right = sum(1 for k, g in judged if group_of.get(k) == k)
    cost = {k: min(v) for k, v in timings.items()}
    overhead = cost["duplicates"] / cost["links only"] - 1 + min(grouping_s) / cost["links only"]
    per_image_ms = cost["links only"] / len(names) * 1000
    added_share = (link_ms["duplicates"] - link_ms["links only"]) / per_image_ms
    result = {
        "images": len(names),
        "copy_tier": {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "true_pairs": len(true_pairs),
            "predicted_pairs_touching": len(touching),
            "true_positive_pairs": tp,
        },
        "lookalikes_joined_to_true_groups": lookalike_joins,
        "groups": len(found),
        "keeper_is_the_original": f"{keeper_right}/{len(judged)}",
        "groups_among_the_other_gallery_photos": [sorted(g) for g in gallery_only],
        "original_grouped_with_edit_by_type": {k: f"{v[0]}/{v[1]}" for k, v in sorted(per_type.items())},
        "missed_by_type": dict(missed),
        "ingest_s": timings,
        "grouping_s": grouping_s,
        "grouping_overhead": round(overhead, 4),
        "link_phase_ms_per_image": link_ms,
        "link_phase_overhead_of_ingest": round(added_share, 4),
    }
    print()
    print(
        f"| copy tier, pairs touching the 400 | precision {precision:.4f} | recall {recall:.4f} | "
        f"{tp}/{len(true_pairs)} true pairs, {len(touching)} predicted |"
    )
    print(f"| look-alikes joined to a true group | {len(lookalike_joins)} |")
    print(f"| groups holding an original: the keeper is that original | {keeper_right}/{len(judged)} |")
    print(
        f"| groups among the other 904 gallery photos | {len(gallery_only)} "
        f"({sum(len(g) for g in gallery_only)} images) |"
    )
    print("| edit type | edit grouped with its original |")
    print("|---|---|")
    for kind, (hit, total) in sorted(per_type.items()):
        print(f"| {kind} | {hit}/{total} |")
    print(f"| ingest, links only | {cost['links only']:.1f} s |")
    print(f"| ingest, duplicates | {cost['duplicates']:.1f} s |")
    print(f"| grouping (all groups described) | {min(grouping_s) * 1000:.0f} ms |")
    print(f"| overhead, two whole ingests | {overhead * 100:.1f} % |")
    print(
        f"| link phase, interleaved A/B | {link_ms['links only']:.1f} -> {link_ms['duplicates']:.1f} ms/image, "
        f"{added_share * 100:.1f} % of the ingest's {per_image_ms:.0f} ms/image |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
