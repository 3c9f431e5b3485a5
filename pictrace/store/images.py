"""Images and their sources: what the ingest stores, the API deletes, and searches and pages read.

An image (one SHA-256, with all its features) is stored once, under as many sources (URLs) as name those
bytes; a source that could not be ingested is kept as a failure, to report and retry. Each write is one
transaction, so a crash loses at most the image being written and never leaves half of one. Writes that add or
delete images log them for replicas (``log_changes``) in that same transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pictrace.errors import NotFoundError
from pictrace.store.blobs import decode_embedding, encode_embedding
from pictrace.store.changes import log_changes
from pictrace.store.records import (
    FailedSource,
    GalleryImage,
    ImageFacts,
    ImageRecord,
    Source,
    SourceState,
    StoredImage,
)
from pictrace.store.sql import SqlAccess, marks


class ImageQueries(SqlAccess):
    # ------------------------------------------------------------------------------------------ writes
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
                    encode_embedding(image.embedding),
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
                log_changes(conn, [int(row[0])], "add")
            upsert_source(conn, source, "ok", image.sha256, None)
            return int(row[0]), is_new

    def link_source(self, source: Source, sha256: str) -> None:
        """Point a URL at bytes already stored (the same bytes are stored once, under several URLs)."""
        with self._transaction() as conn:
            upsert_source(conn, source, "ok", sha256, None)

    def record_failure(self, source: Source, reason: str) -> None:
        with self._transaction() as conn:
            upsert_source(conn, source, "failed", None, reason)

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
                log_changes(conn, removed, "remove")
        return removed

    def remove_orphans(self) -> list[int]:
        """Delete images that no source names any more (a folder file whose bytes changed leaves its old image
        behind, and so does a run killed between the two writes). Returns the vec_ids to drop from indexes."""
        with self._transaction() as conn:
            rows = conn.execute(
                """SELECT i.vec_id FROM images i
                   WHERE NOT EXISTS (SELECT 1 FROM sources s WHERE s.sha256 = i.sha256)"""
            ).fetchall()
            removed = [int(r[0]) for r in rows]
            for start in range(0, len(removed), 500):
                chunk = removed[start : start + 500]
                conn.execute(f"DELETE FROM images WHERE vec_id IN ({marks(len(chunk))})", chunk)
            if removed:
                log_changes(conn, removed, "remove")
        return removed

    def remove_image(self, sha256: str) -> int:
        """Delete an image and every source naming it, in one transaction. Returns its vec_id."""
        with self._transaction() as conn:
            row = conn.execute("SELECT vec_id FROM images WHERE sha256 = ?", (sha256,)).fetchone()
            if row is None:
                raise NotFoundError(f"no image with sha256 {sha256}")
            conn.execute("DELETE FROM sources WHERE sha256 = ?", (sha256,))
            conn.execute("DELETE FROM images WHERE sha256 = ?", (sha256,))
            log_changes(conn, [int(row[0])], "remove")  # replicas drop it from their indexes
        return int(row[0])

    # ---------------------------------------------------------------------------------- source reads
    def source_states(self) -> dict[str, SourceState]:
        """Every known URL with its state, so an ingest can skip what is already done without fetching."""
        rows = self._query("SELECT url, status, sha256, error FROM sources")
        return {url: SourceState(status, sha, error) for url, status, sha, error in rows}

    def gallery_entry_urls(self) -> dict[str, str]:
        """Gallery sources as {url fetched: url as written in db.json}; shards are assigned by the latter."""
        rows = self._query("SELECT url, entry_url FROM sources WHERE origin = 'gallery'")
        return {url: entry_url or url for url, entry_url in rows}

    def gallery_sources_of(self, sha256: str) -> list[str]:
        """The db.json URLs (as fetched) that name an image."""
        rows = self._query("SELECT url FROM sources WHERE sha256 = ? AND origin = 'gallery'", (sha256,))
        return [str(r[0]) for r in rows]

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

    def local_path(self, sha256: str) -> Path:
        """The file behind an image whose source is a local gallery path (never a client-named path)."""
        rows = self._query(
            "SELECT url FROM sources WHERE sha256 = ? AND status = 'ok' AND url NOT LIKE 'http%' LIMIT 1",
            (sha256,),
        )
        if not rows:
            raise NotFoundError(f"no local file for image {sha256}")
        return Path(rows[0][0])

    # ----------------------------------------------------------------------------------- image reads
    def has_image(self, sha256: str) -> bool:
        return bool(self._query("SELECT 1 FROM images WHERE sha256 = ?", (sha256,)))

    def vec_ids(self) -> np.ndarray:
        return np.array([r[0] for r in self._query("SELECT vec_id FROM images")], dtype=np.int64)

    def last_vec_id(self) -> int:
        """The newest image's vec_id (vec_ids only grow, and are never reused); 0 when there is none."""
        return int(self._query("SELECT MAX(vec_id) FROM images")[0][0] or 0)

    def vec_ids_after(self, vec_id: int) -> list[int]:
        """The images added after the one that had ``vec_id``, oldest first."""
        return [int(r[0]) for r in self._query("SELECT vec_id FROM images WHERE vec_id > ? ORDER BY vec_id", (vec_id,))]

    def vec_ids_by_hash(self, sha256: str, pixel_sha256: str) -> list[int]:
        """Images with the same bytes or the same decoded pixels as a query: exact matches."""
        rows = self._query(
            "SELECT vec_id FROM images WHERE sha256 = ? OR pixel_sha256 = ? ORDER BY sha256 != ?",
            (sha256, pixel_sha256, sha256),
        )
        return [int(r[0]) for r in rows]

    def image_shapes(self, vec_ids: Iterable[int] | None = None) -> list[tuple[int, str, str, int, int, int]]:
        """``(vec_id, sha256, pixel_sha256, width, height, nbytes)`` of every image (or of ``vec_ids``): what
        grouping reads."""
        sql = "SELECT vec_id, sha256, pixel_sha256, width, height, nbytes FROM images"
        if vec_ids is None:
            rows = self._query(sql)
        else:
            wanted = sorted({int(v) for v in vec_ids})
            rows = []
            for start in range(0, len(wanted), 512):
                chunk = wanted[start : start + 512]
                rows.extend(self._query(f"{sql} WHERE vec_id IN ({marks(len(chunk))})", chunk))
        return [(int(v), str(s), str(p), int(w), int(h), int(n)) for v, s, p, w, h, n in rows]

    def same_pixels(self, pixel_sha256s: Iterable[str]) -> dict[str, list[int]]:
        """The images with each of these decoded pixels' hashes, by vec_id (the pixel hash is indexed: what an
        added image's exact twins are, without reading every image)."""
        wanted = sorted(set(pixel_sha256s))
        out: dict[str, list[int]] = {}
        for start in range(0, len(wanted), 512):
            chunk = wanted[start : start + 512]
            rows = self._query(
                f"SELECT pixel_sha256, vec_id FROM images WHERE pixel_sha256 IN ({marks(len(chunk))}) ORDER BY vec_id",
                chunk,
            )
            for pixels, vec_id in rows:
                out.setdefault(str(pixels), []).append(int(vec_id))
        return out

    def image_facts(self, vec_ids: Iterable[int]) -> dict[int, ImageFacts]:
        """Size, format and name of each image (named by its first source, as in results)."""
        wanted = [int(v) for v in vec_ids]
        out: dict[int, ImageFacts] = {}
        for start in range(0, len(wanted), 512):
            chunk = wanted[start : start + 512]
            rows = self._query(
                f"""SELECT i.vec_id, i.sha256, i.pixel_sha256, i.width, i.height, i.format, i.nbytes,
                           s.entry_id, s.entry_url, s.url
                    FROM images i LEFT JOIN sources s ON s.sha256 = i.sha256 AND s.status = 'ok'
                    WHERE i.vec_id IN ({marks(len(chunk))})
                    ORDER BY i.vec_id, s.position IS NULL, s.position, s.url""",
                chunk,
            )
            for vec_id, sha, pixel_sha, w, h, fmt, nbytes, entry_id, entry_url, url in rows:
                if int(vec_id) not in out:
                    shown = entry_url or url or sha
                    out[int(vec_id)] = ImageFacts(
                        int(vec_id), sha, pixel_sha, int(w), int(h), fmt, int(nbytes), entry_id or shown, shown
                    )
        return out

    def records(self, vec_ids: Iterable[int]) -> dict[int, ImageRecord]:
        """Describe images for results: the first source (by db.json position, then URL) names each one."""
        wanted = [int(v) for v in vec_ids]
        if not wanted:
            return {}
        rows = self._query(
            f"""SELECT i.vec_id, i.sha256, i.pixel_sha256, i.width, i.height, s.entry_id, s.entry_url, s.url,
                       s.metadata
                FROM images i JOIN sources s ON s.sha256 = i.sha256 AND s.status = 'ok'
                WHERE i.vec_id IN ({marks(len(wanted))})
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

    def grays_of(self, vec_ids: Iterable[int]) -> dict[int, bytes]:
        """What SSIM reads for the shortlist, without the ORB blobs a search has already read: the gray's own PNG
        where one is stored (older catalogues), else the thumbnail it is made from
        (``features.thumbnail.decode_ssim_gray`` reads either)."""
        wanted = [int(v) for v in vec_ids]
        if not wanted:
            return {}
        rows = self._query(
            f"""SELECT vec_id, CASE WHEN LENGTH(gray) > 0 THEN gray ELSE thumbnail END
                FROM images WHERE vec_id IN ({marks(len(wanted))})""",
            wanted,
        )
        return {int(v): bytes(g) for v, g in rows}

    def thumbnail(self, sha256: str) -> bytes:
        rows = self._query("SELECT thumbnail FROM images WHERE sha256 = ?", (sha256,))
        if not rows:
            raise NotFoundError(f"no image with sha256 {sha256}")
        return bytes(rows[0][0])

    # --------------------------------------------------------------------------------- feature reads
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
                rows = self._query(
                    f"SELECT vec_id, embedding FROM images WHERE vec_id IN ({marks(len(chunk))})", chunk
                )
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

    def orb_blobs_of(self, vec_ids: Iterable[int], batch: int = 1024) -> Iterator[tuple[int, bytes]]:
        """The stored ORB blobs of some images (those still catalogued), for a replica's local index."""
        wanted = [int(v) for v in vec_ids]
        for start in range(0, len(wanted), batch):
            chunk = wanted[start : start + batch]
            for vec_id, blob in self._query(
                f"SELECT vec_id, orb FROM images WHERE vec_id IN ({marks(len(chunk))})", chunk
            ):
                yield int(vec_id), bytes(blob)

    def orb_by_sha256(self, sha256: str) -> tuple[bytes, int, int]:
        """(stored ORB blob, original width, original height) of one image, for drawing its evidence."""
        rows = self._query("SELECT orb, width, height FROM images WHERE sha256 = ?", (sha256,))
        if not rows:
            raise NotFoundError(f"no image with sha256 {sha256}")
        return bytes(rows[0][0]), int(rows[0][1]), int(rows[0][2])


def upsert_source(conn: Any, source: Source, status: str, sha256: str | None, error: str | None) -> None:
    """Inside a write transaction: insert or update one source; ``attempts`` counts every write of it."""
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


def _to_arrays(rows: list[tuple[Any, ...]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    vectors = np.stack([decode_embedding(r[1]) for r in rows])
    return ids, vectors
