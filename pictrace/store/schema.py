"""The catalogue's tables, one schema for SQLite and PostgreSQL; only the column types differ.

Every statement is ``IF NOT EXISTS`` / ``ON CONFLICT DO NOTHING`` and runs each time a catalogue is opened, so
a catalogue lacking a table (made by an older PicTrace) gets it, empty, and existing data is never touched.
Changing a statement here changes what existing data dirs hold: it needs a migration (``upgrade``), run after
the statements at every open.
"""

from __future__ import annotations

from string import Template
from typing import Any

_TEMPLATE = Template("""
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
-- one row per image added or deleted, written in the transaction that does it (see changes.py)
CREATE TABLE IF NOT EXISTS change_log (
    seq        $identity,
    vec_id     $int64 NOT NULL,
    op         TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    generation $int64 NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (id INTEGER PRIMARY KEY CHECK (id = 1), generation $int64 NOT NULL);
INSERT INTO changes (id, generation) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
-- a folder gallery's files as last read (see files.py): a re-scan reads only those whose size or mtime moved
CREATE TABLE IF NOT EXISTS files (
    url      TEXT PRIMARY KEY,
    size     $int64 NOT NULL,
    mtime_ns $int64 NOT NULL
);
CREATE TABLE IF NOT EXISTS links (
    vec_id  $int64 NOT NULL REFERENCES images(vec_id) ON DELETE CASCADE,
    other   $int64 NOT NULL REFERENCES images(vec_id) ON DELETE CASCADE,
    inliers INTEGER NOT NULL,
    tier    TEXT,      -- the verdict of the pair (copy, similar); NULL on rows written before it was kept
    cosine  $real,     -- embedding cosine of the pair
    fit     $blob,     -- homography, vec_id pixels -> other pixels: 9 float32
    PRIMARY KEY (vec_id, other)
);
-- bumped with every links write, so derived views (duplicate groups) know when to recompute
CREATE TABLE IF NOT EXISTS link_generation (id INTEGER PRIMARY KEY CHECK (id = 1), generation $int64 NOT NULL);
INSERT INTO link_generation (id, generation) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
-- people's decisions about duplicates, by content hash so they outlive a delete, a re-ingest or a reindex:
-- kind 'distinct' (sha_a < sha_b: never the same picture) or 'keep' (sha_a kept, sha_b = '')
CREATE TABLE IF NOT EXISTS duplicate_decisions (
    sha_a      TEXT NOT NULL,
    sha_b      TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('distinct', 'keep')),
    decided_at $real NOT NULL,
    PRIMARY KEY (sha_a, sha_b, kind)
);
""")


# Columns added to tables of older catalogues: (table, column, type key); see ``upgrade``.
_ADDED_COLUMNS = (("links", "tier", "TEXT"), ("links", "cosine", "real"), ("links", "fit", "blob"))


def upgrade(conn: Any, real: str, blob: str) -> None:
    """Bring an older catalogue's tables up to the statements above (inside the opening transaction).

    Links written before each pair's verdict was kept lose their marks (an image's row to itself), so the next
    ingest links those images again and the duplicate groups see every pair (``LinkQueries.unlinked``).
    """
    types = {"TEXT": "TEXT", "real": real, "blob": blob}
    for table, column, kind in _ADDED_COLUMNS:
        present = {d[0] for d in conn.execute(f"SELECT * FROM {table} LIMIT 0").description}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {types[kind]}")
    conn.execute("CREATE INDEX IF NOT EXISTS links_tier ON links(tier)")
    stale = conn.execute("SELECT 1 FROM links WHERE other != vec_id AND tier IS NULL LIMIT 1").fetchone()
    if stale is not None:
        conn.execute(
            """DELETE FROM links WHERE other = vec_id AND vec_id IN
               (SELECT vec_id FROM links WHERE other != vec_id AND tier IS NULL)"""
        )


def schema(identity: str, int64: str, blob: str, real: str) -> str:
    """The DDL with each engine's types for an auto-numbered key, a 64-bit integer, bytes and a float."""
    return _TEMPLATE.substitute(identity=identity, int64=int64, blob=blob, real=real)


SQLITE_SCHEMA = schema(identity="INTEGER PRIMARY KEY AUTOINCREMENT", int64="INTEGER", blob="BLOB", real="REAL")

POSTGRES_SCHEMA = (
    schema(
        identity="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        int64="BIGINT",
        blob="BYTEA",
        real="DOUBLE PRECISION",
    )
    # float32 vectors, PNG, binary descriptors and JPEG do not compress: store them out of line, uncompressed
    + "".join(
        f"ALTER TABLE images ALTER COLUMN {column} SET STORAGE EXTERNAL;\n"
        for column in ("embedding", "gray", "orb", "thumbnail")
    )
)
