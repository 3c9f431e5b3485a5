"""`python -m pictrace index|watch|search|reindex|duplicates|eval|serve|backup|check`: thin commands over the
same pipeline as the web app."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pictrace.config import Settings, load_settings
from pictrace.errors import GalleryError, PicTraceError
from pictrace.files import read_local_file
from pictrace.gallery import Shard, load_gallery
from pictrace.ingest import IngestProgress
from pictrace.maintenance import backup_catalogue, check_catalogue
from pictrace.schemas import IngestReport, SearchResult
from pictrace.service import Service
from pictrace.tuning import Tuning


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pictrace", description="PicTrace reverse image search")
    parser.add_argument("--data-dir", type=Path, help="override PICTRACE_DATA_DIR")
    parser.add_argument(
        "--tuning", type=Path, metavar="FILE",
        help="replace fitted constants from this JSON file, for experiments (see pictrace/tuning.py)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    index = sub.add_parser("index", help="build or update the index from a gallery: db.json or a folder")
    index.add_argument("db", nargs="?", type=Path, help="gallery file or folder (default: PICTRACE_DB)")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.add_argument(
        "--shard", type=_shard, default=None, metavar="I/N",
        help="index only the entries whose URL hashes to I mod N (parallel workers on one PostgreSQL)",
    )

    watch = sub.add_parser("watch", help="index a folder, then keep the index in step as its files change")
    watch.add_argument("folder", nargs="?", type=Path, help="the gallery folder (default: PICTRACE_DB)")

    search = sub.add_parser("search", help="search the index with an image file or URL")
    search.add_argument("image", help="path or http(s) URL of the query image")
    search.add_argument("--top-k", type=int, default=None, help="number of results (1..50, default 5)")
    search.add_argument("--json", action="store_true", help="print the API's JSON")

    sub.add_parser(
        "reindex", help="rebuild the vector and local-feature indexes from the catalogue (ignores their files)"
    )
    evaluate = sub.add_parser("eval", help="measure retrieval quality on a labelled set (throw-away index)")
    evaluate.add_argument("gt", type=Path, help='ground truth: {"gallery": [...], "queries": [...]}')
    evaluate.add_argument("--images", type=Path, help="folder holding the images (default: GT's images/)")
    evaluate.add_argument("--out", type=Path, help="write the ranked results here (score.py's format)")
    evaluate.add_argument("--details", type=Path, help="write the shown results' component scores here (for fitting)")
    evaluate.add_argument("--json", action="store_true", help="print the summary as JSON")

    dups = sub.add_parser("duplicates", help="every duplicate group: one row per member (group, keeper, tier, edit)")
    dups.add_argument("--tier", choices=["exact", "copy"], help="only groups of this tier")
    out = dups.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the API's groups as JSON")
    out.add_argument("--csv", action="store_true", help="CSV, for a spreadsheet")
    backup = sub.add_parser("backup", help="copy the SQLite catalogue, online (PostgreSQL: use pg_dump)")
    backup.add_argument("dest", type=Path, help="file to write, or a directory to write catalogue.sqlite3 in")
    sub.add_parser("check", help="check the catalogue's integrity and the indexes against it (exit 1 on problems)")

    serve = sub.add_parser("serve", help="run the web service")
    serve.add_argument("--host", help="override PICTRACE_HOST")
    serve.add_argument("--port", type=int, help="override PICTRACE_PORT")
    return parser


STOPPED = "pictrace: stopped; what was stored is kept and indexed (the same command goes on from there)"


def _stop_on_sigterm() -> None:
    """SIGTERM (``docker stop``, systemd, ``kill``) stops the command as Ctrl-C does: its task is cancelled, so the
    cleanup on the way out saves the derived indexes (the default SIGTERM exits at once, and the next start
    then rebuilds what the run had indexed since its last save)."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


async def _index(
    settings: Settings, tuning: Tuning, db: Path, quiet: bool, shard: Shard | None = None
) -> IngestReport:
    from tqdm import tqdm

    _stop_on_sigterm()
    gallery = load_gallery(db)
    service = await Service.start(settings, tuning=tuning)
    bar = tqdm(total=len(gallery.entries), unit="img", disable=quiet, desc="indexing")
    try:

        def on_progress(progress: IngestProgress) -> None:
            bar.total = progress.total
            bar.update(progress.done - bar.n)

        return await service.ingestor.ingest_gallery(gallery, on_progress, shard)
    finally:
        bar.close()
        await service.close()


async def _watch(settings: Settings, tuning: Tuning, folder: Path) -> None:
    from pictrace.watch import FolderWatcher

    _stop_on_sigterm()
    service = await Service.start(settings, tuning=tuning)
    try:
        watcher = FolderWatcher(service.ingestor, folder, tuning.watch, on_report=_print_report)
        print(f"watching {watcher.folder} (Ctrl-C stops)")
        await watcher.run()
    finally:
        await service.close()


async def _reindex(settings: Settings, tuning: Tuning) -> int:
    """Build the index afresh from the catalogue's stored embeddings: nothing is downloaded or re-embedded."""
    service = await Service.start(settings, tuning=tuning, rebuild_index=True)
    try:
        return len(service.indexes.vector)
    finally:
        await service.close()  # saves the index atomically


def _print_report(report: IngestReport) -> None:
    skipped = f", not images {report.skipped}" if report.skipped else ""
    print(
        f"added {report.added}, duplicates {report.duplicates}, unchanged {report.unchanged}, "
        f"removed {report.removed}, failed {len(report.failed)}, invalid {len(report.invalid)}{skipped}"
        + (f", kept out {report.deleted} (deleted through the API)" if report.deleted else "")
    )
    for failure in report.invalid:
        where = f"entry {failure.position}" if failure.position is not None else failure.url
        print(f"  invalid {where}: {failure.reason}")
    for failure in report.failed:
        where = f"entry {failure.position} ({failure.url})" if failure.position is not None else failure.url
        print(f"  failed {where}: {failure.reason}")


async def _search(settings: Settings, tuning: Tuning, image: str, top_k: int | None) -> SearchResult:
    service = await Service.start(settings, tuning=tuning)
    try:
        if image.startswith(("http://", "https://")):
            data = await service.fetcher.fetch_gallery(image)  # the operator's own command: trusted
        else:
            data = read_local_file(Path(image), settings.max_upload_bytes)
        return await service.pool.run(service.searcher.search_bytes, data, top_k)
    finally:
        await service.close()


def _print_results(result: SearchResult) -> None:
    print(
        f"query {result.query.sha256[:12]} {result.query.width}x{result.query.height}, {result.took_ms:.0f} ms"
    )
    if result.query.inner_picture is not None:
        x, y, w, h = result.query.inner_picture
        print(f"it holds a picture ({w}x{h} at {x},{y}), which was searched too")
    if not result.results:
        print("no matches")
    for rank, match in enumerate(result.results, 1):
        s = match.scores
        tag = " exact" if match.exact else ""
        print(
            f"{rank}. {match.score * 100:5.1f}%{tag}  {match.id}  "
            f"(embedding {s.embedding:.2f}, ssim {s.ssim:.2f}, orb {s.orb:.2f} / {s.orb_inliers} inliers)  {match.url}"
        )


def _eval(settings: Settings, tuning: Tuning, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pictrace.eval import run_eval

    bar = tqdm(unit="query", desc="searching", disable=args.json)

    def on_query(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = asyncio.run(run_eval(args.gt, settings, args.images, on_query, tuning=tuning))
    finally:
        bar.close()
    if args.out:
        args.out.write_text(json.dumps(report.results))
    if args.details:
        args.details.write_text(json.dumps(report.details))
    print(json.dumps(report.summary(), indent=2) if args.json else report.text())
    return 0


def _serve(settings: Settings, tuning: Tuning) -> None:
    import uvicorn

    from pictrace.service import open_catalogue
    from pictrace.web import create_app
    from pictrace.web.serving import server_config

    open_catalogue(settings).close()  # a damaged catalogue: one line from main(), not uvicorn's traceback

    uvicorn.Server(server_config(create_app(settings, tuning=tuning), settings, tuning.serving)).run()


DUPLICATE_COLUMNS = ("group", "tier", "keeper", "role", "id", "sha256", "width", "height", "edit")


def _duplicates(settings: Settings, tuning: Tuning, tier: str | None, fmt: str) -> None:
    """Groups from the catalogue alone: no model, no index is loaded."""
    from pictrace.duplicates import DuplicateGroups, group_info
    from pictrace.service import open_catalogue

    catalogue = open_catalogue(settings)
    duplicates = DuplicateGroups(catalogue, tuning.duplicates)
    try:
        duplicates.refresh()  # the stored partition, brought up to date (or built, on a catalogue never served)
        groups = [group_info(g) for g in duplicates.all_groups(tier)]  # type: ignore[arg-type]
        duplicates.close()
    finally:
        catalogue.close()
    if fmt == "json":
        print(json.dumps([g.model_dump(mode="json") for g in groups], indent=2))
        return
    rows = [
        (g.id, g.tier, g.keeper, m.role, m.id, m.sha256, m.width, m.height, m.edit.summary if m.edit else "")
        for g in groups
        for m in g.members
    ]
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(DUPLICATE_COLUMNS)
        writer.writerows(rows)
        return
    for row in rows:
        print("\t".join(str(v) for v in row))
    print(f"{len(groups)} groups, {len(rows)} images", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, object] = {}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    try:
        tuning = Tuning.from_file(args.tuning) if args.tuning else Tuning()
        if args.command == "serve":
            if args.host:
                overrides["host"] = args.host
            if args.port:
                overrides["port"] = args.port
            _serve(load_settings(**overrides), tuning)
            return 0
        settings = load_settings(**overrides)
        if args.command == "index":
            try:
                report = asyncio.run(_index(settings, tuning, args.db or settings.db, args.quiet, args.shard))
            except (asyncio.CancelledError, KeyboardInterrupt) as stop:
                print(STOPPED, file=sys.stderr)
                return 128 + (signal.SIGTERM if isinstance(stop, asyncio.CancelledError) else signal.SIGINT)
            _print_report(report)
            return 0
        if args.command == "watch":
            folder = args.folder or settings.db
            if not folder.is_dir():
                raise GalleryError(f"{folder} is not a folder: only a folder gallery can be watched")
            with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
                asyncio.run(_watch(settings, tuning, folder))
            return 0
        if args.command == "reindex":
            count = asyncio.run(_reindex(settings, tuning))
            print(f"rebuilt {settings.milvus_uri or settings.index_path} from the catalogue: {count} vectors")
            return 0
        if args.command == "search":
            result = asyncio.run(_search(settings, tuning, args.image, args.top_k))
            if args.json:
                print(json.dumps(result.model_dump(mode="json"), indent=2))
            else:
                _print_results(result)
            return 0
        if args.command == "eval":
            return _eval(settings, tuning, args)
        if args.command == "duplicates":
            _duplicates(settings, tuning, args.tier, "json" if args.json else "csv" if args.csv else "text")
            return 0
        if args.command == "backup":
            written = backup_catalogue(settings, args.dest)
            print(f"backed up {settings.catalogue_path} to {written}")
            return 0
        if args.command == "check":
            checked = check_catalogue(settings, tuning)
            for line in checked.notes:
                print(f"ok: {line}")
            for line in checked.problems:
                print(f"problem: {line}")
            return 0 if checked.ok else 1
    except PicTraceError as exc:
        print(f"pictrace: {exc}", file=sys.stderr)
        return 2
    return 1
