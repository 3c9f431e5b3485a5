"""Measure the evidence behind the verdicts on the shared evaluation data, and pick the thresholds from it.

For every query of copy-public (edited copies among look-alike product photos) and smvs-dvd-a (phone photos
of DVD covers: the same object, another shot) it computes, against the query's relevant images and against
the embedding's top-20 distractors: the embedding cosine, the distinct ORB RANSAC inliers of an accepted
homography (direct and against the mirrored query) and that homography's perspective strength. Then it prints
how each candidate threshold separates

* copies (copy-public query vs its original) from distractors (copy-public and smvs non-relevant pairs) and
  from other shots of the same object (smvs relevant pairs): ``copy_min_inliers``, ``copy_max_perspective``;
* same object, other shot (smvs relevant pairs) from other objects: ``similar_min_embedding``.

    python bench/thresholds.py [--eval ../shared/eval] [--work /tmp/pictrace-thresholds]

The evidence is what the search's own stage functions find (pictrace/search/, pictrace/matching/), except that
every candidate gets the full check. Galleries are indexed once into --work (kept between runs). Rows go to
bench/results/thresholds_rows.json, the summary to bench/results/thresholds.json. The eval images never leave
../shared/eval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictrace.config import Settings
from pictrace.decode import decode_image
from pictrace.features.extract import orb_of
from pictrace.gallery import load_gallery
from pictrace.matching.mirror import mirrored_orb
from pictrace.matching.scores import scored
from pictrace.matching.transform import read_transform
from pictrace.search.candidates import nearest
from pictrace.search.reads import QueryReads
from pictrace.search.rerank import mirror_pass, needs_mirror
from pictrace.search.schedule import map_serial
from pictrace.search.verify import fit_all
from pictrace.service import Service
from pictrace.tuning import Tuning

RESULTS = Path(__file__).resolve().parent / "results"
CANDIDATES = 20  # hardest distractors per query (the embedding's top 20)


def prepare(dataset: Path, work: Path) -> tuple[dict[str, Any], Path]:
    """A db.json listing the eval gallery through a symlink (the images themselves stay where they are)."""
    gt = json.loads((dataset / "gt.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    link = work / "images"
    if not link.exists():
        link.symlink_to(dataset / "images")
    db = work / "db.json"
    db.write_text(json.dumps([{"id": name, "url": f"images/{name}"} for name in gt["gallery"]]))
    return gt, db


async def measure(dataset: Path, work: Path) -> list[dict[str, Any]]:
    gt, db = await asyncio.to_thread(prepare, dataset, work)
    settings = Settings(_env_file=None, data_dir=work / "data", db=db, index_on_start=False)
    service = await Service.start(settings)
    try:
        started = time.perf_counter()
        report = await service.ingestor.ingest_gallery(load_gallery(db))
        print(f"{dataset.name}: indexed {report.added} new, {report.unchanged} unchanged "
              f"in {time.perf_counter() - started:.0f} s", flush=True)
        return await asyncio.to_thread(query_rows, service, dataset, gt, settings)
    finally:
        await service.close()


def query_rows(service: Service, dataset: Path, gt: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    ids = {int(v): r.entry_id for v, r in service.catalogue.records(service.catalogue.vec_ids().tolist()).items()}
    by_name = {name: v for v, name in ids.items()}
    edits = gt.get("edits", {})
    rows: list[dict[str, Any]] = []
    mirror_ms: list[float] = []
    tuning = service.tuning
    widest = tuning.replace(cascade={"candidates": CANDIDATES + 1})  # the query itself may be one of them
    for n, q in enumerate(gt["queries"]):
        path = (dataset / "images" / q["query"]) if (dataset / "images" / q["query"]).exists() else None
        assert path is not None, q["query"]
        image = decode_image(path.read_bytes(), max_pixels=settings.max_pixels)
        embedding = service.embedder.embed([image.rgb])[0]
        # The search's own stages, except that every candidate gets the full check (no screen): the thresholds
        # judge the evidence a check finds, whichever candidates the search then spends it on.
        reads = QueryReads(service.catalogue)
        cosines = nearest(service.indexes.vector, embedding, widest)
        reads.know_cosines(cosines)
        relevant = {by_name[r] for r in q["relevant"] if r in by_name}
        cosines |= reads.cosines(embedding, relevant - set(cosines))
        cosines.pop(by_name.get(q["query"], -1), None)  # smvs: the query itself is in the gallery
        query = orb_of(image.rgb, tuning)
        orbs = reads.orbs(cosines)
        fits = fit_all(query, orbs, set(cosines), tuning, map_serial)
        direct = [scored(v, cosine, fits.get(v), tuning) for v, cosine in cosines.items() if v in orbs]
        t0 = time.perf_counter()
        no_fit = [c for c in direct if c.homography is None or c.orb_inliers < tuning.verdicts.copy_min_inliers]
        rechecked = (
            mirror_pass(mirrored_orb(image.rgb, tuning), no_fit, orbs, tuning, map_serial)
            if needs_mirror(no_fit, orbs, tuning)
            else no_fit
        )
        mirrored = {c.vec_id: c for c in rechecked}
        mirror_ms.append((time.perf_counter() - t0) * 1000 / max(1, len(no_fit)))
        records = reads.records(cosines)
        for c in direct:
            m = mirrored.get(c.vec_id)
            row: dict[str, Any] = {
                "dataset": dataset.name,
                "query": q["query"],
                "gallery": ids[c.vec_id],
                "relevant": c.vec_id in relevant,
                "edit": edits.get(q["query"], ""),
                "cosine": round(c.embedding, 4),
                "inliers": c.orb_inliers if c.homography is not None else 0,
                "perspective": None,
                "mirror_inliers": m.orb_inliers if m is not None and mirrored_fit(m.homography) else 0,
                "mirror_perspective": None,
            }
            rec = records[c.vec_id]
            row["gallery_size"] = [rec.width, rec.height]
            m_hom = m.homography if m is not None and mirrored_fit(m.homography) else None
            readouts = {
                key: read_transform(hom, (image.width, image.height), (rec.width, rec.height))
                for key, hom in (("perspective", c.homography), ("mirror_perspective", m_hom))
                if hom is not None
            }
            for key, out in readouts.items():
                row[key] = out.perspective
            best = "mirror_perspective" if row["mirror_inliers"] > row["inliers"] else "perspective"
            if best in readouts:
                out = readouts[best]
                row.update(crop=out.crop, scale=out.scale, rotation=out.rotation, flip=out.flip)
            rows.append(row)
        if n % 50 == 0:
            print(f"  {n}/{len(gt['queries'])} queries", flush=True)
    print(f"  mirror check: {np.mean(mirror_ms):.1f} ms per candidate without a fit (incl. one extraction)")
    return rows


def mirrored_fit(hom: np.ndarray | None) -> bool:
    """A fit made against the mirrored query (its linear part has a negative determinant)."""
    return hom is not None and float(np.linalg.det(hom[:2, :2])) < 0


def best_geom(row: dict[str, Any]) -> tuple[int, float | None]:
    """(inliers, perspective) of the better of the direct and the mirrored fit."""
    if row["mirror_inliers"] > row["inliers"]:
        return row["mirror_inliers"], row["mirror_perspective"]
    return row["inliers"], row["perspective"]


def is_copy(row: dict[str, Any], min_inliers: int, max_persp: float, min_cos: float) -> bool:
    inliers, persp = best_geom(row)
    return persp is not None and inliers >= min_inliers and persp <= max_persp and row["cosine"] >= min_cos


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    copies = [r for r in rows if r["dataset"] == "copy-public" and r["relevant"]]
    distract = [r for r in rows if not r["relevant"]]
    shots = [r for r in rows if r["dataset"] == "smvs-dvd-a" and r["relevant"]]
    out: dict[str, Any] = {"pairs": {"copies": len(copies), "distractors": len(distract), "other_shots": len(shots)}}

    print("\nPerspective of accepted fits (quantiles 50/90/99/max):")
    for label, group in (("copy-public copies", copies), ("smvs same DVD, other shot", shots),
                         ("distractors", distract)):
        vals = [p for r in group if (p := best_geom(r)[1]) is not None]
        if vals:
            q = np.quantile(vals, [0.5, 0.9, 0.99, 1.0])
            print(f"  {label:28s} n={len(vals):5d}  " + "  ".join(f"{v:.3f}" for v in q))
            out.setdefault("perspective", {})[label] = [round(float(v), 4) for v in q]

    print("\nDistinct inliers of the best accepted fit (quantiles 1/5/50 for copies; max, 99.9% for distractors):")
    ci = [best_geom(r)[0] for r in copies]
    di = [best_geom(r)[0] for r in distract]
    print(f"  copies: found {sum(1 for v in ci if v > 0)}/{len(ci)}; "
          f"q01/q05/q50 = {np.quantile(ci, [0.01, 0.05, 0.5]).round(1).tolist()}")
    print(f"  distractors with a fit: {sum(1 for v in di if v > 0)}/{len(di)}; "
          f"max {max(di)}, q99.9 {np.quantile(di, 0.999):.1f}")

    print("\ncopy rule sweep (inliers >= n, perspective <= p, cosine >= 0.3); FP: false copies in top-20 look-alikes")
    head = f"{'copy recall':>11} | {'copy-public FP':>14} | {'smvs FP':>7} | {'other shot as copy':>18}"
    print(f"  {'n':>3} {'p':>5} | {head}")
    sweep = []
    cp_distract = [r for r in distract if r["dataset"] == "copy-public"]
    smvs_distract = [r for r in distract if r["dataset"] == "smvs-dvd-a"]
    for n in (8, 12, 20, 25, 30, 40):
        for p in (0.1, 0.15, 0.2, 0.3, 1e9):
            c = 0.3
            rec = sum(is_copy(r, n, p, c) for r in copies) / len(copies)
            fp_cp = sum(is_copy(r, n, p, c) for r in cp_distract)
            fp_smvs = sum(is_copy(r, n, p, c) for r in smvs_distract)
            shot = sum(is_copy(r, n, p, c) for r in shots) / max(1, len(shots))
            sweep.append({"n": n, "p": p, "c": c, "recall": rec, "fp_copy_public": fp_cp, "fp_smvs": fp_smvs,
                          "shots_as_copy": shot})
            print(f"  {n:3d} {p if p < 1e9 else 'inf':>5} | {rec:11.3f} | {fp_cp:14d} | {fp_smvs:7d} | {shot:18.3f}")
    out["copy_sweep"] = sweep

    print("\nPer edit type (copy-public edited copy vs its original), verdict at the chosen thresholds:")
    out["per_edit"] = {}
    return out


def edit_type(detail: str) -> str:
    return "combo" if detail.startswith("combo") else detail.split()[0]


def verdict(row: dict[str, Any], rule: tuple[int, float, float], similar: float) -> str | None:
    """pictrace.matching.verdict.classify, on a measured row (kept in step with it by test_verdict's cases)."""
    inliers, persp = best_geom(row)
    if is_copy(row, *rule):
        return "copy"
    if row["cosine"] >= similar or (persp is not None and inliers >= 8):
        return "similar"
    return None


def outcomes(rows: list[dict[str, Any]], rule: tuple[int, float, float], similar: float) -> dict[str, Any]:
    """Share of each kind of pair shown as copy / similar / not at all, at the chosen thresholds."""
    groups: dict[str, Callable[[dict[str, Any]], bool]] = {
        "copy-public: edited copy vs its original": lambda r: r["dataset"] == "copy-public" and r["relevant"],
        "copy-public: vs top-20 look-alikes": lambda r: r["dataset"] == "copy-public" and not r["relevant"],
        "smvs: same DVD, other shot": lambda r: r["dataset"] == "smvs-dvd-a" and r["relevant"],
        "smvs: vs top-20 other DVDs": lambda r: r["dataset"] == "smvs-dvd-a" and not r["relevant"],
    }
    print(f"\nOutcomes at copy rule {rule}, similar_min_embedding {similar}:")
    print(f"  {'pairs':42s} {'n':>6} {'copy':>6} {'similar':>8} {'hidden':>7}")
    out: dict[str, Any] = {}
    for label, keep in groups.items():
        got = [verdict(r, rule, similar) for r in rows if keep(r)]
        shares = {str(v): got.count(v) / len(got) for v in ("copy", "similar", None)}
        out[label] = {"n": len(got), **shares}
        print(f"  {label:42s} {len(got):6d} {shares['copy']:6.3f} {shares['similar']:8.3f} {shares['None']:7.3f}")
    return out


def readout_accuracy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The transform read-out against what copy-public's gt.json says was done (copies with a fit only)."""
    found = [r for r in rows if r["dataset"] == "copy-public" and r["relevant"] and "crop" in r]
    out: dict[str, Any] = {}
    crop_err = []
    for r in found:
        if r["edit"].startswith("crop "):
            x, y, w, h = (int(v) for v in r["edit"].split("box=(")[1].rstrip(")").split(","))
            side = max(r["gallery_size"])
            crop_err.append(max(abs(a - b) for a, b in zip(r["crop"], (x, y, x + w, y + h), strict=True)) / side)
    rot_err = []
    for r in found:
        if r["edit"].startswith(("rot90", "rotsmall")):
            angle = float(r["edit"].split("angle=")[1].split()[0])
            rot_err.append(abs((r["rotation"] - angle + 180) % 360 - 180))
    scale_err = []
    for r in found:
        if r["edit"].startswith("lowres"):
            factor = float(r["edit"].split("scale=")[1].split()[0])
            scale_err.append(abs(r["scale"] - factor) / factor)
    flips = [r["flip"] for r in found if r["edit"].startswith("hflip")]
    not_flips = [r["flip"] for r in found if "hflip" not in r["edit"]]
    print("\nTransform read-out vs copy-public's recorded edits (copies with an accepted fit):")
    for label, errs, unit in (("crop box, max corner error / image side", crop_err, ""),
                              ("rotation error (rot90, rotsmall)", rot_err, " deg"),
                              ("relative scale error (lowres)", scale_err, "")):
        if errs:
            q = np.quantile(errs, [0.5, 0.9])
            print(f"  {label:42s} n={len(errs):3d}  median {q[0]:.3f}{unit}  p90 {q[1]:.3f}{unit}")
            out[label] = {"n": len(errs), "median": float(q[0]), "p90": float(q[1])}
    print(f"  flip reported: {sum(flips)}/{len(flips)} mirrored copies, {sum(not_flips)}/{len(not_flips)} others")
    out["flip"] = {"mirrored_detected": sum(flips), "mirrored": len(flips), "false_flips": sum(not_flips),
                   "others": len(not_flips)}
    return out


def similar_sweep(rows: list[dict[str, Any]], copy_rule: tuple[int, float, float]) -> list[dict[str, Any]]:
    """Precision/recall of 'similar' (cosine >= t, not a copy) for the other shots of smvs."""
    smvs = [r for r in rows if r["dataset"] == "smvs-dvd-a" and not is_copy(r, *copy_rule)]
    cp = [r for r in rows if r["dataset"] == "copy-public" and not r["relevant"] and not is_copy(r, *copy_rule)]
    total = sum(r["relevant"] for r in smvs)
    print("\nsimilar rule sweep on smvs (non-copies, cosine >= t): precision, recall of other shots; "
          "copy-public look-alikes shown as similar per query")
    out = []
    for t in (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9):
        shown = [r for r in smvs if r["cosine"] >= t]
        tp = sum(r["relevant"] for r in shown)
        prec = tp / len(shown) if shown else 1.0
        look = sum(r["cosine"] >= t for r in cp) / 300
        out.append({"t": t, "precision": prec, "recall": tp / total, "lookalikes_per_query": look})
        print(f"  t={t:.2f}  precision {prec:.3f}  recall {tp / total:.3f}  (shown {len(shown)})  "
              f"copy-public look-alikes/query {look:.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parent.parent
    found = [p for p in (root.parent / "shared" / "eval", root.parent.parent / "shared" / "eval") if p.exists()]
    parser.add_argument("--eval", type=Path, default=found[0] if found else Path("../shared/eval"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/pictrace-thresholds"))
    parser.add_argument("--reuse", action="store_true", help="analyse the rows of the last run again")
    parser.add_argument("--copy-rule", default="25,0.15,0.3", help="n,p,c of the chosen copy rule")
    parser.add_argument("--similar", type=float, default=0.8, help="the chosen similar_min_embedding")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows_path = RESULTS / "thresholds_rows.json"
    if args.reuse and rows_path.exists():
        rows = json.loads(rows_path.read_text())
    else:
        rows = []
        for name in ("copy-public", "smvs-dvd-a"):
            dataset = args.eval / name
            if not (dataset / "gt.json").exists():
                sys.exit(f"{dataset} not found: this benchmark needs the shared evaluation data")
            rows += asyncio.run(measure(dataset, args.work / name))
        rows_path.write_text(json.dumps(rows))
    summary = summarise(rows)
    n, p, c = (float(v) for v in args.copy_rule.split(","))
    rule = (int(n), p, c)
    per_edit: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["dataset"] == "copy-public" and r["relevant"]:
            per_edit[edit_type(r["edit"])].append(str(verdict(r, rule, args.similar)))
    print(f"  {'edit':12s} {'copy':>6} {'similar':>8} {'hidden':>7}")
    for edit, got in sorted(per_edit.items()):
        shares = {v: got.count(v) / len(got) for v in ("copy", "similar", "None")}
        print(f"  {edit:12s} {shares['copy']:6.2f} {shares['similar']:8.2f} {shares['None']:7.2f}   (n={len(got)})")
        summary["per_edit"][edit] = shares
    summary["copy_rule"] = rule
    summary["similar_sweep"] = similar_sweep(rows, rule)
    summary["similar_min_embedding"] = args.similar
    summary["outcomes"] = outcomes(rows, rule, args.similar)
    summary["readout"] = readout_accuracy(rows)
    (RESULTS / "thresholds.json").write_text(json.dumps(summary, indent=1))
    # The chosen rule as a tuning file: `python -m pictrace --tuning bench/results/tuning-verdicts.json eval ...`
    # tries it end to end before it replaces the defaults in pictrace/tuning.py.
    chosen = Tuning().replace(verdicts={
        "copy_min_inliers": rule[0], "copy_max_perspective": rule[1], "copy_min_embedding": rule[2],
        "similar_min_embedding": args.similar,
    })
    chosen.to_file(RESULTS / "tuning-verdicts.json")
    print(f"\nwrote {RESULTS / 'tuning-verdicts.json'}")


if __name__ == "__main__":
    main()
