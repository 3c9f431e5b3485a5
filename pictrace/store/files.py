"""What a folder gallery's files looked like when last read (size, mtime), so a re-scan reads only what changed.

A cache, not a record: a row missing or stale only costs reading the file again (and finding the same
SHA-256), never a wrong answer; it is written after the file's bytes were read, from the stat taken before.
"""

from __future__ import annotations

from collections.abc import Iterable

from pictrace.store.records import FileStat
from pictrace.store.sql import SqlAccess, marks


class FileQueries(SqlAccess):
    def file_stats(self) -> dict[str, FileStat]:
        """Every file path read so far, with the (size, mtime) it had then."""
        rows = self._query("SELECT url, size, mtime_ns FROM files")
        return {url: FileStat(int(size), int(mtime)) for url, size, mtime in rows}

    def record_file_stats(self, stats: Iterable[tuple[str, FileStat]]) -> None:
        rows = [(url, stat.size, stat.mtime_ns) for url, stat in stats]
        if not rows:
            return
        with self._transaction() as conn:
            conn.executemany(
                """INSERT INTO files (url, size, mtime_ns) VALUES (?, ?, ?)
                   ON CONFLICT (url) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns""",
                rows,
            )

    def forget_file_stats(self, urls: Iterable[str]) -> None:
        wanted = list(urls)
        with self._transaction() as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                conn.execute(f"DELETE FROM files WHERE url IN ({marks(len(chunk))})", chunk)
