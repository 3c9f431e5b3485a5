"""Search quality, speed, memory and disk among real-content distractors: the shared evaluation sets' queries
searched in a gallery of N distractor photos plus the sets' own galleries.

The distractors come from ``../shared/eval/make_distractors.py`` (crops and mosaics of real photos: real ORB
descriptors and embeddings, not random vectors). Make them once, outside the repository, with every evaluated
set's ``gt.json`` excluded, so that no distractor holds a crop of what a query must find:

    cd ../shared/eval && python make_distractors.py files /data/d100k --count 100000 \\
        --from smvs-dvd-a/images --from copy-public/images \\
        --exclude smvs-dvd-a/gt.json --exclude copy-public/gt.json
    python bench/scale_quality.py /data/d100k/db.json --workdir /data/sq100k [--reuse]

With both sets excluded the distractors are made of the 904 clothing photos that no copy-public query is about:
harsh for copy-public (look-alikes of its own originals), easier for smvs-dvd-a (no other DVD covers).

Steps, each in its own process so that memory is the process's own:
1. ingest the combined db.json with ``python -m pictrace index`` (images/s, peak RSS); ``--reuse`` skips it
   when the data dir already holds the gallery;
2. the floor on the same files (``bench/ingest_speed.py``'s: decode beside a batch-16 embedding on 2 threads),
   so that the ingest rate is read as a fraction of the model's own;
3. a serving process: ``Service.start`` on the data dir (restart time), the duplicate groups ready (built in the
   background), then every query of each set through ``Searcher.search_ranked`` (p50/p95 next to one
   embedding's time, sampled through the run), the duplicate groups' pages, RSS;
4. mAP / R@1 per set with ``pictrace.eval``'s scoring, every distractor a non-relevant gallery image.
Prints a table and writes ``bench/results/scale_quality_<N>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from duplicates_paging import duplicate_pages, wait_ready  # bench/ is on the path just above

RESULTS = Path(__file__).resolve().parent / "results"
EVAL = Path(__file__).resolve().parent.parent.parent / "shared" / "eval"
SETS = {"smvs-dvd-a": EVAL / "smvs-dvd-a" / "gt.json", "copy-public": EVAL / "copy-public" / "gt.json"}


def _memory_mb() -> dict[str, float]:
    """This process's resident set (VmRSS), its peak (VmHWM), and the resident set's two kinds: anonymous (the
    heap: indexes, groups, caches) and file-backed (the SQLite memory map of the catalogue and the libraries'
    code: the kernel's page cache, dropped under pressure), MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def combined_gallery(distractors: Path, sets: dict[str, Path], workdir: Path) -> tuple[Path, int]:
    """One db.json: every distractor, then each set's gallery images (ids: their file names)."""
    base, here = distractors.parent.resolve(), workdir.resolve()

    def url(path: Path) -> str:  # db.json names local files relative to itself
        return os.path.relpath(path.resolve(), here)

    entries = [{"id": e["id"], "url": url(base / e["url"])} for e in json.loads(distractors.read_text())]
    ids = {e["id"] for e in entries}
    for gt_path in sets.values():
        images = gt_path.parent / "images"
        for name in json.loads(gt_path.read_text())["gallery"]:
            if name in ids:
                sys.exit(f"id {name} is both a distractor and a gallery image of {gt_path}")
            ids.add(name)
            entries.append({"id": name, "url": url(images / name)})
    db = workdir / "db.json"
    db.write_text(json.dumps(entries))
    return db, len(entries)


def sampled_floor(db: Path, sample: int) -> float:
    """The ingest's floor (``ingest_speed.floor_rate``: decode beside a batch-16 embedding on 2 threads) on
    ``sample`` files spread over the gallery: images/s."""
    from ingest_speed import floor_rate

    entries = json.loads(db.read_text())
    step = max(1, len(entries) // sample)
    return floor_rate([db.parent / e["url"] for e in entries[::step][:sample]], 16, 2)[0]


def ingest(db: Path, data_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "PICTRACE_DATA_DIR": str(data_dir)}
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "pictrace", "index", str(db), "--quiet"], env=env, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"ingest failed with exit status {proc.returncode}")
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
        "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
    }


async def serve_and_search(data_dir: Path, sets: dict[str, Path], tuning_file: Path | None = None) -> dict[str, Any]:
    """Runs in its own process: start the service on the built data dir, search every query of every set."""
    from pictrace.config import Settings
    from pictrace.eval import GroundTruth, _embed_one_ms, _percentile, score
    from pictrace.files import read_local_file
    from pictrace.service import Service
    from pictrace.tuning import Tuning

    settings = Settings(data_dir=data_dir, index_on_start=False)
    tuning = Tuning.from_file(tuning_file) if tuning_file is not None else Tuning()
    started = time.perf_counter()
    service = await Service.start(settings, tuning=tuning)
    restart_s = time.perf_counter() - started
    rss_started = _memory_mb()["VmRSS"]
    out: dict[str, Any] = {"restart_s": round(restart_s, 2), "rss_after_start_mb": round(rss_started, 1), "sets": {}}
    try:
        # the searches are timed on a settled service: the duplicate groups are built in the background after
        # a start (a first start on a gallery builds them from every link), and would share the cores meanwhile
        out["groups_ready_s"] = round(await wait_ready(service), 1)
        indexed = service.catalogue.counts()[0]
        latency: list[float] = []
        embed: list[float] = []
        for name, gt_path in sets.items():
            gt = GroundTruth.load(gt_path)
            images = gt_path.parent / "images"
            results: dict[str, list[str]] = {}
            set_latency: list[float] = []
            for i, q in enumerate(gt.queries):
                data = read_local_file(images / q.name, settings.max_upload_bytes)
                if i % 10 == 0:
                    embed.append(await service.pool.run_background(_embed_one_ms, service, data))
                t0 = time.perf_counter()
                _, ranked = await service.pool.run_background(service.searcher.search_ranked, data)
                set_latency.append((time.perf_counter() - t0) * 1000)
                results[q.name] = ranked
            # every distractor is a gallery image, none relevant: scored as score.py would with them listed
            named = {n for ranked in results.values() for n in ranked}
            widened = GroundTruth(tuple(sorted(set(gt.gallery) | named)), gt.queries)
            metrics = score(widened, results)
            missed = [
                q.name for q in gt.queries if next((n for n in results[q.name] if n != q.name), None) not in q.relevant
            ]  # R@1's misses, scored like score.py (the query itself left out)
            out["sets"][name] = {
                **metrics.as_dict(),
                "missed_at_1": missed,
                "p50_ms": round(_percentile(set_latency, 50), 1),
                "p95_ms": round(_percentile(set_latency, 95), 1),
            }
            latency += set_latency
        out["duplicates"] = await duplicate_pages(service)
        memory = _memory_mb()
        out.update(
            indexed=indexed,
            p50_ms=round(_percentile(latency, 50), 1),
            p95_ms=round(_percentile(latency, 95), 1),
            embed_one_ms=round(statistics.median(embed), 1),
            rss_mb=round(memory["VmRSS"], 1),
            peak_rss_mb=round(memory["VmHWM"], 1),
            rss_anon_mb=round(memory["RssAnon"], 1),
            rss_file_mb=round(memory["RssFile"], 1),
        )
    finally:
        await service.close()
    return out


def serving_process(workdir: Path, args: list[str], distractors: str = "-") -> dict[str, Any]:
    """``serve_and_search`` in a process of its own (its RSS is the serving process's), on ``workdir``/data."""
    serve = subprocess.run(
        [sys.executable, __file__, distractors, "--workdir", str(workdir), *args, "--_serve"],
        capture_output=True,
        text=True,
        check=False,
    )
    if serve.returncode != 0:
        sys.exit(f"serving process failed:\n{serve.stderr[-3000:]}")
    return dict(json.loads(serve.stdout.strip().splitlines()[-1]))


def disk(data_dir: Path, images: int) -> dict[str, Any]:
    files = {p.name: p.stat().st_size for p in data_dir.iterdir() if p.is_file()}
    total = sum(files.values())
    return {
        "total_mb": round(total / 2**20, 1),
        "kb_per_image": round(total / 1024 / max(images, 1), 1),
        "files_mb": {k: round(v / 2**20, 1) for k, v in sorted(files.items(), key=lambda kv: -kv[1]) if v > 2**20},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("distractors", type=Path, help="db.json written by make_distractors.py files")
    ap.add_argument("--workdir", type=Path, required=True, help="where the combined db.json and data dir go")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--reuse", action="store_true", help="keep an already built data dir (skip the ingest)")
    ap.add_argument("--floor-sample", type=int, default=512)
    ap.add_argument("--tuning", type=Path, help="a tuning JSON file for the serving process (pictrace/tuning.py)")
    ap.add_argument("--_serve", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sets = {name: SETS[name] for name in a.sets}
    data_dir = a.workdir / "data"
    if a._serve:
        print(json.dumps(asyncio.run(serve_and_search(data_dir, sets, a.tuning))))
        return
    missing = [str(p) for p in sets.values() if not p.exists()]
    if missing:
        sys.exit(f"needs the shared evaluation sets: {', '.join(missing)}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    db, count = combined_gallery(a.distractors, sets, a.workdir)
    report: dict[str, Any] = {
        "gallery": count,
        "distractors": count - sum(len(json.loads(p.read_text())["gallery"]) for p in sets.values()),
    }
    if a.reuse and (data_dir / "catalogue.sqlite3").exists():
        report["ingest"] = None
    else:
        report["ingest"] = ingest(db, data_dir)
        report["ingest"]["images_per_s"] = round(count / report["ingest"]["wall_s"], 2)
    if report["ingest"] is not None:  # the floor is what the ingest rate is read against
        report["floor_images_per_s"] = round(sampled_floor(db, a.floor_sample), 2)
    tuning = ["--tuning", str(a.tuning)] if a.tuning else []
    report["tuning"] = str(a.tuning) if a.tuning else None
    report["serve"] = serving_process(a.workdir, ["--sets", *a.sets, *tuning], str(a.distractors))
    report["disk"] = disk(data_dir, report["serve"]["indexed"])
    if report["serve"]["indexed"] < count * 0.99:
        sys.exit(f"only {report['serve']['indexed']} of {count} gallery images were indexed: see the ingest's output")
    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_{a.tuning.stem}" if a.tuning else ""
    out = RESULTS / f"scale_quality_{report['distractors']}{suffix}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {out}")


def print_table(r: dict[str, Any]) -> None:
    s, ing = r["serve"], r["ingest"]
    print(f"\ngallery {s['indexed']:,} images ({r['distractors']:,} distractors)")
    if ing:
        ratio = ing["images_per_s"] / r["floor_images_per_s"]
        print(
            f"ingest      {ing['images_per_s']:.1f} img/s   floor (decode+embed) {r['floor_images_per_s']:.1f} img/s"
            f"   ratio {ratio:.0%}   ({ing['wall_s']:.0f} s, peak RSS {ing['peak_rss_mb']:.0f} MB)"
        )
    print_serving(s, r["disk"])


def print_serving(s: dict[str, Any], d: dict[str, Any]) -> None:
    """The serving process's figures (``serve_and_search``) and the data dir's size, as a table."""
    print(
        f"restart     {s['restart_s']:.1f} s   serving RSS {s['rss_mb']:.0f} MB (peak {s['peak_rss_mb']:.0f} MB;"
        f" anonymous {s['rss_anon_mb']:.0f}, file-backed {s['rss_file_mb']:.0f})"
    )
    print(f"disk        {d['total_mb']:.0f} MB = {d['kb_per_image']:.1f} KB/image   {d['files_mb']}")
    print(
        f"search      p50 {s['p50_ms']:.0f} ms  p95 {s['p95_ms']:.0f} ms   one embedding {s['embed_one_ms']:.1f} ms"
        f"   p50/embed {s['p50_ms'] / s['embed_one_ms']:.2f}x"
    )
    dup = s["duplicates"]
    print(
        f"duplicates  {dup['groups']:,} groups ready {dup['ready_s']:.1f} s after the start, largest"
        f" {dup['largest_groups'][:1]}: first page {dup['first_page_ms']:.0f} ms, then p50"
        f" {dup['page_p50_ms']:.0f} ms, max {dup['page_max_ms']:.0f} ms"
    )
    print(f"\n{'set':<14}{'queries':>8}{'mAP':>8}{'R@1':>8}{'R@5':>8}{'p50 ms':>8}{'p95 ms':>8}")
    for name, m in s["sets"].items():
        print(
            f"{name:<14}{m['queries']:>8}{m['mAP']:>8.4f}{m['R@1']:>8.4f}{m['R@5']:>8.4f}{m['p50_ms']:>8.0f}"
            f"{m['p95_ms']:>8.0f}"
        )


if __name__ == "__main__":
    main()
