"""The match graph's links: verified geometric matches between gallery images (pictrace/graph.py).

Stored both ways and deleted with either image (``ON DELETE CASCADE``). Written at ingest; read for the few
best results of a query (query expansion). An image's row to itself marks its links as computed, so images
whose links were never computed (a crash in between, a catalogue older than the graph) can be found.
"""

from __future__ import annotations

from collections.abc import Iterable

from pictrace.store.sql import SqlAccess, marks


class LinkQueries(SqlAccess):
    def add_links(self, vec_id: int, links: Iterable[tuple[int, int]]) -> int:
        """Store ``(other, inliers)`` links of one image in both directions, and mark the image as linked (a
        row to itself) even when nothing matched. Links to images deleted meanwhile are skipped. Returns how
        many links were stored."""
        vec_id = int(vec_id)
        offered = {int(other): int(inliers) for other, inliers in links if int(other) != vec_id}
        with self._transaction() as conn:
            present = {
                int(r[0])
                for r in conn.execute(
                    f"SELECT vec_id FROM images WHERE vec_id IN ({marks(len(offered) + 1)})", (vec_id, *offered)
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
