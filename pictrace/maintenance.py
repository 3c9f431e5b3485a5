"""The operator's care of the catalogue (the system of record): ``backup`` and ``check``.

The catalogue is the one thing that cannot be rebuilt: the vector and local-feature indexes are derived from it
(rebuilt at start when missing or corrupt), the thumbnails and features live in it. So a backup is a copy of
the catalogue, taken with SQLite's online backup API (consistent while the service runs and writes), and a check
is SQLite's own ``integrity_check`` plus a comparison of each index's image ids with the catalogue's.
PostgreSQL has its own tools for the first: ``pg_dump``.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pictrace.config import Settings
from pictrace.errors import CatalogueCorruptError, ConfigurationError, PicTraceError
from pictrace.store import Catalogue
from pictrace.tuning import Tuning

PG_DUMP_ADVICE = (
    "the catalogue is PostgreSQL (PICTRACE_DATABASE_URL): back it up with `pg_dump -Fc DBNAME > pictrace.dump` "
    "and restore it with `pg_restore`; the indexes are rebuilt from it at start"
)


def backup_catalogue(settings: Settings, dest: Path) -> Path:
    """Copy the SQLite catalogue to ``dest`` (a file, or a directory to put ``catalogue.sqlite3`` in), page by
    page through SQLite's online backup, so a running service may go on writing. Returns the file written."""
    if settings.database_url:
        raise ConfigurationError(PG_DUMP_ADVICE)
    source_path = settings.catalogue_path
    if not source_path.is_file():
        raise ConfigurationError(f"no catalogue at {source_path} (PICTRACE_DATA_DIR): nothing to back up")
    target = dest / source_path.name if dest.is_dir() else dest
    if target.resolve() == source_path.resolve():
        raise ConfigurationError("the backup must go somewhere other than the catalogue itself")
    partial = target.with_name(target.name + ".partial")
    try:
        source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
        try:
            partial.unlink(missing_ok=True)
            copy = sqlite3.connect(partial)
            try:
                source.backup(copy)
            finally:
                copy.close()
        finally:
            source.close()
    except sqlite3.DatabaseError as exc:
        partial.unlink(missing_ok=True)
        raise CatalogueCorruptError(str(source_path), exc) from exc
    partial.replace(target)  # a backup is there whole or not at all
    return target


@dataclass
class CheckReport:
    """What ``check`` found: ``problems`` make it fail; ``notes`` say what was looked at."""

    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _integrity(path: Path, report: CheckReport) -> bool:
    """SQLite's full integrity check of the catalogue file; False when it cannot be opened at all."""
    if not path.is_file():
        report.problems.append(f"no catalogue at {path}")
        return False
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        report.problems.append(f"{path} cannot be read as a SQLite database: {exc}")
        return False
    if rows != ["ok"]:
        report.problems.extend(f"{path}: {row}" for row in rows[:20])
        return False
    report.notes.append(f"{path}: integrity_check ok")
    return True


def _compare(what: str, held: np.ndarray, wanted: np.ndarray, report: CheckReport) -> None:
    missing = np.setdiff1d(wanted, held)
    extra = np.setdiff1d(held, wanted)
    if len(missing) or len(extra):
        report.problems.append(
            f"{what} differs from the catalogue: {len(missing)} images missing (e.g. vec_ids "
            f"{missing[:5].tolist()}), {len(extra)} not catalogued (e.g. {extra[:5].tolist()}); the next start "
            "brings it in line, `python -m pictrace reindex` rebuilds it"
        )
    else:
        report.notes.append(f"{what}: the catalogue's {len(wanted)} images, no more")


def _check_vectors(settings: Settings, tuning: Tuning, catalogue: Catalogue, report: CheckReport) -> None:
    from pictrace.indexes.vector import IndexInfo
    from pictrace.indexes.vector.factory import build_index

    wanted = catalogue.vec_ids()
    if settings.milvus_uri is None and not settings.index_path.exists():
        report.notes.append(f"{settings.index_path}: none saved (built from the catalogue at start)")
        return
    backbone, fingerprint = catalogue.get_meta("backbone"), catalogue.get_meta("fingerprint")
    first = next(catalogue.embeddings(wanted[:1].tolist()), None) if len(wanted) else None
    if backbone is None or fingerprint is None or first is None:
        report.notes.append("vector index: the catalogue holds no vectors to compare with")
        return
    info = IndexInfo(backbone, fingerprint, int(first[1].shape[1]))
    try:
        index = build_index(settings, info, tuning.vectors)
    except PicTraceError as exc:
        report.problems.append(f"vector index: {exc}")
        return
    try:
        _compare(f"vector index {settings.milvus_uri or settings.index_path}", index.ids(), wanted, report)
    finally:
        index.close()


def _check_local(settings: Settings, tuning: Tuning, catalogue: Catalogue, report: CheckReport) -> None:
    from pictrace.indexes.local import LocalIndex, LocalIndexCorruptError, local_index_params

    path = settings.local_index_path
    if not tuning.local.persist or not path.exists():
        report.notes.append(f"{path}: none saved (built from the catalogue at start)")
        return
    try:
        local = LocalIndex.open(path, local_index_params(tuning.local), catalogue.get_meta("catalogue_id") or "")
    except LocalIndexCorruptError as exc:
        report.problems.append(f"{exc}; the next start rebuilds it")
        return
    if local is None:
        report.problems.append(
            f"{path} was built with other settings or for another catalogue; the next start rebuilds it"
        )
        return
    _compare(f"local-feature index {path}", local.held_ids(), catalogue.vec_ids(), report)


def check_catalogue(settings: Settings, tuning: Tuning) -> CheckReport:
    """Integrity of the catalogue (SQLite) and whether each saved index holds exactly its images."""
    report = CheckReport()
    if settings.database_url:
        report.notes.append("PostgreSQL catalogue: its integrity is the server's (pg_amcheck); indexes compared")
    elif not _integrity(settings.catalogue_path, report):
        return report
    from pictrace.service import open_catalogue

    try:
        catalogue = open_catalogue(settings)
    except PicTraceError as exc:
        report.problems.append(str(exc))
        return report
    try:
        report.notes.append(f"{catalogue.counts()[0]} images catalogued")
        _check_vectors(settings, tuning, catalogue, report)
        _check_local(settings, tuning, catalogue, report)
    except sqlite3.DatabaseError as exc:
        report.problems.append(f"reading {catalogue.location} failed: {exc}")
    finally:
        catalogue.close()
    return report
