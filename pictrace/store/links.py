"""The match graph's links: verified geometric matches between gallery images (pictrace/graph.py).

Stored both ways and deleted with either image (``ON DELETE CASCADE``). Written at ingest; read for the few
best results of a query (query expansion) and for the duplicate groups (pictrace/duplicates.py), which is why
each row also keeps the pair's verdict, embedding cosine and homography (~60 bytes a direction). An image's row
to itself marks its links as computed, so images whose links were never computed (a crash in between, a
catalogue older than the graph or than the kept verdicts) can be found.

The people's decisions about duplicates live here too (``duplicate_decisions``): keyed by content hash, not
vec_id, so they outlive a delete, a re-ingest and a reindex.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from pictrace.store.records import GroupLinks, LinkFit, PairLink
from pictrace.store.sql import SqlAccess, marks


def _fit_bytes(homography: np.ndarray | None) -> bytes | None:
    if homography is None:
        return None
    hom = np.asarray(homography, dtype=np.float64)
    return bytes((hom / hom[2, 2]).astype(np.float32).tobytes())


def _inverse_bytes(homography: np.ndarray | None) -> bytes | None:
    if homography is None:
        return None
    try:
        return _fit_bytes(np.linalg.inv(np.asarray(homography, dtype=np.float64)))
    except np.linalg.LinAlgError:
        return None


_COPY_FITS = "SELECT vec_id, other, inliers, fit FROM links WHERE tier = 'copy' AND vec_id < other"


def _fit_of(blob: Any) -> np.ndarray | None:
    if blob is None:
        return None
    return np.frombuffer(bytes(blob), dtype=np.float32).astype(np.float64).reshape(3, 3)


def _as_fit(link: LinkFit | tuple[int, int]) -> LinkFit:
    return link if isinstance(link, LinkFit) else LinkFit(int(link[0]), int(link[1]))


_BUMP = "UPDATE link_generation SET generation = generation + 1 WHERE id = 1"


class LinkQueries(SqlAccess):
    def add_links(self, vec_id: int, links: Iterable[LinkFit | tuple[int, int]]) -> int:
        """Store the links of one image (``LinkFit``, or bare ``(other, inliers)``) in both directions, and mark
        the image as linked (a row to itself) even when nothing matched. Links to images deleted meanwhile are
        skipped. Returns how many links were stored."""
        vec_id = int(vec_id)
        offered = {f.other: f for f in map(_as_fit, links) if int(f.other) != vec_id}
        with self._transaction() as conn:
            present = {
                int(r[0])
                for r in conn.execute(
                    f"SELECT vec_id FROM images WHERE vec_id IN ({marks(len(offered) + 1)})", (vec_id, *offered)
                ).fetchall()
            }
            if vec_id not in present:
                return 0
            fits = [f for other, f in offered.items() if other in present]
            rows: list[tuple[int, int, int, str | None, float | None, bytes | None]] = [
                (vec_id, vec_id, 0, None, None, None)
            ]
            for f in fits:
                rows.append((vec_id, f.other, f.inliers, f.tier, f.cosine, _fit_bytes(f.homography)))
                rows.append((f.other, vec_id, f.inliers, f.tier, f.cosine, _inverse_bytes(f.homography)))
            # EXISTS again: another process may delete an image between the read above and this write
            conn.executemany(
                """INSERT INTO links (vec_id, other, inliers, tier, cosine, fit)
                   SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM images WHERE vec_id = ?)
                                    AND EXISTS (SELECT 1 FROM images WHERE vec_id = ?)
                   ON CONFLICT (vec_id, other) DO UPDATE SET inliers = excluded.inliers, tier = excluded.tier,
                       cosine = excluded.cosine, fit = excluded.fit""",
                [(a, b, n, t, c, h, a, b) for a, b, n, t, c, h in rows],
            )
            conn.execute(_BUMP)
        return len(fits)

    def links_of(self, vec_ids: Iterable[int]) -> dict[int, list[tuple[int, int]]]:
        """``{vec_id: [(other, inliers), ...]}`` for the given images (absent: no stored links)."""
        wanted = [int(v) for v in vec_ids]
        if not wanted:
            return {}
        out: dict[int, list[tuple[int, int]]] = {}
        for vec_id, other, inliers in self._query(
            f"SELECT vec_id, other, inliers FROM links WHERE vec_id IN ({marks(len(wanted))}) AND other != vec_id",
            wanted,
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

    # ------------------------------------------------------------------------------ duplicate groups
    def link_generation(self) -> int:
        """A number that changes with every links write or decision (images removed: see the change log)."""
        rows = self._query("SELECT generation FROM link_generation WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    def copy_fits(self, vec_ids: Iterable[int] | None = None) -> list[tuple[int, int, int, np.ndarray | None]]:
        """Copy links once each, ``(a, b, inliers, a's pixels -> b's)`` with ``a < b``: every one, or those
        touching ``vec_ids``."""
        if vec_ids is None:
            return [fit for part in self.copy_fit_slices() for fit in part]
        wanted = sorted({int(v) for v in vec_ids})
        out: dict[tuple[int, int], tuple[int, int, int, np.ndarray | None]] = {}
        for start in range(0, len(wanted), 256):
            chunk = wanted[start : start + 256]
            m = marks(len(chunk))
            # Both halves by the primary key: each link is stored both ways, so a pair whose smaller end is not
            # wanted is found from its other row. "other IN" had no index, and "tier = 'copy'" led the planner
            # to the tier index: a scan of every copy link per chunk (0.34 s at 100k images, now 0.017 s).
            query = f"""SELECT vec_id, other, inliers, fit FROM links
                          WHERE vec_id IN ({m}) AND vec_id < other AND COALESCE(tier, '') = 'copy'
                          UNION ALL
                          SELECT c.vec_id, c.other, c.inliers, c.fit
                          FROM links r JOIN links c ON c.vec_id = r.other AND c.other = r.vec_id
                          WHERE r.vec_id IN ({m}) AND r.other < r.vec_id AND COALESCE(c.tier, '') = 'copy'"""
            for a, b, n, fit in self._query(query, [*chunk, *chunk]):
                out[(int(a), int(b))] = (int(a), int(b), int(n), _fit_of(fit))
        return list(out.values())

    def copy_fit_slices(self) -> Iterator[list[tuple[int, int, int, np.ndarray | None]]]:
        """Every copy link as :meth:`copy_fits` gives them, a slice of vec_ids at a time: the catalogue answers
        other queries in between, and a million images' links (millions) are never all in one list."""
        top = self._query("SELECT MAX(vec_id) FROM images")[0][0]
        for start in range(0, int(top or 0) + 1, 4096):
            rows = self._query(f"{_COPY_FITS} AND vec_id >= ? AND vec_id < ?", (start, start + 4096))
            yield [(int(a), int(b), int(n), _fit_of(fit)) for a, b, n, fit in rows]

    def copy_tally(self) -> tuple[int, int]:
        """(copy links, their inliers summed): a cheap check that no copy link appeared, changed or went
        among images already known."""
        rows = self._query("SELECT COUNT(*), SUM(inliers) FROM links WHERE tier = 'copy' AND vec_id < other")
        return int(rows[0][0] or 0), int(rows[0][1] or 0)

    def pixel_twins(self) -> list[tuple[int, str]]:
        """``(vec_id, pixel_sha256)`` of every image that shares its decoded pixels with another one."""
        rows = self._query(
            """SELECT vec_id, pixel_sha256 FROM images WHERE pixel_sha256 IN
               (SELECT pixel_sha256 FROM images GROUP BY pixel_sha256 HAVING COUNT(*) > 1) ORDER BY vec_id"""
        )
        return [(int(v), str(p)) for v, p in rows]

    def group_links(self, vec_ids: Iterable[int]) -> GroupLinks:
        """The links among these images (each direction, copy links with their fit), and the strongest link of
        each image outside them linked to one of them. The outward ones are only tallied: a 100k gallery's 20
        largest groups have ~22,000, and reading each as a link with its fit made a list page 210 ms."""
        wanted = [int(v) for v in vec_ids]
        inside_ids = set(wanted)
        inside: list[PairLink] = []
        leaving: dict[int, int] = {}
        for start in range(0, len(wanted), 512):
            chunk = wanted[start : start + 512]
            for a, b, n, tier, cosine, fit in self._query(
                f"""SELECT vec_id, other, inliers, tier, cosine, fit FROM links
                    WHERE vec_id IN ({marks(len(chunk))}) AND other != vec_id""",
                chunk,
            ):
                if b not in inside_ids:
                    leaving[b] = max(leaving.get(b, 0), n)
                    continue
                hom = _fit_of(fit) if tier == "copy" else None
                inside.append(PairLink(a, b, n, tier, None if cosine is None else float(cosine), hom))
        return GroupLinks(inside, leaving)

    def vec_ids_of(self, sha256s: Iterable[str]) -> dict[str, int]:
        """``{sha256: vec_id}`` of those catalogued."""
        wanted = list(dict.fromkeys(sha256s))
        if not wanted:
            return {}
        rows = self._query(f"SELECT sha256, vec_id FROM images WHERE sha256 IN ({marks(len(wanted))})", wanted)
        return {str(s): int(v) for s, v in rows}

    def decide_distinct(self, sha_a: str, sha_b: str) -> None:
        """Remember that two images are not the same picture: the groups never join them again."""
        a, b = sorted((sha_a, sha_b))
        self._decide(a, b, "distinct")

    def decide_keep(self, sha256: str) -> None:
        """Remember which image a group keeps: it is the keeper whatever joins the group later."""
        self._decide(sha256, "", "keep")

    def _decide(self, sha_a: str, sha_b: str, kind: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                """INSERT INTO duplicate_decisions (sha_a, sha_b, kind, decided_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (sha_a, sha_b, kind) DO UPDATE SET decided_at = excluded.decided_at""",
                (sha_a, sha_b, kind, time.time()),
            )
            conn.execute(_BUMP)

    def decisions(self) -> tuple[list[tuple[str, str]], list[str]]:
        """(pairs decided distinct, images decided kept)."""
        rows = self._query("SELECT sha_a, sha_b, kind FROM duplicate_decisions ORDER BY decided_at, sha_a, sha_b")
        distinct = [(str(a), str(b)) for a, b, kind in rows if kind == "distinct"]
        kept = [str(a) for a, _, kind in rows if kind == "keep"]
        return distinct, kept
