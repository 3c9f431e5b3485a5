"""The catalogue: the system of record for every image, its sources (URLs) and its features.

``Catalogue`` holds every query once, in SQL that SQLite and PostgreSQL both run (``?`` placeholders,
``ON CONFLICT``, ``RETURNING``); it talks to the database only through ``_query`` and ``_transaction``, so
``PostgresCatalogue`` (pictrace/store/postgres.py) overrides those and the connection, and inherits the rest.
A method added here works on both engines when it uses only those two and portable SQL.

The default is SQLite in WAL mode with ``synchronous=FULL``: each ingested image is committed with all its
features in one transaction, so a crash (even ``kill -9``) loses at most the image being written and never
leaves half of one.
Vector indexes are derived from the embeddings stored here and can always be rebuilt from them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import numpy as np

from pictrace.errors import NotFoundError

# One schema for both catalogues; only the column types differ (see ``schema``).
SCHEMA_TEMPLATE = Template("""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    vec_id       $identity,
    sha256       TEXT NOT NULL UNIQUE,
    pixel_sha256 TEXT NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    format       TEXT NOT NULL,
    nbytes       $int64 NOT NULL,
    dhash        $int64 NOT NULL,
    embedding    $blob NOT NULL,
    gray         $blob NOT NULL,
    orb          $blob NOT NULL,
    thumbnail    $blob NOT NULL,
    added_at     $real NOT NULL
);
CREATE INDEX IF NOT EXISTS images_pixel ON images(pixel_sha256);
CREATE TABLE IF NOT EXISTS sources (
    url        TEXT PRIMARY KEY,
    entry_url  TEXT,
    origin     TEXT NOT NULL,
    entry_id   TEXT,
    position   INTEGER,
    sha256     TEXT REFERENCES images(sha256),
    metadata   TEXT NOT NULL DEFAULT '{}',
    status     TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error      TEXT,
    attempts   INTEGER NOT NULL DEFAULT 0,
    updated_at $real NOT NULL
);
CREATE INDEX IF NOT EXISTS sources_sha ON sources(sha256);
-- change log (issue 4): one row per image added or deleted, written in the transaction that does it, after
-- the generation bump (whose row lock orders the seqs by commit on PostgreSQL); replicas apply the rows newer
-- than the last one they applied. Catalogues made before it get the table, empty, when next opened.
CREATE TABLE IF NOT EXISTS change_log (
    seq        $identity,
    vec_id     $int64 NOT NULL,
    op         TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    generation $int64 NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (id INTEGER PRIMARY KEY CHECK (id = 1), generation $int64 NOT NULL);
INSERT INTO changes (id, generation) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS links (
    vec_id  $int64 NOT NULL REFERENCES images(vec_id) ON DELETE CASCADE,
    other   $int64 NOT NULL REFERENCES images(vec_id) ON DELETE CASCADE,
    inliers INTEGER NOT NULL,
    PRIMARY KEY (vec_id, other)
);
""")


def schema(identity: str, int64: str, blob: str, real: str) -> str:
    return SCHEMA_TEMPLATE.substitute(identity=identity, int64=int64, blob=blob, real=real)


SCHEMA = schema(identity="INTEGER PRIMARY KEY AUTOINCREMENT", int64="INTEGER", blob="BLOB", real="REAL")

# Bumped in the transaction that adds or deletes an image: replicas compare it to know their index is stale.
BUMP_GENERATION = "UPDATE changes SET generation = generation + 1 WHERE id = 1"
# Right after BUMP_GENERATION, once per image added or deleted: the row carries the generation it made.
LOG_CHANGE = "INSERT INTO change_log (vec_id, op, generation) SELECT ?, ?, generation FROM changes WHERE id = 1"


@dataclass(frozen=True)
class StoredImage:
    """Everything the ingest computed for one distinct image (one SHA-256)."""

    sha256: str
    pixel_sha256: str
    width: int
    height: int
    format: str
    nbytes: int
    dhash: int
    embedding: np.ndarray
    gray_png: bytes
    orb: bytes
    thumbnail: bytes


@dataclass(frozen=True)
class Source:
    """Where an image came from: a db.json entry (origin 'gallery') or an API call (origin 'api')."""

    url: str
    origin: str = "gallery"
    entry_url: str | None = None
    entry_id: str | None = None
    position: int | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class SourceState:
    status: str
    sha256: str | None
    error: str | None


@dataclass(frozen=True)
class ImageRecord:
    """What a search result shows about a gallery image (its first source names it)."""

    vec_id: int
    sha256: str
    pixel_sha256: str
    width: int
    height: int
    entry_id: str
    url: str  # as written in db.json (or given to the API)
    location: str  # where it was fetched from: the URL, or the resolved local path
    metadata: dict[str, Any]

    @property
    def is_remote(self) -> bool:
        return self.location.startswith(("http://", "https://"))


@dataclass(frozen=True)
class RerankFeatures:
    gray_png: bytes
    orb: bytes


@dataclass(frozen=True)
class FailedSource:
    url: str
    position: int | None
    error: str


_MMAP_BYTES = 1 << 40


class Catalogue:
    """Thread-safe access to the catalogue: SQLite here (one connection, one lock; WAL lets readers overlap).

    Engine-specific: ``__init__``, ``close``, ``location``, ``_transaction``, ``_query``. Everything else is
    shared with PostgresCatalogue.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            # A search reads the ORB blobs of ~40 candidates (~40 KB each): through a memory map that took
            # 0.5 ms here instead of 2.2 ms of read() calls. The pages are the OS's file cache, reclaimable, not
            # the process's heap; SQLite maps at most its compiled limit (2 GB in most builds) and reads on.
            self._conn.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def location(self) -> str:
        """Where the catalogue lives, for messages (a file, or a database URL without its password)."""
        return str(self.path)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """One write transaction; yields a connection with ``execute``/``executemany`` (``?`` placeholders)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one read (``?`` placeholders) and return all its rows."""
        with self._lock:
            return list(self._conn.execute(sql, tuple(params)).fetchall())

    # ------------------------------------------------------------------------------------------- meta
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # ---------------------------------------------------------------------------------------- sources
    def source_states(self) -> dict[str, SourceState]:
        """Every known URL with its state, so an ingest can skip what is already done without fetching."""
        rows = self._query("SELECT url, status, sha256, error FROM sources")
        return {url: SourceState(status, sha, error) for url, status, sha, error in rows}

    def _upsert_source(
        self, conn: Any, source: Source, status: str, sha256: str | None, error: str | None
    ) -> None:
        conn.execute(
            """INSERT INTO sources (url, entry_url, origin, entry_id, position, sha256, metadata, status, error,
                                    attempts, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)
               ON CONFLICT(url) DO UPDATE SET entry_url=excluded.entry_url, origin=excluded.origin,
                   entry_id=excluded.entry_id,
                   position=excluded.position, sha256=excluded.sha256, metadata=excluded.metadata,
                   status=excluded.status, error=excluded.error, attempts=sources.attempts + 1,
                   updated_at=excluded.updated_at""",
            (
                source.url,
                source.entry_url or source.url,
                source.origin,
                source.entry_id,
                source.position,
                sha256,
                json.dumps(source.metadata or {}),
                status,
                error,
                time.time(),
            ),
        )

    def update_sources_details(self, sources: Iterable[Source]) -> None:
        """Refresh id/metadata/position of already indexed URLs (db.json edited, images unchanged)."""
        rows = [
            (s.entry_url or s.url, s.entry_id, s.position, json.dumps(s.metadata or {}), s.origin, s.url)
            for s in sources
        ]
        with self._transaction() as conn:
            conn.executemany(
                """UPDATE sources SET entry_url = ?, entry_id = ?, position = ?, metadata = ?, origin = ?
                   WHERE url = ?""",
                rows,
            )

    def record_failure(self, source: Source, reason: str) -> None:
        with self._transaction() as conn:
            self._upsert_source(conn, source, "failed", None, reason)

    def has_image(self, sha256: str) -> bool:
        return bool(self._query("SELECT 1 FROM images WHERE sha256 = ?", (sha256,)))

    def link_source(self, source: Source, sha256: str) -> None:
        """Point a URL at bytes already stored (the same bytes are stored once, under several URLs)."""
        with self._transaction() as conn:
            self._upsert_source(conn, source, "ok", sha256, None)

    def add_image(self, image: StoredImage, source: Source) -> tuple[int, bool]:
        """Store an image and its source in one transaction. Returns (vec_id, newly_added).

        ``ON CONFLICT DO NOTHING`` makes it safe against another process storing the same bytes at once.
        """
        with self._transaction() as conn:
            row = conn.execute(
                """INSERT INTO images (sha256, pixel_sha256, width, height, format, nbytes, dhash, embedding,
                                       gray, orb, thumbnail, added_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (sha256) DO NOTHING RETURNING vec_id""",
                (
                    image.sha256,
                    image.pixel_sha256,
                    image.width,
                    image.height,
                    image.format,
                    image.nbytes,
                    image.dhash,
                    np.ascontiguousarray(image.embedding, dtype=np.float32).tobytes(),
                    image.gray_png,
                    image.orb,
                    image.thumbnail,
                    time.time(),
                ),
            ).fetchone()
            is_new = row is not None
            if row is None:
                row = conn.execute("SELECT vec_id FROM images WHERE sha256 = ?", (image.sha256,)).fetchone()
            else:
                conn.execute(BUMP_GENERATION)
                conn.execute(LOG_CHANGE, (int(row[0]), "add"))
            self._upsert_source(conn, source, "ok", image.sha256, None)
            return int(row[0]), is_new

    def remove_sources(self, urls: Iterable[str]) -> list[int]:
        """Forget URLs; images left with no source are deleted. Returns the vec_ids to drop from indexes."""
        urls = list(urls)
        removed: list[int] = []
        with self._transaction() as conn:
            for url in urls:
                row = conn.execute("SELECT sha256 FROM sources WHERE url = ?", (url,)).fetchone()
                conn.execute("DELETE FROM sources WHERE url = ?", (url,))
                if row is None or row[0] is None:
                    continue
                still_used = conn.execute("SELECT 1 FROM sources WHERE sha256 = ?", (row[0],)).fetchone()
                if still_used is None:
                    image = conn.execute("SELECT vec_id FROM images WHERE sha256 = ?", (row[0],)).fetchone()
                    conn.execute("DELETE FROM images WHERE sha256 = ?", (row[0],))
                    if image is not None:
                        removed.append(int(image[0]))
            if removed:
                conn.execute(BUMP_GENERATION)
                conn.executemany(LOG_CHANGE, [(vec_id, "remove") for vec_id in removed])
        return removed

    def gallery_urls(self) -> set[str]:
        return {row[0] for row in self._query("SELECT url FROM sources WHERE origin = 'gallery'")}

    def gallery_entry_urls(self) -> dict[str, str]:
        """Gallery sources as {url fetched: url as written in db.json}; shards are assigned by the latter."""
        rows = self._query("SELECT url, entry_url FROM sources WHERE origin = 'gallery'")
        return {url: entry_url or url for url, entry_url in rows}

    def generation(self) -> int:
        """A counter that moves whenever an image is added or deleted, by any process sharing the catalogue."""
        return int(self._query("SELECT generation FROM changes WHERE id = 1")[0][0])

    # ------------------------------------------------------------------------------------------ reads
    def counts(self) -> tuple[int, int]:
        """(distinct images indexed, sources that failed)."""
        images = self._query("SELECT COUNT(*) FROM images")[0][0]
        failed = self._query("SELECT COUNT(*) FROM sources WHERE status = 'failed'")[0][0]
        return int(images), int(failed)

    def failures(self) -> list[FailedSource]:
        rows = self._query(
            "SELECT url, position, error FROM sources WHERE status = 'failed' ORDER BY position"
        )
        return [FailedSource(url, pos, err or "") for url, pos, err in rows]

    def vec_ids(self) -> np.ndarray:
        return np.array([r[0] for r in self._query("SELECT vec_id FROM images")], dtype=np.int64)

    def embeddings(
        self, vec_ids: Iterable[int] | None = None, batch: int = 4096
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, vectors) batches: all images, or only ``vec_ids``, for (re)building an index."""
        if vec_ids is None:
            last = 0
            while True:
                rows = self._query(
                    "SELECT vec_id, embedding FROM images WHERE vec_id > ? ORDER BY vec_id LIMIT ?",
                    (last, batch),
                )
                if not rows:
                    return
                yield _to_arrays(rows)
                last = int(rows[-1][0])
        else:
            wanted = [int(v) for v in vec_ids]
            for start in range(0, len(wanted), batch):
                chunk = wanted[start : start + batch]
                marks = ",".join("?" * len(chunk))
                rows = self._query(f"SELECT vec_id, embedding FROM images WHERE vec_id IN ({marks})", chunk)
                if rows:
                    yield _to_arrays(rows)

    def orb_blobs(self, batch: int = 1024) -> Iterator[tuple[int, bytes]]:
        """Every image's stored ORB blob, for rebuilding the local-feature index at start."""
        last = 0
        while True:
            rows = self._query(
                "SELECT vec_id, orb FROM images WHERE vec_id > ? ORDER BY vec_id LIMIT ?", (last, batch)
            )
            if not rows:
                return
            for vec_id, blob in rows:
                yield int(vec_id), bytes(blob)
            last = int(rows[-1][0])

    def records(self, vec_ids: Iterable[int]) -> dict[int, ImageRecord]:
        """Describe images for results: the first source (by db.json position, then URL) names each one."""
        wanted = [int(v) for v in vec_ids]
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        rows = self._query(
            f"""SELECT i.vec_id, i.sha256, i.pixel_sha256, i.width, i.height, s.entry_id, s.entry_url, s.url,
                       s.metadata
                FROM images i JOIN sources s ON s.sha256 = i.sha256 AND s.status = 'ok'
                WHERE i.vec_id IN ({marks})
                ORDER BY i.vec_id, s.position IS NULL, s.position, s.url""",
            wanted,
        )
        out: dict[int, ImageRecord] = {}
        for vec_id, sha, pixel_sha, width, height, entry_id, entry_url, url, metadata in rows:
            if vec_id not in out:
                shown = entry_url or url
                out[vec_id] = ImageRecord(
                    vec_id, sha, pixel_sha, width, height, entry_id or shown, shown, url, json.loads(metadata)
                )
        return out

    def vec_ids_by_hash(self, sha256: str, pixel_sha256: str) -> list[int]:
        """Images with the same bytes or the same decoded pixels as a query: exact matches."""
        rows = self._query(
            "SELECT vec_id FROM images WHERE sha256 = ? OR pixel_sha256 = ? ORDER BY sha256 != ?",
            (sha256, pixel_sha256, sha256),
        )
        return [int(r[0]) for r in rows]

    def rerank_features(self, vec_ids: Iterable[int]) -> dict[int, RerankFeatures]:
        """Read SSIM/ORB features of the few candidates of one query only (memory does not grow with them)."""
        wanted = [int(v) for v in vec_ids]
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        rows = self._query(f"SELECT vec_id, gray, orb FROM images WHERE vec_id IN ({marks})", wanted)
        return {int(v): RerankFeatures(bytes(g), bytes(o)) for v, g, o in rows}

    def grays_of(self, vec_ids: Iterable[int]) -> dict[int, bytes]:
        """The SSIM shortlist's stored grey thumbnails (PNG), without the ORB blobs a search has already read."""
        wanted = [int(v) for v in vec_ids]
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        rows = self._query(f"SELECT vec_id, gray FROM images WHERE vec_id IN ({marks})", wanted)
        return {int(v): bytes(g) for v, g in rows}

    def thumbnail(self, sha256: str) -> bytes:
        rows = self._query("SELECT thumbnail FROM images WHERE sha256 = ?", (sha256,))
        if not rows:
            raise NotFoundError(f"no image with sha256 {sha256}")
        return bytes(rows[0][0])

    def local_path(self, sha256: str) -> Path:
        """The file behind an image whose source is a local gallery path (never a client-named path)."""
        rows = self._query(
            "SELECT url FROM sources WHERE sha256 = ? AND status = 'ok' AND url NOT LIKE 'http%' LIMIT 1",
            (sha256,),
        )
        if not rows:
            raise NotFoundError(f"no local file for image {sha256}")
        return Path(rows[0][0])

    # ------------------------------------------------------------------------ writes through the API
    # (issue 5) Kept apart at the end of the class, in plain portable SQL, so another catalogue backend
    # can mirror them one for one.
    def remove_image(self, sha256: str) -> int:
        """Delete an image and every source naming it, in one transaction. Returns its vec_id."""
        with self._transaction() as conn:
            row = conn.execute("SELECT vec_id FROM images WHERE sha256 = ?", (sha256,)).fetchone()
            if row is None:
                raise NotFoundError(f"no image with sha256 {sha256}")
            conn.execute("DELETE FROM sources WHERE sha256 = ?", (sha256,))
            conn.execute("DELETE FROM images WHERE sha256 = ?", (sha256,))
            conn.execute(BUMP_GENERATION)  # replicas drop it from their indexes
            conn.execute(LOG_CHANGE, (int(row[0]), "remove"))
        return int(row[0])

    def delete_meta(self, key: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))

    # ---------------------------------------------------------------------- pages and evidence (issue 7)
    # Plain, portable SQL (no SQLite-only syntax), so another catalogue backend can copy these as they are.

    def list_images(self, offset: int, limit: int) -> list[GalleryImage]:
        """One page of indexed images, oldest first, each named by its first source (as in results)."""
        rows = self._query(
            """SELECT i.sha256, i.width, i.height, i.format, i.nbytes, s.entry_id, s.entry_url, s.url,
                      (SELECT COUNT(*) FROM sources c WHERE c.sha256 = i.sha256 AND c.status = 'ok')
               FROM images i
               JOIN sources s ON s.url = (
                   SELECT f.url FROM sources f WHERE f.sha256 = i.sha256 AND f.status = 'ok'
                   ORDER BY CASE WHEN f.position IS NULL THEN 1 ELSE 0 END, f.position, f.url
                   LIMIT 1)
               ORDER BY i.vec_id
               LIMIT ? OFFSET ?""",
            (int(limit), int(offset)),
        )
        return [
            GalleryImage(sha, w, h, fmt, nbytes, entry_id or (entry_url or url), entry_url or url, url, int(n))
            for sha, w, h, fmt, nbytes, entry_id, entry_url, url, n in rows
        ]

    def orb_by_sha256(self, sha256: str) -> tuple[bytes, int, int]:
        """(stored ORB blob, original width, original height) of one image, for drawing its evidence."""
        rows = self._query("SELECT orb, width, height FROM images WHERE sha256 = ?", (sha256,))
        if not rows:
            raise NotFoundError(f"no image with sha256 {sha256}")
        return bytes(rows[0][0]), int(rows[0][1]), int(rows[0][2])

    # ---------------------------------------------------------------------- match graph (issue 6)
    # Verified geometric matches between gallery images, stored both ways and deleted with either image
    # (ON DELETE CASCADE). Written at ingest; read for the few best results of a query (query expansion).

    def add_links(self, vec_id: int, links: Iterable[tuple[int, int]]) -> int:
        """Store ``(other, inliers)`` links of one image in both directions, and mark the image as linked (a
        row to itself) even when nothing matched. Links to images deleted meanwhile are skipped. Returns how
        many links were stored."""
        vec_id = int(vec_id)
        offered = {int(other): int(inliers) for other, inliers in links if int(other) != vec_id}
        with self._transaction() as conn:
            marks = ",".join("?" * (len(offered) + 1))
            present = {
                int(r[0])
                for r in conn.execute(
                    f"SELECT vec_id FROM images WHERE vec_id IN ({marks})", (vec_id, *offered)
                ).fetchall()
            }
            if vec_id not in present:
                return 0
            pairs = [(vec_id, other, n) for other, n in offered.items() if other in present]
            rows = [(vec_id, vec_id, 0)] + pairs + [(b, a, n) for a, b, n in pairs]
            # EXISTS again: another process may delete an image between the read above and this write
            conn.executemany(
                """INSERT INTO links (vec_id, other, inliers)
                   SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM images WHERE vec_id = ?)
                                    AND EXISTS (SELECT 1 FROM images WHERE vec_id = ?)
                   ON CONFLICT (vec_id, other) DO UPDATE SET inliers = excluded.inliers""",
                [(a, b, n, a, b) for a, b, n in rows],
            )
        return len(pairs)

    def links_of(self, vec_ids: Iterable[int]) -> dict[int, list[tuple[int, int]]]:
        """``{vec_id: [(other, inliers), ...]}`` for the given images (absent: no stored links)."""
        wanted = [int(v) for v in vec_ids]
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        out: dict[int, list[tuple[int, int]]] = {}
        for vec_id, other, inliers in self._query(
            f"SELECT vec_id, other, inliers FROM links WHERE vec_id IN ({marks}) AND other != vec_id", wanted
        ):
            out.setdefault(int(vec_id), []).append((int(other), int(inliers)))
        return out

    def unlinked(self) -> list[int]:
        """Images whose links were never computed (added before the graph existed, or a crash in between)."""
        rows = self._query(
            """SELECT vec_id FROM images
               WHERE vec_id NOT IN (SELECT vec_id FROM links WHERE other = vec_id) ORDER BY vec_id"""
        )
        return [int(r[0]) for r in rows]

    # ------------------------------------------------------------------------------ change log (issue 4)
    # What replicas follow (pictrace/sync.py): rows are written by add_image, remove_sources and remove_image
    # (LOG_CHANGE, after BUMP_GENERATION). Plain, portable SQL, like the rest.

    def change_position(self) -> ChangePosition:
        """The newest change and the generation counter, read together (one statement: one snapshot)."""
        rows = self._query(
            "SELECT (SELECT MAX(seq) FROM change_log), generation FROM changes WHERE id = 1"
        )
        return ChangePosition(int(rows[0][0] or 0), int(rows[0][1]))

    def changes_after(self, seq: int) -> list[Change]:
        """The log's rows newer than ``seq``, oldest first (what a replica has not applied yet)."""
        rows = self._query(
            "SELECT seq, vec_id, op, generation FROM change_log WHERE seq > ? ORDER BY seq", (int(seq),)
        )
        return [Change(int(s), int(v), str(op), int(g)) for s, v, op, g in rows]

    def orb_blobs_of(self, vec_ids: Iterable[int], batch: int = 1024) -> Iterator[tuple[int, bytes]]:
        """The stored ORB blobs of some images (those still catalogued), for a replica's local index."""
        wanted = [int(v) for v in vec_ids]
        for start in range(0, len(wanted), batch):
            chunk = wanted[start : start + batch]
            marks = ",".join("?" * len(chunk))
            for vec_id, blob in self._query(f"SELECT vec_id, orb FROM images WHERE vec_id IN ({marks})", chunk):
                yield int(vec_id), bytes(blob)

    def trim_change_log(self, through_seq: int) -> int:
        """Drop the log's rows up to ``through_seq`` (about 40 bytes each, so rarely worth it). A replica that had
        not applied them notices the gap in generations and reconciles in full. Returns the rows dropped."""
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM change_log WHERE seq <= ?", (int(through_seq),))
            return int(cursor.rowcount)


@dataclass(frozen=True)
class ChangePosition:
    """Where a replica stands in the change log: the last seq applied and the generation it brought."""

    seq: int
    generation: int


@dataclass(frozen=True)
class Change:
    """One row of the change log: an image (its vec_id) that was added or removed."""

    seq: int
    vec_id: int
    op: str  # 'add' | 'remove'
    generation: int


@dataclass(frozen=True)
class GalleryImage:
    """A row of the gallery page."""

    sha256: str
    width: int
    height: int
    format: str
    nbytes: int
    entry_id: str
    url: str  # as written in db.json
    location: str  # the URL, or the resolved local path
    sources: int  # URLs with these same bytes

    @property
    def is_remote(self) -> bool:
        return self.location.startswith(("http://", "https://"))


def _to_arrays(rows: list[tuple[Any, ...]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
    return ids, vectors
